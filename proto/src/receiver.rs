//! The receiving side of one disk's stream (relay from agent, target from relay).
//!
//! [`DiskReceiver`] hands the shell each batch and barrier exactly once and in
//! sequence order, suppresses duplicates, turns gaps and stale generations
//! into typed errors (and nacks for the peer), and acks a sequence only after
//! the shell reports it durable ([`DiskReceiver::handle_durable`]).
//!
//! It answers a Hello only once everything it handed out is durable (or was
//! given up with [`DiskReceiver::handle_persist_failed`]), so the durable
//! sequence in the reply is exact: a sender that restarted and renumbers
//! from it never collides with frames still being persisted.
//!
//! Keep one receiver per disk across connections. A shell that builds one per
//! connection instead must let the previous connection's frames become
//! durable (or be abandoned) before it reads the durable sequence for the new
//! receiver; otherwise a restarted sender reuses sequence numbers of frames
//! still being applied, and the applier drops its data as duplicates.

use std::collections::VecDeque;

use crate::chunk::{ChunkError, verify_chunk};
use crate::frame::{Ack, ErrorCode, Frame, FrameType, HelloReply, Nack, RejectReason};
use crate::ids::{DiskId, Generation, Seq, SeqOrder, seq_order};
use crate::sender::sequenced;

/// Options of a [`DiskReceiver`].
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Verify every chunk (decode, blake3, range) before handing a batch out.
    /// A shell that verifies on a worker pool turns this off and calls
    /// [`check_batch`] itself before [`DiskReceiver::handle_frame`].
    pub verify_chunks: bool,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            verify_chunks: true,
        }
    }
}

/// Why a frame from the sender was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveError {
    #[error("frame for disk {got} on the stream of disk {expected}")]
    WrongDisk { expected: DiskId, got: DiskId },
    #[error("unexpected {0:?} frame from the sender")]
    UnexpectedFrame(FrameType),
    #[error("data frame before hello")]
    NotGreeted,
    #[error("disk {disk}: sequence gap, expected {expected} got {got}")]
    Gap {
        disk: DiskId,
        expected: Seq,
        got: Seq,
    },
    #[error("disk {disk}: frame {seq} of generation {got} is older than generation {current}")]
    StaleGeneration {
        disk: DiskId,
        seq: Seq,
        got: Generation,
        current: Generation,
    },
    #[error(
        "disk {disk}: frame {seq} of generation {got} reuses a sequence number already held (through {held}); a new generation continues the count: restart the sender from the receiver's durable sequence"
    )]
    ReusedSeq {
        disk: DiskId,
        seq: Seq,
        got: Generation,
        held: Seq,
    },
    #[error("disk {disk}: frame {seq} refused: {source}")]
    Integrity {
        disk: DiskId,
        seq: Seq,
        #[source]
        source: BatchError,
    },
}

impl ReceiveError {
    /// Code to close the connection with, for errors that end it. Gaps,
    /// stale frames and integrity failures are nacked and the stream goes on.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReceiveError::WrongDisk { .. }
            | ReceiveError::UnexpectedFrame(_)
            | ReceiveError::NotGreeted
            | ReceiveError::ReusedSeq { .. } => ErrorCode::Protocol,
            ReceiveError::Gap { .. } => ErrorCode::SequenceGap,
            ReceiveError::StaleGeneration { .. } => ErrorCode::StaleGeneration,
            ReceiveError::Integrity { .. } => ErrorCode::Integrity,
        }
    }

    /// Whether the connection must be closed (the others are nacked).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ReceiveError::WrongDisk { .. }
                | ReceiveError::UnexpectedFrame(_)
                | ReceiveError::NotGreeted
                | ReceiveError::ReusedSeq { .. }
        )
    }
}

/// Why a batch failed [`check_batch`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("chunk at offset {offset} ends beyond the disk size {disk_size}")]
    OutOfRange { offset: u64, disk_size: u64 },
    #[error(transparent)]
    Chunk(#[from] ChunkError),
}

