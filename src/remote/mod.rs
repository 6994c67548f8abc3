//! The object-store side of a store: sealed packs uploaded to an S3-compatible bucket, published
//! snapshot manifests, and blocks of other hosts' snapshots fetched on read. See FORMAT.md,
//! "Remote".
//!
//! Invariants a reader must not break:
//! - Only closed packs are uploaded (they never change again), whole, under
//!   `PREFIX/packs/STORE_ID/NNNNNNNN.pack`; a pack counts as uploaded (table `remote_uploaded`)
//!   only after the PUT succeeded, so a crash at any point uploads it again, never half.
//! - A manifest is PUT only after every pack object it names is uploaded: a manifest never
//!   names a block that is not in the bucket. A crash before its PUT leaves no manifest.
//! - Objects are deleted only by `gc` (see there and FORMAT.md, "Garbage collection across
//!   hosts"): a host's local gc removes local packs only; a pack object goes only when no
//!   manifest and no hold of any host names it.
//! - A fetched block is verified like a local read (record crc, kind, id, blake3); a mismatch is
//!   an error naming the object, logged here, never wrong bytes.
//! - Blocks fetched from the bucket are kept in the bounded cache (`cache`), never in the
//!   store's log: they are not this store's blocks, so they are never uploaded as its packs,
//!   never indexed, and may be evicted at any time (a later read fetches them again).
//! - Credentials come only from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//!   `AWS_SESSION_TOKEN`, ...) or the AWS profile files (`profile`): never from the command
//!   line, never in `remote.json`, never logged.

pub mod cache;
pub mod upload;

use crate::store::remote_tables::ImportedBlock;
use crate::store::{self, Store};
use crate::tree::Datasets;
use anyhow::{anyhow, bail, Context};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vdbfs_format::manifest::{self, ManifestEntry, ManifestHeader};
use vdbfs_format::pack::RecordFormat;
use vdbfs_format::BlockId;

pub mod gc;
pub mod profile;

/// `STORE/remote.json`: where the store's bucket is. No credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteConfig {
    pub v: u32,
    /// `s3://BUCKET/PREFIX`
    pub url: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub cache_size: Option<u64>,
    /// This store's name in the bucket (its packs' folder).
    pub store_id: String,
}

pub fn config_path(store_dir: &Path) -> PathBuf {
    store_dir.join("remote.json")
}

