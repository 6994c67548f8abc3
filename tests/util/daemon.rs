//! A vdbfs store in a temporary directory with its daemon ([`Daemon`]): start, restart, crash,
//! the CLI against it, and cleanup that cannot wedge.

use super::*;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", COUNTER.fetch_add(1, Ordering::SeqCst))
}

// ---------------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------------

/// The line the harness writes into the daemon log before each `vdbfs serve`.
const SERVE_HEADER: &str = "=== test harness: vdbfs serve starting ===";

/// What the daemon logs once its supervisor finished the first round after a start (recovery
/// done, wanted staging standbys and VDBs started or tried).
pub const SUPERVISED: &str = "supervisor: first round done";

/// A vdbfs store in a fresh temporary directory and a running `vdbfs serve` on it.
pub struct Daemon {
    root: tempfile::TempDir,
    store: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    /// Mount points made through this daemon (by [`Daemon::create_and_mount`] or [`Daemon::mount`]).
    mounts: Mutex<Vec<PathBuf>>,
    /// This daemon's VDB port pool (`LO-HI`), apart from other tests' daemons running at once.
    vdb_ports: String,
    /// More `vdbfs serve` arguments (see [`Daemon::restart_with`]).
    serve_args: Vec<String>,
    /// More environment for the next `vdbfs serve` (e.g. `VDBFS_SCRUB_EVERY`).
    serve_env: Vec<(String, String)>,
}

/// A 20-port window below the ephemeral range, different for each daemon of this run: two tests'
/// daemons picking from one pool could both choose a port before either postgres binds it.
fn vdb_port_window() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let lo = 12_000 + (std::process::id() as usize * 140 + n * 20) % 18_000;
    format!("{lo}-{}", lo + 19)
}

impl Daemon {
    /// Inits a new store in a temporary directory and starts `vdbfs serve` on it.
    pub fn start() -> Daemon {
        require_root_fuse();
        let root = tempdir("vdbfs-test-");
        let store = root.path().join("store");
        Daemon::start_with(root, store)
    }

    /// Like [`Daemon::start`], with the store at a given path (e.g. on a small tmpfs). The path
    /// must not be a store yet; `vdbfs init` creates it.
    pub fn start_at(store: &Path) -> Daemon {
        require_root_fuse();
        let root = tempdir("vdbfs-test-");
        Daemon::start_with(root, store.to_path_buf())
    }

    /// Like [`Daemon::start`], with more `vdbfs init` arguments (e.g. `--remote ...`) and
    /// environment for `vdbfs serve` (e.g. the AWS credentials).
    pub fn start_init(init_args: &[String], env: &[(String, String)]) -> Daemon {
        require_root_fuse();
        let root = tempdir("vdbfs-test-");
        let store = root.path().join("store");
        Daemon::start_full(root, store, init_args, env)
    }

    fn start_with(root: tempfile::TempDir, store: PathBuf) -> Daemon {
        Daemon::start_full(root, store, &[], &[])
    }

    fn start_full(
        root: tempfile::TempDir,
        store: PathBuf,
        init_args: &[String],
        env: &[(String, String)],
    ) -> Daemon {
        let log_path = root.path().join("daemon.log");
        fs::create_dir_all(root.path().join("mnt")).unwrap();
        chmod(&root.path().join("mnt"), 0o755);
        let mut d = Daemon {
            root,
            store,
            log_path,
            child: None,
            mounts: Mutex::new(Vec::new()),
            vdb_ports: vdb_port_window(),
            serve_args: Vec::new(),
            serve_env: env.to_vec(),
        };
        let mut args = vec!["init"];
        args.extend(init_args.iter().map(|s| s.as_str()));
        d.ok(&args);
        d.spawn_serve();
        d
    }

    /// Sets an environment variable for the next start of `vdbfs serve` ([`Daemon::restart`],
    /// [`Daemon::start_again`]).
    pub fn set_serve_env(&mut self, key: &str, value: &str) {
        self.serve_env.retain(|(k, _)| k != key);
        self.serve_env.push((key.to_string(), value.to_string()));
    }

