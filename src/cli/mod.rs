//! The `vdbfs` command line: parses arguments, talks to the daemon over its socket, prints.
//!
//! Output contract (docs/CLI-CONTRACT.md): text for people on stdout; with `--json` (anywhere
//! on the line, like `--store`) the reply's data as one JSON document, and an error as
//! `{"error": {"kind", "message", "hint"}}` on stdout with the same exit status as without.
//! The `vdbfs: error: ...` line and progress lines go to stderr either way. Module map: `client` (the socket, Ctrl-C),
//! `libpq` (PG* environment and password files for `source link`), `vdb`, `progress`, `docs`
//! (completions and man pages).
//!
//! Size: the clap definitions of every subcommand with their help texts (the user's reference)
//! and their text printers; the parts with logic of their own are the submodules above.

use crate::api::{self, DatasetInfo, ErrorKind, Refusal, Request, Response, Status};
use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};

mod client;
mod docs;
mod http;
mod libpq;
mod progress;
mod vdb;

pub use client::call;

#[derive(Parser)]
#[command(
    name = "vdbfs",
    version,
    about = "Virtual PostgreSQL databases on a copy-on-write FUSE store",
    long_about = "Virtual PostgreSQL databases on a copy-on-write FUSE store.\n\n\
        `vdbfs serve` runs the daemon that owns a store; every other command talks to it over \
        the store's control socket (STORE/vdbfs.sock). Errors exit 1 (130 when cancelled with \
        Ctrl-C), usage errors 2.",
    after_help = "Environment: VDBFS_STORE (the store), VDBFS_LOG or RUST_LOG (log filter, e.g. \
        debug), and for `source link` libpq's PGHOST, PGPORT, PGUSER, PGDATABASE, PGSSLMODE, \
        PGPASSWORD, PGPASSFILE and ~/.pgpass."
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
    /// Print the result as JSON on stdout: the object listed, made or changed; an error as
    /// {"error": {"kind", "message", "hint"}} with the same exit status.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a token and print it (this once: only its hash is kept).
    Create {
        /// The token's name: what logs show and what owns the VDBs it makes.
        name: String,
        /// admin (everything) or developer (list sources, snapshots and VDBs; create, start,
        /// stop, snapshot, refresh, rewind and delete its own VDBs).
        #[arg(long, value_parser = ["admin", "developer"])]
        role: String,
        /// How long it works: 8h, 30d, ... (default: until revoked).
        #[arg(long)]
        expires: Option<String>,
    },
    /// Tokens with their role and expiry (never the tokens).
    List,
    /// Revoke a token: requests with it get 401 from now on.
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// How `vdbfs serve` writes its log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line of text per event.
    Text,
    /// One JSON object per line (timestamp, level, target, message and fields), for log
    /// shippers.
    Json,
}

