//! The agent's reader: turns byte ranges of a protected device into chunks
//! ready for the wire.
//!
//! Pipeline, with memory bounded by a fixed buffer pool:
//!
//! ```text
//! submit(range) ──► io_uring thread ──► worker pool ──► sequencer ──► events
//!                   O_DIRECT READ_FIXED  blake3 + zstd    restores order
//!                   into registered      (or zero marker)
//!                   buffers
//! ```
//!
//! * Chunks are the protocol's [`Chunk`]: blake3 of the plain data, then a
//!   zero marker, zstd (when it saves at least 1/16), or the raw bytes. In
//!   hash-only mode (checksum resync) non-zero chunks are `Raw` with an empty
//!   payload.
//! * [`ReadHandle::submit`] widens a range to the chunk grid (`chunk_size`,
//!   64 KiB by default), for initial sync and resync, whose chunks are the
//!   hash tree's leaves; the last chunk of the device may be short.
//!   [`ReadHandle::submit_fine`], for tracked writes, widens only to 4 KiB
//!   and cuts the range at grid boundaries: a 4 KiB write costs a 4 KiB
//!   read, hash and send, and no chunk spans two leaves of the grid.
//! * **Order**: chunks come out in the order the ranges were submitted, and by
//!   ascending offset within a range; after the last chunk of a range comes
//!   [`ReaderEvent::RangeDone`]. A range is complete for the caller (the
//!   tracker may mark it clean) only at that event, and only if it says `ok`.
//! * A chunk that cannot be read yields [`ReaderEvent::ChunkFailed`] in its
//!   place, never silence: a dropped extent would be data loss.
//! * A buffer is reused only after its chunk has been emitted, so at most
//!   `queue_depth + 2 * workers + 2` chunks (plus their encoded copies in the
//!   bounded output channel) are in memory at any time.

mod encode;
mod pipeline;
mod uring;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub use blockferry_proto::frame::{Chunk, Encoding};
pub use pipeline::{ReadHandle, ReaderEvents, spawn};
pub use uring::evict_page_cache;

/// Default chunk size: 64 KiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

/// Identifies a submitted range in the events.
pub type RangeId = u64;

/// What the reader produces, in order (see the module docs).
#[derive(Debug)]
pub enum ReaderEvent {
    Chunk {
        range: RangeId,
        chunk: Chunk,
    },
    /// The chunk at `offset` of `range` could not be read.
    ChunkFailed {
        range: RangeId,
        offset: u64,
        error: ReaderError,
    },
    /// Every chunk of `range` has been emitted; `ok` is false if any failed.
    RangeDone {
        range: RangeId,
        ok: bool,
    },
    /// The reader stopped; no events follow.
    Fatal(ReaderError),
}

/// Reader settings.
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    /// Chunk size: a power of two, at least 4 KiB, at most the protocol's
    /// largest chunk (1 MiB).
    pub chunk_size: u32,
    /// Reads in flight on the ring.
    pub queue_depth: u32,
    /// Hash/compress threads.
    pub workers: usize,
    /// zstd level; `None` sends every non-zero chunk raw.
    pub zstd_level: Option<i32>,
    /// Only hash: chunks carry no payload (for checksum resync).
    pub hash_only: bool,
    /// Chunks buffered in the output channel.
    pub output_capacity: usize,
    /// Open with O_DIRECT (falls back to the page cache where the file
    /// system refuses it).
    pub direct: bool,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        ReaderConfig {
            chunk_size: DEFAULT_CHUNK_SIZE,
            queue_depth: 32,
            workers: 2,
            zstd_level: Some(1),
            hash_only: false,
            output_capacity: 64,
            direct: true,
        }
    }
}

/// Errors of the reader.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    #[error("cannot open {}: {source}", device.display())]
    Open { device: PathBuf, source: io::Error },
    #[error("cannot get the size of {}: {source}", device.display())]
    Size { device: PathBuf, source: io::Error },
    #[error("invalid reader config: {0}")]
    Config(String),
    #[error("cannot set up io_uring for {}: {source}", device.display())]
    Ring { device: PathBuf, source: io::Error },
    #[error(
        "range at offset {offset} length {len} ends past the end of {} ({size} bytes); refresh the device size after a resize",
        device.display()
    )]
    BeyondEnd {
        device: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("read of {} at offset {offset} failed: {source}", device.display())]
    Read {
        device: PathBuf,
        offset: u64,
        source: io::Error,
    },
    #[error(
        "{} ended at offset {offset}, before its size of {size} bytes; was it shrunk?",
        device.display()
    )]
    UnexpectedEof {
        device: PathBuf,
        offset: u64,
        size: u64,
    },
    #[error("reader of {} has stopped", device.display())]
    Stopped { device: PathBuf },
    #[error("cannot start a reader thread: {0}")]
    Thread(io::Error),
}

/// Opens `path` for reading (O_DIRECT if asked and supported) and returns the
/// file, its size, and whether O_DIRECT is on.
pub(crate) fn open_device(path: &Path, direct: bool) -> Result<(File, u64, bool), ReaderError> {
    let open = |flags: i32| {
        OpenOptions::new()
            .read(true)
            .custom_flags(flags | libc::O_CLOEXEC)
            .open(path)
    };
    let (file, direct) = if direct {
        match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(device = %path.display(),
                    "file system refuses O_DIRECT; reading through the page cache");
                (open(0).map_err(|source| open_err(path, source))?, false)
            }
            Err(source) => return Err(open_err(path, source)),
        }
    } else {
        (open(0).map_err(|source| open_err(path, source))?, false)
    };
    let size = device_size(&file).map_err(|source| ReaderError::Size {
        device: path.to_owned(),
        source,
    })?;
    Ok((file, size, direct))
}

fn open_err(path: &Path, source: io::Error) -> ReaderError {
    ReaderError::Open {
        device: path.to_owned(),
        source,
    }
}

/// Size in bytes of a block device (BLKGETSIZE64) or a regular file.
pub fn device_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        uring::block_device_size(file)
    } else {
        Ok(meta.len())
    }
}

/// The blake3 of every chunk of a device, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafHashes {
    /// Device size in bytes when it was read.
    pub size: u64,
    /// One hash per chunk; the last chunk may be short.
    pub leaves: Vec<[u8; 32]>,
}

/// blake3 of every chunk of the device at `path`, in order: the leaves of
/// the checksum-resync hash tree. Uses the reader in hash-only mode, so only
/// reading and hashing run (zero chunks cost no hashing at all).
///
/// Blocks until the whole device is read (not from an async task).
pub fn leaf_hashes(path: &Path, config: &ReaderConfig) -> Result<LeafHashes, ReaderError> {
    let config = ReaderConfig {
        hash_only: true,
        ..config.clone()
    };
    let (handle, mut events) = spawn(path, &config)?;
    let size = handle.size();
    let cs = u64::from(config.chunk_size);
    let mut leaves = Vec::with_capacity(size.div_ceil(cs) as usize);
    handle.submit(0, size)?;
    handle.close();
    while let Some(ev) = events.blocking_next() {
        match ev {
            ReaderEvent::Chunk { chunk, .. } => leaves.push(chunk.hash),
            ReaderEvent::ChunkFailed { error, .. } | ReaderEvent::Fatal(error) => {
                return Err(error);
            }
            ReaderEvent::RangeDone { .. } => {}
        }
    }
    if leaves.len() as u64 != size.div_ceil(cs) {
        return Err(ReaderError::Stopped {
            device: path.to_owned(),
        });
    }
    Ok(LeafHashes { size, leaves })
}
