//! A keep-alive HTTP/1.1 connection pool for one origin, on hyper's connection API, or
//! with `http2` one HTTP/2 connection that carries every request of the route at once.
//!
//! A route talks to one endpoint and sends nothing but POSTs (and a health GET), so a
//! general-purpose client's per-request work — parsing the URL, looking up a pool keyed by
//! origin, running redirect and retry layers — is pure overhead; on a fast endpoint it cost
//! more CPU than building the message. Here the origin, the `Host` header and the path are
//! worked out once, and a request is one pop from a stack of idle connections.
//!
//! HTTP/2 (h2c with prior knowledge on `http://`, offered by ALPN on `https://`, where the
//! endpoint may still choose HTTP/1.1) multiplexes the requests on one connection: the
//! frames of many requests leave in one write, so a busy route makes fewer system calls
//! per message, and an endpoint behind a load balancer holds one connection per replica
//! instead of `concurrency` of them.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, HOST, USER_AGENT};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use url::Url;

use crate::{HttpSinkError, TlsConfig};

/// An idle connection is not reused after this long: servers close theirs after a while,
/// and a request on a connection the server is closing fails.
const IDLE_FOR: Duration = Duration::from_secs(50);

/// A connection's request handle.
enum Sender {
    /// HTTP/1.1: one request at a time; pooled between requests.
    H1(http1::SendRequest<Full<Bytes>>),
    /// HTTP/2: any number at once (up to the endpoint's stream limit, beyond which hyper
    /// holds requests until a stream is free); shared by every request of the origin.
    H2(http2::SendRequest<Full<Bytes>>, Generation),
}

/// Which of the origin's successive HTTP/2 connections a sender is on.
type Generation = u64;

impl Sender {
    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Self::H1(s) => s.ready().await,
            Self::H2(s, _) => s.ready().await,
        }
    }

    async fn try_send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Full<Bytes>>>> {
        match self {
            Self::H1(s) => s.try_send_request(request).await,
            Self::H2(s, _) => s.try_send_request(request).await,
        }
    }
}

/// Where and how to connect, and the idle connections.
pub(crate) struct Origin {
    host: String,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// `Host`, `User-Agent` and, from the URL's user info, `Authorization`.
    defaults: HeaderMap,
    path: Uri,
    /// `scheme://authority/path`: HTTP/2 carries scheme and authority in the request (as
    /// `:scheme` and `:authority`) instead of `Host`.
    absolute: Uri,
    connect_timeout: Duration,
    timeout: Duration,
    max_idle: usize,
    /// HTTP/1.1 connections between requests.
    idle: Mutex<Vec<(http1::SendRequest<Full<Bytes>>, Instant)>>,
    /// Speak HTTP/2 (h2c, or ALPN `h2` over TLS).
    http2: bool,
    /// The HTTP/2 connection every request shares; locked while it is being made, so that
    /// the requests of a burst wait for one connection instead of each opening its own.
    shared: tokio::sync::Mutex<Shared>,
}

/// The HTTP/2 connection of an origin, if one is open, and how many were made before it.
#[derive(Default)]
struct Shared {
    sender: Option<http2::SendRequest<Full<Bytes>>>,
    generation: Generation,
}

impl Origin {
    /// Where requests go, as shown to an operator: scheme, host, port and path, the query
    /// (which may hold a key) left out.
    pub(crate) fn shown(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}{}", self.port, self.path.path())
    }
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// What became of a request that got no complete answer.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No answer within the whole-request timeout.
    Timeout,
    /// One line, without the URL (it may carry secrets).
    Error(String),
    /// No connection could be made: the request never left (same form as `Error`).
    Unreachable(String),
}

impl From<String> for Failure {
    fn from(line: String) -> Self {
        Self::Error(line)
    }
}

/// An answer: the status, the headers, the first `keep` bytes of the body and whether the
/// body was read to its end.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    pub(crate) end: BodyEnd,
}

/// How reading an answer's body ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BodyEnd {
    /// Read to its end, within the limit.
    Complete,
    /// Longer than [`crate::response::DRAIN_LIMIT`]: the rest was left unread.
    TooLong,
    /// The connection broke or the framing was wrong before the end (one line).
    Cut(String),
}

/// The timeouts and pool size shared by every origin a sink talks to.
#[derive(Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_idle: usize,
    /// HTTP/2 instead of HTTP/1.1.
    pub(crate) http2: bool,
}

