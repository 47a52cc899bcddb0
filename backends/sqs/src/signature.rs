//! Which SNS envelopes are genuine: those from a listed topic whose signature holds, under
//! the key of a certificate SNS itself publishes (`https://sns.<region>.amazonaws.com/...`).
//!
//! Anything else that claims to be an SNS envelope is refused (and so dead-lettered with the
//! reason, never delivered as if SNS had sent it). Only a certificate that cannot be fetched
//! for now (network, timeout, a 5xx) leaves the message on the queue for a later try: that
//! says nothing about the message.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::Url;
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use tracing::warn;
use x509_parser::public_key::PublicKey;

use crate::sns::{self, Envelope, Notification, Parsed};
use crate::SnsConfig;

/// Certificates kept at most: SNS signs with one per region at a time, so a few cover a
/// rotation; the bound keeps forged URLs from filling memory.
const CACHE_ENTRIES: usize = 64;
/// A certificate is a couple of kilobytes; more is not one.
const MAX_CERT_BYTES: usize = 64 * 1024;
/// How long a fetch may take before the message is left for later.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed fetch is not tried again (each message meanwhile waits for later).
const FAILED_FOR: Duration = Duration::from_secs(10);
/// How much of a value a sender chose goes into a reason.
const QUOTE_CHARS: usize = 120;

/// What a body turned out to be.
#[derive(Debug)]
pub(crate) enum Judgement {
    /// Not an SNS envelope (raw message delivery, anything else): delivered as it is.
    NotSns,
    /// A genuine notification from a listed topic: delivered unwrapped.
    Genuine(Notification),
    /// Claims to come from SNS but cannot be shown to: dead-lettered with this reason.
    Refused(String),
    /// The certificate could not be fetched for now: left on the queue, tried again later.
    Later(String),
}

/// Checks envelopes against a source's `sns` section.
#[derive(Debug)]
pub(crate) struct SnsCheck {
    topics: HashSet<String>,
    verify: bool,
    certs: Certs,
}

/// Why the check could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("sns: cannot set up certificate fetching: {0}")]
pub struct SetupError(String);

impl SnsCheck {
    pub(crate) fn new(config: &SnsConfig) -> Result<Self, SetupError> {
        Ok(Self {
            topics: config.topic_arns.iter().cloned().collect(),
            verify: config.verify_signature,
            certs: Certs::new(Hosts::from_build())?,
        })
    }

    /// Judges one SQS body.
    pub(crate) async fn judge(&self, body: &str) -> Judgement {
        let envelope = match sns::parse(body) {
            Parsed::NotSns => return Judgement::NotSns,
            Parsed::Malformed(e) => {
                return Judgement::Refused(format!("malformed SNS envelope: {}", one_line(&e)))
            }
            Parsed::Envelope(envelope) => envelope,
        };
        let topic = envelope.topic_arn.as_deref().unwrap_or("");
        if envelope.kind != "Notification" {
            return Judgement::Refused(format!(
                "SNS {} (topic {}) is not a notification to deliver; confirm subscriptions in SNS",
                envelope.kind,
                quote(topic)
            ));
        }
        if envelope.topic_arn.is_none() {
            return Judgement::Refused("SNS envelope without TopicArn".to_owned());
        }
        if !self.topics.contains(topic) {
            return Judgement::Refused(format!(
                "SNS envelope from topic {}, which is not in sns.topic_arns",
                quote(topic)
            ));
        }
        if self.verify {
            if let Err(judgement) = self.check_signature(&envelope).await {
                return judgement;
            }
        }
        Judgement::Genuine(envelope.into_notification())
    }

