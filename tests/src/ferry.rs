//! The real `ferry` binary, run as a process the way operators run it.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

/// Path of the `ferry` binary built next to the test binaries (`cargo build --bins`).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let path = dir.join("ferry");
    assert!(
        path.is_file(),
        "{} is missing: build it first (cargo build --workspace --bins, as scripts/test.sh does)",
        path.display()
    );
    path
}

/// A scratch folder for one test's files.
pub fn scratch(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(crate::unique(prefix));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// An SQS → HTTP route with the test's own extra keys.
pub struct SqsRoute<'a> {
    /// Queue to consume.
    pub queue_url: &'a str,
    /// Dead-letter queue, if any.
    pub dead_letter_queue_url: Option<&'a str>,
    /// The endpoint.
    pub sink_url: &'a str,
    /// Extra lines for `[routes.r.source]`.
    pub source: &'a str,
    /// Extra lines for `[routes.r.sink]`.
    pub sink: &'a str,
    /// Extra lines for `[routes.r.delivery]`.
    pub delivery: &'a str,
}

impl SqsRoute<'_> {
    /// The configuration file text, with the admin server on `admin_port`.
    pub fn config(&self, admin_port: u16) -> String {
        let dlq = self
            .dead_letter_queue_url
            .map(|u| format!("dead_letter_queue_url = \"{u}\"\n"))
            .unwrap_or_default();
        format!(
            r#"[admin]
listen = "127.0.0.1:{admin_port}"

[routes.r.source]
type = "sqs"
queue_url = "{queue}"
endpoint_url = "{endpoint}"
region = "us-east-1"
{dlq}{source}

[routes.r.sink]
type = "http"
url = "{sink_url}"
{sink}

[routes.r.delivery]
{delivery}
"#,
            queue = self.queue_url,
            endpoint = crate::sqs_endpoint(),
            source = self.source,
            sink_url = self.sink_url,
            sink = self.sink,
            delivery = self.delivery,
        )
    }
}

/// A running ferry process; killed when dropped.
pub struct Ferry {
    child: Child,
    /// The admin server's port.
    pub admin_port: u16,
    log: PathBuf,
}

fn command() -> Command {
    let mut cmd = Command::new(binary());
    cmd.env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null());
    cmd
}

impl Ferry {
    /// Starts `ferry run` with `route` and a fresh admin port.
    pub fn start(route: &SqsRoute<'_>) -> Self {
        let admin_port = crate::free_port();
        let dir = scratch("ferry");
        let config = dir.join("ferry.toml");
        std::fs::write(&config, route.config(admin_port)).expect("write config");
        let log = dir.join("ferry.log");
        let child = command()
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("FERRY_LOG", "info,ferry_core=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn ferry");
        Self {
            child,
            admin_port,
            log,
        }
    }

    /// Sends a signal by name (`TERM`, `KILL`, ...).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id();
        // The kill(1) command keeps this crate free of unsafe code.
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What ferry logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin_port))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// The value of the first sample whose line starts with `prefix`.
    pub async fn metric(&self, prefix: &str) -> Option<f64> {
        self.metrics()
            .await
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// Waits until `/readyz` answers 200 (every route receiving).
    pub async fn wait_ready(&self, limit: Duration) {
        let url = format!("http://127.0.0.1:{}/readyz", self.admin_port);
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("ferry not ready within {limit:?}; log:\n{}", self.log());
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the ferry CLI to completion (for `validate` and start-up errors).
pub fn run_cli(args: &[&str]) -> Output {
    command().args(args).output().expect("run ferry")
}
