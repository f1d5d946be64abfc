//! Undo segments: the blocks each recovery point needs.
//!
//! Point `P_i` owns segment `S_i`, which holds the contents that blocks had at
//! `P_i`, saved the first time each block was overwritten after `P_i` and before
//! the next point. The replica itself is always the newest state, so point `P_i`
//! reads, for every byte, the first of `S_i, S_i+1, …, S_newest` that holds it,
//! else the replica. Undo rather than redo because the replica must be current
//! (it is what fails over) and keeping redo deltas would need a second full
//! copy of the disk as the base. Dropping the oldest point deletes its segment;
//! dropping a middle point merges its segment into the previous one (older data
//! wins), writing a new file: sealed segments are never modified.
//!
//! Format: a 32-byte header (magic, point id, disk size), then records of
//! `magic, len, seq, offset, data, blake3(header ‖ data)`; a zero record
//! (magic `BFUZ`) says the range was all zero and has no data. The disk state
//! holds each segment's committed length; everything up to it must verify.
//! Version 1 files (`BFUNDO01`, no zero records) are still read.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::crashsafe::FaultPlan;
use crate::error::{Result, TargetError};

const FILE_MAGIC: &[u8; 8] = b"BFUNDO02";
const FILE_MAGIC_V1: &[u8; 8] = b"BFUNDO01";
pub const HEADER_LEN: u64 = 32;
const REC_MAGIC: &[u8; 4] = b"BFUR";
const ZERO_MAGIC: &[u8; 4] = b"BFUZ";
const REC_HEADER: usize = 24;
const REC_TRAILER: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegEntry {
    /// Disk offset of the saved bytes.
    pub offset: u64,
    pub len: u64,
    /// Where the bytes sit in the segment file; `None`: the range was zero.
    pub file_pos: Option<u64>,
    /// The batch whose write made the save necessary.
    pub seq: u64,
}

#[derive(Debug, Clone, Default)]
pub struct SegmentIndex {
    pub entries: Vec<SegEntry>,
}

pub fn header(point_id: u64, disk_size: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN as usize);
    h.extend_from_slice(FILE_MAGIC);
    h.extend_from_slice(&point_id.to_le_bytes());
    h.extend_from_slice(&disk_size.to_le_bytes());
    h.extend_from_slice(&[0u8; 8]);
    h
}

pub fn encode_record(out: &mut Vec<u8>, seq: u64, offset: u64, data: &[u8]) {
    let start = out.len();
    out.extend_from_slice(REC_MAGIC);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(data);
    let h = blake3::hash(&out[start..]);
    out.extend_from_slice(h.as_bytes());
}

/// A record saying `len` bytes at `offset` were zero.
pub fn encode_zero_record(out: &mut Vec<u8>, seq: u64, offset: u64, len: u32) {
    let start = out.len();
    out.extend_from_slice(ZERO_MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    let h = blake3::hash(&out[start..]);
    out.extend_from_slice(h.as_bytes());
}

/// Appends the record of one saved range.
pub fn encode_undo(out: &mut Vec<u8>, seq: u64, undo: &crate::batch::Undo) {
    match &undo.data {
        Some(d) => encode_record(out, seq, undo.offset, d),
        None => encode_zero_record(out, seq, undo.offset, undo.len),
    }
}

pub fn record_len(data_len: usize) -> u64 {
    (REC_HEADER + data_len + REC_TRAILER) as u64
}

/// Creates a new empty segment file (header synced; the caller syncs the dir).
pub fn create(faults: &FaultPlan, path: &Path, point_id: u64, disk_size: u64) -> Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| TargetError::io(path, None, e))?;
    faults.write_at(&f, path, &header(point_id, disk_size), 0)?;
    faults.sync_data(&f, path)?;
    Ok(f)
}

/// Reads and verifies the first `len` bytes of a segment, returning the index
/// of its records. Anything wrong inside the committed length is corruption.
pub fn scan(path: &Path, len: u64, disk_size: u64) -> Result<SegmentIndex> {
    scan_range(path, HEADER_LEN, len, disk_size)
}

