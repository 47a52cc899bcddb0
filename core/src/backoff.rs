//! Exponential backoff with full jitter.

use std::time::Duration;

use rand::Rng;

/// Retry delays that grow exponentially and are spread by full jitter, so that a burst of
/// failures does not come back as a synchronized burst of retries.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// `min` is the ceiling of the first delay, `max` caps every delay (and `Retry-After`).
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
        }
    }

    /// The largest delay this backoff ever returns.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The ceiling for the delay after the given failed attempt (1-based), before jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(32);
        self.min
            .checked_mul(1u32 << exp.min(31))
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// A random delay in `[0, ceiling(attempt)]` ("full jitter").
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        if ceiling.is_zero() {
            return ceiling;
        }
        let nanos = rand::thread_rng().gen_range(0..=ceiling.as_nanos() as u64);
        Duration::from_nanos(nanos)
    }

    /// The delay the endpoint asked for, capped by `max`.
    pub fn capped(&self, asked: Duration) -> Duration {
        asked.min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_and_is_capped() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(200));
        assert_eq!(b.ceiling(4), Duration::from_millis(800));
        assert_eq!(b.ceiling(5), Duration::from_secs(1));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jittered_delay_stays_within_ceiling() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
        for attempt in 1..40 {
            assert!(b.delay(attempt) <= b.ceiling(attempt));
        }
        assert_eq!(b.capped(Duration::from_secs(600)), Duration::from_secs(60));
    }
}
