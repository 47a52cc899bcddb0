//! `rate_limit`: requests per second with a burst, so an endpoint with a quota (or a
//! downstream that must not be flooded after an outage) gets a steady pace. Every attempt
//! waits its turn, retries included; the wait holds the message's slot, so the route
//! stops asking the broker for more while it is paced.

use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// `rate_limit = { per_second, burst }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: NonZeroU32,
    /// Requests that may go at once after a quiet spell.
    pub burst: NonZeroU32,
}

/// A rate limit kept with other replicas (the binary keeps it in Redis), so that the
/// endpoint's capacity is one number for the whole fleet. The engine asks it for every
/// request's turn instead of its own bucket.
pub trait SharedRate: Send + Sync + 'static {
    /// Waits until this replica may make one more request.
    fn turn(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// A [`SharedRate`] in a [`crate::DeliveryPolicy`].
#[derive(Clone)]
pub struct FleetRate(pub Arc<dyn SharedRate>);

impl fmt::Debug for FleetRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FleetRate")
    }
}

/// The route's pace: its own token bucket, or the fleet's.
pub(super) enum Pace {
    Local(DefaultDirectRateLimiter),
    Fleet(Arc<dyn SharedRate>),
}

impl Pace {
    pub(super) fn new(limit: RateLimit) -> Self {
        Self::Local(RateLimiter::direct(
            Quota::per_second(limit.per_second).allow_burst(limit.burst),
        ))
    }

    /// Waits until the next request may go.
    pub(super) async fn wait(&self) {
        match self {
            Self::Local(bucket) => bucket.until_ready().await,
            Self::Fleet(shared) => shared.turn().await,
        }
    }
}
