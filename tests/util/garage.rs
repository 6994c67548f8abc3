//! A single-node Garage (S3-compatible object store) on loopback for the remote tests
//! ([`Garage`]): its own temporary directory and ports, a bucket and a key made with Garage's
//! CLI, stopped by PID on drop. A missing `garage` binary fails the test loudly
//! (`scripts/test` installs it).

use super::*;

/// Where `scripts/test` installs Garage (also found through `GARAGE_BIN` or `PATH`).
pub const GARAGE_DEFAULT: &str = "/opt/vdbfs-tools/garage-2.5.0/bin/garage";
pub const BUCKET: &str = "vdbfs";
pub const REGION: &str = "garage";
/// The test key, imported into Garage (key ids are "GK" + 24 hex digits).
pub const KEY_ID: &str = "GK0123456789abcdef01234567";
pub const SECRET: &str = "5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7";

pub fn garage_bin() -> PathBuf {
    if let Ok(p) = std::env::var("GARAGE_BIN") {
        return PathBuf::from(p);
    }
    if Path::new(GARAGE_DEFAULT).exists() {
        return PathBuf::from(GARAGE_DEFAULT);
    }
    if let Ok(path) = std::env::var("PATH") {
        for d in path.split(':') {
            let p = Path::new(d).join("garage");
            if p.exists() {
                return p;
            }
        }
    }
    panic!(
        "garage (the S3-compatible object store the remote tests run on) is not installed: \
         expected {GARAGE_DEFAULT}, GARAGE_BIN or garage on PATH; scripts/test installs it"
    );
}

pub struct Garage {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub s3_port: u16,
    rpc_port: u16,
}

impl Garage {
    /// Starts a node, lays it out, makes bucket [`BUCKET`] and key [`KEY_ID`] with access to it.
    pub fn start() -> Garage {
        garage_bin();
        let dir = tempdir("vdbfs-garage-");
        let s3_port = free_port();
        let rpc_port = free_port();
        let admin_port = free_port();
        let cfg = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"lmdb\"\n\
             replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_secret = \"0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0\"\n\
             [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\n\
             root_domain = \".s3.garage.localhost\"\n\
             [admin]\napi_bind_addr = \"127.0.0.1:{admin_port}\"\n",
            d = dir.path().display()
        );
        fs::write(dir.path().join("garage.toml"), cfg).unwrap();
        let mut g = Garage {
            dir,
            child: None,
            s3_port,
            rpc_port,
        };
        g.spawn();
        let out = g.cli(&["node", "id", "-q"]);
        let id = out.trim().split('@').next().unwrap().to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &id]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&["bucket", "create", BUCKET]);
        g.cli(&["key", "import", "--yes", "-n", "vdbfs-test", KEY_ID, SECRET]);
        g.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            BUCKET,
            "--key",
            "vdbfs-test",
        ]);
        g
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("garage.log"))
            .unwrap();
        let child = Command::new(garage_bin())
            .arg("-c")
            .arg(self.dir.path().join("garage.toml"))
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn garage server");
        self.child = Some(child);
        let port = self.s3_port;
        let up = wait_until(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "garage did not listen on {port}; log:\n{}", self.log());
    }

    /// Runs the garage CLI against this node; asserts success; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut last = String::new();
        // The node needs a moment after start before its RPC answers.
        for _ in 0..30 {
            let out = run_timeout(
                Command::new(garage_bin())
                    .arg("-c")
                    .arg(self.dir.path().join("garage.toml"))
                    .args(args),
                Duration::from_secs(60),
            );
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            last = describe(&out);
            thread::sleep(Duration::from_millis(300));
        }
        panic!(
            "garage {} failed\n{last}\nlog:\n{}",
            args.join(" "),
            self.log()
        );
    }

    pub fn log(&self) -> String {
        tail(&self.dir.path().join("garage.log"), 40)
    }

    /// `s3://vdbfs/PREFIX` and the endpoint, as `vdbfs init` takes them.
    pub fn init_args(&self, prefix: &str) -> Vec<String> {
        vec![
            "--remote".into(),
            format!("s3://{BUCKET}/{prefix}"),
            "--endpoint".into(),
            self.endpoint(),
            "--region".into(),
            REGION.into(),
        ]
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// The credentials, the AWS way (environment only).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET.into()),
        ]
    }

    /// Stops the node (SIGTERM, bounded wait, SIGKILL); its data stays for [`Garage::restart`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id() as i32, libc::SIGTERM);
            if wait_child(&mut c, Duration::from_secs(20)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// An S3 client for the test itself (to look at or damage objects).
    pub fn client(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_region(REGION)
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_access_key_id(KEY_ID)
            .with_secret_access_key(SECRET)
            .build()
            .unwrap()
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("garage log tail:\n{}", self.log());
        }
        self.stop();
    }
}
