//! The CLI's side of the HTTP API: with `VDBFS_URL` (e.g. `http://vdbfs-host:7480`) and
//! `VDBFS_TOKEN` set, every command sends its request there instead of to the control socket,
//! so a laptop or a CI job needs neither root nor the socket. The reply is the same
//! [`Response`]; its kind (and so the exit status) comes from the daemon.
//!
//! The answer comes in lines, as over the socket (`Accept: application/x-ndjson`, see
//! `daemon::http`): progress lines go to stderr as they come, the response is the last line.
//! Ctrl-C ends the CLI, which closes the connection: the daemon takes that as a cancel, so an
//! operation that undoes itself (`source link`, `vdb create/refresh/rewind`) rolls back and
//! any other goes on (`vdbfs vdb status NAME` follows it).

use crate::api::{ErrorKind, ProgressLine, Refusal, Request, Response};
use std::io::BufRead;
use std::time::Duration;

/// The base URL and token from the environment, when the CLI should use HTTP.
pub fn from_env() -> Option<(String, Option<String>)> {
    let url = std::env::var("VDBFS_URL").ok().filter(|u| !u.is_empty())?;
    let token = std::env::var("VDBFS_TOKEN").ok().filter(|t| !t.is_empty());
    Some((url, token))
}

/// With `VDBFS_CA_FILE` set (PEM, one or more certificates), an `https://` VDBFS_URL is
/// trusted only if its certificate chains to one of them (a private or self-signed CA);
/// without it, to the usual public roots (webpki-roots).
fn tls_config() -> anyhow::Result<Option<ureq::tls::TlsConfig>> {
    let Some(file) = std::env::var_os("VDBFS_CA_FILE").filter(|f| !f.is_empty()) else {
        return Ok(None);
    };
    let file = std::path::PathBuf::from(file);
    let bad = |why: String| {
        anyhow::Error::from(
            Refusal::new(
                ErrorKind::Invalid,
                format!("cannot use VDBFS_CA_FILE {}: {why}", file.display()),
            )
            .with_hint("VDBFS_CA_FILE names a PEM file with the CA certificate(s) to trust"),
        )
    };
    let pem = std::fs::read(&file).map_err(|e| bad(e.to_string()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(c) = item.map_err(|e| bad(e.to_string()))? {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(Some(
        ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
            .build(),
    ))
}

/// Sends one request to `base` (`http://HOST:PORT`) and returns the daemon's response.
pub fn call(base: &str, token: Option<&str>, req: &Request) -> anyhow::Result<Response> {
    let url = format!("{}/api/v1/{}", base.trim_end_matches('/'), req.op());
    let mut config = ureq::Agent::config_builder();
    if let Some(tls) = tls_config()? {
        config = config.tls_config(tls);
    }
    let agent: ureq::Agent = config
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut r = agent.post(&url).header("Accept", LINES);
    if let Some(t) = token {
        r = r.header("Authorization", &format!("Bearer {t}"));
    }
    let mut resp = match r.send_json(req) {
        Ok(resp) => resp,
        Err(e) => {
            return Err(Refusal::new(
                ErrorKind::Unavailable,
                format!("no vdbfs HTTP API answers at {base} (VDBFS_URL): {e}"),
            )
            .with_hint("check VDBFS_URL, and that the daemon runs with 'vdbfs serve --http'")
            .into())
        }
    };
    let status = resp.status();
    let lines = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(LINES));
    if lines {
        return read_lines(&url, resp.body_mut().as_reader());
    }
    match resp.body_mut().read_json::<Response>() {
        Ok(r) => Ok(r),
        Err(e) => Err(Refusal::new(
            ErrorKind::Internal,
            format!("{url} answered {status} without a vdbfs reply: {e}"),
        )
        .into()),
    }
}

/// The media type of an answer in lines.
const LINES: &str = "application/x-ndjson";

/// Shows the progress lines of an answer in lines and returns its last line, the response
/// (empty lines are the daemon's heartbeat).
fn read_lines(url: &str, body: impl std::io::Read) -> anyhow::Result<Response> {
    let mut shown = super::progress::Shown::new();
    for line in std::io::BufReader::new(body).lines() {
        let line = line.map_err(|e| {
            shown.done();
            Refusal::new(
                ErrorKind::Unavailable,
                format!("the connection to {url} broke before the answer: {e}"),
            )
        })?;
        if line.trim().is_empty() {
            continue;
        }
        if let Ok(p) = serde_json::from_str::<ProgressLine>(&line) {
            shown.show(&p);
            continue;
        }
        shown.done();
        return serde_json::from_str::<Response>(&line).map_err(|e| {
            Refusal::new(
                ErrorKind::Internal,
                format!("{url} answered a line that is no vdbfs reply ({e}): {line}"),
            )
            .into()
        });
    }
    shown.done();
    Err(Refusal::new(
        ErrorKind::Unavailable,
        format!("{url} closed the connection without answering"),
    )
    .with_hint("the daemon may have stopped; 'vdbfs status' over VDBFS_URL tells")
    .into())
}
