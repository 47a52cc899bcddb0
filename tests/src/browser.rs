//! Headless Chromium driven through chromedriver's W3C WebDriver API, for the tests of
//! the status page. WebDriver is a handful of JSON calls over HTTP, so the client is the
//! test kit's own `reqwest` rather than another dependency tree to compile.
//!
//! Chromium and chromedriver come from the Debian packages `chromium` and
//! `chromium-driver` (scripts/test.sh installs them); without them the tests fail loudly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

/// The chromedriver binary: `FERRY_TEST_CHROMEDRIVER`, else `chromedriver` on the path
/// (Debian's `chromium-driver` installs it as /usr/bin/chromedriver).
fn chromedriver() -> PathBuf {
    if let Ok(path) = std::env::var("FERRY_TEST_CHROMEDRIVER") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromedriver"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "chromedriver is not installed: install the Debian packages chromium and \
             chromium-driver (scripts/test.sh does so as root), or set FERRY_TEST_CHROMEDRIVER"
        )
    })
}

/// One entry of the browser's console log.
#[derive(Debug, Clone)]
pub struct LogEntry {
    /// `SEVERE`, `WARNING`, `INFO`, ...
    pub level: String,
    /// `javascript`, `console-api`, `network`, ...
    pub source: String,
    /// The text.
    pub message: String,
}

/// A headless Chromium session; the browser and its driver end when it is dropped.
pub struct Browser {
    driver: Child,
    base: String,
    client: reqwest::Client,
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile and a window of
    /// `width` × `height` CSS pixels.
    pub async fn start(width: u32, height: u32) -> Self {
        let port = crate::free_port();
        let log = crate::ferry::scratch("chromedriver").join("chromedriver.log");
        let driver = Command::new(chromedriver())
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start chromedriver: {e}"));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("HTTP client");
        let base = format!("http://127.0.0.1:{port}");
        let profile = crate::ferry::scratch("chromium-profile");
        let mut browser = Self {
            driver,
            base,
            client,
            profile,
        };
        browser.wait_for_driver().await;
        let binary = std::env::var("FERRY_TEST_CHROMIUM").ok();
        let mut options = json!({
            "args": [
                "--headless=new",
                // As root (CI, containers) Chromium refuses to start sandboxed.
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--hide-scrollbars",
                format!("--user-data-dir={}", browser.profile.display()),
                format!("--window-size={width},{height}"),
            ],
        });
        if let Some(binary) = binary {
            options["binary"] = json!(binary);
        }
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": options,
                "goog:loggingPrefs": { "browser": "ALL" },
            }}
        });
        let answer = browser.raw("POST", "/session", Some(capabilities)).await;
        let id = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver made no session: {answer}"))
            .to_owned();
        browser.base = format!("{}/session/{id}", browser.base);
        browser.set_window(width, height).await;
        browser
    }

    async fn wait_for_driver(&self) {
        for _ in 0..100 {
            if let Ok(r) = self
                .client
                .get(format!("{}/status", self.base))
                .send()
                .await
            {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("chromedriver did not answer on {} within 10 s", self.base);
    }

    async fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let status = response.status();
        let bytes = response.bytes().await.unwrap_or_default();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert!(
            status.is_success(),
            "WebDriver {method} {path}: {status}: {value}"
        );
        value
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let mut answer = self.raw(method, path, body).await;
        answer["value"].take()
    }

    /// Resizes the window to `width` × `height` CSS pixels.
    pub async fn set_window(&self, width: u32, height: u32) {
        self.call(
            "POST",
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await;
    }

    /// Loads `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url }))).await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub async fn eval(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// Polls `script` until it returns something truthy, up to `limit`; returns it.
    pub async fn wait_for(&self, limit: Duration, what: &str, script: &str, args: Value) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let value = self.eval(script, args.clone()).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("the page never showed {what} within {limit:?} (last: {value})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the element that `css` selects.
    pub async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.call(
            "POST",
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Types `text` into the element that `css` selects, after clearing it.
    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.call(
            "POST",
            &format!("/element/{element}/clear"),
            Some(json!({})),
        )
        .await;
        self.call(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .call(
                "POST",
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css:?} on the page: {found}"))
            .to_owned()
    }

    /// The console entries since the last call (chromedriver's log endpoint).
    pub async fn console(&self) -> Vec<LogEntry> {
        let entries = self
            .call("POST", "/se/log", Some(json!({ "type": "browser" })))
            .await;
        entries
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| LogEntry {
                level: e["level"].as_str().unwrap_or_default().to_owned(),
                source: e["source"].as_str().unwrap_or_default().to_owned(),
                message: e["message"].as_str().unwrap_or_default().to_owned(),
            })
            .collect()
    }

    /// Saves a PNG screenshot of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let data = self.call("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().expect("screenshot as base64"))
            .expect("screenshot base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// The page's HTML as the browser has it now.
    pub async fn html(&self) -> String {
        self.eval("return document.documentElement.outerHTML;", json!([]))
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session ends Chromium (killing the driver would leave it running).
        // A plain blocking request: drop may run inside or outside a runtime.
        if let Some((host, path)) = self
            .base
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
        {
            use std::io::{Read, Write};
            if let Ok(mut stream) = std::net::TcpStream::connect(host) {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = write!(
                    stream,
                    "DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.read_to_end(&mut Vec::new());
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Where the status page's screenshots go: `target/status-page/` of the build that runs
/// the tests (test artifacts, not committed).
pub fn artifact_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(|target| target.join("status-page"))
        .expect("target dir")
}
