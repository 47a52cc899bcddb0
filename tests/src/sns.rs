//! SNS through its wire protocol (the Query API), as any publisher would call it.

/// An SNS topic on the emulator.
pub struct Topic {
    http: reqwest::Client,
    endpoint: String,
    /// The topic's ARN.
    pub arn: String,
}

fn tag<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some(&xml[start..end])
}

async fn call(http: &reqwest::Client, endpoint: &str, params: &[(String, String)]) -> String {
    // The emulator serves every AWS service on one port and routes by the credential
    // scope of the Authorization header; it does not check the signature.
    let resp = http
        .post(endpoint)
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/sns/aws4_request, \
             SignedHeaders=host, Signature=0",
        )
        .form(params)
        .send()
        .await
        .unwrap_or_else(|e| panic!("SNS emulator not reachable at {endpoint}: {e}"));
    let status = resp.status();
    let text = resp.text().await.expect("SNS response body");
    assert!(status.is_success(), "SNS call failed ({status}): {text}");
    text
}

fn p(k: &str, v: impl Into<String>) -> (String, String) {
    (k.to_owned(), v.into())
}

impl Topic {
    /// Creates a topic with a unique name.
    pub async fn create(prefix: &str) -> Self {
        let http = reqwest::Client::new();
        let endpoint = crate::sqs_endpoint();
        let name = crate::unique(prefix);
        let xml = call(
            &http,
            &endpoint,
            &[p("Action", "CreateTopic"), p("Name", name)],
        )
        .await;
        let arn = tag(&xml, "TopicArn").expect("TopicArn").to_owned();
        Self {
            http,
            endpoint,
            arn,
        }
    }

    /// Subscribes an SQS queue; `raw` turns on raw message delivery (no envelope).
    pub async fn subscribe_queue(&self, queue_arn: &str, raw: bool) {
        let xml = call(
            &self.http,
            &self.endpoint,
            &[
                p("Action", "Subscribe"),
                p("TopicArn", &self.arn),
                p("Protocol", "sqs"),
                p("Endpoint", queue_arn),
            ],
        )
        .await;
        if raw {
            let sub = tag(&xml, "SubscriptionArn").expect("SubscriptionArn");
            call(
                &self.http,
                &self.endpoint,
                &[
                    p("Action", "SetSubscriptionAttributes"),
                    p("SubscriptionArn", sub),
                    p("AttributeName", "RawMessageDelivery"),
                    p("AttributeValue", "true"),
                ],
            )
            .await;
        }
    }

    /// Publishes messages in batches of 10, each with a `tenant` string attribute.
    pub async fn publish(&self, messages: &[String]) {
        for chunk in messages.chunks(10) {
            let mut params = vec![p("Action", "PublishBatch"), p("TopicArn", &self.arn)];
            for (i, m) in chunk.iter().enumerate() {
                let k = format!("PublishBatchRequestEntries.member.{}", i + 1);
                params.push(p(&format!("{k}.Id"), i.to_string()));
                params.push(p(&format!("{k}.Message"), m.clone()));
                let a = format!("{k}.MessageAttributes.entry.1");
                params.push(p(&format!("{a}.Name"), "tenant"));
                params.push(p(&format!("{a}.Value.DataType"), "String"));
                params.push(p(&format!("{a}.Value.StringValue"), "acme"));
            }
            let xml = call(&self.http, &self.endpoint, &params).await;
            assert!(!xml.contains("<Failed><member>"), "publish failures: {xml}");
        }
    }
}

/// Signs SNS envelopes as SNS does, with the test key whose certificate
/// [`CertServer`] serves (the same pair the SQS crate's unit tests use).
pub mod signing {
    use base64::Engine as _;
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::{Pkcs1v15Sign, RsaPrivateKey};
    use sha2::Digest as _;

    /// The signing key (test only).
    pub const KEY: &str = include_str!("../../backends/sqs/testdata/sns-signing-key.pem");
    /// Its self-signed certificate.
    pub const CERT: &str = include_str!("../../backends/sqs/testdata/sns-signing-cert.pem");

