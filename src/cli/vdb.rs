//! `vdbfs vdb ...` and `vdbfs timeflow`: virtual databases and the tree they live in.

use super::{absolute, human, run_req, say};
use crate::api::{self, NodeKind, Request, TimeflowNode, VdbSpec};
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum VdbCmd {
    /// Provision a VDB from a snapshot, or a moment of a source, and start its postgres; prints
    /// how to connect. Ctrl-C cancels it and removes all it made.
    Create {
        /// The VDB's name (also the name of its dataset).
        name: String,
        /// DATASET@SNAPSHOT, or DATASET for its latest snapshot (a source or a VDB).
        #[arg(long)]
        from: String,
        /// A moment of source --from to provision at, with its UTC offset
        /// ('2026-11-30 14:22:49+00'): what was committed then (inclusive).
        #[arg(long, value_name = "TIME", conflicts_with_all = ["at_lsn", "verified"])]
        at: Option<String>,
        /// A WAL position of source --from (e.g. 0/3000060): what was committed up to it.
        #[arg(long, value_name = "LSN", conflicts_with = "verified")]
        at_lsn: Option<String>,
        /// The newest snapshot of source --from that passed verification (pg_amcheck).
        #[arg(long)]
        verified: bool,
        /// Port of its postgres (default: the first free one of the daemon's pool).
        #[arg(long)]
        port: Option<u16>,
        /// Where to mount its data directory (default STORE/mnt/NAME).
        #[arg(long)]
        mount: Option<PathBuf>,
        /// A postgres setting for this VDB, KEY=VALUE (repeatable); kept across refresh and rewind.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        settings: Vec<String>,
        /// Hooks directory for this VDB (default STORE/hooks when it exists).
        #[arg(long)]
        hooks: Option<PathBuf>,
        /// The API token name that owns it (a developer's token may then manage it); over
        /// the HTTP API a developer's VDB is always theirs.
        #[arg(long)]
        owner: Option<String>,
        /// A login role for the VDB's owner over TCP (password from --password-file, else
        /// generated and printed once).
        #[arg(long)]
        user: Option<String>,
        /// A file whose first line is the --user's password.
        #[arg(long, requires = "user")]
        password_file: Option<PathBuf>,
        /// Let production's roles log in with their passwords (by default the VDB removes them).
        #[arg(long)]
        keep_source_logins: bool,
        /// Delete it this long after creation (8h, 7d, ...; `vdb extend` moves it).
        #[arg(long)]
        ttl: Option<String>,
        /// Delete it once no client was connected for this long (default: serve
        /// --default-idle-ttl).
        #[arg(long)]
        idle_ttl: Option<String>,
    },
    /// Exempt a VDB from its TTL and idle TTL (--off: not any more).
    Protect {
        /// The VDB.
        name: String,
        /// Remove the protection: its TTL and idle TTL apply again.
        #[arg(long)]
        off: bool,
    },
    /// Push a VDB's deletion back: due BY from now (8h, 2d, ...); its idle clock starts again.
    Extend {
        /// The VDB.
        name: String,
        /// How long from now.
        by: String,
    },
    /// VDBs with their state, port and parent.
    List,
    /// One VDB: state, port, mount, parent snapshot, space (its undo snapshots' too), snapshots
    /// and bookmarks, recent events.
    Status {
        /// The VDB.
        name: String,
    },
    /// Stop its postgres (it stays stopped across daemon restarts).
    Stop {
        /// The VDB.
        name: String,
    },
    /// Start its postgres.
    Start {
        /// The VDB.
        name: String,
    },
    /// Take a snapshot of the VDB (its own TimeFlow).
    Snapshot {
        /// The VDB.
        name: String,
        /// Snapshot name (default: the time).
        #[arg(long = "name", value_name = "SNAPSHOT")]
        snapshot: Option<String>,
    },
    /// Mark the VDB's current state with a name to come back to.
    Bookmark {
        /// The VDB.
        name: String,
        /// The bookmark's name.
        bookmark: String,
    },
    /// Put the VDB back to one of its own snapshots or bookmarks, or to a moment of its own
    /// history (same name, port and mount). An undo snapshot is taken first; Ctrl-C cancels and
    /// puts it back as it was.
    Rewind {
        /// The VDB.
        name: String,
        /// One of its snapshots or bookmarks: SNAPSHOT or NAME@SNAPSHOT ('vdbfs vdb status
        /// NAME' lists them, undo snapshots included).
        #[arg(long, required_unless_present = "at", conflicts_with = "at")]
        to: Option<String>,
        /// A moment since its last create or refresh, with its UTC offset.
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
    },
    /// Move the VDB onto another snapshot of its parent, newer or older, or a moment of its
    /// parent source (same name, port, mount and settings). An undo snapshot is taken first;
    /// Ctrl-C cancels and puts it back as it was.
    Refresh {
        /// The VDB.
        name: String,
        /// PARENT@SNAPSHOT, any snapshot of its parent, older ones included (default: a new
        /// validated snapshot of a linked source, else the parent's latest snapshot).
        #[arg(long, conflicts_with_all = ["at", "at_lsn"])]
        to: Option<String>,
        /// A moment of the parent source, with its UTC offset.
        #[arg(long, value_name = "TIME", conflicts_with = "at_lsn")]
        at: Option<String>,
        /// A WAL position of the parent source.
        #[arg(long, value_name = "LSN")]
        at_lsn: Option<String>,
    },
    /// Stop and delete the VDB with its snapshots; VDBs made from it keep their data but can no
    /// longer refresh.
    Delete {
        /// The VDB.
        name: String,
    },
}