impl Origin {
    /// Checks the URL and sets up TLS; connects only when the first request goes out.
    pub(crate) fn new(url: &Url, tls: &TlsConfig, limits: Limits) -> Result<Self, HttpSinkError> {
        let invalid = |detail: &str| HttpSinkError::Url(detail.to_owned());
        let secure = match url.scheme() {
            "http" => false,
            "https" => true,
            _ => return Err(invalid("scheme must be http or https")),
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(invalid("no host")),
        };
        let port = url
            .port_or_known_default()
            .ok_or_else(|| invalid("no port"))?;
        let mut defaults = HeaderMap::new();
        let authority = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        defaults.insert(
            HOST,
            HeaderValue::from_str(&authority).map_err(|_| invalid("host is not a header value"))?,
        );
        defaults.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("ferry/", env!("CARGO_PKG_VERSION"))),
        );
        if let Some(auth) = basic_auth(url) {
            defaults.insert(AUTHORIZATION, auth);
        }
        let mut path = url.path().to_owned();
        if let Some(query) = url.query() {
            path.push('?');
            path.push_str(query);
        }
        let absolute = format!("{}://{authority}{path}", url.scheme())
            .parse::<Uri>()
            .map_err(|_| invalid("path"))?;
        let path = path.parse::<Uri>().map_err(|_| invalid("path"))?;
        let tls = if secure {
            let name = match host.parse::<IpAddr>() {
                Ok(ip) => ServerName::IpAddress(ip.into()),
                Err(_) => ServerName::try_from(host.clone())
                    .map_err(|_| invalid("host is not a valid TLS server name"))?,
            };
            Some((
                TlsConnector::from(Arc::new(tls_config(tls, limits.http2)?)),
                name,
            ))
        } else {
            None
        };
        Ok(Self {
            host,
            port,
            tls,
            defaults,
            path,
            absolute,
            connect_timeout: limits.connect_timeout,
            timeout: limits.timeout,
            max_idle: limits.max_idle,
            idle: Mutex::new(Vec::new()),
            http2: limits.http2,
            shared: tokio::sync::Mutex::new(Shared::default()),
        })
    }

    /// Sends one request and reads its answer, all within the request timeout.
    pub(crate) async fn send(
        &self,
        method: Method,
        mut headers: HeaderMap,
        body: Bytes,
        keep: usize,
    ) -> Result<Answer, Failure> {
        for (name, value) in &self.defaults {
            if !headers.contains_key(name) {
                headers.insert(name, value.clone());
            }
        }
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.headers_mut() = headers;
        match tokio::time::timeout(self.timeout, self.exchange(request, keep)).await {
            Ok(answer) => answer,
            Err(_) => Err(Failure::Timeout),
        }
    }

    async fn exchange(
        &self,
        mut request: Request<Full<Bytes>>,
        keep: usize,
    ) -> Result<Answer, Failure> {
        // A pooled connection the server closed meanwhile hands the request back unsent;
        // it then goes out once on a new connection.
        let response = loop {
            let (mut sender, reused) = self.checkout().await?;
            if let Sender::H2(..) = sender {
                *request.uri_mut() = self.absolute.clone();
                request.headers_mut().remove(HOST);
            } else {
                *request.uri_mut() = self.path.clone();
                if let (false, Some(host)) = (
                    request.headers().contains_key(HOST),
                    self.defaults.get(HOST),
                ) {
                    request.headers_mut().insert(HOST, host.clone());
                }
            }
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(Failure::Unreachable(
                    "connection failed: closed at once".into(),
                ));
            }
            match sender.try_send(request).await {
                Ok(response) => break (response, sender),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => request = unsent,
                    // Handed back unsent on a new connection: it never reached the endpoint.
                    Some(_) => {
                        return Err(Failure::Unreachable(describe(
                            "connection failed",
                            e.error(),
                        )))
                    }
                    None => {
                        let what = match sender {
                            // A connection that failed a request (the endpoint going away,
                            // a GOAWAY) is not handed to the next one: it opens a new one.
                            Sender::H2(_, generation) => {
                                self.forget(generation).await;
                                "request failed over HTTP/2"
                            }
                            Sender::H1(_) => "request failed",
                        };
                        return Err(Failure::Error(describe(what, e.error())));
                    }
                },
            }
        };
        let (response, sender) = response;
        let (parts, mut incoming) = response.into_parts();
        let mut body = BytesMut::new();
        let mut seen = 0usize;
        // Past the limit the rest is not read: the answer is over-long.
        let mut end = BodyEnd::TooLong;
        while seen <= crate::response::DRAIN_LIMIT {
            match incoming.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(chunk) = frame.into_data() {
                        seen += chunk.len();
                        let room = keep.saturating_sub(body.len());
                        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                }
                None => {
                    end = BodyEnd::Complete;
                    break;
                }
                // For a single message the status is what counts; a batch answer's body
                // says which messages failed, so there a cut body counts too.
                Some(Err(e)) => {
                    end = BodyEnd::Cut(describe("answer cut short", &e));
                    break;
                }
            }
        }
        // Only a connection whose answer was read to the end can carry the next request.
        if end == BodyEnd::Complete {
            self.checkin(sender);
        }
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.freeze(),
            end,
        })
    }

    /// A connection for one request, and whether it carried requests before.
    async fn checkout(&self) -> Result<(Sender, bool), Failure> {
        if self.http2 {
            let mut shared = self.shared.lock().await;
            if let Some(sender) = shared.sender.as_ref().filter(|s| !s.is_closed()) {
                return Ok((Sender::H2(sender.clone(), shared.generation), true));
            }
            // An endpoint that chose HTTP/1.1 over TLS is pooled as usual.
            if let Some(sender) = self.idle_sender() {
                return Ok((Sender::H1(sender), true));
            }
            let sender = Box::pin(self.connect()).await?;
            return Ok((
                match sender {
                    Sender::H2(s, _) => {
                        shared.generation += 1;
                        shared.sender = Some(s.clone());
                        Sender::H2(s, shared.generation)
                    }
                    h1 => h1,
                },
                false,
            ));
        }
        match self.idle_sender() {
            Some(sender) => Ok((Sender::H1(sender), true)),
            // Boxed: the TLS handshake's state is large, and a future holds its largest
            // state inline in every request's task (moved on spawn and on completion).
            None => Ok((Box::pin(self.connect()).await?, false)),
        }
    }

    /// Drops the shared HTTP/2 connection if it is still the one of `generation`.
    async fn forget(&self, generation: Generation) {
        let mut shared = self.shared.lock().await;
        if shared.generation == generation {
            shared.sender = None;
        }
    }

    fn idle_sender(&self) -> Option<http1::SendRequest<Full<Bytes>>> {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some((sender, since)) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE_FOR {
                return Some(sender);
            }
        }
        None
    }

    fn checkin(&self, sender: Sender) {
        // An HTTP/2 connection stays shared; it is not pooled.
        let Sender::H1(sender) = sender else {
            return;
        };
        if sender.is_closed() {
            return;
        }
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push((sender, Instant::now()));
        }
    }

    /// Opens a connection; every failure here is [`Failure::Unreachable`]: nothing was sent.
    async fn connect(&self) -> Result<Sender, Failure> {
        let connecting = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| describe("connection failed", &e))?;
            // Requests are small and answered one at a time: never wait to fill a segment.
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                None => handshake(tcp, self.http2).await,
                Some((connector, name)) => {
                    let stream = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|e| describe("connection failed: TLS", &e))?;
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    handshake(stream, h2).await
                }
            }
        };
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(connected) => connected.map_err(|failure| match failure {
                Failure::Error(line) => Failure::Unreachable(line),
                other => other,
            }),
            Err(_) => Err(Failure::Unreachable(
                "connection failed: connect timeout".into(),
            )),
        }
    }
}

