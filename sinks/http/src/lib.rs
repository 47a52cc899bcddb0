//! The HTTP push sink: one keep-alive client pool per route, the envelope and the headers of
//! the delivery contract (DESIGN section 2).
//!
//! The sink makes exactly one request per [`Sink::deliver`] call and turns whatever
//! happened into a [`SinkResponse`]; retries, backoff and dead-lettering are the engine's.

mod batch_answer;
mod client;
mod cloudevents;
mod envelope;
mod headers;
mod response;
pub mod signing;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferry_core::{BatchResponse, Message, Sink, SinkResponse};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::Method;
use url::Url;

use client::{Failure, Limits, Origin};

pub use cloudevents::cloudevent_headers;
pub use envelope::{encode_batch, encode_envelope};
pub use headers::message_headers;
pub use signing::SigningKey;

/// How the message travels in the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `{"id", "msg", "timestamp", "attributes"}` JSON, compatible with the original consumer.
    #[default]
    Envelope,
    /// The payload bytes unchanged; metadata only in headers.
    Raw,
    /// CloudEvents 1.0 HTTP binary mode: the payload as body, `ce-*` headers.
    CloudEvents,
}

/// Everything the sink needs, already validated by the caller.
#[derive(Clone)]
pub struct HttpSinkConfig {
    /// Route name, sent as `X-Ferry-Route`.
    pub route: Arc<str>,
    /// Where to POST.
    pub url: Url,
    /// Body format.
    pub mode: Mode,
    /// Whole-request timeout of one attempt.
    pub timeout: Duration,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Idle keep-alive connections kept per host.
    pub pool_size: usize,
    /// Static headers (may hold secrets; never logged).
    pub headers: Vec<(String, String)>,
    /// GET here says whether the endpoint is up (2xx) while the circuit breaker decides
    /// whether to receive.
    pub health_url: Option<Url>,
    /// Signs every request (Standard Webhooks), when set.
    pub signing: Option<SigningKey>,
    /// HTTPS trust and identity beyond the defaults.
    pub tls: TlsConfig,
    /// Speak HTTP/2: with prior knowledge (h2c) on `http://`, offered by ALPN on
    /// `https://` (where the endpoint may still answer in HTTP/1.1). Every request of the
    /// route then shares one connection, and `pool_size` does not apply.
    pub http2: bool,
}

/// HTTPS settings for endpoints behind a private CA or requiring client certificates.
#[derive(Clone, Default)]
pub struct TlsConfig {
    /// PEM certificates trusted in addition to the public roots (a private CA).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate chain followed by its private key, presented to endpoints
    /// that require mutual TLS.
    pub identity_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca", &self.ca_pem.is_some())
            .field("identity", &self.identity_pem.is_some())
            .finish()
    }
}

impl std::fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSinkConfig")
            .field("route", &self.route)
            .field("url", &self.url.as_str())
            .field("mode", &self.mode)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_size", &self.pool_size)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("signing", &self.signing.is_some())
            .field("tls", &self.tls)
            .field("http2", &self.http2)
            .finish()
    }
}

