//! The real AWS SDK against the local emulator: queues, publishing, depth.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;

/// The AWS configuration of every client of the emulator (SQS, SNS, S3, Firehose).
pub async fn emulator_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(crate::sqs_endpoint())
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test",
            "test",
            None,
            None,
            "ferry-tests",
        ))
        .load()
        .await
}

/// An SQS client for the emulator; panics with a clear message when it is not running.
pub async fn client() -> Client {
    let endpoint = crate::sqs_endpoint();
    let client = Client::new(&emulator_config().await);
    if let Err(e) = client.list_queues().send().await {
        panic!(
            "the SQS emulator is not reachable at {endpoint} ({}); start it with scripts/moto.sh \
             or run the tests through scripts/test.sh",
            aws_sdk_sqs::error::DisplayErrorContext(&e)
        );
    }
    client
}

/// Creates a queue with a unique name; returns its URL.
pub async fn create_queue(client: &Client, prefix: &str) -> String {
    create_queue_named(client, &crate::unique(prefix)).await
}

/// Creates (or re-creates) the queue `name`; returns its URL.
pub async fn create_queue_named(client: &Client, name: &str) -> String {
    client
        .create_queue()
        .queue_name(name)
        .send()
        .await
        .expect("create queue")
        .queue_url
        .expect("queue url")
}

/// The queue's ARN (for SNS subscriptions).
pub async fn queue_arn(client: &Client, url: &str) -> String {
    client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("queue attributes")
        .attributes
        .and_then(|mut a| a.remove(&QueueAttributeName::QueueArn))
        .expect("queue arn")
}

/// Sends bodies in batches of 10.
pub async fn send(client: &Client, url: &str, bodies: &[String]) {
    send_ids(client, url, bodies).await;
}

/// Sends bodies in batches of 10; returns the SQS MessageId of each, in order.
pub async fn send_ids(client: &Client, url: &str, bodies: &[String]) -> Vec<String> {
    let mut ids = Vec::with_capacity(bodies.len());
    for chunk in bodies.chunks(10) {
        let entries = chunk.iter().enumerate().map(|(i, body)| {
            SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(body)
                .build()
                .expect("entry")
        });
        let resp = client
            .send_message_batch()
            .queue_url(url)
            .set_entries(Some(entries.collect()))
            .send()
            .await
            .expect("send batch");
        assert!(resp.failed.is_empty(), "send failures: {:?}", resp.failed);
        let mut sent = resp.successful;
        sent.sort_by_key(|s| s.id.parse::<usize>().unwrap_or(usize::MAX));
        ids.extend(sent.into_iter().map(|s| s.message_id));
    }
    ids
}

/// Visible plus in-flight messages.
pub async fn depth(client: &Client, url: &str) -> (u64, u64) {
    let attrs = client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .expect("queue attributes")
        .attributes
        .unwrap_or_default();
    let get = |k: &QueueAttributeName| {
        attrs
            .get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX)
    };
    (
        get(&QueueAttributeName::ApproximateNumberOfMessages),
        get(&QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
    )
}

/// A message read back from a queue (for dead-letter checks).
#[derive(Debug)]
pub struct Stored {
    /// The body.
    pub body: String,
    /// String message attributes.
    pub attributes: HashMap<String, String>,
}

/// Receives (and deletes) everything currently visible on a queue.
pub async fn drain(client: &Client, url: &str) -> Vec<Stored> {
    let mut out = Vec::new();
    loop {
        let resp = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .send()
            .await
            .expect("receive");
        let messages = resp.messages.unwrap_or_default();
        if messages.is_empty() {
            return out;
        }
        for m in messages {
            if let Some(rh) = &m.receipt_handle {
                client
                    .delete_message()
                    .queue_url(url)
                    .receipt_handle(rh)
                    .send()
                    .await
                    .expect("delete");
            }
            let attributes = m
                .message_attributes
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(k, v): (String, MessageAttributeValue)| Some((k, v.string_value?)))
                .collect();
            out.push(Stored {
                body: m.body.unwrap_or_default(),
                attributes,
            });
        }
    }
}

/// One SQS call on its way through an [`SqsProxy`].
#[derive(Debug)]
pub struct Call {
    /// The action, from `X-Amz-Target` (`SendMessage`, `ChangeMessageVisibilityBatch`, ...).
    pub action: String,
    /// The JSON request.
    pub request: serde_json::Value,
}

/// What an [`SqsProxy`] does with a call.
#[derive(Debug)]
pub enum Verdict {
    /// Pass it to the emulator.
    Forward,
    /// Answer with this SQS error code and message (status 400), as SQS itself would.
    Refuse(&'static str, String),
    /// Answer a batch call with every entry failed (status 200, SQS's per-entry failure).
    FailEntries,
}

/// An HTTP proxy in front of the emulator that sees each SQS call (the SDK speaks SQS's
/// JSON protocol) and lets a rule refuse it: faults the emulator cannot make by itself.
/// It also counts every call by action, which is what SQS bills.
pub struct SqsProxy {
    addr: std::net::SocketAddr,
    failed: Arc<Mutex<HashMap<String, usize>>>,
    calls: Arc<Mutex<HashMap<String, usize>>>,
}

struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    rule: Box<dyn Fn(&Call) -> Verdict + Send + Sync>,
    failed: Arc<Mutex<HashMap<String, usize>>>,
    calls: Arc<Mutex<HashMap<String, usize>>>,
}

