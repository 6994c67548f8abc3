//! The CLI's side of the HTTP API: with `VDBFS_URL` (e.g. `http://vdbfs-host:7480`) and
//! `VDBFS_TOKEN` set, every command sends its request there instead of to the control socket,
//! so a laptop or a CI job needs neither root nor the socket. The reply is the same
//! [`Response`]; its kind (and so the exit status) comes from the daemon.
//!
//! Over HTTP there are no progress lines and Ctrl-C does not cancel: the operation finishes in
//! the daemon (`vdbfs vdb status NAME` follows it).

use crate::api::{ErrorKind, Refusal, Request, Response};
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
    let mut r = agent.post(&url);
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
    match resp.body_mut().read_json::<Response>() {
        Ok(r) => Ok(r),
        Err(e) => Err(Refusal::new(
            ErrorKind::Internal,
            format!("{url} answered {status} without a vdbfs reply: {e}"),
        )
        .into()),
    }
}