/// Why a sink could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpSinkError {
    /// A static header name or value is not valid HTTP.
    #[error("header {name:?}: {reason}")]
    Header {
        /// The header's name as configured.
        name: String,
        /// What is wrong with it (never the value: it may be a secret).
        reason: &'static str,
    },
    /// The endpoint URL cannot be connected to.
    #[error("url: {0}")]
    Url(String),
    /// A CA or client certificate could not be read.
    #[error("{what}: {detail}")]
    Tls {
        /// Which setting (`ca_file`, `client_cert_file`).
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

/// Pushes messages to one endpoint.
#[derive(Debug, Clone)]
pub struct HttpSink {
    origin: Arc<Origin>,
    mode: Mode,
    route: HeaderValue,
    fixed: HeaderMap,
    health: Option<Arc<Origin>>,
    signing: Option<SigningKey>,
}

impl HttpSink {
    /// Sets up the connection pool (it connects on the first request); fails on invalid
    /// static headers, a URL it cannot connect to or unusable TLS files.
    pub fn new(config: HttpSinkConfig) -> Result<Self, HttpSinkError> {
        let mut fixed = HeaderMap::new();
        match config.mode {
            Mode::Envelope => {
                fixed.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            Mode::Raw => {
                fixed.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
            }
            // Each event says its own content type.
            Mode::CloudEvents => {}
        }
        for (name, value) in &config.headers {
            let (header, value) =
                static_header(name, value).map_err(|reason| HttpSinkError::Header {
                    name: name.clone(),
                    reason,
                })?;
            fixed.insert(header, value);
        }
        let route = HeaderValue::from_str(&config.route).map_err(|_| HttpSinkError::Header {
            name: "X-Ferry-Route".into(),
            reason: "route name is not a valid header value",
        })?;
        let limits = Limits {
            timeout: config.timeout,
            connect_timeout: config.connect_timeout,
            max_idle: config.pool_size,
            http2: config.http2,
        };
        // A redirect is an answer, not a delivery: following it would turn the POST into a
        // GET (301/302/303) that a 200 then "acks" with the message never delivered. The
        // pool never follows one; a 3xx is retried and dead-lettered like any other
        // non-2xx. Retries are the engine's, counted and visible in X-Ferry-Attempt.
        let origin = Arc::new(Origin::new(&config.url, &config.tls, limits)?);
        let health = match &config.health_url {
            Some(url) => Some(Arc::new(Origin::new(
                url,
                &config.tls,
                Limits {
                    max_idle: 1,
                    ..limits
                },
            )?)),
            None => None,
        };
        Ok(Self {
            origin,
            mode: config.mode,
            route,
            fixed,
            health,
            signing: config.signing,
        })
    }

    /// Whether the endpoint answers, without delivering anything: `GET health_url` when
    /// one is set (which must answer 2xx), else `OPTIONS` on the URL, where any HTTP
    /// answer shows that something listens. `Ok` holds what was asked and its status.
    pub async fn probe(&self) -> Result<String, String> {
        let (origin, method, wants_success) = match &self.health {
            Some(health) => (health, Method::GET, true),
            None => (&self.origin, Method::OPTIONS, false),
        };
        let asked = format!("{method} {}", origin.shown());
        match origin.send(method, HeaderMap::new(), Bytes::new(), 0).await {
            Ok(answer) if wants_success && !answer.status.is_success() => {
                Err(format!("{asked} answered {}", answer.status.as_u16()))
            }
            Ok(answer) => Ok(format!("{asked} answered {}", answer.status.as_u16())),
            Err(Failure::Timeout) => Err(format!("{asked}: no answer within the timeout")),
            Err(Failure::Error(e) | Failure::Unreachable(e)) => Err(format!("{asked}: {e}")),
        }
    }

    /// POSTs to the endpoint; a request that got no answer is already a [`SinkResponse`].
    async fn post(
        &self,
        headers: HeaderMap,
        body: Bytes,
        keep: usize,
    ) -> Result<client::Answer, SinkResponse> {
        self.origin
            .send(Method::POST, headers, body, keep)
            .await
            .map_err(|failure| match failure {
                Failure::Timeout => SinkResponse::Timeout,
                Failure::Error(e) => SinkResponse::Error(e),
                Failure::Unreachable(e) => SinkResponse::Unreachable(e),
            })
    }

    fn body(&self, message: &Message) -> Bytes {
        match self.mode {
            Mode::Envelope => Bytes::from(encode_envelope(message)),
            Mode::Raw | Mode::CloudEvents => message.payload.clone(),
        }
    }
}

/// A configured header as it goes on the wire, marked sensitive (it may hold a secret), or
/// what is wrong with it (never the value).
pub fn static_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), &'static str> {
    let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| "not a valid header name")?;
    let mut value =
        HeaderValue::from_str(value).map_err(|_| "value has characters not allowed in a header")?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// Adds `webhook-id`, `webhook-timestamp` and `webhook-signature` for this attempt.
fn sign(key: &SigningKey, id: &str, body: &[u8], headers: &mut HeaderMap) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (Ok(id_value), Ok(signature)) = (
        HeaderValue::from_str(id),
        HeaderValue::from_str(&key.sign(id, now, body)),
    ) else {
        return;
    };
    headers.insert("webhook-id", id_value);
    headers.insert("webhook-timestamp", HeaderValue::from(now));
    headers.insert("webhook-signature", signature);
}

impl Sink for HttpSink {
    async fn deliver(&self, message: &Message) -> SinkResponse {
        let mut headers = self.fixed.clone();
        message_headers(message, &self.route, &mut headers);
        if self.mode == Mode::CloudEvents {
            cloudevent_headers(message, &mut headers);
        }
        let body = self.body(message);
        if let Some(key) = &self.signing {
            sign(key, &message.id, &body, &mut headers);
        }
        match self.post(headers, body, response::DETAIL_LIMIT).await {
            Ok(answer) => response::read(&answer),
            Err(failed) => failed,
        }
    }

    async fn deliver_batch(&self, messages: &[Message]) -> BatchResponse {
        let mut headers = self.fixed.clone();
        headers.insert("x-ferry-route", self.route.clone());
        headers.insert("x-ferry-batch-size", HeaderValue::from(messages.len()));
        let body = Bytes::from(encode_batch(messages));
        if let (Some(key), Some(first)) = (&self.signing, messages.first()) {
            sign(key, &format!("batch_{}", first.id), &body, &mut headers);
        }
        match self.post(headers, body, response::DRAIN_LIMIT).await {
            Ok(answer) => batch_answer::read(&answer),
            Err(response) => BatchResponse {
                response,
                failed: Vec::new(),
            },
        }
    }

    async fn healthy(&self) -> Option<bool> {
        let health = self.health.as_ref()?;
        let answer = health
            .send(Method::GET, HeaderMap::new(), Bytes::new(), 0)
            .await;
        Some(answer.is_ok_and(|a| a.status.is_success()))
    }
}
