//! The delivery engine: receive → bounded concurrent delivery → settle.
//!
//! One task per route pulls from the source only when a concurrency permit is free (that
//! is the backpressure: the source waits for room before asking the broker for more), and
//! spawns one task per message that makes attempts until the response table says ack or
//! dead-letter. Retries go back to the broker when the broker can hold them (SQS
//! visibility), otherwise they wait here without holding a permit.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::ack::{AckHandle, DeadLetter, Settlement};
use crate::audit::{AuditOutcome, AuditRecord, AuditTrail};
use crate::backoff::Backoff;
use crate::error::EngineError;
use crate::message::Message;
use crate::metrics::RouteMetrics;
use crate::policy::{ResponsePolicy, Verdict};
use crate::sink::{Sink, SinkResponse};
use crate::source::{Delivery, Source, SourceContext};
use crate::trace::DeliveryTracer;
pub use batch::Batching;
pub use breaker::CircuitBreaker;
use breaker::{Breaker, Pass};
use lanes::Lanes;
pub use limit::Concurrency;
use limit::{Limiter, Slot};
use rate::Pace;
pub use rate::RateLimit;

/// How a route delivers: the `[routes.x.delivery]` section, validated.
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    /// Requests in flight at most: a fixed number or found from the endpoint's answers.
    pub concurrency: Concurrency,
    /// Requests per second at most (retries included), if limited.
    pub rate_limit: Option<RateLimit>,
    /// Stop receiving while the endpoint is down, if set.
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Attempts before a retryable failure is dead-lettered.
    pub max_attempts: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
    /// How long in-flight deliveries may finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// What each endpoint answer means.
    pub responses: ResponsePolicy,
    /// Whether messages that share an ordering key must arrive one after another.
    pub order: MessageOrder,
    /// Several messages per request, if set (then `order` does not apply).
    pub batch: Option<Batching>,
    /// Larger messages are dead-lettered unsent; `None`: the source's own maximum.
    pub max_message_bytes: Option<usize>,
}

/// The order in which a route's messages reach the endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MessageOrder {
    /// Any order: every message is independent (the fastest).
    #[default]
    Unordered,
    /// Messages with the same [`Message::group`] one after another, in the order the
    /// source handed them over, each finished (acked or dead-lettered) before the next
    /// starts; different keys in parallel. Retries then wait in ferry, so that a retrying
    /// message holds back only its own key. Messages without a key are unordered.
    ByKey,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            concurrency: Concurrency::Fixed(10),
            rate_limit: None,
            circuit_breaker: Some(CircuitBreaker::default()),
            max_attempts: 10,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(60)),
            shutdown_grace: Duration::from_secs(30),
            responses: ResponsePolicy::default(),
            order: MessageOrder::Unordered,
            batch: None,
            max_message_bytes: None,
        }
    }
}

/// One source wired to one sink.
#[derive(Debug)]
pub struct Route<S, K> {
    /// Route name, for logs.
    pub name: Arc<str>,
    /// Where messages come from.
    pub source: S,
    /// Where they go.
    pub sink: K,
    /// How.
    pub policy: DeliveryPolicy,
    /// The route's metric children.
    pub metrics: RouteMetrics,
    /// Where a record of each finished message goes, if anywhere.
    pub audit: Option<Arc<dyn AuditTrail>>,
    /// Where each attempt is reported as a trace span, if anywhere.
    pub tracer: Option<Arc<dyn DeliveryTracer>>,
}

struct Shared<K> {
    route: Arc<str>,
    sink: K,
    policy: DeliveryPolicy,
    metrics: RouteMetrics,
    limiter: Arc<Limiter>,
    pace: Option<Pace>,
    breaker: Option<Breaker>,
    shutdown: tokio_util::sync::CancellationToken,
    lanes: Lanes,
    audit: Option<Arc<dyn AuditTrail>>,
    tracer: Option<Arc<dyn DeliveryTracer>>,
}

impl<K> Shared<K> {
    fn audit(&self, message: &Message, outcome: AuditOutcome, status: Option<u16>, began: Instant) {
        if let Some(audit) = &self.audit {
            audit.record(AuditRecord {
                id: message.id.clone(),
                route: self.route.clone(),
                source: message.source.clone(),
                attempts: message.attempt,
                outcome,
                status,
                latency: began.elapsed(),
                at: SystemTime::now(),
            });
        }
    }
}

