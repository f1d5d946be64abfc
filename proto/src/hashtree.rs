//! Checksum resync: finding the chunks two copies of a disk differ in, by
//! comparing blake3 hashes over a tree of ranges, so that equal regions cost
//! one round-trip and only differing chunks cross the wire afterwards.
//!
//! The tree is fixed by the chunk size and a fan-out `F`:
//!
//! * a **leaf** (level 0) is the blake3 of one chunk's plain data, the same
//!   hash a chunk carries on the wire; the disk's last chunk may be short;
//! * node `(level l, index i)` covers chunks `[i·F^l, (i+1)·F^l)` clipped to
//!   the disk, i.e. the byte range `[i·F^l·cs, (i+1)·F^l·cs)`; its hash is a
//!   keyed blake3 over the level, the number of children present and their
//!   hashes. Two disks of different sizes therefore differ in every node that
//!   straddles the shorter one's end, and nowhere else.
//!
//! [`Comparer`] runs on the side that wants the differences (the agent): it
//! emits [`HashRangeRequest`]s for node ranges (`poll_request`), takes the
//! [`HashRangeReply`]s (`handle_reply`), descends only into nodes whose hashes
//! differ, and ends with the differing chunk ranges. [`Responder`] answers on
//! the other side from a [`HashTree`] built from its leaf hashes. A reply
//! digest whose range has length 0 means "I have no data there".
//!
//! Cost: with `k` differing chunks on a disk of `n` chunks there are at most
//! `log_F(n) + 1` levels, each asking about at most `k·F` nodes, so
//! `O(k·F·log n)` digests in `O(log n)` round-trips when each level fits in
//! one request; equal disks take exactly one round-trip.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use crate::frame::{
    ByteRange, Frame, HashRangeReply, HashRangeRequest, MAX_HASH_RANGES, RangeDigest,
};
use crate::ids::{DiskId, Generation};

/// A blake3 digest.
pub type Hash = [u8; 32];

/// Default fan-out of the tree.
pub const DEFAULT_FANOUT: u32 = 64;

/// Key of inner-node hashes: keeps them apart from plain blake3 leaf hashes.
const INNER_CONTEXT: &str = "blockferry 2026-01 hash tree inner node v1";

/// Errors of the resync state machines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashTreeError {
    #[error("fan-out {0} must be between 2 and 65536")]
    BadFanout(u32),
    #[error("chunk size {0} must be a power of two of at least 512 bytes")]
    BadChunkSize(u64),
    #[error("{leaves} leaf hashes given for a disk of {size} bytes in chunks of {chunk_size}")]
    LeafCount {
        leaves: u64,
        size: u64,
        chunk_size: u64,
    },
    #[error("reply to unknown request {0}")]
    UnknownRequest(u64),
    #[error("reply to request {request_id} carries {got} digests for {asked} ranges")]
    ReplyCount {
        request_id: u64,
        asked: usize,
        got: usize,
    },
    #[error("reply to request {request_id} answers offset {got} where {asked} was asked")]
    ReplyRange {
        request_id: u64,
        asked: u64,
        got: u64,
    },
    #[error("range at offset {offset} length {len} is not a node of the hash tree")]
    NotANode { offset: u64, len: u64 },
    #[error("request carries {0} ranges, more than the limit of {MAX_HASH_RANGES}")]
    TooManyRanges(usize),
}

/// A node of the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    pub level: u8,
    pub index: u64,
}

/// Chunk size and fan-out, the shape both sides must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeShape {
    pub chunk_size: u64,
    pub fanout: u32,
}

impl TreeShape {
    pub fn new(chunk_size: u64, fanout: u32) -> Result<Self, HashTreeError> {
        if !(2..=65536).contains(&fanout) {
            return Err(HashTreeError::BadFanout(fanout));
        }
        if !chunk_size.is_power_of_two() || chunk_size < 512 {
            return Err(HashTreeError::BadChunkSize(chunk_size));
        }
        Ok(TreeShape { chunk_size, fanout })
    }

    /// Number of chunks (leaves) of a disk of `size` bytes.
    pub fn leaves(&self, size: u64) -> u64 {
        size.div_ceil(self.chunk_size)
    }

    /// Leaves under one node of `level`, or `None` when that overflows.
    fn leaves_per_node(&self, level: u8) -> Option<u64> {
        u64::from(self.fanout).checked_pow(u32::from(level))
    }