// Parsed once per run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum Cmd {
    /// Create an empty store; with --remote, one whose sealed packs and published snapshots
    /// live in an S3-compatible bucket (credentials the AWS way, where the daemon runs:
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the profile AWS_PROFILE names in
    /// ~/.aws/credentials and ~/.aws/config).
    Init {
        /// s3://BUCKET/PREFIX: the bucket shared with the other hosts.
        #[arg(long)]
        remote: Option<String>,
        /// The S3 endpoint (e.g. http://127.0.0.1:3900 for Garage); default AWS_ENDPOINT_URL or AWS.
        #[arg(long, requires = "remote")]
        endpoint: Option<String>,
        /// The bucket's region (Garage: the s3_region of its configuration).
        #[arg(long, requires = "remote")]
        region: Option<String>,
        /// Most bytes of blocks fetched from the bucket to keep locally (512M, 50G, 1.5T; K,
        /// M, G, T are powers of 1024; at least 1M); least recently read ones are evicted and
        /// fetched again when read. Default: no limit.
        #[arg(long, requires = "remote", value_parser = crate::remote::cache::parse_size)]
        cache_size: Option<u64>,
    },
    /// The object store: what is uploaded and what the hosts published.
    Remote {
        #[command(subcommand)]
        cmd: RemoteCmd,
    },
    /// Run the daemon in the foreground: owns the store, serves every mount and the control API.
    Serve {
        /// Ports new VDBs get when `vdb create` has no --port: LO-HI.
        #[arg(long, env = "VDBFS_VDB_PORTS", default_value = "6000-6999")]
        vdb_ports: String,
        /// How many undo snapshots (NAME@auto-before-*, taken before each refresh and rewind)
        /// each VDB keeps; older ones expire after the next refresh or rewind.
        #[arg(long, env = "VDBFS_KEEP_UNDO", default_value_t = crate::vdb::DEFAULT_UNDO_KEEP)]
        keep_undo: u32,
        /// Log lines as text or as JSON objects (level from VDBFS_LOG or RUST_LOG).
        #[arg(long, value_enum, env = "VDBFS_LOG_FORMAT", default_value = "text")]
        log_format: LogFormat,
        /// Scrub (read back and verify every live block) this often: 12h, 7d, ...; "off" never.
        #[arg(long, env = "VDBFS_SCRUB_EVERY", default_value = "7d")]
        scrub_every: String,
        /// Also serve the HTTP API, the web page and /metrics at ADDR:PORT (e.g.
        /// 127.0.0.1:7480); requests need a token from `vdbfs token create`.
        #[arg(long, env = "VDBFS_HTTP", value_name = "ADDR:PORT")]
        http: Option<std::net::SocketAddr>,
        /// Serve --http over HTTPS with this certificate chain (PEM; with --tls-key).
        #[arg(
            long,
            env = "VDBFS_TLS_CERT",
            value_name = "FILE",
            requires = "tls_key",
            requires = "http"
        )]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM: PKCS#8, PKCS#1 or SEC1) of --tls-cert.
        #[arg(
            long,
            env = "VDBFS_TLS_KEY",
            value_name = "FILE",
            requires = "tls_cert"
        )]
        tls_key: Option<PathBuf>,
        /// Delete VDBs that had no client for this long unless created with --idle-ttl or
        /// protected (2h, 1d, ...; "off": never).
        #[arg(long, env = "VDBFS_DEFAULT_IDLE_TTL", default_value = "off")]
        default_idle_ttl: String,
        /// Let members of this group use the control socket (mode 0660) as developers, named
        /// after their user (SO_PEERCRED); root stays admin. The store directory must let them
        /// through (search permission).
        #[arg(long, env = "VDBFS_SOCKET_GROUP", value_name = "GROUP")]
        socket_group: Option<String>,
    },
    /// Show the daemon's pid, its store and the mounts.
    Status,
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
        /// The snapshot to clone: DATASET@SNAPSHOT.
        snapshot: String,
        /// Name of the new dataset.
        name: String,
    },
    /// Mount a dataset, or a snapshot (DATASET@SNAPSHOT) read-only.
    Mount {
        /// DATASET, or DATASET@SNAPSHOT for a read-only mount.
        dataset: String,
        /// Where to mount it (created if missing).
        mountpoint: PathBuf,
        /// Mount over a directory that is not empty (its files are hidden while mounted).
        #[arg(long)]
        nonempty: bool,
    },
    /// Flush and unmount (refused while files are open there).
    Umount {
        /// The mount point to unmount.
        mountpoint: PathBuf,
    },
    /// Space used by each dataset and snapshot, and by the store.
    Df,
    /// Reclaim the space of blocks nothing references (also runs by itself).
    Gc,
    /// Read back and verify every live block (also runs by itself: serve --scrub-every); exits
    /// 1 when it finds bad blocks, naming the datasets, snapshots and files that hold them.
    Scrub {
        /// Read at most this many MiB/s (0: no bound).
        #[arg(long, default_value_t = crate::daemon::SCRUB_RATE_MIB)]
        rate: u64,
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
    /// API tokens for the HTTP API (`serve --http`): admins may do everything, developers
    /// manage their own VDBs.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// The tree of datasets, snapshots, bookmarks and VDBs (all, or from one dataset).
    Timeflow {
        /// Show only this dataset (a source, a VDB or a plain dataset) and what came from it.
        dataset: Option<String>,
    },
    /// This host's PostgreSQL installations and clusters.
    Env {
        #[command(subcommand)]
        cmd: EnvCmd,
    },
    /// Print a shell completion script: `vdbfs completions bash > /etc/bash_completion.d/vdbfs`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Write a man page per command (vdbfs.1, vdbfs-source-link.1, ...) into DIR.
    Manpages {
        /// Where to write them (e.g. /usr/local/share/man/man1); created if missing.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum EnvCmd {
    /// List PostgreSQL installations (bin dir, version) and clusters (data dir, port, running,
    /// role). Needs no daemon.
    Discover,
}

#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum SourceCmd {
    /// Copy a running PostgreSQL into a staging dataset NAME and keep it in sync. Ctrl-C
    /// cancels the link and removes all it made.
    #[command(
        after_help = "Connection and password as for psql: what --conn does not name comes from \
        PGHOST, PGPORT, PGUSER, PGDATABASE and PGSSLMODE; the password from --conn, PGPASSWORD, \
        --passfile, PGPASSFILE or ~/.pgpass (a password file must be mode 0600 or stricter)."
    )]
    Link {
        /// The source's name: also the name of its staging dataset and of its snapshots'
        /// dataset.
        name: String,
        /// How to reach the source: 'postgresql://USER@HOST:PORT/DB' or 'host=.. port=.. user=..'
        /// (a role with REPLICATION). Default: from PGHOST, PGPORT, PGUSER, PGDATABASE.
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
        /// Keep this many of the source's snapshots (named ones are always kept).
        #[arg(long)]
        keep: Option<u32>,
        /// Keep the source's snapshots this long (e.g. 7d; named ones are always kept).
        #[arg(long)]
        keep_for: Option<String>,
        /// A libpq password file (mode 0600: host:port:db:user:password lines); the daemon keeps
        /// a copy. Default: PGPASSFILE, else ~/.pgpass (only the matching password is kept).
        #[arg(long)]
        passfile: Option<PathBuf>,
        /// PostgreSQL bin directory for the staging standby, for installations outside
        /// /usr/lib/postgresql/MAJOR/bin (default: the source's major version there).
        #[arg(long)]
        pg_bin: Option<PathBuf>,
        /// Check each snapshot's prepared image with pg_amcheck --heapallindexed in the
        /// background ('vdb create --verified' takes the newest that passed).
        #[arg(long)]
        verify: bool,
    },
    /// Change a source's settings.
    Set {
        /// The source.
        name: String,
        /// Verify each prepared snapshot with pg_amcheck (on|off).
        #[arg(long, value_parser = ["on", "off"])]
        verify: Option<String>,
    },
    /// Sources with their state and lag.
    List,
    /// State, replay position, lag, faults and last snapshot of a source.
    Status {
        /// The source.
        name: String,
    },
    /// Take a validated-sync snapshot now; prints its full name.
    Snapshot {
        /// The source.
        name: String,
        /// Name the snapshot (default: its time); retention (--keep, --keep-for) never deletes
        /// a named one.
        #[arg(long = "name", value_name = "SNAPSHOT")]
        snapshot: Option<String>,
    },
    /// Stop syncing (the staging standby stops); everything is kept.
    Disable {
        /// The source.
        name: String,
    },
    /// Resume syncing.
    Enable {
        /// The source.
        name: String,
    },
    /// Stop staging, drop the replication slot, detach the source; says what it leaves behind
    /// and which VDBs it affects.
    Unlink {
        /// The source.
        name: String,
        /// Also delete the staging dataset and its snapshots (default: keep them as a dataset);
        /// VDBs made from them can no longer refresh.
        #[arg(long)]
        delete_snapshots: bool,
        /// Unlink even when the slot cannot be dropped on an unreachable source (prints the SQL
        /// that drops it there).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Freeze a dataset as it is now.
    Create {
        /// The dataset.
        dataset: String,
        /// Name the snapshot (default: its time, e.g. 20261126T085733.587Z).
        #[arg(long)]
        name: Option<String>,
    },
    /// List snapshots (of one dataset, or all), oldest first, with the LSN, timeline and
    /// replay time of a source's snapshots and the kind of a VDB's.
    List {
        /// Only this dataset's snapshots.
        dataset: Option<String>,
    },
    /// Delete DATASET@SNAPSHOT (clones made from it keep working; names the VDBs that can no
    /// longer refresh from it).
    Delete {
        /// DATASET@SNAPSHOT
        name: String,
    },
    /// Publish DATASET@SNAPSHOT to the store's bucket: its packs are uploaded, then its
    /// manifest, so that other hosts can provision from it.
    Publish {
        /// DATASET@SNAPSHOT
        name: String,
    },
}

