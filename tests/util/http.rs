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
}

impl Http {
    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into()
    }

    fn got(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Got {
        let mut r = r.unwrap_or_else(|e| panic!("HTTP request failed: {e}"));
        Got {
            status: r.status().as_u16(),
            www_authenticate: r
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: r.body_mut().read_to_string().unwrap_or_default(),
        }
    }

    /// `POST /api/v1/OP` with `body` (raw) and the token, if any.
    pub fn post_raw(&self, token: Option<&str>, op: &str, body: &str) -> Got {
        let mut r = Self::agent()
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
        let mut r = Self::agent().get(format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.header("Authorization", format!("Bearer {t}"));
        }
        Self::got(r.call())
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
        }
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
        let mut c = Command::new(bin());
        clean_cli_env(&mut c);
        c.env("HOME", self.root())
            .env("VDBFS_URL", &http.base)
            .env("VDBFS_TOKEN", token)
            .arg("--store")
            .arg(self.root().join("no-store-here"))
            .args(args);
        run_timeout(&mut c, COMMAND_TIMEOUT)
    }
}
