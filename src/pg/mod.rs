//! PostgreSQL orchestration (control path): local installations, programs run as the `postgres`
//! OS user with bounded waits, `pg_ctl` start/stop, SQL over the cluster's unix socket, and
//! configuration files. `managed` is the one lifecycle of a postgres the daemon runs (staging
//! standbys and VDBs alike: start, stop, PID file, leftovers, restart backoff), `ports` the one
//! port picker, `conninfo` connection strings (tokio_postgres parses them; passwords are kept
//! out), `discover` the host's installations and clusters.
//!
//! Invariants: every external program runs with a deadline and a cleaned `PG*` environment;
//! passwords never appear on a command line (libpq reads them from a passfile); every failure
//! message names the program and carries its output (or the server log tail).

pub mod conf;
pub mod conninfo;
pub mod discover;
pub mod lsn;
pub mod managed;
pub mod ports;
pub mod provision;

use anyhow::{anyhow, bail, Context};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's postgresql-NN packages put their binaries: `/usr/lib/postgresql/NN/bin`.
pub const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// A local PostgreSQL installation (a `bin` directory with `postgres`, `pg_ctl`, ...).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Install {
    pub bin_dir: PathBuf,
    /// e.g. "15.14"
    pub version: String,
    pub major: u32,
}

/// "postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)" -> ("15.14", 15)
pub fn parse_version(s: &str) -> Option<(String, u32)> {
    let v = s.split_whitespace().find(|w| {
        w.chars().next().is_some_and(|c| c.is_ascii_digit())
            && w.chars().all(|c| c.is_ascii_digit() || c == '.')
    })?;
    let major = v.split('.').next()?.parse().ok()?;
    Some((v.to_string(), major))
}

impl Install {
    /// Asks `BIN_DIR/postgres --version`.
    pub fn probe(bin_dir: &Path) -> anyhow::Result<Install> {
        let postgres = bin_dir.join("postgres");
        let out = run(
            Command::new(&postgres).arg("--version"),
            Duration::from_secs(20),
        )
        .with_context(|| {
            format!(
                "{} is not a PostgreSQL installation (no working {})",
                bin_dir.display(),
                postgres.display()
            )
        })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (version, major) = parse_version(&text).ok_or_else(|| {
            anyhow!(
                "cannot read the version of {}: it printed {:?}",
                postgres.display(),
                text.trim()
            )
        })?;
        Ok(Install {
            bin_dir: bin_dir.to_path_buf(),
            version,
            major,
        })
    }

    pub fn bin(&self, program: &str) -> PathBuf {
        self.bin_dir.join(program)
    }

    /// The installation for one major version, from Debian's layout.
    pub fn for_major(major: u32) -> anyhow::Result<Install> {
        let dir = Path::new(DEBIAN_ROOT).join(major.to_string()).join("bin");
        if !dir.join("postgres").exists() {
            crate::refuse!(
                Unavailable,
                "no PostgreSQL {major} binaries here (looked for {}); install postgresql-{major} \
                 (apt-get install postgresql-{major}) or pass --pg-bin DIR",
                dir.display()
            );
        }
        Install::probe(&dir)
    }
}

/// Every installation under [`DEBIAN_ROOT`], newest first.
pub fn installations() -> Vec<Install> {
    let mut v: Vec<Install> = std::fs::read_dir(DEBIAN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let bin = e.path().join("bin");
            bin.join("postgres")
                .exists()
                .then(|| Install::probe(&bin).ok())
                .flatten()
        })
        .collect();
    v.sort_by_key(|i| std::cmp::Reverse(i.major));
    v
}

/// uid and gid of the `postgres` OS user.
pub fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    // SAFETY: getpwnam gets a NUL-terminated name and returns NULL or a pointer to a static
    // struct we read at once.
    let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
    if pw.is_null() {
        crate::refuse!(
            Unavailable,
            "there is no 'postgres' OS user; install the postgresql package (it creates it)"
        );
    }
    // SAFETY: non-null pointer from getpwnam.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// Gives a path to the postgres user.
pub fn chown_postgres(path: &Path) -> anyhow::Result<()> {
    let (uid, gid) = postgres_ids()?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("cannot give {} to the postgres user", path.display()))
}

