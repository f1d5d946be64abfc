//! Sans-IO core of blockferry: the wire format, extent sets and the replication
//! state machines shared by agent, relay and target. Nothing here does I/O.

pub mod apply;
pub mod chunk;
pub mod extent;
pub mod frame;
pub mod generation;
pub mod hashtree;
pub mod ids;
pub mod receiver;
pub mod relay;
pub mod sender;

pub use apply::DurableApply;
pub use chunk::{ChunkError, PlainData, build_chunk, verify_chunk};
pub use frame::{
    Ack, Barrier, ByteRange, Chunk, Consistency, DecodeError, EncodeError, Encoding, ErrorCode,
    ErrorFrame, ExtentBatch, Frame, FrameType, HashRangeReply, HashRangeRequest, Hello, HelloReply,
    Nack, RangeDigest, RejectReason,
};
pub use generation::{
    Comparison, CopyRole, DecodeGenerationError, GenerationEntry, GenerationError, GenerationId,
    GenerationRecord, SyncMode,
};
pub use ids::{DiskId, Generation, Seq, SeqOrder, seq_order};
pub use receiver::{DiskReceiver, ReceiveError, ReceiverConfig, check_batch};
pub use relay::{RelayDisk, RelayEvent, RelayRestore, SpoolCursor};
pub use sender::{DiskSender, PushError, ResyncReason, SenderConfig, SenderEvent};
