//! The HTTP API (`vdbfs serve --http ADDR:PORT`, axum on the daemon's tokio runtime): the
//! same typed [`Request`]s as the control socket, answered by the same dispatch, as JSON.
//!
//! - `POST /api/v1/OP` with the request's fields as a JSON object (OP is the request's wire
//!   name, e.g. `vdb_create`; `{}` or no body for none); `GET /api/v1/OP?FIELD=VALUE` for the
//!   requests that only read.
//! - The answer is the control API's [`Response`] (`ok`, `kind`, `message`, `hint`, `data`)
//!   with the HTTP status of its kind (`ErrorKind::http_status`), 200 on success.
//! - Every request but `GET /` carries `Authorization: Bearer TOKEN` (`vdbfs token create`);
//!   none, or an unknown, revoked or expired one: 401. What a role may do: `crate::auth`.
//! - `GET /metrics`: Prometheus text format (any valid token). `GET /`: the web page.
//!
//! Invariants: nothing here decides what a request does or which kind a failure is (dispatch
//! does); a request runs on a blocking thread and a client that hangs up does not stop it.

use super::Daemon;
use crate::api::{Cancel, ErrorKind, Progress, ProgressLine, Request, Response};
use anyhow::Context;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The web page, with everything it needs inline (no CDN: it works with no internet).
const PAGE: &str = include_str!("web/index.html");

pub(super) async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (serve --http)"))
}

/// The TLS configuration of `--tls-cert/--tls-key` (PEM files), read once at start: a bad
/// certificate or key stops `serve` before it answers anything.
pub(super) async fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<axum_server::tls_rustls::RustlsConfig> {
    axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
        .await
        .with_context(|| {
            format!(
                "cannot use --tls-cert {} --tls-key {} (PEM certificate chain and private key)",
                cert.display(),
                key.display()
            )
        })
}

/// Serves until `stop` turns true: plain HTTP, or HTTPS (rustls) when `tls` is given.
pub(super) async fn run(
    d: Arc<Daemon>,
    listener: tokio::net::TcpListener,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/api/v1/{op}", get(op_get).post(op_post))
        .with_state(d);
    if let Some(tls) = tls {
        tracing::info!(%addr, "HTTP API ready (HTTPS)");
        let handle = axum_server::Handle::new();
        let h = handle.clone();
        tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            h.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
        });
        axum_server::from_tcp_rustls(listener.into_std()?, tls)?
            .handle(handle)
            .serve(app.into_make_service())
            .await?;
        return Ok(());
    }
    tracing::info!(%addr, "HTTP API ready");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(())
}

async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE)
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

fn reply(r: Response) -> axum::response::Response {
    let status = r.kind.map_or(StatusCode::OK, |k| {
        StatusCode::from_u16(k.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    });
    let mut resp = (status, axum::Json(r)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"vdbfs\""),
        );
    }
    resp
}

async fn metrics(State(d): State<Arc<Daemon>>, headers: HeaderMap) -> axum::response::Response {
    let token = bearer(&headers);
    let r = tokio::task::spawn_blocking(move || match d.caller(token.as_deref(), "metrics") {
        Err(r) => Err(r),
        Ok(_) => d.metrics_text().map_err(|e| {
            tracing::error!("cannot gather the metrics: {e:#}");
            Response::failed(
                ErrorKind::Internal,
                format!("cannot gather the metrics: {e:#}"),
            )
        }),
    })
    .await;
    match r {
        Ok(Ok(text)) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(Err(r)) => reply(r),
        Err(e) => reply(Response::failed(ErrorKind::Internal, e.to_string())),
    }
}

async fn op_post(
    State(d): State<Arc<Daemon>>,
    Path(op): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let fields = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(Map::new())
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err("the body must be a JSON object of the request's fields".to_string()),
            Err(e) => Err(format!("the body is not JSON: {e}")),
        }
    };
    answer(d, op, headers, fields, false).await
}

/// A read-only request with its fields in the query string (all strings; `true`/`false` and
/// numbers become JSON booleans and numbers).
async fn op_get(
    State(d): State<Arc<Daemon>>,
    Path(op): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> axum::response::Response {
    let fields = q
        .into_iter()
        .map(|(k, v)| {
            let v = match v.as_str() {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                s => s
                    .parse::<u64>()
                    .map_or_else(|_| Value::String(v.clone()), Value::from),
            };
            (k, v)
        })
        .collect();
    answer(d, op, headers, Ok(fields), true).await
}

async fn answer(
    d: Arc<Daemon>,
    op: String,
    headers: HeaderMap,
    fields: Result<Map<String, Value>, String>,
    get: bool,
) -> axum::response::Response {
    let token = bearer(&headers);
    let r = tokio::task::spawn_blocking(move || d.http_request(token.as_deref(), &op, fields, get))
        .await;
    reply(
        r.unwrap_or_else(|e| Response::failed(ErrorKind::Internal, format!("internal error: {e}"))),
    )
}

impl Daemon {
    /// Who a token is (401 when none is valid); the refusal is logged here.
    fn caller(&self, token: Option<&str>, op: &str) -> Result<crate::auth::Caller, Response> {
        let tokens = self.tokens.list().map_err(|e| {
            Response::failed(
                ErrorKind::Internal,
                format!("cannot read the API tokens: {e}"),
            )
        })?;
        crate::auth::authenticate(&tokens, token, crate::time::now_unix()).map_err(|r| {
            tracing::info!(op, by = %"-", kind = %r.kind, "HTTP request refused: {r}");
            Response::failed(r.kind, r.message)
        })
    }

    fn http_request(
        &self,
        token: Option<&str>,
        op: &str,
        fields: Result<Map<String, Value>, String>,
        get: bool,
    ) -> Response {
        let caller = match self.caller(token, op) {
            Ok(c) => c,
            Err(r) => return r,
        };
        let invalid = |m: String| {
            tracing::info!(op, by = %caller.name, "malformed HTTP request: {m}");
            Response::failed(ErrorKind::Invalid, m)
        };
        let mut fields = match fields {
            Ok(f) => f,
            Err(m) => return invalid(m),
        };
        if fields.get("op").is_some_and(|o| o.as_str() != Some(op)) {
            return invalid(format!("the body's \"op\" is not {op:?}, the path's"));
        }
        fields.insert("op".into(), Value::String(op.to_string()));
        let req: Request = match serde_json::from_value(Value::Object(fields)) {
            Ok(r) => r,
            Err(e) => return invalid(format!("malformed request {op}: {e}")),
        };
        if get && !req.reads_only() {
            return invalid(format!(
                "{op} changes something: send it as POST /api/v1/{op} with a JSON body"
            ));
        }
        let by = caller.name.clone();
        let send = move |p: ProgressLine| tracing::debug!(by = %by, "progress: {}", p.progress);
        let cancel = Cancel::new("a request over HTTP cannot be cancelled");
        self.respond_to(&caller, req, Progress::new(&send, &cancel))
    }
}