/// `runuser -u postgres -- PROGRAM`, with no inherited libpq settings.
pub fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    for v in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATA",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGOPTIONS",
    ] {
        c.env_remove(v);
    }
    c.env("LC_ALL", "C").current_dir("/");
    c
}

/// [`as_postgres`], at a lower CPU priority (`nice -n 10`) when `nice`: the program and what it
/// starts (a postmaster and its children) inherit it.
pub fn as_postgres_niced(program: &Path, nice: bool) -> Command {
    if !nice {
        return as_postgres(program);
    }
    let plain = as_postgres(program);
    let mut c = Command::new("nice");
    c.args(["-n", "10"])
        .arg(plain.get_program())
        .args(plain.get_args());
    for (k, v) in plain.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c.current_dir("/");
    c
}

/// Output of a finished program.
pub struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }
}

/// Runs a program to completion within `timeout`; a non-zero exit is an error carrying what it
/// printed. On timeout the program is killed.
pub fn run(cmd: &mut Command, timeout: Duration) -> anyhow::Result<Output> {
    run_with(cmd, timeout, |_| {})
}

/// Like [`run`], handing every line (or `\r`-terminated progress fragment) of stderr to
/// `on_stderr` as it arrives.
pub fn run_with(
    cmd: &mut Command,
    timeout: Duration,
    on_stderr: impl FnMut(&str),
) -> anyhow::Result<Output> {
    let what = describe(cmd);
    let out = run_unchecked(cmd, timeout, on_stderr)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            last_lines(&out.stderr_text(), 10)
        );
    }
    Ok(out)
}

/// Runs a program within `timeout` (killed after it); a non-zero exit is returned, not an error.
pub fn run_unchecked(
    cmd: &mut Command,
    timeout: Duration,
    on_stderr: impl FnMut(&str),
) -> anyhow::Result<Output> {
    run_inner(cmd, timeout, |_| Ok(()), on_stderr)
}

/// Like [`run_with`], for a long-running program that must not outlive a daemon crash unnoticed:
/// it runs in a process group of its own, whose id is kept in `pid_file` while it runs, so the
/// next daemon can stop it ([`stop_recorded`]).
pub fn run_recorded(
    cmd: &mut Command,
    timeout: Duration,
    pid_file: &Path,
    on_stderr: impl FnMut(&str),
) -> anyhow::Result<Output> {
    use std::os::unix::process::CommandExt;
    let what = describe(cmd);
    cmd.process_group(0);
    let out = run_inner(
        cmd,
        timeout,
        |pid| {
            std::fs::write(pid_file, format!("{pid}\n"))
                .with_context(|| format!("cannot write {}", pid_file.display()))
        },
        on_stderr,
    );
    let _ = std::fs::remove_file(pid_file);
    let out = out?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            last_lines(&out.stderr_text(), 10)
        );
    }
    Ok(out)
}

/// Stops (SIGKILL to its whole process group) a program that [`run_recorded`] started under a
/// daemon that died, if any process of that group still runs and its command line contains
/// `marker` (the group leader, e.g. `runuser`, may be gone while the program itself runs on; a
/// process group id is not reused while any member lives). Waits up to 10 s for them to go.
pub fn stop_recorded(pid_file: &Path, marker: &str) {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return;
    };
    let pgid = text
        .split_whitespace()
        .next()
        .and_then(|p| p.parse::<i32>().ok())
        .unwrap_or(0);
    let members = || -> Vec<i32> {
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| {
                pid_alive(pid)
                    && proc_stat(pid).and_then(|f| f.get(2)?.parse::<i32>().ok()) == Some(pgid)
            })
            .collect()
    };
    let ours = members().into_iter().any(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        String::from_utf8_lossy(&cmdline).contains(marker)
    });
    if pgid > 1 && ours {
        tracing::warn!(pgid, "stopping a leftover {marker} of a daemon that died");
        // SAFETY: kill(2) of the process group we started, verified to still run `marker`.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !members().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = std::fs::remove_file(pid_file);
}

