//! The one error type of the target writer. Every variant names the disk, file
//! and offset a person needs to act on it; `NoSpace` is separate so callers can
//! stop acking and retry once space frees, instead of treating it as corruption.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Renders an optional file offset as " at offset N" (or nothing).
#[derive(Debug, Clone, Copy)]
pub struct At(pub Option<u64>);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(off) => write!(f, " at offset {off}"),
            None => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "batch {seq} of disk {disk}: blake3 of the chunk at offset {offset} does not match, the whole batch was rejected and nothing written"
    )]
    HashMismatch { disk: String, seq: u64, offset: u64 },
    #[error(
        "batch {seq} of disk {disk}: zstd chunk at offset {offset} does not decode to {len} bytes: {reason}"
    )]
    Decompress {
        disk: String,
        seq: u64,
        offset: u64,
        len: u32,
        reason: String,
    },
    #[error(
        "disk {disk}: range at offset {offset} length {len} lies beyond the disk end ({size} bytes)"
    )]
    OutOfRange {
        disk: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("batch {seq} of disk {disk}: chunk length {len} exceeds the limit of {limit} bytes")]
    ChunkTooLarge {
        disk: String,
        seq: u64,
        len: u64,
        limit: u64,
    },
    #[error("batch {seq} of disk {disk}: bad chunk, the whole batch was rejected")]
    BadChunk {
        disk: String,
        seq: u64,
        #[source]
        source: blockferry_proto::ChunkError,
    },
    #[error(
        "disk {disk} generation {generation}: got batch {got}, expected {expected}; a batch is missing, resend from {expected}"
    )]
    Gap {
        disk: String,
        generation: u64,
        got: u64,
        expected: u64,
    },
    #[error(
        "disk {disk}: batch of generation {got} is older than the replica's generation {current}, dropped"
    )]
    StaleGeneration {
        disk: String,
        got: u64,
        current: u64,
    },
    #[error(
        "disk {disk} generation {generation}: frame {got} reuses a sequence number the replica holds (up to {held}); a new generation continues the count, restart the sender from {held} + 1"
    )]
    ReusedSeq {
        disk: String,
        generation: u64,
        got: u64,
        held: u64,
    },
    #[error("cannot encode the disk state for {path}: {reason}; nothing was written")]
    EncodeState { path: PathBuf, reason: String },
    #[error("batch for disk {got} was sent to the replica of disk {disk}")]
    WrongDisk { disk: String, got: String },
    #[error(
        "no space left on the device holding {path}{at}: free space under the store, then retry"
    )]
    NoSpace { path: PathBuf, at: At },
    #[error("i/o error on {path}{at}")]
    Io {
        path: PathBuf,
        at: At,
        #[source]
        source: io::Error,
    },
    #[error("{path} is damaged{at}: {reason}")]
    Corrupt {
        path: PathBuf,
        at: At,
        reason: String,
    },
    #[error("disk {disk} has no recovery point {point}; list them with `blockferry-target points`")]
    NoSuchPoint { disk: String, point: u64 },
    #[error(
        "disk {disk} is already promoted (lineage {lineage}): it is the source now, nothing to do"
    )]
    AlreadyPromoted { disk: String, lineage: String },
    #[error("disk {disk}: {source}")]
    Generation {
        disk: String,
        #[source]
        source: blockferry_proto::GenerationError,
    },
    #[error("the store {path} is in use by another blockferry-target process")]
    Locked { path: PathBuf },
    #[error(
        "no replica of disk {disk} under {path}; it is created when the disk is first protected"
    )]
    NoDisk { disk: String, path: PathBuf },
    #[error("a replica of disk {disk} already exists under {path}")]
    Exists { disk: String, path: PathBuf },
    #[error("invalid disk id {disk:?}: use letters, digits, '-', '_' and '.' only")]
    BadDiskId { disk: String },
    #[error("disk size {size} is not a positive multiple of 512 bytes")]
    BadSize { size: u64 },
    #[error(
        "disk {disk} shrank from {size} to {new_size} bytes; a replica never shrinks (that would destroy its data past the new end): grow the disk back to {size} bytes, or protect it as a new disk"
    )]
    Shrink {
        disk: String,
        size: u64,
        new_size: u64,
    },
    #[error(
        "the store of disk {disk} stopped after a failed write or sync; reopen it so the journal is replayed"
    )]
    Poisoned { disk: String },
    #[error("export stopped: the service is shutting down or its client went away")]
    Cancelled,
    #[error(transparent)]
    Vmdk(#[from] crate::vmdk::VmdkError),
    #[error(
        "point {point} of disk {disk} was cut while the replica was incomplete (initial sync or resync) and may not restore: {}",
        match latest_complete {
            Some(p) => format!("use point {p}, the newest one that is complete, or pass --force"),
            None => "no point of this disk is complete yet; wait for the sync to finish, or pass --force".to_string(),
        }
    )]
    IncompletePoint {
        disk: String,
        point: u64,
        latest_complete: Option<u64>,
    },
    #[error(
        "the seed {path} is in use (mounted, or held open exclusively): unmount it and stop whatever holds it, then retry"
    )]
    SeedBusy { path: PathBuf },
    #[error(
        "the seed's file {path} is attached as {device}: detach it (`losetup -d {device}`) so nothing mounts it while it is replicated into, then retry"
    )]
    SeedAttached { path: PathBuf, device: PathBuf },
    #[error("{path} cannot be taken as a seed: {reason}")]
    NotASeed { path: PathBuf, reason: String },
    #[error(
        "the source is {new_size} bytes, larger than the seed {path} ({size} bytes): a seed cannot grow; grow the seed to {new_size} bytes and run reprotect again, or reprotect onto a seed of the source's size"
    )]
    SeedCannotGrow {
        path: PathBuf,
        size: u64,
        new_size: u64,
    },
    #[error("cannot use the generation record {path}: {reason}")]
    RecordFile { path: PathBuf, reason: String },
    #[error(
        "the source record {path} is a {role}'s record: pass the record of the copy the workload runs on (the promoted replica's generation.rec, or the agent's STATE/DISK.generation)"
    )]
    NotASourceRecord { path: PathBuf, role: String },
    #[error(
        "{report}. reprotect keeps the source's changes: rerun with --discard-changes-of seed to discard the seed's changes since the common point (then only the chunks that differ travel); to keep the seed's changes instead, fail over to the seed rather than reprotecting onto it"
    )]
    SplitBrain { disk: String, report: String },
    #[error(
        "the seed of disk {disk} and the source have no generation in common ({why}): nothing proves what the seed holds; rerun with --allow-unrelated to compare the whole disk by checksum (full)"
    )]
    Unrelated { disk: String, why: String },
    #[error(
        "the seed of disk {disk} is ahead of the source ({comparison}): it holds data the source lacks; fail over to the seed instead, or pass the source's newest record"
    )]
    SeedAhead { disk: String, comparison: String },
    #[error("the store {path} of disk {disk} {reason}")]
    StoreInTheWay {
        disk: String,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "the store {path} is held by another process (blockferry-target serve?): stop serve, or run reprotect before the agent connects, then run it again"
    )]
    ReprotectLocked { path: PathBuf },
    #[error("disk {disk} cannot fail over in place: {reason}")]
    NotInPlace { disk: String, reason: String },
    #[error("{what} is not supported yet: {hint}")]
    Unsupported { what: String, hint: String },
    #[error(
        "refusing to export to {out}: it is inside the store {store} (or is the replica itself), which the export would overwrite; choose an output outside the store"
    )]
    ExportIntoStore { out: PathBuf, store: PathBuf },
    #[error(transparent)]
    Failover(#[from] crate::failover::FailoverError),
}

impl TargetError {
    /// Wraps an I/O error with its path and offset, turning ENOSPC/EDQUOT into
    /// `NoSpace` so callers can treat a full disk as "retry later".
    pub fn io(path: impl Into<PathBuf>, offset: Option<u64>, source: io::Error) -> Self {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => TargetError::NoSpace {
                path,
                at: At(offset),
            },
            _ => TargetError::Io {
                path,
                at: At(offset),
                source,
            },
        }
    }

    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        offset: Option<u64>,
        reason: impl Into<String>,
    ) -> Self {
        TargetError::Corrupt {
            path: path.into(),
            at: At(offset),
            reason: reason.into(),
        }
    }

    /// True when the error means "the device under the store is full".
    pub fn is_no_space(&self) -> bool {
        matches!(self, TargetError::NoSpace { .. })
    }
}

pub type Result<T, E = TargetError> = std::result::Result<T, E>;