pub fn run(store: &Path, cmd: VdbCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        VdbCmd::Create {
            name,
            from,
            at,
            at_lsn,
            verified,
            port,
            mount,
            settings,
            hooks,
            owner,
            user,
            password_file,
            keep_source_logins,
            ttl,
            idle_ttl,
        } => {
            let password = password_file
                .map(|f| {
                    std::fs::read_to_string(&f)
                        .map(|s| s.lines().next().unwrap_or_default().to_string())
                        .map_err(|e| {
                            crate::api::refusal(
                                crate::api::ErrorKind::Invalid,
                                format!("cannot read --password-file {}: {e}", f.display()),
                            )
                        })
                })
                .transpose()?;
            if password.as_deref() == Some("") {
                return Err(crate::api::refusal(
                    crate::api::ErrorKind::Invalid,
                    "--password-file: the first line is empty",
                ));
            }
            let spec = VdbSpec {
                owner,
                user,
                password,
                keep_source_logins,
                ttl,
                idle_ttl,
                name,
                from,
                port,
                mount: mount.map(|p| absolute(&p)).transpose()?,
                settings,
                hooks: hooks.map(|p| absolute(&p)).transpose()?,
                at,
                at_lsn,
                verified,
            };
            say(json, &run_req(store, Request::VdbCreate(Box::new(spec)))?);
        }
        VdbCmd::List => {
            let r = run_req(store, Request::VdbList)?;
            if json {
                println!("{}", r.data);
                return Ok(());
            }
            let list: Vec<api::VdbStatus> = serde_json::from_value(r.data)?;
            println!(
                "{:<20} {:<9} {:>6} {:>10} {:<40} {:<21} DATA DIR",
                "NAME", "STATE", "PORT", "UNIQUE", "PARENT", "EXPIRES"
            );
            for s in list {
                let expires = match (&s.expires, s.protected) {
                    (_, true) => "protected".to_string(),
                    (Some(e), _) => e.clone(),
                    (None, _) => "-".to_string(),
                };
                println!(
                    "{:<20} {:<9} {:>6} {:>10} {:<40} {:<21} {}",
                    s.name,
                    s.state,
                    s.port,
                    human(s.unique_bytes),
                    s.parent,
                    expires,
                    s.data_dir.display()
                );
            }
        }
        VdbCmd::Protect { name, off } => {
            say(json, &run_req(store, Request::VdbProtect { name, off })?)
        }
        VdbCmd::Extend { name, by } => say(json, &run_req(store, Request::VdbExtend { name, by })?),
        VdbCmd::Status { name } => {
            let r = run_req(store, Request::VdbStatus { name })?;
            if json {
                println!("{}", r.data);
                return Ok(());
            }
            print_status(&serde_json::from_value(r.data)?);
        }
        VdbCmd::Stop { name } => say(json, &run_req(store, Request::VdbStop { name })?),
        VdbCmd::Start { name } => say(json, &run_req(store, Request::VdbStart { name })?),
        VdbCmd::Snapshot { name, snapshot } => say(
            json,
            &run_req(
                store,
                Request::VdbSnapshot {
                    name,
                    snapshot,
                    bookmark: false,
                },
            )?,
        ),
        VdbCmd::Bookmark { name, bookmark } => say(
            json,
            &run_req(
                store,
                Request::VdbSnapshot {
                    name,
                    snapshot: Some(bookmark),
                    bookmark: true,
                },
            )?,
        ),
        VdbCmd::Rewind { name, to, at } => {
            say(json, &run_req(store, Request::VdbRewind { name, to, at })?)
        }
        VdbCmd::Refresh {
            name,
            to,
            at,
            at_lsn,
        } => say(
            json,
            &run_req(
                store,
                Request::VdbRefresh {
                    name,
                    to,
                    at,
                    at_lsn,
                },
            )?,
        ),
        VdbCmd::Delete { name } => say(json, &run_req(store, Request::VdbDelete { name })?),
    }
    Ok(())
}

/// How many of a VDB's latest events `vdb status` shows (`--json` has them all).
const EVENTS_SHOWN: usize = 5;

