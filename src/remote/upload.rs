//! Uploading one closed pack file as one object: a single PUT up to [`MULTIPART_ABOVE`] bytes,
//! a multipart upload above it (parts of [`PART_SIZE`], [`PARTS_IN_FLIGHT`] at a time, read from
//! the file as they go, so memory stays at a few parts whatever the pack's size).
//!
//! Invariants a reader must not break:
//! - The object appears whole or not at all: a PUT is atomic, and S3 makes a multipart upload's
//!   object visible only when the upload is completed, after its last part. A failed multipart
//!   upload is aborted (best effort); parts a crash leaves behind are never an object (a bucket
//!   lifecycle rule for incomplete multipart uploads clears them).
//! - The bytes uploaded are the file's bytes when the upload started: a closed pack never changes,
//!   and the length is checked again at the end (a pack that changed is an error, not an upload).
//! - `VDBFS_TEST_UPLOAD_PAUSE_MS` is for tests only: when set to N > 0, a multipart upload stops
//!   for N ms after its first part is in the bucket (logging "test hook: upload paused"), so a
//!   test can stop the object store or kill the daemon while an upload is certainly in flight.
//!   Unset (or 0) it does nothing.

use anyhow::{bail, Context};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Packs larger than one part are uploaded in parts: on Garage on loopback, 8 MiB parts 4 at a
/// time beat one PUT from 16 MiB up (see the README's multi-host section for the figures).
pub const MULTIPART_ABOVE: u64 = PART_SIZE as u64;
/// The size of one part (S3: 5 MiB to 5 GiB, at most 10 000 parts; our packs stay below 4 GiB,
/// `MAX_PACK_LEN`, so 8 MiB parts cover any pack in at most 512 parts).
pub const PART_SIZE: usize = 8 << 20;
/// Parts uploaded at once.
pub const PARTS_IN_FLIGHT: usize = 4;

/// The test-only pause (see the module doc).
pub const TEST_PAUSE_ENV: &str = "VDBFS_TEST_UPLOAD_PAUSE_MS";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// One PUT of the whole file (read into memory).
    Put,
    /// A multipart upload: parts of `part` bytes, `in_flight` at a time.
    Multipart { part: usize, in_flight: usize },
}

impl Method {
    /// The method the uploader uses for a file of `len` bytes.
    pub fn for_len(len: u64) -> Method {
        if len > MULTIPART_ABOVE {
            Method::Multipart {
                part: PART_SIZE,
                in_flight: PARTS_IN_FLIGHT,
            }
        } else {
            Method::Put
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Method::Put => write!(f, "put"),
            Method::Multipart { part, in_flight } => {
                write!(f, "multipart({} MiB x {in_flight})", part >> 20)
            }
        }
    }
}

/// The test-only pause, from the environment (None when unset, 0 or not a number).
pub fn test_pause_from_env() -> Option<Duration> {
    std::env::var(TEST_PAUSE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// Uploads the file at `path` as object `key` with `method`. Returns the bytes uploaded, or
/// None if the file does not exist (a pack collected meanwhile). `what` names the upload in
/// log lines.
pub async fn upload_file(
    os: Arc<dyn ObjectStore>,
    key: ObjPath,
    path: PathBuf,
    method: Method,
    test_pause: Option<Duration>,
    what: String,
) -> anyhow::Result<Option<u64>> {
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let len = file
        .metadata()
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    match method {
        Method::Put => {
            let bytes = tokio::task::spawn_blocking(move || read_at(file, 0, len as usize))
                .await?
                .with_context(|| format!("cannot read {}", path.display()))?;
            if bytes.len() as u64 != len {
                bail!("{} changed while it was uploaded", path.display());
            }
            os.put(&key, PutPayload::from(bytes)).await?;
        }
        Method::Multipart { part, in_flight } => {
            let upload = os.put_multipart(&key).await?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, part);
            match send_parts(&mut w, file, &path, len, part, in_flight, test_pause, &what).await {
                Ok(()) => {
                    w.finish().await?;
                }
                Err(e) => {
                    // Best effort: the parts sent so far are no object either way.
                    if let Err(a) = w.abort().await {
                        tracing::warn!("{what}: cannot abort the multipart upload: {a}");
                    }
                    return Err(e);
                }
            }
        }
    }
    Ok(Some(len))
}

#[allow(clippy::too_many_arguments)]
async fn send_parts(
    w: &mut WriteMultipart,
    file: std::fs::File,
    path: &Path,
    len: u64,
    part: usize,
    in_flight: usize,
    test_pause: Option<Duration>,
    what: &str,
) -> anyhow::Result<()> {
    let file = Arc::new(parking_lot::Mutex::new(file));
    let mut off = 0u64;
    let mut no = 0u32;
    while off < len {
        w.wait_for_capacity(in_flight).await?;
        let n = (len - off).min(part as u64) as usize;
        let f = file.clone();
        let buf = tokio::task::spawn_blocking(move || {
            let f = f.lock();
            read_at(&*f, off, n)
        })
        .await?
        .with_context(|| format!("cannot read {}", path.display()))?;
        if buf.len() != n {
            bail!("{} changed while it was uploaded", path.display());
        }
        w.put(buf.into());
        off += n as u64;
        no += 1;
        if let Some(p) = test_pause.filter(|_| no == 1 && off < len) {
            // The first part in the bucket, the rest not sent yet.
            w.wait_for_capacity(1).await?;
            tracing::warn!(
                ms = p.as_millis() as u64,
                "test hook: upload paused after its first part ({what})"
            );
            tokio::time::sleep(p).await;
        }
    }
    Ok(())
}

/// Reads `n` bytes at `off` (fewer only at the end of the file).
fn read_at(mut f: impl Read + Seek, off: u64, n: usize) -> std::io::Result<Vec<u8>> {
    f.seek(SeekFrom::Start(off))?;
    let mut buf = Vec::with_capacity(n);
    f.take(n as u64).read_to_end(&mut buf)?;
    Ok(buf)
}
