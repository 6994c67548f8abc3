//! Dispatch: one control request to the function of its area (store and datasets, sources,
//! VDBs), and the one place where an error becomes a reply: its message (the whole context
//! chain) and its [`ErrorKind`].
//!
//! Invariant: errors are logged here, where they are handled, not where they pass through.

use super::Daemon;
use crate::api::{
    self, DatasetInfo, Df, ErrorKind, Progress, Refusal, Request, Response, RootKind, RootUsage,
    SpaceStatus, Status,
};
use crate::refuse;
use crate::tree::{NameError, StoreUsage};
use serde_json::Value;

/// What a request answers: a message for people and data for `--json`.
type Reply = (String, Value);

fn data<T: serde::Serialize>(v: T) -> anyhow::Result<Reply> {
    Ok((String::new(), serde_json::to_value(v)?))
}

fn said(message: String) -> anyhow::Result<Reply> {
    Ok((message, Value::Null))
}

/// The kind of a failure: the first error in its chain that knows one.
pub fn kind_of(e: &anyhow::Error) -> ErrorKind {
    for c in e.chain() {
        if let Some(r) = c.downcast_ref::<Refusal>() {
            return r.kind;
        }
        if let Some(n) = c.downcast_ref::<NameError>() {
            return match n {
                NameError::Invalid(_) | NameError::InvalidSnapshot(_) => ErrorKind::Invalid,
                NameError::NotSnapshotRef(_) => ErrorKind::Invalid,
                NameError::Exists(_) | NameError::SnapshotExists(_) => ErrorKind::Conflict,
                NameError::HasSnapshots(..) => ErrorKind::Conflict,
                NameError::NotFound(_) | NameError::SnapshotNotFound(_) => ErrorKind::NotFound,
            };
        }
        if c.downcast_ref::<crate::tree::damage::Refused>().is_some() {
            return ErrorKind::Conflict;
        }
        if let Some(s) = c.downcast_ref::<crate::store::Error>() {
            return store_kind(s);
        }
        if let Some(s) = c.downcast_ref::<crate::source::preflight::SourceError>() {
            return s.kind();
        }
        if c.downcast_ref::<crate::time::IntervalError>().is_some() {
            return ErrorKind::Invalid;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc::ENOSPC) {
                return ErrorKind::Unavailable;
            }
        }
    }
    ErrorKind::Internal
}

fn store_kind(e: &crate::store::Error) -> ErrorKind {
    use crate::store::Error as E;
    match e {
        E::NoSpace | E::Poisoned => ErrorKind::Unavailable,
        E::NotFound => ErrorKind::NotFound,
        E::Exists | E::ReadOnly => ErrorKind::Conflict,
        E::Invalid(_) | E::NameTooLong | E::NotDir | E::IsDir | E::NotEmpty => ErrorKind::Invalid,
        _ => ErrorKind::Internal,
    }
}

fn snapshot_info(s: &crate::tree::SnapshotInfo) -> api::SnapshotInfo {
    let props = crate::source::snapshot_props(s);
    api::SnapshotInfo {
        lsn: props.as_ref().map(|p| p.lsn.clone()),
        timeline: props.as_ref().map(|p| p.timeline),
        replay_time: props.as_ref().and_then(|p| p.replay_time.clone()),
        mode: props.as_ref().map(|p| p.mode),
        kind: crate::vdb::snapshot_props(s).map(|p| p.kind),
        name: s.full_name(),
        dataset: s.dataset.clone(),
        snapshot: s.rec.name.clone(),
        created: crate::time::rfc3339(s.rec.created.secs),
        created_unix_ms: s.rec.created.secs * 1000 + (s.rec.created.nsecs / 1_000_000) as i64,
    }
}

fn df(u: StoreUsage) -> Df {
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    Df {
        datasets: u
            .roots
            .into_iter()
            .map(|r| RootUsage {
                name: r.name,
                kind: if r.is_snapshot {
                    RootKind::Snapshot
                } else {
                    RootKind::Dataset
                },
                logical_bytes: r.logical_bytes,
                unique_bytes: r.unique_bytes,
                shared_bytes: r.shared_bytes,
            })
            .collect(),
        physical_bytes: u.physical_bytes,
        live_stored_bytes: u.live_stored_bytes,
        compression_ratio: ratio(u.live_raw_bytes, u.live_stored_bytes),
        dedup_ratio: ratio(u.referenced_raw_bytes, u.live_raw_bytes),
    }
}

