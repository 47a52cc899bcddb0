//! `rate_limit`: requests per second with a burst, so an endpoint with a quota (or a
//! downstream that must not be flooded after an outage) gets a steady pace. Every attempt
//! waits its turn, retries included; the wait holds the message's slot, so the route
//! stops asking the broker for more while it is paced.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// `rate_limit = { per_second, burst }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: NonZeroU32,
    /// Requests that may go at once after a quiet spell.
    pub burst: NonZeroU32,
}

/// The route's token bucket.
pub(super) struct Pace(DefaultDirectRateLimiter);

impl Pace {
    pub(super) fn new(limit: RateLimit) -> Self {
        Self(RateLimiter::direct(
            Quota::per_second(limit.per_second).allow_burst(limit.burst),
        ))
    }

    /// Waits until the next request may go.
    pub(super) async fn wait(&self) {
        self.0.until_ready().await;
    }
}
