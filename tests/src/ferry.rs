//! The real `ferry` binary, run as a process the way operators run it.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

/// Path of the `ferry` binary built next to the test binaries (`cargo build --bins`).
pub fn binary() -> PathBuf {
    workspace_binary("ferry")
}

/// Path of a binary of this workspace, built next to the test binaries.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first (cargo build --workspace --bins --all-features, as scripts/test.sh does)",
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

/// A route named `r` with the test's own keys.
pub struct Route<'a> {
    /// The whole `[routes.r.source]` body (see [`sqs_source`], [`amqp_source`]).
    pub source: String,
    /// The endpoint.
    pub sink_url: &'a str,
    /// Extra lines for `[routes.r.sink]`.
    pub sink: &'a str,
    /// Extra lines for `[routes.r.delivery]`.
    pub delivery: &'a str,
}

/// An SQS source on the emulator.
pub fn sqs_source(queue_url: &str, dead_letter_queue_url: Option<&str>, extra: &str) -> String {
    let dlq = dead_letter_queue_url
        .map(|u| format!("dead_letter_queue_url = \"{u}\"\n"))
        .unwrap_or_default();
    // Short long polls unless the test says otherwise: a stop waits for the poll under way.
    let wait = if extra.contains("wait_time") {
        ""
    } else {
        "wait_time = \"1s\"\n"
    };
    format!(
        "type = \"sqs\"\nqueue_url = \"{queue_url}\"\nendpoint_url = \"{}\"\nregion = \"us-east-1\"\n{dlq}{wait}{extra}\n",
        crate::sqs_endpoint()
    )
}

/// A RabbitMQ source on the local broker. Unless `extra` says where dead letters go,
/// they are rejected to the queue's own dead-letter exchange (`dead_letters = "queue"`),
/// which the queues of [`crate::amqp::Rabbit::queue`] have.
pub fn amqp_source(queue: &str, extra: &str) -> String {
    let dead_letters = if extra.contains("dead_letter") {
        ""
    } else {
        "dead_letters = \"queue\"\n"
    };
    format!(
        "type = \"amqp\"\nuri = \"{}\"\nqueue = \"{queue}\"\n{dead_letters}{extra}\n",
        crate::amqp_uri()
    )
}

/// A `[routes.r.source]` body for a Kafka topic, with quick group timeouts so that a
/// killed member's partitions move on within seconds.
pub fn kafka_source(brokers: &str, group: &str, topic: &str, dead_letter_topic: &str) -> String {
    format!(
        "type = \"kafka\"\nbrokers = \"{brokers}\"\ngroup_id = \"{group}\"\ntopics = [\"{topic}\"]\n\
         dead_letter_topic = \"{dead_letter_topic}\"\n\
         librdkafka = {{ \"session.timeout.ms\" = 6000, \"heartbeat.interval.ms\" = 100 }}\n"
    )
}

impl Route<'_> {
    /// The configuration file text, with the admin server on `admin_port`.
    pub fn config(&self, admin_port: u16) -> String {
        self.config_with(admin_port, "")
    }

    /// The configuration file text, with `admin` appended to the `[admin]` section (it may
    /// open `[admin.state]` or another top-level section such as `[runtime]`).
    pub fn config_with(&self, admin_port: u16, admin: &str) -> String {
        format!(
            "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{admin}\n\n{}",
            self.section("r")
        )
    }

    /// This route's sections under the name `name`, for a file with several routes.
    pub fn section(&self, name: &str) -> String {
        format!(
            "[routes.{name}.source]\n{}\n[routes.{name}.sink]\ntype = \"http\"\nurl = \"{}\"\n{}\n\n\
             [routes.{name}.delivery]\n{}\n",
            self.source, self.sink_url, self.sink, self.delivery
        )
    }
}

/// A running ferry process (or another bridge program); killed when dropped.
pub struct Ferry {
    child: Child,
    /// The admin server's port (0 for a program without one).
    pub admin_port: u16,
    log: PathBuf,
    /// For a program without an admin server: the log line that says it receives.
    ready_marker: Option<String>,
    /// The configuration file `ferry run --config` reads (also on SIGHUP).
    config: Option<PathBuf>,
    /// The read end of ferry's stderr when nobody reads it (see [`Ferry::start_unread`]).
    _unread: Option<std::process::ChildStderr>,
}