/// Like [`scan`], but indexes only the records from `from` (a record
/// boundary: the header length or a committed length seen earlier) up to
/// `len`. A segment only ever grows by whole records, so a reader that keeps
/// up with a growing segment scans each record once.
pub fn scan_range(path: &Path, from: u64, len: u64, disk_size: u64) -> Result<SegmentIndex> {
    let f = File::open(path).map_err(|e| TargetError::io(path, None, e))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut h = [0u8; HEADER_LEN as usize];
    r.read_exact(&mut h)
        .map_err(|e| TargetError::io(path, Some(0), e))?;
    if &h[..8] != FILE_MAGIC && &h[..8] != FILE_MAGIC_V1 {
        return Err(TargetError::corrupt(path, Some(0), "not an undo segment"));
    }
    let mut idx = SegmentIndex::default();
    let mut pos = from.max(HEADER_LEN);
    if pos > HEADER_LEN {
        r.seek(SeekFrom::Start(pos))
            .map_err(|e| TargetError::io(path, Some(pos), e))?;
    }
    let mut data = Vec::new();
    while pos < len {
        let mut rh = [0u8; REC_HEADER];
        r.read_exact(&mut rh)
            .map_err(|e| TargetError::io(path, Some(pos), e))?;
        let zero = match &rh[..4] {
            m if m == REC_MAGIC => false,
            m if m == ZERO_MAGIC => true,
            _ => return Err(TargetError::corrupt(path, Some(pos), "bad record magic")),
        };
        let dlen = u32::from_le_bytes([rh[4], rh[5], rh[6], rh[7]]) as usize;
        let stored = if zero { 0 } else { dlen };
        let seq = u64::from_le_bytes(rh[8..16].try_into().unwrap_or_default());
        let offset = u64::from_le_bytes(rh[16..24].try_into().unwrap_or_default());
        let rlen = record_len(stored);
        if pos + rlen > len
            || offset
                .checked_add(dlen as u64)
                .is_none_or(|e| e > disk_size)
        {
            return Err(TargetError::corrupt(
                path,
                Some(pos),
                "record out of bounds",
            ));
        }
        data.resize(stored, 0);
        r.read_exact(&mut data)
            .map_err(|e| TargetError::io(path, Some(pos), e))?;
        let mut t = [0u8; REC_TRAILER];
        r.read_exact(&mut t)
            .map_err(|e| TargetError::io(path, Some(pos), e))?;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&rh);
        hasher.update(&data);
        if hasher.finalize().as_bytes() != &t {
            return Err(TargetError::corrupt(
                path,
                Some(pos),
                "record checksum mismatch",
            ));
        }
        idx.entries.push(SegEntry {
            offset,
            len: dlen as u64,
            file_pos: (!zero).then_some(pos + REC_HEADER as u64),
            seq,
        });
        pos += rlen;
    }
    Ok(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_records_take_no_data_and_scan_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.undo");
        let mut b = header(1, 1 << 20);
        encode_record(&mut b, 3, 4096, &[7u8; 512]);
        encode_zero_record(&mut b, 4, 65536, 65536);
        assert_eq!(b.len() as u64, HEADER_LEN + record_len(512) + record_len(0));
        std::fs::write(&path, &b).unwrap();
        let idx = scan(&path, b.len() as u64, 1 << 20).unwrap();
        assert_eq!(
            idx.entries,
            vec![
                SegEntry {
                    offset: 4096,
                    len: 512,
                    file_pos: Some(HEADER_LEN + REC_HEADER as u64),
                    seq: 3
                },
                SegEntry {
                    offset: 65536,
                    len: 65536,
                    file_pos: None,
                    seq: 4
                },
            ]
        );
        // A zero record claiming more than the disk is corruption, not a read.
        let mut bad = header(1, 1 << 16);
        encode_zero_record(&mut bad, 1, 0, 1 << 20);
        std::fs::write(&path, &bad).unwrap();
        assert!(scan(&path, bad.len() as u64, 1 << 16).is_err());
    }

    #[test]
    fn a_version_1_segment_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.undo");
        let mut b = header(1, 1 << 20);
        b[..8].copy_from_slice(FILE_MAGIC_V1);
        encode_record(&mut b, 3, 0, &[1u8; 100]);
        std::fs::write(&path, &b).unwrap();
        assert_eq!(
            scan(&path, b.len() as u64, 1 << 20).unwrap().entries.len(),
            1
        );
    }

    #[test]
    fn scanning_in_parts_finds_the_records_of_one_scan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.undo");
        let faults = FaultPlan::default();
        let f = create(&faults, &path, 1, 1 << 20).unwrap();
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for k in 0..5u64 {
            encode_record(
                &mut bytes,
                k,
                k * 4096,
                &vec![k as u8; 512 * (k as usize + 1)],
            );
            ends.push(HEADER_LEN + bytes.len() as u64);
        }
        faults.write_at(&f, &path, &bytes, HEADER_LEN).unwrap();
        let len = HEADER_LEN + bytes.len() as u64;
        let whole = scan(&path, len, 1 << 20).unwrap().entries;
        assert_eq!(whole.len(), 5);
        let mut parts = scan_range(&path, HEADER_LEN, ends[1], 1 << 20)
            .unwrap()
            .entries;
        parts.extend(
            scan_range(&path, ends[1], ends[3], 1 << 20)
                .unwrap()
                .entries,
        );
        parts.extend(scan_range(&path, ends[3], len, 1 << 20).unwrap().entries);
        assert_eq!(parts, whole);
        assert!(
            scan_range(&path, len, len, 1 << 20)
                .unwrap()
                .entries
                .is_empty()
        );
    }
}