    /// The VDB port pool this daemon was started with (`vdbfs serve --vdb-ports`).
    pub fn vdb_ports(&self) -> (u16, u16) {
        let (lo, hi) = self.vdb_ports.split_once('-').expect("LO-HI");
        (lo.parse().unwrap(), hi.parse().unwrap())
    }

    /// The temporary directory holding the store, mount points and logs.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    pub fn store(&self) -> &Path {
        &self.store
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// A fresh, not yet existing mount point path under the test's temporary directory.
    pub fn new_mountpoint(&self, name: &str) -> PathBuf {
        self.root.path().join("mnt").join(unique(name))
    }

    fn spawn_serve(&mut self) {
        assert!(
            self.child.is_none(),
            "spawn_serve with a daemon still running"
        );
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open daemon log");
        let mut header = log.try_clone().unwrap();
        let _ = writeln!(header, "{SERVE_HEADER}");
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--store")
            .arg(&self.store)
            .args(&self.serve_args)
            .env_remove("VDBFS_STORE")
            .env("VDBFS_VDB_PORTS", &self.vdb_ports)
            .envs(self.serve_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("spawn vdbfs serve");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits (bounded) until `vdbfs status` answers; panics with the daemon log otherwise.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    panic!(
                        "vdbfs serve exited ({st}) before answering; daemon log:\n{}",
                        self.log()
                    );
                }
            }
            let out = self.vdbfs(&["status"]);
            if out.status.success() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "vdbfs serve did not answer `vdbfs status` within {READY_TIMEOUT:?}\nlast status: {}\ndaemon log:\n{}",
                    describe(&out),
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Like [`Daemon::restart`], serving with more arguments (e.g. `--keep-undo 1`) and
    /// environment (e.g. `VDBFS_LOG=debug`) from now on.
    pub fn restart_with(&mut self, args: &[&str], env: &[(&str, &str)]) {
        self.serve_args = args.iter().map(|a| a.to_string()).collect();
        self.serve_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.restart();
    }

    /// The daemon's log since it was last started.
    pub fn log_since_start(&self) -> String {
        let log = self.log();
        let start = log.rfind(SERVE_HEADER).unwrap_or(0);
        log[start..].to_string()
    }

    /// SIGTERM, wait (bounded) for a clean exit 0, then serve again on the same store.
    pub fn restart(&mut self) {
        self.terminate();
        self.spawn_serve();
    }

