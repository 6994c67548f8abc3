//! `vdb create`: checks, then clone, mount, configure, start (with the hooks), all undone on
//! any failure.
//!
//! The sequence, top to bottom: name and input checks, where the tree comes from (a snapshot's
//! prepared image, the snapshot, or a moment of a source: `provision`) and the port (under
//! `create_lock`, ending with the record, `pending = create`) -> `prepare_dir` -> clone ->
//! the history's base kept -> WAL staged (a moment) -> mount -> `configure` -> `check_config`
//! (`postgres -C`) -> pre-start hook -> start (a provisioning start recovers, with progress,
//! and is promoted) -> configure-clone hook -> post-start hook -> record without `pending`.

use super::configure;
use super::hooks::{self, Hook};
use super::provision::Provision;
use super::service::VdbService;
use super::{Pending, VdbOp, VdbRecord};
use crate::api::{refusal, ErrorKind, Progress, VdbSpec, VdbStatus};
use crate::pg::provision::Moment;
use crate::pg::{self, StartError};
use crate::refuse;
use crate::tree::dataset::ROOT_INO;
use std::path::PathBuf;
use std::time::Instant;

/// How often a create takes the next pool port when another program bound the one it picked
/// before postgres could.
const PORT_RETRIES: u32 = 3;

impl VdbService {
    pub fn create(&self, spec: VdbSpec, progress: Progress) -> anyhow::Result<VdbStatus> {
        let name = spec.name.clone();
        self.create_inner(spec, progress)
            .map_err(|e| e.context(format!("cannot create VDB {name}")))
    }

    /// The ports the VDBs and staging standbys of this store hold.
    fn taken_ports(&self) -> anyhow::Result<Vec<u16>> {
        let mut taken: Vec<u16> = self.records()?.iter().map(|r| r.port).collect();
        taken.extend(self.sources.staging_ports()?);
        Ok(taken)
    }

