//! Recovery point objective as the agent measures it: the age of the oldest write
//! that is not yet durable at the target. Sans-IO: time comes in as arguments.
//!
//! The measure is conservative, never optimistic: the dirty set carries the time
//! of its oldest write, and a batch cut from it inherits that time until the target
//! acknowledges it durable, even when the batch held only younger writes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Rpo {
    /// Time of the oldest write still in the dirty set (not yet read).
    dirty_since: Option<Instant>,
    /// Per shipped-but-unacknowledged run of sequence numbers: the last sequence
    /// number of the run and the time of the oldest write it may contain.
    in_flight: VecDeque<(u64, Instant)>,
    worst: Duration,
}

impl Rpo {
    pub fn new() -> Self {
        Self::default()
    }

    /// A write was tracked at `at`.
    pub fn handle_dirty(&mut self, at: Instant) {
        match self.dirty_since {
            Some(t) if t <= at => {}
            _ => self.dirty_since = Some(at),
        }
    }

    /// Data was cut from the dirty set and sent with sequence numbers up to
    /// `last_seq`; `emptied` tells whether the dirty set is now empty.
    pub fn handle_shipped(&mut self, last_seq: u64, emptied: bool) {
        if let Some(t) = self.dirty_since {
            self.in_flight.push_back((last_seq, t));
        }
        if emptied {
            self.dirty_since = None;
        }
    }

    /// The target has everything up to `durable_seq` durable.
    pub fn handle_ack(&mut self, durable_seq: u64) {
        while self
            .in_flight
            .front()
            .is_some_and(|&(seq, _)| seq <= durable_seq)
        {
            self.in_flight.pop_front();
        }
    }

    /// Everything must be resent (reconnect to a relay that lost nothing is not
    /// this case; a new generation is): forget acks in flight but keep their age.
    pub fn handle_restart(&mut self, now: Instant) {
        let oldest = self.oldest().unwrap_or(now);
        self.in_flight.clear();
        self.dirty_since = Some(oldest);
    }

    fn oldest(&self) -> Option<Instant> {
        let flying = self.in_flight.iter().map(|&(_, t)| t).min();
        match (self.dirty_since, flying) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The current RPO: zero when everything written is durable at the target.
    pub fn current(&mut self, now: Instant) -> Duration {
        let rpo = self
            .oldest()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.worst = self.worst.max(rpo);
        rpo
    }

    /// The largest RPO seen by [`Rpo::current`].
    pub fn worst(&self) -> Duration {
        self.worst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_disk_has_zero_rpo() {
        let mut r = Rpo::new();
        assert_eq!(r.current(Instant::now()), Duration::ZERO);
    }

    #[test]
    fn rpo_is_age_of_oldest_write_until_acked() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut r = Rpo::new();
        r.handle_dirty(t0);
        r.handle_dirty(t0 + s);
        assert_eq!(r.current(t0 + 2 * s), 2 * s);
        r.handle_shipped(10, true);
        // Shipped is not durable: the age keeps growing.
        assert_eq!(r.current(t0 + 3 * s), 3 * s);
        r.handle_dirty(t0 + 3 * s);
        r.handle_ack(9);
        assert_eq!(r.current(t0 + 4 * s), 4 * s);
        r.handle_ack(10);
        // Only the write at 3 s is left.
        assert_eq!(r.current(t0 + 4 * s), s);
        r.handle_shipped(11, true);
        r.handle_ack(11);
        assert_eq!(r.current(t0 + 5 * s), Duration::ZERO);
        assert_eq!(r.worst(), 4 * s);
    }

    #[test]
    fn partial_cut_keeps_the_oldest_time_on_the_rest() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut r = Rpo::new();
        r.handle_dirty(t0);
        r.handle_shipped(1, false);
        r.handle_ack(1);
        assert_eq!(r.current(t0 + s), s);
    }

    #[test]
    fn restart_keeps_the_age_of_what_was_in_flight() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut r = Rpo::new();
        r.handle_dirty(t0);
        r.handle_shipped(5, true);
        r.handle_restart(t0 + s);
        r.handle_ack(5);
        assert_eq!(r.current(t0 + 2 * s), 2 * s);
    }
}
