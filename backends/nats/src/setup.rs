//! The checks at start: the server answers, JetStream is on, the stream and the durable
//! pull consumer exist (or are made, with `declare`), and a stream captures the
//! dead-letter subject. Each failure is one line naming the key at fault.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::{self, Stream};
use async_nats::jetstream::Context;
use async_nats::jetstream::ErrorCode;

use crate::{DeadLetters, NatsConfig, NatsError};

/// How long connecting, and each JetStream call at start, may take.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// What a successful check hands over.
pub(crate) struct Ready {
    pub(crate) client: async_nats::Client,
    pub(crate) consumer: PullConsumer,
    pub(crate) ack_wait: Duration,
}

/// The client's options: a name the server shows, and reconnection forever once running.
fn options() -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        .name("ferry")
        .connection_timeout(START_TIMEOUT)
        .request_timeout(Some(START_TIMEOUT))
        .ping_interval(Duration::from_secs(10))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| crate::backoff(attempts.min(32) as u32))
}

/// Connects and checks everything the route needs; see the module documentation.
pub(crate) async fn check(config: &NatsConfig) -> Result<Ready, NatsError> {
    let shown = ferry_core::redact::url(&config.url);
    let client = connect(config, &shown).await?;
    let js = async_nats::jetstream::new(client.clone());
    let stream = stream_of(&js, config, &shown).await?;
    let consumer = consumer_of(&stream, config).await?;
    let ack_wait = consumer.cached_info().config.ack_wait;
    if let DeadLetters::Subject(subject) = &config.dead_letters {
        dead_letter_stream(&js, config, subject, &shown).await?;
    }
    Ok(Ready {
        client,
        consumer,
        ack_wait,
    })
}

async fn connect(config: &NatsConfig, shown: &str) -> Result<async_nats::Client, NatsError> {
    use async_nats::ConnectErrorKind as Kind;
    let connecting = options().connect(config.url.as_str());
    let result = tokio::time::timeout(START_TIMEOUT * 2, connecting)
        .await
        .map_err(|_| NatsError::Unreachable {
            url: shown.to_owned(),
            detail: format!("no answer within {:?}", START_TIMEOUT * 2),
        })?;
    result.map_err(|e| {
        let detail = one_line(&e);
        match e.kind() {
            Kind::ServerParse => NatsError::Url(detail),
            Kind::AuthorizationViolation | Kind::Authentication => NatsError::Refused {
                url: shown.to_owned(),
                detail,
            },
            _ => NatsError::Unreachable {
                url: shown.to_owned(),
                detail,
            },
        }
    })
}

/// An error and its causes on one line.
pub(crate) fn one_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line.replace('\n', " ")
}

/// The subjects a stream made by `declare` captures.
pub fn declared_subjects(config: &NatsConfig) -> Vec<String> {
    if config.subjects.is_empty() {
        vec![format!("{}.>", config.stream)]
    } else {
        config.subjects.clone()
    }
}

/// The name of the stream `declare` makes for the dead-letter subject.
pub fn dead_letter_stream_name(config: &NatsConfig) -> String {
    format!("{}_DEAD_LETTERS", config.stream)
}

async fn stream_of(js: &Context, config: &NatsConfig, shown: &str) -> Result<Stream, NatsError> {
    match js.get_stream(&config.stream).await {
        Ok(stream) => Ok(stream),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(err)
                if err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                if !config.declare {
                    return Err(NatsError::Setup {
                        key: "stream",
                        detail: format!(
                            "no stream {:?} on {shown} (create it, or set declare = true)",
                            config.stream
                        ),
                    });
                }
                js.get_or_create_stream(stream::Config {
                    name: config.stream.clone(),
                    subjects: declared_subjects(config),
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| NatsError::Setup {
                    key: "stream",
                    detail: format!("creating {:?}: {}", config.stream, one_line(&e)),
                })
            }
            GetStreamErrorKind::InvalidStreamName | GetStreamErrorKind::EmptyName => {
                Err(NatsError::Setup {
                    key: "stream",
                    detail: format!("{:?} is not a valid stream name", config.stream),
                })
            }
            GetStreamErrorKind::JetStream(_) => Err(NatsError::Setup {
                key: "stream",
                detail: one_line(&e),
            }),
            _ => Err(NatsError::Unreachable {
                url: shown.to_owned(),
                detail: format!(
                    "JetStream did not answer ({}); is it enabled (-js)?",
                    one_line(&e)
                ),
            }),
        },
    }
}