    /// The lowest level whose node 0 covers `leaves` leaves.
    pub fn height(&self, leaves: u64) -> u8 {
        let mut h = 0u8;
        let mut span = 1u64;
        while span < leaves {
            span = span.saturating_mul(u64::from(self.fanout));
            h += 1;
        }
        h
    }

    /// Byte range of a node (not clipped to any disk); `None` on overflow.
    pub fn byte_range(&self, node: NodeId) -> Option<ByteRange> {
        let len = self
            .leaves_per_node(node.level)?
            .checked_mul(self.chunk_size)?;
        let offset = node.index.checked_mul(len)?;
        offset.checked_add(len)?;
        Some(ByteRange { offset, len })
    }

    /// The node whose byte range this is, if it is one.
    pub fn node_of(&self, range: ByteRange) -> Option<NodeId> {
        let mut len = self.chunk_size;
        for level in 0..=u8::MAX {
            if len == range.len {
                return range.offset.is_multiple_of(len).then_some(NodeId {
                    level,
                    index: range.offset / len,
                });
            }
            if len > range.len {
                return None;
            }
            len = len.checked_mul(u64::from(self.fanout))?;
        }
        None
    }
}

/// All node hashes of one disk, built from its leaf hashes.
#[derive(Debug, Clone)]
pub struct HashTree {
    shape: TreeShape,
    size: u64,
    /// `levels[0]` are the leaves; the last level has at most one node.
    levels: Vec<Vec<Hash>>,
}

impl HashTree {
    /// Builds the tree of a disk of `size` bytes from the blake3 of each of
    /// its chunks, in order.
    pub fn new(shape: TreeShape, size: u64, leaves: Vec<Hash>) -> Result<Self, HashTreeError> {
        if leaves.len() as u64 != shape.leaves(size) {
            return Err(HashTreeError::LeafCount {
                leaves: leaves.len() as u64,
                size,
                chunk_size: shape.chunk_size,
            });
        }
        let fanout = shape.fanout as usize;
        let mut levels = vec![leaves];
        while let Some(last) = levels.last().filter(|l| l.len() > 1) {
            let level = levels.len() as u8;
            let next = last.chunks(fanout).map(|c| inner_hash(level, c)).collect();
            levels.push(next);
        }
        Ok(HashTree {
            shape,
            size,
            levels,
        })
    }

    /// Builds the tree of an in-memory disk image (tests, small disks).
    pub fn from_bytes(shape: TreeShape, data: &[u8]) -> Result<Self, HashTreeError> {
        let cs = usize::try_from(shape.chunk_size).unwrap_or(usize::MAX);
        let leaves = data
            .chunks(cs)
            .map(|c| *blake3::hash(c).as_bytes())
            .collect();
        Self::new(shape, data.len() as u64, leaves)
    }

    pub fn shape(&self) -> TreeShape {
        self.shape
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn leaf_count(&self) -> u64 {
        self.levels[0].len() as u64
    }

    /// The hash of a node, `None` when the disk has no chunk under it.
    pub fn node(&self, id: NodeId) -> Option<Hash> {
        let level = usize::from(id.level);
        if let Some(hashes) = self.levels.get(level) {
            return hashes.get(usize::try_from(id.index).ok()?).copied();
        }
        // Above the top: only node 0 exists, a chain of single-child nodes.
        if id.index != 0 {
            return None;
        }
        let mut h = *self.levels.last()?.first()?;
        for l in self.levels.len()..=level {
            h = inner_hash(l as u8, &[h]);
        }
        Some(h)
    }
}

fn inner_hash(level: u8, children: &[Hash]) -> Hash {
    let mut h = blake3::Hasher::new_derive_key(INNER_CONTEXT);
    h.update(&[level]);
    h.update(&(children.len() as u32).to_be_bytes());
    for c in children {
        h.update(c);
    }
    *h.finalize().as_bytes()
}

/// Messages and bytes one side of a resync sent and received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExchangeStats {
    pub requests: u64,
    pub replies: u64,
    /// Encoded frame bytes of the requests.
    pub request_bytes: u64,
    /// Encoded frame bytes of the replies.
    pub reply_bytes: u64,
    /// Ranges asked about in all.
    pub ranges_asked: u64,
}

impl ExchangeStats {
    pub fn messages(&self) -> u64 {
        self.requests + self.replies
    }

    pub fn bytes(&self) -> u64 {
        self.request_bytes + self.reply_bytes
    }
}

