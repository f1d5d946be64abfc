//! The wire format: versioned, length-prefixed frames with explicit limits.
//!
//! Every frame is an 8-byte header followed by a payload:
//!
//! ```text
//! magic "BF" (2) | version u8 | type u8 | payload length u32 (big endian) | payload
//! ```
//!
//! All integers are big endian. The decoder checks the header before waiting
//! for the payload, so an oversized frame is refused as soon as its header
//! arrives, and it never panics: any input yields a frame, "need more bytes",
//! or a typed [`DecodeError`] that maps to an [`ErrorCode`] for the peer.
//!
//! Why one file of about a thousand lines: it has one job, the byte layout,
//! and each frame's type, encoder and decoder stand next to each other so a
//! field added to one cannot be missed in the other two (the fuzz target and
//! the round-trip proptests check the pair, this layout lets a reader do it).

use bytes::{BufMut, Bytes, BytesMut};

use crate::ids::{DiskId, Generation, Seq};

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u8 = 1;
/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"BF";
/// Length of the frame header.
pub const HEADER_LEN: usize = 8;
/// Largest plain (uncompressed) length of one chunk.
pub const MAX_CHUNK_LEN: u32 = 1 << 20;
/// Largest zstd payload of one chunk: a chunk that does not shrink is sent raw,
/// so this only leaves room for zstd's framing overhead.
pub const MAX_COMPRESSED_CHUNK_LEN: u32 = MAX_CHUNK_LEN + 4096;
/// Chunk payload bytes a batch may carry: a batch of at most
/// [`MAX_CHUNKS_PER_BATCH`] chunks whose payloads sum to at most this always
/// fits in a frame.
pub const MAX_BATCH_DATA: usize = 16 << 20;
/// Largest payload of one frame: [`MAX_BATCH_DATA`] plus room for the headers
/// of [`MAX_CHUNKS_PER_BATCH`] chunks.
pub const MAX_PAYLOAD_LEN: usize = MAX_BATCH_DATA + (256 << 10);
/// Largest frame, header included.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_PAYLOAD_LEN;
/// Most chunks in one batch (all-zero chunks carry no payload, so the frame
/// length alone would not bound the count).
pub const MAX_CHUNKS_PER_BATCH: usize = 4096;
/// Most ranges in one hash-range request or reply.
pub const MAX_HASH_RANGES: usize = 65_536;
/// Longest agent identity string, in bytes.
pub const MAX_AGENT_NAME_LEN: usize = 255;
/// Longest message of an error frame, in bytes.
pub const MAX_ERROR_MESSAGE_LEN: usize = 4096;

/// Size of the fixed part of a chunk on the wire (without its payload).
pub const CHUNK_HEADER_LEN: usize = 8 + 4 + 32 + 1 + 4;
/// Size of a batch's fields before its chunks.
const BATCH_HEADER_LEN: usize = 16 + 8 + 8 + 4;

const _: () = assert!(
    BATCH_HEADER_LEN + MAX_CHUNKS_PER_BATCH * CHUNK_HEADER_LEN + MAX_BATCH_DATA <= MAX_PAYLOAD_LEN
);

/// Frame type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Hello = 1,
    HelloReply = 2,
    Batch = 3,
    Barrier = 4,
    Ack = 5,
    Nack = 6,
    HashRequest = 7,
    HashReply = 8,
    Error = 9,
}

impl FrameType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => FrameType::Hello,
            2 => FrameType::HelloReply,
            3 => FrameType::Batch,
            4 => FrameType::Barrier,
            5 => FrameType::Ack,
            6 => FrameType::Nack,
            7 => FrameType::HashRequest,
            8 => FrameType::HashReply,
            9 => FrameType::Error,
            _ => return None,
        })
    }
}

/// How a chunk's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Encoding {
    /// The payload is the plain data.
    Raw = 0,
    /// The payload is one zstd frame that decompresses to the plain data.
    Zstd = 1,
    /// The plain data is all zero bytes; the payload is empty.
    Zero = 2,
}

impl Encoding {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Encoding::Raw,
            1 => Encoding::Zstd,
            2 => Encoding::Zero,
            _ => return None,
        })
    }
}

/// What a recovery point may claim about the data up to its barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Consistency {
    /// Blocks may come from different moments: usable only for a later resync.
    NotConsistent = 0,
    /// Proved to be the disk exactly as it was at one moment.
    CrashConsistent = 1,
    /// Taken under a file-system freeze with application hooks.
    AppConsistent = 2,
}

