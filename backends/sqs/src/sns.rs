//! SNS envelopes: an SQS queue subscribed to an SNS topic receives each publication wrapped
//! in a JSON `Notification` unless the subscription uses raw message delivery.
//!
//! Anyone who may send to the queue can also write a body that looks like a notification,
//! and choose its `MessageId` (the `Idempotency-Key`), attributes and time. A source with an
//! `sns` section ([`crate::SnsConfig`]) therefore unwraps only envelopes from its listed
//! topics whose signature holds ([`crate::signature`]); one without it unwraps every
//! notification, as SNS alone could write it.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

/// What the endpoint should see of an SNS notification.
#[derive(Debug, PartialEq, Eq)]
pub struct Notification {
    /// SNS `MessageId`: the same on every redelivery and across queues.
    pub id: String,
    /// SNS `Message`: what the publisher sent.
    pub message: String,
    /// SNS `Timestamp` (RFC 3339), as published.
    pub timestamp: Option<String>,
    /// SNS `MessageAttributes` of type String or Number.
    pub attributes: BTreeMap<String, String>,
}

/// The `Type`s SNS writes into a queue: a body that claims one of them claims to be from SNS.
pub const TYPES: [&str; 3] = [
    "Notification",
    "SubscriptionConfirmation",
    "UnsubscribeConfirmation",
];

/// An SNS envelope as SNS writes it, with what its signature covers.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Envelope {
    /// `Notification`, `SubscriptionConfirmation` or `UnsubscribeConfirmation`.
    #[serde(rename = "Type")]
    pub kind: String,
    /// SNS `MessageId`.
    pub message_id: String,
    /// What the publisher sent (for a confirmation: SNS's own text).
    pub message: String,
    /// When SNS published it (RFC 3339).
    pub timestamp: Option<String>,
    /// The topic it came from.
    pub topic_arn: Option<String>,
    /// The publisher's subject, when it gave one.
    pub subject: Option<String>,
    /// `"1"` (SHA1withRSA) or `"2"` (SHA256withRSA).
    pub signature_version: Option<String>,
    /// Base64 of the signature over [`Envelope::canonical`].
    pub signature: Option<String>,
    /// Where SNS publishes the certificate of the key that signed it.
    #[serde(rename = "SigningCertURL")]
    pub signing_cert_url: Option<String>,
    /// Confirmations only: where a subscription is confirmed.
    #[serde(rename = "SubscribeURL")]
    pub subscribe_url: Option<String>,
    /// Confirmations only: the confirmation token.
    pub token: Option<String>,
    #[serde(default)]
    message_attributes: HashMap<String, Attribute>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Attribute {
    #[serde(rename = "Type")]
    kind: String,
    value: Option<String>,
}

#[derive(Deserialize)]
struct Claim {
    #[serde(rename = "Type")]
    kind: String,
}

/// What a body is, to a source that checks where its envelopes come from.
#[derive(Debug)]
pub enum Parsed {
    /// Not an SNS envelope at all (raw message delivery, anything else): delivered as it is.
    NotSns,
    /// A JSON object whose `Type` is one of SNS's, in full.
    Envelope(Box<Envelope>),
    /// It claims SNS's `Type` but the rest does not parse: never taken for genuine.
    Malformed(String),
}

/// Sorts a body into [`Parsed`].
pub fn parse(body: &str) -> Parsed {
    if !body.trim_start().starts_with('{') {
        return Parsed::NotSns;
    }
    match serde_json::from_str::<Claim>(body) {
        Ok(claim) if TYPES.contains(&claim.kind.as_str()) => {}
        _ => return Parsed::NotSns,
    }
    match serde_json::from_str::<Envelope>(body) {
        Ok(envelope) => Parsed::Envelope(Box::new(envelope)),
        Err(e) => Parsed::Malformed(e.to_string()),
    }
}

impl Envelope {
    /// The text SNS signed, as AWS documents it: for a `Notification` `Message`,
    /// `MessageId`, `Subject` (only if present), `Timestamp`, `TopicArn`, `Type`; for a
    /// confirmation `Message`, `MessageId`, `SubscribeURL`, `Timestamp`, `Token`,
    /// `TopicArn`, `Type`; each as `Key\nValue\n`. `None` when a covered field is missing.
    pub fn canonical(&self) -> Option<String> {
        let mut fields: Vec<(&str, &str)> =
            vec![("Message", &self.message), ("MessageId", &self.message_id)];
        if self.kind == "Notification" {
            if let Some(subject) = &self.subject {
                fields.push(("Subject", subject));
            }
            fields.push(("Timestamp", self.timestamp.as_deref()?));
        } else {
            fields.push(("SubscribeURL", self.subscribe_url.as_deref()?));
            fields.push(("Timestamp", self.timestamp.as_deref()?));
            fields.push(("Token", self.token.as_deref()?));
        }
        fields.push(("TopicArn", self.topic_arn.as_deref()?));
        fields.push(("Type", &self.kind));
        let mut text = String::new();
        for (key, value) in fields {
            text.push_str(key);
            text.push('\n');
            text.push_str(value);
            text.push('\n');
        }
        Some(text)
    }

