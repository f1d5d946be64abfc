//! The sending side of one disk's stream (agent → relay, relay → target).
//!
//! [`DiskSender`] numbers batches and barriers, keeps every frame until the
//! peer acks it durable (bounded: a full window is backpressure), and after a
//! reconnect resends from the peer's durable sequence. It does no I/O: the
//! shell feeds it peer frames and connection events (`handle_*`), takes
//! frames to transmit (`poll_transmit`), and drives its timer with `now`.
//!
//! Sequence numbers of a fresh sender (one that remembers nothing, for example
//! after an agent restart) are provisional until the first [`HelloReply`]: no
//! frame is transmitted before it, so renumbering from the peer's durable
//! sequence is safe.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::frame::{
    Ack, Barrier, Chunk, Consistency, ExtentBatch, Frame, Hello, HelloReply, Nack, RejectReason,
};
use crate::ids::{DiskId, Generation, Seq};

/// Limits and timers of a [`DiskSender`].
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Most frames held unacked before pushes are refused.
    pub max_unacked_frames: usize,
    /// Most encoded bytes held unacked before pushes are refused. One frame
    /// may exceed it when the window is empty, so a large batch always fits.
    pub max_unacked_bytes: usize,
    /// Resend everything unacked when no ack arrived for this long after a
    /// transmission. `None` over a reliable transport (QUIC streams), where
    /// only a reconnect loses frames.
    pub retransmit_after: Option<Duration>,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            max_unacked_frames: 1024,
            max_unacked_bytes: 256 << 20,
            retransmit_after: None,
        }
    }
}

/// Why a push was refused. The frame or chunks are handed back with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("send window full: wait for acks from the peer")]
    WindowFull,
    #[error("frame {got} does not follow {expected}: sequence numbers must be contiguous")]
    OutOfSequence { expected: Seq, got: Seq },
    #[error("only batches and barriers are sequenced")]
    NotSequenced,
    #[error("frame is for disk {got}, this stream carries {expected}")]
    WrongDisk { expected: DiskId, got: DiskId },
    #[error("the stream needs a resync first: call start_generation")]
    NeedsResync,
}

/// A refused push and what was pushed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct Rejected<T> {
    pub error: PushError,
    pub item: T,
}

/// Why the stream cannot simply continue: the shell must resync the disk by
/// checksum and call [`DiskSender::start_generation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// The peer holds a newer generation than ours.
    StaleGeneration { ours: Generation, peer: Generation },
    /// The peer's durable sequence is outside what we hold: frames between
    /// are gone on both sides.
    CannotResume { peer_durable: Seq, oldest_held: Seq },
    /// The peer refused a frame's content (hash, payload, range).
    Rejected { seq: Seq, reason: RejectReason },
}

/// What the shell learns from the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent {
    /// The peer is ready; transmission (re)starts after its durable sequence.
    Resumed { durable: Seq },
    /// Everything up to `durable` is durable at the peer and was forgotten here.
    Acked { durable: Seq },
    /// See [`ResyncReason`]. Held frames were dropped; nothing is sent until
    /// [`DiskSender::start_generation`].
    ResyncNeeded(ResyncReason),
    /// The peer sent an error frame; the shell should close the connection.
    PeerError {
        code: crate::frame::ErrorCode,
        message: String,
    },
}

/// Error from a peer frame that makes no sense for a sender.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SenderError {
    #[error("unexpected {0:?} frame from the receiver")]
    UnexpectedFrame(crate::frame::FrameType),
    #[error("frame for disk {got} on the stream of disk {expected}")]
    WrongDisk { expected: DiskId, got: DiskId },
    #[error("ack of {acked} beyond the last frame sent {sent}")]
    AckBeyondSent { acked: Seq, sent: Seq },
}

impl SenderError {
    /// Code to close the connection with.
    pub fn code(&self) -> crate::frame::ErrorCode {
        crate::frame::ErrorCode::Protocol
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Down,
    /// Hello queued or sent; waiting for the reply.
    Greeting,
    Up,
}

#[derive(Debug)]
struct Held {
    frame: Frame,
    len: usize,
}

/// How sequence numbers are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Numbering {
    /// This sender assigns them (agent). `confirmed` once a peer told us its
    /// durable sequence.
    Assign { confirmed: bool },
    /// Frames arrive numbered and keep their numbers (relay → target).
    Preserve,
}

