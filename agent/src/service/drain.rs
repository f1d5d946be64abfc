//! The clean stop: ship what is tracked and wait for the target to make it durable.

use std::time::Instant;

use futures::FutureExt;
use tokio::sync::mpsc;

use super::{DRAIN_TIMEOUT, Service, Shipped, TICK};
use crate::tracker::Tracker;

impl Service {
    /// A clean stop: ship what is tracked, wait until the target has it durable.
    /// Returns whether nothing tracked is left behind.
    pub(super) async fn drain(
        &mut self,
        tracker: &mut Tracker,
        rx: &mut mpsc::Receiver<Shipped>,
    ) -> bool {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            if let Ok(notices) = tracker.poll_now() {
                self.handle_notices(tracker, notices);
            }
            while let Some(Some(msg)) = rx.recv().now_or_never() {
                self.handle_shipped(tracker, msg);
            }
            let mut idle = true;
            for d in &mut self.disks {
                if d.phase.halted() {
                    // Fenced or handed off: nothing of it is shipped; the
                    // pinned tracker keeps its dirty set over the stop.
                    continue;
                }
                let progress = d.channel.progress().borrow().clone();
                if !progress.connected {
                    // Nothing can become durable: stop now, resync at the next start.
                    return false;
                }
                d.rpo.handle_ack(progress.replica.0);
                Self::advance_sync(d, progress.durable);
                // The initial sync is not finished at a stop: it resumes later.
                d.phase.stop_initial_sync();
                if d.phase.resync_pending() {
                    return false;
                }
                if Self::schedule_reads(d, tracker).is_err() {
                    return false;
                }
                let dirty = tracker.dirty(d.dev).is_some_and(|s| !s.is_empty());
                if dirty || !d.reads.is_empty() || progress.durable < d.last_seq {
                    idle = false;
                }
            }
            if idle {
                return true;
            }
            if Instant::now() >= deadline {
                tracing::warn!("the target did not make everything durable in time");
                return false;
            }
            tokio::select! {
                Some(msg) = rx.recv() => self.handle_shipped(tracker, msg),
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }
}
