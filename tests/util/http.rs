//! The HTTP API as a test reaches it: a daemon serving `--http` on a free loopback port
//! ([`Daemon::start_http`], [`Daemon::serve_http`]), tokens made with the CLI, and requests with
//! or without a token ([`Http`]).

use super::*;

/// What an HTTP request got: its status, its `WWW-Authenticate` header and its body.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub www_authenticate: Option<String>,
    pub body: String,
}

impl Got {
    /// The body as JSON (the control API's reply).
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!("HTTP {} body is not JSON ({e}): {}", self.status, self.body)
        })
    }
}

/// The HTTP API of one daemon.
#[derive(Clone)]
pub struct Http {
    pub base: String,
    /// The CA (PEM) an `https://` base's certificate chains to; None: the public roots.
    pub ca_pem: Option<String>,
}

impl Http {
    fn agent(&self) -> ureq::Agent {
        let mut config = ureq::Agent::config_builder();
        if let Some(pem) = &self.ca_pem {
            let ca = ureq::tls::Certificate::from_pem(pem.as_bytes()).expect("CA PEM");
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&[ca]))
                    .build(),
            );
        }
        config
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into()
    }

    fn got(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Got {
        Self::try_got(r).unwrap_or_else(|e| panic!("HTTP request failed: {e}"))
    }

    fn try_got(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Got, String> {
        let mut r = r.map_err(|e| e.to_string())?;
        Ok(Got {
            status: r.status().as_u16(),
            www_authenticate: r
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: r.body_mut().read_to_string().unwrap_or_default(),
        })
    }

    /// `POST /api/v1/OP` with `body` (raw) and the token, if any.
    pub fn post_raw(&self, token: Option<&str>, op: &str, body: &str) -> Got {
        let mut r = self
            .agent()
            .post(format!("{}/api/v1/{op}", self.base))
            .header("Content-Type", "application/json");
        if let Some(t) = token {
            r = r.header("Authorization", format!("Bearer {t}"));
        }
        Self::got(r.send(body))
    }

    pub fn post(&self, token: Option<&str>, op: &str, body: serde_json::Value) -> Got {
        self.post_raw(token, op, &body.to_string())
    }

    /// `GET PATH` (e.g. `/api/v1/vdb_list`, `/metrics`).
    pub fn get(&self, token: Option<&str>, path: &str) -> Got {
        Self::got(self.get_request(token, path))
    }

    /// `GET PATH`, or why no HTTP answer came (connection refused or reset, TLS failed...).
    pub fn try_get(&self, token: Option<&str>, path: &str) -> Result<Got, String> {
        Self::try_got(self.get_request(token, path))
    }

    fn get_request(
        &self,
        token: Option<&str>,
        path: &str,
    ) -> Result<ureq::http::Response<ureq::Body>, ureq::Error> {
        let mut r = self.agent().get(format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.header("Authorization", format!("Bearer {t}"));
        }
        r.call()
    }
}

impl Daemon {
    /// A new store whose daemon also serves the HTTP API on a free loopback port.
    pub fn start_http() -> (Daemon, Http) {
        let mut d = Daemon::start();
        let http = d.serve_http();
        (d, http)
    }

    /// Restarts the daemon with `--http 127.0.0.1:PORT` (a free port) and returns its API.
    pub fn serve_http(&mut self) -> Http {
        let addr = format!("127.0.0.1:{}", free_port());
        self.restart_with(&["--http", &addr], &[]);
        Http {
            base: format!("http://{addr}"),
            ca_pem: None,
        }
    }

    /// Restarts the daemon with `--http 127.0.0.1:PORT --tls-cert F --tls-key F`: a certificate
    /// for 127.0.0.1 and localhost signed by a test CA made here; the API's `ca_pem` is that CA,
    /// also written to the returned file (for `VDBFS_CA_FILE`).
    pub fn serve_https(&mut self) -> (Http, PathBuf) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "vdbfs test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap();
        let cert = params
            .signed_by(&key, &rcgen::Issuer::from_params(&ca_params, &ca_key))
            .unwrap();
        let dir = self.root().join("tls");
        std::fs::create_dir_all(&dir).unwrap();
        let (ca_file, cert_file, key_file) = (
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem"),
        );
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        self.restart_with(
            &[
                "--http",
                &addr,
                "--tls-cert",
                cert_file.to_str().unwrap(),
                "--tls-key",
                key_file.to_str().unwrap(),
            ],
            &[],
        );
        let http = Http {
            base: format!("https://{addr}"),
            ca_pem: Some(ca.pem()),
        };
        (http, ca_file)
    }

    /// `vdbfs token create NAME --role ROLE [--expires E]` over the socket; the token printed.
    pub fn token(&self, name: &str, role: &str, expires: Option<&str>) -> String {
        let mut args = vec!["token", "create", name, "--role", role];
        if let Some(e) = expires {
            args.extend(["--expires", e]);
        }
        let out = self.ok(&args);
        let token = out.trim().to_string();
        assert!(
            token.starts_with("vdbfs_") && !token.contains('\n'),
            "token create should print the token alone on stdout, got {out:?}"
        );
        token
    }

    /// The CLI talking HTTP (`VDBFS_URL`, `VDBFS_TOKEN`), with a store path where no store is,
    /// so that nothing can go through the socket.
    pub fn vdbfs_http(&self, http: &Http, token: &str, args: &[&str]) -> Output {
        self.vdbfs_http_env(http, token, &[], args)
    }

    /// [`Daemon::vdbfs_http`] with more environment (e.g. `VDBFS_CA_FILE`).
    pub fn vdbfs_http_env(
        &self,
        http: &Http,
        token: &str,
        env: &[(&str, &std::ffi::OsStr)],
        args: &[&str],
    ) -> Output {
        let mut c = Command::new(bin());
        clean_cli_env(&mut c);
        c.envs(env.iter().copied());
        c.env("HOME", self.root())
            .env("VDBFS_URL", &http.base)
            .env("VDBFS_TOKEN", token)
            .arg("--store")
            .arg(self.root().join("no-store-here"))
            .args(args);
        run_timeout(&mut c, COMMAND_TIMEOUT)
    }
}
