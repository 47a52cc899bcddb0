//! The HTTP sink against a real HTTP server on loopback.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use ferry_core::{Action, Message, Sink, SinkResponse};
use ferry_http::{HttpSink, HttpSinkConfig, Mode};

#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    peers: std::sync::Mutex<std::collections::HashSet<std::net::SocketAddr>>,
}

async fn answer(
    State(seen): State<Arc<Seen>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    seen.requests.fetch_add(1, Ordering::SeqCst);
    seen.peers.lock().expect("lock").insert(peer);
    assert_eq!(headers["authorization"], "Bearer t0ken");
    match body.as_str() {
        b if b.contains("\"msg\":\"slow\"") => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            StatusCode::OK.into_response()
        }
        b if b.contains("\"msg\":\"busy\"") => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "7")],
            "busy",
        )
            .into_response(),
        b if b.contains("\"msg\":\"poison\"") => (
            StatusCode::OK,
            [("ferry-action", "dead-letter")],
            "unknown customer 42",
        )
            .into_response(),
        _ => StatusCode::NO_CONTENT.into_response(),
    }
}

async fn server() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = axum::Router::new()
        .fallback(answer)
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .await
    });
    (format!("http://{addr}/in"), seen)
}

fn sink(url: &str, timeout: Duration) -> HttpSink {
    HttpSink::new(config(url, timeout)).expect("sink")
}

fn config(url: &str, timeout: Duration) -> HttpSinkConfig {
    HttpSinkConfig {
        route: Arc::from("orders"),
        url: url.parse().expect("url"),
        mode: Mode::Envelope,
        timeout,
        connect_timeout: Duration::from_secs(1),
        pool_size: 4,
        headers: vec![("Authorization".into(), "Bearer t0ken".into())],
        health_url: None,
        signing: None,
        tls: Default::default(),
        http2: false,
    }
}

fn message(msg: &str) -> Message {
    Message::new(format!("id-{msg}"), msg.to_owned(), Arc::from("q"))
}

#[tokio::test]
async fn answers_become_sink_responses_and_connections_are_reused() {
    let (url, seen) = server().await;
    let sink = sink(&url, Duration::from_millis(500));

    for _ in 0..50 {
        match sink.deliver(&message("fine")).await {
            SinkResponse::Status { status: 204, .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // Sequential requests on a keep-alive pool use one connection.
    assert_eq!(seen.peers.lock().expect("lock").len(), 1);

    assert_eq!(
        sink.deliver(&message("busy")).await,
        SinkResponse::Status {
            status: 503,
            retry_after: Some(Duration::from_secs(7)),
            action: None,
            detail: "busy".into(),
        }
    );
    assert_eq!(
        sink.deliver(&message("poison")).await,
        SinkResponse::Status {
            status: 200,
            retry_after: None,
            action: Some(Action::DeadLetter),
            detail: "unknown customer 42".into(),
        }
    );
    assert_eq!(sink.deliver(&message("slow")).await, SinkResponse::Timeout);
    assert_eq!(seen.requests.load(Ordering::SeqCst), 53);
}

#[tokio::test]
async fn refused_connection_is_an_error_without_the_url() {
    // Bind and drop to find a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let sink = sink(
        &format!("http://user:secret@127.0.0.1:{port}/in"),
        Duration::from_secs(1),
    );
    // Nothing was sent: not an attempt.
    match sink.deliver(&message("x")).await {
        SinkResponse::Unreachable(text) => {
            assert!(text.starts_with("connection failed"), "{text}");
            assert!(!text.contains("secret"), "{text}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Answers each connection's requests with 200 and closes it `linger` after each answer,
/// recording the `Authorization` header it saw; a raw socket, so the close is exactly when
/// the test says.
async fn closing_server(linger: Duration) -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // Headers up to the blank line, then the body its Content-Length says.
                loop {
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length: "))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            let auth = text
                                .lines()
                                .find_map(|l| l.strip_prefix("authorization: "))
                                .unwrap_or("")
                                .to_owned();
                            record.lock().expect("lock").push(auth);
                            break;
                        }
                    }
                }
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
                tokio::time::sleep(linger).await;
            });
        }
    });
    (format!("http://{addr}/in"), seen)
}

#[tokio::test]
async fn a_pooled_connection_the_endpoint_closed_is_not_used() {
    let (url, seen) = closing_server(Duration::from_millis(20)).await;
    // User info in the URL is sent as Basic auth, percent-decoded.
    let url = url.replace("http://", "http://ops:p%40ss@");
    let sink = HttpSink::new(HttpSinkConfig {
        headers: Vec::new(),
        ..config(&url, Duration::from_secs(2))
    })
    .expect("sink");
    for round in 0..5 {
        match sink.deliver(&message("fine")).await {
            SinkResponse::Status { status: 200, .. } => {}
            other => panic!("round {round}: {other:?}"),
        }
        // By now the endpoint has closed the connection the pool holds.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(
        seen.len(),
        5,
        "one request per delivery, none lost or repeated"
    );
    // "ops:p@ss" in base64.
    assert!(seen.iter().all(|a| a == "Basic b3BzOnBAc3M="), "{seen:?}");
}

#[tokio::test]
async fn a_configured_authorization_header_wins_over_url_user_info() {
    let (url, seen) = closing_server(Duration::from_secs(5)).await;
    let url = url.replace("http://", "http://ops:secret@");
    // `config` sets `Authorization: Bearer t0ken`.
    let sink = sink(&url, Duration::from_secs(2));
    match sink.deliver(&message("fine")).await {
        SinkResponse::Status { status: 200, .. } => {}
        other => panic!("{other:?}"),
    }
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen, vec!["Bearer t0ken".to_owned()]);
}