impl RemoteConfig {
    pub fn load(store_dir: &Path) -> anyhow::Result<Option<RemoteConfig>> {
        let p = config_path(store_dir);
        match std::fs::read(&p) {
            Ok(b) => {
                Ok(Some(serde_json::from_slice(&b).with_context(|| {
                    format!("cannot parse {}", p.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
        }
    }

    /// Writes the file (mode 0600) and fsyncs it and the store directory.
    pub fn save(&self, store_dir: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let p = config_path(store_dir);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .with_context(|| format!("cannot create {}", p.display()))?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        std::fs::File::open(store_dir)?.sync_all()?;
        Ok(())
    }

    /// (bucket, prefix) of `s3://BUCKET/PREFIX`.
    pub fn bucket_prefix(&self) -> anyhow::Result<(String, String)> {
        let rest = self
            .url
            .strip_prefix("s3://")
            .ok_or_else(|| anyhow!("--remote {}: give s3://BUCKET/PREFIX", self.url))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("--remote {}: no bucket", self.url);
        }
        Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
    }
}

/// A new store id: the host name and 8 random hex digits (distinct stores never share packs).
pub fn new_store_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let r = u32::from_le_bytes(b) ^ t;
    format!("{host}-{r:08x}")
}

/// Upload state for `vdbfs remote status` and `vdbfs status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RemoteStatus {
    pub url: String,
    pub endpoint: Option<String>,
    pub store_id: String,
    /// Closed packs not uploaded yet, and their bytes.
    pub backlog_packs: u64,
    pub backlog_bytes: u64,
    pub uploaded_packs: u64,
    /// Uploads that failed in a row (retried with backoff).
    pub failures: u32,
    pub last_error: Option<String>,
    /// Snapshots published by this daemon since it started.
    pub published: u64,
    /// Blocks fetched from the bucket since the daemon started.
    pub fetched_blocks: u64,
    pub fetched_bytes: u64,
    /// Fetches that did not verify (the reader got EIO; the log names the object).
    #[serde(default)]
    pub bad_blocks: u64,
    /// The last remote collection of this store's pack objects (`vdbfs remote gc`).
    #[serde(default)]
    pub last_gc: Option<gc::RemoteGcReport>,
    /// The local cache of fetched blocks (`--cache-size`).
    #[serde(default)]
    pub cache: cache::CacheStatus,
}

/// A published snapshot, as `vdbfs remote list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Published {
    /// `dataset@snapshot`
    pub name: String,
    pub publisher: String,
    pub lsn: Option<String>,
    pub timeline: Option<u32>,
    pub created: String,
    pub published: String,
    pub blocks: u64,
    pub object: String,
}

pub struct Remote {
    cfg: RemoteConfig,
    prefix: String,
    os: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
    store: Arc<Store>,
    state: Mutex<RemoteStatus>,
    wake: Condvar,
    /// One publish at a time (they share pack uploads).
    publish_lock: Mutex<()>,
    /// One pack upload at a time, so a pack is uploaded once (the uploader and a publish both
    /// upload).
    upload_lock: Mutex<()>,
    /// Test only: see `upload::TEST_PAUSE_ENV`.
    test_pause: Option<Duration>,
    /// One remote collection at a time (`gc`).
    gc_lock: Mutex<()>,
    /// One unpublish/hold round at a time, and when the last one ran.
    maintain_lock: Mutex<()>,
    last_maintain: Mutex<Option<Instant>>,
    /// When the uploader last started a background collection.
    last_gc_start: Mutex<Instant>,
    /// After a failed background round: not before then.
    bg_retry: Mutex<Option<Instant>>,
    /// Blocks fetched from the bucket, bounded by `cache_size`.
    cache: cache::Cache,
}

const MANIFESTS: &str = "manifests";
/// Longest wait between upload retries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Remote {
    /// Connects (lazily: nothing is sent yet) to the bucket `cfg` names, with credentials from
    /// the environment.
    pub fn open(cfg: RemoteConfig, store: Arc<Store>) -> anyhow::Result<Arc<Remote>> {
        let (bucket, prefix) = cfg.bucket_prefix()?;
        // Environment first, then the AWS profile (`profile`); `--endpoint`/`--region` given
        // to `init` over both.
        let aws = profile::resolve()?;
        let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&bucket);
        if let Some((id, secret, token)) = &aws.keys {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
            if let Some(t) = token {
                b = b.with_token(t);
            }
        }
        let region = cfg.region.clone().or_else(|| aws.region.clone());
        let endpoint = cfg.endpoint.clone().or_else(|| aws.endpoint.clone());
        if let Some(r) = &region {
            b = b.with_region(r);
        }
        if let Some(e) = &endpoint {
            b = b.with_endpoint(e);
        }
        tracing::info!(
            profile = %aws.profile,
            keys_from = aws.keys_from.as_deref().unwrap_or("nowhere (anonymous or instance credentials)"),
            region = region.as_deref().unwrap_or("-"),
            endpoint = endpoint.as_deref().unwrap_or("-"),
            "remote credentials"
        );
        let retry = object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(20),
            ..Default::default()
        };
        // allow_http is a client option: set here, since with_client_options replaces them all.
        let plain_http = endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT").ok())
            .is_some_and(|e| e.starts_with("http://"));
        let opts = object_store::ClientOptions::new()
            .with_allow_http(plain_http)
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(120));
        let os = b
            .with_retry(retry)
            .with_client_options(opts)
            .build()
            .context("cannot set up the S3 client (credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the AWS profile AWS_PROFILE names in ~/.aws/credentials or ~/.aws/config)")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("remote")
            .enable_all()
            .build()?;
        let cache = cache::Cache::open(store.dir(), cfg.cache_size)?;
        let state = RemoteStatus {
            url: cfg.url.clone(),
            endpoint: cfg.endpoint.clone(),
            store_id: cfg.store_id.clone(),
            ..Default::default()
        };
        let r = Arc::new(Remote {
            cfg,
            prefix,
            os: Arc::new(os),
            rt,
            store,
            state: Mutex::new(state),
            wake: Condvar::new(),
            publish_lock: Mutex::new(()),
            upload_lock: Mutex::new(()),
            cache,
            test_pause: upload::test_pause_from_env(),
            gc_lock: Mutex::new(()),
            maintain_lock: Mutex::new(()),
            last_maintain: Mutex::new(None),
            last_gc_start: Mutex::new(Instant::now()),
            bg_retry: Mutex::new(None),
        });
        let last = r.last_gc();
        r.state.lock().last_gc = last;
        Ok(r)
    }

    fn key(&self, rel: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn pack_key(&self, no: u32) -> String {
        format!("packs/{}/{no:08}.pack", self.cfg.store_id)
    }

    fn manifest_key(dataset: &str, snap: &str) -> String {
        format!("{MANIFESTS}/{dataset}/{snap}.manifest")
    }

    /// Runs `f` on the remote's own runtime from any thread (also from one of another runtime).
    fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> anyhow::Result<T> {
        futures::executor::block_on(self.rt.spawn(f)).map_err(|e| anyhow!("remote task: {e}"))
    }

    pub fn status(&self) -> RemoteStatus {
        let mut s = self.state.lock().clone();
        s.cache = self.cache.status();
        s
    }

    fn uploaded(&self) -> anyhow::Result<HashMap<u32, u8>> {
        Ok(self.store.remote_uploaded()?)
    }

    /// Closed packs not uploaded yet, lowest first, with their sizes.
    fn backlog(&self) -> anyhow::Result<Vec<(u32, u64)>> {
        let done = self.uploaded()?;
        let active = self.store.active_pack();
        let mut out = Vec::new();
        for no in self.store.pack_numbers() {
            if no >= active || done.contains_key(&no) {
                continue;
            }
            if let Some((_, path)) = self.store.pack_file(no) {
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                out.push((no, len));
            }
        }
        Ok(out)
    }

    /// Uploads closed pack `no` whole (if it still exists) and records it. Returns false if
    /// the pack is gone (collected meanwhile).
    fn upload_pack(&self, no: u32) -> anyhow::Result<bool> {
        let _g = self.upload_lock.lock();
        if self.uploaded()?.contains_key(&no) {
            return Ok(true);
        }
        let Some((format, path)) = self.store.pack_file(no) else {
            return Ok(false);
        };
        let key = self.key(&self.pack_key(no));
        let os = self.os.clone();
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let method = upload::Method::for_len(len);
        tracing::info!(pack = no, bytes = len, %method, "uploading pack");
        let t = Instant::now();
        let what = format!("pack {no}");
        let pause = self.test_pause;
        let Some(len) = self
            .run(upload::upload_file(os, key, path, method, pause, what))?
            .with_context(|| format!("cannot upload pack {no} to {}", self.cfg.url))?
        else {
            return Ok(false);
        };
        self.store.mark_remote_uploaded(
            no,
            match format {
                RecordFormat::V1 => 1u8,
                RecordFormat::V2 => 2u8,
            },
        )?;
        tracing::info!(
            pack = no,
            bytes = len,
            ms = t.elapsed().as_millis() as u64,
            "pack uploaded"
        );
        self.state.lock().uploaded_packs += 1;
        Ok(true)
    }

    /// Asks the uploader to look for work now.
    pub fn kick(&self) {
        self.wake.notify_all();
    }

    /// The uploader: uploads closed packs in order, retrying with exponential backoff while
    /// the bucket is unreachable, and publishes new source snapshots. Runs until `stop`.
    pub fn uploader(self: Arc<Self>, datasets: Arc<Datasets>, stop: Arc<AtomicBool>) {
        let mut failures: u32 = 0;
        while !stop.load(Ordering::Relaxed) {
            let r = self
                .upload_round()
                .and_then(|()| self.publish_sources(&datasets));
            // Unpublishing, holds and collections fail on their own (logged, retried a minute
            // later): they do not hold up uploads or count as upload failures.
            if r.is_ok() && self.bg_retry.lock().is_none_or(|t| Instant::now() >= t) {
                if let Err(e) = self.background(&datasets) {
                    tracing::warn!(
                        "remote gc, unpublishing or holds failed (retried in 60 s): {e:#}"
                    );
                    *self.bg_retry.lock() = Some(Instant::now() + Duration::from_secs(60));
                }
            }
            let wait = match r {
                Ok(()) => {
                    failures = 0;
                    let mut st = self.state.lock();
                    st.failures = 0;
                    st.last_error = None;
                    Duration::from_secs(2)
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = Duration::from_secs(1 << failures.min(5)).min(MAX_BACKOFF);
                    tracing::warn!(
                        failures,
                        retry_in_s = wait.as_secs(),
                        "remote upload failed (local work goes on): {e:#}"
                    );
                    let mut st = self.state.lock();
                    st.failures = failures;
                    st.last_error = Some(format!("{e:#}"));
                    wait
                }
            };
            let mut st = self.state.lock();
            self.wake.wait_for(&mut st, wait);
        }
    }

    fn upload_round(&self) -> anyhow::Result<()> {
        let todo = self.backlog()?;
        {
            let mut st = self.state.lock();
            st.backlog_packs = todo.len() as u64;
            st.backlog_bytes = todo.iter().map(|(_, l)| l).sum();
        }
        for (no, len) in todo {
            self.upload_pack(no)?;
            let mut st = self.state.lock();
            st.backlog_packs = st.backlog_packs.saturating_sub(1);
            st.backlog_bytes = st.backlog_bytes.saturating_sub(len);
        }
        Ok(())
    }

    /// Publishes every source snapshot (one with an LSN) not published yet.
    fn publish_sources(&self, datasets: &Datasets) -> anyhow::Result<()> {
        for s in datasets.snapshots(None)? {
            if crate::source::snapshot_props(&s).is_none() {
                continue;
            }
            let key = s.full_name();
            if self.store.meta_get(&published_key(&key))?.is_some() {
                continue;
            }
            self.publish(datasets, &s.dataset, &s.rec.name)?;
        }
        Ok(())
    }

    /// Publishes `dataset@snap`: uploads every pack holding a block it references, then PUTs
    /// its manifest. Returns the manifest's key.
    pub fn publish(
        &self,
        datasets: &Datasets,
        dataset: &str,
        snap: &str,
    ) -> anyhow::Result<String> {
        let _g = self.publish_lock.lock();
        let mut last = None;
        // A pack the gc compacted between the lookup and its upload: look the blocks up again.
        for _ in 0..3 {
            match self.try_publish(datasets, dataset, snap)? {
                Ok(key) => {
                    self.store
                        .meta_put(&published_key(&format!("{dataset}@{snap}")), b"1")?;
                    self.state.lock().published += 1;
                    return Ok(key);
                }
                Err(no) => last = Some(no),
            }
        }
        bail!(
            "cannot publish {dataset}@{snap}: pack {} kept disappearing (gc); try again",
            last.unwrap_or(0)
        )
    }

    fn try_publish(
        &self,
        datasets: &Datasets,
        dataset: &str,
        snap: &str,
    ) -> anyhow::Result<std::result::Result<String, u32>> {
        let info = datasets
            .snapshots(Some(dataset))?
            .into_iter()
            .find(|s| s.rec.name == snap)
            .ok_or_else(|| crate::tree::NameError::SnapshotNotFound(format!("{dataset}@{snap}")))?;
        // Every block of the snapshot in the index, none only in the log's memory.
        datasets.checkpoint()?;
        let mut walk = crate::tree::walk::Walk::default();
        crate::tree::walk::walk_root(&self.store, info.rec.root, &mut walk)?;
        let mut ids: Vec<BlockId> = walk.blocks.into_iter().collect();
        ids.sort_unstable();
        let mut locs = self.store.lookup_many(&ids)?;
        if locs
            .iter()
            .flatten()
            .any(|l| l.pack >= self.store.active_pack())
        {
            // Close the active pack so that it can be uploaded; locations do not change.
            self.store.roll_if_larger(0)?;
            locs = self.store.lookup_many(&ids)?;
        }
        let mut objects: Vec<(u8, String)> = Vec::new();
        let mut obj_of_pack: BTreeMap<u32, u32> = BTreeMap::new();
        let mut obj_of_key: HashMap<String, u32> = HashMap::new();
        let mut entries = Vec::with_capacity(ids.len());
        let uploaded = self.uploaded()?;
        // Blocks this store only knows from other hosts' manifests, in `ids` order.
        let not_local: Vec<BlockId> = ids
            .iter()
            .zip(&locs)
            .filter(|(_, l)| l.is_none())
            .map(|(id, _)| *id)
            .collect();
        let mut remote_locs = self.store.remote_blocks(&not_local)?.into_iter();
        for (id, loc) in ids.iter().zip(&locs) {
            match loc {
                Some(l) => {
                    let obj = match obj_of_pack.get(&l.pack) {
                        Some(o) => *o,
                        None => {
                            let format = match uploaded.get(&l.pack) {
                                Some(f) => *f,
                                None => {
                                    if !self.upload_pack(l.pack)? {
                                        return Ok(Err(l.pack));
                                    }
                                    match self.store.pack_file(l.pack) {
                                        Some((RecordFormat::V1, _)) => 1,
                                        _ => 2,
                                    }
                                }
                            };
                            let o = objects.len() as u32;
                            objects.push((format, self.pack_key(l.pack)));
                            obj_of_pack.insert(l.pack, o);
                            o
                        }
                    };
                    entries.push(ManifestEntry {
                        id: *id,
                        object: obj,
                        offset: l.offset,
                        len: l.len,
                    });
                }
                None => {
                    // A block this store only knows from another host's manifest.
                    let store::remote_tables::RemoteBlock {
                        key,
                        format,
                        offset,
                        len,
                    } = remote_locs.next().flatten().ok_or_else(|| {
                        anyhow!(
                            "block {} of {dataset}@{snap} is not in the store",
                            id.to_hex()
                        )
                    })?;
                    let obj = match obj_of_key.get(&key) {
                        Some(o) => *o,
                        None => {
                            let o = objects.len() as u32;
                            objects.push((format, key.clone()));
                            obj_of_key.insert(key, o);
                            o
                        }
                    };
                    entries.push(ManifestEntry {
                        id: *id,
                        object: obj,
                        offset,
                        len,
                    });
                }
            }
        }
        let header = ManifestHeader {
            publisher: self.cfg.store_id.clone(),
            dataset: dataset.to_string(),
            snapshot: snap.to_string(),
            created: info.rec.created,
            published: crate::tree::dataset::now(),
            root: info.rec.root,
            next_ino: info.rec.next_ino,
            props: info.props.clone().unwrap_or_default(),
            objects,
            blocks: 0,
        };
        let bytes = manifest::encode(&header, &entries);
        let rel = Self::manifest_key(dataset, snap);
        let key = self.key(&rel);
        let os = self.os.clone();
        let n = bytes.len();
        let named: Vec<String> = header.objects.iter().map(|(_, k)| k.clone()).collect();
        self.run(async move { os.put(&key, PutPayload::from(bytes)).await })?
            .with_context(|| format!("cannot upload the manifest of {dataset}@{snap}"))?;
        // Objects of other stores may be collected by them: the manifest stays only if none
        // is a candidate of a collection or gone (FORMAT.md, "Garbage collection across hosts").
        if let Err(e) = self.check_reused(&named) {
            self.delete_rel(&rel)?;
            tracing::warn!(snapshot = %format!("{dataset}@{snap}"), "publish undone: {e:#}");
            return Err(e.context(format!(
                "cannot publish {dataset}@{snap}: its manifest was deleted again"
            )));
        }
        tracing::info!(snapshot = %format!("{dataset}@{snap}"), blocks = entries.len(), bytes = n, "snapshot published");
        Ok(Ok(rel))
    }

    /// The published snapshots in the bucket (every host's).
    pub fn list(&self) -> anyhow::Result<Vec<Published>> {
        use futures::TryStreamExt;
        let os = self.os.clone();
        let prefix = self.key(MANIFESTS);
        let metas = self
            .run(async move { os.list(Some(&prefix)).try_collect::<Vec<_>>().await })?
            .with_context(|| format!("cannot list the manifests in {}", self.cfg.url))?;
        let mut out = Vec::new();
        for m in metas {
            if !m.location.as_ref().ends_with(".manifest") {
                continue;
            }
            let os = self.os.clone();
            let loc = m.location.clone();
            let size = m.size;
            let head = self
                .run(async move { os.get_range(&loc, 0..size.min(64 << 10)).await })?
                .with_context(|| format!("cannot read {}", m.location))?;
            let h = match manifest::decode_header(&head) {
                Ok(h) => h,
                Err(_) => {
                    let os = self.os.clone();
                    let loc = m.location.clone();
                    let all = self.run(async move { os.get(&loc).await?.bytes().await })??;
                    manifest::decode(&all)
                        .with_context(|| format!("manifest {} is corrupt", m.location))?
                        .0
                }
            };
            out.push(published(&h, m.location.to_string()));
        }
        out.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
        Ok(out)
    }

    /// Makes `dataset@snap` (published by some host) a snapshot of this store: records where
    /// its blocks are in the bucket, then the snapshot itself. Nothing is downloaded but the
    /// manifest; blocks come on read.
    pub fn import(&self, datasets: &Datasets, dataset: &str, snap: &str) -> anyhow::Result<()> {
        let rel = Self::manifest_key(dataset, snap);
        let key = self.key(&rel);
        let os = self.os.clone();
        let bytes = self
            .run(async move { os.get(&key).await?.bytes().await })?
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => anyhow::Error::new(
                    crate::tree::NameError::SnapshotNotFound(format!("{dataset}@{snap}")),
                )
                .context("not here and not published in the bucket either"),
                e => anyhow::Error::new(e).context(format!("cannot fetch the manifest {rel}")),
            })?;
        let (h, entries) = manifest::decode(&bytes)
            .with_context(|| format!("the manifest {rel} in {} is corrupt", self.cfg.url))?;
        if h.dataset != dataset || h.snapshot != snap {
            bail!("the manifest {rel} names {}@{}", h.dataset, h.snapshot);
        }
        // The hold keeps the objects while this store needs them, also once the publisher
        // unpublished the snapshot.
        self.take_hold(
            &format!("{dataset}@{snap}"),
            &h.publisher,
            h.objects.iter().map(|(_, k)| k.clone()).collect(),
        )?;
        self.store.import_remote_blocks(
            &h.objects,
            entries.iter().map(|e| ImportedBlock {
                id: e.id,
                object: e.object,
                offset: e.offset,
                len: e.len,
            }),
        )?;
        datasets.import_snapshot(
            dataset,
            vdbfs_format::index::SnapshotRecord {
                dataset: 0,
                name: snap.to_string(),
                created: h.created,
                root: h.root,
                next_ino: h.next_ino,
            },
            (!h.props.is_empty()).then(|| h.props.clone()),
        )?;
        // Published already (by its publisher): the uploader must not publish it again.
        self.store
            .meta_put(&published_key(&format!("{dataset}@{snap}")), b"1")?;
        tracing::info!(snapshot = %format!("{dataset}@{snap}"), publisher = %h.publisher, blocks = entries.len(), "published snapshot imported");
        Ok(())
    }
}