    async fn check_signature(&self, envelope: &Envelope) -> Result<(), Judgement> {
        let refuse = |why: String| Judgement::Refused(format!("SNS signature: {why}"));
        let algorithm: &'static dyn VerificationAlgorithm =
            match envelope.signature_version.as_deref() {
                Some("1") => &signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
                Some("2") => &signature::RSA_PKCS1_2048_8192_SHA256,
                Some(v) => return Err(refuse(format!("unknown SignatureVersion {}", quote(v)))),
                None => return Err(refuse("no SignatureVersion".to_owned())),
            };
        let Some(sig) = envelope.signature.as_deref() else {
            return Err(refuse("no Signature".to_owned()));
        };
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(sig) else {
            return Err(refuse("Signature is not base64".to_owned()));
        };
        let Some(text) = envelope.canonical() else {
            return Err(refuse("a signed field is missing (Timestamp?)".to_owned()));
        };
        let Some(url) = envelope.signing_cert_url.as_deref() else {
            return Err(refuse("no SigningCertURL".to_owned()));
        };
        let key = match self.certs.key(url).await {
            Ok(key) => key,
            Err(Fetch::Refused(why)) => return Err(refuse(why)),
            Err(Fetch::Later(why)) => return Err(Judgement::Later(why)),
        };
        UnparsedPublicKey::new(algorithm, &key[..])
            .verify(text.as_bytes(), &sig)
            .map_err(|_| refuse("does not match the message (forged or altered)".to_owned()))
    }
}

/// Where signing certificates may come from.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hosts {
    /// Test only: one more `host:port` allowed, and the root its TLS certificate chains to.
    test: Option<(String, Vec<u8>)>,
}

impl Hosts {
    /// SNS's own hosts only, in a release build. A debug build (the end-to-end tests run
    /// one) also honours `FERRY_SNS_TEST_CERT_HOST` (`host:port`) and
    /// `FERRY_SNS_TEST_CERT_CA` (a PEM file of the root that host's TLS certificate chains
    /// to), so that tests can serve their own signing certificate. A release build has no
    /// such switch at all: nothing in its environment can point it at another host.
    fn from_build() -> Self {
        #[cfg(debug_assertions)]
        if let (Ok(host), Ok(ca)) = (
            std::env::var("FERRY_SNS_TEST_CERT_HOST"),
            std::env::var("FERRY_SNS_TEST_CERT_CA"),
        ) {
            match std::fs::read(&ca) {
                Ok(pem) => {
                    warn!(%host, "test build: SNS signing certificates are also taken from this host");
                    return Self::testing(host, pem);
                }
                Err(e) => warn!(error = %e, "FERRY_SNS_TEST_CERT_CA cannot be read; ignored"),
            }
        }
        Self::default()
    }

    /// Test only: also allows `host` (as `host:port`), trusting `ca_pem` for its TLS.
    #[cfg(any(test, debug_assertions))]
    pub(crate) fn testing(host: String, ca_pem: Vec<u8>) -> Self {
        Self {
            test: Some((host, ca_pem)),
        }
    }

    /// Whether `url` is one SNS publishes its certificates at: `https://` on
    /// `sns.<region>.amazonaws.com` (or `.amazonaws.com.cn`), default port, no user info.
    fn allows(&self, url: &Url) -> bool {
        if url.scheme() != "https" || !url.username().is_empty() || url.password().is_some() {
            return false;
        }
        let Some(host) = url.host_str() else {
            return false;
        };
        if let Some((test, _)) = &self.test {
            let port = url.port_or_known_default().unwrap_or(443);
            if format!("{host}:{port}") == *test {
                return true;
            }
        }
        url.port().is_none() && sns_host(host)
    }
}

/// `sns.<region>.amazonaws.com` or `sns.<region>.amazonaws.com.cn`.
fn sns_host(host: &str) -> bool {
    let Some(rest) = host.strip_prefix("sns.") else {
        return false;
    };
    let region = rest
        .strip_suffix(".amazonaws.com")
        .or_else(|| rest.strip_suffix(".amazonaws.com.cn"));
    region.is_some_and(|r| {
        !r.is_empty()
            && r.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    })
}

#[derive(Debug)]
enum Fetch {
    Refused(String),
    Later(String),
}

#[derive(Debug, Clone)]
enum Cached {
    /// The certificate's RSA public key (PKCS#1 DER), as ring takes it.
    Key(Arc<[u8]>),
    /// The URL names no usable certificate.
    Refused(String),
    /// The last fetch failed for now, at this time.
    Failed(Instant, String),
}

/// Signing certificates by URL, fetched over HTTPS once and kept (bounded).
#[derive(Debug)]
struct Certs {
    http: reqwest::Client,
    hosts: Hosts,
    cache: Mutex<HashMap<String, Cached>>,
}

