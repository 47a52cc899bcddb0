//! SNS envelopes: an SQS queue subscribed to an SNS topic receives each publication wrapped
//! in a JSON `Notification` unless the subscription uses raw message delivery.

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

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Envelope {
    #[serde(rename = "Type")]
    kind: String,
    message_id: String,
    message: String,
    timestamp: Option<String>,
    #[serde(default)]
    message_attributes: HashMap<String, Attribute>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Attribute {
    #[serde(rename = "Type")]
    kind: String,
    value: Option<String>,
}

/// Unwraps an SNS `Notification`; anything else (raw delivery, plain text, broken JSON, a
/// JSON object that is not a notification) returns `None` and is delivered as it is.
pub fn unwrap(body: &str) -> Option<Notification> {
    if !body.trim_start().starts_with('{') {
        return None;
    }
    let envelope: Envelope = serde_json::from_str(body).ok()?;
    if envelope.kind != "Notification" {
        return None;
    }
    let attributes = envelope
        .message_attributes
        .into_iter()
        .filter(|(_, a)| a.kind.starts_with("String") || a.kind.starts_with("Number"))
        .filter_map(|(k, a)| Some((k, a.value?)))
        .collect();
    Some(Notification {
        id: envelope.message_id,
        message: envelope.message,
        timestamp: envelope.timestamp,
        attributes,
    })
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
}