    /// SIGTERM the daemon and wait (bounded) for it to exit; asserts the exit status is 0.
    pub fn terminate(&mut self) {
        let mut c = self.child.take().expect("terminate: no daemon running");
        signal(c.id() as i32, libc::SIGTERM);
        match wait_child(&mut c, Duration::from_secs(60)) {
            Some(st) => assert!(
                st.success(),
                "vdbfs serve exited with {st} after SIGTERM (expected 0); daemon log:\n{}",
                self.log()
            ),
            None => {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "vdbfs serve did not exit within 60 s of SIGTERM; daemon log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// SIGKILL the daemon (a simulated crash) and reap it. Its mounts are left stale (ENOTCONN).
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("kill9: no daemon running");
        signal(c.id() as i32, libc::SIGKILL);
        let _ = c.wait();
    }

    /// Serve again on the same store (after [`Daemon::kill9`] or [`Daemon::terminate`]).
    pub fn start_again(&mut self) {
        self.spawn_serve();
    }

    /// A CLI command for this store, environment cleaned: no VDBFS_STORE, none of libpq's
    /// variables, and HOME in the test's directory (so no real ~/.pgpass is read).
    pub fn command(&self) -> Command {
        let mut c = Command::new(bin());
        clean_cli_env(&mut c);
        c.env("HOME", self.root.path())
            .arg("--store")
            .arg(&self.store);
        c
    }

    /// Runs `vdbfs --store STORE ARGS...` with a bounded wait.
    pub fn vdbfs(&self, args: &[&str]) -> Output {
        run_timeout(self.command().args(args), COMMAND_TIMEOUT)
    }

    /// Runs the CLI, asserts exit 0 (panicking with stderr and the daemon log), returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.vdbfs(args);
        assert!(
            out.status.success(),
            "`vdbfs --store {} {}` failed\n{}\ndaemon log tail:\n{}",
            self.store.display(),
            args.join(" "),
            describe(&out),
            tail(&self.log_path, 40)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The daemon's stderr so far (all runs on this store).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path, n)
    }

    /// Waits (bounded) until the log of the daemon started last has a line containing `what`;
    /// panics with that log otherwise.
    #[track_caller]
    pub fn wait_log_since_start(&self, what: &str, timeout: Duration) {
        let since_start = || {
            let log = self.log();
            let start = log.rfind(SERVE_HEADER).unwrap_or(0);
            log[start..].to_string()
        };
        assert!(
            wait_until(timeout, || since_start().contains(what)),
            "the daemon did not log {what:?} within {timeout:?}; its log since it started:\n{}",
            since_start()
        );
    }

    /// `vdbfs status --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let s = self.ok(&["status", "--json"]);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {s}"))
    }

    /// `vdbfs dataset create NAME`.
    pub fn create_dataset(&self, dataset: &str) {
        self.ok(&["dataset", "create", dataset]);
    }

    /// `vdbfs mount DATASET MOUNTPOINT`, recorded for cleanup.
    pub fn mount(&self, dataset: &str, mountpoint: &Path) -> Mount {
        self.ok(&["mount", dataset, mountpoint.to_str().unwrap()]);
        assert!(
            is_mounted(mountpoint),
            "`vdbfs mount {dataset} {}` exited 0 but the mount point is not in /proc/self/mountinfo",
            mountpoint.display()
        );
        self.mounts.lock().unwrap().push(mountpoint.to_path_buf());
        Mount {
            path: mountpoint.to_path_buf(),
            dataset: dataset.to_string(),
            store: self.store.clone(),
        }
    }

    /// `dataset create` + `mount` at a fresh directory under the test's temp dir.
    pub fn create_and_mount(&self, dataset: &str) -> Mount {
        self.create_dataset(dataset);
        let mp = self.new_mountpoint(dataset);
        self.mount(dataset, &mp)
    }

    /// Waits (bounded) until the mount point is a live mount again (e.g. after a restart, when
    /// the daemon re-establishes recorded mounts itself).
    pub fn wait_mounted(&self, mountpoint: &Path, timeout: Duration) {
        let ok = wait_until(timeout, || {
            is_mounted(mountpoint) && statfs(mountpoint).is_ok() && fs::metadata(mountpoint).is_ok()
        });
        assert!(
            ok,
            "{} was not a live mount within {timeout:?} (mounted: {}, {})\ndaemon log tail:\n{}",
            mountpoint.display(),
            is_mounted(mountpoint),
            stat_says(mountpoint),
            tail(&self.log_path, 40)
        );
    }

    fn cleanup_mounts(&self) {
        let mut mps: Vec<PathBuf> = self.mounts.lock().unwrap().clone();
        // Anything mounted under our temp dir (e.g. re-established by the daemon, or made by a
        // mount helper) goes too, deepest first.
        for m in mountinfo() {
            if m.mountpoint.starts_with(self.root.path()) && !mps.contains(&m.mountpoint) {
                mps.push(m.mountpoint);
            }
        }
        mps.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        let alive = self.child.is_some();
        for mp in mps {
            // A path can be stacked several times (a stale mount under a live one).
            for _ in 0..4 {
                if !is_mounted(&mp) {
                    break;
                }
                if alive && !is_stale(&mp) {
                    let out = run_timeout(
                        self.command().arg("umount").arg(&mp),
                        Duration::from_secs(30),
                    );
                    if out.status.success() && !is_mounted(&mp) {
                        continue;
                    }
                }
                lazy_umount(&mp);
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.cleanup_mounts();
        if let Some(mut c) = self.child.take() {
            signal(c.id() as i32, libc::SIGTERM);
            if wait_child(&mut c, Duration::from_secs(30)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // A killed daemon leaves stale mounts; never let TempDir's removal walk into a mount.
        for m in mountinfo() {
            if m.mountpoint.starts_with(self.root.path()) {
                lazy_umount(&m.mountpoint);
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- vdbfs daemon log tail ({}) ---\n{}",
                self.log_path.display(),
                tail(&self.log_path, 60)
            );
        }
    }
}
