//! Deleting pack objects from the bucket, across hosts (FORMAT.md, "Garbage collection across
//! hosts"): unpublishing deleted snapshots, holds (leases) on imported snapshots, and the
//! mark / wait / recheck / delete collection of this store's own pack objects.
//!
//! Invariants a reader must not break:
//! - A store deletes only its own pack objects (`packs/STORE_ID/`), only those whose local
//!   pack file is gone (so it holds no live block of them and never uploads them again), and
//!   only when neither a manifest nor an unexpired hold of any host names them, both at the
//!   mark and at the recheck after the grace period.
//! - The recheck and the deletes run under `publish_lock`: a publish of this store either
//!   wrote its manifest before the recheck lists the manifests, or starts after the deletes.
//! - A publish (or an import writing a hold) that names another store's object checks, after
//!   its PUT, that no other store's candidates list names it and that it exists; if not, it
//!   deletes what it wrote and fails. So a manifest or hold never names a deleted object.
//! - A manifest is deleted (unpublished) only by its publisher, and only when the snapshot is
//!   gone from the publisher's store.

use super::{published_key, Remote, MANIFESTS};
use crate::tree::Datasets;
use anyhow::{bail, Context};
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use vdbfs_format::manifest;

/// Holds: `PREFIX/holds/STORE_ID/DATASET@SNAPSHOT.hold`.
pub const HOLDS: &str = "holds";
/// Candidates lists: `PREFIX/gc/STORE_ID/candidates`.
pub const GC_DIR: &str = "gc";
/// The grace period when none is given.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// How long a hold lives after it was written; the holder renews it every [`HOLD_RENEW`].
pub const HOLD_TTL: Duration = Duration::from_secs(7 * 86400);
pub const HOLD_RENEW: Duration = Duration::from_secs(86400);
/// An imported snapshot nothing was ever cloned from is dropped after this long.
const UNUSED_IMPORT: i64 = 3600;
/// How often the uploader starts a background collection, and looks after holds and
/// unpublishes deleted snapshots.
const BACKGROUND_GC_EVERY: Duration = Duration::from_secs(600);
const MAINTAIN_EVERY: Duration = Duration::from_secs(30);

const META_IMPORTED: &str = "remote_imported/";
const META_PENDING: &str = "remote_gc_pending";
const META_LAST: &str = "remote_gc_last";

/// A hold (lease): the objects a store's datasets need, though no manifest may name them
/// any more. Ignored by collectors once `expires` (unix seconds) has passed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hold {
    pub v: u32,
    pub holder: String,
    /// `dataset@snapshot` (the imported snapshot).
    pub snapshot: String,
    pub publisher: String,
    pub renewed: i64,
    pub expires: i64,
    /// Object keys relative to PREFIX.
    pub objects: Vec<String>,
}

/// A collection between its mark and its recheck: `PREFIX/gc/STORE_ID/candidates` and the
/// store's `meta.remote_gc_pending` (so a restarted daemon resumes it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Candidates {
    pub v: u32,
    pub store_id: String,
    /// Unix seconds of the mark.
    pub marked: i64,
    pub grace_s: u64,
    pub objects: Vec<String>,
}

/// What this store imported: `meta.remote_imported/DATASET@SNAPSHOT`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Imported {
    at: i64,
    /// A dataset was cloned from it once (so it goes when the last one is deleted).
    used: bool,
    renewed: i64,
    publisher: String,
    objects: Vec<String>,
}

/// The outcome of a remote collection (`vdbfs remote gc`, and `remote status` as `last_gc`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RemoteGcReport {
    pub started: String,
    pub finished: Option<String>,
    pub grace_s: u64,
    pub dry_run: bool,
    pub manifests: u64,
    pub holds: u64,
    /// Own pack objects no manifest or hold named at the mark.
    pub candidates: u64,
    /// Candidates named again at the recheck (kept).
    pub kept: u64,
    pub deleted_objects: u64,
    pub deleted_bytes: u64,
    /// The keys deleted (or, with `dry_run`, that are candidates).
    #[serde(default)]
    pub objects: Vec<String>,
}

fn now() -> i64 {
    crate::time::now_unix()
}

