//! Recovery point objective as the agent measures it: the age of the oldest write
//! that is not yet durable at the target. Sans-IO: time comes in as arguments.
//!
//! The measure is conservative, never optimistic: the dirty set carries the time
//! of its oldest write, and a batch cut from it inherits that time until the target
//! acknowledges it durable, even when the batch held only younger writes.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub struct Rpo {
    /// Time of the oldest write still in the dirty set (not yet taken for reading).
    dirty_since: Option<Instant>,
    /// Ranges taken for reading, not yet shipped: the age each inherited.
    reading: HashMap<u64, Instant>,
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

    /// Range `read` was cut from the dirty set for reading; `emptied` tells
    /// whether the dirty set is now empty.
    pub fn handle_taken(&mut self, read: u64, emptied: bool) {
        if let Some(t) = self.dirty_since {
            self.reading.insert(read, t);
        }
        if emptied {
            self.dirty_since = None;
        }
    }

    /// Range `read` went back to the dirty set (its read failed).
    pub fn handle_returned(&mut self, read: u64) {
        if let Some(t) = self.reading.remove(&read) {
            self.handle_dirty(t);
        }
    }

    /// Range `read` was shipped in frames up to sequence `last_seq`.
    pub fn handle_shipped(&mut self, read: u64, last_seq: u64) {
        if let Some(t) = self.reading.remove(&read) {
            match self.in_flight.back_mut() {
                Some((seq, t0)) if *seq >= last_seq => *t0 = (*t0).min(t),
                _ => self.in_flight.push_back((last_seq, t)),
            }
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

    fn oldest(&self) -> Option<Instant> {
        self.in_flight
            .iter()
            .map(|&(_, t)| t)
            .chain(self.reading.values().copied())
            .chain(self.dirty_since)
            .min()
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
        r.handle_taken(1, true);
        // Taken for reading is not durable: the age keeps growing.
        assert_eq!(r.current(t0 + 3 * s), 3 * s);
        r.handle_shipped(1, 10);
        assert_eq!(r.current(t0 + 3 * s), 3 * s);
        r.handle_dirty(t0 + 3 * s);
        r.handle_ack(9);
        assert_eq!(r.current(t0 + 4 * s), 4 * s);
        r.handle_ack(10);
        // Only the write at 3 s is left.
        assert_eq!(r.current(t0 + 4 * s), s);
        r.handle_taken(2, true);
        r.handle_shipped(2, 11);
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
        r.handle_taken(1, false);
        r.handle_shipped(1, 1);
        r.handle_ack(1);
        assert_eq!(r.current(t0 + s), s);
    }

    #[test]
    fn failed_read_returns_its_age_to_the_dirty_set() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut r = Rpo::new();
        r.handle_dirty(t0);
        r.handle_taken(1, true);
        r.handle_returned(1);
        r.handle_dirty(t0 + s);
        assert_eq!(r.current(t0 + 2 * s), 2 * s);
    }
}