fn run_inner(
    cmd: &mut Command,
    timeout: Duration,
    on_spawn: impl FnOnce(u32) -> anyhow::Result<()>,
    mut on_stderr: impl FnMut(&str),
) -> anyhow::Result<Output> {
    let what = describe(cmd);
    tracing::debug!(command = %what, "running");
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    if let Err(e) = on_spawn(child.id()) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{what} started without its output pipes");
    };
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let (tx, rx) = crossbeam::channel::unbounded::<Vec<u8>>();
    let err_reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        loop {
            match err.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    for &b in &buf[..n] {
                        if b == b'\n' || b == b'\r' {
                            let _ = tx.send(std::mem::take(&mut line));
                        } else {
                            line.push(b);
                        }
                    }
                }
            }
        }
        if !line.is_empty() {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + timeout;
    let mut stderr = Vec::new();
    let status = loop {
        while let Ok(l) = rx.try_recv() {
            if !l.is_empty() {
                on_stderr(&String::from_utf8_lossy(&l));
                stderr.extend_from_slice(&l);
                stderr.push(b'\n');
            }
        }
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{what} did not finish within {} s and was stopped; it printed: {}",
                timeout.as_secs(),
                last_lines(&String::from_utf8_lossy(&stderr), 10)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = err_reader.join();
    while let Ok(l) = rx.try_recv() {
        if !l.is_empty() {
            on_stderr(&String::from_utf8_lossy(&l));
            stderr.extend_from_slice(&l);
            stderr.push(b'\n');
        }
    }
    let stdout = reader.join().unwrap_or_default();
    tracing::debug!(
        command = %what,
        %status,
        ms = started.elapsed().as_millis() as u64,
        "external command done"
    );
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// The program and its arguments, for messages (never holds secrets: see module invariants).
fn describe(cmd: &Command) -> String {
    let prog = cmd.get_program().to_string_lossy().to_string();
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().to_string())
        .collect();
    // Skip the runuser prefix: the program the user cares about comes after "--".
    match args.iter().position(|a| a == "--") {
        Some(i) if prog == "runuser" || prog == "nice" => args[i + 1..].join(" "),
        _ => std::iter::once(prog)
            .chain(args)
            .collect::<Vec<_>>()
            .join(" "),
    }
}

pub fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of a log file ("" if unreadable).
pub fn log_tail(path: &Path, n: usize) -> String {
    std::fs::read_to_string(path)
        .map(|s| last_lines(&s, n))
        .unwrap_or_default()
}

/// The files of a cluster vdbfs runs that live outside its data directory (so a snapshot or
/// clone of the data never carries them): `run/` (its unix socket), `postgres.log`,
/// `pg_hba.conf`, `pg_ident.conf`.
pub trait RunFiles {
    fn root(&self) -> &Path;
    fn socket_dir(&self) -> PathBuf {
        self.root().join("run")
    }
    fn postgres_log(&self) -> PathBuf {
        self.root().join("postgres.log")
    }
    fn hba(&self) -> PathBuf {
        self.root().join("pg_hba.conf")
    }
    fn ident(&self) -> PathBuf {
        self.root().join("pg_ident.conf")
    }

    /// A handle on the cluster of `data_dir` run with these files.
    fn cluster(&self, install: &Install, data_dir: &Path, port: u16) -> Cluster {
        Cluster {
            install: install.clone(),
            data_dir: data_dir.to_path_buf(),
            socket_dir: self.socket_dir(),
            port,
            log: self.postgres_log(),
            nice: false,
        }
    }

    /// Creates the directory and `run/` (owner postgres, 0700; the parent 0711, so postgres can
    /// only pass through), `pg_hba.conf` with `hba` and an empty `pg_ident.conf`.
    fn create(&self, hba: &str) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for d in [self.root().to_path_buf(), self.socket_dir()] {
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            chown_postgres(&d)?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
        }
        if let Some(parent) = self.root().parent() {
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711))?;
        }
        conf::write_atomic(&self.hba(), hba.as_bytes(), 0o600)?;
        conf::write_atomic(&self.ident(), b"", 0o600)
    }

    /// The `postgresql.auto.conf` settings that make a cluster vdbfs's own: its port on
    /// loopback, these files, and a cluster name.
    fn own_settings(&self, port: u16, cluster_name: String) -> Vec<(&'static str, Option<String>)> {
        let path = |p: PathBuf| Some(p.to_string_lossy().to_string());
        vec![
            ("port", Some(port.to_string())),
            ("listen_addresses", Some("127.0.0.1".into())),
            ("unix_socket_directories", path(self.socket_dir())),
            ("hba_file", path(self.hba())),
            ("ident_file", path(self.ident())),
            ("cluster_name", Some(cluster_name)),
            ("logging_collector", Some("off".into())),
            ("ssl", Some("off".into())),
            // PostgreSQL's advice for copy-on-write filesystems: a zero-filled or recycled WAL
            // segment is rewritten anyway, so preparing one is wasted work.
            ("wal_init_zero", Some("off".into())),
            ("wal_recycle", Some("off".into())),
        ]
    }
}