    /// The text SNS signs for a `Notification`: `Message`, `MessageId`, `Subject` (if
    /// present), `Timestamp`, `TopicArn`, `Type`, each as `Key\nValue\n`.
    pub fn canonical(envelope: &serde_json::Value) -> String {
        let mut text = String::new();
        for key in [
            "Message",
            "MessageId",
            "Subject",
            "Timestamp",
            "TopicArn",
            "Type",
        ] {
            if let Some(value) = envelope.get(key).and_then(|v| v.as_str()) {
                text.push_str(&format!("{key}\n{value}\n"));
            }
        }
        text
    }

    /// Signs `envelope` with SignatureVersion `version` ("1": SHA1withRSA, "2":
    /// SHA256withRSA), setting `SignatureVersion` and `Signature`.
    pub fn sign(envelope: &mut serde_json::Value, version: &str) {
        let text = canonical(envelope);
        let key = RsaPrivateKey::from_pkcs8_pem(KEY).expect("test key");
        let sig = if version == "1" {
            key.sign(
                Pkcs1v15Sign::new::<sha1::Sha1>(),
                &sha1::Sha1::digest(text.as_bytes()),
            )
        } else {
            key.sign(
                Pkcs1v15Sign::new::<sha2::Sha256>(),
                &sha2::Sha256::digest(text.as_bytes()),
            )
        }
        .expect("signed");
        envelope["SignatureVersion"] = version.into();
        envelope["Signature"] = base64::engine::general_purpose::STANDARD.encode(sig).into();
    }

    /// An unsigned `Notification` envelope as SNS writes it into a queue.
    pub fn notification(id: &str, topic: &str, message: &str, cert_url: &str) -> serde_json::Value {
        serde_json::json!({
            "Type": "Notification",
            "MessageId": id,
            "TopicArn": topic,
            "Message": message,
            "Timestamp": "2024-01-02T03:04:05.678Z",
            "SigningCertURL": cert_url,
            "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
            "MessageAttributes": {"tenant": {"Type": "String", "Value": "acme"}},
        })
    }
}

/// An HTTPS server on 127.0.0.1 that serves the test signing certificate at
/// `/cert.pem` (or answers 503 while told to fail), and counts the fetches.
pub struct CertServer {
    /// `localhost:PORT`: what ferry is told to allow (a debug build only).
    pub host: String,
    /// The PEM file of the server's TLS certificate, for ferry to trust.
    pub ca_file: std::path::PathBuf,
    fetches: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CertServer {
    /// Starts the server on the current runtime.
    pub async fn start() -> Self {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;

        let key = rcgen::KeyPair::generate().expect("TLS key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        let tls_cert = params
            .self_signed(&key)
            .expect("self-signed TLS certificate");
        let ca_file = crate::ferry::scratch("sns-cert").join("ca.pem");
        std::fs::write(&ca_file, tls_cert.pem()).expect("write CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![rustls::pki_types::CertificateDer::from(
                    tls_cert.der().to_vec(),
                )],
                rustls::pki_types::PrivateKeyDer::Pkcs8(
                    rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()),
                ),
            )
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let fetches = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (count, fail) = (fetches.clone(), failing.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, count, fail) = (acceptor.clone(), count.clone(), fail.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |request| {
                        count.fetch_add(1, Ordering::SeqCst);
                        let (status, body) = if fail.load(Ordering::SeqCst) {
                            (503, String::new())
                        } else if request.uri().path() == "/cert.pem" {
                            (200, signing::CERT.to_owned())
                        } else {
                            (404, String::new())
                        };
                        let mut response = hyper::Response::new(body);
                        *response.status_mut() =
                            hyper::StatusCode::from_u16(status).expect("status");
                        async { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            host: format!("localhost:{port}"),
            ca_file,
            fetches,
            failing,
        }
    }

    /// The URL of the signing certificate.
    pub fn cert_url(&self) -> String {
        format!("https://{}/cert.pem", self.host)
    }

    /// Requests served so far.
    pub fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Answers 503 to everything while `failing`.
    pub fn set_failing(&self, failing: bool) {
        self.failing
            .store(failing, std::sync::atomic::Ordering::SeqCst);
    }

    /// The `env` command line that runs ferry allowing this server (see
    /// [`crate::Ferry::start_in`]); only a debug build of ferry honours it.
    pub fn env_wrapper(&self) -> Vec<String> {
        vec![
            "env".to_owned(),
            format!("FERRY_SNS_TEST_CERT_HOST={}", self.host),
            format!("FERRY_SNS_TEST_CERT_CA={}", self.ca_file.display()),
        ]
    }
}
