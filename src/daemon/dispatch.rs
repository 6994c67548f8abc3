//! Dispatch: one control request to the function of its area (store and datasets, sources,
//! VDBs), and the one place where an error becomes a reply: its message (the whole context
//! chain), its [`ErrorKind`] and its hint.
//!
//! Invariants: errors are logged here, where they are handled, not where they pass through;
//! every request is logged once with its duration (info for those that change something,
//! debug for those that only read); every reply to a request that changes something carries
//! the object it made or changed as data (what `--json` prints).

use super::Daemon;
use crate::api::{
    self, DatasetDeleted, DatasetInfo, Df, ErrorKind, GcDone, MountInfo, Progress, Refusal,
    Request, Response, RootKind, RootUsage, SnapshotDeleted, SourceUnlinked, SpaceStatus, Status,
    VdbDeleted,
};
use crate::auth::{Caller, TokenRecord};
use crate::refuse;
use crate::tree::{NameError, StoreUsage};
use serde_json::Value;

/// What a request answers: a message for people and data for `--json`.
type Reply = (String, Value);

fn data<T: serde::Serialize>(v: T) -> anyhow::Result<Reply> {
    Ok((String::new(), serde_json::to_value(v)?))
}

/// A reply that is only a message (its JSON result is null).
fn said(message: String) -> anyhow::Result<Reply> {
    Ok((message, Value::Null))
}

fn with<T: serde::Serialize>(message: String, v: T) -> anyhow::Result<Reply> {
    Ok((message, serde_json::to_value(v)?))
}