/// A cluster this host runs for vdbfs: data directory, binaries, port, socket and log places.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub install: Install,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    /// Run its postgres at a lower CPU priority (`nice -n 10`): background work.
    pub nice: bool,
}

/// `pg_ctl start` failed; the message carries the server log tail.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StartError {
    /// The port was bound by another program when postgres tried (it exited because of it).
    pub port_in_use: bool,
    message: String,
}

/// Rows of a simple query, every value as text (NULL = None).
pub type Rows = Vec<Vec<Option<String>>>;

impl Cluster {
    /// `pg_ctl start -w` as the postgres user, bounded by `timeout`; returns the postmaster PID.
    /// On failure the error carries the server log tail.
    /// postgres itself replaces a stale `postmaster.pid` and refuses to start next to a live one.
    /// A failed start is a [`StartError`] (in the error's chain).
    pub fn start(&self, timeout: Duration) -> anyhow::Result<i32> {
        let r = run(
            as_postgres_niced(&self.install.bin("pg_ctl"), self.nice)
                .arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&self.log)
                .args(["-w", "-t", &timeout.as_secs().to_string(), "start"]),
            timeout + Duration::from_secs(15),
        );
        if let Err(e) = r {
            // postgres exits when it cannot bind its port; one that still runs (pg_ctl gave up
            // waiting) holds the port itself.
            let port_in_use = !port_free(self.port) && self.postmaster_pid().is_none();
            return Err(StartError {
                port_in_use,
                message: format!(
                    "postgres on {} did not start: {e:#}\npostgres log ({}):\n{}",
                    self.data_dir.display(),
                    self.log.display(),
                    log_tail(&self.log, 15)
                ),
            }
            .into());
        }
        self.postmaster_pid()
            .ok_or_else(|| anyhow!("postgres started but wrote no postmaster.pid"))
    }

    /// Whether the server log, from byte `from` on, has a line containing `what`: for the few
    /// conditions postgres states only in its log (a FATAL without an error code of its own).
    pub fn log_says(&self, from: u64, what: &str) -> bool {
        use std::io::{Seek, SeekFrom};
        let Ok(mut f) = std::fs::File::open(&self.log) else {
            return false;
        };
        let mut text = String::new();
        f.seek(SeekFrom::Start(from))
            .and_then(|_| f.read_to_string(&mut text))
            .is_ok()
            && text.lines().any(|l| l.contains(what))
    }

    /// The server log's length now (where [`Cluster::log_says`] may start reading).
    pub fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    /// `pg_ctl stop -m MODE -w`, bounded.
    pub fn stop(&self, mode: &str, timeout: Duration) -> anyhow::Result<()> {
        run(
            as_postgres(&self.install.bin("pg_ctl"))
                .arg("-D")
                .arg(&self.data_dir)
                .args([
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    &timeout.as_secs().to_string(),
                    "stop",
                ]),
            timeout + Duration::from_secs(15),
        )
        .map(|_| ())
    }

    /// `pg_ctl promote -w`, bounded: returns once the server left recovery.
    pub fn promote(&self, timeout: Duration) -> anyhow::Result<()> {
        run(
            as_postgres(&self.install.bin("pg_ctl"))
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-w", "-t", &timeout.as_secs().to_string(), "promote"]),
            timeout + Duration::from_secs(15),
        )
        .map(|_| ())
    }

    /// Stops this cluster's postgres. `ours` (started by this daemon) goes with `pg_ctl stop`
    /// (fast, then immediate, then by PID). Otherwise a postmaster found by the `recorded` PID
    /// or `postmaster.pid` was left by a daemon that died: its files are on a dead mount where
    /// pg_ctl could never see it go, so it is stopped by its verified PID and its port awaited.
    pub fn stop_any(&self, ours: Option<i32>, recorded: Option<i32>, what: &str) {
        if let Some(pid) = ours.filter(|p| pid_alive(*p)) {
            if let Err(e) = self.stop("fast", Duration::from_secs(60)) {
                tracing::warn!(what, "fast stop failed ({e:#}); immediate stop");
                if self.stop("immediate", Duration::from_secs(30)).is_err() {
                    stop_leftover(pid, &self.data_dir, what);
                }
            }
            return;
        }
        for pid in recorded.into_iter().chain(self.postmaster_pid()) {
            if stop_leftover(pid, &self.data_dir, what) {
                wait_port_free(self.port, Duration::from_secs(10));
            }
        }
    }

    /// PID in `postmaster.pid`, if that process runs.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let s = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid: i32 = s.lines().next()?.trim().parse().ok()?;
        pid_alive(pid).then_some(pid)
    }

    /// Runs SQL (simple protocol) as the postgres superuser over the unix socket.
    pub fn query(&self, sql: &str, timeout: Duration) -> anyhow::Result<Rows> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.socket_dir)
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .application_name("vdbfs")
            .connect_timeout(Duration::from_secs(5));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let sql = sql.to_string();
        rt.block_on(async move {
            tokio::time::timeout(timeout, async {
                let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
                let task = tokio::spawn(conn);
                let msgs = client.simple_query(&sql).await;
                drop(client);
                let _ = task.await;
                let mut rows = Vec::new();
                for m in msgs? {
                    if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                        rows.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
                    }
                }
                Ok::<_, tokio_postgres::Error>(rows)
            })
            .await
        })
        .map_err(|_| anyhow!("no answer within {} s", timeout.as_secs()))?
        .map_err(|e| match e.as_db_error() {
            Some(db) => anyhow!("{}: {}", db.severity(), db.message()),
            None => anyhow!("{e}"),
        })
    }
}

