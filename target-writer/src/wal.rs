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
//!
//! # Record layout (version 2)
//! A 48-byte header, then the entry table (redo entries with the blake3 of
//! their plain data, then undo entries), then the redo payloads, then the undo
//! data, then a 32-byte blake3 of everything except the redo payloads. The
//! redo payloads are not hashed again on the apply path: each carries the hash
//! the batch was verified against, and decoding checks it, so a torn payload
//! still ends the journal. Version 1 records (one hash over the whole record)
//! are still read, so a journal left by an older build is replayed.

use blockferry_proto::{Chunk, Encoding};

use crate::batch::Undo;

const MAGIC: &[u8; 4] = b"BFWR";
const VERSION_1: u32 = 1;
const VERSION: u32 = 2;
const HEADER: usize = 48;
const ENTRY_HEADER: usize = 12;
const UNDO_HEADER: usize = 13;
const REDO_HEADER: usize = 17 + 32;
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
    /// decoding checked it again, so a failure here means a damaged journal.
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
    pub undo: Vec<Undo>,
}

fn enc_byte(e: Encoding) -> u8 {
    match e {
        Encoding::Raw => 0,
        Encoding::Zstd => 1,
        Encoding::Zero => 2,
    }
}

fn stored(c: &Chunk) -> usize {
    if c.encoding == Encoding::Zero {
        0
    } else {
        c.payload.len()
    }
}

