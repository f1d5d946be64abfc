//! What the relay does for one disk: receive from the agent, spool, forward
//! to the target, and release spool only behind the target's acks.
//!
//! [`RelayDisk`] joins a [`DiskReceiver`] (upstream, acks the agent once a
//! frame is fsynced in the spool) and a forwarding [`DiskSender`]
//! (downstream, keeps the agent's sequence numbers so one sequence space runs
//! end to end) through a [`SpoolCursor`], the relay's own decisions: which
//! spooled frame goes to the target next, and what the target's acks let the
//! spool delete. The spool itself is the shell's. Only a window of frames is
//! held in memory; the rest stays in the spool. A relay restarts from
//! [`RelayRestore::from_spool`], what its spool holds durably.
//!
//! **One composition, tested where it ships.** `proto/tests/sim.rs` drives
//! [`RelayDisk`] through loss, reordering, crashes, spool restores and a full
//! spool. The relay binary runs the same three pieces per disk: the receiver
//! inside the shared receiving loop (`blockferry_transport::sink`, also the
//! target's), the forwarding sender inside a `DiskChannel`, and this module's
//! [`SpoolCursor`] and [`RelayRestore::from_spool`] in its forward and release
//! tasks. What only the binary has is transport glue: the sender's window
//! is felt as a waiting push instead of [`RelayDisk::poll_forward`]'s room
//! check, and the target's acks reach the cursor from the channel's progress
//! rather than through [`RelayDisk::handle_downstream`].

use std::collections::VecDeque;
use std::time::Instant;

use crate::frame::{ErrorCode, Frame};
use crate::ids::{DiskId, Generation, Seq};
use crate::receiver::{DiskReceiver, ReceiveError, ReceiverConfig};
use crate::sender::{
    DiskSender, PushError, Rejected, ResyncReason, SenderConfig, SenderError, SenderEvent,
    sequenced,
};

/// What the relay shell must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// The target made everything through this sequence durable: the spool
    /// may delete it. The shell must still remember this sequence (and its
    /// generation) durably, to restore with [`RelayDisk::restore`].
    Release { through: Seq },
    /// The target cannot continue from what the relay holds.
    DownstreamResync(ResyncReason),
    /// The target sent an error frame.
    DownstreamError { code: ErrorCode, message: String },
}

/// Durable state of one disk at the relay, as the shell stored it. Build it
/// with [`RelayRestore::from_spool`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayRestore {
    pub disk: DiskId,
    pub disk_size: u64,
    /// Generation of the last spooled frame.
    pub generation: Generation,
    /// Last sequence fsynced in the spool (or released, if the spool is empty).
    pub spooled_through: Seq,
    /// First sequence still in the spool, if any.
    pub spool_first: Option<Seq>,
}

impl RelayRestore {
    /// The state a relay restarts from, given what its spool holds durably:
    /// `acked`, the last position the target acknowledged (persisted before
    /// any spooled frame is deleted), and `spooled`, the first and last frames
    /// still in the spool after it (`None` when none is). `generation` is the
    /// one of a disk the spool knows nothing about (its agent's Hello).
    ///
    /// Positions are `(generation, seq)`; one sequence space runs across
    /// generations (see [`Seq`]), so the newest of them is what was spooled.
    pub fn from_spool(
        disk: DiskId,
        disk_size: u64,
        acked: Option<(Generation, Seq)>,
        spooled: Option<((Generation, Seq), (Generation, Seq))>,
        generation: Generation,
    ) -> Self {
        let last = spooled.map(|(_, last)| last).max(acked);
        let (generation, spooled_through) = last.unwrap_or((generation, Seq::ZERO));
        RelayRestore {
            disk,
            disk_size,
            generation,
            spooled_through,
            spool_first: spooled.map(|((_, first), _)| first),
        }
    }
}

/// The relay's own per-disk decisions, between the receiver that fills the
/// spool and the sender that empties it: the next spooled frame to forward,
/// and how far the spool may be released. The relay binary's forward and
/// release tasks run it, [`RelayDisk`] runs it in the simulation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolCursor {
    /// Last sequence pushed downstream (read back from the spool), or known
    /// to be at the target already.
    forwarded: Seq,
    /// Last sequence the target acked durable.
    acked: Seq,
    /// Last sequence released from the spool.
    released: Seq,
}

impl SpoolCursor {
    /// After a (re)start: everything before the first spooled frame reached
    /// the target, so forwarding starts there.
    pub fn restore(r: &RelayRestore) -> Self {
        let forwarded = match r.spool_first {
            Some(first) => Seq(first.0.saturating_sub(1)),
            None => r.spooled_through,
        };
        SpoolCursor {
            forwarded,
            acked: forwarded,
            released: forwarded,
        }
    }