/// ", made from it: a, b" style list, or nothing.
fn names(v: &[String]) -> String {
    v.join(", ")
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
        if c.downcast_ref::<crate::time::IntervalError>().is_some()
            || c.downcast_ref::<crate::time::MomentError>().is_some()
        {
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

/// A snapshot as `snapshot list` shows it, with a source snapshot's `marks`.
fn snapshot_info(s: &crate::tree::SnapshotInfo, marks: api::Marks) -> api::SnapshotInfo {
    let props = crate::source::snapshot_props(s);
    api::SnapshotInfo {
        marks,
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

/// Names starting with `.` are the control path's own datasets: no user command reaches them.
fn refuse_internal(name: &str) -> anyhow::Result<()> {
    if crate::tree::is_internal(name) {
        return Err(
            NameError::NotFound(name.split_once('@').map_or(name, |(d, _)| d).to_string()).into(),
        );
    }
    Ok(())
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
    pub(super) fn respond(&self, caller: &Caller, line: &str, progress: Progress) -> Response {
        let req: Request = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => {
                tracing::info!("malformed request: {e}");
                return Response::failed(ErrorKind::Invalid, format!("malformed request: {e}"));
            }
        };
        self.respond_to(caller, req, progress)
    }

    /// Answers one request from `caller` (the socket, or an API token): its role and the VDBs'
    /// owners decide whether it may (`auth::authorize`), then dispatch. Every request is
    /// logged with the caller's name (`by`) and counted in the metrics.
    pub(super) fn respond_to(
        &self,
        caller: &Caller,
        mut req: Request,
        progress: Progress,
    ) -> Response {
        let by = caller.name.as_str();
        let (op, target, reads_only) = (req.op(), req.target(), req.reads_only());
        let owners = self.vdbs.records().map(|rs| {
            rs.into_iter()
                .map(|r| (r.name, r.owner))
                .collect::<std::collections::HashMap<_, _>>()
        });
        let allowed = match &owners {
            Ok(owners) => crate::auth::authorize(caller, &mut req, |v| owners.get(v).cloned()),
            Err(e) => Err(Refusal::new(
                ErrorKind::Internal,
                format!("cannot read the VDB records: {e:#}"),
            )),
        };
        if let Err(r) = allowed {
            tracing::info!(op, name = %target, by = %by, kind = %r.kind, "request refused: {r}");
            self.metrics.count(op, r.kind.as_str(), 0.0);
            return Response::failed(r.kind, r.message);
        }
        if req.cancellable() {
            progress.cancel().arm();
        } else {
            progress.cancel().disarm(format!(
                "{} is not an operation that can be undone; it finishes in the daemon",
                op.replace('_', " ")
            ));
        }
        tracing::debug!(op, name = %target, by = %by, "request");
        let t = std::time::Instant::now();
        let r = self.handle(req, progress);
        // A deleted snapshot is unpublished, a hold no dataset needs any more released (and
        // one a clone now needs marked so), now rather than at the uploader's next round.
        if r.is_ok()
            && matches!(
                op,
                "snapshot_delete" | "dataset_delete" | "vdb_delete" | "clone" | "vdb_create"
            )
        {
            if let Some(remote) = &self.remote {
                if let Err(e) = remote.maintain(&self.datasets) {
                    tracing::warn!(
                        "remote: cannot unpublish or release holds yet (retried): {e:#}"
                    );
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let ms = (secs * 1e4).round() / 10.0;
        match r {
            Ok((message, data)) => {
                self.metrics.count(op, "ok", secs);
                if reads_only {
                    tracing::debug!(op, name = %target, by = %by, ms, "request done");
                } else {
                    tracing::info!(op, name = %target, by = %by, ms, "request done");
                }
                Response::ok(message, data)
            }
            Err(e) => {
                // A failure after the client asked to cancel is the cancellation, whatever
                // step it cut short.
                let kind = if progress.cancelled() {
                    ErrorKind::Cancelled
                } else {
                    kind_of(&e)
                };
                self.metrics.count(op, kind.as_str(), secs);
                tracing::info!(op, name = %target, by = %by, ms, %kind, "request failed: {e:#}");
                let mut r = Response::failed(kind, format!("{e:#}"));
                r.hint = api::hint_of(&e).or_else(|| {
                    (kind == ErrorKind::Internal).then(|| {
                        "the daemon's log (stderr of 'vdbfs serve', or journalctl -u vdbfs) has \
                         the details"
                            .to_string()
                    })
                });
                r
            }
        }
    }

    /// VDBs whose parent is in dataset `ds` (they refresh from it).
    fn vdbs_of_dataset(&self, ds: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .vdbs
            .records()?
            .into_iter()
            .filter(|r| r.parent_dataset() == ds)
            .map(|r| r.name)
            .collect())
    }

    fn handle(&self, req: Request, progress: Progress) -> anyhow::Result<Reply> {
        use Request as R;
        match req {
            r @ (R::SourceLink(_)
            | R::SourceList
            | R::SourceStatus { .. }
            | R::SourceSnapshot { .. }
            | R::SourceEnable { .. }
            | R::SourceSet { .. }
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
            | R::VdbProtect { .. }
            | R::VdbExtend { .. }
            | R::Timeflow { .. }) => self.vdb_request(r, progress),
            r @ (R::TokenCreate { .. } | R::TokenList | R::TokenRevoke { .. }) => {
                self.token_request(r)
            }
            R::Scrub { rate_mib } => {
                let rate = rate_mib.unwrap_or(super::scrub::DEFAULT_RATE_MIB);
                let r = self.scrub("command", rate, progress)?;
                let msg = scrub_summary(&r);
                Ok((msg, serde_json::to_value(&r)?))
            }
            R::SnapshotPublish { name } => {
                let r = self.remote()?;
                let (d, s) = crate::tree::parse_snapshot_ref(&name)?;
                let key = r.publish(&self.datasets, d, s)?;
                with(
                    format!("published {name} as {key}"),
                    serde_json::json!({ "name": name, "manifest": key }),
                )
            }
            R::RemoteGc { grace, dry_run } => {
                let r = self.remote()?;
                let grace = match grace {
                    Some(g) => crate::time::parse_interval(&g, "--grace")
                        .map_err(|e| api::Refusal::new(ErrorKind::Invalid, e.to_string()))?,
                    None => crate::remote::gc::DEFAULT_GRACE,
                };
                let rep = r.gc(&self.datasets, grace, dry_run, Some(&progress))?;
                let msg = if dry_run {
                    format!(
                        "remote gc (dry run): {} pack object(s) no manifest or hold names",
                        rep.candidates
                    )
                } else {
                    format!(
                        "remote gc: deleted {} pack object(s), {} byte(s); {} kept (named again)",
                        rep.deleted_objects, rep.deleted_bytes, rep.kept
                    )
                };
                with(msg, serde_json::to_value(&rep)?)
            }
            R::RemoteStatus => data(self.remote()?.status()),
            R::RemoteList => data(self.remote()?.list()?),
            r => self.store_request(r),
        }
    }

    fn remote(&self) -> anyhow::Result<&std::sync::Arc<crate::remote::Remote>> {
        match &self.remote {
            Some(r) => Ok(r),
            None => refuse!(
                Invalid,
                "this store has no remote; make one with 'vdbfs init --remote s3://BUCKET/PREFIX'"
            ),
        }
    }

    /// `vdb create --from DATASET@SNAP` of a snapshot that is not here but published in the
    /// store's bucket: imports it first (its blocks come on read).
    fn import_if_published(&self, from: &str, progress: Option<&Progress>) -> anyhow::Result<()> {
        let (Some(r), Some((d, s))) = (&self.remote, from.split_once('@')) else {
            return Ok(());
        };
        let here = self.datasets.record(d)?.is_some()
            && crate::catalog::has_snapshot(&self.datasets, d, s)?;
        if here {
            return Ok(());
        }
        if let Some(p) = progress {
            p.say(format!("{from} is not here: importing it from the bucket"));
        }
        r.import(&self.datasets, d, s)
    }

    /// `vdbfs source ...`
    fn source_request(&self, req: Request, progress: Progress) -> anyhow::Result<Reply> {
        let s = &self.sources;
        match req {
            Request::SourceLink(spec) => {
                let name = spec.name.clone();
                let (message, _) = s.link(*spec, progress)?;
                with(message, s.status(&name)?)
            }
            Request::SourceList => data(s.list()?),
            Request::SourceStatus { name } => data(s.status(&name)?),
            Request::SourceSnapshot { name, snapshot } => {
                let snap = s.snapshot(&name, snapshot.as_deref(), progress)?;
                Ok((snap.name.clone(), serde_json::to_value(&snap)?))
            }
            Request::SourceEnable { name } => {
                let message = s.set_enabled(&name, true)?;
                with(message, s.status(&name)?)
            }
            Request::SourceSet { name, verify } => {
                let message = s.set(&name, verify)?;
                with(message, s.status(&name)?)
            }
            Request::SourceDisable { name } => {
                let message = s.set_enabled(&name, false)?;
                with(message, s.status(&name)?)
            }
            Request::SourceUnlink {
                name,
                delete_snapshots,
                force,
            } => {
                let snapshots: Vec<String> = self
                    .datasets
                    .snapshots(Some(&name))
                    .unwrap_or_default()
                    .iter()
                    .map(|s| s.full_name())
                    .collect();
                let vdbs = self.vdbs_of_dataset(&name)?;
                let (mut message, slot_left) = s.unlink(&name, delete_snapshots, force)?;
                if !vdbs.is_empty() {
                    message.push_str(&if delete_snapshots {
                        format!(
                            "\nVDBs made from its snapshots keep their data but can no longer \
                             refresh: {}",
                            names(&vdbs)
                        )
                    } else {
                        format!(
                            "\nVDBs made from its snapshots refresh only onto the kept snapshots \
                             now: {}",
                            names(&vdbs)
                        )
                    });
                }
                with(
                    message,
                    SourceUnlinked {
                        name,
                        dataset_kept: !delete_snapshots,
                        snapshots,
                        slot_left: slot_left.as_deref().map(api::SlotLeft::new),
                        vdbs,
                    },
                )
            }
            _ => refuse!(Internal, "not a source request"),
        }
    }

    /// `vdbfs token ...`: API tokens for the HTTP API.
    fn token_request(&self, req: Request) -> anyhow::Result<Reply> {
        let now = crate::time::now_unix();
        let info = |t: &TokenRecord| api::TokenInfo {
            name: t.name.clone(),
            role: t.role,
            created: crate::time::rfc3339(t.created),
            expires: t.expires.map(crate::time::rfc3339),
            expired: t.expired(now),
        };
        match req {
            Request::TokenCreate {
                name,
                role,
                expires,
            } => {
                crate::tree::check_dataset_name(&name)?;
                if self.tokens.contains(&name)? {
                    refuse!(
                        Conflict,
                        "API token {name} exists already ('vdbfs token revoke {name}' first)"
                    );
                }
                let expires = expires
                    .map(|e| crate::time::parse_interval(&e, "--expires"))
                    .transpose()?
                    .map(|d| now + d.as_secs() as i64);
                let token = crate::auth::new_token()?;
                let rec = TokenRecord {
                    v: 1,
                    name: name.clone(),
                    role,
                    hash: crate::auth::hash(&token),
                    created: now,
                    expires,
                };
                self.tokens.put(&rec)?;
                let created = api::TokenCreated {
                    name,
                    role,
                    token: token.clone(),
                    expires: expires.map(crate::time::rfc3339),
                };
                with(token, created)
            }
            Request::TokenList => data(self.tokens.list()?.iter().map(info).collect::<Vec<_>>()),
            Request::TokenRevoke { name } => {
                let Some(t) = self.tokens.get(&name)? else {
                    refuse!(
                        NotFound,
                        "no API token {name} ('vdbfs token list' shows them)"
                    );
                };
                self.tokens.remove(&name)?;
                with(
                    format!("revoked API token {name}: requests with it get 401 from now on"),
                    info(&t),
                )
            }
            _ => refuse!(Internal, "not a token request"),
        }
    }

    /// `vdbfs vdb ...` and `vdbfs timeflow`. Every VDB error names the operation and the VDB.
    fn vdb_request(&self, req: Request, progress: Progress) -> anyhow::Result<Reply> {
        let v = &self.vdbs;
        let ctx = |what: &str, name: &str| format!("cannot {what} VDB {name}");
        match req {
            Request::VdbCreate(spec) => {
                self.import_if_published(&spec.from, Some(&progress))?;
                let st = v.create(*spec, progress)?;
                let who = match (&st.user, &st.password, st.keep_source_logins) {
                    (Some(u), Some(p), _) => format!("{u}'s password {p}, shown only this once"),
                    (Some(u), None, _) => format!("{u}'s password from --password-file"),
                    (None, _, true) => "the source's passwords".into(),
                    (None, _, false) => {
                        "no login: production's passwords are removed; --user NAME makes one".into()
                    }
                };
                Ok((
                    format!(
                        "{}\nVDB {} is running on port {} (from {})\n  over TCP: {} ({who})\n  data \
                         directory: {}",
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
                let message = v.start(&name).map_err(|e| e.context(ctx("start", &name)))?;
                with(message, v.brief_status(&name)?)
            }
            Request::VdbStop { name } => {
                let message = v.stop(&name).map_err(|e| e.context(ctx("stop", &name)))?;
                with(message, v.brief_status(&name)?)
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
            Request::VdbRewind { name, to, at } => {
                let message = v
                    .rewind(&name, to.as_deref(), at.as_deref(), progress)
                    .map_err(|e| e.context(ctx("rewind", &name)))?;
                with(message, v.brief_status(&name)?)
            }
            Request::VdbRefresh {
                name,
                to,
                at,
                at_lsn,
            } => {
                let before = v
                    .records()?
                    .into_iter()
                    .find(|r| r.name == name)
                    .map(|r| r.parent);
                let mut message = v
                    .refresh(
                        &name,
                        to.as_deref(),
                        at.as_deref(),
                        at_lsn.as_deref(),
                        progress,
                    )
                    .map_err(|e| e.context(ctx("refresh", &name)))?;
                let st = v.brief_status(&name)?;
                if let Some(before) = before.filter(|b| self.created_after(b, &st.parent)) {
                    message.push_str(&format!(
                        " (an older snapshot than its previous parent {before})"
                    ));
                }
                with(message, st)
            }
            Request::VdbDelete { name } => {
                let children = self.vdbs_of_dataset(&name)?;
                let mut message = v
                    .delete(&name)
                    .map_err(|e| e.context(ctx("delete", &name)))?;
                if !children.is_empty() {
                    message.push_str(", but can no longer refresh (their parent is gone)");
                }
                with(message, VdbDeleted { name, children })
            }
            Request::VdbProtect { name, off } => {
                let message = v
                    .protect(&name, !off)
                    .map_err(|e| e.context(ctx("protect", &name)))?;
                with(message, v.brief_status(&name)?)
            }
            Request::VdbExtend { name, by } => {
                let message = v
                    .extend(&name, &by)
                    .map_err(|e| e.context(ctx("extend", &name)))?;
                with(message, v.brief_status(&name)?)
            }
            Request::Timeflow { dataset } => data(self.timeflow(dataset.as_deref())?),
            _ => refuse!(Internal, "not a VDB request"),
        }
    }

    /// [`snapshot_info`] of each, with the marks of a source's snapshots.
    fn snapshot_infos(&self, snaps: &[crate::tree::SnapshotInfo]) -> Vec<api::SnapshotInfo> {
        use std::collections::{HashMap, HashSet};
        let verify: HashMap<String, bool> = self
            .sources
            .records()
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.name, r.verify))
            .collect();
        let mut prepared: HashMap<String, HashSet<String>> = HashMap::new();
        snaps
            .iter()
            .map(|s| {
                let marks = crate::source::snapshot_props(s).map(|p| {
                    let ready = prepared
                        .entry(s.dataset.clone())
                        .or_insert_with(|| self.sources.prepared_images(&s.dataset))
                        .contains(&s.rec.name);
                    crate::source::marks(&p, ready, verify.get(&s.dataset) == Some(&true))
                });
                snapshot_info(s, marks.unwrap_or_default())
            })
            .collect()
    }

    fn dataset_info(&self, name: &str) -> anyhow::Result<DatasetInfo> {
        let r = self
            .datasets
            .record(name)?
            .ok_or_else(|| NameError::NotFound(name.to_string()))?;
        Ok(DatasetInfo {
            mountpoint: self.mounts.mounted_at(&r.name),
            created: crate::time::rfc3339(r.created.secs),
            origin: self.datasets.origin(r.id)?,
            fault: self.datasets.damage_fault(&r.name),
            name: r.name,
            id: r.id,
        })
    }

    /// Whether snapshot `a` (`ds@snap`) was taken after snapshot `b` of the same dataset.
    fn created_after(&self, a: &str, b: &str) -> bool {
        let (Some((da, _)), Some((db, _))) = (a.split_once('@'), b.split_once('@')) else {
            return false;
        };
        if da != db {
            return false;
        }
        let snaps = self.datasets.snapshots(Some(da)).unwrap_or_default();
        let at = |n: &str| snaps.iter().position(|s| s.full_name() == n);
        matches!((at(a), at(b)), (Some(x), Some(y)) if x > y)
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
                with(format!("created dataset {name}"), self.dataset_info(&name)?)
            }
            Request::DatasetList => {
                let list = ds
                    .list()?
                    .into_iter()
                    .filter(|r| !crate::tree::is_internal(&r.name))
                    .map(|r| self.dataset_info(&r.name))
                    .collect::<anyhow::Result<Vec<DatasetInfo>>>()?;
                data(list)
            }
            Request::DatasetDelete {
                name,
                with_snapshots,
            } => {
                refuse_internal(&name)?;
                self.refuse_if_managed(&name, "delete")?;
                self.refuse_if_mounted(&name, "dataset", true)?;
                let snaps = ds.snapshots(Some(&name))?;
                if !snaps.is_empty() && !with_snapshots {
                    return Err(NameError::HasSnapshots(name, snaps.len()).into());
                }
                for s in &snaps {
                    self.refuse_if_mounted(&s.full_name(), "snapshot", false)?;
                }
                let vdbs_orphaned = self.vdbs_of_dataset(&name)?;
                crate::catalog::delete_dataset(ds, &name)?;
                let mut message = format!("deleted dataset {name}");
                if !snaps.is_empty() {
                    message.push_str(&format!(" and its {} snapshot(s)", snaps.len()));
                }
                if !vdbs_orphaned.is_empty() {
                    message.push_str(&format!(
                        "; VDBs made from its snapshots keep their data but can no longer \
                         refresh: {}",
                        names(&vdbs_orphaned)
                    ));
                }
                with(
                    message,
                    DatasetDeleted {
                        name,
                        snapshots: snaps.iter().map(|s| s.full_name()).collect(),
                        vdbs_orphaned,
                    },
                )
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
                refuse_internal(&dataset)?;
                let t = std::time::Instant::now();
                let s = ds.snapshot(&dataset, name.as_deref())?;
                Ok((
                    format!(
                        "created snapshot {} in {:.1} ms",
                        s.full_name(),
                        t.elapsed().as_secs_f64() * 1e3
                    ),
                    serde_json::to_value(snapshot_info(&s, api::Marks::default()))?,
                ))
            }
            Request::SnapshotList { dataset } => {
                if let Some(d) = &dataset {
                    refuse_internal(d)?;
                }
                let snaps: Vec<_> = ds
                    .snapshots(dataset.as_deref())?
                    .into_iter()
                    .filter(|s| !crate::tree::is_internal(&s.dataset))
                    .collect();
                data(self.snapshot_infos(&snaps))
            }
            Request::SnapshotDelete { name } => {
                refuse_internal(&name)?;
                let (d, s) = crate::tree::parse_snapshot_ref(&name)?;
                self.refuse_if_mounted(&name, "snapshot", true)?;
                let full = format!("{d}@{s}");
                let vdbs_from_it: Vec<String> = self
                    .vdbs
                    .records()?
                    .into_iter()
                    .filter(|r| r.parent == full)
                    .map(|r| r.name)
                    .collect();
                ds.delete_snapshot(d, s)?;
                let mut message = format!("deleted snapshot {name}; clones of it keep their data");
                if !vdbs_from_it.is_empty() {
                    message.push_str(&format!(
                        "; VDBs provisioned or refreshed from it keep running but can no longer \
                         refresh (or be created again) from it: {}",
                        names(&vdbs_from_it)
                    ));
                }
                with(message, SnapshotDeleted { name, vdbs_from_it })
            }
            Request::Clone { snapshot, name } => {
                refuse_internal(&snapshot)?;
                let (d, s) = crate::tree::parse_snapshot_ref(&snapshot)?;
                let t = std::time::Instant::now();
                self.import_if_published(&snapshot, None)?;
                ds.clone_snapshot(d, s, &name)?;
                let message = format!(
                    "created dataset {name} as a clone of {snapshot} in {:.1} ms",
                    t.elapsed().as_secs_f64() * 1e3
                );
                with(message, self.dataset_info(&name)?)
            }
            Request::Df => data(df(ds.usage()?)),
            Request::Gc => {
                let r = self.metrics.time("gc", "command", || ds.gc())?;
                with(
                    format!(
                        "freed {} blocks ({} bytes), rewrote {} pack(s), {} bytes returned to the filesystem",
                        r.blocks_freed, r.bytes_freed, r.packs_rewritten, r.bytes_reclaimed
                    ),
                    GcDone {
                        blocks_freed: r.blocks_freed,
                        bytes_freed: r.bytes_freed,
                        packs_rewritten: r.packs_rewritten,
                        bytes_reclaimed: r.bytes_reclaimed,
                    },
                )
            }
            Request::Mount {
                dataset,
                mountpoint,
                nonempty,
            } => {
                refuse_internal(&dataset)?;
                let message = self.mounts.mount_new(&dataset, &mountpoint, nonempty)?;
                let mountpoint = self.mounts.mounted_at(&dataset).unwrap_or(mountpoint);
                with(
                    message,
                    MountInfo {
                        dataset,
                        mountpoint,
                    },
                )
            }
            Request::Umount { mountpoint } => {
                let dataset = self.mounts.dataset_at(&mountpoint);
                if let Some(ds) = &dataset {
                    self.refuse_if_managed(ds, "unmount")?;
                }
                let message = self.mounts.umount(&mountpoint)?;
                with(
                    message,
                    MountInfo {
                        dataset: dataset.unwrap_or_default(),
                        mountpoint,
                    },
                )
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
            mounts: self
                .mounts
                .list()
                .into_iter()
                .filter(|m| !crate::tree::is_internal(&m.dataset))
                .collect(),
            faults,
            space,
            scrub,
            next_scrub: self.next_scrub(),
            remote: self.remote.as_ref().map(|r| r.status()),
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