/// Appends one record to `out` from the batch's chunks as received. `out` is
/// reused between calls, so the apply path does not allocate per batch.
pub fn encode_into(
    out: &mut Vec<u8>,
    epoch: u64,
    generation: u64,
    seq: u64,
    redo: &[Chunk],
    undo: &[Undo],
) {
    let total = HEADER
        + redo.iter().map(|c| REDO_HEADER + stored(c)).sum::<usize>()
        + undo
            .iter()
            .map(|c| UNDO_HEADER + c.data.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
        + TRAILER;
    let start = out.len();
    out.reserve(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(total as u64).to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(redo.len() as u32).to_le_bytes());
    out.extend_from_slice(&(undo.len() as u32).to_le_bytes());
    for c in redo {
        out.extend_from_slice(&c.offset.to_le_bytes());
        out.extend_from_slice(&c.len.to_le_bytes());
        out.push(enc_byte(c.encoding));
        out.extend_from_slice(&(stored(c) as u32).to_le_bytes());
        out.extend_from_slice(&c.hash);
    }
    for c in undo {
        out.extend_from_slice(&c.offset.to_le_bytes());
        out.extend_from_slice(&c.len.to_le_bytes());
        out.push(u8::from(c.data.is_none()));
    }
    let mut h = blake3::Hasher::new();
    h.update(&out[start..]);
    for c in redo {
        out.extend_from_slice(&c.payload[..stored(c)]);
    }
    for d in undo.iter().filter_map(|c| c.data.as_ref()) {
        out.extend_from_slice(d);
        h.update(d);
    }
    out.extend_from_slice(h.finalize().as_bytes());
}

impl WalRecord {
    pub fn encode(&self) -> Vec<u8> {
        let redo: Vec<Chunk> = self
            .redo
            .iter()
            .map(|c| Chunk {
                offset: c.offset,
                len: c.len,
                hash: c.plain().map_or([0; 32], |d| *blake3::hash(&d).as_bytes()),
                encoding: c.encoding,
                payload: bytes::Bytes::from(c.payload.clone()),
            })
            .collect();
        let mut out = Vec::new();
        encode_into(
            &mut out,
            self.epoch,
            self.generation,
            self.seq,
            &redo,
            &self.undo,
        );
        out
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

fn encoding(b: u8) -> Result<Encoding, WalEnd> {
    match b {
        0 => Ok(Encoding::Raw),
        1 => Ok(Encoding::Zstd),
        2 => Ok(Encoding::Zero),
        _ => Err(WalEnd::Invalid("encoding")),
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
    let version = c.u32().ok_or(WalEnd::Short)?;
    if version != VERSION && version != VERSION_1 {
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
    let mut c = Cursor {
        buf: signed,
        pos: 16,
    };
    let rec_epoch = c.u64().ok_or(WalEnd::Short)?;
    let generation = c.u64().ok_or(WalEnd::Short)?;
    let seq = c.u64().ok_or(WalEnd::Short)?;
    let n_redo = c.u32().ok_or(WalEnd::Short)? as usize;
    let n_undo = c.u32().ok_or(WalEnd::Short)? as usize;
    if rec_epoch != epoch {
        return Err(WalEnd::Invalid("older epoch"));
    }
    let (redo, undo) = if version == VERSION_1 {
        if blake3::hash(signed).as_bytes() != trailer {
            return Err(WalEnd::Invalid("checksum"));
        }
        decode_v1_entries(&mut c, n_redo, n_undo)?
    } else {
        decode_v2_entries(&mut c, n_redo, n_undo, trailer)?
    };
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

type Entries = (Vec<WalChunk>, Vec<Undo>);

fn decode_v1_entries(c: &mut Cursor<'_>, n_redo: usize, n_undo: usize) -> Result<Entries, WalEnd> {
    // Each entry takes at least ENTRY_HEADER bytes: bound the allocations.
    let cap = |n: usize| n.min(c.buf.len() / ENTRY_HEADER);
    let mut redo = Vec::with_capacity(cap(n_redo));
    let mut undo = Vec::with_capacity(cap(n_undo));
    for _ in 0..n_redo {
        let offset = c.u64().ok_or(WalEnd::Invalid("entry"))?;
        let len = c.u32().ok_or(WalEnd::Invalid("entry"))?;
        let encoding = encoding(c.take(1).ok_or(WalEnd::Invalid("entry"))?[0])?;
        let n = c.u32().ok_or(WalEnd::Invalid("entry"))? as usize;
        let payload = c.take(n).ok_or(WalEnd::Invalid("entry"))?.to_vec();
        redo.push(WalChunk {
            offset,
            len,
            encoding,
            payload,
        });
    }
    for _ in 0..n_undo {
        let offset = c.u64().ok_or(WalEnd::Invalid("entry"))?;
        let len = c.u32().ok_or(WalEnd::Invalid("entry"))?;
        let data = c
            .take(len as usize)
            .ok_or(WalEnd::Invalid("entry"))?
            .to_vec();
        undo.push(Undo {
            offset,
            len,
            data: Some(data),
        });
    }
    Ok((redo, undo))
}

fn decode_v2_entries(
    c: &mut Cursor<'_>,
    n_redo: usize,
    n_undo: usize,
    trailer: &[u8],
) -> Result<Entries, WalEnd> {
    let table = n_redo
        .checked_mul(REDO_HEADER)
        .and_then(|a| {
            n_undo
                .checked_mul(UNDO_HEADER)
                .and_then(|b| a.checked_add(b))
        })
        .ok_or(WalEnd::Invalid("entry count"))?;
    let meta_end = c
        .pos
        .checked_add(table)
        .ok_or(WalEnd::Invalid("entry count"))?;
    let Some(meta) = c.buf.get(..meta_end) else {
        return Err(WalEnd::Invalid("entry count"));
    };
    let mut h = blake3::Hasher::new();
    h.update(meta);
    let mut heads = Vec::with_capacity(n_redo);
    for _ in 0..n_redo {
        let offset = c.u64().ok_or(WalEnd::Invalid("entry"))?;
        let len = c.u32().ok_or(WalEnd::Invalid("entry"))?;
        let encoding = encoding(c.take(1).ok_or(WalEnd::Invalid("entry"))?[0])?;
        let n = c.u32().ok_or(WalEnd::Invalid("entry"))? as usize;
        let hash = c.take(32).ok_or(WalEnd::Invalid("entry"))?;
        heads.push((offset, len, encoding, n, hash));
    }
    let mut undo_heads = Vec::with_capacity(n_undo);
    for _ in 0..n_undo {
        let offset = c.u64().ok_or(WalEnd::Invalid("entry"))?;
        let len = c.u32().ok_or(WalEnd::Invalid("entry"))?;
        let zero = match c.take(1).ok_or(WalEnd::Invalid("entry"))?[0] {
            0 => false,
            1 => true,
            _ => return Err(WalEnd::Invalid("undo kind")),
        };
        undo_heads.push((offset, len, zero));
    }
    let mut payloads = Vec::with_capacity(n_redo);
    for &(_, _, _, n, _) in &heads {
        payloads.push(c.take(n).ok_or(WalEnd::Invalid("entry"))?);
    }
    let mut undo = Vec::with_capacity(n_undo);
    for (offset, len, zero) in undo_heads {
        let data = if zero {
            None
        } else {
            let d = c.take(len as usize).ok_or(WalEnd::Invalid("entry"))?;
            h.update(d);
            Some(d.to_vec())
        };
        undo.push(Undo { offset, len, data });
    }
    if c.pos != c.buf.len() {
        return Err(WalEnd::Invalid("length"));
    }
    if h.finalize().as_bytes() != trailer {
        return Err(WalEnd::Invalid("checksum"));
    }
    // The entry table holds: now check each payload against its hash (a
    // torn write leaves old bytes there).
    let mut redo = Vec::with_capacity(n_redo);
    for ((offset, len, encoding, _, hash), payload) in heads.into_iter().zip(payloads) {
        let chunk = WalChunk {
            offset,
            len,
            encoding,
            payload: payload.to_vec(),
        };
        let plain = chunk
            .plain()
            .ok_or(WalEnd::Invalid("chunk does not decode"))?;
        if blake3::hash(&plain).as_bytes() != hash {
            return Err(WalEnd::Invalid("chunk checksum"));
        }
        redo.push(chunk);
    }
    Ok((redo, undo))
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
            undo: vec![
                Undo {
                    offset: 0,
                    len: 10,
                    data: Some(vec![7; 10]),
                },
                Undo {
                    offset: 8192,
                    len: 4096,
                    data: None,
                },
            ],
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

    #[test]
    fn a_payload_with_stale_bytes_ends_the_journal() {
        // A torn write can leave the entry table new and a payload old: the
        // table's checksum holds, the payload's own hash does not.
        let r = rec(1, 5);
        let mut b = r.encode();
        let payload_at = HEADER + 2 * REDO_HEADER + 2 * UNDO_HEADER;
        assert_eq!(b[payload_at], 1, "first payload byte of chunk 1");
        b[payload_at] = 0;
        assert_eq!(decode(&b, 5), Err(WalEnd::Invalid("chunk checksum")));
    }

    #[test]
    fn a_version_1_record_is_still_read() {
        // The layout an older build wrote: entries inline, one hash over all.
        // Version 1 had no zero undo entries.
        let mut r = rec(2, 4);
        r.undo.retain(|c| c.data.is_some());
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION_1.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        for v in [r.epoch, r.generation, r.seq] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(r.redo.len() as u32).to_le_bytes());
        b.extend_from_slice(&(r.undo.len() as u32).to_le_bytes());
        for c in &r.redo {
            b.extend_from_slice(&c.offset.to_le_bytes());
            b.extend_from_slice(&c.len.to_le_bytes());
            b.push(enc_byte(c.encoding));
            b.extend_from_slice(&(c.payload.len() as u32).to_le_bytes());
            b.extend_from_slice(&c.payload);
        }
        for c in &r.undo {
            let data = c.data.as_deref().unwrap_or_default();
            b.extend_from_slice(&c.offset.to_le_bytes());
            b.extend_from_slice(&c.len.to_le_bytes());
            b.extend_from_slice(data);
        }
        let total = (b.len() + TRAILER) as u64;
        b[8..16].copy_from_slice(&total.to_le_bytes());
        let h = blake3::hash(&b);
        b.extend_from_slice(h.as_bytes());
        assert_eq!(decode(&b, 4), Ok((r, b.len())));
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
