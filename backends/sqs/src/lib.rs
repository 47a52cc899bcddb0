//! The Amazon SQS source of ferry.
//!
//! `receivers` long-poll loops receive up to `batch_size` messages each, but only when the
//! engine has room for them. Every message is settled on its own: deletes are coalesced
//! into `DeleteMessageBatch`, retries and releases become visibility changes (so retry
//! state lives in the queue and survives a restart), dead-letters are sent to
//! `dead_letter_queue_url` and then deleted. While a message waits or is in flight, its
//! visibility is extended so that no other consumer receives it.

mod convert;
mod dead_letter;
mod lease;
mod receive;
mod redrive;
mod settle;
mod signature;
pub mod sns;

pub use convert::decode;
pub use dead_letter::ORIGINAL_ATTRIBUTES;
pub use redrive::{Redriven, DEAD_LETTER_ATTRIBUTES};
pub use signature::SetupError as SnsSetupError;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;
use ferry_core::{Delivery, Source, SourceContext, SourceError};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn};

/// The `[routes.x.source]` section of an `sqs` route, validated.
#[derive(Debug, Clone)]
pub struct SqsConfig {
    /// The queue to consume.
    pub queue_url: String,
    /// Overrides the AWS endpoint (local emulators).
    pub endpoint_url: Option<String>,
    /// AWS region; from the standard chain when `None`.
    pub region: Option<String>,
    /// Concurrent `ReceiveMessage` loops.
    pub receivers: usize,
    /// Messages per `ReceiveMessage` (1..=10).
    pub batch_size: i32,
    /// Long-poll wait (0..=20 s).
    pub wait_time: Duration,
    /// Visibility given at receive and renewed while a message is held.
    pub visibility_timeout: Duration,
    /// Where dead-letters go; without one they are left to the queue's redrive policy.
    pub dead_letter_queue_url: Option<String>,
    /// Which SNS envelopes are genuine. Without it every body that looks like an SNS
    /// `Notification` is unwrapped, so anyone who may send to the queue can choose the
    /// id, attributes and time the endpoint sees.
    pub sns: Option<SnsConfig>,
}

/// The `sns` key of an SQS source: only notifications from these topics, signed by SNS
/// (when `verify_signature`), are unwrapped; any other body that claims to be an SNS
/// envelope is dead-lettered with the reason. Bodies that are no SNS envelope at all (raw
/// message delivery) are delivered as they are, under the SQS `MessageId`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnsConfig {
    /// The topics whose notifications this queue takes (exact ARNs).
    pub topic_arns: Vec<String>,
    /// Whether the signature must hold under the certificate SNS publishes.
    pub verify_signature: bool,
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqsError {
    /// No region in the configuration or the environment.
    #[error("region: not set and no AWS region in the environment (set `region` or AWS_REGION)")]
    NoRegion,
    /// The queue could not be reached or does not exist.
    #[error("{key}: cannot use queue {url}: {detail}")]
    Queue {
        /// The configuration key that names the queue.
        key: &'static str,
        /// The queue URL.
        url: String,
        /// What SQS said.
        detail: String,
        /// SQS answered that the queue does not exist or the URL is not one of its own.
        not_found: bool,
    },
    /// No credentials could be found for signing requests.
    #[error(
        "credentials: none found (tried AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
         AWS_PROFILE and the ~/.aws files, AWS_WEB_IDENTITY_TOKEN_FILE, ECS and EC2 \
         instance metadata); provide one of them (last: {detail})"
    )]
    NoCredentials {
        /// What the last source said.
        detail: String,
    },
    /// A redrive was asked of a route without `dead_letter_queue_url`.
    #[error("dead_letter_queue_url: not set, so there is nothing to redrive from")]
    NoDeadLetterQueue,
    /// The SNS signature check could not be set up.
    #[error(transparent)]
    Sns(#[from] signature::SetupError),
}

impl SqsError {
    /// True when the configuration is wrong (as opposed to SQS being unreachable).
    pub fn is_config(&self) -> bool {
        match self {
            SqsError::NoRegion => true,
            SqsError::Queue { not_found, .. } => *not_found,
            SqsError::NoDeadLetterQueue => true,
            SqsError::NoCredentials { .. } => true,
            SqsError::Sns(_) => false,
        }
    }
}

/// A connected SQS source; build it with [`SqsSource::connect`].
#[derive(Debug, Clone)]
pub struct SqsSource {
    client: Client,
    config: Arc<SqsConfig>,
    queue_name: Arc<str>,
    sns: Option<Arc<signature::SnsCheck>>,
}

impl SqsSource {
    /// Builds the client from the standard AWS chain and checks that the queue (and the
    /// dead-letter queue) exist, so a wrong URL is reported at start, not per message.
    pub async fn connect(config: SqsConfig) -> Result<Self, SqsError> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &config.endpoint_url {
            loader = loader.endpoint_url(endpoint);
        }
        let sns = match &config.sns {
            Some(sns) => Some(Arc::new(signature::SnsCheck::new(sns)?)),
            None => None,
        };
        let shared = loader.load().await;
        if shared.region().is_none() {
            return Err(SqsError::NoRegion);
        }
        check_credentials(&shared).await?;
        let client = Client::new(&shared);
        let endpoint = config.endpoint_url.as_deref();
        check_queue(&client, endpoint, "queue_url", &config.queue_url).await?;
        if let Some(dlq) = &config.dead_letter_queue_url {
            check_queue(&client, endpoint, "dead_letter_queue_url", dlq).await?;
        }
        let queue_name = Arc::from(
            config
                .queue_url
                .rsplit('/')
                .next()
                .unwrap_or(&config.queue_url),
        );
        Ok(Self {
            client,
            config: Arc::new(config),
            queue_name,
            sns,
        })
    }

    /// The SDK client, for tools that share the connection (redrive, benchmarks).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

