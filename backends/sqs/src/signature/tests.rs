//! The signature check against envelopes signed here with a test key, its certificate put
//! in the cache under an SNS URL (the fetch itself is tested end to end over HTTPS).

use super::*;
use rsa::pkcs8::DecodePrivateKey;
use rsa::{Pkcs1v15Sign, RsaPrivateKey};
use sha2::Digest as _;

const KEY: &str = include_str!("../../testdata/sns-signing-key.pem");
const CERT: &str = include_str!("../../testdata/sns-signing-cert.pem");
const TOPIC: &str = "arn:aws:sns:us-east-1:000000000000:orders";
const CERT_URL: &str = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem";

/// Signs `envelope` as SNS does with `version` ("1": SHA1withRSA, "2": SHA256withRSA).
fn sign(envelope: &mut serde_json::Value, version: &str) {
    envelope["SignatureVersion"] = version.into();
    let body = envelope.to_string();
    let Parsed::Envelope(parsed) = sns::parse(&body) else {
        panic!("an envelope: {body}");
    };
    let text = parsed.canonical().expect("canonical");
    let key = RsaPrivateKey::from_pkcs8_pem(KEY).expect("test key");
    let sig = match version {
        "1" => key.sign(
            Pkcs1v15Sign::new::<sha1::Sha1>(),
            &sha1::Sha1::digest(text.as_bytes()),
        ),
        _ => key.sign(
            Pkcs1v15Sign::new::<sha2::Sha256>(),
            &sha2::Sha256::digest(text.as_bytes()),
        ),
    }
    .expect("signed");
    envelope["Signature"] = base64::engine::general_purpose::STANDARD.encode(sig).into();
}

fn notification(id: &str) -> serde_json::Value {
    serde_json::json!({
        "Type": "Notification",
        "MessageId": id,
        "TopicArn": TOPIC,
        "Subject": "an order",
        "Message": "{\"order\": 1}",
        "Timestamp": "2024-01-02T03:04:05.678Z",
        "SigningCertURL": CERT_URL,
        "MessageAttributes": {"tenant": {"Type": "String", "Value": "acme"}},
    })
}

fn check(verify: bool) -> SnsCheck {
    let check = SnsCheck {
        topics: [TOPIC.to_owned()].into_iter().collect(),
        verify,
        certs: Certs::new(Hosts::default()).expect("client"),
    };
    let key = rsa_key(CERT.as_bytes()).expect("test certificate");
    check.certs.keep(CERT_URL, Cached::Key(key));
    check
}

async fn judge(check: &SnsCheck, envelope: &serde_json::Value) -> Judgement {
    check.judge(&envelope.to_string()).await
}