impl Consistency {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Consistency::NotConsistent,
            1 => Consistency::CrashConsistent,
            2 => Consistency::AppConsistent,
            _ => return None,
        })
    }
}

/// Typed error codes carried by [`ErrorFrame`] and used to close connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Malformed frame or a frame that makes no sense in this state.
    Protocol = 1,
    /// The peer speaks another protocol version.
    UnsupportedVersion = 2,
    /// A frame or a chunk exceeds the limits.
    TooLarge = 3,
    /// The peer's identity may not write this disk.
    NotAuthorized = 4,
    /// The disk is not registered at the receiver.
    UnknownDisk = 5,
    /// The sender's generation is older than the receiver's.
    StaleGeneration = 6,
    /// The sender cannot resume from the receiver's durable sequence: resync needed.
    ResumeImpossible = 7,
    /// A sequence number was skipped.
    SequenceGap = 8,
    /// A chunk failed verification (hash or decompression).
    Integrity = 9,
    /// The disk size announced differs from the registered one.
    DiskSizeMismatch = 10,
    /// The receiver is out of space or otherwise cannot accept data now.
    Unavailable = 11,
    /// An internal failure of the receiver.
    Internal = 12,
}

impl ErrorCode {
    /// The code from its wire value.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => ErrorCode::Protocol,
            2 => ErrorCode::UnsupportedVersion,
            3 => ErrorCode::TooLarge,
            4 => ErrorCode::NotAuthorized,
            5 => ErrorCode::UnknownDisk,
            6 => ErrorCode::StaleGeneration,
            7 => ErrorCode::ResumeImpossible,
            8 => ErrorCode::SequenceGap,
            9 => ErrorCode::Integrity,
            10 => ErrorCode::DiskSizeMismatch,
            11 => ErrorCode::Unavailable,
            12 => ErrorCode::Internal,
            _ => return None,
        })
    }

    /// The wire value, also usable as a QUIC application close code.
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

/// One extent of changed data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Byte offset on the disk.
    pub offset: u64,
    /// Plain length in bytes, `1..=MAX_CHUNK_LEN`.
    pub len: u32,
    /// blake3 of the plain data, computed at the source.
    pub hash: [u8; 32],
    /// How `payload` encodes the plain data.
    pub encoding: Encoding,
    /// Raw data, a zstd frame, or empty for [`Encoding::Zero`].
    pub payload: Bytes,
}

impl Chunk {
    /// End offset (exclusive) on the disk. Decoded chunks never overflow.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.len))
    }
}

/// First frame of a disk's stream from sender to receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Identity of the sending agent (the name in its certificate).
    pub agent: String,
    pub disk: DiskId,
    /// Size of the protected disk in bytes.
    pub disk_size: u64,
    pub generation: Generation,
    /// Oldest sequence the sender still holds and can retransmit; `Seq::ZERO`
    /// when it holds nothing.
    pub oldest_held: Seq,
    /// Sequence the sender will assign to its next new frame.
    pub next_seq: Seq,
}

/// The receiver's answer to [`Hello`]: where the sender resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    pub disk: DiskId,
    /// Generation of the last durable frame at the receiver.
    pub generation: Generation,
    /// Everything up to and including this sequence is durable at the receiver.
    pub durable_seq: Seq,
    /// ... and through this one at the replica at the end of the chain.
    pub replica_seq: Seq,
}

/// A batch of changed chunks of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentBatch {
    pub disk: DiskId,
    pub generation: Generation,
    pub seq: Seq,
    pub chunks: Vec<Chunk>,
}

/// End of an epoch: the receiver turns it into a recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Barrier {
    pub disk: DiskId,
    pub generation: Generation,
    /// In the same per-disk sequence space as batches.
    pub seq: Seq,
    pub consistency: Consistency,
    /// Moment the point stands for, nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
}