    /// Last sequence pushed downstream or known to be at the target.
    pub fn forwarded(&self) -> Seq {
        self.forwarded
    }

    /// Last sequence released from the spool.
    pub fn released(&self) -> Seq {
        self.released
    }

    /// The spooled frame to read back and forward next, if the spool holds
    /// it (`spooled_through`: last sequence fsynced in the spool).
    pub fn poll_forward(&self, spooled_through: Seq) -> Option<Seq> {
        let next = self.forwarded.next();
        (next <= spooled_through).then_some(next)
    }

    /// Checks that `frame`, read back from the spool, is the one to forward
    /// next; returns its sequence. A frame the target already has (its acks
    /// moved the cursor on meanwhile) is out of sequence: read again.
    pub fn check_forward(&self, frame: &Frame) -> Result<Seq, PushError> {
        let expected = self.forwarded.next();
        match sequenced(frame) {
            Some((_, _, seq)) if seq == expected => Ok(seq),
            Some((_, _, got)) => Err(PushError::OutOfSequence { expected, got }),
            None => Err(PushError::NotSequenced),
        }
    }

    /// `seq` was pushed downstream.
    pub fn handle_forwarded(&mut self, seq: Seq) {
        self.forwarded = self.forwarded.max(seq);
    }

    /// The target has everything through `durable`. It may be ahead of what
    /// was pushed since a restart: forwarding skips what it already has.
    pub fn handle_target_durable(&mut self, durable: Seq) {
        self.forwarded = self.forwarded.max(durable);
        self.acked = self.acked.max(durable);
    }

    /// How far the spool may now be released, if further than before. Call
    /// [`Self::handle_released`] once the spool did it.
    pub fn poll_release(&self) -> Option<Seq> {
        (self.acked > self.released).then_some(self.acked)
    }

    /// The spool released everything through `through`.
    pub fn handle_released(&mut self, through: Seq) {
        self.released = self.released.max(through);
    }
}

/// One disk's relay state. See the module docs.
#[derive(Debug)]
pub struct RelayDisk {
    upstream: DiskReceiver,
    downstream: DiskSender,
    cursor: SpoolCursor,
    events: VecDeque<RelayEvent>,
}

impl RelayDisk {
    /// State of a disk after a (re)start of the relay.
    pub fn restore(
        identity: impl Into<String>,
        receiver: ReceiverConfig,
        sender: SenderConfig,
        r: RelayRestore,
    ) -> Self {
        let mut upstream = DiskReceiver::new(receiver, r.disk, r.generation, r.spooled_through);
        let downstream =
            DiskSender::forwarding(sender, identity, r.disk, r.disk_size, r.generation);
        let cursor = SpoolCursor::restore(&r);
        // The relay is not the replica: until the target says more, acks
        // report only what the spool knows the target has, never what the
        // relay itself holds.
        upstream.handle_replica_durable(cursor.released());
        RelayDisk {
            upstream,
            downstream,
            cursor,
            events: VecDeque::new(),
        }
    }

    pub fn disk(&self) -> DiskId {
        self.upstream.disk()
    }

    /// The upstream (agent-facing) receiver, for inspection.
    pub fn upstream(&self) -> &DiskReceiver {
        &self.upstream
    }

    /// The downstream (target-facing) sender, for inspection.
    pub fn downstream(&self) -> &DiskSender {
        &self.downstream
    }

    /// Last sequence fsynced in the spool.
    pub fn spooled_through(&self) -> Seq {
        self.upstream.durable_seq()
    }

    /// Last sequence the target acked durable.
    pub fn released_through(&self) -> Seq {
        self.cursor.released()
    }

    /// Frames spooled and not yet acked by the target (spool backlog).
    pub fn backlog(&self) -> u64 {
        self.spooled_through()
            .0
            .saturating_sub(self.cursor.released().0)
    }

    // ---- upstream: the agent ----

    /// The agent's connection is gone.
    pub fn handle_upstream_disconnected(&mut self) {
        self.upstream.handle_disconnected();
    }

    /// A frame from the agent. `Ok(Some(frame))`: write it to the spool,
    /// fsync, then call [`Self::handle_spooled`].
    pub fn handle_upstream(&mut self, frame: Frame) -> Result<Option<Frame>, ReceiveError> {
        self.upstream.handle_frame(frame)
    }

    /// Everything through `seq` is fsynced in the spool: ack the agent.
    pub fn handle_spooled(&mut self, seq: Seq) {
        self.upstream.handle_durable(seq);
    }

    /// Writing the spool failed: frames after the last fsynced one are
    /// accepted again when the agent resends them.
    pub fn handle_spool_failed(&mut self) {
        self.upstream.handle_persist_failed();
    }