fn command() -> Command {
    command_in(&[])
}

/// The ferry binary, run by `wrapper` (e.g. `unshare --pid --fork`) when it is not empty.
fn command_in(wrapper: &[&str]) -> Command {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(binary());
            cmd
        }
        None => Command::new(binary()),
    };
    cmd.env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null());
    cmd
}

impl Ferry {
    /// Starts `ferry run` with `route` and a fresh admin port.
    pub fn start(route: &Route<'_>) -> Self {
        Self::start_with(route, "")
    }

    /// Starts `ferry run` with `route`, a fresh admin port and `admin` added to `[admin]`.
    pub fn start_with(route: &Route<'_>, admin: &str) -> Self {
        Self::start_in(route, admin, &[])
    }

    /// Like [`Ferry::start_with`], with ferry run by `wrapper` (a command and its
    /// arguments, such as `unshare --pid --fork --kill-child`); killing the wrapper must
    /// end ferry.
    pub fn start_in(route: &Route<'_>, admin: &str, wrapper: &[&str]) -> Self {
        Self::start_config_in(
            |admin_port| route.config_with(admin_port, admin),
            wrapper,
            &[],
            None,
        )
    }

    /// Starts `ferry run` with the configuration `config(admin_port)` (several routes, say;
    /// see [`Route::section`]) and a fresh admin port.
    pub fn start_config(config: impl FnOnce(u16) -> String) -> Self {
        Self::start_config_in(config, &[], &[], None)
    }

    /// [`Ferry::start_config`] with options before `run` (`--log-format json`) and this
    /// `FERRY_LOG`.
    pub fn start_config_logged(
        config: impl FnOnce(u16) -> String,
        options: &[&str],
        ferry_log: &str,
    ) -> Self {
        Self::start_config_in(config, &[], options, Some(ferry_log))
    }

    /// [`Ferry::start_config`] with the admin server on `admin_port`: a ferry started again
    /// where the one before it was, as after a restart.
    pub fn start_config_at(admin_port: u16, config: impl FnOnce(u16) -> String) -> Self {
        Self::start_at(admin_port, config, &[], &[], None, false)
    }

    fn start_config_in(
        config: impl FnOnce(u16) -> String,
        wrapper: &[&str],
        options: &[&str],
        ferry_log: Option<&str>,
    ) -> Self {
        Self::start_at(
            crate::free_port(),
            config,
            wrapper,
            options,
            ferry_log,
            false,
        )
    }

    /// Starts `ferry run` with `route` and this `FERRY_LOG`, its stderr a pipe that nobody
    /// reads (a stalled log shipper): once the pipe is full, every write to it blocks.
    /// [`Ferry::log`] is empty.
    pub fn start_unread(route: &Route<'_>, ferry_log: &str) -> Self {
        let mut ferry = Self::start_at(
            crate::free_port(),
            |port| route.config(port),
            &[],
            &[],
            Some(ferry_log),
            true,
        );
        std::fs::write(&ferry.log, "").expect("log file");
        ferry._unread = ferry.child.stderr.take();
        ferry
    }

