//! The `vdbfs` command line: parses arguments, talks to the daemon over its socket, prints.

use crate::api::{self, DatasetInfo, ErrorKind, ProgressLine, Refusal, Request, Response, Status};
use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod progress;
mod vdb;

#[derive(Parser)]
#[command(
    name = "vdbfs",
    version,
    about = "Virtual PostgreSQL databases on a copy-on-write FUSE store"
)]
pub struct Cli {
    /// The store directory.
    #[arg(
        long,
        global = true,
        env = "VDBFS_STORE",
        default_value = "/var/lib/vdbfs"
    )]
    pub store: PathBuf,
    #[command(subcommand)]
    pub cmd: Cmd,
}

// Parsed once per run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Cmd {
    /// Create an empty store.
    Init,
    /// Run the daemon in the foreground: owns the store, serves every mount and the control API.
    Serve {
        /// Ports new VDBs get when `vdb create` has no --port: LO-HI.
        #[arg(long, env = "VDBFS_VDB_PORTS", default_value = "6000-6999")]
        vdb_ports: String,
        /// Scrub (read back and verify every live block) this often: 12h, 7d, ...; "off" never.
        #[arg(long, env = "VDBFS_SCRUB_EVERY", default_value = "7d")]
        scrub_every: String,
    },
    /// Show the daemon's pid and mounts.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Manage datasets.
    Dataset {
        #[command(subcommand)]
        cmd: DatasetCmd,
    },
    /// Manage snapshots (immutable, point-in-time copies of a dataset).
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// Create a writable dataset from a snapshot, sharing all its blocks.
    Clone {
        /// DATASET@SNAPSHOT
        snapshot: String,
        name: String,
    },
    /// Mount a dataset, or a snapshot (DATASET@SNAPSHOT) read-only.
    Mount {
        dataset: String,
        mountpoint: PathBuf,
        /// Mount over a directory that is not empty (its files are hidden while mounted).
        #[arg(long)]
        nonempty: bool,
    },
    /// Flush and unmount.
    Umount { mountpoint: PathBuf },
    /// Space used by each dataset and snapshot, and by the store.
    Df {
        #[arg(long)]
        json: bool,
    },
    /// Reclaim the space of blocks nothing references (also runs by itself).
    Gc,
    /// Read back and verify every live block (also runs by itself: serve --scrub-every); exits
    /// 1 when it finds bad blocks, naming the datasets, snapshots and files that hold them.
    Scrub {
        /// Read at most this many MiB/s (0: no bound).
        #[arg(long, default_value_t = crate::daemon::SCRUB_RATE_MIB)]
        rate: u64,
        #[arg(long)]
        json: bool,
    },
    /// Link source databases (dSources) and keep them in sync through a staging standby.
    Source {
        #[command(subcommand)]
        cmd: SourceCmd,
    },
    /// Virtual databases: writable copies of a snapshot, each with its own postgres.
    Vdb {
        #[command(subcommand)]
        cmd: vdb::VdbCmd,
    },
    /// The tree of datasets, snapshots, bookmarks and VDBs (all, or from one dataset).
    Timeflow {
        dataset: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// This host's PostgreSQL installations and clusters.
    Env {
        #[command(subcommand)]
        cmd: EnvCmd,
    },
}