/// Everything of `disk` up to and including `durable_seq` is durable at the
/// peer, and up to `replica_seq` durable at the replica (the end of the chain:
/// a target acks with both equal; a relay reports what its target has). The
/// agent's RPO counts until a write is durable at the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub disk: DiskId,
    pub generation: Generation,
    pub durable_seq: Seq,
    pub replica_seq: Seq,
}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The chunk at `offset` does not match its blake3 hash.
    HashMismatch { offset: u64 },
    /// The chunk at `offset` does not decode (bad zstd, wrong length).
    BadPayload { offset: u64 },
    /// The chunk at `offset` lies beyond the end of the disk.
    OutOfRange { offset: u64 },
    /// The frame's generation is older than the receiver's `current`.
    StaleGeneration { current: Generation },
    /// The frame skips sequence numbers; the receiver expected `expected`.
    Gap { expected: Seq },
}

impl RejectReason {
    fn to_wire(self) -> (u16, u64) {
        match self {
            RejectReason::HashMismatch { offset } => (1, offset),
            RejectReason::BadPayload { offset } => (2, offset),
            RejectReason::OutOfRange { offset } => (3, offset),
            RejectReason::StaleGeneration { current } => (4, current.0),
            RejectReason::Gap { expected } => (5, expected.0),
        }
    }

    fn from_wire(code: u16, arg: u64) -> Option<Self> {
        Some(match code {
            1 => RejectReason::HashMismatch { offset: arg },
            2 => RejectReason::BadPayload { offset: arg },
            3 => RejectReason::OutOfRange { offset: arg },
            4 => RejectReason::StaleGeneration {
                current: Generation(arg),
            },
            5 => RejectReason::Gap { expected: Seq(arg) },
            _ => return None,
        })
    }
}

/// The frame `seq` of `disk` was refused and not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nack {
    pub disk: DiskId,
    pub generation: Generation,
    pub seq: Seq,
    pub reason: RejectReason,
}

/// A byte range of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

/// Ask the peer for the blake3 digests of `ranges` (checksum resync).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashRangeRequest {
    pub disk: DiskId,
    pub generation: Generation,
    /// Chosen by the requester, echoed in the reply.
    pub request_id: u64,
    pub ranges: Vec<ByteRange>,
}

/// One range and its digest, as defined by the hash tree of the resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeDigest {
    pub range: ByteRange,
    pub digest: [u8; 32],
}

/// The digests asked for by a [`HashRangeRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashRangeReply {
    pub disk: DiskId,
    pub generation: Generation,
    pub request_id: u64,
    pub digests: Vec<RangeDigest>,
}

/// A typed error, sent before closing a stream or connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    /// The disk concerned, if any.
    pub disk: Option<DiskId>,
    /// Human-readable detail, at most [`MAX_ERROR_MESSAGE_LEN`] bytes.
    pub message: String,
}

/// Every frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    HelloReply(HelloReply),
    Batch(ExtentBatch),
    Barrier(Barrier),
    Ack(Ack),
    Nack(Nack),
    HashRequest(HashRangeRequest),
    HashReply(HashRangeReply),
    Error(ErrorFrame),
}

/// Why bytes could not be decoded as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad frame magic {found:02x?}: the peer does not speak the blockferry protocol")]
    BadMagic { found: [u8; 2] },
    #[error(
        "unsupported protocol version {found} (this build speaks {PROTOCOL_VERSION}): upgrade the older side"
    )]
    UnsupportedVersion { found: u8 },
    #[error("unknown frame type {found}")]
    UnknownFrameType { found: u8 },
    #[error("frame payload of {len} bytes exceeds the limit of {MAX_PAYLOAD_LEN}")]
    FrameTooLarge { len: usize },
    #[error("frame truncated while reading {field}")]
    Truncated { field: &'static str },
    #[error("{extra} unexpected bytes after the end of a {frame:?} frame")]
    TrailingBytes { frame: FrameType, extra: usize },
    #[error("chunk at offset {offset} has length {len}, allowed 1..={MAX_CHUNK_LEN}")]
    BadChunkLength { offset: u64, len: u32 },
    #[error("chunk at offset {offset} ends beyond the 64-bit byte range")]
    ChunkOverflow { offset: u64 },
    #[error("chunk at offset {offset} has unknown encoding {found}")]
    UnknownEncoding { offset: u64, found: u8 },
    #[error(
        "chunk at offset {offset} ({encoding:?}, length {len}) has a payload of {payload_len} bytes"
    )]
    BadPayloadLength {
        offset: u64,
        encoding: Encoding,
        len: u32,
        payload_len: u32,
    },
    #[error("{count} {what} exceed the limit of {max}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("{field} of {len} bytes exceeds the limit of {max}")]
    StringTooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("unknown consistency label {found}")]
    UnknownConsistency { found: u8 },
    #[error("unknown error code {found}")]
    UnknownErrorCode { found: u16 },
    #[error("unknown reject reason {found}")]
    UnknownRejectReason { found: u16 },
    #[error("bad {field} flag {found}")]
    BadFlag { field: &'static str, found: u8 },
}

