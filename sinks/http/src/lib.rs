//! The HTTP push sink: one keep-alive client pool per route, the envelope and the headers of
//! the delivery contract (DESIGN section 2).
//!
//! The sink makes exactly one request per [`Sink::deliver`] call and turns whatever
//! happened into a [`SinkResponse`]; retries, backoff and dead-lettering are the engine's.

mod envelope;
mod headers;
mod response;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_core::{Message, Sink, SinkResponse};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use url::Url;

pub use envelope::encode_envelope;
pub use headers::message_headers;

/// How the message travels in the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `{"id", "msg", "timestamp", "attributes"}` JSON, compatible with the original consumer.
    #[default]
    Envelope,
    /// The payload bytes unchanged; metadata only in headers.
    Raw,
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
    /// The HTTP client could not be created (TLS set-up).
    #[error("HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Pushes messages to one endpoint.
#[derive(Debug, Clone)]
pub struct HttpSink {
    client: reqwest::Client,
    url: Url,
    mode: Mode,
    route: HeaderValue,
    fixed: HeaderMap,
    health_url: Option<Url>,
}

impl HttpSink {
    /// Builds the client pool; fails on invalid static headers.
    pub fn new(config: HttpSinkConfig) -> Result<Self, HttpSinkError> {
        let mut fixed = HeaderMap::new();
        let content_type = match config.mode {
            Mode::Envelope => "application/json",
            Mode::Raw => "application/octet-stream",
        };
        fixed.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        for (name, value) in &config.headers {
            let header =
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| HttpSinkError::Header {
                    name: name.clone(),
                    reason: "not a valid header name",
                })?;
            let mut value = HeaderValue::from_str(value).map_err(|_| HttpSinkError::Header {
                name: name.clone(),
                reason: "value has characters not allowed in a header",
            })?;
            value.set_sensitive(true);
            fixed.insert(header, value);
        }
        let route = HeaderValue::from_str(&config.route).map_err(|_| HttpSinkError::Header {
            name: "X-Ferry-Route".into(),
            reason: "route name is not a valid header value",
        })?;
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .pool_max_idle_per_host(config.pool_size)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(HttpSinkError::Client)?;
        Ok(Self {
            client,
            url: config.url,
            mode: config.mode,
            route,
            fixed,
            health_url: config.health_url,
        })
    }

    fn body(&self, message: &Message) -> Bytes {
        match self.mode {
            Mode::Envelope => Bytes::from(encode_envelope(message)),
            Mode::Raw => message.payload.clone(),
        }
    }
}

impl Sink for HttpSink {
    async fn deliver(&self, message: &Message) -> SinkResponse {
        let mut headers = self.fixed.clone();
        message_headers(message, &self.route, &mut headers);
        let request = self
            .client
            .post(self.url.clone())
            .headers(headers)
            .body(self.body(message));
        match request.send().await {
            Ok(resp) => response::read(resp).await,
            Err(e) if e.is_timeout() => SinkResponse::Timeout,
            Err(e) => SinkResponse::Error(response::describe_error(&e)),
        }
    }

    async fn healthy(&self) -> Option<bool> {
        let url = self.health_url.clone()?;
        let answer = self.client.get(url).send().await;
        Some(answer.is_ok_and(|r| r.status().is_success()))
    }
}