fn refused(j: Judgement) -> String {
    match j {
        Judgement::Refused(reason) => {
            assert!(!reason.contains('\n'), "{reason}");
            reason
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn genuine_v1_and_v2_notifications_are_unwrapped() {
    let check = check(true);
    for version in ["1", "2"] {
        let mut e = notification(&format!("id-v{version}"));
        sign(&mut e, version);
        match judge(&check, &e).await {
            Judgement::Genuine(n) => {
                assert_eq!(n.id, format!("id-v{version}"));
                assert_eq!(n.message, "{\"order\": 1}");
                assert_eq!(n.attributes["tenant"], "acme");
            }
            other => panic!("v{version}: {other:?}"),
        }
        // Without a subject the canonical string has no Subject line.
        let mut e = notification("no-subject");
        e.as_object_mut().expect("object").remove("Subject");
        sign(&mut e, version);
        assert!(matches!(judge(&check, &e).await, Judgement::Genuine(_)));
    }
}

#[tokio::test]
async fn forged_and_altered_envelopes_are_refused() {
    let check = check(true);
    let mut signed = notification("id");
    sign(&mut signed, "2");

    let mut unsigned = notification("id");
    unsigned["SignatureVersion"] = "2".into();
    assert!(refused(judge(&check, &unsigned).await).contains("no Signature"));

    for (field, value) in [
        ("Message", "{\"order\": 2}"),
        ("MessageId", "another"),
        ("Timestamp", "2030-01-01T00:00:00Z"),
        ("Subject", "other"),
    ] {
        let mut e = signed.clone();
        e[field] = value.into();
        let reason = refused(judge(&check, &e).await);
        assert!(reason.contains("does not match"), "{field}: {reason}");
    }
    // A v2 signature presented as v1 does not hold either.
    let mut e = signed.clone();
    e["SignatureVersion"] = "1".into();
    assert!(refused(judge(&check, &e).await).contains("does not match"));
    let mut e = signed.clone();
    e["SignatureVersion"] = "3".into();
    assert!(refused(judge(&check, &e).await).contains("SignatureVersion"));
    let mut e = signed.clone();
    e["Signature"] = "not base64!".into();
    assert!(refused(judge(&check, &e).await).contains("base64"));

    for url in [
        "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-test.pem",
        "https://sns.us-east-1.amazonaws.com.evil.example/cert.pem",
        "https://evil.example/sns.us-east-1.amazonaws.com.pem",
        "https://sns.us-east-1.amazonaws.com:8443/cert.pem",
        "https://user@sns.us-east-1.amazonaws.com/cert.pem",
        "not a url",
    ] {
        let mut e = notification("id");
        e["SigningCertURL"] = url.into();
        sign(&mut e, "2");
        let reason = refused(judge(&check, &e).await);
        assert!(
            reason.contains("not an https:// URL on an SNS host"),
            "{url}: {reason}"
        );
    }
}

#[tokio::test]
async fn unlisted_topics_and_other_types_are_refused_even_unverified() {
    let check = check(false);
    let mut e = notification("id");
    e["TopicArn"] = "arn:aws:sns:us-east-1:000000000000:other\nline".into();
    let reason = refused(judge(&check, &e).await);
    assert!(reason.contains("not in sns.topic_arns"), "{reason}");
    let mut e = notification("id");
    e["Type"] = "SubscriptionConfirmation".into();
    assert!(refused(judge(&check, &e).await).contains("not a notification"));
    assert!(refused(
        check
            .judge(r#"{"Type":"Notification","MessageId":1}"#)
            .await
    )
    .contains("malformed"));
    // Unverified, a listed topic's notification is unwrapped as it is.
    assert!(matches!(
        judge(&check, &notification("id")).await,
        Judgement::Genuine(_)
    ));
    // Bodies that are no envelope pass as they are.
    assert!(matches!(check.judge("plain").await, Judgement::NotSns));
    assert!(matches!(
        check.judge(r#"{"order": 1}"#).await,
        Judgement::NotSns
    ));
}

#[test]
fn only_sns_hosts_serve_certificates() {
    for host in [
        "sns.us-east-1.amazonaws.com",
        "sns.eu-west-3.amazonaws.com",
        "sns.cn-north-1.amazonaws.com.cn",
    ] {
        assert!(sns_host(host), "{host}");
    }
    for host in [
        "sns.amazonaws.com",
        "sns..amazonaws.com",
        "sqs.us-east-1.amazonaws.com",
        "sns.us-east-1.amazonaws.com.evil.example",
        "evil-sns.us-east-1.amazonaws.com",
        "sns.us_east.amazonaws.com",
        "sns.a.b.amazonaws.com",
    ] {
        assert!(!sns_host(host), "{host}");
    }
    let hosts = Hosts::testing("localhost:8443".into(), Vec::new());
    let url = |u: &str| Url::parse(u).expect("url");
    assert!(hosts.allows(&url("https://localhost:8443/cert.pem")));
    assert!(!hosts.allows(&url("http://localhost:8443/cert.pem")));
    assert!(!hosts.allows(&url("https://localhost:8444/cert.pem")));
    assert!(!Hosts::default().allows(&url("https://localhost:8443/cert.pem")));
}

#[test]
fn the_key_comes_out_of_the_certificate() {
    assert!(rsa_key(CERT.as_bytes()).is_ok());
    assert!(rsa_key(b"junk").is_err());
    assert!(rsa_key(KEY.as_bytes()).is_err());
}