#[derive(Subcommand)]
pub enum EnvCmd {
    /// List PostgreSQL installations (bin dir, version) and clusters (data dir, port, running,
    /// role). Needs no daemon.
    Discover {
        #[arg(long)]
        json: bool,
    },
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum SourceCmd {
    /// Copy a running PostgreSQL into a staging dataset NAME and keep it in sync.
    Link {
        name: String,
        /// How to reach the source: 'postgresql://USER@HOST:PORT/DB' or 'host=.. port=.. user=..'
        /// (a role with REPLICATION). The password may come from PGPASSWORD or --passfile.
        #[arg(long)]
        conn: Option<String>,
        /// backup-stream (vdbfs runs pg_basebackup, then streams), stream (your --backup, then
        /// streams) or log-shipping (your --backup, then WAL files from --archive).
        #[arg(long, default_value = "backup-stream")]
        mode: String,
        /// Your base backup (pg_basebackup output, plain or tar format).
        #[arg(long)]
        backup: Option<PathBuf>,
        /// The directory the source's archive_command copies WAL files to.
        #[arg(long)]
        archive: Option<PathBuf>,
        /// Port of the staging standby (default: the first free one from 5433).
        #[arg(long)]
        staging_port: Option<u16>,
        /// Physical replication slot on the source (default vdbfs_NAME).
        #[arg(long)]
        slot: Option<String>,
        /// Take a validated-sync snapshot this often (30s, 15m, 2h, 1d).
        #[arg(long)]
        snapshot_every: Option<String>,
        /// Keep this many of the source's snapshots.
        #[arg(long)]
        keep: Option<u32>,
        /// Keep the source's snapshots this long (e.g. 7d).
        #[arg(long)]
        keep_for: Option<String>,
        /// A libpq passfile (mode 0600) with the password.
        #[arg(long)]
        passfile: Option<PathBuf>,
        /// PostgreSQL bin directory for the staging standby (default: the source's version
        /// under /usr/lib/postgresql).
        #[arg(long, hide = true)]
        pg_bin: Option<PathBuf>,
    },
    /// Sources with their state and lag.
    List {
        #[arg(long)]
        json: bool,
    },
    /// State, replay position, lag, faults and last snapshot of a source.
    Status {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Take a validated-sync snapshot now; prints its full name.
    Snapshot {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop syncing (the staging standby stops); everything is kept.
    Disable { name: String },
    /// Resume syncing.
    Enable { name: String },
    /// Stop staging, drop the replication slot, detach the source.
    Unlink {
        name: String,
        /// Also delete the staging dataset and its snapshots (default: keep them as a dataset).
        #[arg(long)]
        delete_snapshots: bool,
        /// Unlink even when the slot cannot be dropped on an unreachable source.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Freeze a dataset as it is now.
    Create {
        dataset: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// List snapshots (of one dataset, or all), oldest first.
    List {
        dataset: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete DATASET@SNAPSHOT (clones made from it keep working).
    Delete { name: String },
}

#[derive(Subcommand)]
pub enum DatasetCmd {
    Create {
        name: String,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Delete {
        name: String,
        /// Also delete the dataset's snapshots.
        #[arg(long)]
        with_snapshots: bool,
    },
    /// Use a dataset recovery found damaged as it is (as of its last intact fsync before the
    /// damage); `dataset list` and `vdbfs status` show damaged datasets.
    AcceptDamage {
        name: String,
    },
}

pub(crate) fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

pub(crate) fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

pub fn call(store: &Path, req: &Request) -> anyhow::Result<Response> {
    let sock = api::socket_path(store);
    let mut s = UnixStream::connect(&sock).map_err(|_| {
        api::refusal(
            ErrorKind::Unavailable,
            format!(
                "no vdbfs daemon answers at {}; start one with 'vdbfs serve --store {}'",
                sock.display(),
                store.display()
            ),
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut shown = progress::Shown::new();
    loop {
        let mut resp = String::new();
        let n = r
            .read_line(&mut resp)
            .context("the daemon closed the connection without answering")?;
        if n == 0 {
            bail!("the daemon closed the connection without answering");
        }
        if let Ok(p) = serde_json::from_str::<ProgressLine>(&resp) {
            shown.show(&p);
            continue;
        }
        shown.done();
        return serde_json::from_str(&resp).context("malformed answer from the daemon");
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".to_string(), |x| x.to_string())
}

fn print_source(s: &api::SourceStatus) {
    println!("source {} ({}): {}", s.name, s.mode, s.state);
    if let Some(f) = &s.fault {
        println!("  FAULT: {f}");
    }
    println!(
        "  staging: {} on port {} (pid {})",
        s.data_dir.display(),
        s.staging_port,
        opt(&s.staging_pid)
    );
    if let Some(c) = &s.conn {
        println!(
            "  source: {c}{}",
            s.slot
                .as_ref()
                .map(|x| format!(", slot {x}"))
                .unwrap_or_default()
        );
    }
    if let Some(a) = &s.archive {
        println!("  archive: {}", a.display());
    }
    println!(
        "  replay {} (received {}, source at {}); lag {} bytes, {} s; last replayed commit {}",
        opt(&s.replay_lsn),
        opt(&s.receive_lsn),
        opt(&s.source_lsn),
        opt(&s.lag_bytes),
        s.lag_seconds.map_or("-".to_string(), |x| format!("{x:.1}")),
        opt(&s.last_replay_time)
    );
    match &s.last_snapshot {
        Some(l) => println!(
            "  {} snapshot(s); last {} at LSN {} (timeline {}), {}",
            s.snapshots, l.name, l.lsn, l.timeline, l.created
        ),
        None => println!("  {} snapshot(s)", s.snapshots),
    }
    if s.restarts > 0 {
        println!("  staging restarted {} time(s) after a crash", s.restarts);
    }
}

/// The exit status of a failed command: its kind's (see [`ErrorKind::exit_code`]); 1 for a
/// failure the CLI met itself.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    e.chain()
        .find_map(|c| c.downcast_ref::<Refusal>())
        .map_or(1, |r| r.kind.exit_code())
}

/// Sends a request; a failure is a [`Refusal`] with the daemon's kind and message.
pub(crate) fn run_req(store: &Path, req: Request) -> anyhow::Result<Response> {
    let r = call(store, &req)?;
    if !r.ok {
        return Err(Refusal::new(r.kind.unwrap_or(ErrorKind::Internal), r.message).into());
    }
    Ok(r)
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let store = absolute(&cli.store)?;
    match cli.cmd {
        Cmd::Init => init(&store)?,
        Cmd::Serve {
            vdb_ports,
            scrub_every,
        } => crate::daemon::serve(&store, &vdb_ports, &scrub_every)?,
        Cmd::Status { json } => {
            let r = run_req(&store, Request::Status)?;
            if json {
                println!("{}", r.data);
            } else {
                print_status(&serde_json::from_value(r.data)?);
            }
        }
        Cmd::Scrub { rate, json } => {
            let r = run_req(
                &store,
                Request::Scrub {
                    rate_mib: Some(rate),
                },
            )?;
            if json {
                println!("{}", r.data);
            } else {
                println!("{}", r.message);
            }
            let rep: api::ScrubReport = serde_json::from_value(r.data)?;
            if !rep.bad_blocks.is_empty() {
                bail!(
                    "scrub found {} bad block(s) (listed above): their data is lost; restore what \
                     references them (delete or reset those datasets, or rewrite the files), \
                     and check the disk",
                    rep.bad_blocks.len()
                );
            }
        }
        Cmd::Dataset { cmd } => match cmd {
            DatasetCmd::Create { name } => println!(
                "{}",
                run_req(&store, Request::DatasetCreate { name })?.message
            ),
            DatasetCmd::Delete {
                name,
                with_snapshots,
            } => println!(
                "{}",
                run_req(
                    &store,
                    Request::DatasetDelete {
                        name,
                        with_snapshots
                    }
                )?
                .message
            ),
            DatasetCmd::List { json } => {
                let r = run_req(&store, Request::DatasetList)?;
                if json {
                    println!("{}", r.data);
                } else {
                    let list: Vec<DatasetInfo> = serde_json::from_value(r.data)?;
                    println!("{:<24} {:>5} {:<21} MOUNTPOINT", "NAME", "ID", "CREATED");
                    for d in list {
                        let mp = d
                            .mountpoint
                            .map_or("-".to_string(), |p| p.display().to_string());
                        println!("{:<24} {:>5} {:<21} {}", d.name, d.id, d.created, mp);
                        if let Some(f) = d.fault {
                            println!("  FAULT: {f}");
                        }
                    }
                }
            }
            DatasetCmd::AcceptDamage { name } => println!(
                "{}",
                run_req(&store, Request::DatasetAcceptDamage { name })?.message
            ),
        },
        Cmd::Mount {
            dataset,
            mountpoint,
            nonempty,
        } => {
            let mountpoint = absolute(&mountpoint)?;
            println!(
                "{}",
                run_req(
                    &store,
                    Request::Mount {
                        dataset,
                        mountpoint,
                        nonempty,
                    }
                )?
                .message
            );
        }
        Cmd::Snapshot { cmd } => match cmd {
            SnapshotCmd::Create { dataset, name } => {
                println!(
                    "{}",
                    run_req(&store, Request::SnapshotCreate { dataset, name })?.message
                )
            }
            SnapshotCmd::Delete { name } => {
                println!(
                    "{}",
                    run_req(&store, Request::SnapshotDelete { name })?.message
                )
            }
            SnapshotCmd::List { dataset, json } => {
                let r = run_req(&store, Request::SnapshotList { dataset })?;
                if json {
                    println!("{}", r.data);
                } else {
                    let list: Vec<api::SnapshotInfo> = serde_json::from_value(r.data)?;
                    println!("{:<48} {:<21}", "NAME", "CREATED");
                    for s in list {
                        println!("{:<48} {:<21}", s.name, s.created);
                    }
                }
            }
        },
        Cmd::Clone { snapshot, name } => {
            println!(
                "{}",
                run_req(&store, Request::Clone { snapshot, name })?.message
            )
        }
        Cmd::Gc => println!("{}", run_req(&store, Request::Gc)?.message),
        Cmd::Df { json } => {
            let r = run_req(&store, Request::Df)?;
            if json {
                println!("{}", r.data);
            } else {
                let df: api::Df = serde_json::from_value(r.data)?;
                println!(
                    "{:<40} {:<8} {:>12} {:>12} {:>12}",
                    "NAME", "KIND", "LOGICAL", "UNIQUE", "SHARED"
                );
                for d in &df.datasets {
                    println!(
                        "{:<40} {:<8} {:>12} {:>12} {:>12}",
                        d.name,
                        d.kind,
                        human(d.logical_bytes),
                        human(d.unique_bytes),
                        human(d.shared_bytes)
                    );
                }
                println!(
                    "store: {} in pack files, {} live; compression {:.2}x, dedup {:.2}x",
                    human(df.physical_bytes),
                    human(df.live_stored_bytes),
                    df.compression_ratio,
                    df.dedup_ratio
                );
            }
        }
        Cmd::Env {
            cmd: EnvCmd::Discover { json },
        } => {
            let env = crate::pg::discover::discover();
            if json {
                println!("{}", serde_json::to_string(&env)?);
            } else {
                println!("installations:");
                for i in &env.installations {
                    println!("  PostgreSQL {:<8} {}", i.version, i.bin_dir.display());
                }
                println!("clusters:");
                for c in &env.clusters {
                    println!(
                        "  {:<48} version {:<4} port {:<6} {:<8} {}",
                        c.data_dir.display(),
                        opt(&c.version),
                        opt(&c.port),
                        if c.running { "running" } else { "stopped" },
                        c.role
                    );
                }
            }
        }
        Cmd::Source { cmd } => run_source(&store, cmd)?,
        Cmd::Vdb { cmd } => vdb::run(&store, cmd)?,
        Cmd::Timeflow { dataset, json } => vdb::timeflow(&store, dataset, json)?,
        Cmd::Umount { mountpoint } => {
            let mountpoint = absolute(&mountpoint)?;
            println!(
                "{}",
                run_req(&store, Request::Umount { mountpoint })?.message
            );
        }
    }
    Ok(())
}

/// `vdbfs init`: a new store in a new or empty directory; anything else is refused before a
/// byte changes.
fn init(store: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if crate::store::index_path(store).exists() {
        bail!(
            "{} already holds a vdbfs store; serve it with 'vdbfs serve --store {}'",
            store.display(),
            store.display()
        );
    }
    let existing = match std::fs::metadata(store) {
        Ok(m) if !m.is_dir() => bail!(
            "{} exists and is not a directory; choose another --store",
            store.display()
        ),
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(e).with_context(|| format!("cannot look at {}", store.display()));
        }
    };
    if existing.is_some() {
        let entries = crate::store::foreign_entries(store)
            .with_context(|| format!("cannot read {}", store.display()))?;
        if !entries.is_empty() {
            bail!(
                "{} is not empty ({}, e.g. {:?}) and holds no vdbfs store; vdbfs init needs a \
                 new or empty directory: choose another --store",
                store.display(),
                crate::mounts::entries_text(entries.len()),
                entries[0]
            );
        }
    }
    crate::store::Store::create(store)
        .with_context(|| format!("cannot create a store in {}", store.display()))?;
    println!("initialized an empty vdbfs store in {}", store.display());
    if let Some(m) = existing {
        if m.permissions().mode() & 0o001 == 0 {
            eprintln!(
                "note: {} keeps its mode {:o}; sources and VDBs need the postgres user to \
                 traverse it ('chmod o+x {}')",
                store.display(),
                m.permissions().mode() & 0o7777,
                store.display()
            );
        }
    }
    Ok(())
}

fn print_status(s: &Status) {
    println!("daemon pid {} serving {}", s.pid, s.store.display());
    for m in &s.mounts {
        println!("  {} on {}", m.dataset, m.mountpoint.display());
    }
    if let Some(sp) = &s.space {
        println!(
            "  space: {} free of {}; reserve {} of {}{}",
            human(sp.free_bytes),
            human(sp.total_bytes),
            human(sp.reserve_bytes),
            human(sp.reserve_target_bytes),
            if sp.full { "; STORE FULL" } else { "" }
        );
    }
    match &s.scrub {
        Some(r) if r.running => println!(
            "  scrub running since {}: {} of {} blocks checked",
            r.started, r.blocks_checked, r.blocks_total
        ),
        Some(r) => println!(
            "  last scrub {} ({}): {} blocks, {} bad{}",
            r.finished.as_deref().unwrap_or(&r.started),
            r.trigger,
            r.blocks_checked,
            r.bad_blocks.len(),
            r.error
                .as_ref()
                .map(|e| format!(", stopped early: {e}"))
                .unwrap_or_default()
        ),
        None => println!("  never scrubbed"),
    }
    if let Some(n) = &s.next_scrub {
        println!("  next scheduled scrub {n}");
    }
    for f in &s.faults {
        println!("  FAULT: {f}");
    }
}

fn run_source(store: &Path, cmd: SourceCmd) -> anyhow::Result<()> {
    match cmd {
        SourceCmd::Link {
            name,
            conn,
            mode,
            backup,
            archive,
            staging_port,
            slot,
            snapshot_every,
            keep,
            keep_for,
            passfile,
            pg_bin,
        } => {
            let spec = api::LinkSpec {
                name,
                conn,
                password: std::env::var("PGPASSWORD").ok(),
                passfile: passfile.map(|p| absolute(&p)).transpose()?,
                mode: Some(mode),
                backup: backup.map(|p| absolute(&p)).transpose()?,
                archive: archive.map(|p| absolute(&p)).transpose()?,
                staging_port,
                slot,
                snapshot_every,
                keep,
                keep_for,
                pg_bin: pg_bin.map(|p| absolute(&p)).transpose()?,
            };
            println!(
                "{}",
                run_req(store, Request::SourceLink(Box::new(spec)))?.message
            );
        }
        SourceCmd::List { json } => {
            let r = run_req(store, Request::SourceList)?;
            if json {
                println!("{}", r.data);
            } else {
                let list: Vec<api::SourceStatus> = serde_json::from_value(r.data)?;
                println!(
                    "{:<20} {:<14} {:<9} {:>6} {:>12} {:>8} LAST SNAPSHOT",
                    "NAME", "MODE", "STATE", "PORT", "LAG BYTES", "LAG S"
                );
                for s in list {
                    println!(
                        "{:<20} {:<14} {:<9} {:>6} {:>12} {:>8} {}",
                        s.name,
                        s.mode,
                        s.state,
                        s.staging_port,
                        opt(&s.lag_bytes),
                        s.lag_seconds.map_or("-".to_string(), |x| format!("{x:.1}")),
                        s.last_snapshot.map_or("-".to_string(), |l| l.name)
                    );
                }
            }
        }
        SourceCmd::Status { name, json } => {
            let r = run_req(store, Request::SourceStatus { name })?;
            if json {
                println!("{}", r.data);
            } else {
                print_source(&serde_json::from_value(r.data)?);
            }
        }
        SourceCmd::Snapshot { name, json } => {
            let r = run_req(store, Request::SourceSnapshot { name })?;
            if json {
                println!("{}", r.data);
            } else {
                println!("{}", r.message);
            }
        }
        SourceCmd::Disable { name } => {
            println!(
                "{}",
                run_req(store, Request::SourceDisable { name })?.message
            )
        }
        SourceCmd::Enable { name } => {
            println!(
                "{}",
                run_req(store, Request::SourceEnable { name })?.message
            )
        }
        SourceCmd::Unlink {
            name,
            delete_snapshots,
            force,
        } => println!(
            "{}",
            run_req(
                store,
                Request::SourceUnlink {
                    name,
                    delete_snapshots,
                    force
                }
            )?
            .message
        ),
    }
    Ok(())
}