impl DecodeError {
    /// The code to send the peer before closing the connection.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::FrameTooLarge { .. }
            | DecodeError::BadChunkLength { .. }
            | DecodeError::TooMany { .. }
            | DecodeError::StringTooLong { .. } => ErrorCode::TooLarge,
            _ => ErrorCode::Protocol,
        }
    }
}

/// Why a frame could not be encoded. Only frames built by hand can fail:
/// anything the decoder produced encodes again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("frame would not decode at the peer: {0}")]
    Invalid(#[from] DecodeError),
}

impl Frame {
    /// The type byte of this frame.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::HelloReply(_) => FrameType::HelloReply,
            Frame::Batch(_) => FrameType::Batch,
            Frame::Barrier(_) => FrameType::Barrier,
            Frame::Ack(_) => FrameType::Ack,
            Frame::Nack(_) => FrameType::Nack,
            Frame::HashRequest(_) => FrameType::HashRequest,
            Frame::HashReply(_) => FrameType::HashReply,
            Frame::Error(_) => FrameType::Error,
        }
    }

    /// The disk a frame concerns, if any.
    pub fn disk(&self) -> Option<DiskId> {
        match self {
            Frame::Hello(f) => Some(f.disk),
            Frame::HelloReply(f) => Some(f.disk),
            Frame::Batch(f) => Some(f.disk),
            Frame::Barrier(f) => Some(f.disk),
            Frame::Ack(f) => Some(f.disk),
            Frame::Nack(f) => Some(f.disk),
            Frame::HashRequest(f) => Some(f.disk),
            Frame::HashReply(f) => Some(f.disk),
            Frame::Error(f) => f.disk,
        }
    }

    /// Length of the encoded frame, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    fn payload_len(&self) -> usize {
        match self {
            Frame::Hello(f) => 2 + f.agent.len() + 16 + 8 + 8 + 8 + 8,
            Frame::HelloReply(_) => 16 + 8 + 8 + 8,
            Frame::Batch(f) => {
                BATCH_HEADER_LEN
                    + f.chunks
                        .iter()
                        .map(|c| CHUNK_HEADER_LEN + c.payload.len())
                        .sum::<usize>()
            }
            Frame::Barrier(_) => 16 + 8 + 8 + 1 + 8,
            Frame::Ack(_) => 16 + 8 + 8 + 8,
            Frame::Nack(_) => 16 + 8 + 8 + 2 + 8,
            Frame::HashRequest(f) => 16 + 8 + 8 + 4 + f.ranges.len() * 16,
            Frame::HashReply(f) => 16 + 8 + 8 + 4 + f.digests.len() * (16 + 32),
            Frame::Error(f) => 2 + 1 + 16 + 2 + f.message.len(),
        }
    }

    /// Checks the limits the decoder enforces, so that nothing is sent that the
    /// peer would refuse.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let len = self.payload_len();
        if len > MAX_PAYLOAD_LEN {
            return Err(DecodeError::FrameTooLarge { len });
        }
        match self {
            Frame::Hello(f) => check_str_len("agent name", &f.agent, MAX_AGENT_NAME_LEN)?,
            Frame::Batch(f) => {
                check_count("chunks", f.chunks.len(), MAX_CHUNKS_PER_BATCH)?;
                for c in &f.chunks {
                    let payload_len =
                        u32::try_from(c.payload.len()).map_err(|_| DecodeError::FrameTooLarge {
                            len: c.payload.len(),
                        })?;
                    check_chunk(c.offset, c.len, c.encoding, payload_len)?;
                }
            }
            Frame::HashRequest(f) => check_count("hash ranges", f.ranges.len(), MAX_HASH_RANGES)?,
            Frame::HashReply(f) => {
                check_count("hash digests", f.digests.len(), MAX_HASH_RANGES)?;
            }
            Frame::Error(f) => {
                check_str_len("error message", &f.message, MAX_ERROR_MESSAGE_LEN)?;
            }
            Frame::HelloReply(_) | Frame::Barrier(_) | Frame::Ack(_) | Frame::Nack(_) => {}
        }
        Ok(())
    }

    /// Appends the encoded frame to `buf` after checking it against the limits.
    pub fn encode(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        self.validate()?;
        let payload_len = self.payload_len();
        buf.reserve(HEADER_LEN + payload_len);
        buf.put_slice(&MAGIC);
        buf.put_u8(PROTOCOL_VERSION);
        buf.put_u8(self.frame_type() as u8);
        // validate() bounded the payload to MAX_PAYLOAD_LEN, which fits in u32.
        buf.put_u32(payload_len as u32);
        let start = buf.len();
        match self {
            Frame::Hello(f) => {
                buf.put_u16(f.agent.len() as u16);
                buf.put_slice(f.agent.as_bytes());
                buf.put_slice(f.disk.as_bytes());
                buf.put_u64(f.disk_size);
                buf.put_u64(f.generation.0);
                buf.put_u64(f.oldest_held.0);
                buf.put_u64(f.next_seq.0);
            }
            Frame::HelloReply(f) => {
                buf.put_slice(f.disk.as_bytes());
                buf.put_u64(f.generation.0);
                buf.put_u64(f.durable_seq.0);
                buf.put_u64(f.replica_seq.0);
            }
            Frame::Batch(f) => {
                buf.put_slice(f.disk.as_bytes());
                buf.put_u64(f.generation.0);
                buf.put_u64(f.seq.0);
                buf.put_u32(f.chunks.len() as u32);
                for c in &f.chunks {
                    buf.put_u64(c.offset);
                    buf.put_u32(c.len);
                    buf.put_slice(&c.hash);
                    buf.put_u8(c.encoding as u8);
                    buf.put_u32(c.payload.len() as u32);
                    buf.put_slice(&c.payload);
                }
            }
            Frame::Barrier(f) => {
                buf.put_slice(f.disk.as_bytes());
                buf.put_u64(f.generation.0);
                buf.put_u64(f.seq.0);
                buf.put_u8(f.consistency as u8);
                buf.put_u64(f.timestamp_ns);
            }
            Frame::Ack(f) => {
                buf.put_slice(f.disk.as_bytes());
                buf.put_u64(f.generation.0);
                buf.put_u64(f.durable_seq.0);
                buf.put_u64(f.replica_seq.0);
            }
            Frame::Nack(f) => {
                buf.put_slice(f.disk.as_bytes());
                buf.put_u64(f.generation.0);
                buf.put_u64(f.seq.0);
                let (code, arg) = f.reason.to_wire();
                buf.put_u16(code);
                buf.put_u64(arg);
            }
            Frame::HashRequest(f) => {
                buf.put_slice(f.disk.as_bytes());
                buf.put_u64(f.generation.0);
                buf.put_u64(f.request_id);
                buf.put_u32(f.ranges.len() as u32);
                for r in &f.ranges {
                    buf.put_u64(r.offset);
                    buf.put_u64(r.len);
                }
            }
            Frame::HashReply(f) => {
                buf.put_slice(f.disk.as_bytes());
                buf.put_u64(f.generation.0);
                buf.put_u64(f.request_id);
                buf.put_u32(f.digests.len() as u32);
                for d in &f.digests {
                    buf.put_u64(d.range.offset);
                    buf.put_u64(d.range.len);
                    buf.put_slice(&d.digest);
                }
            }
            Frame::Error(f) => {
                buf.put_u16(f.code.as_u16());
                match f.disk {
                    Some(d) => {
                        buf.put_u8(1);
                        buf.put_slice(d.as_bytes());
                    }
                    None => {
                        buf.put_u8(0);
                        buf.put_slice(&[0; 16]);
                    }
                }
                buf.put_u16(f.message.len() as u16);
                buf.put_slice(f.message.as_bytes());
            }
        }
        debug_assert_eq!(buf.len() - start, payload_len);
        Ok(())
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut buf)?;
        Ok(buf.freeze())
    }

    /// Decodes one frame from the front of `buf`.
    ///
    /// `Ok(None)`: not enough bytes yet (a valid header has been seen, or fewer
    /// than [`HEADER_LEN`] bytes are there). `Ok(Some((frame, n)))`: `n` bytes
    /// were consumed. Chunk payloads are copied out of `buf`; use
    /// [`Frame::decode_buf`] to share them with the receive buffer instead.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
        let Some((ty, len)) = peek_header(buf)? else {
            return Ok(None);
        };
        let total = HEADER_LEN + len;
        if buf.len() < total {
            return Ok(None);
        }
        let payload = Bytes::copy_from_slice(&buf[HEADER_LEN..total]);
        Ok(Some((decode_payload(ty, payload)?, total)))
    }

    /// Decodes one frame from the front of `buf` and splits it off, without
    /// copying chunk payloads. `Ok(None)` leaves `buf` untouched.
    pub fn decode_buf(buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some((ty, len)) = peek_header(buf)? else {
            return Ok(None);
        };
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let mut frame = buf.split_to(HEADER_LEN + len);
        let payload = frame.split_off(HEADER_LEN).freeze();
        decode_payload(ty, payload).map(Some)
    }

    /// Decodes a buffer holding exactly one frame (for example a spool record).
    pub fn decode_exact(buf: Bytes) -> Result<Frame, DecodeError> {
        let Some((ty, len)) = peek_header(&buf)? else {
            return Err(DecodeError::Truncated { field: "frame" });
        };
        if buf.len() < HEADER_LEN + len {
            return Err(DecodeError::Truncated { field: "frame" });
        }
        if buf.len() > HEADER_LEN + len {
            return Err(DecodeError::TrailingBytes {
                frame: ty,
                extra: buf.len() - HEADER_LEN - len,
            });
        }
        decode_payload(ty, buf.slice(HEADER_LEN..))
    }
}