fn published_key(name: &str) -> String {
    format!("remote_published/{name}")
}

fn published(h: &ManifestHeader, object: String) -> Published {
    #[derive(Deserialize)]
    struct P {
        lsn: Option<String>,
        timeline: Option<u32>,
    }
    let p: Option<P> = serde_json::from_slice(&h.props).ok();
    Published {
        name: format!("{}@{}", h.dataset, h.snapshot),
        publisher: h.publisher.clone(),
        lsn: p.as_ref().and_then(|p| p.lsn.clone()),
        timeline: p.as_ref().and_then(|p| p.timeline),
        created: crate::time::rfc3339(h.created.secs),
        published: crate::time::rfc3339(h.published.secs),
        blocks: h.blocks,
        object,
    }
}

/// One block to fetch: its index in the request, offset and length in its object.
type Want = (usize, u64, u32);
/// Adjacent records of one object, fetched with one ranged GET: key, record format, start,
/// end, the blocks.
type Run = (String, u8, u64, u64, Vec<Want>);

impl store::RemoteFetch for Remote {
    /// From the cache where it holds a block, from the bucket else (and then kept in the
    /// cache).
    fn fetch(&self, ids: &[BlockId]) -> store::Result<Vec<Option<Vec<u8>>>> {
        let mut out = self.cache.get(ids);
        let miss: Vec<usize> = (0..ids.len()).filter(|&i| out[i].is_none()).collect();
        if miss.is_empty() {
            return Ok(out);
        }
        let want: Vec<BlockId> = miss.iter().map(|&i| ids[i]).collect();
        let (got, recs) = self.fetch_from_bucket(&want)?;
        self.cache.put(&recs);
        for (i, g) in miss.into_iter().zip(got) {
            out[i] = g;
        }
        Ok(out)
    }
}