/// Sending side of one disk's stream. See the module docs.
#[derive(Debug)]
pub struct DiskSender {
    cfg: SenderConfig,
    agent: String,
    disk: DiskId,
    disk_size: u64,
    generation: Generation,
    numbering: Numbering,
    /// Sequence of the next frame pushed (Assign mode).
    next_seq: Seq,
    /// Unacked frames, contiguous in sequence.
    held: VecDeque<Held>,
    held_bytes: usize,
    /// Highest sequence the peer reported durable.
    durable: Seq,
    /// Highest sequence the peer reported durable at the replica.
    replica: Seq,
    /// Next sequence to transmit; frames below it were sent on this link.
    send_next: Seq,
    link: Link,
    hello_queued: bool,
    /// When the oldest unacked transmission was made or last acked.
    rto_base: Option<Instant>,
    resync_needed: bool,
    events: VecDeque<SenderEvent>,
}

impl DiskSender {
    /// A sender that remembers nothing: numbering is fixed by the peer's first reply.
    pub fn new(
        cfg: SenderConfig,
        agent: impl Into<String>,
        disk: DiskId,
        disk_size: u64,
        generation: Generation,
    ) -> Self {
        DiskSender {
            cfg,
            agent: agent.into(),
            disk,
            disk_size,
            generation,
            numbering: Numbering::Assign { confirmed: false },
            next_seq: Seq(1),
            held: VecDeque::new(),
            held_bytes: 0,
            durable: Seq::ZERO,
            replica: Seq::ZERO,
            send_next: Seq(1),
            link: Link::Down,
            hello_queued: false,
            rto_base: None,
            resync_needed: false,
            events: VecDeque::new(),
        }
    }

    /// A sender that forwards frames numbered elsewhere (the relay's hop to
    /// the target). `identity` is the forwarder's name for the Hello.
    pub fn forwarding(
        cfg: SenderConfig,
        identity: impl Into<String>,
        disk: DiskId,
        disk_size: u64,
        generation: Generation,
    ) -> Self {
        let mut s = Self::new(cfg, identity, disk, disk_size, generation);
        s.numbering = Numbering::Preserve;
        s
    }

    pub fn disk(&self) -> DiskId {
        self.disk
    }