/// Grace given for a test, in seconds (`VDBFS_TEST_HOLD_TTL_SECS`), else [`HOLD_TTL`].
fn hold_ttl() -> i64 {
    std::env::var("VDBFS_TEST_HOLD_TTL_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(HOLD_TTL.as_secs() as i64)
}

impl Remote {
    fn rel_of(&self, p: &object_store::path::Path) -> String {
        let s = p.as_ref();
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(&format!("{}/", self.prefix))
                .unwrap_or(s)
                .to_string()
        }
    }

    /// Objects under `rel` (relative keys) and their sizes.
    fn list_rel(&self, rel: &str) -> anyhow::Result<Vec<(String, u64)>> {
        use futures::TryStreamExt;
        let os = self.os.clone();
        let p = self.key(rel);
        let metas = self
            .run(async move { os.list(Some(&p)).try_collect::<Vec<_>>().await })?
            .with_context(|| format!("cannot list {rel}/ in {}", self.cfg.url))?;
        Ok(metas
            .into_iter()
            .map(|m| (self.rel_of(&m.location), m.size))
            .collect())
    }

    fn get_rel(&self, rel: &str) -> anyhow::Result<Option<bytes::Bytes>> {
        let os = self.os.clone();
        let k = self.key(rel);
        match self.run(async move { os.get(&k).await?.bytes().await })? {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context(format!("cannot read {rel}"))),
        }
    }

    pub(super) fn put_rel(&self, rel: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let os = self.os.clone();
        let k = self.key(rel);
        self.run(async move { os.put(&k, PutPayload::from(bytes)).await })?
            .with_context(|| format!("cannot write {rel} to {}", self.cfg.url))?;
        Ok(())
    }

    pub(super) fn delete_rel(&self, rel: &str) -> anyhow::Result<()> {
        let os = self.os.clone();
        let k = self.key(rel);
        match self.run(async move { os.delete(&k).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(anyhow::Error::new(e).context(format!("cannot delete {rel}"))),
        }
    }

    fn exists_rel(&self, rel: &str) -> anyhow::Result<bool> {
        let os = self.os.clone();
        let k = self.key(rel);
        match self.run(async move { os.head(&k).await })? {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(anyhow::Error::new(e).context(format!("cannot look for {rel}"))),
        }
    }

    fn own_packs_prefix(&self) -> String {
        format!("packs/{}/", self.cfg.store_id)
    }

    fn hold_key(&self, name: &str) -> String {
        format!("{HOLDS}/{}/{name}.hold", self.cfg.store_id)
    }

    fn candidates_key(&self) -> String {
        format!("{GC_DIR}/{}/candidates", self.cfg.store_id)
    }

    /// After a PUT of a manifest or hold naming `objects`: every object of another store is
    /// in no other store's candidates list and exists. Objects of this store are safe: its
    /// own collector rechecks under `publish_lock`.
    pub(super) fn check_reused(&self, objects: &[String]) -> anyhow::Result<()> {
        let own = self.own_packs_prefix();
        let foreign: HashSet<&String> = objects.iter().filter(|k| !k.starts_with(&own)).collect();
        if foreign.is_empty() {
            return Ok(());
        }
        for (rel, _) in self.list_rel(GC_DIR)? {
            if rel == self.candidates_key() || !rel.ends_with("/candidates") {
                continue;
            }
            let Some(b) = self.get_rel(&rel)? else {
                continue;
            };
            let c: Candidates = serde_json::from_slice(&b)
                .with_context(|| format!("the candidates list {rel} is corrupt"))?;
            if let Some(k) = c.objects.iter().find(|k| foreign.contains(k)) {
                bail!(
                    "object {k} is a candidate of the gc of store {} (marked {}); try again after it",
                    c.store_id,
                    crate::time::rfc3339(c.marked)
                );
            }
        }
        for k in foreign {
            if !self.exists_rel(k)? {
                bail!("object {k} is no longer in the bucket (collected by its store)");
            }
        }
        Ok(())
    }

    /// Writes the hold for an import of `name` (objects `objects`, published by
    /// `publisher`) and records it; fails (and removes the hold) if an object is being
    /// collected or gone.
    pub(super) fn take_hold(
        &self,
        name: &str,
        publisher: &str,
        objects: Vec<String>,
    ) -> anyhow::Result<()> {
        let t = now();
        let hold = Hold {
            v: 1,
            holder: self.cfg.store_id.clone(),
            snapshot: name.to_string(),
            publisher: publisher.to_string(),
            renewed: t,
            expires: t + hold_ttl(),
            objects: objects.clone(),
        };
        let key = self.hold_key(name);
        self.put_rel(&key, serde_json::to_vec(&hold)?)?;
        if let Err(e) = self.check_reused(&objects) {
            let _ = self.delete_rel(&key);
            return Err(e.context(format!("cannot hold the objects of {name}")));
        }
        let imp = Imported {
            at: t,
            used: false,
            renewed: t,
            publisher: publisher.to_string(),
            objects,
        };
        self.store.meta_put(
            &format!("{META_IMPORTED}{name}"),
            &serde_json::to_vec(&imp)?,
        )?;
        Ok(())
    }

    /// Unpublishes snapshots this store published and has deleted since, and renews or
    /// releases its holds. Runs every 30 s in the uploader, after deletes, and before a gc.
    pub fn maintain(&self, datasets: &Datasets) -> anyhow::Result<()> {
        let _g = self.maintain_lock.lock();
        *self.last_maintain.lock() = Some(std::time::Instant::now());
        self.unpublish_deleted(datasets)?;
        self.sync_holds(datasets)
    }

    fn unpublish_deleted(&self, datasets: &Datasets) -> anyhow::Result<()> {
        let published = self.store.meta_scan("remote_published/")?;
        if published.is_empty() {
            return Ok(());
        }
        let _g = self.publish_lock.lock();
        let here: HashSet<String> = datasets
            .snapshots(None)?
            .iter()
            .map(|s| s.full_name())
            .collect();
        let imported: HashSet<String> = self
            .store
            .meta_scan(META_IMPORTED)?
            .into_iter()
            .map(|(k, _)| k[META_IMPORTED.len()..].to_string())
            .collect();
        for (k, _) in published {
            let name = &k["remote_published/".len()..];
            if here.contains(name) || imported.contains(name) {
                continue;
            }
            let Some((d, s)) = name.split_once('@') else {
                continue;
            };
            let rel = Self::manifest_key(d, s);
            if let Some(b) = self.get_rel(&rel)? {
                match manifest::decode_header(&b) {
                    Ok(h) if h.publisher == self.cfg.store_id => {
                        self.delete_rel(&rel)?;
                        tracing::info!(snapshot = %name, object = %rel, "snapshot deleted here: unpublished");
                    }
                    Ok(h) => {
                        tracing::info!(snapshot = %name, publisher = %h.publisher, "not unpublishing a manifest another store published")
                    }
                    Err(e) => {
                        tracing::warn!(object = %rel, "not unpublishing a manifest that does not decode: {e}")
                    }
                }
            }
            self.store.meta_remove(&[k.as_str()])?;
        }
        Ok(())
    }

    /// Whether a dataset of this store descends (through clone origins) from `ds_id@snap`.
    /// A chain through a dataset that is gone counts as descending (it cannot be told).
    fn has_descendants(&self, datasets: &Datasets, ds_id: u64, snap: &str) -> anyhow::Result<bool> {
        let store = datasets.store();
        for rec in datasets.list()? {
            let mut cur = rec.id;
            for _ in 0..64 {
                let Some(o) = store.clone_origin(cur)? else {
                    break;
                };
                if o.dataset == ds_id && o.snapshot == snap {
                    return Ok(true);
                }
                if store.dataset_record_by_id(o.dataset)?.is_none() {
                    return Ok(true);
                }
                cur = o.dataset;
            }
        }
        Ok(false)
    }

    fn sync_holds(&self, datasets: &Datasets) -> anyhow::Result<()> {
        for (k, v) in self.store.meta_scan(META_IMPORTED)? {
            let name = k[META_IMPORTED.len()..].to_string();
            let Some((d, s)) = name.split_once('@') else {
                continue;
            };
            let mut imp: Imported = match serde_json::from_slice(&v) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(key = %k, "unreadable import record (kept): {e}");
                    continue;
                }
            };
            let rec = datasets.record(d)?;
            let shadow = match &rec {
                Some(_) => crate::catalog::has_snapshot(datasets, d, s)?,
                None => false,
            };
            let mut needed = match &rec {
                Some(r) => self.has_descendants(datasets, r.id, s)?,
                None => false,
            };
            let t = now();
            if needed && !imp.used {
                imp.used = true;
                self.store.meta_put(&k, &serde_json::to_vec(&imp)?)?;
            }
            let mut shadow_left = shadow;
            if !needed && shadow && (imp.used || t - imp.at > UNUSED_IMPORT) {
                datasets.delete_snapshot(d, s)?;
                shadow_left = false;
                tracing::info!(snapshot = %name, "imported snapshot no longer used: dropped");
                // A clone made in between keeps the hold.
                if let Some(r) = &rec {
                    needed = self.has_descendants(datasets, r.id, s)?;
                }
            }
            if !needed && !shadow_left {
                self.delete_rel(&self.hold_key(&name))?;
                self.store
                    .meta_remove(&[k.as_str(), published_key(&name).as_str()])?;
                tracing::info!(snapshot = %name, "hold released");
                continue;
            }
            if t - imp.renewed >= HOLD_RENEW.as_secs() as i64 {
                let hold = Hold {
                    v: 1,
                    holder: self.cfg.store_id.clone(),
                    snapshot: name.clone(),
                    publisher: imp.publisher.clone(),
                    renewed: t,
                    expires: t + hold_ttl(),
                    objects: imp.objects.clone(),
                };
                self.put_rel(&self.hold_key(&name), serde_json::to_vec(&hold)?)?;
                imp.renewed = t;
                self.store.meta_put(&k, &serde_json::to_vec(&imp)?)?;
            }
        }
        Ok(())
    }

    /// Every object a manifest or an unexpired hold of any host names, and how many of each
    /// were read. A manifest or hold that does not decode stops the collection.
    fn live_objects(&self) -> anyhow::Result<(HashSet<String>, u64, u64)> {
        let mut live = HashSet::new();
        let (mut nm, mut nh) = (0, 0);
        for (rel, _) in self.list_rel(MANIFESTS)? {
            if !rel.ends_with(".manifest") {
                continue;
            }
            // Gone since the listing: unpublished, names nothing.
            let Some(b) = self.get_rel(&rel)? else {
                continue;
            };
            let (h, _) = manifest::decode(&b)
                .with_context(|| format!("manifest {rel} is corrupt: no object is collected"))?;
            live.extend(h.objects.into_iter().map(|(_, k)| k));
            nm += 1;
        }
        let t = now();
        for (rel, _) in self.list_rel(HOLDS)? {
            if !rel.ends_with(".hold") {
                continue;
            }
            let Some(b) = self.get_rel(&rel)? else {
                continue;
            };
            let h: Hold = serde_json::from_slice(&b)
                .with_context(|| format!("hold {rel} is corrupt: no object is collected"))?;
            if h.expires < t {
                tracing::warn!(hold = %rel, holder = %h.holder, expired = %crate::time::rfc3339(h.expires), "ignoring an expired hold");
                continue;
            }
            live.extend(h.objects);
            nh += 1;
        }
        Ok((live, nm, nh))
    }

    /// This store's pack objects whose local pack is gone: key -> size.
    fn collectable(&self) -> anyhow::Result<HashMap<String, u64>> {
        let own = self.own_packs_prefix();
        let mut out = HashMap::new();
        for (rel, size) in self.list_rel(own.trim_end_matches('/'))? {
            let Some(no) = rel
                .strip_prefix(&own)
                .and_then(|f| f.strip_suffix(".pack"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if self.store.pack_file(no).is_none() {
                out.insert(rel, size);
            }
        }
        Ok(out)
    }

    fn mark(&self, grace: Duration) -> anyhow::Result<(Candidates, RemoteGcReport)> {
        let started = now();
        let collectable = self.collectable()?;
        let (live, nm, nh) = self.live_objects()?;
        let mut objects: Vec<String> = collectable
            .keys()
            .filter(|k| !live.contains(*k))
            .cloned()
            .collect();
        objects.sort();
        let report = RemoteGcReport {
            started: crate::time::rfc3339(started),
            grace_s: grace.as_secs(),
            manifests: nm,
            holds: nh,
            candidates: objects.len() as u64,
            ..Default::default()
        };
        Ok((
            Candidates {
                v: 1,
                store_id: self.cfg.store_id.clone(),
                marked: started,
                grace_s: grace.as_secs(),
                objects,
            },
            report,
        ))
    }

    /// Writes the candidates list to the bucket and the store (a restart resumes).
    fn announce(&self, c: &Candidates) -> anyhow::Result<()> {
        let b = serde_json::to_vec(c)?;
        self.put_rel(&self.candidates_key(), b.clone())?;
        self.store.meta_put(META_PENDING, &b)?;
        tracing::info!(
            candidates = c.objects.len(),
            grace_s = c.grace_s,
            "remote gc: candidates written, waiting out the grace period"
        );
        Ok(())
    }

    fn pending(&self) -> anyhow::Result<Option<Candidates>> {
        Ok(match self.store.meta_get(META_PENDING)? {
            Some(b) => Some(serde_json::from_slice(&b).context("meta.remote_gc_pending")?),
            None => None,
        })
    }

    /// Recheck and delete, once the grace period of `c` is over.
    fn finish(&self, c: &Candidates, mut report: RemoteGcReport) -> anyhow::Result<RemoteGcReport> {
        let _g = self.publish_lock.lock();
        let collectable = self.collectable()?;
        let (live, nm, nh) = self.live_objects()?;
        report.manifests = nm;
        report.holds = nh;
        for k in &c.objects {
            let Some(size) = collectable.get(k) else {
                continue;
            };
            if live.contains(k) {
                report.kept += 1;
                continue;
            }
            let no = k
                .strip_prefix(&self.own_packs_prefix())
                .and_then(|f| f.strip_suffix(".pack"))
                .and_then(|n| n.parse::<u32>().ok());
            if let Some(no) = no {
                self.store.unmark_remote_uploaded(no)?;
            }
            self.delete_rel(k)?;
            tracing::info!(object = %k, bytes = size, "remote gc: pack object deleted");
            report.deleted_objects += 1;
            report.deleted_bytes += size;
            report.objects.push(k.clone());
        }
        self.delete_rel(&self.candidates_key())?;
        self.store.meta_remove(&[META_PENDING])?;
        report.finished = Some(crate::time::rfc3339_now());
        self.store
            .meta_put(META_LAST, &serde_json::to_vec(&report)?)?;
        tracing::info!(
            deleted = report.deleted_objects,
            bytes = report.deleted_bytes,
            kept = report.kept,
            "remote gc done"
        );
        self.state.lock().last_gc = Some(report.clone());
        Ok(report)
    }

    /// The last finished remote collection, as the store recorded it.
    pub(super) fn last_gc(&self) -> Option<RemoteGcReport> {
        let b = self.store.meta_get(META_LAST).ok()??;
        serde_json::from_slice(&b).ok()
    }

    /// `vdbfs remote gc`: a whole collection now (mark, wait `grace`, recheck, delete); with
    /// `dry_run` the mark only (what would be candidates now). A collection the daemon had
    /// pending is replaced (a new mark is as safe as the old one).
    pub fn gc(
        &self,
        datasets: &Datasets,
        grace: Duration,
        dry_run: bool,
        progress: Option<&crate::api::Progress>,
    ) -> anyhow::Result<RemoteGcReport> {
        let _g = self.gc_lock.lock();
        self.maintain(datasets)?;
        let (c, mut report) = self.mark(grace)?;
        if dry_run {
            report.dry_run = true;
            report.objects = c.objects.clone();
            report.finished = Some(crate::time::rfc3339_now());
            return Ok(report);
        }
        self.announce(&c)?;
        // Said every 30 s: the CLI gives up on a daemon silent for 10 minutes.
        let end = std::time::Instant::now() + grace;
        loop {
            let now = std::time::Instant::now();
            if now >= end {
                break;
            }
            if let Some(p) = progress {
                p.say(format!(
                    "{} candidate(s); waiting out the grace period: {} s left",
                    c.objects.len(),
                    (end - now).as_secs()
                ));
            }
            std::thread::sleep((end - now).min(Duration::from_secs(30)));
        }
        self.finish(&c, report)
    }

    /// The uploader's share: holds and unpublishing every 30 s; a collection every 10
    /// minutes, advanced one step at a time (mark, then recheck once its grace is over), also
    /// across restarts. Never blocks on a running `remote gc`.
    pub(super) fn background(&self, datasets: &Datasets) -> anyhow::Result<()> {
        let due = self
            .last_maintain
            .lock()
            .is_none_or(|t| t.elapsed() >= MAINTAIN_EVERY);
        if due {
            self.maintain(datasets)?;
        }
        let Some(_g) = self.gc_lock.try_lock() else {
            return Ok(());
        };
        match self.pending()? {
            Some(c) => {
                if now() >= c.marked + c.grace_s as i64 {
                    let report = RemoteGcReport {
                        started: crate::time::rfc3339(c.marked),
                        grace_s: c.grace_s,
                        candidates: c.objects.len() as u64,
                        ..Default::default()
                    };
                    self.finish(&c, report)?;
                    *self.last_gc_start.lock() = std::time::Instant::now();
                }
            }
            None => {
                if self.last_gc_start.lock().elapsed() >= BACKGROUND_GC_EVERY {
                    *self.last_gc_start.lock() = std::time::Instant::now();
                    let (c, _) = self.mark(DEFAULT_GRACE)?;
                    if !c.objects.is_empty() {
                        self.announce(&c)?;
                    }
                }
            }
        }
        Ok(())
    }
}
