//! Compound operations on the dataset catalog (`tree::Datasets`) that several control-path
//! services share: deleting a dataset with its snapshots, finding the snapshot a `--from` or
//! `--to` names.
//!
//! Invariant: these only combine the catalog's own operations; callers check mounts first.

use crate::api::{refusal, ErrorKind};
use crate::tree::{Datasets, NameError};

/// Deletes a dataset and its snapshots, if the dataset exists. The caller made sure none of
/// them is mounted.
pub fn delete_dataset(datasets: &Datasets, name: &str) -> anyhow::Result<()> {
    if datasets.record(name)?.is_none() {
        return Ok(());
    }
    for s in datasets.snapshots(Some(name))? {
        datasets.delete_snapshot(name, &s.rec.name)?;
    }
    datasets.delete(name)
}

/// `DATASET@SNAPSHOT` (which must exist), or `DATASET` = its latest snapshot.
pub fn resolve_snapshot(datasets: &Datasets, from: &str) -> anyhow::Result<(String, String)> {
    if let Some((d, s)) = from.split_once('@') {
        crate::tree::parse_snapshot_ref(from)?;
        if !has_snapshot(datasets, d, s)? {
            return Err(NameError::SnapshotNotFound(format!("{d}@{s}")).into());
        }
        return Ok((d.to_string(), s.to_string()));
    }
    let snaps = datasets.snapshots(Some(from))?;
    let last = snaps.last().ok_or_else(|| {
        refusal(
            ErrorKind::NotFound,
            format!(
                "dataset {from} has no snapshots to provision from; take one first ('vdbfs source \
                 snapshot {from}' for a source, 'vdbfs vdb snapshot {from}' for a VDB)"
            ),
        )
    })?;
    Ok((from.to_string(), last.rec.name.clone()))
}

/// Whether `dataset@snap` exists (an unknown dataset is an error).
pub fn has_snapshot(datasets: &Datasets, dataset: &str, snap: &str) -> anyhow::Result<bool> {
    Ok(datasets
        .snapshots(Some(dataset))?
        .iter()
        .any(|x| x.rec.name == snap))
}