/// Checks the header at the front of `buf`: `Ok(None)` if fewer than
/// [`HEADER_LEN`] bytes, else the frame type and payload length. Exposed for
/// shells that want to size a read before the whole frame is there.
pub fn peek_header(buf: &[u8]) -> Result<Option<(FrameType, usize)>, DecodeError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        // Refuse garbage early even before a whole header is there.
        if let Some(&[a, b]) = buf.get(..2)
            && [a, b] != MAGIC
        {
            return Err(DecodeError::BadMagic { found: [a, b] });
        }
        return Ok(None);
    };
    if h[..2] != MAGIC {
        return Err(DecodeError::BadMagic {
            found: [h[0], h[1]],
        });
    }
    if h[2] != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: h[2] });
    }
    let ty = FrameType::from_u8(h[3]).ok_or(DecodeError::UnknownFrameType { found: h[3] })?;
    let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > MAX_PAYLOAD_LEN {
        return Err(DecodeError::FrameTooLarge { len });
    }
    Ok(Some((ty, len)))
}

fn check_str_len(field: &'static str, s: &str, max: usize) -> Result<(), DecodeError> {
    if s.len() > max {
        return Err(DecodeError::StringTooLong {
            field,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

fn check_count(what: &'static str, count: usize, max: usize) -> Result<(), DecodeError> {
    if count > max {
        return Err(DecodeError::TooMany { what, count, max });
    }
    Ok(())
}

fn check_chunk(
    offset: u64,
    len: u32,
    encoding: Encoding,
    payload_len: u32,
) -> Result<(), DecodeError> {
    if len == 0 || len > MAX_CHUNK_LEN {
        return Err(DecodeError::BadChunkLength { offset, len });
    }
    if offset.checked_add(u64::from(len)).is_none() {
        return Err(DecodeError::ChunkOverflow { offset });
    }
    let ok = match encoding {
        Encoding::Raw => payload_len == len,
        Encoding::Zstd => payload_len > 0 && payload_len <= MAX_COMPRESSED_CHUNK_LEN,
        Encoding::Zero => payload_len == 0,
    };
    if !ok {
        return Err(DecodeError::BadPayloadLength {
            offset,
            encoding,
            len,
            payload_len,
        });
    }
    Ok(())
}

/// Bounds-checked big-endian reader over a payload; every read is fallible.
struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&[u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(DecodeError::Truncated { field })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn take_bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, field)?;
        Ok(self.buf.slice(start..self.pos))
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    fn disk(&mut self) -> Result<DiskId, DecodeError> {
        Ok(DiskId(self.array("disk id")?))
    }

    fn string(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(DecodeError::StringTooLong { field, len, max });
        }
        let raw = self.take(len, field)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { field })
    }

    /// Reads an element count and checks it against both the limit and the
    /// bytes left, so a forged count cannot make us allocate.
    fn count(
        &mut self,
        what: &'static str,
        max: usize,
        min_elem_len: usize,
    ) -> Result<usize, DecodeError> {
        let count = self.u32(what)? as usize;
        check_count(what, count, max)?;
        if count.saturating_mul(min_elem_len) > self.buf.len() - self.pos {
            return Err(DecodeError::Truncated { field: what });
        }
        Ok(count)
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

fn decode_payload(ty: FrameType, payload: Bytes) -> Result<Frame, DecodeError> {
    let mut r = Reader {
        buf: payload,
        pos: 0,
    };
    let frame = match ty {
        FrameType::Hello => Frame::Hello(Hello {
            agent: r.string("agent name", MAX_AGENT_NAME_LEN)?,
            disk: r.disk()?,
            disk_size: r.u64("disk size")?,
            generation: Generation(r.u64("generation")?),
            oldest_held: Seq(r.u64("oldest held sequence")?),
            next_seq: Seq(r.u64("next sequence")?),
        }),
        FrameType::HelloReply => Frame::HelloReply(HelloReply {
            disk: r.disk()?,
            generation: Generation(r.u64("generation")?),
            durable_seq: Seq(r.u64("durable sequence")?),
            replica_seq: Seq(r.u64("replica sequence")?),
        }),
        FrameType::Batch => {
            let disk = r.disk()?;
            let generation = Generation(r.u64("generation")?);
            let seq = Seq(r.u64("sequence")?);
            let n = r.count("chunks", MAX_CHUNKS_PER_BATCH, CHUNK_HEADER_LEN)?;
            let mut chunks = Vec::with_capacity(n);
            for _ in 0..n {
                let offset = r.u64("chunk offset")?;
                let len = r.u32("chunk length")?;
                let hash = r.array("chunk hash")?;
                let enc = r.u8("chunk encoding")?;
                let encoding = Encoding::from_u8(enc)
                    .ok_or(DecodeError::UnknownEncoding { offset, found: enc })?;
                let payload_len = r.u32("chunk payload length")?;
                check_chunk(offset, len, encoding, payload_len)?;
                let payload = r.take_bytes(payload_len as usize, "chunk payload")?;
                chunks.push(Chunk {
                    offset,
                    len,
                    hash,
                    encoding,
                    payload,
                });
            }
            Frame::Batch(ExtentBatch {
                disk,
                generation,
                seq,
                chunks,
            })
        }
        FrameType::Barrier => Frame::Barrier(Barrier {
            disk: r.disk()?,
            generation: Generation(r.u64("generation")?),
            seq: Seq(r.u64("sequence")?),
            consistency: {
                let v = r.u8("consistency")?;
                Consistency::from_u8(v).ok_or(DecodeError::UnknownConsistency { found: v })?
            },
            timestamp_ns: r.u64("timestamp")?,
        }),
        FrameType::Ack => Frame::Ack(Ack {
            disk: r.disk()?,
            generation: Generation(r.u64("generation")?),
            durable_seq: Seq(r.u64("durable sequence")?),
            replica_seq: Seq(r.u64("replica sequence")?),
        }),
        FrameType::Nack => {
            let disk = r.disk()?;
            let generation = Generation(r.u64("generation")?);
            let seq = Seq(r.u64("sequence")?);
            let code = r.u16("reject reason")?;
            let arg = r.u64("reject detail")?;
            let reason = RejectReason::from_wire(code, arg)
                .ok_or(DecodeError::UnknownRejectReason { found: code })?;
            Frame::Nack(Nack {
                disk,
                generation,
                seq,
                reason,
            })
        }
        FrameType::HashRequest => {
            let disk = r.disk()?;
            let generation = Generation(r.u64("generation")?);
            let request_id = r.u64("request id")?;
            let n = r.count("hash ranges", MAX_HASH_RANGES, 16)?;
            let mut ranges = Vec::with_capacity(n);
            for _ in 0..n {
                ranges.push(ByteRange {
                    offset: r.u64("range offset")?,
                    len: r.u64("range length")?,
                });
            }
            Frame::HashRequest(HashRangeRequest {
                disk,
                generation,
                request_id,
                ranges,
            })
        }
        FrameType::HashReply => {
            let disk = r.disk()?;
            let generation = Generation(r.u64("generation")?);
            let request_id = r.u64("request id")?;
            let n = r.count("hash digests", MAX_HASH_RANGES, 48)?;
            let mut digests = Vec::with_capacity(n);
            for _ in 0..n {
                digests.push(RangeDigest {
                    range: ByteRange {
                        offset: r.u64("range offset")?,
                        len: r.u64("range length")?,
                    },
                    digest: r.array("range digest")?,
                });
            }
            Frame::HashReply(HashRangeReply {
                disk,
                generation,
                request_id,
                digests,
            })
        }
        FrameType::Error => {
            let raw = r.u16("error code")?;
            let code =
                ErrorCode::from_u16(raw).ok_or(DecodeError::UnknownErrorCode { found: raw })?;
            let has_disk = r.u8("disk flag")?;
            let disk = r.disk()?;
            let disk = match has_disk {
                // Zero id bytes when absent keep the encoding canonical.
                0 if disk == DiskId::default() => None,
                1 => Some(disk),
                found => {
                    return Err(DecodeError::BadFlag {
                        field: "disk",
                        found,
                    });
                }
            };
            let message = r.string("error message", MAX_ERROR_MESSAGE_LEN)?;
            Frame::Error(ErrorFrame {
                code,
                disk,
                message,
            })
        }
    };
    if r.remaining() != 0 {
        return Err(DecodeError::TrailingBytes {
            frame: ty,
            extra: r.remaining(),
        });
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack() -> Frame {
        Frame::Ack(Ack {
            disk: DiskId([7; 16]),
            generation: Generation(3),
            durable_seq: Seq(42),
            replica_seq: Seq(40),
        })
    }

    #[test]
    fn decode_waits_for_whole_frame() {
        let bytes = ack().to_bytes().unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(Frame::decode(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(Frame::decode(&bytes), Ok(Some((ack(), bytes.len()))));
    }

    #[test]
    fn oversized_header_is_refused_before_payload_arrives() {
        let mut h = Vec::from(MAGIC);
        h.push(PROTOCOL_VERSION);
        h.push(FrameType::Batch as u8);
        h.extend_from_slice(&((MAX_PAYLOAD_LEN as u32) + 1).to_be_bytes());
        let err = Frame::decode(&h).unwrap_err();
        assert!(matches!(err, DecodeError::FrameTooLarge { .. }));
        assert_eq!(err.code(), ErrorCode::TooLarge);
    }

    #[test]
    fn wrong_version_maps_to_its_code() {
        let mut bytes = ack().to_bytes().unwrap().to_vec();
        bytes[2] = PROTOCOL_VERSION + 1;
        let err = Frame::decode(&bytes).unwrap_err();
        assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
    }

    #[test]
    fn decode_buf_splits_consecutive_frames() {
        let mut buf = BytesMut::new();
        ack().encode(&mut buf).unwrap();
        ack().encode(&mut buf).unwrap();
        buf.extend_from_slice(&MAGIC);
        assert_eq!(Frame::decode_buf(&mut buf), Ok(Some(ack())));
        assert_eq!(Frame::decode_buf(&mut buf), Ok(Some(ack())));
        assert_eq!(Frame::decode_buf(&mut buf), Ok(None));
        assert_eq!(buf.len(), 2);
    }

    #[test]
    fn raw_chunk_with_wrong_payload_length_is_not_encoded() {
        let f = Frame::Batch(ExtentBatch {
            disk: DiskId::default(),
            generation: Generation(1),
            seq: Seq(1),
            chunks: vec![Chunk {
                offset: 0,
                len: 4096,
                hash: [0; 32],
                encoding: Encoding::Raw,
                payload: Bytes::from_static(b"short"),
            }],
        });
        assert!(f.to_bytes().is_err());
    }

    #[test]
    fn forged_chunk_count_does_not_allocate() {
        let mut buf = BytesMut::new();
        buf.put_slice(&MAGIC);
        buf.put_u8(PROTOCOL_VERSION);
        buf.put_u8(FrameType::Batch as u8);
        buf.put_u32(16 + 8 + 8 + 4);
        buf.put_slice(&[0; 16]);
        buf.put_u64(1);
        buf.put_u64(1);
        buf.put_u32(MAX_CHUNKS_PER_BATCH as u32);
        assert!(matches!(
            Frame::decode(&buf),
            Err(DecodeError::Truncated { .. })
        ));
    }
}