impl BatchError {
    /// The reason to put in the nack.
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            BatchError::OutOfRange { offset, .. } => RejectReason::OutOfRange { offset: *offset },
            BatchError::Chunk(ChunkError::HashMismatch { offset }) => {
                RejectReason::HashMismatch { offset: *offset }
            }
            BatchError::Chunk(
                ChunkError::Decompress { offset, .. }
                | ChunkError::LengthMismatch { offset, .. }
                | ChunkError::BadLength { offset, .. }
                | ChunkError::Compress { offset, .. },
            ) => RejectReason::BadPayload { offset: *offset },
        }
    }
}

/// Verifies every chunk of a batch frame (ranges against `disk_size` when
/// known, payload decoding and blake3). Barriers pass.
pub fn check_batch(frame: &Frame, disk_size: Option<u64>) -> Result<(), BatchError> {
    let Frame::Batch(b) = frame else {
        return Ok(());
    };
    for c in &b.chunks {
        if let Some(size) = disk_size
            && c.end() > size
        {
            return Err(BatchError::OutOfRange {
                offset: c.offset,
                disk_size: size,
            });
        }
        verify_chunk(c)?;
    }
    Ok(())
}

/// Receiving side of one disk's stream. See the module docs.
#[derive(Debug)]
pub struct DiskReceiver {
    cfg: ReceiverConfig,
    disk: DiskId,
    disk_size: Option<u64>,
    peer: Option<String>,
    /// Highest sequence made durable by the shell, and its generation.
    durable: Seq,
    durable_generation: Generation,
    /// Highest sequence handed to the shell, and its generation.
    received: Seq,
    received_generation: Generation,
    /// Where the generation grows among received, not yet durable frames.
    generation_steps: VecDeque<(Seq, Generation)>,
    greeted: bool,
    hello_pending: bool,
    ack_pending: bool,
    outbox: VecDeque<Frame>,
    /// What the next hop reported durable at the replica; `None` when this
    /// receiver's own durability is the replica's (the target).
    replica: Option<Seq>,
}

impl DiskReceiver {
    /// A receiver whose durable state is `durable_seq` of `generation`
    /// (zero for a disk never seen; restored from storage after a restart).
    pub fn new(
        cfg: ReceiverConfig,
        disk: DiskId,
        generation: Generation,
        durable_seq: Seq,
    ) -> Self {
        DiskReceiver {
            cfg,
            disk,
            disk_size: None,
            peer: None,
            durable: durable_seq,
            durable_generation: generation,
            received: durable_seq,
            received_generation: generation,
            generation_steps: VecDeque::new(),
            greeted: false,
            hello_pending: false,
            ack_pending: false,
            outbox: VecDeque::new(),
            replica: None,
        }
    }

    pub fn disk(&self) -> DiskId {
        self.disk
    }

    /// Disk size announced in the last Hello.
    pub fn disk_size(&self) -> Option<u64> {
        self.disk_size
    }

    /// Identity announced in the last Hello.
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    /// Highest durable sequence.
    pub fn durable_seq(&self) -> Seq {
        self.durable
    }

    /// Generation of the highest durable frame.
    pub fn durable_generation(&self) -> Generation {
        self.durable_generation
    }

    /// Highest sequence handed to the shell.
    pub fn received_seq(&self) -> Seq {
        self.received
    }

    /// The connection is gone: forget what was queued for it.
    pub fn handle_disconnected(&mut self) {
        self.greeted = false;
        self.hello_pending = false;
        self.ack_pending = false;
        self.outbox.clear();
    }

