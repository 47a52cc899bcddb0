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
