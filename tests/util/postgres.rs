//! PostgreSQL 15 clusters run as the `postgres` OS user ([`Postgres`]): initdb, start, stop,
//! kill, psql, pgbench and amcheck, each with a bounded wait.

use super::*;

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// A PostgreSQL 15 cluster run as the `postgres` OS user on a given data directory (typically on
/// a vdbfs mount). Its unix socket, server log and saved postmaster PID live in a temp dir
/// outside the mount, so they survive a dead mount.
pub struct Postgres {
    pub datadir: PathBuf,
    rundir: tempfile::TempDir,
    port: u16,
    /// The postmaster, by PID and start time (see [`ProcId`]).
    pid: Option<ProcId>,
}

/// Path of a PostgreSQL 15 program.
pub fn pg(bin: &str) -> String {
    format!("{PG_BIN}/{bin}")
}

/// Processes of the cluster: the postmaster's children, and anything running in its data
/// directory (backends orphaned by a postmaster that already died have their cwd there).
fn cluster_processes(postmaster: ProcId, datadir: &Path) -> Vec<i32> {
    let mut v = if postmaster.exists() {
        children_of(postmaster.pid)
    } else {
        Vec::new()
    };
    for p in processes_with_cwd(|cwd| cwd == datadir) {
        if p != postmaster.pid && !v.contains(&p) {
            v.push(p);
        }
    }
    v
}

/// How long a cluster's processes may take to go after SIGKILL (an init that reaps late
/// included) before the test fails: generous, since a loaded CI machine is slow, and never a
/// reason to go on while they are there.
const GONE_TIMEOUT: Duration = Duration::from_secs(120);

/// SIGKILL a postmaster, then make sure every process of its cluster is gone (bounded): grace
/// period, SIGQUIT, SIGKILL. The postmaster is named by PID and start time, so a postmaster that
/// already exited on its own (after a PANIC when its filesystem went away) and is a zombie not
/// yet reaped is still recognised and waited for: postgres refuses to start while the PID in
/// postmaster.pid answers kill(pid, 0), which a zombie does. Processes the postmaster started
/// while it was being killed (a crash restart in progress) are found by their working directory.
fn kill_cluster(postmaster: ProcId, datadir: &Path) -> Result<(), String> {
    if postmaster.alive() {
        signal(postmaster.pid, libc::SIGKILL);
    }
    let left = || -> Vec<i32> {
        cluster_processes(postmaster, datadir)
            .into_iter()
            .filter(|p| pid_alive(*p))
            .collect()
    };
    let gone = || !postmaster.alive() && left().is_empty();
    let mut ok = wait_until(Duration::from_secs(10), &gone);
    for (sig, name) in [(libc::SIGQUIT, "SIGQUIT"), (libc::SIGKILL, "SIGKILL")] {
        if ok {
            break;
        }
        let now = left();
        let what: Vec<String> = now.iter().map(|p| describe_pid(*p)).collect();
        eprintln!(
            "postgres processes still running after the postmaster was killed, {name}: {what:?}"
        );
        for c in &now {
            signal(*c, sig);
        }
        ok = wait_until(GONE_TIMEOUT / 2, &gone);
    }
    if !ok {
        let what: Vec<String> = left().iter().map(|p| describe_pid(*p)).collect();
        return Err(format!("postgres processes would not die: {what:?}"));
    }
    if !wait_until(GONE_TIMEOUT, || !postmaster.exists()) {
        return Err(format!(
            "the killed postmaster {} is still an unreaped zombie after {GONE_TIMEOUT:?}: a new \
             postmaster on {} would refuse to start",
            postmaster.pid,
            datadir.display()
        ));
    }
    Ok(())
}

/// A loopback TCP port nobody listens on right now, above the kernel's ephemeral range
/// (32768-60999 by default), each call a different one.
///
/// Regression: ports from `bind(127.0.0.1:0)` are ephemeral ports, which the kernel also hands
/// out as the source port of any outgoing connection (replication, psql over TCP, S3 requests
/// to Garage); a staging standby then failed to start with "Address already in use" when one
/// took its port between the pick and postgres's bind. Ports above the range are never used
/// as source ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = 61_000 + (std::process::id() * 131) % 4_000;
    for _ in 0..4_400 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (61_000 + (base - 61_000 + n) % 4_400) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 61000-65399");
}

/// psql flags the tests use: no psqlrc, quiet, unaligned tuples only, stop at the first error.
pub const PSQL_FLAGS: [&str; 6] = ["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"];

/// A command with a clean environment for libpq (no PGHOST, PGPORT, PGDATA, PGUSER, PGDATABASE;
/// `LC_ALL=C`), run in `/`.
pub fn clean_pg_env(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGDATA")
        .env_remove("PGUSER")
        .env_remove("PGDATABASE")
        .env("LC_ALL", "C")
        .current_dir("/");
    c
}