    /// The disk size the next Hello announces.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// The disk changed size: the next Hello announces `size`. The peer learns
    /// it only from a Hello, so the shell reconnects the stream; held frames
    /// are resent from the peer's durable sequence as after any reconnect.
    pub fn set_disk_size(&mut self, size: u64) {
        self.disk_size = size;
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Highest sequence the peer acked durable.
    /// Through which sequence the replica at the end of the chain is durable.
    pub fn replica_seq(&self) -> Seq {
        self.replica
    }

    pub fn durable_seq(&self) -> Seq {
        self.durable
    }

    /// Last sequence pushed (`Seq::ZERO` if none yet).
    pub fn last_seq(&self) -> Seq {
        match self.held.back() {
            Some(h) => seq_of(&h.frame),
            None => match self.numbering {
                Numbering::Assign { .. } => Seq(self.next_seq.0.saturating_sub(1)),
                Numbering::Preserve => self.durable,
            },
        }
    }

    /// Frames held until acked.
    pub fn unacked_frames(&self) -> usize {
        self.held.len()
    }

    /// Encoded bytes held until acked.
    pub fn unacked_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Whether the peer has answered our Hello on the current connection.
    pub fn is_connected(&self) -> bool {
        self.link == Link::Up
    }

    /// Whether a push of a frame of `len` encoded bytes would be accepted now.
    pub fn has_room(&self, len: usize) -> bool {
        if self.resync_needed || self.held.len() >= self.cfg.max_unacked_frames {
            return false;
        }
        self.held.is_empty() || self.held_bytes.saturating_add(len) <= self.cfg.max_unacked_bytes
    }

    /// Pushes a batch of chunks; returns its sequence number.
    pub fn push_batch(&mut self, chunks: Vec<Chunk>) -> Result<Seq, Rejected<Vec<Chunk>>> {
        let frame = Frame::Batch(ExtentBatch {
            disk: self.disk,
            generation: self.generation,
            seq: self.next_seq,
            chunks,
        });
        self.push_assigned(frame).map_err(|r| Rejected {
            error: r.error,
            item: match r.item {
                Frame::Batch(b) => b.chunks,
                _ => Vec::new(),
            },
        })
    }

    /// Pushes a recovery-point barrier; returns its sequence number.
    pub fn push_barrier(
        &mut self,
        consistency: Consistency,
        timestamp_ns: u64,
    ) -> Result<Seq, PushError> {
        let frame = Frame::Barrier(Barrier {
            disk: self.disk,
            generation: self.generation,
            seq: self.next_seq,
            consistency,
            timestamp_ns,
        });
        self.push_assigned(frame).map_err(|r| r.error)
    }

    fn push_assigned(&mut self, frame: Frame) -> Result<Seq, Rejected<Frame>> {
        if self.numbering == Numbering::Preserve {
            return self.push_numbered(frame);
        }
        let len = frame.encoded_len();
        if self.resync_needed {
            return Err(Rejected {
                error: PushError::NeedsResync,
                item: frame,
            });
        }
        if !self.has_room(len) {
            return Err(Rejected {
                error: PushError::WindowFull,
                item: frame,
            });
        }
        let seq = self.next_seq;
        self.next_seq = seq.next();
        self.hold(frame, len);
        Ok(seq)
    }

    /// Pushes a frame that already carries its sequence number (forwarding).
    /// It must directly follow the last frame pushed.
    pub fn push_numbered(&mut self, frame: Frame) -> Result<Seq, Rejected<Frame>> {
        let reject = |error, item| Err(Rejected { error, item });
        let Some((disk, generation, seq)) = sequenced(&frame) else {
            return reject(PushError::NotSequenced, frame);
        };
        if disk != self.disk {
            return reject(
                PushError::WrongDisk {
                    expected: self.disk,
                    got: disk,
                },
                frame,
            );
        }
        if self.resync_needed {
            return reject(PushError::NeedsResync, frame);
        }
        if let Some(last) = self.held.back() {
            let expected = seq_of(&last.frame).next();
            if seq != expected {
                return reject(PushError::OutOfSequence { expected, got: seq }, frame);
            }
        } else if seq <= self.durable {
            return reject(
                PushError::OutOfSequence {
                    expected: self.durable.next(),
                    got: seq,
                },
                frame,
            );
        }
        let len = frame.encoded_len();
        if !self.has_room(len) {
            return reject(PushError::WindowFull, frame);
        }
        if self.held.is_empty() {
            // Nothing transmitted is pending, so transmission starts here.
            self.send_next = self.send_next.max(seq);
        }
        self.generation = self.generation.max(generation);
        self.next_seq = seq.next();
        self.hold(frame, len);
        Ok(seq)
    }

    fn hold(&mut self, frame: Frame, len: usize) {
        self.held_bytes += len;
        self.held.push_back(Held { frame, len });
    }

    /// A connection to the peer is up: a Hello goes out first.
    pub fn handle_connected(&mut self) {
        self.link = Link::Greeting;
        self.hello_queued = true;
        self.rto_base = None;
    }

    /// The connection is gone; whatever was in flight may be lost.
    pub fn handle_disconnected(&mut self) {
        self.link = Link::Down;
        self.hello_queued = false;
        self.rto_base = None;
    }

    /// A frame from the peer: hello reply, ack, nack or error. Hash-range
    /// frames belong to the checksum resync; the shell routes them elsewhere.
    pub fn handle_frame(&mut self, frame: Frame, now: Instant) -> Result<(), SenderError> {
        if let Some(d) = frame.disk()
            && d != self.disk
        {
            return Err(SenderError::WrongDisk {
                expected: self.disk,
                got: d,
            });
        }
        match frame {
            Frame::HelloReply(r) => {
                self.handle_hello_reply(r, now);
                Ok(())
            }
            Frame::Ack(a) => self.handle_ack(a, now),
            Frame::Nack(n) => {
                self.handle_nack(n);
                Ok(())
            }
            Frame::Error(e) => {
                self.events.push_back(SenderEvent::PeerError {
                    code: e.code,
                    message: e.message,
                });
                Ok(())
            }
            other => Err(SenderError::UnexpectedFrame(other.frame_type())),
        }
    }

    fn handle_hello_reply(&mut self, r: HelloReply, now: Instant) {
        if self.link != Link::Greeting {
            return;
        }
        self.link = Link::Up;
        self.rto_base = None;
        self.replica = self.replica.max(r.replica_seq.min(r.durable_seq));
        let fresh = self.numbering == (Numbering::Assign { confirmed: false });
        if r.generation > self.generation {
            if fresh {
                self.numbering = Numbering::Assign { confirmed: true };
            }
            self.need_resync(ResyncReason::StaleGeneration {
                ours: self.generation,
                peer: r.generation,
            });
            self.durable = r.durable_seq;
            self.send_next = r.durable_seq.next();
            if matches!(self.numbering, Numbering::Assign { .. }) {
                self.next_seq = r.durable_seq.next();
            }
            return;
        }
        let peer = r.durable_seq;
        if fresh {
            // Nothing was ever transmitted: renumber what is held after the
            // peer's durable sequence.
            self.numbering = Numbering::Assign { confirmed: true };
            let mut seq = peer;
            for h in &mut self.held {
                seq = seq.next();
                set_seq(&mut h.frame, seq);
            }
            self.next_seq = seq.next();
            self.durable = peer;
            self.send_next = peer.next();
            self.events
                .push_back(SenderEvent::Resumed { durable: peer });
            return;
        }
        let oldest_held = self.held.front().map(|h| seq_of(&h.frame));
        let last = self.last_seq();
        // We hold oldest..=last: the peer must have everything before oldest.
        // A forwarder's peer may be ahead of what it holds (its acks were lost
        // in a restart); an assigning sender's peer never is.
        let resumable = match (self.numbering, oldest_held) {
            (Numbering::Preserve, Some(oldest)) => peer.next() >= oldest,
            (Numbering::Preserve, None) => true,
            (_, Some(oldest)) => peer.next() >= oldest && peer <= last,
            (_, None) => peer <= last,
        };
        if !resumable {
            self.need_resync(ResyncReason::CannotResume {
                peer_durable: peer,
                oldest_held: oldest_held.unwrap_or(Seq::ZERO),
            });
            self.durable = peer;
            self.send_next = peer.next();
            if matches!(self.numbering, Numbering::Assign { .. }) {
                self.next_seq = peer.next();
            }
            return;
        }
        self.forget_through(peer, now);
        self.durable = self.durable.max(peer);
        // Go back: the previous connection may have lost anything after `peer`.
        self.send_next = peer.next();
        if self.numbering == Numbering::Preserve {
            self.next_seq = self.next_seq.max(peer.next());
        }
        self.rto_base = None;
        self.events
            .push_back(SenderEvent::Resumed { durable: peer });
    }

    fn handle_ack(&mut self, a: Ack, now: Instant) -> Result<(), SenderError> {
        if self.link != Link::Up {
            return Ok(());
        }
        // The replica is never ahead of what the peer holds durable.
        self.replica = self.replica.max(a.replica_seq.min(a.durable_seq));
        if a.durable_seq <= self.durable {
            return Ok(());
        }
        let sent = Seq(self.send_next.0.saturating_sub(1));
        let last = self.last_seq();
        if a.durable_seq > last {
            return Err(SenderError::AckBeyondSent {
                acked: a.durable_seq,
                sent,
            });
        }
        self.forget_through(a.durable_seq, now);
        self.durable = a.durable_seq;
        // An ack beyond what this link sent covers retransmissions of frames a
        // previous link delivered; skip past them.
        self.send_next = self.send_next.max(a.durable_seq.next());
        self.events.push_back(SenderEvent::Acked {
            durable: a.durable_seq,
        });
        Ok(())
    }

    fn handle_nack(&mut self, n: Nack) {
        // Nacks of frames from an older generation are leftovers of what a
        // resync already replaced.
        let stale_nack = n.generation != self.generation
            && !matches!(n.reason, RejectReason::StaleGeneration { .. });
        if self.link != Link::Up || stale_nack {
            return;
        }
        match n.reason {
            RejectReason::Gap { expected } => {
                // Something in flight was lost: go back to what the peer wants.
                if expected > self.durable && expected < self.send_next {
                    self.send_next = expected;
                    self.rto_base = None;
                }
            }
            RejectReason::StaleGeneration { current } => {
                if current > self.generation {
                    self.need_resync(ResyncReason::StaleGeneration {
                        ours: self.generation,
                        peer: current,
                    });
                }
            }
            reason @ (RejectReason::HashMismatch { .. }
            | RejectReason::BadPayload { .. }
            | RejectReason::OutOfRange { .. }) => {
                if n.seq > self.durable && n.seq <= self.last_seq() {
                    self.need_resync(ResyncReason::Rejected { seq: n.seq, reason });
                }
            }
        }
    }

    fn need_resync(&mut self, reason: ResyncReason) {
        self.resync_needed = true;
        self.held.clear();
        self.held_bytes = 0;
        self.events.push_back(SenderEvent::ResyncNeeded(reason));
    }

    /// Starts a new generation after a resync decision: frames still held are
    /// dropped (the resync covers their extents), numbering continues after
    /// the peer's durable sequence.
    pub fn start_generation(&mut self, generation: Generation) {
        self.generation = self.generation.max(generation);
        self.held.clear();
        self.held_bytes = 0;
        self.resync_needed = false;
        if matches!(self.numbering, Numbering::Assign { .. }) {
            self.next_seq = self.durable.next();
        }
        self.send_next = self.durable.next();
        self.rto_base = None;
    }

    fn forget_through(&mut self, seq: Seq, now: Instant) {
        let mut progressed = false;
        while let Some(h) = self.held.front() {
            if seq_of(&h.frame) > seq {
                break;
            }
            self.held_bytes -= h.len;
            self.held.pop_front();
            progressed = true;
        }
        if progressed {
            self.rto_base = if self.send_next > seq.next() {
                Some(now)
            } else {
                None
            };
        }
    }

    /// The next frame to send to the peer, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Frame> {
        match self.link {
            Link::Down => None,
            Link::Greeting => {
                if !self.hello_queued {
                    return None;
                }
                self.hello_queued = false;
                // On a lossy link the hello or its reply may vanish: ask again.
                self.rto_base = Some(now);
                let confirmed = self.numbering != Numbering::Assign { confirmed: false };
                Some(Frame::Hello(Hello {
                    agent: self.agent.clone(),
                    disk: self.disk,
                    disk_size: self.disk_size,
                    generation: self.generation,
                    oldest_held: match (confirmed, self.held.front()) {
                        (true, Some(h)) => seq_of(&h.frame),
                        _ => Seq::ZERO,
                    },
                    next_seq: if confirmed { self.next_seq } else { Seq::ZERO },
                }))
            }
            Link::Up => {
                if self.resync_needed {
                    return None;
                }
                let first = seq_of(&self.held.front()?.frame);
                let idx = self.send_next.0.checked_sub(first.0)?;
                let h = self.held.get(usize::try_from(idx).ok()?)?;
                self.send_next = self.send_next.next();
                if self.rto_base.is_none() {
                    self.rto_base = Some(now);
                }
                Some(h.frame.clone())
            }
        }
    }