impl Remote {
    /// Fetches blocks from the bucket and verifies them: their contents (None for a block
    /// no manifest placed, or whose copy does not verify: logged) and the verified records to
    /// cache.
    #[allow(clippy::type_complexity)]
    fn fetch_from_bucket(
        &self,
        ids: &[BlockId],
    ) -> store::Result<(Vec<Option<Vec<u8>>>, Vec<(BlockId, Vec<u8>)>)> {
        let io = |e: String| store::Error::Io(std::io::Error::other(e));
        // (object key, format) -> [(index in ids, offset, len)]
        let mut by_obj: BTreeMap<(String, u8), Vec<Want>> = BTreeMap::new();
        let found = self
            .store
            .remote_blocks(ids)
            .map_err(|e| io(e.to_string()))?;
        for (i, b) in found.into_iter().enumerate() {
            if let Some(b) = b {
                by_obj
                    .entry((b.key, b.format))
                    .or_default()
                    .push((i, b.offset, b.len));
            }
        }
        let mut out: Vec<Option<Vec<u8>>> = vec![None; ids.len()];
        // One ranged GET per run of adjacent records, all runs at once.
        let mut runs: Vec<Run> = Vec::new();
        for ((key, format), mut v) in by_obj {
            v.sort_by_key(|x| x.1);
            let mut cur: Option<(u64, u64, Vec<Want>)> = None;
            for x in v {
                match &mut cur {
                    Some((_, end, items)) if *end == x.1 => {
                        *end = x.1 + x.2 as u64;
                        items.push(x);
                    }
                    _ => {
                        if let Some((s, e, items)) = cur.take() {
                            runs.push((key.clone(), format, s, e, items));
                        }
                        cur = Some((x.1, x.1 + x.2 as u64, vec![x]));
                    }
                }
            }
            if let Some((s, e, items)) = cur {
                runs.push((key.clone(), format, s, e, items));
            }
        }
        let os = self.os.clone();
        let keys: Vec<(ObjPath, u64, u64)> = runs
            .iter()
            .map(|(k, _, s, e, _)| (self.key(k), *s, *e))
            .collect();
        let got = self
            .run(async move {
                let futs = keys.iter().map(|(k, s, e)| os.get_range(k, *s..*e));
                futures::future::join_all(futs).await
            })
            .map_err(|e| io(e.to_string()))?;
        let mut fetched = 0u64;
        let mut bytes = 0u64;
        let mut bad = None;
        let mut recs = Vec::new();
        for ((key, format, start, _, items), r) in runs.into_iter().zip(got) {
            let format = if format == 1 {
                RecordFormat::V1
            } else {
                RecordFormat::V2
            };
            let object = self.key(&key).to_string();
            let buf = match r {
                Ok(b) => b,
                Err(e) => {
                    let (i, _, _) = items[0];
                    tracing::error!(object = %object, "cannot fetch block {} from the bucket: {e}", ids[i].to_hex());
                    return Err(store::Error::Remote {
                        id: ids[i],
                        object,
                        why: format!("fetch failed: {e}"),
                    });
                }
            };
            for (i, off, len) in items {
                let lo = (off - start) as usize;
                let rec = buf.get(lo..lo + len as usize).unwrap_or(&[]);
                match store::open_remote_record(&ids[i], &object, format, rec) {
                    Ok(content) => {
                        fetched += 1;
                        bytes += len as u64;
                        out[i] = Some(content);
                        if let Some(r) = cache::cache_record(&ids[i], format, rec) {
                            recs.push((ids[i], r));
                        }
                    }
                    // The others of the run are good and kept; this one stays missing, so its
                    // reader gets EIO.
                    Err(e) => {
                        tracing::error!(object = %object, offset = off, "a block fetched from the bucket does not verify: {e}");
                        bad = Some(e);
                    }
                }
            }
        }
        let mut st = self.state.lock();
        st.fetched_blocks += fetched;
        st.fetched_bytes += bytes;
        st.bad_blocks += u64::from(bad.is_some());
        Ok((out, recs))
    }
}