    fn create_inner(&self, spec: VdbSpec, progress: Progress) -> anyhow::Result<VdbStatus> {
        let name = spec.name.clone();
        crate::tree::check_dataset_name(&name)?;
        // Name checks, port choice and the record happen under one lock: two creates never
        // take the same name or port.
        let create_guard = self.create_lock.lock();
        if self.is_vdb(&name) {
            refuse!(
                Conflict,
                "VDB {name} already exists; pick another name or 'vdbfs vdb delete {name}' first"
            );
        }
        if self.sources.is_source(&name)? {
            refuse!(
                Conflict,
                "{name} is the name of a linked source; pick another name for the VDB"
            );
        }
        if self.datasets.record(&name)?.is_some() {
            refuse!(
                Conflict,
                "a dataset named {name} already exists; pick another name for the VDB"
            );
        }
        if crate::tree::is_internal(&spec.from) {
            return Err(crate::tree::NameError::NotFound(spec.from.clone()).into());
        }
        let prov = self.resolve_from(
            &spec.from,
            spec.at.as_deref(),
            spec.at_lsn.as_deref(),
            spec.verified,
        )?;
        let settings = spec
            .settings
            .iter()
            .map(|s| super::parse_setting(s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(h) = &spec.hooks {
            if !h.is_absolute() {
                refuse!(Invalid, "--hooks {}: give an absolute path", h.display());
            }
            hooks::check_dir(h)?;
        }
        let data_dir = self.mount_point(&spec)?;
        let install = self.snapshot_install(&prov.tree.0, &prov.tree.1)?;
        let parent = prov.parent.clone();

        if let Some(u) = &spec.user {
            crate::tree::check_dataset_name(u)
                .map_err(|_| refusal(ErrorKind::Invalid, format!("--user {u:?}: use 1-64 characters from A-Z a-z 0-9 . _ - (not starting with . or -)")))?;
        }
        let generated = match (&spec.user, &spec.password) {
            (Some(_), None) => Some(super::logins::new_password()?),
            _ => None,
        };
        let verifier = spec
            .password
            .as_deref()
            .or(generated.as_deref())
            .filter(|_| spec.user.is_some())
            .map(super::logins::verifier)
            .transpose()?;
        let ttl = spec
            .ttl
            .as_deref()
            .map(|t| crate::time::parse_interval(t, "--ttl"))
            .transpose()?;
        let idle_ttl = spec
            .idle_ttl
            .as_deref()
            .map(|t| crate::time::parse_interval(t, "--idle-ttl"))
            .transpose()?
            .or(self.default_idle_ttl);
        let port = super::pick_port(spec.port, self.ports, &self.taken_ports()?)?;
        let mut rec = VdbRecord {
            v: 1,
            name: name.clone(),
            parent: parent.clone(),
            port,
            data_dir,
            settings,
            hooks: spec.hooks.clone(),
            install,
            running: false,
            pending: Some(Pending {
                op: VdbOp::Create,
                rollback: None,
                parent: parent.clone(),
                was_running: false,
                history: None,
            }),
            created: crate::time::rfc3339_now(),
            events: Vec::new(),
            history: None,
            owner: spec.owner.clone(),
            logins: Some(super::logins::Logins {
                user: spec.user.clone(),
                verifier,
                keep_source_logins: spec.keep_source_logins,
            }),
            lifetime: super::lifetime::Lifetime {
                expires: ttl.map(|d| crate::time::now_unix() + d.as_secs() as i64),
                idle_ttl_secs: idle_ttl.map(|d| d.as_secs()),
                protected: false,
            },
        };
        let dir = rec.dir(&self.store_dir);
        if dir.0.exists() {
            std::fs::remove_dir_all(&dir.0)?;
        }
        self.records.put(&rec)?;
        drop(create_guard);
        let st = self.slots.state(&name);
        let _g = st.op.lock();
        let t = Instant::now();
        let r = (|| {
            progress.check()?;
            configure::prepare_dir(&dir)?;
            dir.log_line(&format!(
                "creating VDB {name} from {} on port {port}",
                prov.describe
            ));
            progress.say(format!("cloning {} into VDB {name}", prov.describe));
            self.datasets
                .clone_snapshot(&prov.tree.0, &prov.tree.1, &name)?;
            let history = self.start_history(&name, &prov)?;
            {
                let _g = self.archive_lock.lock();
                rec.history = Some(history.clone());
                self.records.put(&rec)?;
            }
            self.stage(&name, &history.base, &prov, progress)?;
            self.mount(&rec)?;
            configure::configure(&rec, &self.store_dir, &prov.start, true)?;
            configure::check_config(&rec)?;
            progress.say(format!("starting postgres on port {port}"));
            let mut tries = 0;
            loop {
                let rec_now = rec.clone();
                let started = self.start_with_hooks(&rec_now, &st, progress, &|| {
                    hooks::run(&rec_now, &self.store_dir, Hook::ConfigureClone)
                });
                match started {
                    // A pool port another program bound between our check and postgres's
                    // bind: take the next free one (a port the user gave is an error).
                    Err(e) if spec.port.is_none() && tries < PORT_RETRIES && port_in_use(&e) => {
                        tries += 1;
                        let _g = self.create_lock.lock();
                        let port = super::pick_port(None, self.ports, &self.taken_ports()?)?;
                        dir.log_line(&format!(
                            "port {} was taken meanwhile; trying {port}",
                            rec.port
                        ));
                        rec.port = port;
                        self.records.put(&rec)?;
                        pg::conf::edit_auto_conf(
                            &rec.data_dir,
                            &[("port", Some(port.to_string()))],
                        )?;
                        pg::remove_run_files(&rec.data_dir);
                    }
                    r => break r,
                }
            }?;
            progress.check()?;
            anyhow::Ok(())
        })();
        match r {
            Ok(()) => {
                self.begin_epoch(&mut rec);
                progress.past_return(format!("VDB {name} is created"));
                rec.settle(true, format!("created from {}", prov.describe));
                self.records.put(&rec)?;
                dir.log_line(&format!(
                    "VDB {name} is running ({:.2} s)",
                    t.elapsed().as_secs_f64()
                ));
                tracing::info!(vdb = %name, parent = %parent, port = rec.port, ms = t.elapsed().as_millis() as u64, "VDB created");
                self.idle.restart(&name, crate::time::now_unix());
                let mut st = self.status_of(&rec, false)?;
                st.password = generated;
                Ok(st)
            }
            Err(e) => {
                progress.say(format!("creating VDB {name} failed; removing what it made"));
                dir.log_line(&format!("create failed: {e:#}"));
                self.teardown(&rec, &st);
                self.slots.forget(&name);
                Err(e.context(format!(
                    "provisioning from {parent} failed and was undone (nothing is left behind)"
                )))
            }
        }
    }

    /// The data directory of a new VDB: `--mount` (absolute, empty or new, not a mount point)
    /// or `STORE/mnt/NAME`.
    fn mount_point(&self, spec: &VdbSpec) -> anyhow::Result<PathBuf> {
        let mp = match &spec.mount {
            Some(m) => {
                if !m.is_absolute() {
                    refuse!(Invalid, "--mount {}: give an absolute path", m.display());
                }
                m.clone()
            }
            None => crate::mounts::mount_root(&self.store_dir)?.join(&spec.name),
        };
        let lexical = crate::mounts::resolve(&mp);
        if crate::mounts::is_mounted(&lexical) {
            refuse!(
                Conflict,
                "--mount {}: something is already mounted there; pick another directory",
                mp.display()
            );
        }
        if let Ok(mut rd) = std::fs::read_dir(&mp) {
            if rd.next().is_some() {
                refuse!(
                    Invalid,
                    "--mount {}: the directory is not empty; a VDB needs an empty or new directory",
                    mp.display()
                );
            }
        } else if mp.exists() {
            refuse!(Invalid, "--mount {}: not a directory", mp.display());
        }
        Ok(mp)
    }

    /// Where a create's (or refresh's) tree comes from: `--at`/`--at-lsn` (a moment of source
    /// `from`), `--verified` (the newest verified snapshot of source `from`), else the snapshot
    /// `from` names (`DATASET@SNAP`, or a dataset's latest).
    pub(super) fn resolve_from(
        &self,
        from: &str,
        at: Option<&str>,
        at_lsn: Option<&str>,
        verified: bool,
    ) -> anyhow::Result<Provision> {
        let moment = match (at, at_lsn) {
            (Some(_), Some(_)) => refuse!(Invalid, "give --at TIME or --at-lsn LSN, not both"),
            (Some(t), None) => Some(Moment::Time(crate::time::parse_moment(t, "--at")?)),
            (None, Some(l)) => Some(Moment::Lsn(pg::lsn::parse(l).ok_or_else(|| {
                refusal(
                    ErrorKind::Invalid,
                    format!(
                        "--at-lsn {l:?} is not an LSN; write it as PostgreSQL does, e.g. 0/3000060"
                    ),
                )
            })?)),
            (None, None) => None,
        };
        if let Some(m) = moment {
            if from.contains('@') || verified {
                refuse!(
                    Invalid,
                    "--at and --at-lsn pick the snapshot themselves (the newest at or before the \
                     moment): give --from SOURCE, without @SNAPSHOT or --verified"
                );
            }
            return self.provision_moment(from, m);
        }
        if verified {
            if from.contains('@') {
                refuse!(
                    Invalid,
                    "--verified picks the snapshot itself (the newest verified one): give --from \
                     SOURCE, without @SNAPSHOT"
                );
            }
            if !self.sources.is_source(from)? {
                refuse!(
                    Invalid,
                    "--verified takes the newest verified snapshot of a linked source, and {from} \
                     is not one ('vdbfs source list' shows them)"
                );
            }
            let snap = self.sources.newest_verified(from)?;
            return Ok(self.provision_snapshot(from, &snap));
        }
        let (ds, snap) = crate::catalog::resolve_snapshot(&self.datasets, from)?;
        Ok(self.provision_snapshot(&ds, &snap))
    }

    /// The LSN a clone of this snapshot must recover to, when it holds WAL past it (a staging
    /// snapshot taken while WAL kept arriving).
    /// Also where its recovery starts (the restartpoint's redo LSN), for progress.
    pub(super) fn recovery_target(
        &self,
        dataset: &str,
        snap: &str,
    ) -> Option<(super::Target, Option<u64>)> {
        let snaps = self.datasets.snapshots(Some(dataset)).ok()?;
        let s = snaps.iter().find(|s| s.rec.name == snap)?;
        let p = crate::source::snapshot_props(s)?;
        let target = super::Target {
            lsn: pg::lsn::parse(&p.lsn)?,
            timeline: p.timeline,
        };
        Some((target, p.redo_lsn.as_deref().and_then(pg::lsn::parse)))
    }

    /// PG_VERSION of a snapshot, read from its tree, for the installation to run it with.
    fn snapshot_install(&self, dataset: &str, snap: &str) -> anyhow::Result<pg::Install> {
        let view = self.datasets.snapshot_view(dataset, snap)?;
        let text = view
            .lookup(ROOT_INO, b"PG_VERSION")
            .and_then(|(ino, m)| view.read(ino, 0, m.size.min(64) as u32))
            .map_err(|_| {
                refusal(
                    ErrorKind::Invalid,
                    format!(
                        "snapshot {dataset}@{snap} does not hold a PostgreSQL data directory \
                         (no PG_VERSION at its top)"
                    ),
                )
            })?;
        let major: u32 = String::from_utf8_lossy(&text).trim().parse().map_err(|_| {
            refusal(
                ErrorKind::Invalid,
                format!("PG_VERSION of {dataset}@{snap} is unreadable"),
            )
        })?;
        pg::Install::for_major(major)
    }
}

/// Whether a failed start was postgres finding its port taken.
fn port_in_use(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<StartError>())
        .any(|s| s.port_in_use)
}
