//! HTTPS endpoints behind a private CA and with mutual TLS, against a real TLS server on
//! loopback whose certificates the test issues itself.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_core::{Message, Sink, SinkResponse};
use ferry_http::{HttpSink, HttpSinkConfig, HttpSinkError, Mode, TlsConfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedKey, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all from the CA.
struct Pki {
    ca: CertifiedKey,
    server: CertifiedKey,
    client: CertifiedKey,
}

fn issue(names: &[&str], client: bool, ca: &CertifiedKey) -> CertifiedKey {
    let key = KeyPair::generate().expect("key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    let cert = params
        .signed_by(&key, &ca.cert, &ca.key_pair)
        .expect("sign");
    CertifiedKey {
        cert,
        key_pair: key,
    }
}

fn pki() -> Pki {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "ferry test CA");
    let cert = params.self_signed(&key).expect("self-signed CA");
    let ca = CertifiedKey {
        cert,
        key_pair: key,
    };
    let server = issue(&["127.0.0.1", "localhost"], false, &ca);
    let client = issue(&["ferry-client"], true, &ca);
    Pki { ca, server, client }
}

/// Serves HTTPS on a loopback port, answering 200 to every request; with
/// `require_client`, only to clients whose certificate the CA issued.
async fn https_server(pki: &Pki, require_client: bool) -> (String, Arc<AtomicUsize>) {
    let (url, served, _) = https_server_with(pki, require_client, false).await;
    (url, served)
}

/// [`https_server`], offering HTTP/2 by ALPN too when `offer_h2`; also returns how many
/// requests came over HTTP/2.
async fn https_server_with(
    pki: &Pki,
    require_client: bool,
    offer_h2: bool,
) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![CertificateDer::from(pki.server.cert.der().to_vec())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        pki.server.key_pair.serialize_der(),
    ));
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let config = if require_client {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(pki.ca.cert.der().to_vec()))
            .expect("CA root");
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .expect("client verifier");
        builder
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
    } else {
        builder.with_no_client_auth().with_single_cert(chain, key)
    }
    .expect("server config");
    let mut config = config;
    config.alpn_protocols = if offer_h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let served = Arc::new(AtomicUsize::new(0));
    let served_h2 = Arc::new(AtomicUsize::new(0));
    let (count, count_h2) = (served.clone(), served_h2.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, count, count_h2) = (acceptor.clone(), count.clone(), count_h2.clone());
            tokio::spawn(async move {
                // A refused handshake is the point of some tests: just close.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
                    count.fetch_add(1, Ordering::SeqCst);
                    if request.version() == hyper::Version::HTTP_2 {
                        count_h2.fetch_add(1, Ordering::SeqCst);
                    }
                    async { Ok::<_, Infallible>(hyper::Response::new(String::new())) }
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = if h2 {
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(io, service)
                        .await
                } else {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await
                };
            });
        }
    });
    (format!("https://{addr}/in"), served, served_h2)
}

fn sink(url: &str, tls: TlsConfig) -> Result<HttpSink, HttpSinkError> {
    sink_with(url, tls, false)
}

fn sink_with(url: &str, tls: TlsConfig, http2: bool) -> Result<HttpSink, HttpSinkError> {
    HttpSink::new(HttpSinkConfig {
        route: Arc::from("orders"),
        url: url.parse().expect("url"),
        mode: Mode::Envelope,
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        pool_size: 2,
        headers: Vec::new(),
        health_url: None,
        signing: None,
        tls,
        http2,
    })
}

fn message() -> Message {
    Message::new("id-1", "hello", Arc::from("q"))
}

fn trusting(pki: &Pki) -> TlsConfig {
    TlsConfig {
        ca_pem: Some(pki.ca.cert.pem().into_bytes()),
        identity_pem: None,
    }
}

#[tokio::test]
async fn a_private_ca_is_trusted_only_when_configured() {
    let pki = pki();
    let (url, served) = https_server(&pki, false).await;
    let trusted = sink(&url, trusting(&pki)).expect("sink");
    assert!(matches!(
        trusted.deliver(&message()).await,
        SinkResponse::Status { status: 200, .. }
    ));
    let default = sink(&url, TlsConfig::default()).expect("sink");
    match default.deliver(&message()).await {
        // The handshake failed: nothing was sent.
        SinkResponse::Unreachable(e) => assert!(e.contains("certificate"), "{e}"),
        other => panic!("an unknown CA was accepted: {other:?}"),
    }
    assert_eq!(served.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn mutual_tls_presents_the_client_certificate() {
    let pki = pki();
    let (url, served) = https_server(&pki, true).await;
    let with_identity = TlsConfig {
        identity_pem: Some(
            format!(
                "{}\n{}",
                pki.client.cert.pem(),
                pki.client.key_pair.serialize_pem()
            )
            .into_bytes(),
        ),
        ..trusting(&pki)
    };
    let client = sink(&url, with_identity).expect("sink");
    assert!(matches!(
        client.deliver(&message()).await,
        SinkResponse::Status { status: 200, .. }
    ));
    let anonymous = sink(&url, trusting(&pki)).expect("sink");
    assert!(
        matches!(anonymous.deliver(&message()).await, SinkResponse::Error(_)),
        "the server let a client without a certificate in"
    );
    assert_eq!(served.load(Ordering::SeqCst), 1);
}

#[test]
fn unreadable_certificates_are_refused_by_name() {
    let garbage = TlsConfig {
        ca_pem: Some(b"not a certificate".to_vec()),
        identity_pem: None,
    };
    match sink("https://127.0.0.1:9/in", garbage) {
        Err(e) => assert!(e.to_string().starts_with("ca_file:"), "{e}"),
        Ok(_) => panic!("accepted a CA file without certificates"),
    }
    let key_missing = TlsConfig {
        ca_pem: None,
        identity_pem: Some(pki().client.cert.pem().into_bytes()),
    };
    match sink("https://127.0.0.1:9/in", key_missing) {
        Err(e) => assert!(e.to_string().starts_with("client_cert_file:"), "{e}"),
        Ok(_) => panic!("accepted a client certificate without its key"),
    }
}

#[tokio::test]
async fn http2_is_offered_by_alpn_and_http1_kept_where_the_endpoint_chooses_it() {
    let pki = pki();
    let (url, served, h2) = https_server_with(&pki, false, true).await;
    let sink = sink_with(&url, trusting(&pki), true).expect("sink");
    for _ in 0..3 {
        assert!(matches!(
            sink.deliver(&message()).await,
            SinkResponse::Status { status: 200, .. }
        ));
    }
    assert_eq!(h2.load(Ordering::SeqCst), 3, "requests over HTTP/2");

    // An endpoint that offers only HTTP/1.1 is still reached, over HTTP/1.1.
    let (url, served_h1, h2) = https_server_with(&pki, false, false).await;
    let sink = sink_with(&url, trusting(&pki), true).expect("sink");
    for _ in 0..3 {
        assert!(matches!(
            sink.deliver(&message()).await,
            SinkResponse::Status { status: 200, .. }
        ));
    }
    assert_eq!(served_h1.load(Ordering::SeqCst), 3);
    assert_eq!(h2.load(Ordering::SeqCst), 0, "requests over HTTP/2");
    assert_eq!(served.load(Ordering::SeqCst), 3);
}