/// Limits of a [`Comparer`].
#[derive(Debug, Clone, Copy)]
pub struct ComparerLimits {
    /// Most ranges per request.
    pub max_ranges: usize,
    /// Requests awaiting a reply at once.
    pub max_outstanding: usize,
}

impl Default for ComparerLimits {
    fn default() -> Self {
        ComparerLimits {
            max_ranges: 4096,
            max_outstanding: 4,
        }
    }
}

/// The comparing side of a checksum resync (see the module docs).
#[derive(Debug)]
pub struct Comparer {
    local: HashTree,
    remote_size: u64,
    /// Leaves of the larger disk: every node asked about lies below this.
    max_leaves: u64,
    disk: DiskId,
    generation: Generation,
    limits: ComparerLimits,
    queue: VecDeque<NodeId>,
    outstanding: HashMap<u64, Vec<NodeId>>,
    next_request: u64,
    differing: Vec<Range<u64>>,
    stats: ExchangeStats,
}

impl Comparer {
    /// Compares `local` with the peer's copy of `disk`, which is
    /// `remote_size` bytes long.
    pub fn new(
        local: HashTree,
        remote_size: u64,
        disk: DiskId,
        generation: Generation,
        limits: ComparerLimits,
    ) -> Self {
        let shape = local.shape();
        let max_leaves = local.leaf_count().max(shape.leaves(remote_size));
        let mut queue = VecDeque::new();
        if max_leaves > 0 {
            queue.push_back(NodeId {
                level: shape.height(max_leaves),
                index: 0,
            });
        }
        let limits = ComparerLimits {
            max_ranges: limits.max_ranges.clamp(1, MAX_HASH_RANGES),
            max_outstanding: limits.max_outstanding.max(1),
        };
        Comparer {
            local,
            remote_size,
            max_leaves,
            disk,
            generation,
            limits,
            queue,
            outstanding: HashMap::new(),
            next_request: 0,
            differing: Vec::new(),
            stats: ExchangeStats::default(),
        }
    }

    /// The next request to send, if one may be sent now.
    pub fn poll_request(&mut self) -> Option<HashRangeRequest> {
        if self.queue.is_empty() || self.outstanding.len() >= self.limits.max_outstanding {
            return None;
        }
        let shape = self.local.shape();
        let n = self.queue.len().min(self.limits.max_ranges);
        let nodes: Vec<NodeId> = self.queue.drain(..n).collect();
        let ranges = nodes
            .iter()
            // Nodes come from `max_leaves`, so their ranges fit in u64.
            .filter_map(|&id| shape.byte_range(id))
            .collect::<Vec<_>>();
        let request_id = self.next_request;
        self.next_request += 1;
        let req = HashRangeRequest {
            disk: self.disk,
            generation: self.generation,
            request_id,
            ranges,
        };
        self.stats.requests += 1;
        self.stats.ranges_asked += nodes.len() as u64;
        self.stats.request_bytes += Frame::HashRequest(req.clone()).encoded_len() as u64;
        self.outstanding.insert(request_id, nodes);
        Some(req)
    }

    /// Takes the peer's reply to one of our requests.
    pub fn handle_reply(&mut self, reply: &HashRangeReply) -> Result<(), HashTreeError> {
        let nodes = self
            .outstanding
            .remove(&reply.request_id)
            .ok_or(HashTreeError::UnknownRequest(reply.request_id))?;
        if nodes.len() != reply.digests.len() {
            let err = HashTreeError::ReplyCount {
                request_id: reply.request_id,
                asked: nodes.len(),
                got: reply.digests.len(),
            };
            // Ask again rather than lose the subtrees.
            self.queue.extend(nodes);
            return Err(err);
        }
        let shape = self.local.shape();
        for (node, d) in nodes.iter().zip(&reply.digests) {
            let asked = shape.byte_range(*node).map_or(0, |r| r.offset);
            if d.range.offset != asked {
                self.queue.extend(nodes.iter().copied());
                return Err(HashTreeError::ReplyRange {
                    request_id: reply.request_id,
                    asked,
                    got: d.range.offset,
                });
            }
        }
        self.stats.replies += 1;
        self.stats.reply_bytes += Frame::HashReply(reply.clone()).encoded_len() as u64;
        for (&node, d) in nodes.iter().zip(&reply.digests) {
            let remote = (d.range.len > 0).then_some(d.digest);
            let local = self.local.node(node);
            match (local, remote) {
                (Some(l), Some(r)) if l == r => {}
                (Some(_), Some(_)) if node.level > 0 => {
                    let first = node.index.saturating_mul(u64::from(shape.fanout));
                    let end = first
                        .saturating_add(u64::from(shape.fanout))
                        .min(self.max_leaves.div_ceil(self.span(node.level - 1)));
                    self.queue.extend((first..end).map(|index| NodeId {
                        level: node.level - 1,
                        index,
                    }));
                }
                // A differing leaf, or data on one side only: all of it differs.
                _ => self.mark(node),
            }
        }
        Ok(())
    }