async fn consumer_of(stream: &Stream, config: &NatsConfig) -> Result<PullConsumer, NatsError> {
    use async_nats::jetstream::context::ConsumerInfoErrorKind as Kind;
    let name = config.consumer.as_str();
    match stream.consumer_info(name).await {
        Ok(info) => {
            if info.config.deliver_subject.is_some() {
                return Err(NatsError::Setup {
                    key: "consumer",
                    detail: format!("{name:?} is a push consumer; ferry needs a pull consumer"),
                });
            }
            if info.config.ack_policy != AckPolicy::Explicit {
                return Err(NatsError::Setup {
                    key: "consumer",
                    detail: format!(
                        "{name:?} has ack policy {:?}; ferry needs explicit acks",
                        info.config.ack_policy
                    ),
                });
            }
        }
        Err(e) if matches!(e.kind(), Kind::NotFound) && config.declare => {
            let created = stream
                .create_consumer(pull::Config {
                    durable_name: Some(name.to_owned()),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: config.ack_wait,
                    max_deliver: -1,
                    max_ack_pending: config.max_ack_pending,
                    filter_subject: config.filter_subject.clone().unwrap_or_default(),
                    ..Default::default()
                })
                .await;
            return created.map_err(|e| NatsError::Setup {
                key: "consumer",
                detail: format!("creating {name:?}: {}", one_line(&e)),
            });
        }
        Err(e) if matches!(e.kind(), Kind::NotFound) => {
            return Err(NatsError::Setup {
                key: "consumer",
                detail: format!(
                    "no consumer {name:?} on stream {:?} (create it, or set declare = true)",
                    config.stream
                ),
            });
        }
        Err(e) => {
            return Err(NatsError::Setup {
                key: "consumer",
                detail: one_line(&e),
            })
        }
    }
    stream
        .get_consumer(name)
        .await
        .map_err(|e| NatsError::Setup {
            key: "consumer",
            detail: one_line(&*e),
        })
}

/// A stream must capture the dead-letter subject (else its publish has no responder), and
/// it must not be the route's own stream (dead letters would be delivered again).
async fn dead_letter_stream(
    js: &Context,
    config: &NatsConfig,
    subject: &str,
    shown: &str,
) -> Result<(), NatsError> {
    use async_nats::jetstream::context::GetStreamByNameErrorKind as Kind;
    match js.stream_by_subject(subject).await {
        Ok(name) if name == config.stream => Err(NatsError::Setup {
            key: "dead_letter_subject",
            detail: format!(
                "{subject:?} is captured by the route's own stream {name:?}: dead letters would be delivered again"
            ),
        }),
        Ok(_) => Ok(()),
        Err(e) if matches!(e.kind(), Kind::NotFound) && config.declare => {
            let name = dead_letter_stream_name(config);
            js.get_or_create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![subject.to_owned()],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| NatsError::Setup {
                key: "dead_letter_subject",
                detail: format!("creating the dead-letter stream {name:?}: {}", one_line(&e)),
            })
        }
        Err(e) if matches!(e.kind(), Kind::NotFound) => Err(NatsError::Setup {
            key: "dead_letter_subject",
            detail: format!(
                "no stream on {shown} captures {subject:?} (create one, or set declare = true)"
            ),
        }),
        Err(e) if matches!(e.kind(), Kind::InvalidSubject) => Err(NatsError::Setup {
            key: "dead_letter_subject",
            detail: format!("{subject:?} is not a valid subject"),
        }),
        Err(e) => Err(NatsError::Setup {
            key: "dead_letter_subject",
            detail: one_line(&e),
        }),
    }
}