    fn start_at(
        admin_port: u16,
        config: impl FnOnce(u16) -> String,
        wrapper: &[&str],
        options: &[&str],
        ferry_log: Option<&str>,
        unread_stderr: bool,
    ) -> Self {
        let dir = scratch("ferry");
        let file = dir.join("ferry.toml");
        std::fs::write(&file, config(admin_port)).expect("write config");
        let log = dir.join("ferry.log");
        // FERRY_TEST_LOG widens the log of a test that needs more detail.
        let ferry_log = ferry_log.map(str::to_owned).unwrap_or_else(|| {
            std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "info,ferry_core=debug".into())
        });
        let child = command_in(wrapper)
            .args(options)
            .arg("run")
            .arg("--config")
            .arg(&file)
            .env("FERRY_LOG", ferry_log)
            .stdout(std::fs::File::create(log.with_extension("out")).expect("output file"))
            .stderr(if unread_stderr {
                Stdio::piped()
            } else {
                std::fs::File::create(&log).expect("log file").into()
            })
            .spawn()
            .expect("spawn ferry");
        Self {
            child,
            admin_port,
            log,
            ready_marker: None,
            config: Some(file),
            _unread: None,
        }
    }

    /// Starts another bridge program (a backend built outside ferry) that logs
    /// `ready_marker` once it receives.
    pub fn start_program(path: &std::path::Path, args: &[String], ready_marker: &str) -> Self {
        let dir = scratch("bridge");
        let log = dir.join("bridge.log");
        let child = Command::new(path)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", path.display()));
        Self {
            child,
            admin_port: 0,
            log,
            ready_marker: Some(ready_marker.to_owned()),
            config: None,
            _unread: None,
        }
    }

    /// The process id (of the wrapper, for [`Ferry::start_in`]).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The resident memory of the process now, in KiB (`VmRSS` in /proc).
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
            })
            .expect("VmRSS of a running ferry")
    }

    /// CPU seconds the process has used so far (user + system, from `/proc`).
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("read /proc/<pid>/stat");
        // The command name may hold spaces; the fields after it are fixed.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name;
        // the kernel counts them in 100 Hz ticks on Linux.
        (ticks(11) + ticks(12)) / 100.0
    }

    /// Resident memory (`VmRSS`) in bytes and open sockets, from `/proc`.
    pub fn rss_and_sockets(&self) -> (u64, usize) {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let sockets = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| {
                fds.filter_map(Result::ok)
                    .filter(|fd| {
                        std::fs::read_link(fd.path())
                            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                    })
                    .count()
            })
            .unwrap_or(0);
        (rss_kb * 1024, sockets)
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

    /// Replaces the configuration file with `text` (`ferry run` reads it again on SIGHUP).
    /// Written to a temporary file and renamed, so a reload never reads half a file.
    pub fn rewrite_config(&self, text: &str) {
        let file = self
            .config
            .as_ref()
            .expect("a ferry started with a config file");
        let next = file.with_extension("toml.next");
        std::fs::write(&next, text).expect("write config");
        std::fs::rename(&next, file).expect("replace config");
    }

    /// Asks ferry to read its configuration again (SIGHUP).
    pub fn reload(&self) {
        self.signal("HUP");
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

    /// What `ferry run` wrote to its standard output so far (the audit trail's
    /// `output = "stdout"`; nothing else goes there).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("out")).unwrap_or_default()
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

    /// Calls the admin API without a token: the status and the JSON answer (`Null` when
    /// the answer is not JSON).
    pub async fn admin(&self, method: reqwest::Method, path: &str) -> (u16, serde_json::Value) {
        let response = reqwest::Client::new()
            .request(
                method,
                format!("http://127.0.0.1:{}{path}", self.admin_port),
            )
            .send()
            .await
            .expect("admin call");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("admin answer body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    /// Waits until `/readyz` answers 200 (every route receiving), or for a program
    /// without an admin server, until it logs its ready marker.
    pub async fn wait_ready(&self, limit: Duration) {
        let url = format!("http://127.0.0.1:{}/readyz", self.admin_port);
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Some(marker) = &self.ready_marker {
                if self.log().contains(marker.as_str()) {
                    return;
                }
            } else if let Ok(r) = reqwest::get(&url).await {
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

/// What a `ferry` command wrote to stderr besides its log lines (which files were read,
/// warnings): the `ferry: ...` lines it ended with, and anything else that should not be
/// there (a panic, a client library's own output).
pub fn fatal_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty() && !is_log_line(l))
        .map(str::to_owned)
        .collect()
}

/// `2026-01-01T00:00:00.000000Z  INFO target: ...`, a line of ferry's text log.
fn is_log_line(line: &str) -> bool {
    let mut words = line.split_whitespace();
    let stamp = words.next().unwrap_or("");
    let level = words.next().unwrap_or("");
    stamp.len() > 20
        && stamp.as_bytes()[4] == b'-'
        && stamp.ends_with('Z')
        && ["INFO", "WARN", "DEBUG", "TRACE"].contains(&level)
}

/// Runs `ferry` with `args` and these environment variables set (`Some`) or removed
/// (`None`) on top of the usual test environment.
pub fn run_cli_env(args: &[&str], env: &[(&str, Option<&str>)]) -> Output {
    let mut cmd = command();
    for (name, value) in env {
        match value {
            Some(v) => cmd.env(name, v),
            None => cmd.env_remove(name),
        };
    }
    cmd.args(args).output().expect("run ferry")
}
