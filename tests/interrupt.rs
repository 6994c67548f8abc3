//! Ctrl-C (issue 14). The bug: SIGINT killed the CLI and the link (or create, refresh, rewind)
//! silently went on in the daemon. The fix: the CLI catches SIGINT and asks the daemon to
//! cancel on the same connection; an operation that undoes itself rolls back like after any
//! failure and the CLI exits 130 (kind `cancelled`); any other operation goes on, the CLI says
//! so, and a second Ctrl-C stops waiting and names the command that follows it.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use crate::sources::assert_nothing_left;
use crate::util::source::{before, link_small, SourceDb, Staged, REPL_PW};
use crate::util::vdb::{self as v, setup};
use crate::util::{self, chmod, Daemon};

/// A CLI run whose stderr lines arrive on a channel as they are printed.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Vec<String>,
    stdout: thread::JoinHandle<String>,
}

impl Running {
    fn start(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vdbfs");
        let err = child.stderr.take().unwrap();
        let mut out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut s);
            s
        });
        Running {
            child,
            lines,
            stderr: Vec::new(),
            stdout,
        }
    }

    /// Waits (bounded) for a stderr line containing `what`.
    #[track_caller]
    fn wait_line(&mut self, what: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.contains(what);
                    self.stderr.push(l);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!(
                    "no stderr line with {what:?} within {timeout:?}; stderr so far:\n{}",
                    self.stderr.join("\n")
                ),
            }
        }
    }

    fn interrupt(&self) {
        assert!(
            util::signal(self.child.id() as i32, libc::SIGINT),
            "cannot SIGINT the CLI"
        );
    }

    /// Waits (bounded) for the exit; returns (exit code, stdout, all of stderr).
    fn finish(mut self, timeout: Duration) -> (Option<i32>, String, String) {
        let st = util::wait_child(&mut self.child, timeout);
        let Some(st) = st else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "the CLI did not exit within {timeout:?} of Ctrl-C; stderr:\n{}",
                self.stderr.join("\n")
            );
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.stderr.push(l);
        }
        let out = self.stdout.join().unwrap_or_default();
        eprintln!("CLI exit {st}; stderr:\n{}", self.stderr.join("\n"));
        (st.code(), out, self.stderr.join("\n"))
    }
}

/// A source of about 150 MB, so that the first copy takes a while.
fn big_source() -> SourceDb {
    let src = SourceDb::start(false, &[]);
    src.psql(
        "CREATE TABLE filler AS SELECT i, repeat(md5(i::text), 30) AS pad \
         FROM generate_series(1, 150000) i",
    );
    src
}

// Ctrl-C during `source link` (while pg_basebackup copies) cancels the link and rolls it back:
// exit 130, an error saying it was cancelled and rolled back, and nothing left (no dataset,
// record, slot, mount or process); the same name links fine afterwards.
#[test]
fn ctrl_c_during_a_link_leaves_nothing_behind() {
    let src = big_source();
    let d = Staged::start();
    let before = before(&d);
    let pass = src.passfile("replicator", REPL_PW);
    let port = util::free_port().to_string();
    let mut cmd = d.command();
    cmd.args(["source", "link", "prod", "--conn", &src.conn("replicator")])
        .arg("--passfile")
        .arg(&pass)
        .args(["--staging-port", &port]);
    let mut run = Running::start(cmd);
    run.wait_line("pg_basebackup from", Duration::from_secs(60));
    run.interrupt();
    let (code, _, stderr) = run.finish(Duration::from_secs(120));
    assert_eq!(
        code,
        Some(130),
        "a cancelled link exits 130\nstderr:\n{stderr}\ndaemon log:\n{}",
        d.log_tail(40)
    );
    let err = stderr.to_lowercase();
    assert!(
        err.contains("asking the daemon to cancel")
            && err.contains("cancelling")
            && err.contains("rolled back")
            && err.contains("cancelled (ctrl-c)"),
        "stderr:\n{stderr}"
    );
    assert_nothing_left(
        &d,
        &src,
        "prod",
        &before,
        false,
        "a link cancelled with Ctrl-C",
    );
    assert!(
        d.log().contains("kind=cancelled"),
        "the daemon log does not record the cancel:\n{}",
        d.log_tail(30)
    );
    // Nothing left blocks the name.
    link_small(&d, &src, "prod");
}

/// A hooks directory whose `hooks` each `sleep SECS`, but only while a file `slow` is next to
/// them (so the create that sets the VDB up runs at full speed).
fn sleepy_hooks(root: &Path, hooks: &[&str], secs: u32) -> std::path::PathBuf {
    let dir = root.join(format!("hooks-{}", hooks.join("-")));
    fs::create_dir_all(&dir).unwrap();
    for hook in hooks {
        let h = dir.join(hook);
        fs::write(
            &h,
            format!("#!/bin/sh\n[ -e \"$(dirname \"$0\")/slow\" ] && sleep {secs}\nexit 0\n"),
        )
        .unwrap();
        chmod(&h, 0o755);
    }
    dir
}