impl Daemon {
    pub(super) fn respond(&self, line: &str, progress: Progress) -> Response {
        let req: Request = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => {
                return Response::failed(ErrorKind::Invalid, format!("malformed request: {e}"))
            }
        };
        match self.handle(req, progress) {
            Ok((message, data)) => Response::ok(message, data),
            Err(e) => {
                let kind = kind_of(&e);
                tracing::info!(%kind, "request failed: {e:#}");
                Response::failed(kind, format!("{e:#}"))
            }
        }
    }

    fn handle(&self, req: Request, progress: Progress) -> anyhow::Result<Reply> {
        use Request as R;
        match req {
            r @ (R::SourceLink(_)
            | R::SourceList
            | R::SourceStatus { .. }
            | R::SourceSnapshot { .. }
            | R::SourceEnable { .. }
            | R::SourceDisable { .. }
            | R::SourceUnlink { .. }) => self.source_request(r, progress),
            r @ (R::VdbCreate(_)
            | R::VdbList
            | R::VdbStatus { .. }
            | R::VdbStart { .. }
            | R::VdbStop { .. }
            | R::VdbSnapshot { .. }
            | R::VdbRewind { .. }
            | R::VdbRefresh { .. }
            | R::VdbDelete { .. }
            | R::Timeflow { .. }) => self.vdb_request(r, progress),
            R::Scrub { rate_mib } => {
                let rate = rate_mib.unwrap_or(super::scrub::DEFAULT_RATE_MIB);
                let r = self.scrub("command", rate, progress)?;
                let msg = scrub_summary(&r);
                Ok((msg, serde_json::to_value(&r)?))
            }
            r => self.store_request(r),
        }
    }

    /// `vdbfs source ...`
    fn source_request(&self, req: Request, progress: Progress) -> anyhow::Result<Reply> {
        let s = &self.sources;
        match req {
            Request::SourceLink(spec) => {
                let (message, snap) = s.link(*spec, progress)?;
                Ok((message, serde_json::to_value(&snap)?))
            }
            Request::SourceList => data(s.list()?),
            Request::SourceStatus { name } => data(s.status(&name)?),
            Request::SourceSnapshot { name } => {
                let snap = s.snapshot(&name, progress)?;
                Ok((snap.name.clone(), serde_json::to_value(&snap)?))
            }
            Request::SourceEnable { name } => said(s.set_enabled(&name, true)?),
            Request::SourceDisable { name } => said(s.set_enabled(&name, false)?),
            Request::SourceUnlink {
                name,
                delete_snapshots,
                force,
            } => said(s.unlink(&name, delete_snapshots, force)?),
            _ => refuse!(Internal, "not a source request"),
        }
    }

    /// `vdbfs vdb ...` and `vdbfs timeflow`. Every VDB error names the operation and the VDB.
    fn vdb_request(&self, req: Request, progress: Progress) -> anyhow::Result<Reply> {
        let v = &self.vdbs;
        let ctx = |what: &str, name: &str| format!("cannot {what} VDB {name}");
        match req {
            Request::VdbCreate(spec) => {
                let st = v.create(*spec, progress)?;
                Ok((
                    format!(
                        "{}\nVDB {} is running on port {} (from {})\n  over TCP: {} (the source's \
                         passwords)\n  data directory: {}",
                        st.conn,
                        st.name,
                        st.port,
                        st.parent,
                        st.tcp_conn,
                        st.data_dir.display()
                    ),
                    serde_json::to_value(&st)?,
                ))
            }
            Request::VdbList => data(v.list()?),
            Request::VdbStatus { name } => data(v.status(&name)?),
            Request::VdbStart { name } => {
                said(v.start(&name).map_err(|e| e.context(ctx("start", &name)))?)
            }
            Request::VdbStop { name } => {
                said(v.stop(&name).map_err(|e| e.context(ctx("stop", &name)))?)
            }
            Request::VdbSnapshot {
                name,
                snapshot,
                bookmark,
            } => {
                let what = if bookmark { "bookmark" } else { "snapshot" };
                let s = v
                    .snapshot(&name, snapshot.as_deref(), bookmark)
                    .map_err(|e| e.context(ctx(what, &name)))?;
                Ok((s.name.clone(), serde_json::to_value(&s)?))
            }
            Request::VdbRewind { name, to } => said(
                v.rewind(&name, &to)
                    .map_err(|e| e.context(ctx("rewind", &name)))?,
            ),
            Request::VdbRefresh { name, to } => said(
                v.refresh(&name, to.as_deref(), progress)
                    .map_err(|e| e.context(ctx("refresh", &name)))?,
            ),
            Request::VdbDelete { name } => said(
                v.delete(&name)
                    .map_err(|e| e.context(ctx("delete", &name)))?,
            ),
            Request::Timeflow { dataset } => data(self.timeflow(dataset.as_deref())?),
            _ => refuse!(Internal, "not a VDB request"),
        }
    }

    /// The staging dataset of a linked source is managed through `vdbfs source`, a VDB's
    /// dataset through `vdbfs vdb`.
    fn refuse_if_managed(&self, dataset: &str, what: &str) -> anyhow::Result<()> {
        if self.vdbs.is_vdb(dataset) {
            refuse!(
                Conflict,
                "dataset {dataset} belongs to VDB {dataset}; cannot {what} it directly ('vdbfs vdb \
                 stop {dataset}' stops it, 'vdbfs vdb delete {dataset}' removes it)"
            );
        }
        if self.sources.is_source(dataset)? {
            refuse!(
                Conflict,
                "dataset {dataset} is the staging dataset of source {dataset}; cannot {what} it \
                 while linked ('vdbfs source disable {dataset}' stops syncing, 'vdbfs source \
                 unlink {dataset}' detaches it)"
            );
        }
        Ok(())
    }

    fn refuse_if_mounted(&self, name: &str, what: &str, how: bool) -> anyhow::Result<()> {
        if let Some(mp) = self.mounts.mounted_at(name) {
            let hint = if how {
                format!(" ('vdbfs umount {}')", mp.display())
            } else {
                String::new()
            };
            refuse!(
                Conflict,
                "{what} {name} is mounted at {}; unmount it first{hint}",
                mp.display()
            );
        }
        Ok(())
    }

    /// Store, datasets, snapshots, clones, mounts, space.
    fn store_request(&self, req: Request) -> anyhow::Result<Reply> {
        let ds = &self.datasets;
        match req {
            Request::Status => data(self.status()?),
            Request::DatasetCreate { name } => {
                ds.create(&name)?;
                said(format!("created dataset {name}"))
            }
            Request::DatasetList => {
                let list: Vec<DatasetInfo> = ds
                    .list()?
                    .into_iter()
                    .map(|r| DatasetInfo {
                        mountpoint: self.mounts.mounted_at(&r.name),
                        created: crate::time::rfc3339(r.created.secs),
                        fault: ds.damage_fault(&r.name),
                        name: r.name,
                        id: r.id,
                    })
                    .collect();
                data(list)
            }
            Request::DatasetDelete {
                name,
                with_snapshots,
            } => {
                self.refuse_if_managed(&name, "delete")?;
                self.refuse_if_mounted(&name, "dataset", true)?;
                let snaps = ds.snapshots(Some(&name))?;
                if !snaps.is_empty() && !with_snapshots {
                    return Err(NameError::HasSnapshots(name, snaps.len()).into());
                }
                for s in &snaps {
                    self.refuse_if_mounted(&s.full_name(), "snapshot", false)?;
                }
                crate::catalog::delete_dataset(ds, &name)?;
                said(format!("deleted dataset {name}"))
            }
            Request::DatasetAcceptDamage { name } => {
                let marks = ds.accept_damage(&name)?;
                if marks.is_empty() {
                    return said(format!("dataset {name} is not damaged; nothing to accept"));
                }
                let what: Vec<String> = marks.iter().map(crate::tree::damage::describe).collect();
                said(format!(
                    "accepted the loss for dataset {name} ({}): it can be mounted and snapshotted \
                     again, as of its last intact fsync before the damage; postgres on it \
                     recovers from what is there (check it, e.g. with pg_amcheck)",
                    what.join("; ")
                ))
            }
            Request::SnapshotCreate { dataset, name } => {
                let t = std::time::Instant::now();
                let s = ds.snapshot(&dataset, name.as_deref())?;
                Ok((
                    format!(
                        "created snapshot {} in {:.1} ms",
                        s.full_name(),
                        t.elapsed().as_secs_f64() * 1e3
                    ),
                    serde_json::to_value(snapshot_info(&s))?,
                ))
            }
            Request::SnapshotList { dataset } => {
                let list: Vec<api::SnapshotInfo> = ds
                    .snapshots(dataset.as_deref())?
                    .iter()
                    .map(snapshot_info)
                    .collect();
                data(list)
            }
            Request::SnapshotDelete { name } => {
                let (d, s) = crate::tree::parse_snapshot_ref(&name)?;
                self.refuse_if_mounted(&name, "snapshot", true)?;
                ds.delete_snapshot(d, s)?;
                said(format!(
                    "deleted snapshot {name}; clones of it keep their data"
                ))
            }
            Request::Clone { snapshot, name } => {
                let (d, s) = crate::tree::parse_snapshot_ref(&snapshot)?;
                let t = std::time::Instant::now();
                ds.clone_snapshot(d, s, &name)?;
                said(format!(
                    "created dataset {name} as a clone of {snapshot} in {:.1} ms",
                    t.elapsed().as_secs_f64() * 1e3
                ))
            }
            Request::Df => data(df(ds.usage()?)),
            Request::Gc => {
                let r = ds.gc()?;
                said(format!(
                    "freed {} blocks ({} bytes), rewrote {} pack(s), {} bytes returned to the filesystem",
                    r.blocks_freed, r.bytes_freed, r.packs_rewritten, r.bytes_reclaimed
                ))
            }
            Request::Mount {
                dataset,
                mountpoint,
                nonempty,
            } => said(self.mounts.mount_new(&dataset, &mountpoint, nonempty)?),
            Request::Umount { mountpoint } => {
                if let Some(ds) = self.mounts.dataset_at(&mountpoint) {
                    self.refuse_if_managed(&ds, "unmount")?;
                }
                said(self.mounts.umount(&mountpoint)?)
            }
            _ => refuse!(Internal, "not a store request"),
        }
    }
}

