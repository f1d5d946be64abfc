//! A file of batches and barriers, as the relay would deliver them. It stays
//! in the library because the shipped binary reads it: the hidden
//! `apply-file` subcommand applies one, which is how the crash tests kill a
//! real target process at random moments (and how a captured stream can be
//! replayed by hand). Little-endian, length-prefixed; decoding never panics.

use blockferry_proto::{Barrier, Chunk, Consistency, DiskId, Encoding, Generation, Seq};
use bytes::Bytes;

use crate::batch::ApplyBatch;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedItem {
    Batch(ApplyBatch),
    Barrier(Barrier),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("feed item at byte {offset}: {reason}")]
pub struct FeedError {
    pub offset: usize,
    pub reason: &'static str,
}

fn put_disk(out: &mut Vec<u8>, disk: &str) {
    out.extend_from_slice(&(disk.len() as u16).to_le_bytes());
    out.extend_from_slice(disk.as_bytes());
}

pub fn encode(item: &FeedItem, out: &mut Vec<u8>) {
    match item {
        FeedItem::Batch(b) => {
            out.push(b'B');
            put_disk(out, &b.disk);
            out.extend_from_slice(&b.generation.to_le_bytes());
            out.extend_from_slice(&b.seq.to_le_bytes());
            out.extend_from_slice(&(b.chunks.len() as u32).to_le_bytes());
            for c in &b.chunks {
                out.extend_from_slice(&c.offset.to_le_bytes());
                out.extend_from_slice(&c.len.to_le_bytes());
                out.extend_from_slice(&c.hash);
                out.push(match c.encoding {
                    Encoding::Raw => 0,
                    Encoding::Zstd => 1,
                    Encoding::Zero => 2,
                });
                out.extend_from_slice(&(c.payload.len() as u32).to_le_bytes());
                out.extend_from_slice(&c.payload);
            }
        }
        FeedItem::Barrier(b) => {
            out.push(b'P');
            out.extend_from_slice(b.disk.as_bytes());
            out.extend_from_slice(&b.generation.0.to_le_bytes());
            out.extend_from_slice(&b.seq.0.to_le_bytes());
            out.push(match b.consistency {
                Consistency::NotConsistent => 0,
                Consistency::CrashConsistent => 1,
                Consistency::AppConsistent => 2,
            });
            out.extend_from_slice(&b.timestamp_ns.to_le_bytes());
        }
    }
}

struct R<'a> {
    b: &'a [u8],
    pos: usize,
    start: usize,
}

impl<'a> R<'a> {
    fn err(&self, reason: &'static str) -> FeedError {
        FeedError {
            offset: self.start,
            reason,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], FeedError> {
        let end = self.pos.checked_add(n).ok_or(self.err("length"))?;
        let s = self.b.get(self.pos..end).ok_or(self.err("truncated"))?;
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], FeedError> {
        self.take(N)?.try_into().map_err(|_| self.err("truncated"))
    }
    fn u8(&mut self) -> Result<u8, FeedError> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, FeedError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32, FeedError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, FeedError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn disk(&mut self) -> Result<String, FeedError> {
        let n = self.u16()? as usize;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err("disk id is not utf-8"))
    }
}

/// Decodes every item of a feed file.
pub fn decode_all(buf: &[u8]) -> Result<Vec<FeedItem>, FeedError> {
    let mut r = R {
        b: buf,
        pos: 0,
        start: 0,
    };
    let mut out = Vec::new();
    while r.pos < buf.len() {
        r.start = r.pos;
        match r.u8()? {
            b'B' => {
                let disk = r.disk()?;
                let generation = r.u64()?;
                let seq = r.u64()?;
                let n = r.u32()? as usize;
                let mut chunks = Vec::with_capacity(n.min(buf.len() / 49));
                for _ in 0..n {
                    let offset = r.u64()?;
                    let len = r.u32()?;
                    let hash = r.arr::<32>()?;
                    let encoding = match r.u8()? {
                        0 => Encoding::Raw,
                        1 => Encoding::Zstd,
                        2 => Encoding::Zero,
                        _ => return Err(r.err("unknown encoding")),
                    };
                    let plen = r.u32()? as usize;
                    let payload = Bytes::copy_from_slice(r.take(plen)?);
                    chunks.push(Chunk {
                        offset,
                        len,
                        hash,
                        encoding,
                        payload,
                    });
                }
                out.push(FeedItem::Batch(ApplyBatch {
                    disk,
                    generation,
                    seq,
                    chunks,
                }));
            }
            b'P' => {
                let disk = DiskId::from_bytes(r.arr()?);
                let generation = Generation(r.u64()?);
                let seq = Seq(r.u64()?);
                let consistency = match r.u8()? {
                    0 => Consistency::NotConsistent,
                    1 => Consistency::CrashConsistent,
                    2 => Consistency::AppConsistent,
                    _ => return Err(r.err("unknown label")),
                };
                let timestamp_ns = r.u64()?;
                out.push(FeedItem::Barrier(Barrier {
                    disk,
                    generation,
                    seq,
                    consistency,
                    timestamp_ns,
                }));
            }
            _ => return Err(r.err("unknown item tag")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn feed_round_trips() {
        let items = vec![
            FeedItem::Batch(ApplyBatch {
                disk: "d1".into(),
                generation: 2,
                seq: 7,
                chunks: vec![
                    crate::batch::raw_chunk(4096, vec![3; 100]),
                    crate::batch::zero_chunk(0, 512),
                ],
            }),
            FeedItem::Barrier(Barrier {
                disk: DiskId::from_bytes([7; 16]),
                generation: Generation(2),
                seq: Seq(8),
                consistency: Consistency::AppConsistent,
                timestamp_ns: 5_000_000,
            }),
        ];
        let mut buf = Vec::new();
        for i in &items {
            encode(i, &mut buf);
        }
        assert_eq!(decode_all(&buf).unwrap(), items);
        assert!(decode_all(&buf[..buf.len() - 1]).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_all(&bytes);
        }
    }
}
