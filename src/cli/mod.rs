//! The `vdbfs` command line: parses arguments, talks to the daemon over its socket, prints.

use crate::daemon::api::{self, DatasetInfo, Request, Response, Status};
use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

#[derive(Subcommand)]
pub enum Cmd {
    /// Create an empty store.
    Init,
    /// Run the daemon in the foreground: owns the store, serves every mount and the control API.
    Serve,
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
}

fn human(b: u64) -> String {
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

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

pub fn call(store: &Path, req: &Request) -> anyhow::Result<Response> {
    let sock = api::socket_path(store);
    let mut s = UnixStream::connect(&sock).map_err(|_| {
        anyhow::anyhow!(
            "no vdbfs daemon answers at {}; start one with 'vdbfs serve --store {}'",
            sock.display(),
            store.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut resp = String::new();
    BufReader::new(s)
        .read_line(&mut resp)
        .context("the daemon closed the connection without answering")?;
    serde_json::from_str(&resp).context("malformed answer from the daemon")
}

fn run_req(store: &Path, req: Request) -> anyhow::Result<Response> {
    let r = call(store, &req)?;
    if !r.ok {
        bail!("{}", r.message);
    }
    Ok(r)
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let store = absolute(&cli.store)?;
    match cli.cmd {
        Cmd::Init => {
            if crate::store::index_path(&store).exists() {
                bail!("{} already holds a vdbfs store", store.display());
            }
            crate::store::Store::create(&store)
                .with_context(|| format!("cannot create a store in {}", store.display()))?;
            println!("initialized an empty vdbfs store in {}", store.display());
        }
        Cmd::Serve => crate::daemon::serve(&store)?,
        Cmd::Status { json } => {
            let r = run_req(&store, Request::Status)?;
            if json {
                println!("{}", r.data);
            } else {
                let s: Status = serde_json::from_value(r.data)?;
                println!("daemon pid {} serving {}", s.pid, s.store.display());
                for m in s.mounts {
                    println!("  {} on {}", m.dataset, m.mountpoint.display());
                }
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
                    }
                }
            }
        },
        Cmd::Mount {
            dataset,
            mountpoint,
        } => {
            let mountpoint = absolute(&mountpoint)?;
            println!(
                "{}",
                run_req(
                    &store,
                    Request::Mount {
                        dataset,
                        mountpoint
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