/// One line about a scrub, for people.
fn scrub_summary(r: &api::ScrubReport) -> String {
    let mut s = format!(
        "scrub {}: {} blocks ({:.1} MiB) read back in {:.1} s",
        if r.bad_blocks.is_empty() {
            "found every live block intact"
        } else {
            "found bad blocks"
        },
        r.blocks_checked,
        r.bytes_checked as f64 / (1 << 20) as f64,
        r.seconds
    );
    for b in &r.bad_blocks {
        s.push_str(&format!(
            "\nBAD block {} ({}): {}",
            b.block,
            match (b.pack, b.offset) {
                (Some(p), Some(o)) => format!("pack {p:08} offset {o}"),
                _ => "not in the store".to_string(),
            },
            b.error
        ));
        if b.references.is_empty() {
            s.push_str("\n  referenced by nothing any more");
        }
        for r in &b.references {
            s.push_str("\n  ");
            s.push_str(&crate::tree::scrub::describe(
                &r.roots,
                &r.what,
                r.path.as_deref(),
                r.inode,
                r.file_offset,
            ));
        }
    }
    s
}

impl Daemon {
    /// `vdbfs status`: the daemon, its mounts, space, the last scrub and every fault.
    fn status(&self) -> anyhow::Result<Status> {
        let store = self.datasets.store();
        let mut faults = Vec::new();
        if let Some(f) = store.full_fault() {
            faults.push(f);
        }
        for (_, text) in self.datasets.damaged()? {
            faults.push(text);
        }
        let scrub = self.scrubs.report.lock().clone();
        if let Some(r) = scrub.as_ref().filter(|r| !r.bad_blocks.is_empty()) {
            faults.push(format!(
                "the last scrub ({}) found {} bad block(s); 'vdbfs status --json' lists them with \
                 the datasets, snapshots and files that reference them",
                r.finished.as_deref().unwrap_or(&r.started),
                r.bad_blocks.len()
            ));
        }
        let space = store.space_report().ok().map(|r| SpaceStatus {
            free_bytes: r.free,
            total_bytes: r.total,
            reserve_bytes: r.reserve_held,
            reserve_target_bytes: r.reserve_target,
            margin_bytes: r.margin,
            full: r.full,
        });
        Ok(Status {
            pid: std::process::id(),
            store: self.store_dir.clone(),
            mounts: self.mounts.list(),
            faults,
            space,
            scrub,
            next_scrub: self.next_scrub(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::refusal;

    #[test]
    fn the_first_error_in_the_chain_that_knows_its_kind_decides() {
        let e = anyhow::Error::from(NameError::NotFound("x".into())).context("cannot start VDB x");
        assert_eq!(kind_of(&e), ErrorKind::NotFound);
        let e = refusal(ErrorKind::Busy, "in use").context("cannot stop VDB x");
        assert_eq!(kind_of(&e), ErrorKind::Busy);
        assert_eq!(
            format!("{e:#}"),
            "cannot stop VDB x: in use",
            "a kind never changes the message"
        );
        let e = anyhow::Error::from(crate::store::Error::NoSpace);
        assert_eq!(kind_of(&e), ErrorKind::Unavailable);
        let e = anyhow::Error::from(crate::time::parse_interval("1x", "--keep-for").unwrap_err());
        assert_eq!(kind_of(&e), ErrorKind::Invalid);
        assert_eq!(
            kind_of(&anyhow::anyhow!("something else")),
            ErrorKind::Internal
        );
        assert_eq!(ErrorKind::NotFound.http_status(), 404);
        assert_eq!(ErrorKind::Internal.exit_code(), 1);
    }
}
