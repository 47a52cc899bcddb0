//! The properties the fuzz targets check, kept out of the targets so that every target
//! (and a plain `cargo test` of a reproducer) runs the same checks.
//!
//! A panic anywhere below is a finding: either the project code panicked on untrusted
//! input, or it broke one of the asserted contracts.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_sqs::types::{
    Message as SqsMessage, MessageAttributeValue, MessageSystemAttributeName,
};
use base64::Engine as _;
use ferry_bin::config::{self, ConfigError, Format};
use ferry_core::Message;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{json, Value};

/// The environment the configuration sees: the variables the documented examples use,
/// one empty and one with a line break (environment values may hold either).
fn environment() -> Vec<(String, String)> {
    [
        ("ORDERS_TOKEN", "s3cret"),
        ("ADMIN_TOKEN", "admin-s3cret"),
        ("RABBIT_PASSWORD", "guest"),
        ("KAFKA_PASSWORD", "k4fka"),
        (
            "ORDERS_SIGNING_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ),
        ("EMPTY", ""),
        ("TWO_LINES", "first\nsecond"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// One configuration text through what `ferry validate` does: parse, `FERRY__` overrides,
/// `${VAR}` substitution, deserialization, validation, and printing it redacted.
///
/// Inputs of even length also get a `FERRY__` override (whose value is itself a `${VAR}`),
/// so that overrides meet arbitrary trees without hiding every error of the other half.
pub fn config(data: &[u8], format: Format) {
    // The loader reads files as UTF-8 and reports anything else as a read error.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut vars = environment();
    if data.len() % 2 == 0 {
        vars.push((
            "FERRY__ADMIN__TOKEN".to_owned(),
            "${ADMIN_TOKEN}".to_owned(),
        ));
    }
    let name = match format {
        Format::Toml => "fuzz.toml",
        Format::Yaml => "fuzz.yaml",
    };
    let config = match config::load_str(name, text, format, &vars) {
        Ok(config) => config,
        Err(errors) => return check_errors(&errors),
    };
    if let Err(errors) = config::validate(&config) {
        check_errors(&errors);
    }
    // `ferry validate` prints this; a value TOML cannot hold is an error, not a panic.
    let _ = toml::to_string_pretty(&config::redacted(&config));
}

/// Every error names where it is and what is wrong, on one line.
fn check_errors(errors: &[ConfigError]) {
    assert!(!errors.is_empty(), "failed without saying why");
    for e in errors {
        assert!(!e.at.trim().is_empty(), "no place: {e:?}");
        assert!(!e.what.trim().is_empty(), "no reason: {e:?}");
        let line = e.to_string();
        assert!(
            !line.contains(['\n', '\r']),
            "the error spans lines: {line:?}"
        );
    }
}

/// The SQS `MessageId` of every fuzzed message.
const SQS_ID: &str = "0d8c2d4b-sqs-message-id";
/// The SNS `MessageId` of the envelope built around the body.
const SNS_ID: &str = "5e0a1f2c-sns-message-id";

/// What an SQS message carries besides its body, from `NAME=value` lines.
#[derive(Default)]
struct Extras {
    /// SQS system attributes (`SentTimestamp`, `ApproximateReceiveCount`, ...).
    system: Vec<(String, String)>,
    /// `attr.NAME=value`: message attributes of type String.
    strings: Vec<(String, String)>,
    /// `binary.NAME=value`: message attributes of type Binary (no string value).
    binaries: Vec<(String, String)>,
    /// `sns.Timestamp=value`: the `Timestamp` of the built envelope.
    sns_timestamp: Option<String>,
    /// `sns.attr.NAME=value`: String `MessageAttributes` of the built envelope.
    sns_attributes: Vec<(String, String)>,
}

impl Extras {
    fn parse(text: &str) -> Self {
        let mut extras = Extras::default();
        for line in text.lines() {
            let Some((name, value)) = line.split_once('=') else {
                continue;
            };
            let pair = |n: &str| (n.to_owned(), value.to_owned());
            if let Some(n) = name.strip_prefix("sns.attr.") {
                extras.sns_attributes.push(pair(n));
            } else if name == "sns.Timestamp" {
                extras.sns_timestamp = Some(value.to_owned());
            } else if let Some(n) = name.strip_prefix("attr.") {
                extras.strings.push(pair(n));
            } else if let Some(n) = name.strip_prefix("binary.") {
                extras.binaries.push(pair(n));
            } else {
                extras.system.push(pair(name));
            }
        }
        extras
    }

    /// The SQS message attributes by name, with their string value if they have one; a
    /// later one replaces an earlier one of the same name, as in the message.
    fn sqs_attributes(&self) -> HashMap<String, Option<String>> {
        let mut attributes = HashMap::new();
        for (name, value) in &self.strings {
            attributes.insert(name.clone(), Some(value.clone()));
        }
        for (name, _) in &self.binaries {
            attributes.insert(name.clone(), None);
        }
        attributes
    }

    /// The message as `ReceiveMessage` would return it.
    fn message(&self, body: &str) -> SqsMessage {
        let mut m = SqsMessage::builder()
            .message_id(SQS_ID)
            .receipt_handle("fuzz-receipt-handle")
            .body(body);
        for (name, value) in &self.system {
            m = m.attributes(MessageSystemAttributeName::from(name.as_str()), value);
        }
        for (name, value) in &self.strings {
            let built = MessageAttributeValue::builder()
                .data_type("String")
                .string_value(value)
                .build();
            if let Ok(v) = built {
                m = m.message_attributes(name, v);
            }
        }
        for (name, value) in &self.binaries {
            let built = MessageAttributeValue::builder()
                .data_type("Binary")
                .binary_value(aws_sdk_sqs::primitives::Blob::new(value.as_bytes()))
                .build();
            if let Ok(v) = built {
                m = m.message_attributes(name, v);
            }
        }
        m.build()
    }
}

/// One SQS message: `BODY`, optionally followed by a NUL byte and `NAME=value` lines (see
/// [`Extras`]). The body is decoded as it is, then wrapped in an SNS notification and
/// decoded again; both results also go through the HTTP sink's encoders.
pub fn sqs_message(data: &[u8]) {
    let (body, extras) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    // SQS bodies are Unicode text; the SDK hands them over as a `String`.
    let Ok(body) = std::str::from_utf8(body) else {
        return;
    };
    let extras = Extras::parse(&String::from_utf8_lossy(extras));
    let source: Arc<str> = Arc::from("fuzz-queue");

    let raw = ferry_sqs::decode(extras.message(body), &source)
        .expect("a message with an id and a receipt handle decodes");
    if raw.id == SQS_ID && raw.payload == body.as_bytes() {
        assert!(
            ferry_sqs::sns::unwrap(body).is_none(),
            "a notification was delivered as it is"
        );
    } else {
        // Only an SNS notification is changed, and then to its id and its message.
        let n = ferry_sqs::sns::unwrap(body).expect("a body that is not a notification changed");
        // An SNS id that could not be the Idempotency-Key header gives way to the SQS id.
        assert!(
            raw.id == n.id || raw.id == SQS_ID,
            "neither the SNS nor the SQS id"
        );
        assert!(!raw.id.is_empty(), "an empty id");
        assert_eq!(raw.payload, n.message.as_bytes());
        let v: Value = serde_json::from_str(body).expect("a notification is JSON");
        assert_eq!(v["Type"], "Notification");
        assert_eq!(v["MessageId"].as_str(), Some(n.id.as_str()));
        assert_eq!(
            v["Message"].as_str().map(str::as_bytes),
            Some(&raw.payload[..])
        );
    }
    check_message(&raw, &extras);

    let mut envelope = json!({
        "Type": "Notification",
        "MessageId": SNS_ID,
        "TopicArn": "arn:aws:sns:us-east-1:000000000000:fuzz-topic",
        "Message": body,
        "SignatureVersion": "1",
    });
    if let Some(ts) = &extras.sns_timestamp {
        envelope["Timestamp"] = json!(ts);
    }
    let attributes: serde_json::Map<String, Value> = extras
        .sns_attributes
        .iter()
        .map(|(k, v)| (k.clone(), json!({"Type": "String", "Value": v})))
        .collect();
    envelope["MessageAttributes"] = Value::Object(attributes.clone());
    let wrapped_body = envelope.to_string();
    let wrapped = ferry_sqs::decode(extras.message(&wrapped_body), &source)
        .expect("a message with an id and a receipt handle decodes");
    assert_eq!(wrapped.id, SNS_ID, "a notification keeps the SNS id");
    assert_eq!(
        wrapped.payload,
        body.as_bytes(),
        "the SNS message is the payload"
    );
    let sqs_attributes = extras.sqs_attributes();
    for (name, value) in &attributes {
        if !matches!(sqs_attributes.get(name), Some(Some(_))) {
            assert_eq!(
                wrapped
                    .attributes
                    .get(name)
                    .map(|s| Value::String(s.clone())),
                Some(value["Value"].clone()),
                "SNS attribute {name:?}"
            );
        }
    }
    check_message(&wrapped, &extras);
}

/// What holds for every decoded message, and that the HTTP sink can send it.
fn check_message(m: &Message, extras: &Extras) {
    assert!(m.attempt >= 1);
    // SQS message attributes with a string value are attributes (over SNS ones).
    for (name, value) in extras.sqs_attributes() {
        if let Some(value) = value {
            assert_eq!(m.attributes.get(&name), Some(&value), "attribute {name:?}");
        }
    }
    assert_eq!(m.traceparent.as_ref(), m.attributes.get("traceparent"));

    let body: Value =
        serde_json::from_slice(&ferry_http::encode_envelope(m)).expect("the envelope is JSON");
    assert_eq!(body["id"].as_str(), Some(m.id.as_str()));
    let sent = match (body.get("msg"), body.get("msg_base64")) {
        (Some(Value::String(text)), None) => text.as_bytes().to_vec(),
        (None, Some(Value::String(encoded))) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("msg_base64 is base64"),
        other => panic!("no payload in the envelope: {other:?}"),
    };
    assert_eq!(sent, m.payload, "the envelope carries every payload byte");
    let mut headers = HeaderMap::new();
    ferry_http::message_headers(m, &HeaderValue::from_static("fuzz"), &mut headers);
    ferry_http::cloudevent_headers(m, &mut headers);
}