#[derive(Subcommand)]
pub enum RemoteCmd {
    /// The bucket, the upload backlog, failures and fetches.
    Status,
    /// Snapshots published to the bucket by any host (dataset@snapshot, publisher, LSN, time).
    List,
    /// Delete this store's pack objects that no manifest or hold of any host needs: mark,
    /// wait the grace period, recheck, delete (admin). Reports objects and bytes deleted.
    Gc {
        /// How long to wait between mark and recheck: longer than any publish (30s, 15m, 1h).
        #[arg(long, default_value = "1h")]
        grace: String,
        /// Only list the pack objects that would be candidates now; delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
pub enum DatasetCmd {
    /// Create an empty dataset (its root directory owned by root, mode 0755).
    Create {
        /// The new dataset's name (1-64 of A-Z a-z 0-9 . _ -).
        name: String,
    },
    /// List datasets with their id, creation time, mount point and origin.
    List,
    /// Delete a dataset (refused while mounted, or while it has snapshots unless asked).
    Delete {
        /// The dataset.
        name: String,
        /// Also delete the dataset's snapshots.
        #[arg(long)]
        with_snapshots: bool,
    },
    /// Use a dataset recovery found damaged as it is (as of its last intact fsync before the
    /// damage); `dataset list` and `vdbfs status` show damaged datasets.
    AcceptDamage {
        /// The damaged dataset.
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

pub(crate) fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".to_string(), |x| x.to_string())
}

/// The exit status of a failed command: its kind's (see [`ErrorKind::exit_code`]); 1 for a
/// failure the CLI met itself.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    kind_of(e).exit_code()
}

fn kind_of(e: &anyhow::Error) -> ErrorKind {
    e.chain()
        .find_map(|c| c.downcast_ref::<Refusal>())
        .map_or(ErrorKind::Internal, |r| r.kind)
}

/// Sends a request; a failure is a [`Refusal`] with the daemon's kind, message and hint.
pub(crate) fn run_req(store: &Path, req: Request) -> anyhow::Result<Response> {
    let r = call(store, &req)?;
    if !r.ok {
        let mut refusal = Refusal::new(r.kind.unwrap_or(ErrorKind::Internal), r.message);
        refusal.hint = r.hint;
        return Err(refusal.into());
    }
    Ok(r)
}

/// Prints a reply: its data as JSON, or its message.
pub(crate) fn say(json: bool, r: &Response) {
    if json {
        println!("{}", r.data);
    } else if !r.message.is_empty() {
        println!("{}", r.message);
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

/// The whole command line: parse, log setup, run, report. Returns the exit status.
pub fn main() -> i32 {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => return usage_error(e, args.iter().any(|a| a == "--json")),
    };
    init_logging(&cli);
    if !matches!(cli.cmd, Cmd::Serve { .. }) {
        // A CLI whose output is piped into `head` ends quietly, like other Unix tools. Never
        // for the daemon: a client hanging up must not kill it.
        // SAFETY: setting a signal disposition before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let json = cli.json;
    match run(cli) {
        Ok(()) => 0,
        Err(e) => report(&e, json),
    }
}

/// A usage error found by clap: its usual text on stderr and exit status 2, with `--json` also
/// the JSON error (kind `invalid`) on stdout. Help and version are printed as they are.
fn usage_error(e: clap::Error, json: bool) -> i32 {
    use clap::error::ErrorKind as K;
    let _ = e.print();
    if matches!(e.kind(), K::DisplayHelp | K::DisplayVersion) || !json {
        return e.exit_code();
    }
    let text = e.render().to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let message = lines
        .next()
        .unwrap_or("invalid command line")
        .trim_start_matches("error: ")
        .to_string();
    let hint: Vec<&str> = lines.collect();
    let reply = api::ErrorReply {
        error: api::ErrorBody {
            kind: ErrorKind::Invalid,
            message,
            hint: (!hint.is_empty()).then(|| hint.join("; ")),
        },
    };
    println!("{}", serde_json::to_string(&reply).unwrap_or_default());
    2
}

/// Prints a failed command's error and returns its exit status: the `vdbfs: error:` line on
/// stderr, and with `--json` also the JSON error on stdout (where a script reads the result).
pub fn report(e: &anyhow::Error, json: bool) -> i32 {
    let kind = kind_of(e);
    let hint = api::hint_of(e);
    let message = format!("{e:#}");
    match &hint {
        Some(h) => eprintln!("vdbfs: error: {message}; {h}"),
        None => eprintln!("vdbfs: error: {message}"),
    }
    if json {
        let reply = api::ErrorReply {
            error: api::ErrorBody {
                kind,
                message,
                hint,
            },
        };
        println!("{}", serde_json::to_string(&reply).unwrap_or_default());
    }
    kind.exit_code()
}

/// Log lines on stderr, filtered by `VDBFS_LOG`, else `RUST_LOG` (tracing's env-filter
/// syntax: `debug`, `vdbfs=debug,fuser=warn`, ...), else `info`; `serve --log-format json`
/// writes them as JSON objects.
fn init_logging(cli: &Cli) {
    let json = matches!(
        cli.cmd,
        Cmd::Serve {
            log_format: LogFormat::Json,
            ..
        }
    );
    crate::logging::init(json);
}

/// Commands whose result has no JSON form.
fn no_json(what: &str, instead: &str) -> anyhow::Error {
    Refusal::new(
        ErrorKind::Invalid,
        format!("vdbfs {what} prints no result to show as JSON"),
    )
    .with_hint(instead.to_string())
    .into()
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let store = absolute(&cli.store)?;
    let json = cli.json;
    match cli.cmd {
        Cmd::Init {
            remote,
            endpoint,
            region,
            cache_size,
        } => {
            let cfg = remote.map(|url| crate::remote::RemoteConfig {
                v: 1,
                url,
                endpoint,
                region,
                cache_size,
                store_id: crate::remote::new_store_id(),
            });
            if let Some(c) = &cfg {
                c.bucket_prefix()?;
            }
            init(&store, json, cfg)?
        }
        Cmd::Remote { cmd } => match cmd {
            RemoteCmd::Status => {
                let r = run_req(&store, Request::RemoteStatus)?;
                if json {
                    println!("{}", r.data);
                } else {
                    let s: crate::remote::RemoteStatus = serde_json::from_value(r.data)?;
                    print_remote_status(&s);
                }
            }
            RemoteCmd::Gc { grace, dry_run } => say(
                json,
                &run_req(
                    &store,
                    Request::RemoteGc {
                        grace: Some(grace),
                        dry_run,
                    },
                )?,
            ),
            RemoteCmd::List => {
                let r = run_req(&store, Request::RemoteList)?;
                if json {
                    println!("{}", r.data);
                } else {
                    let list: Vec<crate::remote::Published> = serde_json::from_value(r.data)?;
                    println!(
                        "{:<40} {:<24} {:<14} {:<22} {:>8}",
                        "SNAPSHOT", "PUBLISHER", "LSN", "CREATED", "BLOCKS"
                    );
                    for p in list {
                        println!(
                            "{:<40} {:<24} {:<14} {:<22} {:>8}",
                            p.name,
                            p.publisher,
                            p.lsn.as_deref().unwrap_or("-"),
                            p.created,
                            p.blocks
                        );
                    }
                }
            }
        },
        Cmd::Serve {
            vdb_ports,
            keep_undo,
            scrub_every,
            http,
            tls_cert,
            tls_key,
            default_idle_ttl,
            socket_group,
            ..
        } => {
            if json {
                return Err(no_json(
                    "serve",
                    "'vdbfs serve --log-format json' writes its log lines as JSON",
                ));
            }
            crate::daemon::serve(
                &store,
                crate::daemon::ServeOptions {
                    vdb_ports,
                    keep_undo,
                    scrub_every,
                    http,
                    tls: tls_cert.zip(tls_key),
                    default_idle_ttl,
                    socket_group,
                },
            )?
        }
        Cmd::Completions { shell } => {
            if json {
                return Err(no_json("completions", "leave out --json"));
            }
            docs::completions(shell, &mut Cli::command());
        }
        Cmd::Manpages { dir } => {
            let written = docs::manpages(&absolute(&dir)?, Cli::command())?;
            if json {
                print_json(&written)?;
            } else {
                for p in written {
                    println!("{}", p.display());
                }
            }
        }
        Cmd::Status => {
            let r = run_req(&store, Request::Status)?;
            if json {
                println!("{}", r.data);
            } else {
                print_status(&serde_json::from_value(r.data)?);
            }
        }
        Cmd::Scrub { rate } => {
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
            if !rep.bad_blocks.is_empty() && json {
                // The report printed above is the one JSON object of this command; it lists
                // the bad blocks, so no error object follows it. Still a failure: exit 1.
                eprintln!(
                    "vdbfs: error: scrub found {} bad block(s) (in the report): their data is lost",
                    rep.bad_blocks.len()
                );
                std::process::exit(ErrorKind::Internal.exit_code());
            }
            if !rep.bad_blocks.is_empty() {
                return Err(Refusal::new(
                    ErrorKind::Internal,
                    format!(
                        "scrub found {} bad block(s) (listed above): their data is lost",
                        rep.bad_blocks.len()
                    ),
                )
                .with_hint(
                    "restore what references them (delete or reset those datasets, or rewrite \
                     the files), and check the disk"
                        .to_string(),
                )
                .into());
            }
        }
        Cmd::Dataset { cmd } => match cmd {
            DatasetCmd::Create { name } => {
                say(json, &run_req(&store, Request::DatasetCreate { name })?)
            }
            DatasetCmd::Delete {
                name,
                with_snapshots,
            } => say(
                json,
                &run_req(
                    &store,
                    Request::DatasetDelete {
                        name,
                        with_snapshots,
                    },
                )?,
            ),
            DatasetCmd::List => {
                let r = run_req(&store, Request::DatasetList)?;
                if json {
                    println!("{}", r.data);
                } else {
                    let list: Vec<DatasetInfo> = serde_json::from_value(r.data)?;
                    println!(
                        "{:<24} {:>5} {:<21} {:<40} ORIGIN",
                        "NAME", "ID", "CREATED", "MOUNTPOINT"
                    );
                    for d in list {
                        let mp = d
                            .mountpoint
                            .map_or("-".to_string(), |p| p.display().to_string());
                        println!(
                            "{:<24} {:>5} {:<21} {:<40} {}",
                            d.name,
                            d.id,
                            d.created,
                            mp,
                            opt(&d.origin)
                        );
                        if let Some(f) = d.fault {
                            println!("  FAULT: {f}");
                        }
                    }
                }
            }
            DatasetCmd::AcceptDamage { name } => say(
                json,
                &run_req(&store, Request::DatasetAcceptDamage { name })?,
            ),
        },
        Cmd::Mount {
            dataset,
            mountpoint,
            nonempty,
        } => {
            let mountpoint = absolute(&mountpoint)?;
            say(
                json,
                &run_req(
                    &store,
                    Request::Mount {
                        dataset,
                        mountpoint,
                        nonempty,
                    },
                )?,
            );
        }
        Cmd::Snapshot { cmd } => match cmd {
            SnapshotCmd::Create { dataset, name } => say(
                json,
                &run_req(&store, Request::SnapshotCreate { dataset, name })?,
            ),
            SnapshotCmd::Publish { name } => {
                say(json, &run_req(&store, Request::SnapshotPublish { name })?)
            }
            SnapshotCmd::Delete { name } => {
                say(json, &run_req(&store, Request::SnapshotDelete { name })?)
            }
            SnapshotCmd::List { dataset } => {
                let r = run_req(&store, Request::SnapshotList { dataset })?;
                if json {
                    println!("{}", r.data);
                } else {
                    let list: Vec<api::SnapshotInfo> = serde_json::from_value(r.data)?;
                    print_snapshots(&list);
                }
            }
        },
        Cmd::Clone { snapshot, name } => {
            say(json, &run_req(&store, Request::Clone { snapshot, name })?)
        }
        Cmd::Gc => say(json, &run_req(&store, Request::Gc)?),
        Cmd::Df => {
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
            cmd: EnvCmd::Discover,
        } => {
            let env = crate::pg::discover::discover();
            if json {
                print_json(&env)?;
            } else {
                println!("installations:");
                for i in &env.installations {
                    println!(
                        "  PostgreSQL {:<8} (major {:>2}) {}",
                        i.version,
                        i.major,
                        i.bin_dir.display()
                    );
                }
                println!("clusters:");
                for c in &env.clusters {
                    println!(
                        "  {:<48} version {:<4} port {:<6} {:<8} pid {:<8} {}",
                        c.data_dir.display(),
                        opt(&c.version),
                        opt(&c.port),
                        if c.running { "running" } else { "stopped" },
                        opt(&c.pid),
                        c.role
                    );
                }
            }
        }
        Cmd::Source { cmd } => run_source(&store, cmd, json)?,
        Cmd::Vdb { cmd } => vdb::run(&store, cmd, json)?,
        Cmd::Timeflow { dataset } => vdb::timeflow(&store, dataset, json)?,
        Cmd::Token { cmd } => run_token(&store, cmd, json)?,
        Cmd::Umount { mountpoint } => {
            let mountpoint = absolute(&mountpoint)?;
            say(json, &run_req(&store, Request::Umount { mountpoint })?);
        }
    }
    Ok(())
}

fn run_token(store: &Path, cmd: TokenCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create {
            name,
            role,
            expires,
        } => {
            let role = if role == "admin" {
                api::Role::Admin
            } else {
                api::Role::Developer
            };
            let r = run_req(
                store,
                Request::TokenCreate {
                    name: name.clone(),
                    role,
                    expires,
                },
            )?;
            say(json, &r);
            if !json {
                eprintln!(
                    "vdbfs: API token {name} ({role}) created; it is shown only this once \
                     (VDBFS_URL=http[s]://HOST:PORT VDBFS_TOKEN=... vdbfs ... uses it)"
                );
            }
        }
        TokenCmd::List => {
            let r = run_req(store, Request::TokenList)?;
            if json {
                println!("{}", r.data);
            } else {
                let list: Vec<api::TokenInfo> = serde_json::from_value(r.data)?;
                println!("{:<24} {:<10} {:<21} EXPIRES", "NAME", "ROLE", "CREATED");
                for t in list {
                    println!(
                        "{:<24} {:<10} {:<21} {}{}",
                        t.name,
                        t.role,
                        t.created,
                        t.expires.as_deref().unwrap_or("never"),
                        if t.expired { " (expired)" } else { "" }
                    );
                }
            }
        }
        TokenCmd::Revoke { name } => say(json, &run_req(store, Request::TokenRevoke { name })?),
    }
    Ok(())
}

/// `snapshot list`: every field of the JSON that is not part of the name.
fn print_snapshots(list: &[api::SnapshotInfo]) {
    println!(
        "{:<48} {:<20} {:<18} {:>12} {:>3}  {:<9} {:<8} REPLAY TIME",
        "NAME", "CREATED", "KIND", "LSN", "TL", "PREPARED", "VERIFIED"
    );
    for s in list {
        let kind = match (&s.kind, &s.mode) {
            (Some(k), _) => k.to_string(),
            (None, Some(m)) => format!("sync/{m}"),
            (None, None) => "-".into(),
        };
        println!(
            "{:<48} {:<20} {:<18} {:>12} {:>3}  {:<9} {:<8} {}{}",
            s.name,
            s.created,
            kind,
            opt(&s.lsn),
            opt(&s.timeline),
            opt(&s.marks.prepared),
            opt(&s.marks.verified),
            opt(&s.replay_time),
            s.marks
                .verify_failures
                .first()
                .map(|f| format!(" ({f})"))
                .unwrap_or_default()
        );
    }
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
            "  {} snapshot(s); last {} at LSN {} (timeline {}, {}), replayed up to {}, {}; prepared {}, verified {}{}",
            s.snapshots,
            l.name,
            l.lsn,
            l.timeline,
            l.mode,
            opt(&l.replay_time),
            l.created,
            opt(&l.marks.prepared),
            opt(&l.marks.verified),
            l.marks
                .verify_failures
                .first()
                .map(|f| format!(" ({f})"))
                .unwrap_or_default()
        ),
        None => println!("  {} snapshot(s)", s.snapshots),
    }
    for r in &s.ranges {
        println!("  provisionable (vdb create --at): {r}");
    }
    println!(
        "  WAL kept in the store: {} file(s), {}",
        s.wal_archive_files,
        human(s.wal_archive_bytes)
    );
    let every = s
        .snapshot_every_secs
        .map_or("on demand".to_string(), |x| format!("every {x} s"));
    let keep = match (s.keep, s.keep_for_secs) {
        (Some(n), _) => format!("keeps the last {n}"),
        (None, Some(secs)) => format!("keeps {secs} s"),
        (None, None) => "keeps all".into(),
    };
    println!("  snapshots {every}; {keep}");
    if s.restarts > 0 {
        println!("  staging restarted {} time(s) after a crash", s.restarts);
    }
}

/// `vdbfs init`: a new store in a new or empty directory; anything else is refused before a
/// byte changes.
fn init(
    store: &Path,
    json: bool,
    remote: Option<crate::remote::RemoteConfig>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if crate::store::index_path(store).exists() {
        return Err(Refusal::new(
            ErrorKind::Conflict,
            format!("{} already holds a vdbfs store", store.display()),
        )
        .with_hint(format!(
            "serve it with 'vdbfs serve --store {}'",
            store.display()
        ))
        .into());
    }
    let existing = match std::fs::metadata(store) {
        Ok(m) if !m.is_dir() => {
            return Err(Refusal::new(
                ErrorKind::Invalid,
                format!(
                    "{} exists and is not a directory; choose another --store",
                    store.display()
                ),
            )
            .into())
        }
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
            return Err(Refusal::new(
                ErrorKind::Invalid,
                format!(
                    "{} is not empty ({}, e.g. {:?}) and holds no vdbfs store; vdbfs init needs a \
                     new or empty directory: choose another --store",
                    store.display(),
                    crate::mounts::entries_text(entries.len()),
                    entries[0]
                ),
            )
            .into());
        }
    }
    crate::store::Store::create(store)
        .with_context(|| format!("cannot create a store in {}", store.display()))?;
    if let Some(r) = &remote {
        r.save(store)?;
    }
    if json {
        print_json(&serde_json::json!({ "store": store, "remote": remote }))?;
    } else {
        println!("initialized an empty vdbfs store in {}", store.display());
        if let Some(r) = &remote {
            println!(
                "  remote {} (store id {}); credentials from AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, or the AWS profile (AWS_PROFILE, ~/.aws/credentials), \
                 where 'vdbfs serve' runs",
                r.url, r.store_id
            );
        }
    }
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

fn print_remote_status(s: &crate::remote::RemoteStatus) {
    println!(
        "remote {} (store id {}{})",
        s.url,
        s.store_id,
        s.endpoint
            .as_deref()
            .map(|e| format!(", endpoint {e}"))
            .unwrap_or_default()
    );
    println!(
        "  upload backlog: {} pack(s), {}; {} uploaded since start, {} published",
        s.backlog_packs,
        human(s.backlog_bytes),
        s.uploaded_packs,
        s.published
    );
    println!(
        "  fetched: {} block(s), {}",
        s.fetched_blocks,
        human(s.fetched_bytes)
    );
    println!("  {}", cache_line(&s.cache));
    match &s.last_gc {
        Some(g) => println!(
            "  last remote gc: {} (grace {}s): {} object(s), {} deleted; {} kept",
            g.finished.as_deref().unwrap_or(&g.started),
            g.grace_s,
            g.deleted_objects,
            human(g.deleted_bytes),
            g.kept
        ),
        None => println!("  last remote gc: never"),
    }
    if let Some(e) = &s.last_error {
        println!(
            "  failing ({} time(s) in a row, retrying with backoff): {e}",
            s.failures
        );
    }
}

fn cache_line(c: &crate::remote::cache::CacheStatus) -> String {
    format!(
        "cache: {} of {} in {} block(s); {} hit(s), {} miss(es), {} eviction(s) ({})",
        human(c.bytes),
        c.limit.map_or("no limit".to_string(), human),
        c.blocks,
        c.hits,
        c.misses,
        c.evictions,
        human(c.evicted_bytes)
    )
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
    if let Some(r) = &s.remote {
        println!(
            "  remote {}: upload backlog {} pack(s), {}{}",
            r.url,
            r.backlog_packs,
            human(r.backlog_bytes),
            r.last_error
                .as_deref()
                .map(|e| format!("; failing, retrying: {e}"))
                .unwrap_or_default()
        );
        println!("    {}", cache_line(&r.cache));
    }
    for f in &s.faults {
        println!("  FAULT: {f}");
    }
}

fn run_source(store: &Path, cmd: SourceCmd, json: bool) -> anyhow::Result<()> {
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
            verify,
        } => {
            let passfile = passfile.map(|p| absolute(&p)).transpose()?;
            let env = libpq::resolve(
                conn.as_deref(),
                passfile.as_deref(),
                mode != "log-shipping",
                &libpq::Env::from_process(),
            )?;
            let spec = api::LinkSpec {
                name,
                conn: env.conn,
                password: env.password,
                passfile: env.passfile,
                mode: Some(mode),
                backup: backup.map(|p| absolute(&p)).transpose()?,
                archive: archive.map(|p| absolute(&p)).transpose()?,
                staging_port,
                slot,
                snapshot_every,
                keep,
                keep_for,
                pg_bin: pg_bin.map(|p| absolute(&p)).transpose()?,
                verify,
            };
            say(json, &run_req(store, Request::SourceLink(Box::new(spec)))?);
        }
        SourceCmd::List => {
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
        SourceCmd::Status { name } => {
            let r = run_req(store, Request::SourceStatus { name })?;
            if json {
                println!("{}", r.data);
            } else {
                print_source(&serde_json::from_value(r.data)?);
            }
        }
        SourceCmd::Snapshot { name, snapshot } => {
            say(
                json,
                &run_req(store, Request::SourceSnapshot { name, snapshot })?,
            );
        }
        SourceCmd::Set { name, verify } => {
            say(
                json,
                &run_req(
                    store,
                    Request::SourceSet {
                        name,
                        verify: verify.map(|v| v == "on"),
                    },
                )?,
            );
        }
        SourceCmd::Disable { name } => say(json, &run_req(store, Request::SourceDisable { name })?),
        SourceCmd::Enable { name } => say(json, &run_req(store, Request::SourceEnable { name })?),
        SourceCmd::Unlink {
            name,
            delete_snapshots,
            force,
        } => say(
            json,
            &run_req(
                store,
                Request::SourceUnlink {
                    name,
                    delete_snapshots,
                    force,
                },
            )?,
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command and every option says what it is for (`--help`, man pages,
    /// completions); clap's own checks of the definitions pass.
    #[test]
    fn every_command_and_flag_has_help_text() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", c.get_name());
            if c.get_about().is_none() && path != "vdbfs" {
                missing.push(format!("command `{}`", path.trim()));
            }
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("`{}` argument {id}", path.trim()));
                }
            }
            for s in c.get_subcommands() {
                walk(s, &path, missing);
            }
        }
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
        let hidden: Vec<String> = cmd
            .get_subcommands()
            .flat_map(|s| s.get_subcommands().chain(std::iter::once(s)))
            .flat_map(|s| s.get_arguments())
            .filter(|a| a.is_hide_set())
            .map(|a| a.get_id().to_string())
            .collect();
        assert!(hidden.is_empty(), "hidden arguments: {hidden:?}");
    }

    #[test]
    fn refresh_help_says_older_snapshots_are_allowed() {
        let mut cmd = Cli::command();
        let vdb = cmd.find_subcommand_mut("vdb").unwrap();
        let refresh = vdb.find_subcommand_mut("refresh").unwrap();
        let about = refresh.get_about().unwrap().to_string();
        assert!(about.contains("newer or older"), "{about}");
    }
}
