//! A real browser for the web page's tests: Debian's headless Chromium driven over the Chrome
//! DevTools Protocol (a websocket to one page: navigate, evaluate JavaScript, screenshots).
//!
//! The browser runs with its own profile in a temporary directory and is killed by PID when
//! the [`Browser`] is dropped; on a failing test a screenshot is saved under
//! `target/browser-screenshots/` first. A machine without `/usr/bin/chromium` fails the test
//! loudly (scripts/test installs it).

use super::*;
use serde_json::{json, Value};
use std::net::TcpStream;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

pub const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// What the screenshot of a failing test is named after.
    name: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts headless Chromium with a blank page and connects to that page.
    pub fn start(name: &str) -> Browser {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: the web page's test needs Debian's chromium package \
             (scripts/test installs it)"
        );
        let profile = tempdir("vdbfs-chromium-");
        let child = Command::new(CHROMIUM)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--window-size=1200,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let mut guard = KillOnDrop(Some(child));
        // Chromium writes the port it took (and the browser's path) into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        assert!(
            wait_until(Duration::from_secs(60), || fs::read_to_string(&port_file)
                .is_ok_and(|s| s.lines().count() >= 2)),
            "chromium did not open its debugging port within 60 s"
        );
        let port: u16 = fs::read_to_string(&port_file)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut page_ws = None;
        assert!(
            wait_until(Duration::from_secs(30), || {
                let Ok(mut r) = ureq::get(format!("http://127.0.0.1:{port}/json/list")).call()
                else {
                    return false;
                };
                let list: Value = r.body_mut().read_json().unwrap_or(Value::Null);
                page_ws = list.as_array().and_then(|a| {
                    a.iter()
                        .find(|t| t["type"] == "page")
                        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                        .map(str::to_string)
                });
                page_ws.is_some()
            }),
            "chromium has no page to drive"
        );
        let (ws, _) = tungstenite::connect(page_ws.unwrap()).expect("connect to the page");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        }
        let child = guard.0.take().unwrap();
        let mut b = Browser {
            child,
            ws,
            next_id: 1,
            name: name.to_string(),
            _profile: profile,
        };
        b.call("Page.enable", json!({}));
        b.call("Runtime.enable", json!({}));
        b
    }

    /// Sends one DevTools command and returns its result (events in between are skipped).
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .unwrap_or_else(|e| panic!("DevTools {method}: {e}"))
    }

    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .map_err(|e| e.to_string())?;
        loop {
            let m = self.ws.read().map_err(|e| format!("no answer: {e}"))?;
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
            if v["id"] == id {
                if !v["error"].is_null() {
                    return Err(format!("failed: {}", v["error"]));
                }
                return Ok(v["result"].clone());
            }
        }
    }

    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        assert!(
            self.wait(
                Duration::from_secs(30),
                "document.readyState === 'complete'"
            ),
            "{url} did not load"
        );
    }

    /// Evaluates a JavaScript expression in the page (promises awaited) and returns its value.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
        );
        if !r["exceptionDetails"].is_null() {
            panic!("{expr}: {}", r["exceptionDetails"]);
        }
        r["result"]["value"].clone()
    }

    /// Waits (bounded) until a JavaScript expression is true.
    pub fn wait(&mut self, timeout: Duration, expr: &str) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eval(&format!("!!({expr})")) == Value::Bool(true) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Clicks the element a CSS selector finds the way a user does: mouse events at its centre
    /// (DevTools input, so the page gets a user activation, which the clipboard asks for).
    pub fn click(&mut self, selector: &str) {
        let at = self.eval(&format!(
            "(() => {{ const e = document.querySelector({}); if (!e) return null; \
             e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
            json!(selector)
        ));
        let (x, y) = match (at[0].as_f64(), at[1].as_f64()) {
            (Some(x), Some(y)) => (x, y),
            _ => panic!("nothing on the page matches {selector:?} to click"),
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            );
        }
    }

    /// Saves a PNG of the page as `target/browser-screenshots/NAME.png`; returns its path
    /// (None when the browser does not answer or the file cannot be written). Never panics:
    /// it runs while a failing test unwinds.
    pub fn screenshot(&mut self, name: &str) -> Option<PathBuf> {
        use base64::Engine;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-screenshots");
        fs::create_dir_all(&dir).ok()?;
        let r = self
            .try_call("Page.captureScreenshot", json!({"format": "png"}))
            .ok()?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str()?)
            .ok()?;
        let path = dir.join(format!("{name}.png"));
        fs::write(&path, png).ok()?;
        Some(path)
    }
}

struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if thread::panicking() {
            let name = self.name.clone();
            // A browser that no longer answers leaves no screenshot, but must not hang here.
            if let MaybeTlsStream::Plain(s) = self.ws.get_ref() {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            }
            match self.screenshot(&format!("{name}-failed")) {
                Some(p) => eprintln!("--- screenshot of the page: {} ---", p.display()),
                None => eprintln!("--- no screenshot: the browser did not answer ---"),
            }
        }
        let _ = self.ws.close(None);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
