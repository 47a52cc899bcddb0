//! A 2xx answer to a batch acks every message it does not name as failed, so ferry must
//! have read all of it and understood it. Against the local RabbitMQ and a raw TCP endpoint
//! that answers each first attempt with a broken 2xx — cut off mid-body, `failed` holding
//! numbers, longer than ferry reads — every message of those batches must come again, and
//! each message is acked exactly once, after the sound answer to its second attempt.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_e2e::amqp::Rabbit;
use ferry_e2e::ferry::{amqp_source, Route};
use ferry_e2e::Ferry;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// What the endpoint does with a batch whose messages are all at their first attempt.
#[derive(Clone, Copy)]
enum Broken {
    /// `Content-Length` promises more than is sent, then the connection closes.
    CutShort,
    /// A complete `{"failed": [1, 2]}`: not the documented list of ids.
    NumbersForIds,
    /// A valid JSON answer of 256 KiB, past what ferry reads of an answer.
    OverLong,
}

/// One batch request as the endpoint read it: each envelope's (msg, attempt).
type Request = Vec<(String, u64)>;

/// A raw HTTP/1.1 endpoint on loopback: reads each request by its `Content-Length` and
/// answers first attempts as `broken` says, every other request with an empty 200.
async fn raw_endpoint(broken: Broken) -> (String, Arc<Mutex<Vec<Request>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/deliver", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                while let Some(body) = read_request(&mut stream).await {
                    let request: Request = serde_json::from_slice::<Vec<Value>>(&body)
                        .unwrap_or_default()
                        .iter()
                        .map(|e| {
                            (
                                e["msg"].as_str().unwrap_or_default().to_owned(),
                                e["attempt"].as_u64().unwrap_or(0),
                            )
                        })
                        .collect();
                    let first = request.iter().all(|(_, attempt)| *attempt == 1);
                    log.lock().expect("lock").push(request);
                    let stream = stream.get_mut();
                    if !first {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let answer = match broken {
                        Broken::CutShort => {
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{\"failed\": [\"".to_vec()
                        }
                        Broken::NumbersForIds => {
                            let body = r#"{"failed":[1,2]}"#;
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .into_bytes()
                        }
                        Broken::OverLong => {
                            let body = format!(
                                r#"{{"failed":[],"padding":"{}"}}"#,
                                "x".repeat(256 * 1024)
                            );
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .into_bytes()
                        }
                    };
                    let _ = stream.write_all(&answer).await;
                    if matches!(broken, Broken::CutShort | Broken::OverLong) {
                        // Cut: the promised rest never comes. Over-long: ferry stops
                        // reading, so the connection cannot carry another request.
                        let _ = stream.shutdown().await;
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}

/// Reads one request's head and its `Content-Length` body; `None` once the client closes.
async fn read_request(stream: &mut BufReader<tokio::net::TcpStream>) -> Option<Vec<u8>> {
    let mut length = 0usize;
    let mut started = false;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            if started {
                break;
            }
            continue;
        }
        started = true;
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.ok()?;
    Some(body)
}

async fn broken_answer_retries_the_whole_batch(broken: Broken) {
    const N: usize = 30;
    let rabbit = Rabbit::connect().await;
    let queue = rabbit.queue("batch-answer").await;
    let (url, seen) = raw_endpoint(broken).await;
    let sent = rabbit.publish_numbered(&queue.name, "ba", N).await;
    let ferry = Ferry::start(&Route {
        source: amqp_source(&queue.name, "prefetch = 50"),
        sink_url: &url,
        sink: "",
        delivery: "concurrency = 2\nmin_backoff = \"10ms\"\nmax_backoff = \"50ms\"\n\
                   batch = { max_messages = 10, max_wait = \"50ms\" }",
    });
    ferry.wait_ready(Duration::from_secs(30)).await;
    let delivered =
        r#"ferry_deliveries_total{route="r",source="amqp",sink="http",outcome="delivered"}"#;
    let mut count = None;
    for _ in 0..200 {
        count = ferry.metric(delivered).await;
        if count == Some(N as f64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Settle: nothing more may be acked or sent after the last sound answer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        ferry.metric(delivered).await,
        Some(N as f64),
        "acked (after {count:?}); log:\n{}",
        ferry.log()
    );
    assert_eq!(rabbit.depth(&queue.name).await, 0, "left in the queue");
    assert_eq!(rabbit.depth(&queue.dead_letter).await, 0, "dead-lettered");

    let mut attempts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for request in seen.lock().expect("lock").iter() {
        for (msg, attempt) in request {
            attempts.entry(msg.clone()).or_default().push(*attempt);
        }
    }
    assert_eq!(
        attempts
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        sent,
        "every message reached the endpoint"
    );
    // The broken answer acked nothing: each message came exactly twice, the second time
    // as a retry, and the sound answer to that acked it.
    let wrong: Vec<_> = attempts.iter().filter(|(_, a)| *a != &[1, 2]).collect();
    assert!(wrong.is_empty(), "attempts per message: {wrong:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answer_cut_off_mid_body_acks_nothing() {
    broken_answer_retries_the_whole_batch(Broken::CutShort).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answer_with_numbers_for_ids_acks_nothing() {
    broken_answer_retries_the_whole_batch(Broken::NumbersForIds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_batch_answer_acks_nothing() {
    broken_answer_retries_the_whole_batch(Broken::OverLong).await;
}
