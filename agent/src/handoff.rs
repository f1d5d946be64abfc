//! The sans-IO logic of `blockferry-agent handoff`, the source side of a
//! planned failover: with the workload stopped (the device held exclusively),
//! ship everything to RPO zero, cut a final point, wait until the replica has
//! it durable; then the source's record is demoted and the disk is handed off.
//!
//! [`Handoff`] decides from what the service sees of the disk each tick
//! ([`DiskView`]) and the time: keep shipping, push the final barrier, done,
//! or fail (fenced, timed out). The service (`service::handoff`) carries it
//! out. Any failure leaves the record a source and the disk protected.

use std::time::{Duration, Instant};

use blockferry_proto::Seq;

/// What the service sees of the disk at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskView {
    /// The stream to the relay is up.
    pub connected: bool,
    /// The replica was promoted elsewhere: this source is fenced.
    pub fenced: bool,
    /// Nothing left to ship: no initial sync or resync pending, nothing
    /// dirty, no read in flight.
    pub quiet: bool,
    /// The last sequence pushed on the stream.
    pub last: Seq,
    /// Durable at the relay through this sequence.
    pub durable: Seq,
    /// Durable at the replica through this sequence.
    pub replica: Seq,
}

/// What the service must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Keep shipping (and showing progress).
    Wait,
    /// Everything is durable at the replica: push the final barrier and
    /// report its sequence with [`Handoff::handle_final_pushed`].
    PushFinal,
    /// The replica holds the final point `final_seq` durable: demote the
    /// record, mark the disk handed off.
    Done { final_seq: Seq },
    /// Stop; the record and the disk stay as they were.
    Fail(HandoffError),
}

/// Why a handoff stopped. Each says what to do; the source is untouched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    #[error(
        "the replica was promoted elsewhere (this source is fenced): there is nothing to hand off; see `blockferry-agent status`"
    )]
    Fenced,
    #[error(
        "the relay is not connected after {secs} s: check the relay and the network, then run handoff again (this disk is still the source)"
    )]
    NotConnected { secs: u64 },
    #[error(
        "not at RPO zero after {secs} s (replica holds seq {replica}, shipped through {last}{}): run handoff again with a longer --timeout (this disk is still the source)",
        if *.quiet { "" } else { ", more to ship" }
    )]
    Timeout {
        secs: u64,
        replica: Seq,
        last: Seq,
        quiet: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Shipping until everything is durable at the replica.
    Shipping,
    /// The final barrier is being pushed.
    Pushing,
    /// The final barrier is `seq`; waiting for the replica.
    Final(Seq),
    Finished,
}

/// The handoff of one disk. See the module docs.
#[derive(Debug, Clone)]
pub struct Handoff {
    step: Step,
    started: Instant,
    timeout: Duration,
}

impl Handoff {
    pub fn new(now: Instant, timeout: Duration) -> Self {
        Handoff {
            step: Step::Shipping,
            started: now,
            timeout,
        }
    }

    /// The final barrier was pushed as `seq`.
    pub fn handle_final_pushed(&mut self, seq: Seq) {
        if self.step == Step::Pushing {
            self.step = Step::Final(seq);
        }
    }

    /// The push of the final barrier failed (the link dropped): try again
    /// once everything is durable.
    pub fn handle_final_failed(&mut self) {
        if self.step == Step::Pushing {
            self.step = Step::Shipping;
        }
    }

