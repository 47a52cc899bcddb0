//! Where the audit outputs put their records, read back from the local emulator: S3
//! buckets and Firehose delivery streams (moto serves both on the SQS emulator's port).

use std::io::Read;

use aws_sdk_firehose::types::{DeliveryStreamType, ExtendedS3DestinationConfiguration};

/// An S3 client for the emulator (buckets by path); panics when it is not running.
pub async fn s3() -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::from(&crate::sqs::emulator_config().await)
        .force_path_style(true)
        .build();
    let client = aws_sdk_s3::Client::from_conf(config);
    if let Err(e) = client.list_buckets().send().await {
        panic!(
            "S3 is not reachable on the emulator at {} ({}); start it with scripts/moto.sh",
            crate::sqs_endpoint(),
            aws_sdk_s3::error::DisplayErrorContext(&e)
        );
    }
    client
}

/// A bucket with a unique name.
pub async fn bucket(s3: &aws_sdk_s3::Client, prefix: &str) -> String {
    let name = crate::unique(prefix);
    s3.create_bucket()
        .bucket(&name)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "create bucket {name}: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            )
        });
    name
}

/// A Firehose delivery stream with a unique name that delivers to `bucket` under
/// `prefix`.
pub async fn delivery_stream(bucket: &str, prefix: &str) -> String {
    let client = aws_sdk_firehose::Client::new(&crate::sqs::emulator_config().await);
    let name = crate::unique("audit");
    let destination = ExtendedS3DestinationConfiguration::builder()
        .role_arn("arn:aws:iam::123456789012:role/firehose")
        .bucket_arn(format!("arn:aws:s3:::{bucket}"))
        .prefix(prefix)
        .build()
        .expect("destination");
    client
        .create_delivery_stream()
        .delivery_stream_name(&name)
        .delivery_stream_type(DeliveryStreamType::DirectPut)
        .extended_s3_destination_configuration(destination)
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "create delivery stream {name}: {}",
                aws_sdk_firehose::error::DisplayErrorContext(&e)
            )
        });
    name
}

/// Every object under `prefix` in `bucket`: its key and its text (gunzipped when the key
/// ends in `.gz`).
pub async fn objects(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let page = s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await
            .expect("list objects");
        for object in page.contents() {
            let key = object.key().unwrap_or_default().to_owned();
            let body = s3
                .get_object()
                .bucket(bucket)
                .key(&key)
                .send()
                .await
                .expect("get object")
                .body
                .collect()
                .await
                .expect("object body")
                .into_bytes();
            let text = if key.ends_with(".gz") {
                let mut text = String::new();
                flate2::read::GzDecoder::new(&body[..])
                    .read_to_string(&mut text)
                    .unwrap_or_else(|e| panic!("{key} is not gzip: {e}"));
                text
            } else {
                String::from_utf8(body.to_vec()).expect("utf-8 object")
            };
            out.push((key, text));
        }
        token = page.next_continuation_token().map(str::to_owned);
        if token.is_none() {
            return out;
        }
    }
}

/// The `id` of every record in these JSON-lines texts, in order; panics on a line that is
/// not a whole JSON record.
pub fn ids<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    texts
        .into_iter()
        .flat_map(str::lines)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON record ({e}): {l}"));
            v["id"].as_str().expect("an id").to_owned()
        })
        .collect()
}
