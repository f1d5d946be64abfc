//! The agent's bandwidth cap.

use std::time::Duration;

/// Bandwidth cap of the agent: spaces pushes so the wire sees at most `rate`
/// bytes per second on average.
pub(super) struct Pacer {
    rate: Option<u64>,
    next: tokio::time::Instant,
}

impl Pacer {
    pub(super) fn new(rate: Option<u64>) -> Self {
        Pacer {
            rate,
            next: tokio::time::Instant::now(),
        }
    }

    pub(super) async fn pace(&mut self, bytes: u64) {
        let Some(rate) = self.rate.filter(|&r| r > 0) else {
            return;
        };
        let now = tokio::time::Instant::now();
        if self.next < now {
            self.next = now;
        }
        tokio::time::sleep_until(self.next).await;
        self.next += Duration::from_secs_f64(bytes as f64 / rate as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_pushes_to_the_rate() {
        let mut p = Pacer::new(Some(1_000_000));
        let t0 = tokio::time::Instant::now();
        for _ in 0..10 {
            p.pace(100_000).await;
        }
        // Ten pushes of 0.1 s each: the tenth may start after 0.9 s.
        assert_eq!(tokio::time::Instant::now() - t0, Duration::from_millis(900));
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_without_rate_never_waits() {
        let mut p = Pacer::new(None);
        let t0 = tokio::time::Instant::now();
        p.pace(1 << 30).await;
        assert_eq!(tokio::time::Instant::now(), t0);
    }
}