    /// What the endpoint sees of it.
    pub fn into_notification(self) -> Notification {
        let attributes = self
            .message_attributes
            .into_iter()
            .filter(|(_, a)| a.kind.starts_with("String") || a.kind.starts_with("Number"))
            .filter_map(|(k, a)| Some((k, a.value?)))
            .collect();
        Notification {
            id: self.message_id,
            message: self.message,
            timestamp: self.timestamp,
            attributes,
        }
    }
}

/// Unwraps an SNS `Notification`; anything else (raw delivery, plain text, broken JSON, a
/// JSON object that is not a notification) returns `None` and is delivered as it is. It
/// trusts the envelope: what a source without an `sns` section does.
pub fn unwrap(body: &str) -> Option<Notification> {
    match parse(body) {
        Parsed::Envelope(envelope) if envelope.kind == "Notification" => {
            Some(envelope.into_notification())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOTIFICATION: &str = r#"{
      "Type" : "Notification",
      "MessageId" : "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
      "TopicArn" : "arn:aws:sns:us-east-1:000000000000:orders-topic",
      "Message" : "{\"order\": 1}",
      "Timestamp" : "2012-05-02T00:54:06.655Z",
      "SignatureVersion" : "1",
      "MessageAttributes" : {
        "tenant" : {"Type":"String","Value":"acme"},
        "n" : {"Type":"Number","Value":"5"},
        "blob" : {"Type":"Binary","Value":"AAE="}
      }
    }"#;

    #[test]
    fn unwraps_a_notification() {
        let n = unwrap(NOTIFICATION).expect("notification");
        assert_eq!(n.id, "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324");
        assert_eq!(n.message, "{\"order\": 1}");
        assert_eq!(n.timestamp.as_deref(), Some("2012-05-02T00:54:06.655Z"));
        assert_eq!(n.attributes.len(), 2);
        assert_eq!(n.attributes["tenant"], "acme");
        assert_eq!(n.attributes["n"], "5");
    }

    #[test]
    fn anything_else_is_left_alone() {
        for body in [
            "plain text",
            "{broken json",
            r#"{"order": 1}"#,
            r#"{"Type": "SubscriptionConfirmation", "MessageId": "x", "Message": "y"}"#,
            r#"{"Type": "Notification", "MessageId": 5, "Message": "y"}"#,
            "",
        ] {
            assert_eq!(unwrap(body), None, "{body}");
        }
    }

    #[test]
    fn only_sns_types_claim_to_be_sns() {
        for body in [
            "plain",
            r#"{"order": 1}"#,
            r#"{"Type": "Order", "MessageId": "x"}"#,
        ] {
            assert!(matches!(parse(body), Parsed::NotSns), "{body}");
        }
        for body in [
            r#"{"Type": "Notification", "MessageId": 5, "Message": "y"}"#,
            r#"{"Type": "Notification"}"#,
            r#"{"Type": "SubscriptionConfirmation", "Message": "y"}"#,
        ] {
            assert!(matches!(parse(body), Parsed::Malformed(_)), "{body}");
        }
        assert!(matches!(parse(NOTIFICATION), Parsed::Envelope(_)));
    }

    /// The string AWS documents for a notification: Subject only when present, in key order.
    #[test]
    fn canonical_notification() {
        let Parsed::Envelope(e) = parse(NOTIFICATION) else {
            panic!("an envelope");
        };
        assert_eq!(
            e.canonical().as_deref(),
            Some(
                "Message\n{\"order\": 1}\nMessageId\n22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324\n\
                 Timestamp\n2012-05-02T00:54:06.655Z\n\
                 TopicArn\narn:aws:sns:us-east-1:000000000000:orders-topic\nType\nNotification\n"
            )
        );
        let with_subject = NOTIFICATION.replace(r#""Type" :"#, r#""Subject" : "Hi", "Type" :"#);
        let Parsed::Envelope(e) = parse(&with_subject) else {
            panic!("an envelope");
        };
        let text = e.canonical().expect("canonical");
        assert!(text
            .contains("MessageId\n22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324\nSubject\nHi\nTimestamp\n"));
        let no_topic = NOTIFICATION.replace("TopicArn", "Topic");
        let Parsed::Envelope(e) = parse(&no_topic) else {
            panic!("an envelope");
        };
        assert_eq!(e.canonical(), None);
    }

    #[test]
    fn canonical_confirmation() {
        let body = r#"{"Type":"SubscriptionConfirmation","MessageId":"m","Token":"t",
            "TopicArn":"arn","Message":"confirm","SubscribeURL":"https://x","Timestamp":"ts"}"#;
        let Parsed::Envelope(e) = parse(body) else {
            panic!("an envelope");
        };
        assert_eq!(
            e.canonical().as_deref(),
            Some("Message\nconfirm\nMessageId\nm\nSubscribeURL\nhttps://x\nTimestamp\nts\nToken\nt\nTopicArn\narn\nType\nSubscriptionConfirmation\n")
        );
    }
}
