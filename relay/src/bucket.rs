//! Token bucket for the per-target bandwidth cap. Sans-IO: the caller passes
//! `now` and sleeps for the delay it is told, so the arithmetic is tested with
//! explicit time.

use std::time::{Duration, Instant};

/// Bytes per second with a burst allowance.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` bytes per second, at most `burst` bytes at once; starts full.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        let burst = burst.max(1) as f64;
        TokenBucket {
            rate: rate.max(1) as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = self.last.max(now);
    }

    /// Takes `bytes` and returns how long to wait before sending them. A send
    /// larger than the burst is allowed (frames are indivisible) and pays by
    /// leaving the bucket in debt, so the long-run rate still holds.
    pub fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_passes_then_rate_holds() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 500, t0);
        assert_eq!(b.take(500, t0), Duration::ZERO);
        // 1000 more bytes at 1000 B/s: one second of debt.
        assert_eq!(b.take(1000, t0), Duration::from_secs(1));
        // After the wait, the debt is paid and nothing is owed.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.take(0, t1), Duration::ZERO);
    }

    #[test]
    fn long_run_rate_equals_the_cap() {
        let mut now = Instant::now();
        let mut b = TokenBucket::new(10_000, 1_000, now);
        let mut sent = 0u64;
        let start = now;
        for _ in 0..1000 {
            let wait = b.take(700, now);
            now += wait;
            sent += 700;
        }
        let secs = now.duration_since(start).as_secs_f64();
        let rate = sent as f64 / secs;
        assert!(
            (rate - 10_000.0).abs() < 10_000.0 * 0.01 + 1_000.0 / secs,
            "{rate}"
        );
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 100, t0);
        assert_eq!(b.take(100, t0), Duration::ZERO);
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(b.take(100, later), Duration::ZERO);
        assert_eq!(b.take(100, later), Duration::from_secs(1));
    }
}
