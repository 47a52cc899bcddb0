//! A real HTTP endpoint on 127.0.0.1 that records every request and answers as told.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;

/// One request as the endpoint saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `X-Ferry-Message-Id`.
    pub id: String,
    /// `X-Ferry-Attempt`.
    pub attempt: u32,
    /// The request body.
    pub body: Bytes,
    /// All request headers.
    pub headers: HeaderMap,
    /// The status the endpoint answered.
    pub status: u16,
    /// When the request arrived.
    pub at: Instant,
    /// Requests open when it arrived, itself included (what an endpoint with a fixed
    /// capacity judges by).
    pub open: usize,
}

impl Seen {
    /// The envelope's `msg`.
    pub fn msg(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v.get("msg")?.as_str().map(str::to_owned)
    }
}

/// How to answer one request.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Extra response headers.
    pub headers: Vec<(&'static str, String)>,
    /// Response body.
    pub body: String,
}

impl Reply {
    /// 200 at once.
    pub fn ok() -> Self {
        Self::status(200)
    }

    /// This status at once.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            delay: Duration::ZERO,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    /// Wait before answering.
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Answer with this body.
    pub fn body(mut self, body: &str) -> Self {
        self.body = body.to_owned();
        self
    }
}

type Behaviour = dyn Fn(&Seen) -> Reply + Send + Sync;

struct Inner {
    seen: Mutex<Vec<Seen>>,
    /// Every request as it arrived, also those whose client gave up before the answer.
    arrived: Mutex<Vec<(String, u32)>>,
    behaviour: Box<Behaviour>,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
}

/// The recording endpoint; dropping it does not stop the server (tests are short-lived).
#[derive(Clone)]
pub struct Endpoint {
    addr: SocketAddr,
    inner: Arc<Inner>,
}

impl Endpoint {
    /// Starts an endpoint that answers with `behaviour(request)`.
    pub async fn start(behaviour: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Self {
        Self::start_on(0, behaviour).await
    }

    /// [`Endpoint::start`] on a given loopback port (0: any), e.g. one that refused
    /// connections until now: an endpoint that comes back after an outage.
    pub async fn start_on(
        port: u16,
        behaviour: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let inner = Arc::new(Inner {
            seen: Mutex::new(Vec::new()),
            arrived: Mutex::new(Vec::new()),
            behaviour: Box::new(behaviour),
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the test endpoint");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { addr, inner }
    }

    /// The endpoint's socket address (to put a proxy in front of it).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL to configure as the sink.
    pub fn url(&self) -> String {
        format!("http://{}/deliver", self.addr)
    }

    /// The envelope `msg` of every accepted request, duplicates included.
    pub fn delivered_msgs(&self) -> Vec<String> {
        self.delivered().iter().filter_map(Seen::msg).collect()
    }

    /// The distinct envelope `msg`s accepted.
    pub fn delivered_set(&self) -> std::collections::BTreeSet<String> {
        self.delivered_msgs().into_iter().collect()
    }

    /// How often each envelope `msg` was accepted.
    pub fn delivered_counts(&self) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for msg in self.delivered_msgs() {
            *counts.entry(msg).or_default() += 1;
        }
        counts
    }

    /// Requests open right now.
    pub fn open(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests that were open at once.
    pub fn peak_in_flight(&self) -> usize {
        self.inner.peak.load(Ordering::SeqCst)
    }

    /// `(X-Ferry-Message-Id, X-Ferry-Attempt)` of every request as it arrived, also those
    /// the client gave up on (a timeout) before the answer.
    pub fn arrivals(&self) -> Vec<(String, u32)> {
        self.inner.arrived.lock().expect("lock").clone()
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().expect("lock").clone()
    }

    /// Requests answered with 2xx so far.
    pub fn delivered(&self) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| (200..300).contains(&s.status))
            .collect()
    }

    /// Number of distinct message ids answered with 2xx.
    pub fn delivered_unique(&self) -> usize {
        let mut ids: Vec<String> = self.delivered().into_iter().map(|s| s.id).collect();
        ids.sort();
        ids.dedup();
        ids.len()
    }

    /// Ids whose `X-Ferry-Attempt` headers, in the order the requests came, are not
    /// 1, 2, 3, ...: an attempt number that claims requests the endpoint never saw (or
    /// repeats one), with what it saw.
    pub fn untruthful_attempts(&self) -> Vec<(String, Vec<u32>)> {
        let mut by_id: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
        for s in self.seen() {
            by_id.entry(s.id).or_default().push(s.attempt);
        }
        by_id
            .into_iter()
            .filter(|(_, attempts)| attempts.iter().zip(1..).any(|(a, n)| *a != n))
            .collect()
    }

    /// Ids whose highest `X-Ferry-Attempt` is above the number of requests the endpoint
    /// got for them (arrivals, answered or not): attempts burnt without a request. Unlike
    /// [`Endpoint::untruthful_attempts`] it allows the copies of a message a broker handed
    /// out twice at once to arrive in either order.
    pub fn overcounted_attempts(&self) -> Vec<(String, Vec<u32>)> {
        let mut by_id: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
        for (id, attempt) in self.arrivals() {
            by_id.entry(id).or_default().push(attempt);
        }
        by_id
            .into_iter()
            .filter(|(_, a)| a.iter().max().is_some_and(|m| *m as usize > a.len()))
            .collect()
    }

    /// Ids accepted more than once where more than one of those copies claimed to be a
    /// first attempt: a duplicate the endpoint could not recognise as a redelivery.
    /// Brokers may hand a message out twice; ferry must then label the extra copy with
    /// `X-Ferry-Attempt` > 1, whatever order the copies arrive in.
    pub fn unlabelled_duplicates(&self) -> Vec<String> {
        let mut first_attempts: std::collections::HashMap<String, usize> = Default::default();
        for s in self.delivered() {
            if s.attempt <= 1 {
                *first_attempts.entry(s.id).or_default() += 1;
            }
        }
        let mut ids: Vec<String> = first_attempts
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        ids
    }
}

async fn handle(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let now = inner.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    inner.peak.fetch_max(now, Ordering::SeqCst);
    let mut seen = Seen {
        id: header("x-ferry-message-id"),
        attempt: header("x-ferry-attempt").parse().unwrap_or(0),
        body,
        headers: headers.clone(),
        status: 0,
        at: Instant::now(),
        open: now,
    };
    inner
        .arrived
        .lock()
        .expect("lock")
        .push((seen.id.clone(), seen.attempt));
    let reply = (inner.behaviour)(&seen);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    inner.in_flight.fetch_sub(1, Ordering::SeqCst);
    seen.status = reply.status;
    inner.seen.lock().expect("lock").push(seen);
    let mut response = (
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        reply.body,
    )
        .into_response();
    for (name, value) in reply.headers {
        if let Ok(v) = value.parse() {
            response.headers_mut().insert(name, v);
        }
    }
    response
}
