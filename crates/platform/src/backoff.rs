//! Exponential backoff, the one schedule every retry in Agora follows: the
//! NATS reconnects, stream set-up, the relay while NATS is down, reopening a
//! consumer or a registry watch, redelivering a failed event, retrying an
//! internal call, and a checkout saga's steps that must happen.

use std::time::Duration;

/// `initial` doubled `attempt` times (attempt 0 is `initial`), at most `max`.
pub fn exponential(attempt: u32, initial: Duration, max: Duration) -> Duration {
    initial
        .saturating_mul(2u32.saturating_pow(attempt.min(30)))
        .min(max)
}

/// `delay` with its upper half random: between half of it and all of it,
/// so that callers that failed together do not come back together.
pub fn jittered(delay: Duration) -> Duration {
    delay / 2 + delay.mul_f64(rand::random::<f64>() / 2.0)
}

/// A backoff that grows with each failure and resets on success.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Starts at `initial`, doubles per failure, never above `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            failures: 0,
        }
    }

    /// The wait after one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let delay = exponential(self.failures, self.initial, self.max);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Back to `initial` after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Whether the last attempt failed.
    pub fn is_failing(&self) -> bool {
        self.failures > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_maximum_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<u128> = (0..6).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert!(backoff.is_failing());
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
        assert_eq!(
            exponential(u32::MAX, Duration::from_secs(1), Duration::from_secs(60)),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn jitter_keeps_the_upper_half() {
        for _ in 0..100 {
            let pause = jittered(Duration::from_millis(200));
            assert!(pause >= Duration::from_millis(100) && pause <= Duration::from_millis(200));
        }
    }
}