    /// A frame from the sender. `Ok(Some(frame))`: the next batch or barrier,
    /// for the shell to persist and then report with [`Self::handle_durable`].
    /// `Ok(None)`: a duplicate or a control frame, nothing to do. `Err`: see
    /// [`ReceiveError::is_fatal`]; a nack has been queued for the others.
    /// Hash-range frames belong to the checksum resync that runs beside the
    /// stream: the shell routes them elsewhere, here they are unexpected.
    pub fn handle_frame(&mut self, frame: Frame) -> Result<Option<Frame>, ReceiveError> {
        if let Some(d) = frame.disk()
            && d != self.disk
        {
            return Err(ReceiveError::WrongDisk {
                expected: self.disk,
                got: d,
            });
        }
        if let Frame::Hello(h) = frame {
            // A new connection: whatever was queued for the old one is moot.
            self.outbox.clear();
            self.ack_pending = false;
            self.disk_size = Some(h.disk_size);
            self.peer = Some(h.agent);
            self.greeted = true;
            self.hello_pending = true;
            return Ok(None);
        }
        let Some((_, generation, seq)) = sequenced(&frame) else {
            return Err(ReceiveError::UnexpectedFrame(frame.frame_type()));
        };
        if !self.greeted {
            return Err(ReceiveError::NotGreeted);
        }
        // The sequence invariant, checked as every receiver checks it.
        match seq_order((self.received_generation, self.received), (generation, seq)) {
            SeqOrder::Next => {}
            SeqOrder::Duplicate => {
                if seq <= self.durable {
                    // The sender missed our ack: repeat it so it can forget the frame.
                    self.ack_pending = true;
                }
                return Ok(None);
            }
            SeqOrder::StaleGeneration { current } => {
                self.nack(generation, seq, RejectReason::StaleGeneration { current });
                return Err(ReceiveError::StaleGeneration {
                    disk: self.disk,
                    seq,
                    got: generation,
                    current,
                });
            }
            SeqOrder::Gap { expected } => {
                self.nack(generation, seq, RejectReason::Gap { expected });
                return Err(ReceiveError::Gap {
                    disk: self.disk,
                    expected,
                    got: seq,
                });
            }
            SeqOrder::Reused { held } => {
                // Taking it as a duplicate would ack data never stored.
                return Err(ReceiveError::ReusedSeq {
                    disk: self.disk,
                    seq,
                    got: generation,
                    held,
                });
            }
        }
        if self.cfg.verify_chunks
            && let Err(e) = check_batch(&frame, self.disk_size)
        {
            self.nack(generation, seq, e.reject_reason());
            return Err(ReceiveError::Integrity {
                disk: self.disk,
                seq,
                source: e,
            });
        }
        self.received = seq;
        if generation > self.received_generation {
            self.received_generation = generation;
            self.generation_steps.push_back((seq, generation));
        }
        Ok(Some(frame))
    }

    fn nack(&mut self, generation: Generation, seq: Seq, reason: RejectReason) {
        self.outbox.push_back(Frame::Nack(Nack {
            disk: self.disk,
            generation,
            seq,
            reason,
        }));
    }

    /// The shell made everything up to `seq` durable (fsynced). Sequences
    /// beyond what was handed out are ignored.
    pub fn handle_durable(&mut self, seq: Seq) {
        let seq = seq.min(self.received);
        if seq <= self.durable {
            return;
        }
        self.durable = seq;
        while let Some(&(s, g)) = self.generation_steps.front() {
            if s > seq {
                break;
            }
            self.durable_generation = g;
            self.generation_steps.pop_front();
        }
        self.ack_pending = true;
    }

    /// A forwarding shell (the relay) learned that the replica further down has
    /// everything through `seq` durable: the next ack tells the sender, whose
    /// RPO runs until then.
    pub fn handle_replica_durable(&mut self, seq: Seq) {
        let old = self.replica_seq();
        let new = self.replica.map_or(seq, |r| r.max(seq));
        self.replica = Some(new);
        if self.replica_seq() != old {
            self.ack_pending = true;
        }
    }

    /// Through which sequence the replica is durable, as far as this receiver knows.
    pub fn replica_seq(&self) -> Seq {
        self.replica.map_or(self.durable, |r| r.min(self.durable))
    }

    /// The shell could not persist what it was handed after the durable
    /// sequence: those frames count as never received, and are accepted again.
    pub fn handle_persist_failed(&mut self) {
        self.received = self.durable;
        self.received_generation = self.durable_generation;
        self.generation_steps.clear();
    }

