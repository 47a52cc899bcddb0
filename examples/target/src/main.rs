//! `example-target`: a small HTTP endpoint for the demo and for trying ferry by hand.
//! It prints one line per request and can be told to add latency or to fail some requests,
//! like the sample target app of the service ferry replaces.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use clap::Parser;
use ferry_http::SigningKey;
use rand::Rng;

/// Prints what it receives; answers 200 unless told otherwise.
#[derive(Parser, Debug)]
#[command(name = "example-target", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4000")]
    listen: SocketAddr,
    /// Milliseconds to wait before answering each request.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Fraction of requests (0.0 to 1.0) answered with 500, at random.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Answer 500 to every Nth request (0: never).
    #[arg(long, default_value_t = 0)]
    fail_every: u64,
    /// Status for requests that are not failed on purpose.
    #[arg(long, default_value_t = 200)]
    status: u16,
    /// Standard Webhooks secret (`whsec_...`): requests without a valid signature are
    /// answered 401, as a signature-checking endpoint should.
    #[arg(long, env = "SIGNING_SECRET", hide_env_values = true)]
    signing_secret: Option<String>,
}

/// Shared state of the handler: the options and a request counter (for `--fail-every`).
struct Target {
    /// The command-line options.
    args: Args,
    /// Requests seen so far.
    count: AtomicU64,
    /// The key signatures are checked with, if any.
    key: Option<SigningKey>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.fail_rate) {
        return Err(format!("--fail-rate {} is not between 0.0 and 1.0", args.fail_rate).into());
    }
    StatusCode::from_u16(args.status)
        .map_err(|_| format!("--status {} is not an HTTP status", args.status))?;
    let key = args
        .signing_secret
        .as_deref()
        .map(SigningKey::from_secret)
        .transpose()
        .map_err(|e| format!("--signing-secret: {e}"))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    println!("example-target listening on http://{}", args.listen);
    std::io::stdout().flush()?;
    let state = Arc::new(Target {
        args,
        count: AtomicU64::new(0),
        key,
    });
    let app = axum::Router::new().fallback(handle).with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

/// Resolves on ctrl-c (SIGINT) or, on Unix, SIGTERM, so in-flight requests are answered
/// before the process exits.
async fn shutdown_signal() {
    let ctrl_c = async {
        // If the handler cannot be installed, never resolve from this branch.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// Checks the Standard Webhooks headers of a request against `key`.
fn check_signature(key: &SigningKey, headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| format!("no {name} header"))
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    key.verify(
        header("webhook-id")?,
        header("webhook-timestamp")?,
        body,
        header("webhook-signature")?,
        now,
    )
    .map_err(|e| e.to_string())
}

/// Answers every request (any method, any path): checks the signature if asked to, waits
/// `--latency-ms`, decides whether to fail it, prints one line and replies.
async fn handle(
    State(target): State<Arc<Target>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let n = target.count.fetch_add(1, Ordering::Relaxed) + 1;
    let args = &target.args;
    if let Some(key) = &target.key {
        if let Err(why) = check_signature(key, &headers, &body) {
            println!("{n} {} refused: {why}", uri.path());
            return (StatusCode::UNAUTHORIZED, "bad signature");
        }
    }
    if args.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(args.latency_ms)).await;
    }
    let fail = (args.fail_every > 0 && n % args.fail_every == 0)
        || (args.fail_rate > 0.0 && rand::thread_rng().gen_bool(args.fail_rate));
    let status = if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::from_u16(args.status).unwrap_or(StatusCode::OK)
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    let text = String::from_utf8_lossy(&body);
    let shown: String = text.chars().take(200).collect();
    // One line per request, flushed at once so a tailing script sees it immediately.
    // A closed stdout must not fail the request, so write errors are ignored.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{} {} id={} attempt={} -> {}: {}",
        n,
        uri.path(),
        header("x-ferry-message-id"),
        header("x-ferry-attempt"),
        status.as_u16(),
        shown
    );
    let _ = out.flush();
    drop(out);
    let reply = if status.is_success() {
        "ok"
    } else {
        "failed on purpose"
    };
    (status, reply)
}