/// `runuser -u postgres -- PROGRAM ARGS...`: a command run as the postgres OS user with a clean
/// PG* environment.
pub fn as_postgres(program: &str) -> Command {
    let mut c = clean_pg_env("runuser");
    c.args(["-u", "postgres", "--", program]);
    c
}

/// `pg_amcheck --all --install-missing --heapallindexed` (heap + btree) as the postgres user
/// against the server with unix socket directory `host` and `port`. `Err` with its output when
/// it reports anything.
pub fn run_amcheck(host: &Path, port: u16) -> Result<(), String> {
    let out = run_timeout(
        as_postgres(&pg("pg_amcheck")).args([
            "--all",
            "--install-missing",
            "--heapallindexed",
            "-h",
            host.to_str().unwrap(),
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
        ]),
        Duration::from_secs(600),
    );
    if out.status.success() && out.stdout.is_empty() {
        Ok(())
    } else {
        Err(describe(&out))
    }
}

impl Postgres {
    /// `initdb -k` (data checksums) into `datadir` as the postgres user. The directory is created
    /// if needed and given to postgres with mode 0700.
    pub fn initdb(datadir: &Path) -> Postgres {
        require_root_fuse_postgres();
        if !datadir.exists() {
            fs::create_dir(datadir).unwrap_or_else(|e| panic!("mkdir {}: {e}", datadir.display()));
        }
        chown_postgres(datadir);
        chmod(datadir, 0o700);
        let out = run_timeout(
            as_postgres(&pg("initdb")).args([
                "-k",
                "--no-instructions",
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "-D",
                datadir.to_str().unwrap(),
            ]),
            Duration::from_secs(300),
        );
        assert!(
            out.status.success(),
            "initdb -k -D {} failed\n{}",
            datadir.display(),
            describe(&out)
        );
        Postgres::on(datadir)
    }