impl Certs {
    fn new(hosts: Hosts) -> Result<Self, SetupError> {
        // No redirects: a redirect could lead anywhere, and SNS serves its certificates
        // directly.
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .https_only(true);
        if let Some((_, ca)) = &hosts.test {
            let ca = reqwest::Certificate::from_pem(ca).map_err(|e| SetupError(e.to_string()))?;
            builder = builder.add_root_certificate(ca);
        }
        let http = builder.build().map_err(|e| SetupError(e.to_string()))?;
        Ok(Self {
            http,
            hosts,
            cache: Mutex::default(),
        })
    }

    fn cached(&self, url: &str) -> Option<Cached> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.get(url).cloned()
    }

    fn keep(&self, url: &str, entry: Cached) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CACHE_ENTRIES && !cache.contains_key(url) {
            // Failures go first, then any other.
            let victim = cache
                .iter()
                .find(|(_, c)| !matches!(c, Cached::Key(_)))
                .or_else(|| cache.iter().next())
                .map(|(k, _)| k.clone());
            if let Some(victim) = victim {
                cache.remove(&victim);
            }
        }
        cache.insert(url.to_owned(), entry);
    }

    async fn key(&self, url: &str) -> Result<Arc<[u8]>, Fetch> {
        match self.cached(url) {
            Some(Cached::Key(key)) => return Ok(key),
            Some(Cached::Refused(why)) => return Err(Fetch::Refused(why)),
            Some(Cached::Failed(at, why)) if at.elapsed() < FAILED_FOR => {
                return Err(Fetch::Later(why))
            }
            _ => {}
        }
        let parsed = Url::parse(url)
            .ok()
            .filter(|u| self.hosts.allows(u))
            .ok_or_else(|| {
                Fetch::Refused(format!(
                    "SigningCertURL {} is not an https:// URL on an SNS host",
                    quote(url)
                ))
            })?;
        let result = self.fetch(parsed).await;
        match &result {
            Ok(key) => self.keep(url, Cached::Key(key.clone())),
            Err(Fetch::Refused(why)) => self.keep(url, Cached::Refused(why.clone())),
            Err(Fetch::Later(why)) => {
                warn!(url = %quote(url), reason = %why, "SNS signing certificate not fetched; messages signed with it wait on the queue");
                self.keep(url, Cached::Failed(Instant::now(), why.clone()));
            }
        }
        result
    }

    async fn fetch(&self, url: Url) -> Result<Arc<[u8]>, Fetch> {
        let shown = quote(url.as_str());
        let later = |e: reqwest::Error| Fetch::Later(format!("fetching {shown}: {e}"));
        let resp = self.http.get(url.clone()).send().await.map_err(later)?;
        let status = resp.status();
        if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            return Err(Fetch::Later(format!("{shown} answered {status}")));
        }
        if !status.is_success() {
            return Err(Fetch::Refused(format!(
                "SigningCertURL {shown} answered {status}"
            )));
        }
        if resp.content_length().unwrap_or(0) > MAX_CERT_BYTES as u64 {
            return Err(Fetch::Refused(format!(
                "SigningCertURL {shown} is too large"
            )));
        }
        let body = resp.bytes().await.map_err(later)?;
        if body.len() > MAX_CERT_BYTES {
            return Err(Fetch::Refused(format!(
                "SigningCertURL {shown} is too large"
            )));
        }
        rsa_key(&body).map_err(|why| Fetch::Refused(format!("SigningCertURL {shown}: {why}")))
    }
}

/// The RSA public key of a PEM certificate that is valid now, as ring verifies with it.
fn rsa_key(pem: &[u8]) -> Result<Arc<[u8]>, String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|_| "not a PEM certificate".to_owned())?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !cert.validity().is_valid() {
        return Err("the certificate is expired or not yet valid".to_owned());
    }
    let spki = cert.public_key();
    match spki.parsed() {
        Ok(PublicKey::RSA(_)) => Ok(Arc::from(&spki.subject_public_key.data[..])),
        _ => Err("the certificate's key is not RSA".to_owned()),
    }
}

/// A value the sender chose, quoted and cut short, so that a reason stays one honest line.
fn quote(value: &str) -> String {
    let cut: String = value.chars().take(QUOTE_CHARS).collect();
    let more = if cut.len() < value.len() { "…" } else { "" };
    format!("{cut:?}{more}")
}

fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

#[cfg(test)]
mod tests;
