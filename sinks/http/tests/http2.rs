//! The HTTP sink with `http2 = true` against real HTTP/2 (h2c) servers on loopback: one
//! connection for every request, a stream limit below the concurrency, a server that sends
//! GOAWAY after a few requests, and an endpoint that only speaks HTTP/1.1.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ferry_core::{Message, Sink, SinkResponse};
use ferry_http::{HttpSink, HttpSinkConfig, Mode};
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// What the server saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    /// Message id → how many requests carried it.
    ids: Mutex<HashMap<String, usize>>,
    /// Requests that were not HTTP/2, or lacked the authority or the path.
    wrong: Mutex<Vec<String>>,
}

/// An h2c-only server: at most `streams` requests at once per connection, each answered
/// after `delay`; with `goaway_after`, a connection is shut down gracefully (GOAWAY) once
/// it has answered that many; without `read_body` it answers without reading the body,
/// as many endpoints that only look at headers do.
async fn h2_server(
    streams: u32,
    delay: Duration,
    goaway_after: Option<usize>,
    read_body: bool,
) -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let authority = addr.to_string();
    let all = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            all.connections.fetch_add(1, Ordering::SeqCst);
            let seen = all.clone();
            let authority = authority.clone();
            tokio::spawn(async move {
                let answered = Arc::new(AtomicUsize::new(0));
                let done = Arc::new(tokio::sync::Notify::new());
                let service = {
                    let answered = answered.clone();
                    let done = done.clone();
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        let authority = authority.clone();
                        let answered = answered.clone();
                        let done = done.clone();
                        async move {
                            let ok = request.version() == Version::HTTP_2
                                && request.uri().authority().map(|a| a.as_str())
                                    == Some(authority.as_str())
                                && request.uri().path() == "/in";
                            if !ok {
                                seen.wrong.lock().expect("lock").push(format!(
                                    "{:?} {}",
                                    request.version(),
                                    request.uri()
                                ));
                            }
                            let id = request
                                .headers()
                                .get("x-ferry-message-id")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("?")
                                .to_owned();
                            if read_body {
                                let _ = request.into_body().collect().await;
                            }
                            tokio::time::sleep(delay).await;
                            *seen.ids.lock().expect("lock").entry(id).or_default() += 1;
                            let n = answered.fetch_add(1, Ordering::SeqCst) + 1;
                            if goaway_after == Some(n) {
                                done.notify_one();
                            }
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(StatusCode::NO_CONTENT)
                                    .body(Full::new(Bytes::new()))
                                    .expect("response"),
                            )
                        }
                    })
                };
                let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(streams)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => return,
                    () = done.notified() => connection.as_mut().graceful_shutdown(),
                }
                let _ = connection.await;
            });
        }
    });
    (format!("http://{addr}/in"), seen)
}

fn sink(url: &str) -> HttpSink {
    HttpSink::new(HttpSinkConfig {
        route: Arc::from("orders"),
        url: url.parse().expect("url"),
        mode: Mode::Envelope,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
        pool_size: 4,
        headers: Vec::new(),
        health_url: None,
        signing: None,
        tls: Default::default(),
        http2: true,
    })
    .expect("sink")
}

fn message(i: usize) -> Message {
    Message::new(format!("m-{i}"), format!("body {i}"), Arc::from("q"))
}

/// Delivers `count` messages `at_once` at a time, each retried (as the engine would) until
/// it gets a 2xx, at most 5 times; returns how many tries failed.
async fn deliver_all(sink: Arc<HttpSink>, count: usize, at_once: usize) -> usize {
    let failed = Arc::new(AtomicUsize::new(0));
    let limit = Arc::new(tokio::sync::Semaphore::new(at_once));
    let mut tasks = Vec::new();
    for i in 0..count {
        let (sink, failed) = (sink.clone(), failed.clone());
        let permit = limit.clone().acquire_owned().await.expect("permit");
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            for _ in 0..5 {
                match sink.deliver(&message(i)).await {
                    SinkResponse::Status { status: 204, .. } => return,
                    other => {
                        assert!(
                            !matches!(other, SinkResponse::Status { .. }),
                            "message {i}: {other:?}"
                        );
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            panic!("message {i} got no 2xx in 5 tries");
        }));
    }
    for task in tasks {
        task.await.expect("delivery task");
    }
    failed.load(Ordering::SeqCst)
}

fn assert_each_once(seen: &Seen, count: usize) {
    let ids = seen.ids.lock().expect("lock");
    for i in 0..count {
        let n = ids.get(&format!("m-{i}")).copied().unwrap_or(0);
        assert!(n >= 1, "m-{i} never reached the endpoint");
    }
    assert!(
        seen.wrong.lock().expect("lock").is_empty(),
        "requests not as HTTP/2 to the origin: {:?}",
        seen.wrong.lock().expect("lock")
    );
}

#[tokio::test]
async fn every_request_shares_one_connection_beyond_the_stream_limit() {
    // 64 at once against a limit of 16 streams: hyper holds the rest until a stream is
    // free; none fails and none opens a second connection.
    let (url, seen) = h2_server(16, Duration::from_millis(20), None, true).await;
    let sink = Arc::new(sink(&url));
    let failed = deliver_all(sink, 400, 64).await;
    assert_eq!(failed, 0, "tries that failed");
    assert_each_once(&seen, 400);
    let ids = seen.ids.lock().expect("lock");
    assert!(ids.values().all(|&n| n == 1), "a message went twice");
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1, "connections");
}

#[tokio::test]
async fn a_goaway_moves_the_next_requests_to_a_new_connection() {
    // Every connection is shut down after 25 answers: the sink must go on on new ones,
    // and every message must reach the endpoint.
    let (url, seen) = h2_server(100, Duration::from_millis(2), Some(25), true).await;
    let sink = Arc::new(sink(&url));
    let failed = deliver_all(sink, 300, 16).await;
    assert_each_once(&seen, 300);
    // A graceful GOAWAY still lets the streams opened meanwhile finish, so a connection
    // may carry more than 25; but it ends, and the sink goes on on a new one.
    let connections = seen.connections.load(Ordering::SeqCst);
    assert!(connections >= 3, "only {connections} connections");
    // A request caught by the GOAWAY fails and is tried again; most are not.
    assert!(failed < 60, "{failed} tries failed");
}

#[tokio::test]
async fn an_endpoint_that_answers_before_reading_the_body_is_no_failure() {
    // The server then resets each stream it answered (RST_STREAM NO_ERROR): that is not a
    // failed request, and thousands of them must not wear out the connection.
    let (url, seen) = h2_server(200, Duration::ZERO, None, false).await;
    let sink = Arc::new(sink(&url));
    let failed = deliver_all(sink, 3000, 64).await;
    assert_each_once(&seen, 3000);
    assert_eq!(failed, 0, "tries that failed");
    assert_eq!(seen.connections.load(Ordering::SeqCst), 1, "connections");
}

#[tokio::test]
async fn an_endpoint_that_only_speaks_http1_is_an_error_not_an_answer() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // hyper's HTTP/1.1 server alone (axum would detect HTTP/2's preface and speak it).
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let sink = sink(&format!("http://{addr}/in"));
    match sink.deliver(&message(1)).await {
        SinkResponse::Error(line) | SinkResponse::Unreachable(line) => {
            assert!(!line.contains('\n'), "one line: {line}");
            assert!(line.to_lowercase().contains("http/2"), "{line}");
        }
        other => panic!("an HTTP/1.1-only endpoint answered an HTTP/2 request: {other:?}"),
    }
}