    /// A handle on an existing data directory (not started).
    pub fn on(datadir: &Path) -> Postgres {
        require_root_fuse_postgres();
        let rundir = tempdir("vdbfs-pg-");
        chown_postgres(rundir.path());
        Postgres {
            datadir: datadir.to_path_buf(),
            rundir,
            port: free_port(),
            pid: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The unix socket directory (outside the mount).
    pub fn socket_dir(&self) -> &Path {
        self.rundir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.rundir.path().join("postgres.log")
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path(), n)
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn postmaster_pid(&self) -> Option<i32> {
        self.pid.map(|p| p.pid)
    }

    fn server_options(&self) -> String {
        format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c wal_init_zero=off -c wal_recycle=off \
             -c max_connections=30 -c shared_buffers=64MB -c fsync=on -c full_page_writes=on \
             -c log_min_messages=warning",
            self.port,
            self.rundir.path().display()
        )
    }

    /// Appends settings to the cluster's postgresql.conf (call before [`Postgres::start`]), e.g.
    /// `wal_level = minimal` or archive settings. Values given on the command line by
    /// `server_options` (port, sockets, listen_addresses, ...) still win.
    pub fn append_conf(&self, lines: &[&str]) {
        let p = self.datadir.join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        for l in lines {
            writeln!(f, "{l}").unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        }
    }

    /// Puts lines at the top of pg_hba.conf, so they win over initdb's `trust` lines (e.g.
    /// `host all all 127.0.0.1/32 scram-sha-256`). Takes effect at the next start or reload.
    pub fn prepend_hba(&self, lines: &[&str]) {
        let p = self.datadir.join("pg_hba.conf");
        let old = fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        let mut new = lines.join("\n");
        new.push('\n');
        new.push_str(&old);
        fs::write(&p, new).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    }

    /// `pg_ctl start -w -t 60`; panics with the server log tail on failure. Saves the
    /// postmaster PID outside the mount.
    pub fn start(&mut self) {
        let out = run_timeout(
            as_postgres(&pg("pg_ctl")).args([
                "-D",
                self.datadir.to_str().unwrap(),
                "-l",
                self.log_path().to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "-o",
                &self.server_options(),
                "start",
            ]),
            Duration::from_secs(90),
        );
        assert!(
            out.status.success(),
            "pg_ctl start -D {} failed\n{}\npostgres log tail:\n{}",
            self.datadir.display(),
            describe(&out),
            self.log_tail(60)
        );
        let pidfile = self.datadir.join("postmaster.pid");
        let s = fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("read {}: {e}", pidfile.display()));
        let pid: i32 = s
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("bad {}: {s:?}", pidfile.display()));
        fs::write(
            self.rundir.path().join("postmaster.pid.saved"),
            format!("{pid}\n"),
        )
        .unwrap();
        let id = ProcId::of(pid).unwrap_or_else(|| {
            panic!(
                "postmaster {pid} of {} is gone right after pg_ctl start -w; postgres log tail:\n{}",
                self.datadir.display(),
                self.log_tail(40)
            )
        });
        self.pid = Some(id);
    }

    /// `pg_ctl stop -m fast -w -t 60`; panics with the log tail on failure.
    pub fn stop(&mut self) {
        let out = run_timeout(
            as_postgres(&pg("pg_ctl")).args([
                "-D",
                self.datadir.to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "stop",
            ]),
            Duration::from_secs(90),
        );
        assert!(
            out.status.success(),
            "pg_ctl stop -D {} failed\n{}\npostgres log tail:\n{}",
            self.datadir.display(),
            describe(&out),
            self.log_tail(60)
        );
        if let Some(pid) = self.pid.take() {
            // Reaped, not just exited: the next start checks the PID in postmaster.pid.
            assert!(
                wait_until(GONE_TIMEOUT, || !pid.exists()),
                "postmaster {} still exists {GONE_TIMEOUT:?} after pg_ctl stop: {}",
                pid.pid,
                describe_pid(pid.pid)
            );
        }
    }

    /// SIGKILL the postmaster by its saved PID (works on a dead mount), then wait (bounded) for
    /// the cluster's other processes to go. Most exit when they notice the postmaster died; a
    /// backend waiting for a lock held by a backend that PANICked never does, so after a grace
    /// period they get what the postmaster would have sent them (SIGQUIT), then SIGKILL.
    pub fn kill9(&mut self) {
        let pid = self.pid.take().expect("kill9: postgres not started");
        kill_cluster(pid, &self.datadir).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Whether the saved postmaster is running.
    pub fn running(&self) -> bool {
        self.pid.is_some_and(|p| p.alive())
    }

    /// A psql command line for this server (database `postgres`, no psqlrc, unaligned tuples).
    pub fn psql_command(&self) -> Command {
        let mut c = as_postgres(&pg("psql"));
        c.args(PSQL_FLAGS).args([
            "-h",
            self.rundir.path().to_str().unwrap(),
            "-p",
            &self.port.to_string(),
            "-d",
            "postgres",
        ]);
        c
    }

    /// Runs SQL; panics (with the server log tail) on error; returns trimmed stdout.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.try_psql(sql);
        assert!(
            out.status.success(),
            "psql -c {sql:?} failed\n{}\npostgres log tail:\n{}",
            describe(&out),
            self.log_tail(40)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn try_psql(&self, sql: &str) -> Output {
        run_timeout(self.psql_command().arg("-c").arg(sql), COMMAND_TIMEOUT)
    }

    /// A pgbench command line for this server; append args, then `postgres` is the database.
    pub fn pgbench_command(&self, args: &[&str]) -> Command {
        let mut c = as_postgres(&pg("pgbench"));
        c.args([
            "-h",
            self.rundir.path().to_str().unwrap(),
            "-p",
            &self.port.to_string(),
        ])
        .args(args)
        .arg("postgres");
        c
    }

    /// Runs pgbench; panics on failure; returns stdout + stderr.
    pub fn pgbench(&self, args: &[&str]) -> String {
        let out = run_timeout(&mut self.pgbench_command(args), Duration::from_secs(600));
        assert!(
            out.status.success(),
            "pgbench {args:?} failed\n{}\npostgres log tail:\n{}",
            describe(&out),
            self.log_tail(40)
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// `pg_amcheck --all` (heap + btree, with heapallindexed); panics on any finding.
    pub fn amcheck(&self) {
        if let Err(e) = run_amcheck(self.rundir.path(), self.port) {
            panic!(
                "pg_amcheck --all reported problems on {}\n{e}\npostgres log tail:\n{}",
                self.datadir.display(),
                self.log_tail(40)
            );
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let Some(pid) = self.pid.take() else {
            return;
        };
        if pid.alive() {
            let c = as_postgres(&pg("pg_ctl"))
                .args([
                    "-D",
                    self.datadir.to_str().unwrap(),
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "30",
                    "stop",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            if let Ok(mut c) = c {
                if wait_child(&mut c, Duration::from_secs(40)).is_none() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
        // The mount may be dead (pg_ctl cannot read postmaster.pid) or the stop hung; and leave
        // no orphaned backend behind either.
        if let Err(e) = kill_cluster(pid, &self.datadir) {
            eprintln!("{e}");
        }
        if std::thread::panicking() {
            eprintln!(
                "--- postgres log tail ({}) ---\n{}",
                self.log_path().display(),
                self.log_tail(60)
            );
        }
    }
}
