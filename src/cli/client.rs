//! The CLI's side of the control socket: connect (and say precisely why not: no store, no
//! daemon, no permission), send one request, show progress lines, return the response.
//!
//! Ctrl-C (SIGINT, or SIGTERM) while waiting sends `{"cancel":true}` on the same connection:
//! an operation that undoes itself (`source link`, `vdb create/refresh/rewind`) rolls back and
//! fails with kind `cancelled`; any other says why it goes on, shown on stderr. A second Ctrl-C
//! stops waiting (the operation goes on in the daemon) and names the command that follows it.

use super::progress;
use crate::api::{self, CancelLine, ErrorKind, ProgressLine, Refusal, Request, Response};
use anyhow::{bail, Context};
use std::io::{BufRead, BufReader, ErrorKind as IoKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long the daemon may stay silent before the CLI gives up on it.
const SILENCE: Duration = Duration::from_secs(600);
/// How often a blocked read looks at the Ctrl-C count.
const POLL: Duration = Duration::from_millis(100);

/// SIGINT and SIGTERM received while a request runs.
static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_interrupt(_: libc::c_int) {
    // An atomic add is async-signal-safe.
    INTERRUPTS.fetch_add(1, Ordering::SeqCst);
}

/// SIGINT and SIGTERM are counted instead of ending the process, until dropped.
struct CatchInterrupts;

impl CatchInterrupts {
    fn new() -> CatchInterrupts {
        INTERRUPTS.store(0, Ordering::SeqCst);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: the handler only touches an atomic; `signal` installs it for this process.
            unsafe {
                libc::signal(sig, on_interrupt as *const () as libc::sighandler_t);
            }
        }
        CatchInterrupts
    }
}

impl Drop for CatchInterrupts {
    fn drop(&mut self) {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: back to the default disposition; no memory is involved.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// Why the control socket does not answer, precisely: permission (and who may use it), a
/// store that does not exist or is not a store, or no daemon.
fn cannot_connect(store: &Path, sock: &Path, e: &std::io::Error) -> anyhow::Error {
    use std::os::unix::fs::MetadataExt;
    let s = store.display();
    if e.kind() == IoKind::PermissionDenied {
        let (owner, mode) = std::fs::metadata(sock)
            .map(|m| {
                let name = super::libpq::passwd_entry(m.uid())
                    .map_or(format!("uid {}", m.uid()), |(n, _)| n);
                (name, format!("{:o}", m.mode() & 0o7777))
            })
            .unwrap_or_else(|_| ("root".into(), "0600".into()));
        return Refusal::new(
            ErrorKind::Invalid,
            format!(
                "permission denied: cannot use the control socket {} (owner {owner}, mode {mode})",
                sock.display()
            ),
        )
        .with_hint(format!(
            "only {owner}, the user the daemon runs as, may use it: run the command as {owner} \
             (e.g. with sudo)"
        ))
        .into();
    }
    let not_store = |message: String| -> anyhow::Error {
        Refusal::new(ErrorKind::NotFound, message)
            .with_hint(format!(
                "pass the store with --store DIR (or VDBFS_STORE); 'vdbfs init --store {s}' \
                 creates one there"
            ))
            .into()
    };
    match std::fs::metadata(store) {
        Err(m) if m.kind() == IoKind::NotFound => {
            return not_store(format!("{s} does not exist, so it is not a vdbfs store"))
        }
        Ok(m) if !m.is_dir() => {
            return not_store(format!("{s} is not a directory, so not a vdbfs store"))
        }
        Ok(_) if !crate::store::index_path(store).exists() => {
            return not_store(format!("{s} is not a vdbfs store (it has no index.redb)"))
        }
        _ => {}
    }
    Refusal::new(
        ErrorKind::Unavailable,
        format!("no vdbfs daemon answers at {}", sock.display()),
    )
    .with_hint(format!("start one with 'vdbfs serve --store {s}'"))
    .into()
}

fn note(shown: &mut progress::Shown, text: String) {
    shown.show(&ProgressLine {
        progress: text,
        done_kb: None,
        total_kb: None,
        cancelling: None,
    });
}

/// Sends one request and returns the daemon's response (progress lines go to stderr); to the
/// HTTP API instead of the socket when `VDBFS_URL` is set (`super::http`).
pub fn call(store: &Path, req: &Request) -> anyhow::Result<Response> {
    if let Some((url, token)) = super::http::from_env() {
        return super::http::call(&url, token.as_deref(), req);
    }
    let sock = api::socket_path(store);
    let s = UnixStream::connect(&sock).map_err(|e| cannot_connect(store, &sock, &e))?;
    let _catch = CatchInterrupts::new();
    s.set_read_timeout(Some(POLL))?;
    let mut w = s.try_clone()?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    w.write_all(line.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut shown = progress::Shown::new();
    let mut buf = Vec::new();
    let mut handled = 0;
    let mut cancelling = false;
    let mut heard = Instant::now();
    loop {
        let n = INTERRUPTS.load(Ordering::SeqCst);
        if n > handled {
            if handled == 0 {
                note(
                    &mut shown,
                    "vdbfs: interrupted; asking the daemon to cancel (Ctrl-C again stops waiting)"
                        .into(),
                );
                let mut cancel = serde_json::to_string(&CancelLine { cancel: true })?;
                cancel.push('\n');
                let _ = w.write_all(cancel.as_bytes());
            } else {
                shown.done();
                return Err(Refusal::new(
                    ErrorKind::Cancelled,
                    "stopped waiting (Ctrl-C twice); the operation goes on in the daemon",
                )
                .with_hint(format!("follow it with '{}'", req.follow()))
                .into());
            }
            handled = n;
        }
        match r.read_until(b'\n', &mut buf) {
            Ok(0) => {
                // The end: a last line without its newline may still be the answer.
                shown.done();
                if let Ok(resp) = serde_json::from_slice::<Response>(&buf) {
                    return Ok(resp);
                }
                bail!("the daemon closed the connection without answering");
            }
            // Data up to the end of the stream, no newline: the next read says 0.
            Ok(_) if !buf.ends_with(b"\n") => {}
            Ok(_) => {
                heard = Instant::now();
                let text = std::mem::take(&mut buf);
                if let Ok(p) = serde_json::from_slice::<ProgressLine>(&text) {
                    cancelling |= p.cancelling == Some(true);
                    shown.show(&p);
                    continue;
                }
                shown.done();
                let resp: Response =
                    serde_json::from_slice(&text).context("malformed answer from the daemon")?;
                if cancelling && resp.ok {
                    eprintln!("vdbfs: the operation finished before it could be cancelled");
                }
                return Ok(resp);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    IoKind::WouldBlock | IoKind::TimedOut | IoKind::Interrupted
                ) =>
            {
                if heard.elapsed() > SILENCE {
                    shown.done();
                    bail!(
                        "the daemon said nothing for {} s; '{}' shows whether the operation goes on",
                        SILENCE.as_secs(),
                        req.follow()
                    );
                }
            }
            Err(e) => {
                shown.done();
                return Err(e).context("reading the daemon's answer");
            }
        }
    }
}