    /// Next frame to send back to the sender.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        if self.hello_pending {
            if self.received != self.durable {
                // Answer once the durable sequence is exact; see module docs.
                return None;
            }
            self.hello_pending = false;
            self.ack_pending = false;
            return Some(Frame::HelloReply(HelloReply {
                disk: self.disk,
                generation: self.durable_generation,
                durable_seq: self.durable,
                replica_seq: self.replica_seq(),
            }));
        }
        if let Some(f) = self.outbox.pop_front() {
            return Some(f);
        }
        if self.ack_pending && self.greeted {
            self.ack_pending = false;
            return Some(Frame::Ack(Ack {
                disk: self.disk,
                generation: self.durable_generation,
                durable_seq: self.durable,
                replica_seq: self.replica_seq(),
            }));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::build_chunk;
    use crate::frame::{Barrier, Consistency, ExtentBatch, Hello};

    const D: DiskId = DiskId([3; 16]);

    fn hello() -> Frame {
        Frame::Hello(Hello {
            agent: "host".into(),
            disk: D,
            disk_size: 1 << 20,
            generation: Generation(1),
            oldest_held: Seq::ZERO,
            next_seq: Seq::ZERO,
        })
    }

    fn barrier(seq: u64) -> Frame {
        Frame::Barrier(Barrier {
            disk: D,
            generation: Generation(1),
            seq: Seq(seq),
            consistency: Consistency::NotConsistent,
            timestamp_ns: 0,
        })
    }

    fn greeted() -> DiskReceiver {
        let mut r = DiskReceiver::new(ReceiverConfig::default(), D, Generation(1), Seq::ZERO);
        r.handle_frame(hello()).unwrap();
        assert!(matches!(r.poll_transmit(), Some(Frame::HelloReply(_))));
        r
    }

    #[test]
    fn duplicates_are_handed_out_once_and_reacked() {
        let mut r = greeted();
        assert_eq!(r.handle_frame(barrier(1)), Ok(Some(barrier(1))));
        assert_eq!(r.handle_frame(barrier(1)), Ok(None));
        assert_eq!(r.poll_transmit(), None, "no ack before durable");
        r.handle_durable(Seq(1));
        assert!(matches!(r.poll_transmit(), Some(Frame::Ack(a)) if a.durable_seq == Seq(1)));
        assert_eq!(r.handle_frame(barrier(1)), Ok(None));
        assert!(matches!(r.poll_transmit(), Some(Frame::Ack(a)) if a.durable_seq == Seq(1)));
    }

    #[test]
    fn acks_carry_the_replica_position() {
        // A target is the replica: both positions move together.
        let mut t = greeted();
        t.handle_frame(barrier(1)).unwrap();
        t.handle_durable(Seq(1));
        assert!(matches!(t.poll_transmit(),
            Some(Frame::Ack(a)) if a.durable_seq == Seq(1) && a.replica_seq == Seq(1)));
        // A relay reports what its target has, and acks again when only that moves.
        let mut r = greeted();
        r.handle_frame(barrier(1)).unwrap();
        r.handle_frame(barrier(2)).unwrap();
        r.handle_replica_durable(Seq::ZERO);
        r.handle_durable(Seq(2));
        assert!(matches!(r.poll_transmit(),
            Some(Frame::Ack(a)) if a.durable_seq == Seq(2) && a.replica_seq == Seq::ZERO));
        r.handle_replica_durable(Seq(2));
        assert!(matches!(r.poll_transmit(),
            Some(Frame::Ack(a)) if a.durable_seq == Seq(2) && a.replica_seq == Seq(2)));
        assert_eq!(r.poll_transmit(), None);
    }

    #[test]
    fn gap_is_a_typed_error_and_a_nack() {
        let mut r = greeted();
        let err = r.handle_frame(barrier(2)).unwrap_err();
        assert!(matches!(
            err,
            ReceiveError::Gap {
                expected: Seq(1),
                got: Seq(2),
                ..
            }
        ));
        assert!(!err.is_fatal());
        assert!(matches!(
            r.poll_transmit(),
            Some(Frame::Nack(n)) if n.reason == RejectReason::Gap { expected: Seq(1) }
        ));
        assert_eq!(r.received_seq(), Seq::ZERO);
    }

    #[test]
    fn hello_reply_waits_until_received_frames_are_durable() {
        let mut r = greeted();
        r.handle_frame(barrier(1)).unwrap();
        r.handle_frame(barrier(2)).unwrap();
        r.handle_durable(Seq(1));
        // The sender reconnects (it may have restarted and would renumber).
        r.handle_disconnected();
        r.handle_frame(hello()).unwrap();
        assert_eq!(
            r.poll_transmit(),
            None,
            "reply must not report 1 while 2 is in flight"
        );
        r.handle_durable(Seq(2));
        assert!(matches!(
            r.poll_transmit(),
            Some(Frame::HelloReply(h)) if h.durable_seq == Seq(2)
        ));
    }

    #[test]
    fn persist_failure_accepts_the_frames_again() {
        let mut r = greeted();
        r.handle_frame(barrier(1)).unwrap();
        r.handle_persist_failed();
        assert_eq!(r.handle_frame(barrier(1)), Ok(Some(barrier(1))));
    }

    #[test]
    fn corrupt_or_out_of_range_chunks_are_refused() {
        let mut r = greeted();
        let mut c = build_chunk(0, &[7u8; 4096], None).unwrap();
        c.hash[0] ^= 1;
        let bad = Frame::Batch(ExtentBatch {
            disk: D,
            generation: Generation(1),
            seq: Seq(1),
            chunks: vec![c],
        });
        assert!(matches!(
            r.handle_frame(bad),
            Err(ReceiveError::Integrity { .. })
        ));
        assert!(matches!(
            r.poll_transmit(),
            Some(Frame::Nack(n)) if n.reason == RejectReason::HashMismatch { offset: 0 }
        ));
        let beyond = Frame::Batch(ExtentBatch {
            disk: D,
            generation: Generation(1),
            seq: Seq(1),
            chunks: vec![build_chunk(1 << 20, &[7u8; 4096], None).unwrap()],
        });
        assert!(matches!(
            r.handle_frame(beyond),
            Err(ReceiveError::Integrity { .. })
        ));
        assert_eq!(r.received_seq(), Seq::ZERO);
    }

    #[test]
    fn older_generation_is_refused_after_a_newer_one() {
        let mut r = greeted();
        let mut f = barrier(1);
        if let Frame::Barrier(b) = &mut f {
            b.generation = Generation(2);
        }
        r.handle_frame(f).unwrap();
        let err = r.handle_frame(barrier(2)).unwrap_err();
        assert!(matches!(
            err,
            ReceiveError::StaleGeneration {
                current: Generation(2),
                ..
            }
        ));
    }

    #[test]
    fn a_newer_generation_that_restarts_the_count_is_refused_not_acked() {
        let mut r = greeted();
        r.handle_frame(barrier(1)).unwrap();
        r.handle_frame(barrier(2)).unwrap();
        r.handle_durable(Seq(2));
        while r.poll_transmit().is_some() {}
        let mut restarted = barrier(1);
        if let Frame::Barrier(b) = &mut restarted {
            b.generation = Generation(2);
        }
        let err = r.handle_frame(restarted).unwrap_err();
        assert!(matches!(err, ReceiveError::ReusedSeq { held: Seq(2), .. }));
        assert!(err.is_fatal());
        assert_eq!(r.poll_transmit(), None, "nothing acked for it");
        // Continuing the count is the way to start a generation.
        let mut next = barrier(3);
        if let Frame::Barrier(b) = &mut next {
            b.generation = Generation(2);
        }
        assert_eq!(r.handle_frame(next.clone()), Ok(Some(next)));
    }

    #[test]
    fn data_before_hello_and_foreign_disks_are_fatal() {
        let mut r = DiskReceiver::new(ReceiverConfig::default(), D, Generation(1), Seq::ZERO);
        assert!(r.handle_frame(barrier(1)).unwrap_err().is_fatal());
        let mut other = barrier(1);
        if let Frame::Barrier(b) = &mut other {
            b.disk = DiskId([4; 16]);
        }
        assert!(r.handle_frame(other).unwrap_err().is_fatal());
    }
}
