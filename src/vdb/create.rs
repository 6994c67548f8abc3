//! `vdb create`: checks, then clone, mount, configure, start (with the hooks), all undone on
//! any failure.
//!
//! The sequence, top to bottom: name and input checks and the port (under `create_lock`,
//! ending with the record, `pending = create`) -> `prepare_dir` -> clone of the snapshot ->
//! mount -> `configure` -> `check_config` (`postgres -C`) -> pre-start hook -> provisioning
//! start and promote -> configure-clone hook -> post-start hook -> record without `pending`.

use super::configure;
use super::hooks::{self, Hook};
use super::service::VdbService;
use super::{Pending, VdbOp, VdbRecord};
use crate::api::{refusal, ErrorKind, Progress, VdbSpec, VdbStatus};
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
        let (pds, psnap) = crate::catalog::resolve_snapshot(&self.datasets, &spec.from)?;
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
        let install = self.snapshot_install(&pds, &psnap)?;
        let target = self.recovery_target(&pds, &psnap);
        let parent = format!("{pds}@{psnap}");

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
            }),
            created: crate::time::rfc3339_now(),
            events: Vec::new(),
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
            dir.log_line(&format!("creating VDB {name} from {parent} on port {port}"));
            progress.say(format!("cloning {parent} into VDB {name}"));
            self.datasets.clone_snapshot(&pds, &psnap, &name)?;
            self.mount(&rec)?;
            configure::configure(&rec, &self.store_dir, target.as_ref(), true)?;
            configure::check_config(&rec)?;
            progress.check()?;
            progress.say(format!(
                "starting postgres on port {port}{}",
                target
                    .as_ref()
                    .map(|t| format!(" (recovering to {})", pg::lsn::format(t.lsn)))
                    .unwrap_or_default()
            ));
            let mut tries = 0;
            loop {
                let rec_now = rec.clone();
                let started = self.start_with_hooks(&rec_now, &st, &|| {
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
                progress.past_return(format!("VDB {name} is created"));
                rec.settle(true, format!("created from {parent}"));
                self.records.put(&rec)?;
                dir.log_line(&format!(
                    "VDB {name} is running ({:.2} s)",
                    t.elapsed().as_secs_f64()
                ));
                tracing::info!(vdb = %name, parent = %parent, port = rec.port, ms = t.elapsed().as_millis() as u64, "VDB created");
                self.status_of(&rec, false)
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

    /// The LSN a clone of this snapshot must recover to, when it holds WAL past it (a staging
    /// snapshot taken while WAL kept arriving).
    pub(super) fn recovery_target(&self, dataset: &str, snap: &str) -> Option<super::Target> {
        let snaps = self.datasets.snapshots(Some(dataset)).ok()?;
        let s = snaps.iter().find(|s| s.rec.name == snap)?;
        let p = crate::source::snapshot_props(s)?;
        Some(super::Target {
            lsn: pg::lsn::parse(&p.lsn)?,
            timeline: p.timeline,
        })
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