fn vdb_command(d: &Daemon, args: &[&str]) -> Command {
    let mut c = d.command();
    c.arg("vdb").args(args);
    c
}

// Ctrl-C during `vdb create` removes the VDB (dataset, record, mount, postgres); during
// `vdb refresh` it puts the VDB back on its undo snapshot, running, with its data.
#[test]
fn ctrl_c_during_vdb_create_and_refresh_rolls_back() {
    let s = setup(3);
    let d = &s.d;
    let create_hooks = sleepy_hooks(d.root(), &["pre-start"], 3);
    fs::write(create_hooks.join("slow"), "").unwrap();
    let mut run = Running::start(vdb_command(
        d,
        &[
            "create",
            "dev1",
            "--from",
            &s.snap,
            "--hooks",
            create_hooks.to_str().unwrap(),
        ],
    ));
    run.wait_line("starting postgres", Duration::from_secs(60));
    run.interrupt();
    let (code, _, stderr) = run.finish(Duration::from_secs(120));
    assert_eq!(code, Some(130), "stderr:\n{stderr}\n{}", d.log_tail(30));
    assert!(stderr.contains("was undone"), "stderr:\n{stderr}");
    assert!(v::list_names(d).is_empty(), "the VDB is still listed");
    assert!(
        !crate::util::source::dataset_names(d).contains(&"dev1".to_string()),
        "its dataset is left"
    );
    assert!(
        !d.store().join("mnt/dev1").exists() || !util::is_mounted(&d.store().join("mnt/dev1")),
        "its mount is left"
    );

    // Refresh: the configure-clone hook sleeps, Ctrl-C meanwhile, the VDB goes back.
    let hooks = sleepy_hooks(d.root(), &["configure-clone"], 3);
    let dev = v::create(d, "dev1", &s.snap, &["--hooks", hooks.to_str().unwrap()]);
    dev.sql("CREATE TABLE mine AS SELECT 42 AS answer");
    let parent = v::status(d, "dev1")["parent"].clone();
    fs::write(hooks.join("slow"), "").unwrap();
    let mut run = Running::start(vdb_command(d, &["refresh", "dev1", "--to", &s.first]));
    run.wait_line("refreshing VDB dev1", Duration::from_secs(60));
    thread::sleep(Duration::from_millis(500));
    run.interrupt();
    let (code, _, stderr) = run.finish(Duration::from_secs(120));
    assert_eq!(code, Some(130), "stderr:\n{stderr}\n{}", d.log_tail(30));
    assert!(stderr.contains("cancelled (Ctrl-C)"), "stderr:\n{stderr}");
    let st = v::wait_vdb(d, "dev1", "running again", v::running);
    assert_eq!(st["parent"], parent, "the parent changed: {st}");
    assert_eq!(
        dev.sql("SELECT answer FROM mine"),
        "42",
        "its data is not back"
    );
}

// An operation that cannot be undone (here `vdb stop`, whose pre-stop hook sleeps) goes on
// after Ctrl-C and the CLI says so; a second Ctrl-C stops waiting (exit 130) and names the
// command that follows the operation.
#[test]
fn ctrl_c_on_an_operation_that_goes_on_says_so() {
    let s = setup(2);
    let d = &s.d;
    let hooks = sleepy_hooks(d.root(), &["pre-stop", "pre-start"], 4);
    v::create(d, "dev1", &s.snap, &["--hooks", hooks.to_str().unwrap()]);
    fs::write(hooks.join("slow"), "").unwrap();

    let mut run = Running::start(vdb_command(d, &["stop", "dev1"]));
    thread::sleep(Duration::from_millis(800));
    run.interrupt();
    run.wait_line("cannot cancel", Duration::from_secs(30));
    let (code, stdout, stderr) = run.finish(Duration::from_secs(60));
    assert_eq!(
        code,
        Some(0),
        "the stop goes on and succeeds\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("stopped VDB dev1"), "{stdout}");
    assert!(
        stderr.contains("finishes in the daemon"),
        "the CLI must say the operation goes on\nstderr:\n{stderr}"
    );

    let mut run = Running::start(vdb_command(d, &["start", "dev1", "--json"]));
    thread::sleep(Duration::from_millis(300));
    run.interrupt();
    run.wait_line("cannot cancel", Duration::from_secs(30));
    run.interrupt();
    let (code, stdout, stderr) = run.finish(Duration::from_secs(60));
    if code == Some(0) {
        // The start finished between the two Ctrl-Cs: nothing more to check.
        return;
    }
    assert_eq!(code, Some(130), "stderr:\n{stderr}");
    let v: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    assert_eq!(v["error"]["kind"], "cancelled", "{v}");
    assert!(
        v["error"]["hint"]
            .as_str()
            .is_some_and(|h| h.contains("vdbfs vdb status dev1")),
        "{v}"
    );
    assert!(
        stderr.contains("goes on in the daemon"),
        "the CLI must say the operation goes on\nstderr:\n{stderr}"
    );
    v::wait_vdb(d, "dev1", "started by the daemon", v::running);
}