/// The HTTP/1.1 or HTTP/2 handshake on a connected stream.
async fn handshake<T>(io: T, h2: bool) -> Result<Sender, Failure>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let failed = |e: hyper::Error| Failure::Error(describe("connection failed", &e));
    // The connection drives itself until either side closes it.
    if h2 {
        let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(|e| Failure::Error(describe("connection failed: HTTP/2 handshake", &e)))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Sender::H2(sender, 0))
    } else {
        let (sender, connection) = http1::handshake(TokioIo::new(io)).await.map_err(failed)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Sender::H1(sender))
    }
}

/// `what: cause: cause of cause…` on one line.
fn describe(what: &str, error: &dyn std::error::Error) -> String {
    let mut text = format!("{what}: {error}");
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `Authorization: Basic …` from `https://user:password@host/`, marked sensitive.
fn basic_auth(url: &Url) -> Option<HeaderValue> {
    use base64::Engine as _;
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = decode(url.username());
    let password = url.password().map(decode).unwrap_or_default();
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// The public roots plus the configured CA, the client identity if there is one, and the
/// protocols offered: `h2` first when HTTP/2 is asked for, HTTP/1.1 always.
fn tls_config(tls: &TlsConfig, http2: bool) -> Result<rustls::ClientConfig, HttpSinkError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = &tls.ca_pem {
        let ca_error = |detail: String| HttpSinkError::Tls {
            what: "ca_file",
            detail,
        };
        let mut added = 0;
        for certificate in CertificateDer::pem_slice_iter(pem) {
            let certificate = certificate.map_err(|e| ca_error(e.to_string()))?;
            roots
                .add(certificate)
                .map_err(|e| ca_error(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(ca_error("no PEM certificate in it".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpSinkError::Tls {
            what: "protocol versions",
            detail: e.to_string(),
        })?
        .with_root_certificates(roots);
    let mut config = match &tls.identity_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let identity_error = |detail: String| HttpSinkError::Tls {
                what: "client_cert_file",
                detail: format!("certificate and key: {detail}"),
            };
            let chain = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| identity_error(e.to_string()))?;
            if chain.is_empty() {
                return Err(identity_error("no PEM certificate in it".into()));
            }
            let key =
                PrivateKeyDer::from_pem_slice(pem).map_err(|e| identity_error(e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| identity_error(e.to_string()))?
        }
    };
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(config)
}