async fn check_queue(
    client: &Client,
    endpoint: Option<&str>,
    key: &'static str,
    url: &str,
) -> Result<(), SqsError> {
    client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| SqsError::Queue {
            key,
            url: url.to_owned(),
            // No answer at all: say which address could not be reached.
            detail: match (&e, endpoint) {
                (aws_sdk_sqs::error::SdkError::DispatchFailure(_), Some(endpoint)) => {
                    format!("cannot reach endpoint_url {endpoint}: {}", describe(&e))
                }
                (aws_sdk_sqs::error::SdkError::DispatchFailure(_), None) => {
                    format!("cannot reach SQS: {}", describe(&e))
                }
                _ => describe(&e),
            },
            not_found: e.code().is_some_and(|c| {
                c.contains("NonExistentQueue")
                    || c.contains("QueueDoesNotExist")
                    || c.contains("InvalidAddress")
                    || c.contains("InvalidParameterValue")
            }),
        })
}

/// One line for an SDK error: the service's code and message, or the transport failure
/// as its chain of causes (`dispatch failure: io error: ... Connection refused`), never
/// the SDK's debug dump of the request.
pub(crate) fn describe<E, R>(e: &aws_sdk_sqs::error::SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    match (e.code(), e.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => ferry_core::error_chain(e),
    }
}

/// Resolves the AWS credentials the client will sign with, so that a machine without any
/// is told so (and where ferry looked) instead of a failed queue call.
async fn check_credentials(shared: &aws_config::SdkConfig) -> Result<(), SqsError> {
    use aws_sdk_sqs::config::ProvideCredentials as _;
    let Some(provider) = shared.credentials_provider() else {
        return Err(SqsError::NoCredentials {
            detail: "no credentials provider".to_owned(),
        });
    };
    match provider.provide_credentials().await {
        Ok(_) => Ok(()),
        Err(e) => Err(SqsError::NoCredentials {
            detail: ferry_core::error_chain(&e).chars().take(160).collect(),
        }),
    }
}

impl Source for SqsSource {
    fn kind(&self) -> &'static str {
        "sqs"
    }

    /// SQS carries at most 256 KiB, body and attributes.
    fn max_message_bytes(&self) -> Option<usize> {
        Some(256 * 1024)
    }

    fn buffer(&self) -> usize {
        self.config.receivers.max(1) * self.config.batch_size.clamp(1, 10) as usize
    }

    async fn run(self, out: mpsc::Sender<Delivery>, ctx: SourceContext) -> Result<(), SourceError> {
        let leases = Arc::new(lease::Leases::new(self.config.visibility_timeout));
        let (settler, settle_tx) = settle::spawn(
            self.client.clone(),
            self.config.clone(),
            ctx.route.clone(),
            ctx.counts.clone(),
        );
        let lease_stop = tokio_util::sync::CancellationToken::new();
        let lease_task = tokio::spawn(ferry_core::lease::keep_renewed(
            leases.clone(),
            lease::Visibility {
                client: self.client.clone(),
                queue_url: self.config.queue_url.clone(),
                route: ctx.route.clone(),
                errors: ctx.counts.broker_errors.clone(),
            },
            lease_stop.clone(),
        ));
        // `connect` has just reached the queue; the first receive may take a whole long
        // poll to answer, and the route is not unready meanwhile.
        ctx.set_connected(true);
        let hint = Arc::new(receive::BacklogHint::default());
        let backlog_task = tokio::spawn(receive::poll_backlog(
            self.client.clone(),
            self.config.queue_url.clone(),
            hint.clone(),
            ctx.clone(),
        ));
        info!(route = %ctx.route, queue = %self.queue_name, receivers = self.config.receivers, "receiving");
        let mut receivers = JoinSet::new();
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for _ in 0..self.config.receivers.max(1) {
            receivers.spawn(receive::receive_loop(
                receive::Receiver {
                    client: self.client.clone(),
                    config: self.config.clone(),
                    queue_name: self.queue_name.clone(),
                    leases: leases.clone(),
                    settle: settle_tx.clone(),
                    failing: failing.clone(),
                    sns: self.sns.clone(),
                    backlog: hint.clone(),
                },
                out.clone(),
                ctx.clone(),
            ));
        }
        drop(out);
        drop(settle_tx);
        while let Some(r) = receivers.join_next().await {
            if let Err(e) = r {
                warn!(route = %ctx.route, error = %e, "receiver task ended abnormally");
            }
        }
        backlog_task.abort();
        // Every handle given out holds a sender of the settler: it ends once all have
        // settled (or been released by dropping), after its last broker call.
        if let Err(e) = settler.await {
            warn!(route = %ctx.route, error = %e, "settler task ended abnormally");
        }
        lease_stop.cancel();
        let _ = lease_task.await;
        Ok(())
    }
}
