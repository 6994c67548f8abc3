//! The catalog operations the control path adds: internal datasets, snapshot properties
//! replaced later, and snapshots adopted from another dataset's snapshot.

use super::dataset::ROOT_INO;
use super::{is_internal, Datasets};
use crate::store::Store;
use std::sync::Arc;
use vdbfs_format::tree::FileKind;

#[test]
fn internal_datasets_props_and_adopted_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    Store::create(dir.path()).unwrap();
    let (store, replay) = Store::open(dir.path()).unwrap();
    let ds = Datasets::open(Arc::new(store), replay).unwrap();

    assert!(
        ds.create(".wal").is_err(),
        "users cannot make internal names"
    );
    assert!(
        ds.create_internal("wal").is_err(),
        "internal names start with a dot"
    );
    assert!(ds.create_internal("..x").is_err());
    ds.create_internal(".wal").unwrap();
    assert!(is_internal(".wal") && !is_internal("prod"));

    ds.create("a").unwrap();
    let a = ds.get("a").unwrap().unwrap();
    let (ino, _) = a
        .create(ROOT_INO, b"f", FileKind::Regular, 0o600, 0, 0, 0, None)
        .unwrap();
    a.write(ino, 0, b"first").unwrap();
    ds.snapshot_with_props("a", Some("s1"), Some(b"{}".to_vec()))
        .unwrap();
    a.write(ino, 0, b"later").unwrap();
    ds.set_snapshot_props("a", "s1", b"{\"x\":1}").unwrap();
    let props = |d: &str, s: &str| {
        ds.snapshots(Some(d))
            .unwrap()
            .into_iter()
            .find(|x| x.rec.name == s)
            .and_then(|x| x.props)
    };
    assert_eq!(props("a", "s1").as_deref(), Some(&b"{\"x\":1}"[..]));
    assert!(ds.set_snapshot_props("a", "nope", b"{}").is_err());

    // Adopted into another dataset, the tree outlives the snapshot it came from.
    ds.adopt_snapshot(".wal", "kept", "a", "s1", None).unwrap();
    assert!(ds.adopt_snapshot(".wal", "kept", "a", "s1", None).is_err());
    ds.delete_snapshot("a", "s1").unwrap();
    ds.gc().unwrap();
    let view = ds.snapshot_view(".wal", "kept").unwrap();
    let (vino, _) = view.lookup(ROOT_INO, b"f").unwrap();
    assert_eq!(view.read(vino, 0, 5).unwrap(), b"first");
}
