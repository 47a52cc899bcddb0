//! Test kit for ferry's end-to-end tests: the local SQS/SNS emulator, a recording HTTP
//! endpoint that can be told how to answer, and the real `ferry` binary as a process.
//!
//! Tests that need a broker fail loudly when it is not there; they never skip.

pub mod amqp;
pub mod audit_store;
pub mod browser;
pub mod conformance;
pub mod endpoint;
pub mod faults;
pub mod ferry;
pub mod fleet;
pub mod kafka;
pub mod proxy;
pub mod sns;
pub mod sqs;

use std::future::Future;
use std::time::Duration;

pub use amqp::amqp_uri;
pub use endpoint::{Endpoint, Reply, Seen};
pub use ferry::Ferry;

/// The SQS/SNS emulator's address (`FERRY_TEST_SQS_ENDPOINT`, default the local moto server).
pub fn sqs_endpoint() -> String {
    std::env::var("FERRY_TEST_SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4566".into())
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros();
    format!(
        "{prefix}-{}-{now}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` until it is true or `limit` passes; returns whether it became true.
pub async fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

/// Polls `count` until it is 0 or `limit` passes; the last count when it never got there.
pub async fn until_zero<F: Future<Output = u64>>(
    limit: Duration,
    mut count: impl FnMut() -> F,
) -> Result<(), u64> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = count().await;
        if left == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(left);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A free loopback port (bound then released) for a ferry admin server.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