fn print_status(s: &api::VdbStatus) {
    println!("VDB {}: {}", s.name, s.state);
    if let Some(f) = &s.fault {
        println!("  fault: {f}");
    }
    println!("  connect:  psql '{}'", s.conn);
    println!("  over TCP: {}", s.tcp_conn);
    println!(
        "  port {}, pid {}, data directory {}, socket directory {}",
        s.port,
        s.pid.map_or("-".into(), |p| p.to_string()),
        s.data_dir.display(),
        s.socket_dir.display()
    );
    println!("  parent:   {} (dataset {})", s.parent, s.parent_dataset);
    println!("  created:  {}", s.created);
    if let Some(h) = &s.history {
        println!(
            "  history:  rewind --at any moment from {} (timeline {})",
            h.from_time, h.timeline
        );
    }
    println!(
        "  space:    {} logical, {} unique (what deleting it frees)",
        human(s.logical_bytes),
        human(s.unique_bytes)
    );
    println!(
        "  undo:     {} undo snapshot(s), {} held by them alone (keeps the last {}; \
         'vdbfs serve --keep-undo N')",
        s.undo_snapshots.len(),
        human(s.undo_bytes),
        s.undo_keep
    );
    for (k, v) in &s.settings {
        println!("  set {k} = {v}");
    }
    if let Some(h) = &s.hooks {
        println!("  hooks:    {}", h.display());
    }
    println!("  snapshots: {}", list_or_none(&s.snapshots));
    println!("  bookmarks: {}", list_or_none(&s.bookmarks));
    println!(
        "  logs:     {} (vdbfs, hooks), {}",
        s.log.display(),
        s.postgres_log.display()
    );
    let skip = s.events.len().saturating_sub(EVENTS_SHOWN);
    if !s.events.is_empty() {
        println!(
            "  events ({} of {}):",
            s.events.len() - skip,
            s.events.len()
        );
    }
    for (when, what) in &s.events[skip..] {
        println!("    {when} {what}");
    }
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

pub fn timeflow(store: &Path, dataset: Option<String>, json: bool) -> anyhow::Result<()> {
    let r = run_req(store, Request::Timeflow { dataset })?;
    if json {
        println!("{}", r.data);
        return Ok(());
    }
    let nodes: Vec<TimeflowNode> = serde_json::from_value(r.data)?;
    if nodes.is_empty() {
        println!("no datasets yet ('vdbfs source link' links a source)");
    }
    for n in &nodes {
        print!("{}", render(n));
    }
    Ok(())
}

/// The tree as text, like `git log --graph`: one line per node, children indented under it.
pub fn render(n: &TimeflowNode) -> String {
    let mut out = String::new();
    out.push_str(&label(n));
    out.push('\n');
    render_children(n, "", &mut out);
    out
}

fn render_children(n: &TimeflowNode, prefix: &str, out: &mut String) {
    for (i, c) in n.children.iter().enumerate() {
        let last = i + 1 == n.children.len();
        out.push_str(prefix);
        out.push_str(if last { "└── " } else { "├── " });
        out.push_str(&label(c));
        out.push('\n');
        let next = format!("{prefix}{}", if last { "    " } else { "│   " });
        render_children(c, &next, out);
    }
}

fn label(n: &TimeflowNode) -> String {
    let mut parts = vec![n.name.clone()];
    match n.kind {
        NodeKind::Source | NodeKind::Vdb | NodeKind::Dataset => {
            let mut what = n.kind.to_string();
            if let Some(s) = &n.state {
                what.push_str(&format!(" {s}"));
            }
            if let Some(p) = n.port {
                what.push_str(&format!(" port {p}"));
            }
            if let Some(note) = &n.note {
                what.push_str(&format!(", {note}"));
            }
            parts.push(format!("[{what}]"));
            for r in &n.ranges {
                let verb = if n.kind == NodeKind::Vdb {
                    "rewind --at"
                } else {
                    "provisionable"
                };
                parts.push(format!(
                    "{verb}: {} .. {} (timeline {})",
                    r.from_time, r.to_time, r.timeline
                ));
            }
        }
        kind => {
            if kind == NodeKind::Bookmark {
                parts.push("[bookmark]".into());
            }
            if let Some(l) = &n.lsn {
                parts.push(format!("lsn {l}"));
            }
            if let Some(t) = n.timeline {
                parts.push(format!("tl {t}"));
            }
            if let Some(c) = &n.created {
                parts.push(c.clone());
            }
            if let Some(note) = &n.note {
                parts.push(format!("({note})"));
            }
            if let Some(p) = n.marks.prepared {
                parts.push(format!("prepared {p}"));
            }
            if let Some(v) = n
                .marks
                .verified
                .filter(|v| *v != crate::api::VerifyState::Off)
            {
                parts.push(format!("verified {v}"));
            }
            if let Some(f) = n.marks.verify_failures.first() {
                parts.push(format!("({f})"));
            }
        }
    }
    parts.join("  ")
}