/// Runs a route until `ctx.shutdown` is cancelled (or the source ends), then shuts down
/// as DESIGN section 3 says: stop receiving, release what has not started, give in-flight
/// deliveries `shutdown_grace` to finish, release the rest, and wait for the source to
/// flush its settlements.
pub async fn run_route<S: Source, K: Sink>(
    route: Route<S, K>,
    ctx: SourceContext,
) -> Result<(), EngineError> {
    let Route {
        name,
        source,
        sink,
        mut policy,
        metrics,
        audit,
        tracer,
    } = route;
    policy.max_message_bytes = oversize::limit(policy.max_message_bytes, &source);
    let limiter = Limiter::new(policy.concurrency, metrics.concurrency_limit.clone());
    let pace = policy.rate_limit.map(Pace::new);
    let breaker = policy
        .circuit_breaker
        .map(|c| Breaker::new(c, metrics.circuit_open.clone(), name.clone()));
    let shutdown = ctx.shutdown.clone();
    let shared = Arc::new(Shared {
        route: name.clone(),
        sink,
        policy,
        metrics,
        limiter,
        pace,
        breaker,
        shutdown: shutdown.clone(),
        lanes: Lanes::default(),
        audit,
        tracer,
    });

    let health_task = shared
        .breaker
        .is_some()
        .then(|| tokio::spawn(check_health(shared.clone())));
    let pause_task = tokio::spawn(report_pause(ctx.clone(), shared.metrics.paused.clone()));
    let switch = ctx.clone();
    let (tx, mut rx) = mpsc::channel::<Delivery>(source.buffer().max(1));
    let mut source_task = tokio::spawn(source.run(tx, ctx));
    let mut tasks = JoinSet::new();

    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = shared.limiter.acquire() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        // While the endpoint is down, receive only a message to probe it with.
        if let Some(breaker) = &shared.breaker {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = breaker.receivable() => {}
            }
        }
        // A paused route takes nothing more from the source, which then stops receiving
        // because it finds no room; what it already holds stays leased to this replica.
        if !wait_resumed(&switch, &shutdown).await {
            break;
        }
        let delivery = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            d = rx.recv() => match d {
                Some(d) => d,
                None => break,
            },
        };
        // Paused while waiting for this one: it waits too.
        if !wait_resumed(&switch, &shutdown).await {
            delivery.ack.settle(Settlement::Release);
            break;
        }
        shared.metrics.received.inc();
        if let Some(batching) = shared.policy.batch {
            let received = &shared.metrics.received;
            let batch = batch::collect(delivery, &mut rx, batching, &shutdown, received).await;
            if shutdown.is_cancelled() {
                for unstarted in batch {
                    unstarted.ack.settle(Settlement::Release);
                }
                break;
            }
            tasks.spawn(batch::deliver(shared.clone(), batch, permit));
            while tasks.try_join_next().is_some() {}
            continue;
        }
        // The key is copied only when it orders anything (not per message otherwise).
        let key = match shared.policy.order {
            MessageOrder::ByKey => delivery.message.group.clone(),
            MessageOrder::Unordered => None,
        };
        match key {
            Some(key) => {
                if let Some(first) = shared.lanes.enter(&key, (delivery, permit)) {
                    tasks.spawn(lane(shared.clone(), key, first));
                }
            }
            None => {
                tasks.spawn(deliver(shared.clone(), delivery, permit));
            }
        }
        while tasks.try_join_next().is_some() {}
    }

    // Stop receiving: the source sees the closed channel (or the cancelled token) and
    // stops; anything it already handed over but we did not start goes back at once.
    rx.close();
    let mut released = 0usize;
    while let Ok(unstarted) = rx.try_recv() {
        unstarted.ack.settle(Settlement::Release);
        released += 1;
    }
    // Messages queued behind their key have not started either.
    for (queued, _permit) in shared.lanes.take_all() {
        queued.ack.settle(Settlement::Release);
        released += 1;
    }
    // Dropping the receiver also releases whatever a source still sends through permits
    // it reserved before the close.
    drop(rx);
    while tasks.try_join_next().is_some() {}
    let in_flight = tasks.len();
    info!(route = %name, in_flight, released, "route stopping");
    let grace = shared.policy.shutdown_grace;
    let finished =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        warn!(route = %name, left = tasks.len(), grace = ?grace, "shutdown grace over; releasing in-flight deliveries");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    // A lane cut off by the grace leaves its queue behind: those go back too.
    for (queued, _permit) in shared.lanes.take_all() {
        queued.ack.settle(Settlement::Release);
    }
    if let Some(task) = health_task {
        task.abort();
    }
    pause_task.abort();
    drop(shared);
    // The source returns once every handle it gave out has settled and been flushed.
    shutdown.cancel();
    let result = (&mut source_task).await;
    info!(route = %name, "route stopped");
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(EngineError::Source {
            route: name.to_string(),
            source,
        }),
        Err(join) => Err(EngineError::SourcePanicked {
            route: name.to_string(),
            detail: join.to_string(),
        }),
    }
}

