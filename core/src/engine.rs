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
pub use rate::{FleetRate, RateLimit, SharedRate};

/// How a route delivers: the `[routes.x.delivery]` section, validated.
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    /// Requests in flight at most: a fixed number or found from the endpoint's answers.
    pub concurrency: Concurrency,
    /// Requests per second at most (retries included), if limited.
    pub rate_limit: Option<RateLimit>,
    /// The limit shared by every replica, when `rate_limit` is `shared`: then it paces
    /// the route instead of `rate_limit`'s own bucket.
    pub fleet_rate: Option<FleetRate>,
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
            fleet_rate: None,
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
    /// Whether the circuit is open (or the sink's health check fails).
    fn endpoint_down(&self) -> bool {
        self.breaker.as_ref().is_some_and(Breaker::is_open)
    }

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
    let pace = match (&policy.fleet_rate, policy.rate_limit) {
        (Some(fleet), _) => Some(Pace::Fleet(fleet.0.clone())),
        (None, limit) => limit.map(Pace::new),
    };
    let breaker = policy
        .circuit_breaker
        .map(|c| Breaker::new(c, metrics.circuit_open.clone(), name.clone()));
    let shutdown = ctx.shutdown.clone();
    // Messages behind busy keys hold no slot; this many may wait before the route stops
    // taking more from the source.
    let lane_room = 2 * (source.buffer() + policy.concurrency.ceiling());
    let shared = Arc::new(Shared {
        route: name.clone(),
        sink,
        policy,
        metrics,
        limiter,
        pace,
        breaker,
        shutdown: shutdown.clone(),
        lanes: Lanes::new(lane_room),
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
            tasks.spawn(batch::deliver(shared.clone(), batch, permit));
        } else {
            dispatch(&shared, &mut tasks, delivery, permit);
            // Too many wait behind busy keys: take no more until one moves on. (Only under
            // key order: an unordered route has no lanes, and this would be a lock per
            // message.)
            if shared.policy.order == MessageOrder::ByKey {
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => {}
                    _ = shared.lanes.has_room() => {}
                }
            }
        }
        while tasks.try_join_next().is_some() {}
    }

    // Stop receiving: the source stops asking the broker at the cancelled token. What the
    // broker already handed out is leased to this replica; it is delivered within the
    // grace like the deliveries in flight (handing it back would cost an SQS receive or
    // mark it redelivered on RabbitMQ although no request was made), unless the route is
    // paused or its endpoint down: then it goes back at once.
    let grace = shared.policy.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    let drain = !switch.is_paused() && !shared.endpoint_down();
    let mut released = 0usize;
    if drain {
        // Until the source has handed over its last message (it drops its sender).
        let _ = tokio::time::timeout_at(deadline, drain_source(&shared, &mut tasks, &mut rx)).await;
    }
    // Whatever is left goes back: the source sees the closed channel.
    rx.close();
    while let Ok(unstarted) = rx.try_recv() {
        unstarted.ack.settle(Settlement::Release);
        released += 1;
    }
    // Dropping the receiver also releases whatever a source still sends through permits
    // it reserved before the close.
    drop(rx);
    if !drain {
        // Messages queued behind their key have not started either.
        for queued in shared.lanes.take_all() {
            queued.ack.settle(Settlement::Release);
            released += 1;
        }
    }
    while tasks.try_join_next().is_some() {}
    let in_flight = tasks.len();
    info!(route = %name, in_flight, released, "route stopping");
    let finished = tokio::time::timeout_at(deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        warn!(route = %name, left = tasks.len(), grace = ?grace, "shutdown grace over; releasing in-flight deliveries");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    // A lane cut off by the grace leaves its queue behind: those go back too.
    for queued in shared.lanes.take_all() {
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

/// Starts one received message: behind its key when its key is busy (giving the slot
/// back: waiting costs none), else at once with `permit`.
fn dispatch<K: Sink>(
    shared: &Arc<Shared<K>>,
    tasks: &mut JoinSet<()>,
    delivery: Delivery,
    permit: Slot,
) {
    // The key is copied only when it orders anything (not per message otherwise).
    let key = match shared.policy.order {
        MessageOrder::ByKey => delivery.message.group.clone(),
        MessageOrder::Unordered => None,
    };
    match key {
        Some(key) => {
            if let Some(first) = shared.lanes.enter(&key, delivery) {
                tasks.spawn(lane(shared.clone(), key, first, permit));
            }
        }
        None => {
            let shared = shared.clone();
            tasks.spawn(async move {
                deliver(shared, delivery, permit).await;
            });
        }
    }
}

/// At shutdown: starts what the source still hands over, as slots come free, until it
/// has handed over its last message.
async fn drain_source<K: Sink>(
    shared: &Arc<Shared<K>>,
    tasks: &mut JoinSet<()>,
    rx: &mut mpsc::Receiver<Delivery>,
) {
    let batch = shared.policy.batch.map_or(1, |b| b.max_messages.max(1));
    loop {
        let Ok(permit) = shared.limiter.acquire().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        shared.metrics.received.inc();
        if shared.policy.batch.is_some() {
            let mut chunk = vec![first];
            while chunk.len() < batch {
                match rx.try_recv() {
                    Ok(d) => {
                        shared.metrics.received.inc();
                        chunk.push(d);
                    }
                    Err(_) => break,
                }
            }
            tasks.spawn(batch::deliver(shared.clone(), chunk, permit));
        } else {
            dispatch(shared, tasks, first, permit);
            if shared.policy.order == MessageOrder::ByKey {
                shared.lanes.has_room().await;
            }
        }
        while tasks.try_join_next().is_some() {}
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

/// Delivers a key's messages one after another until its queue is empty. Each queued
/// message takes a slot only when its turn comes.
async fn lane<K: Sink>(shared: Arc<Shared<K>>, key: String, first: Delivery, permit: Slot) {
    let mut current = (first, permit);
    loop {
        let (delivery, permit) = current;
        // A message handed back unfinished (shutdown, taken back) must not be overtaken by
        // the next of its key: the rest of the queue goes back with it (`run_route`).
        if !deliver(shared.clone(), delivery, permit).await {
            return;
        }
        // After shutdown the queue is still delivered within the grace, unless the
        // endpoint is down: then `run_route` releases it.
        if shared.shutdown.is_cancelled() && shared.endpoint_down() {
            return;
        }
        let Some(next) = shared.lanes.next(&key) else {
            return;
        };
        let permit = match shared.limiter.acquire().await {
            Ok(p) => p,
            Err(_) => {
                next.ack.settle(Settlement::Release);
                return;
            }
        };
        current = (next, permit);
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

/// The log target of the per-message lines (received, each attempt and its verdict,
/// settled): `FERRY_LOG=debug` shows them, `info,ferry::delivery=debug` shows only them.
const DELIVERY: &str = "ferry::delivery";

/// Delivers one message: attempts until acked, dead-lettered or taken back. Returns
/// whether it was finished (acked or dead-lettered) rather than handed back.
///
/// `message.attempt` counts requests made: a request that never left (no connection) is
/// not one. Failures that were the outage's (see [`Breaker::excused`]) count toward no
/// `max_attempts`, and their retries wait here, not in the broker, so that a broker that
/// counts receives (SQS) does not count them either.
async fn deliver<K: Sink>(shared: Arc<Shared<K>>, delivery: Delivery, permit: Slot) -> bool {
    let Delivery { mut message, ack } = delivery;
    debug!(target: DELIVERY, route = %shared.route, id = %message.id, attempt = message.attempt,
        bytes = message.payload.len(), "received");
    let Some(ack) = oversize::admit(&shared, &message, ack) else {
        return true;
    };
    let began = Instant::now();
    let mut permit = Some(permit);
    // When each failure that said "the endpoint is not there" was sent: whether it counts
    // is asked again after every failure, as the breaker learns more about the outage.
    let mut down_sent: Vec<tokio::time::Instant> = Vec::new();
    // Requests in a row that could not even connect, for their backoff.
    let mut unsent = 0u32;
    // Every attempt's span is a child of the context the message arrived with; without
    // one, later attempts hang below the first so that a message's attempts share a trace.
    let mut parent = shared.tracer.as_ref().and(message.traceparent.clone());
    loop {
        if !ack.is_current() {
            // Dropping the handle releases it, which the backend ignores as stale.
            debug!(route = %shared.route, id = %message.id, "the broker took the message back; not delivered here");
            shared.metrics.stale.inc();
            return false;
        }
        if permit.is_none() {
            permit = tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => return false,
                p = shared.limiter.acquire() => match p {
                    Ok(p) => Some(p),
                    Err(_) => return false,
                },
            };
        }
        // While the endpoint is down no attempt is made (and none counted): wait for a
        // probe turn or for the circuit to close. A closed circuit passes at once, also
        // during shutdown, which delivers what was received.
        let (pass, turn) = match &shared.breaker {
            Some(breaker) => tokio::select! {
                biased;
                p = breaker.pass_turn() => p,
                _ = shared.shutdown.cancelled() => return false,
            },
            None => (Pass::Normal, None),
        };
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
        }
        if let Some(turn) = turn {
            turn.done();
        }
        let verdict = shared.policy.responses.classify(&response);
        debug!(target: DELIVERY, route = %shared.route, id = %message.id, attempt = message.attempt,
            outcome = %describe(&response), verdict = ?verdict, took_ms = sent.elapsed().as_millis() as u64,
            "attempt");
        let after = match verdict {
            Verdict::Ack => {
                self::ack(&shared, &message, ack, &response, began);
                return true;
            }
            Verdict::DeadLetter { reason } => {
                dead_letter(&shared, &message, ack, &response, reason, began);
                return true;
            }
            Verdict::Retry { after } => after,
        };
        let was_sent = response.was_sent();
        let outage = match &shared.breaker {
            _ if !was_sent => true,
            Some(breaker) if breaker::endpoint_down(&response) => {
                down_sent.push(sent);
                breaker.excused(sent)
            }
            _ => false,
        };
        if was_sent {
            let excused = shared.breaker.as_ref().map_or(0, |b| {
                down_sent.iter().filter(|at| b.excused(**at)).count() as u32
            });
            if message.attempt.saturating_sub(excused) >= shared.policy.max_attempts {
                let reason = format!("attempts exhausted: {}", describe(&response));
                dead_letter(&shared, &message, ack, &response, reason, began);
                return true;
            }
            unsent = 0;
        } else {
            unsent += 1;
        }
        shared.metrics.retried.inc();
        let delay = if was_sent {
            retry_delay(&shared, &message, after)
        } else {
            shared.policy.backoff.delay(unsent)
        };
        debug!(target: DELIVERY, route = %shared.route, id = %message.id, attempt = message.attempt, ?delay, outage, outcome = %describe(&response), "retrying");
        // Under key order the broker must not take the message back: the next one of its
        // key would overtake it. During an outage it waits here too (above).
        let ordered = shared.policy.order == MessageOrder::ByKey && message.group.is_some();
        if ack.holds_retries() && !ordered && !outage {
            ack.settle(Settlement::Retry { delay });
            return true;
        }
        // A retry waits without its slot, so other messages (other keys) keep every
        // slot; while the endpoint is down it keeps it, so that nothing more is taken
        // from the broker that could not be delivered either.
        // While the circuit is open the breaker's probe turns are the backoff: waiting
        // for them (at the loop's top) is what lets delivery resume within `open_for` of
        // the endpoint's return, however long the backoff has grown.
        let delay = match &shared.breaker {
            Some(breaker) if outage && breaker.is_open() => Duration::ZERO,
            Some(breaker) if outage => delay.min(breaker.check_every()),
            _ => delay,
        };
        if !outage {
            permit = None;
        }
        if !delay.is_zero() {
            tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        if was_sent {
            message.attempt += 1;
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
    let class = response.class();
    shared.metrics.count_response(class);
    if class != "2xx" {
        shared.metrics.last_failure.set(describe(response));
    }
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
    debug!(target: DELIVERY, route = %shared.route, id = %message.id, attempt = message.attempt, "settled: acked");
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
        last_class: response.class(),
        attempts: message.attempt,
    };
    warn!(route = %shared.route, id = %message.id, reason = %dl, "dead-lettering message");
    shared
        .metrics
        .last_failure
        .set(format!("dead-lettered: {dl}"));
    // A backend that counts dead letters itself does so once the broker has taken it.
    if !ack.counts_dead_letters() {
        shared.metrics.dead_lettered.inc();
    }
    ack.settle(Settlement::DeadLetter(dl));
    debug!(target: DELIVERY, route = %shared.route, id = %message.id, attempt = message.attempt, "settled: dead-lettered");
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
        SinkResponse::Unreachable(e) => format!("unreachable: {e}"),
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
