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
//! - A POST with `Accept: application/x-ndjson` (the CLI sends it) is answered as the control
//!   socket answers: status 200 once the token is valid, then one JSON line per progress
//!   report, empty lines as a heartbeat every second, and the [`Response`] as the last line
//!   (its `ok` and `kind` say how it ended). A client that hangs up before that last line asks
//!   to cancel, as Ctrl-C on the socket does: an operation that undoes itself (`source link`,
//!   `vdb create/refresh/rewind`) rolls back, any other goes on.
//!
//! Invariants: nothing here decides what a request does or which kind a failure is (dispatch
//! does); a request runs on a blocking thread; only a streamed request (above) is cancelled by
//! a hang-up, and only through its [`Cancel`], like a cancel line on the socket.

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
use std::sync::atomic::{AtomicBool, Ordering};
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
    let lines = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(LINES));
    if lines {
        return answer_lines(d, op, headers, fields).await;
    }
    answer(d, op, headers, fields, false).await
}

/// The media type of a streamed answer: JSON lines.
const LINES: &str = "application/x-ndjson";

/// A POST answered in lines (see the module doc): progress as it comes, the response last; the
/// client hanging up before the end requests a cancel.
async fn answer_lines(
    d: Arc<Daemon>,
    op: String,
    headers: HeaderMap,
    fields: Result<Map<String, Value>, String>,
) -> axum::response::Response {
    let token = bearer(&headers);
    // Who it is first, so that 401 stays a status and not a line.
    let who = {
        let (d, token, op) = (d.clone(), token.clone(), op.clone());
        tokio::task::spawn_blocking(move || d.caller(token.as_deref(), &op).map(|_| ())).await
    };
    match who {
        Ok(Ok(())) => {}
        Ok(Err(r)) => return reply(r),
        Err(e) => return reply(Response::failed(ErrorKind::Internal, e.to_string())),
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<bytes::Bytes>();
    let cancel = Arc::new(Cancel::new("the request has not started yet"));
    let answered = Arc::new(AtomicBool::new(false));
    {
        // The heartbeat finds out that the client is gone (a write fails, the body is dropped).
        let (tx, cancel, answered, op) = (tx.clone(), cancel.clone(), answered.clone(), op.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => {
                        if !answered.load(Ordering::SeqCst) {
                            let (_, said) = cancel.request();
                            tracing::info!(op, "the HTTP client hung up: {said}");
                        }
                        break;
                    }
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                        if answered.load(Ordering::SeqCst) {
                            break;
                        }
                        let _ = tx.send(bytes::Bytes::from_static(b"\n"));
                    }
                }
            }
        });
    }
    tokio::task::spawn_blocking(move || {
        let send = |p: ProgressLine| {
            let _ = tx.send(json_line(&p));
        };
        let r = d.http_request(token.as_deref(), &op, fields, false, &send, &cancel);
        answered.store(true, Ordering::SeqCst);
        let _ = tx.send(json_line(&r));
    });
    let body = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|b| b.map(Ok::<_, std::convert::Infallible>))
    });
    (
        [(header::CONTENT_TYPE, LINES)],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// One JSON line of a streamed answer (a progress line or the response).
fn json_line<T: serde::Serialize>(v: &T) -> bytes::Bytes {
    let mut l = serde_json::to_vec(v).unwrap_or_else(|e| {
        let r = Response::failed(
            ErrorKind::Internal,
            format!("cannot encode the answer: {e}"),
        );
        serde_json::to_vec(&r).unwrap_or_default()
    });
    l.push(b'\n');
    bytes::Bytes::from(l)
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
    let r = tokio::task::spawn_blocking(move || {
        let send = |p: ProgressLine| tracing::debug!("progress: {}", p.progress);
        let cancel = Cancel::new(format!(
            "a request over HTTP without 'Accept: {LINES}' cannot be cancelled"
        ));
        d.http_request(token.as_deref(), &op, fields, get, &send, &cancel)
    })
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
        send: &dyn Fn(ProgressLine),
        cancel: &Cancel,
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
        self.respond_to(&caller, req, Progress::new(send, cancel))
    }
}