    /// True once every differing chunk has been found.
    pub fn is_done(&self) -> bool {
        self.queue.is_empty() && self.outstanding.is_empty()
    }

    /// Chunk indices found to differ so far, sorted and coalesced. Indices at
    /// or past the local leaf count exist only on the peer (a shrunk disk).
    pub fn differing_chunks(&self) -> Vec<Range<u64>> {
        let mut v = self.differing.clone();
        v.sort_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        out
    }

    /// Byte ranges of the local disk to send: the differing chunks clipped to
    /// the local size.
    pub fn differing_bytes(&self) -> Vec<ByteRange> {
        let cs = self.local.shape().chunk_size;
        let size = self.local.size();
        self.differing_chunks()
            .into_iter()
            .filter_map(|r| {
                let offset = r.start.saturating_mul(cs);
                let end = r.end.saturating_mul(cs).min(size);
                (end > offset).then_some(ByteRange {
                    offset,
                    len: end - offset,
                })
            })
            .collect()
    }

    /// Size of the peer's copy, as given at the start.
    pub fn remote_size(&self) -> u64 {
        self.remote_size
    }

    pub fn stats(&self) -> ExchangeStats {
        self.stats
    }

    fn span(&self, level: u8) -> u64 {
        self.local
            .shape()
            .leaves_per_node(level)
            .unwrap_or(u64::MAX)
    }

    fn mark(&mut self, node: NodeId) {
        let span = self.span(node.level);
        let start = node.index.saturating_mul(span);
        let end = start.saturating_add(span).min(self.max_leaves);
        if start < end {
            self.differing.push(start..end);
        }
    }
}

/// The answering side of a checksum resync.
#[derive(Debug, Clone)]
pub struct Responder {
    tree: HashTree,
    stats: ExchangeStats,
}

impl Responder {
    pub fn new(tree: HashTree) -> Self {
        Responder {
            tree,
            stats: ExchangeStats::default(),
        }
    }

    /// The digests of the ranges asked for, in the same order. A range with
    /// no local data is answered with length 0; ranges are clipped to the
    /// local disk size.
    pub fn handle_request(
        &mut self,
        req: &HashRangeRequest,
    ) -> Result<HashRangeReply, HashTreeError> {
        if req.ranges.len() > MAX_HASH_RANGES {
            return Err(HashTreeError::TooManyRanges(req.ranges.len()));
        }
        let shape = self.tree.shape();
        let size = self.tree.size();
        let digests = req
            .ranges
            .iter()
            .map(|&range| {
                let node = shape.node_of(range).ok_or(HashTreeError::NotANode {
                    offset: range.offset,
                    len: range.len,
                })?;
                Ok(match self.tree.node(node) {
                    Some(digest) => RangeDigest {
                        range: ByteRange {
                            offset: range.offset,
                            len: range.len.min(size.saturating_sub(range.offset)),
                        },
                        digest,
                    },
                    None => RangeDigest {
                        range: ByteRange {
                            offset: range.offset,
                            len: 0,
                        },
                        digest: [0; 32],
                    },
                })
            })
            .collect::<Result<Vec<_>, HashTreeError>>()?;
        let reply = HashRangeReply {
            disk: req.disk,
            generation: req.generation,
            request_id: req.request_id,
            digests,
        };
        self.stats.requests += 1;
        self.stats.replies += 1;
        self.stats.ranges_asked += req.ranges.len() as u64;
        self.stats.request_bytes += Frame::HashRequest(req.clone()).encoded_len() as u64;
        self.stats.reply_bytes += Frame::HashReply(reply.clone()).encoded_len() as u64;
        Ok(reply)
    }

    pub fn stats(&self) -> ExchangeStats {
        self.stats
    }
}

#[cfg(test)]
mod tests;