    /// The next action at `now`, given the disk as it is.
    pub fn poll(&mut self, v: DiskView, now: Instant) -> Action {
        if self.step == Step::Finished {
            return Action::Wait;
        }
        if v.fenced {
            self.step = Step::Finished;
            return Action::Fail(HandoffError::Fenced);
        }
        let all_durable = v.connected && v.replica >= v.last && v.durable >= v.last;
        match self.step {
            Step::Shipping if v.quiet && all_durable => {
                self.step = Step::Pushing;
                return Action::PushFinal;
            }
            // Something to ship after the barrier (it cannot be written
            // while the device is held, but a failed read goes back dirty):
            // the barrier is not final, a new one follows.
            Step::Final(_) if !v.quiet => self.step = Step::Shipping,
            Step::Final(seq) if all_durable && v.last >= seq => {
                self.step = Step::Finished;
                return Action::Done { final_seq: v.last };
            }
            _ => {}
        }
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed >= self.timeout {
            self.step = Step::Finished;
            let secs = elapsed.as_secs();
            return Action::Fail(if v.connected {
                HandoffError::Timeout {
                    secs,
                    replica: v.replica,
                    last: v.last,
                    quiet: v.quiet,
                }
            } else {
                HandoffError::NotConnected { secs }
            });
        }
        Action::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(60);

    fn view(quiet: bool, last: u64, durable: u64, replica: u64) -> DiskView {
        DiskView {
            connected: true,
            fenced: false,
            quiet,
            last: Seq(last),
            durable: Seq(durable),
            replica: Seq(replica),
        }
    }

    #[test]
    fn the_final_point_is_cut_only_once_everything_is_durable_at_the_replica() {
        let t0 = Instant::now();
        let mut h = Handoff::new(t0, T);
        assert_eq!(h.poll(view(false, 5, 5, 5), t0), Action::Wait, "dirty left");
        assert_eq!(
            h.poll(view(true, 7, 7, 6), t0),
            Action::Wait,
            "not at the replica"
        );
        assert_eq!(
            h.poll(view(true, 7, 6, 6), t0),
            Action::Wait,
            "not at the relay"
        );
        assert_eq!(h.poll(view(true, 7, 7, 7), t0), Action::PushFinal);
        // While the push is under way nothing else happens.
        assert_eq!(h.poll(view(true, 7, 7, 7), t0), Action::Wait);
        h.handle_final_pushed(Seq(8));
        assert_eq!(
            h.poll(view(true, 8, 8, 7), t0),
            Action::Wait,
            "final not at the replica"
        );
        assert_eq!(
            h.poll(view(true, 8, 8, 8), t0),
            Action::Done { final_seq: Seq(8) }
        );
    }

    #[test]
    fn something_to_ship_after_the_barrier_needs_a_new_final_point() {
        let t0 = Instant::now();
        let mut h = Handoff::new(t0, T);
        assert_eq!(h.poll(view(true, 3, 3, 3), t0), Action::PushFinal);
        h.handle_final_pushed(Seq(4));
        assert_eq!(h.poll(view(false, 4, 4, 4), t0), Action::Wait);
        assert_eq!(h.poll(view(true, 5, 5, 5), t0), Action::PushFinal);
        h.handle_final_pushed(Seq(6));
        assert_eq!(
            h.poll(view(true, 6, 6, 6), t0),
            Action::Done { final_seq: Seq(6) }
        );
    }

    #[test]
    fn a_failed_push_of_the_final_point_is_tried_again() {
        let t0 = Instant::now();
        let mut h = Handoff::new(t0, T);
        assert_eq!(h.poll(view(true, 3, 3, 3), t0), Action::PushFinal);
        h.handle_final_failed();
        assert_eq!(h.poll(view(true, 3, 3, 3), t0), Action::PushFinal);
    }

    #[test]
    fn a_fence_stops_the_handoff() {
        let t0 = Instant::now();
        let mut h = Handoff::new(t0, T);
        let v = DiskView {
            fenced: true,
            ..view(true, 3, 3, 3)
        };
        assert_eq!(h.poll(v, t0), Action::Fail(HandoffError::Fenced));
        assert_eq!(h.poll(v, t0), Action::Wait, "reported once");
    }

    #[test]
    fn a_timeout_says_whether_the_relay_was_there() {
        let t0 = Instant::now();
        let late = t0 + T;
        let mut h = Handoff::new(t0, T);
        let gone = DiskView {
            connected: false,
            ..view(true, 3, 3, 3)
        };
        let Action::Fail(e) = h.poll(gone, late) else {
            panic!("timed out");
        };
        assert_eq!(e, HandoffError::NotConnected { secs: 60 });
        assert!(e.to_string().contains("still the source"), "{e}");

        let mut h = Handoff::new(t0, T);
        let Action::Fail(e) = h.poll(view(false, 9, 9, 4), late) else {
            panic!("timed out");
        };
        assert!(e.to_string().contains("more to ship"), "{e}");
        assert!(e.to_string().contains("--timeout"), "{e}");
    }
}