/// Waits while the route is paused; false if shutdown came first.
async fn wait_resumed(
    switch: &SourceContext,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    if !switch.is_paused() {
        return true;
    }
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => false,
        _ = switch.resumed() => true,
    }
}

/// Mirrors the paused state into `ferry_route_paused` and logs each change once.
async fn report_pause(ctx: SourceContext, gauge: Gauge) {
    let mut changes = ctx.pause_changes();
    let mut was = false;
    loop {
        let paused = *changes.borrow_and_update();
        gauge.set(i64::from(paused));
        if paused != was {
            if paused {
                info!(route = %ctx.route, "route paused: in-flight deliveries finish, nothing new is sent");
            } else {
                info!(route = %ctx.route, "route resumed");
            }
            was = paused;
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps `ferry_in_flight` right even when a delivery task is aborted mid-request.
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Delivers a key's messages one after another until its queue is empty.
async fn lane<K: Sink>(shared: Arc<Shared<K>>, key: String, first: lanes::Waiting) {
    let mut current = first;
    loop {
        let (delivery, permit) = current;
        deliver(shared.clone(), delivery, permit).await;
        // At shutdown the rest of the queue is released by `run_route`.
        if shared.shutdown.is_cancelled() {
            return;
        }
        match shared.lanes.next(&key) {
            Some(next) => current = next,
            None => return,
        }
    }
}

/// Runs the sink's own health check every `open_for` and feeds it to the breaker; ends at
/// once for a sink without one.
async fn check_health<K: Sink>(shared: Arc<Shared<K>>) {
    let Some(breaker) = &shared.breaker else {
        return;
    };
    loop {
        let Some(up) = shared.sink.healthy().await else {
            return;
        };
        breaker.health(up);
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(breaker.check_every()) => {}
        }
    }
}

/// Delivers one message: attempts until acked, dead-lettered or taken back.
async fn deliver<K: Sink>(shared: Arc<Shared<K>>, delivery: Delivery, mut permit: Slot) {
    let Delivery { mut message, ack } = delivery;
    let Some(ack) = oversize::admit(&shared, &message, ack) else {
        return;
    };
    let began = Instant::now();
    let mut pass = Pass::Normal;
    // Attempts that failed because the endpoint was down (the circuit open) do not count
    // toward `max_attempts`: an outage must not dead-letter anything.
    let mut excused = 0u32;
    // Every attempt's span is a child of the context the message arrived with; without
    // one, later attempts hang below the first so that a message's attempts share a trace.
    let mut parent = shared.tracer.as_ref().and(message.traceparent.clone());
    loop {
        if !ack.is_current() {
            // Dropping the handle releases it, which the backend ignores as stale.
            debug!(route = %shared.route, id = %message.id, "the broker took the message back; not delivered here");
            shared.metrics.stale.inc();
            return;
        }
        // While the endpoint is down no attempt is made (and none counted): wait for a
        // probe turn or for the circuit to close.
        if let (Some(breaker), Pass::Normal) = (&shared.breaker, pass) {
            pass = tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => return,
                p = breaker.pass() => p,
            };
        }
        let sent = tokio::time::Instant::now();
        let span = shared.tracer.as_ref().map(|tracer| {
            let span = tracer.start(&shared.route, &message, parent.as_deref());
            message.traceparent = span.traceparent().or_else(|| parent.clone());
            if parent.is_none() {
                parent.clone_from(&message.traceparent);
            }
            span
        });
        let response = attempt(&shared, &message).await;
        if let Some(span) = span {
            span.finish(&response);
        }
        if let Some(breaker) = &shared.breaker {
            breaker.record(&response, pass, sent);
            if breaker.excuses(&response, sent) {
                excused += 1;
            }
        }
        pass = Pass::Normal;
        match shared.policy.responses.classify(&response) {
            Verdict::Ack => {
                return self::ack(&shared, &message, ack, &response, began);
            }
            Verdict::DeadLetter { reason } => {
                return dead_letter(&shared, &message, ack, &response, reason, began);
            }
            Verdict::Retry { after } => {
                if message.attempt.saturating_sub(excused) >= shared.policy.max_attempts {
                    let reason = format!("attempts exhausted: {}", describe(&response));
                    return dead_letter(&shared, &message, ack, &response, reason, began);
                }
                shared.metrics.retried.inc();
                let delay = retry_delay(&shared, &message, after);
                debug!(route = %shared.route, id = %message.id, attempt = message.attempt, ?delay, outcome = %describe(&response), "retrying");
                // Under key order the broker must not take the message back: the next
                // one of its key would overtake it.
                let ordered = shared.policy.order == MessageOrder::ByKey && message.group.is_some();
                if ack.holds_retries() && !ordered {
                    ack.settle(Settlement::Retry { delay });
                    return;
                }
                // A keyed message keeps its slot while it waits: the messages queued
                // behind its key hold the others, and giving it up could leave it none.
                let held = if ordered {
                    Some(permit)
                } else {
                    drop(permit);
                    None
                };
                tokio::select! {
                    biased;
                    _ = shared.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                permit = match held {
                    Some(p) => p,
                    None => tokio::select! {
                        biased;
                        _ = shared.shutdown.cancelled() => return,
                        p = shared.limiter.acquire() => match p {
                            Ok(p) => p,
                            Err(_) => return,
                        },
                    },
                };
                message.attempt += 1;
            }
        }
    }
}

async fn attempt<K: Sink>(shared: &Shared<K>, message: &Message) -> SinkResponse {
    // Boxed: a sink's request future (an HTTP client's) is kilobytes, and held inline it
    // would make every delivery task that large, copied on spawn and again on completion.
    timed(shared, Box::pin(shared.sink.deliver(message))).await
}

/// What a request has answered, so that the rate limit, the adaptive limit and the metrics
/// treat single messages and batches alike.
trait Answer {
    fn response(&self) -> &SinkResponse;
}

impl Answer for SinkResponse {
    fn response(&self) -> &SinkResponse {
        self
    }
}

impl Answer for crate::sink::BatchResponse {
    fn response(&self) -> &SinkResponse {
        &self.response
    }
}

/// Makes one request: waits for the rate limit, counts it in flight, times it and feeds its
/// answer to the adaptive limit and the metrics.
async fn timed<K, A: Answer>(
    shared: &Shared<K>,
    request: impl std::future::Future<Output = A>,
) -> A {
    if let Some(pace) = &shared.pace {
        pace.wait().await;
    }
    let _in_flight = InFlight::enter(&shared.metrics.in_flight);
    let slot = shared.limiter.begin();
    let started = Instant::now();
    let answer = request.await;
    let took = started.elapsed();
    let response = answer.response();
    shared.metrics.request_duration.observe(took.as_secs_f64());
    slot.finish(response, took);
    shared.metrics.count_response(response.class());
    answer
}

/// Acks a delivered message and counts it.
fn ack<K>(
    shared: &Shared<K>,
    message: &Message,
    handle: AckHandle,
    response: &SinkResponse,
    began: Instant,
) {
    handle.settle(Settlement::Ack);
    shared.metrics.delivered.inc();
    if let Ok(age) = SystemTime::now().duration_since(message.timestamp) {
        shared.metrics.end_to_end.observe(age.as_secs_f64());
    }
    shared.audit(message, AuditOutcome::Delivered, response.status(), began);
}

/// The wait before the next attempt: the endpoint's `Retry-After` (capped), else backoff.
fn retry_delay<K>(shared: &Shared<K>, message: &Message, after: Option<Duration>) -> Duration {
    let backoff = shared.policy.backoff;
    after.map_or_else(|| backoff.delay(message.attempt), |a| backoff.capped(a))
}

fn dead_letter<K>(
    shared: &Shared<K>,
    message: &Message,
    ack: AckHandle,
    response: &SinkResponse,
    reason: String,
    began: Instant,
) {
    let status = response.status();
    let dl = DeadLetter {
        reason,
        status,
        attempts: message.attempt,
    };
    warn!(route = %shared.route, id = %message.id, reason = %dl, "dead-lettering message");
    // A backend that counts dead letters itself does so once the broker has taken it.
    if !ack.counts_dead_letters() {
        shared.metrics.dead_lettered.inc();
    }
    ack.settle(Settlement::DeadLetter(dl));
    shared.audit(message, AuditOutcome::DeadLettered, status, began);
}

fn describe(response: &SinkResponse) -> String {
    match response {
        SinkResponse::Status { status, detail, .. } if detail.is_empty() => {
            format!("status {status}")
        }
        SinkResponse::Status { status, detail, .. } => format!("status {status}: {detail}"),
        SinkResponse::Timeout => "timeout".to_owned(),
        SinkResponse::Error(e) => format!("error: {e}"),
    }
}

mod batch;
mod breaker;
mod lanes;
mod limit;
mod oversize;
mod rate;
#[cfg(test)]
mod tests;
