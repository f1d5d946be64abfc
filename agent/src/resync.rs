//! Agent side of checksum resync: builds the local hash tree of a device with
//! the reader, and drives a [`Comparer`] against the peer holding the
//! replica until the differing byte ranges are known.
//!
//! The comparison itself is sans-IO in `blockferry_proto::hashtree`; this
//! module only reads the device and moves requests and replies through a
//! [`HashExchange`] supplied by the transport.

use std::path::{Path, PathBuf};

use blockferry_proto::frame::{ByteRange, HashRangeReply, HashRangeRequest};
use blockferry_proto::hashtree::{
    Comparer, ExchangeStats, HashTree, HashTreeError, Responder, TreeShape,
};

use crate::reader::{self, ReaderConfig, ReaderError};

/// Errors of an agent-side resync.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("cannot hash the local device")]
    Read(#[from] ReaderError),
    #[error("hash tree")]
    Tree(#[from] HashTreeError),
    #[error("chunk size {chunk_size} of the hash tree does not fit the reader: {reason}")]
    ChunkSize { chunk_size: u64, reason: String },
    #[error("hash exchange with the peer failed: {0}")]
    Exchange(String),
    #[error("hashing task failed: {0}")]
    Task(String),
}

/// Hash tree of the device (or file) at `path`, built from the blake3 of
/// each chunk as read by the reader in hash-only mode. `config` supplies
/// queue depth and workers; its chunk size is replaced by the tree's.
///
/// Blocks until the whole device is read: from async code call it through
/// `tokio::task::spawn_blocking`.
pub fn local_tree(
    path: &Path,
    shape: TreeShape,
    config: &ReaderConfig,
) -> Result<HashTree, ResyncError> {
    let chunk_size = u32::try_from(shape.chunk_size).map_err(|_| ResyncError::ChunkSize {
        chunk_size: shape.chunk_size,
        reason: "larger than 4 GiB".into(),
    })?;
    let config = ReaderConfig {
        chunk_size,
        hash_only: true,
        ..config.clone()
    };
    let hashes = reader::leaf_hashes(path, &config)?;
    Ok(HashTree::new(shape, hashes.size, hashes.leaves)?)
}

/// [`local_tree`] on a blocking thread, for async callers.
pub async fn local_tree_async(
    path: PathBuf,
    shape: TreeShape,
    config: ReaderConfig,
) -> Result<HashTree, ResyncError> {
    tokio::task::spawn_blocking(move || local_tree(&path, shape, &config))
        .await
        .map_err(|e| ResyncError::Task(e.to_string()))?
}

/// The answering side over a local device: used when the agent's disk is
/// the replica being compared (reprotect, failback).
pub fn local_responder(
    path: &Path,
    shape: TreeShape,
    config: &ReaderConfig,
) -> Result<Responder, ResyncError> {
    Ok(Responder::new(local_tree(path, shape, config)?))
}

/// How requests reach the peer and replies come back (a QUIC stream in the
/// agent, an in-memory responder in tests).
#[allow(async_fn_in_trait)]
pub trait HashExchange {
    async fn send(&mut self, request: HashRangeRequest) -> Result<(), ResyncError>;
    async fn recv(&mut self) -> Result<HashRangeReply, ResyncError>;
}

/// What a finished comparison found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncPlan {
    /// Byte ranges of the local device to ship (chunk-aligned, clipped to
    /// the local size).
    pub ranges: Vec<ByteRange>,
    /// Bytes in `ranges`.
    pub bytes: u64,
    /// Messages and bytes the comparison cost.
    pub stats: ExchangeStats,
}

/// Runs `comparer` to the end over `peer`, keeping several requests in
/// flight so that wide levels do not cost one round-trip per request.
pub async fn compare<E: HashExchange>(
    mut comparer: Comparer,
    peer: &mut E,
) -> Result<ResyncPlan, ResyncError> {
    let mut in_flight = 0usize;
    while !comparer.is_done() {
        while let Some(req) = comparer.poll_request() {
            peer.send(req).await?;
            in_flight += 1;
        }
        if in_flight == 0 {
            // Not done, nothing to send and nothing awaited: a bug; stop
            // rather than hang.
            return Err(ResyncError::Exchange("comparison stalled".into()));
        }
        let reply = peer.recv().await?;
        in_flight -= 1;
        comparer.handle_reply(&reply)?;
    }
    let ranges = comparer.differing_bytes();
    let bytes = ranges.iter().map(|r| r.len).sum();
    let stats = comparer.stats();
    tracing::info!(
        ranges = ranges.len(),
        bytes,
        messages = stats.messages(),
        hash_bytes = stats.bytes(),
        "checksum comparison done"
    );
    Ok(ResyncPlan {
        ranges,
        bytes,
        stats,
    })
}