    /// Next frame for the agent (hello reply, acks, nacks).
    pub fn poll_upstream_transmit(&mut self) -> Option<Frame> {
        self.upstream.poll_transmit()
    }

    // ---- downstream: the target ----

    /// A connection to the target is up.
    pub fn handle_downstream_connected(&mut self) {
        self.downstream.handle_connected();
    }

    /// The target's connection is gone.
    pub fn handle_downstream_disconnected(&mut self) {
        self.downstream.handle_disconnected();
    }

    /// The spooled frame the shell should read back and pass to
    /// [`Self::handle_forward`], when the downstream window has room.
    pub fn poll_forward(&self) -> Option<Seq> {
        self.cursor
            .poll_forward(self.spooled_through())
            .filter(|_| self.downstream.has_room(0))
    }

    /// The frame asked for by [`Self::poll_forward`], read from the spool.
    pub fn handle_forward(&mut self, frame: Frame) -> Result<Seq, Rejected<Frame>> {
        if let Err(error) = self.cursor.check_forward(&frame) {
            return Err(Rejected { error, item: frame });
        }
        let seq = self.downstream.push_numbered(frame)?;
        self.cursor.handle_forwarded(seq);
        Ok(seq)
    }

    /// A frame from the target.
    pub fn handle_downstream(&mut self, frame: Frame, now: Instant) -> Result<(), SenderError> {
        self.downstream.handle_frame(frame, now)?;
        while let Some(ev) = self.downstream.poll_event() {
            match ev {
                SenderEvent::Resumed { durable } | SenderEvent::Acked { durable } => {
                    self.cursor.handle_target_durable(durable);
                    // The agent's acks say how far the replica got, as the
                    // binary's receiving loop reports it.
                    self.upstream.handle_replica_durable(durable);
                    if let Some(through) = self.cursor.poll_release() {
                        self.cursor.handle_released(through);
                        self.events.push_back(RelayEvent::Release { through });
                    }
                }
                SenderEvent::ResyncNeeded(r) => {
                    self.events.push_back(RelayEvent::DownstreamResync(r));
                }
                SenderEvent::PeerError { code, message } => {
                    self.events
                        .push_back(RelayEvent::DownstreamError { code, message });
                }
            }
        }
        Ok(())
    }

    /// Next frame for the target.
    pub fn poll_downstream_transmit(&mut self, now: Instant) -> Option<Frame> {
        self.downstream.poll_transmit(now)
    }

    /// When [`Self::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.downstream.poll_timeout()
    }

    /// Time passed (downstream retransmission).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.downstream.handle_timeout(now);
    }

    /// Next event for the shell.
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: DiskId = DiskId([7; 16]);

    #[test]
    fn restore_from_an_empty_spool_continues_after_the_acked_position() {
        let r = RelayRestore::from_spool(
            DISK,
            1 << 20,
            Some((Generation(2), Seq(40))),
            None,
            Generation(9),
        );
        assert_eq!((r.generation, r.spooled_through), (Generation(2), Seq(40)));
        let c = SpoolCursor::restore(&r);
        assert_eq!((c.forwarded(), c.released()), (Seq(40), Seq(40)));
        assert_eq!(c.poll_forward(r.spooled_through), None);
    }

    #[test]
    fn restore_forwards_from_the_first_spooled_frame_even_if_already_released() {
        // Released frames whose segment was not deleted come back: forward
        // them again, the target acks them as duplicates.
        let r = RelayRestore::from_spool(
            DISK,
            1 << 20,
            Some((Generation(1), Seq(3))),
            Some(((Generation(1), Seq(2)), (Generation(2), Seq(9)))),
            Generation(0),
        );
        assert_eq!((r.generation, r.spooled_through), (Generation(2), Seq(9)));
        let mut c = SpoolCursor::restore(&r);
        assert_eq!(c.poll_forward(r.spooled_through), Some(Seq(2)));
        // The target resumes at 6: skip to 7, release through 6 once.
        c.handle_target_durable(Seq(6));
        assert_eq!(c.poll_forward(r.spooled_through), Some(Seq(7)));
        assert_eq!(c.poll_release(), Some(Seq(6)));
        c.handle_released(Seq(6));
        assert_eq!(c.poll_release(), None);
    }

    #[test]
    fn a_disk_the_spool_never_saw_starts_at_its_hello_generation() {
        let r = RelayRestore::from_spool(DISK, 0, None, None, Generation(4));
        assert_eq!(
            (r.generation, r.spooled_through),
            (Generation(4), Seq::ZERO)
        );
        assert_eq!(SpoolCursor::restore(&r).poll_forward(Seq(1)), Some(Seq(1)));
    }
}
