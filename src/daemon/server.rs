//! The control server: the unix socket `STORE/vdbfs.sock` (mode 0600), one request per
//! connection (see `crate::api`). A request runs on a blocking thread; its progress lines are
//! written as they come, then the response. While it runs, the client may send `{"cancel":
//! true}` on the same connection (the CLI does on Ctrl-C): the request's [`Cancel`] answers
//! with a progress line saying what happens.
//!
//! Invariant: a client that hangs up never stops the daemon or the request it sent; only an
//! explicit cancel line does, and only for an operation that undoes itself.

use super::Daemon;
use crate::api::{socket_path, Cancel, CancelLine, ErrorKind, Progress, ProgressLine, Response};
use crate::auth::Caller;
use anyhow::Context;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Serves until SIGTERM or SIGINT; the socket is removed on the way out. With `group`
/// (`serve --socket-group`) the socket is 0660 and that group's members use it as developers.
pub(super) async fn run(d: Arc<Daemon>, group: Option<String>) -> anyhow::Result<()> {
    let sock = socket_path(&d.store_dir);
    let listener = UnixListener::bind(&sock)
        .with_context(|| format!("cannot listen on {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    if let Some(g) = &group {
        let gid = group_id(g)?;
        std::os::unix::fs::chown(&sock, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {g}", sock.display()))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660))?;
        tracing::info!(group = %g, "members of group {g} use the control socket as developers");
    }
    tracing::info!(store = %d.store_dir.display(), pid = std::process::id(), "vdbfs daemon ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    tokio::spawn(serve_one(d.clone(), stream));
                }
                Err(e) => tracing::warn!("accept failed: {e}"),
            },
        }
    }
    tracing::info!("stopping: flushing and unmounting");
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

async fn write_line<T: serde::Serialize>(w: &mut tokio::net::unix::OwnedWriteHalf, v: &T) {
    if let Ok(mut s) = serde_json::to_string(v) {
        s.push('\n');
        let _ = w.write_all(s.as_bytes()).await;
    }
}

/// The gid of a group name (`serve --socket-group`).
fn group_id(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name)?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: a zeroed group is a valid value for getgrnam_r to overwrite.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives it and nothing reads it after.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut gr,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        crate::refuse!(Invalid, "--socket-group {name}: no such group");
    }
    Ok(gr.gr_gid)
}

/// A user's name, or `uid N`.
fn user_name(uid: u32) -> String {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: a zeroed passwd is a valid value for getpwuid_r to overwrite.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and buf outlives the read below.
    let rc =
        unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() || pw.pw_name.is_null() {
        return format!("uid {uid}");
    }
    // SAFETY: getpwuid_r succeeded: pw_name points to a NUL-terminated string inside buf.
    unsafe { std::ffi::CStr::from_ptr(pw.pw_name) }
        .to_string_lossy()
        .into_owned()
}

/// Who is on the other end (SO_PEERCRED): root or the daemon's own user is an admin; anyone
/// else got in through `--socket-group` and is a developer named after their user.
fn caller_of(stream: &UnixStream) -> Caller {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match stream.peer_cred() {
        Ok(c) if c.uid() == 0 || c.uid() == me => Caller::socket(),
        Ok(c) => Caller {
            name: user_name(c.uid()),
            role: crate::api::Role::Developer,
        },
        // Unknown peer: the least the socket's mode allows.
        Err(_) => Caller {
            name: "unknown".into(),
            role: crate::api::Role::Developer,
        },
    }
}

async fn serve_one(d: Arc<Daemon>, stream: UnixStream) {
    let caller = caller_of(&stream);
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut line = String::new();
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    tracing::debug!("control connection");
    // Long operations send progress lines before their answer.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<ProgressLine>();
    let cancel = Arc::new(Cancel::new("the request has not started yet"));
    // Lines after the request: cancel requests, answered with what happens.
    let watcher = {
        let (cancel, tx) = (cancel.clone(), tx.clone());
        tokio::spawn(async move {
            let mut l = String::new();
            loop {
                l.clear();
                match reader.read_line(&mut l).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if serde_json::from_str::<CancelLine>(&l).is_ok_and(|c| c.cancel) {
                            let (cancelling, said) = cancel.request();
                            tracing::info!("the client asked to cancel: {said}");
                            let _ = tx.send(ProgressLine {
                                progress: said,
                                done_kb: None,
                                total_kb: None,
                                cancelling: Some(cancelling),
                            });
                        }
                    }
                }
            }
        })
    };
    let mut task = tokio::task::spawn_blocking(move || {
        let send = move |p: ProgressLine| {
            let _ = tx.send(p);
        };
        d.respond(&caller, &line, Progress::new(&send, &cancel))
    });
    let resp = loop {
        tokio::select! {
            Some(p) = rx.recv() => write_line(&mut w, &p).await,
            r = &mut task => break r.unwrap_or_else(|e| {
                Response::failed(ErrorKind::Internal, format!("internal error: {e}"))
            }),
        }
    };
    watcher.abort();
    while let Ok(p) = rx.try_recv() {
        write_line(&mut w, &p).await;
    }
    write_line(&mut w, &resp).await;
}