impl SqsProxy {
    /// Starts a proxy to the emulator that applies `rule` to every call.
    pub async fn start(rule: impl Fn(&Call) -> Verdict + Send + Sync + 'static) -> Self {
        let failed = Arc::new(Mutex::new(HashMap::new()));
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let state = Arc::new(ProxyState {
            upstream: crate::sqs_endpoint(),
            http: reqwest::Client::new(),
            rule: Box::new(rule),
            failed: failed.clone(),
            calls: calls.clone(),
        });
        let app = axum::Router::new().fallback(proxy_call).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the SQS proxy");
        let addr = listener.local_addr().expect("proxy address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            addr,
            failed,
            calls,
        }
    }

    /// A proxy that passes every call through, to count them.
    pub async fn counting() -> Self {
        Self::start(|_| Verdict::Forward).await
    }

    /// Calls made so far (answered or not), by action.
    pub fn calls(&self) -> HashMap<String, usize> {
        self.calls.lock().expect("lock").clone()
    }

    /// The URL to give ferry as `endpoint_url`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many calls of `action` the rule refused or failed so far.
    pub fn failed(&self, action: &str) -> usize {
        self.failed
            .lock()
            .expect("lock")
            .get(action)
            .copied()
            .unwrap_or(0)
    }
}

async fn proxy_call(
    axum::extract::State(state): axum::extract::State<Arc<ProxyState>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let action = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or_default()
        .to_owned();
    let call = Call {
        action,
        request: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    };
    let json = [("content-type", "application/x-amz-json-1.0")];
    *state
        .calls
        .lock()
        .expect("lock")
        .entry(call.action.clone())
        .or_default() += 1;
    let verdict = (state.rule)(&call);
    if !matches!(verdict, Verdict::Forward) {
        *state
            .failed
            .lock()
            .expect("lock")
            .entry(call.action.clone())
            .or_default() += 1;
    }
    match verdict {
        Verdict::Forward => {}
        Verdict::Refuse(code, message) => {
            let body = serde_json::json!({"__type": format!("com.amazonaws.sqs#{code}"), "message": message});
            return (axum::http::StatusCode::BAD_REQUEST, json, body.to_string()).into_response();
        }
        Verdict::FailEntries => {
            let failed: Vec<serde_json::Value> = call.request["Entries"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    serde_json::json!({"Id": e["Id"], "SenderFault": false, "Code": "InternalError",
                        "Message": "failed by the test proxy"})
                })
                .collect();
            let body = serde_json::json!({"Successful": [], "Failed": failed});
            return (axum::http::StatusCode::OK, json, body.to_string()).into_response();
        }
    }
    let mut forward = state
        .http
        .request(method, format!("{}{uri}", state.upstream))
        .body(body);
    for (name, value) in &headers {
        if !matches!(name.as_str(), "host" | "content-length" | "connection") {
            forward = forward.header(name, value);
        }
    }
    let answer = match forward.send().await {
        Ok(a) => a,
        Err(e) => return (axum::http::StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = answer.status();
    let mut reply_headers = axum::http::HeaderMap::new();
    for (name, value) in answer.headers() {
        if !matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            reply_headers.append(name, value.clone());
        }
    }
    let bytes = answer.bytes().await.unwrap_or_default();
    (status, reply_headers, bytes).into_response()
}

/// SQS's limits on a message sent with `SendMessage`, which the emulator does not check:
/// at most 10 message attributes, and 256 KiB for the body and the attributes (names,
/// types and values) together. Refuses, with the error SQS gives, a call that breaks them.
pub fn sqs_limits(call: &Call) -> Verdict {
    if call.action != "SendMessage" {
        return Verdict::Forward;
    }
    let body = call.request["MessageBody"].as_str().map_or(0, str::len);
    let attributes = call.request["MessageAttributes"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    if attributes.len() > 10 {
        return Verdict::Refuse(
            "InvalidParameterValue",
            format!(
                "Number of message attributes [{}] exceeds the allowed maximum [10].",
                attributes.len()
            ),
        );
    }
    let size = body
        + attributes
            .iter()
            .map(|(name, v)| {
                let text = |k: &str| v[k].as_str().map_or(0, str::len);
                // Binary values travel in base64: count the bytes they stand for.
                name.len() + text("DataType") + text("StringValue") + text("BinaryValue") * 3 / 4
            })
            .sum::<usize>();
    if size > 262_144 {
        return Verdict::Refuse(
            "InvalidParameterValue",
            format!("One or more parameters are invalid. Reason: Message must be shorter than 262144 bytes ({size})."),
        );
    }
    Verdict::Forward
}

/// Receives what is visible on a queue without taking it (visibility 0), with every
/// attribute, string or not.
pub async fn peek(client: &Client, url: &str) -> Vec<aws_sdk_sqs::types::Message> {
    client
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .visibility_timeout(0)
        .message_attribute_names("All")
        .send()
        .await
        .expect("receive")
        .messages
        .unwrap_or_default()
}
