//! The redo journal: one record per applied batch, holding the batch's new
//! blocks (redo) and, when a recovery point is open, the blocks they overwrite
//! (undo) — so one fdatasync makes a batch durable and the point's undo data
//! with it. Redo chunks are kept in their wire encoding (zstd stays
//! compressed, zero chunks take no space): the journal write is the second
//! write of every byte, and compressed data halves it.
//!
//! The file is reused in place: a checkpoint bumps the journal epoch in the
//! disk state and writing restarts at offset 0. Records of an older epoch or
//! with a bad checksum end the journal, which is how torn tails are found.
//! Encoding and decoding are pure; decoding never panics.

use crate::batch::{Chunk, Encoding, PlainChunk};

const MAGIC: &[u8; 4] = b"BFWR";
const VERSION: u32 = 1;
const HEADER: usize = 48;
const ENTRY_HEADER: usize = 12;
const REDO_HEADER: usize = 17;
const TRAILER: usize = 32;

/// A redo chunk as journalled: its plain length and its wire encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalChunk {
    pub offset: u64,
    pub len: u32,
    pub encoding: Encoding,
    pub payload: Vec<u8>,
}

impl WalChunk {
    /// The plain data. The chunk was verified before it was journalled and
    /// the record checksum holds, so a failure here means a damaged journal.
    pub fn plain(&self) -> Option<Vec<u8>> {
        match self.encoding {
            Encoding::Raw => {
                (self.payload.len() == self.len as usize).then(|| self.payload.clone())
            }
            Encoding::Zero => Some(vec![0u8; self.len as usize]),
            Encoding::Zstd => zstd::bulk::decompress(&self.payload, self.len as usize)
                .ok()
                .filter(|d| d.len() == self.len as usize),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalRecord {
    pub epoch: u64,
    pub generation: u64,
    pub seq: u64,
    pub redo: Vec<WalChunk>,
    pub undo: Vec<PlainChunk>,
}

fn enc_byte(e: Encoding) -> u8 {
    match e {
        Encoding::Raw => 0,
        Encoding::Zstd => 1,
        Encoding::Zero => 2,
    }
}

/// Encodes one record from the batch's chunks as received (no copy of them
/// into an intermediate record).
pub fn encode_parts(
    epoch: u64,
    generation: u64,
    seq: u64,
    redo: &[Chunk],
    undo: &[PlainChunk],
) -> Vec<u8> {
    let stored = |c: &Chunk| {
        if c.encoding == Encoding::Zero {
            0
        } else {
            c.payload.len()
        }
    };
    let total = HEADER
        + redo.iter().map(|c| REDO_HEADER + stored(c)).sum::<usize>()
        + undo
            .iter()
            .map(|c| ENTRY_HEADER + c.data.len())
            .sum::<usize>()
        + TRAILER;
    let mut b = Vec::with_capacity(total);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&(total as u64).to_le_bytes());
    b.extend_from_slice(&epoch.to_le_bytes());
    b.extend_from_slice(&generation.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&(redo.len() as u32).to_le_bytes());
    b.extend_from_slice(&(undo.len() as u32).to_le_bytes());
    for c in redo {
        b.extend_from_slice(&c.offset.to_le_bytes());
        b.extend_from_slice(&c.len.to_le_bytes());
        b.push(enc_byte(c.encoding));
        let n = stored(c);
        b.extend_from_slice(&(n as u32).to_le_bytes());
        b.extend_from_slice(&c.payload[..n]);
    }
    for c in undo {
        b.extend_from_slice(&c.offset.to_le_bytes());
        b.extend_from_slice(&(c.data.len() as u32).to_le_bytes());
        b.extend_from_slice(&c.data);
    }
    let h = blake3::hash(&b);
    b.extend_from_slice(h.as_bytes());
    b
}

impl WalRecord {
    pub fn encode(&self) -> Vec<u8> {
        let redo: Vec<Chunk> = self
            .redo
            .iter()
            .map(|c| Chunk {
                offset: c.offset,
                len: c.len,
                hash: [0; 32],
                encoding: c.encoding,
                payload: c.payload.clone(),
            })
            .collect();
        encode_parts(self.epoch, self.generation, self.seq, &redo, &self.undo)
    }
}

/// Why decoding stopped: the journal ends here (normal after a crash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalEnd {
    /// No more bytes, or fewer than a full record (torn tail).
    Short,
    /// Bytes that are not a record of this epoch, or fail their checksum.
    Invalid(&'static str),
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
}

/// Decodes the record at the start of `buf` if it belongs to `epoch`.
/// Returns the record and its encoded length.
pub fn decode(buf: &[u8], epoch: u64) -> Result<(WalRecord, usize), WalEnd> {
    if buf.len() < HEADER + TRAILER {
        return Err(WalEnd::Short);
    }
    let mut c = Cursor { buf, pos: 0 };
    if c.take(4) != Some(MAGIC.as_slice()) {
        return Err(WalEnd::Invalid("bad magic"));
    }
    if c.u32() != Some(VERSION) {
        return Err(WalEnd::Invalid("unknown version"));
    }
    let total = c.u64().ok_or(WalEnd::Short)?;
    let total = usize::try_from(total).map_err(|_| WalEnd::Invalid("length"))?;
    if total < HEADER + TRAILER {
        return Err(WalEnd::Invalid("length"));
    }
    let Some(body) = buf.get(..total) else {
        return Err(WalEnd::Short);
    };
    let (signed, trailer) = body.split_at(total - TRAILER);
    if blake3::hash(signed).as_bytes() != trailer {
        return Err(WalEnd::Invalid("checksum"));
    }
    let mut c = Cursor {
        buf: signed,
        pos: 16,
    };
    let rec_epoch = c.u64().ok_or(WalEnd::Short)?;
    if rec_epoch != epoch {
        return Err(WalEnd::Invalid("older epoch"));
    }
    let generation = c.u64().ok_or(WalEnd::Short)?;
    let seq = c.u64().ok_or(WalEnd::Short)?;
    let n_redo = c.u32().ok_or(WalEnd::Short)? as usize;
    let n_undo = c.u32().ok_or(WalEnd::Short)? as usize;
    // Each entry takes at least ENTRY_HEADER bytes: bound the allocations.
    let cap = |n: usize| n.min(signed.len() / ENTRY_HEADER);
    let mut redo = Vec::with_capacity(cap(n_redo));
    for _ in 0..n_redo {
        let offset = c.u64().ok_or(WalEnd::Invalid("entry"))?;
        let len = c.u32().ok_or(WalEnd::Invalid("entry"))?;
        let encoding = match c.take(1).ok_or(WalEnd::Invalid("entry"))?[0] {
            0 => Encoding::Raw,
            1 => Encoding::Zstd,
            2 => Encoding::Zero,
            _ => return Err(WalEnd::Invalid("encoding")),
        };
        let n = c.u32().ok_or(WalEnd::Invalid("entry"))? as usize;
        let payload = c.take(n).ok_or(WalEnd::Invalid("entry"))?.to_vec();
        redo.push(WalChunk {
            offset,
            len,
            encoding,
            payload,
        });
    }
    let mut undo = Vec::with_capacity(cap(n_undo));
    for _ in 0..n_undo {
        let offset = c.u64().ok_or(WalEnd::Invalid("entry"))?;
        let len = c.u32().ok_or(WalEnd::Invalid("entry"))? as usize;
        let data = c.take(len).ok_or(WalEnd::Invalid("entry"))?.to_vec();
        undo.push(PlainChunk { offset, data });
    }
    Ok((
        WalRecord {
            epoch: rec_epoch,
            generation,
            seq,
            redo,
            undo,
        },
        total,
    ))
}

/// Decodes all consecutive valid records of `epoch` from the start of `buf`.
pub fn decode_all(buf: &[u8], epoch: u64) -> (Vec<WalRecord>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(rest) = buf.get(pos..) {
        match decode(rest, epoch) {
            Ok((r, n)) => {
                out.push(r);
                pos += n;
            }
            Err(_) => break,
        }
    }
    (out, pos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(seq: u64, epoch: u64) -> WalRecord {
        WalRecord {
            epoch,
            generation: 3,
            seq,
            redo: vec![
                WalChunk {
                    offset: 4096 * seq,
                    len: 100,
                    encoding: Encoding::Raw,
                    payload: vec![seq as u8; 100],
                },
                WalChunk {
                    offset: 0,
                    len: 4096,
                    encoding: Encoding::Zero,
                    payload: Vec::new(),
                },
            ],
            undo: vec![PlainChunk {
                offset: 0,
                data: vec![7; 10],
            }],
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_ends_the_journal() {
        let mut buf = rec(1, 5).encode();
        buf.extend(rec(2, 5).encode());
        let third = rec(3, 5).encode();
        buf.extend(&third[..third.len() - 1]);
        let (recs, used) = decode_all(&buf, 5);
        assert_eq!(recs, vec![rec(1, 5), rec(2, 5)]);
        assert_eq!(used, buf.len() - third.len() + 1);
    }

    #[test]
    fn a_record_of_an_older_epoch_ends_the_journal() {
        let mut buf = rec(1, 6).encode();
        buf.extend(rec(9, 5).encode());
        let (recs, _) = decode_all(&buf, 6);
        assert_eq!(recs, vec![rec(1, 6)]);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode_all(&bytes, 0);
        }

        #[test]
        fn a_flipped_bit_is_never_accepted(pos in 0usize..200, bit in 0u8..8) {
            let mut b = rec(1, 1).encode();
            let p = pos % b.len();
            b[p] ^= 1 << bit;
            prop_assert!(decode(&b, 1).is_err());
        }
    }
}