    /// When [`DiskSender::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let rto = self.cfg.retransmit_after?;
        if self.link == Link::Down {
            return None;
        }
        self.rto_base.map(|t| t + rto)
    }

    /// Time passed: resend everything unacked if the peer stayed silent.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.poll_timeout()
            && now >= deadline
        {
            if self.link == Link::Greeting {
                self.hello_queued = true;
            } else {
                self.send_next = self.durable.next();
            }
            self.rto_base = None;
        }
    }

    /// Next event for the shell.
    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }
}

/// (disk, generation, seq) of a batch or barrier.
pub fn sequenced(frame: &Frame) -> Option<(DiskId, Generation, Seq)> {
    match frame {
        Frame::Batch(b) => Some((b.disk, b.generation, b.seq)),
        Frame::Barrier(b) => Some((b.disk, b.generation, b.seq)),
        _ => None,
    }
}

fn seq_of(frame: &Frame) -> Seq {
    sequenced(frame).map_or(Seq::ZERO, |(_, _, s)| s)
}

fn set_seq(frame: &mut Frame, seq: Seq) {
    match frame {
        Frame::Batch(b) => b.seq = seq,
        Frame::Barrier(b) => b.seq = seq,
        _ => {}
    }
}

#[cfg(test)]
mod tests;