/// Stops a postmaster left by an earlier daemon (its mount died with that daemon): only a
/// process that is a postgres of `data_dir`, by its PID. SIGQUIT, then SIGKILL after 10 s.
/// Returns whether it stopped one.
pub fn stop_leftover(pid: i32, data_dir: &Path, what: &str) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let data = data_dir.to_string_lossy();
    if !pid_alive(pid) || !cmdline.contains("postgres") || !cmdline.contains(data.as_ref()) {
        return false;
    }
    tracing::warn!(what, pid, "stopping a postgres left by an earlier daemon");
    // SAFETY: plain kill(2) on a PID we verified is that cluster's postmaster.
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if pid_alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    true
}

/// The PID in a pid file vdbfs keeps (first line), if readable.
pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse().ok())
}

/// Whether a process runs (a zombie does not count).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    proc_stat(pid).is_some_and(|f| f[0] != "Z" && f[0] != "X")
}

/// The fields of `/proc/PID/stat` after the command name: state, ppid, ... (never empty).
pub fn proc_stat(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<String> = s
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .map(str::to_string)
        .collect();
    (!fields.is_empty()).then_some(fields)
}

/// Whether a port is free on loopback (nobody listens, we can bind it).
pub fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Waits (bounded) until a port is free: the children of a killed postmaster hold its socket
/// for a moment after it died.
pub fn wait_port_free(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !port_free(port) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes postgres's lock and pid files for a data directory found in a copy (backup, clone).
pub fn remove_run_files(data_dir: &Path) {
    for f in ["postmaster.pid", "postmaster.opts"] {
        let _ = std::fs::remove_file(data_dir.join(f));
    }
}
