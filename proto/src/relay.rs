//! What the relay does for one disk: receive from the agent, spool, forward
//! to the target, and release spool only behind the target's acks.
//!
//! [`RelayDisk`] joins a [`DiskReceiver`] (upstream, acks the agent once a
//! frame is fsynced in the spool) and a forwarding [`DiskSender`]
//! (downstream, keeps the agent's sequence numbers so one sequence space runs
//! end to end). The spool itself is the shell's: this type only says which
//! frame to write, which to read back for forwarding, and what may be deleted.
//! Only a window of frames is held in memory; the rest stays in the spool.

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

/// Durable state of one disk at the relay, as the shell stored it.
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

/// One disk's relay state. See the module docs.
#[derive(Debug)]
pub struct RelayDisk {
    upstream: DiskReceiver,
    downstream: DiskSender,
    /// Last sequence pushed downstream (read back from the spool).
    forwarded: Seq,
    /// Last sequence released to the shell.
    released: Seq,
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
        let upstream = DiskReceiver::new(receiver, r.disk, r.generation, r.spooled_through);
        let downstream =
            DiskSender::forwarding(sender, identity, r.disk, r.disk_size, r.generation);
        let forwarded = match r.spool_first {
            Some(first) => Seq(first.0.saturating_sub(1)),
            None => r.spooled_through,
        };
        RelayDisk {
            upstream,
            downstream,
            forwarded,
            released: forwarded,
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
        self.released
    }

    /// Frames spooled and not yet acked by the target (spool backlog).
    pub fn backlog(&self) -> u64 {
        self.spooled_through().0.saturating_sub(self.released.0)
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
        let next = self.forwarded.next();
        (next <= self.spooled_through() && self.downstream.has_room(0)).then_some(next)
    }

    /// The frame asked for by [`Self::poll_forward`], read from the spool.
    pub fn handle_forward(&mut self, frame: Frame) -> Result<Seq, Rejected<Frame>> {
        let expected = self.forwarded.next();
        match sequenced(&frame) {
            Some((_, _, seq)) if seq == expected => {}
            Some((_, _, got)) => {
                return Err(Rejected {
                    error: PushError::OutOfSequence { expected, got },
                    item: frame,
                });
            }
            None => {
                return Err(Rejected {
                    error: PushError::NotSequenced,
                    item: frame,
                });
            }
        }
        let seq = self.downstream.push_numbered(frame)?;
        self.forwarded = seq;
        Ok(seq)
    }

    /// A frame from the target.
    pub fn handle_downstream(&mut self, frame: Frame, now: Instant) -> Result<(), SenderError> {
        self.downstream.handle_frame(frame, now)?;
        while let Some(ev) = self.downstream.poll_event() {
            match ev {
                SenderEvent::Resumed { durable } | SenderEvent::Acked { durable } => {
                    // The target may be ahead of what we pushed since a
                    // restart: skip what it already has.
                    self.forwarded = self.forwarded.max(durable);
                    if durable > self.released {
                        self.released = durable;
                        self.events
                            .push_back(RelayEvent::Release { through: durable });
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
