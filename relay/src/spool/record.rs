//! The spool's record format: `magic u32 | payload len u32 | disk 16 |
//! generation u64 | seq u64 | check 16 | payload`, big endian, where `check`
//! is blake3 over everything else. Parsing never panics: a short, torn or
//! corrupt record is the end of what the segment holds.

use blockferry_proto::{DiskId, Generation, Seq};

use super::{Entry, RecordRef};

const MAGIC: u32 = u32::from_be_bytes(*b"BFSP");
pub(super) const RECORD_HEADER_LEN: usize = 4 + 4 + 16 + 8 + 8 + 16;
/// A record's payload is one encoded frame; bound it like the protocol does.
pub(super) const MAX_RECORD_PAYLOAD: usize = blockferry_proto::frame::MAX_FRAME_LEN;

pub(super) fn encode_record(buf: &mut Vec<u8>, e: &Entry) {
    let mut head = [0u8; RECORD_HEADER_LEN];
    head[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    head[4..8].copy_from_slice(&(e.frame.len() as u32).to_be_bytes());
    head[8..24].copy_from_slice(e.disk.as_bytes());
    head[24..32].copy_from_slice(&e.generation.0.to_be_bytes());
    head[32..40].copy_from_slice(&e.seq.0.to_be_bytes());
    let check = checksum(&head[..40], &e.frame);
    head[40..56].copy_from_slice(&check);
    buf.extend_from_slice(&head);
    buf.extend_from_slice(&e.frame);
}

fn checksum(head: &[u8], payload: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(head);
    h.update(payload);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// Parses the record at `pos`; `None` at the end or at a torn/corrupt record.
pub(super) fn parse_record(data: &[u8], pos: usize) -> Option<(RecordRef, usize)> {
    let head = data.get(pos..pos.checked_add(RECORD_HEADER_LEN)?)?;
    if u32::from_be_bytes(head[0..4].try_into().ok()?) != MAGIC {
        return None;
    }
    let len = u32::from_be_bytes(head[4..8].try_into().ok()?);
    if len as usize > MAX_RECORD_PAYLOAD {
        return None;
    }
    let start = pos + RECORD_HEADER_LEN;
    let payload = data.get(start..start.checked_add(len as usize)?)?;
    if checksum(&head[..40], payload) != head[40..56] {
        return None;
    }
    let disk = DiskId::from_bytes(head[8..24].try_into().ok()?);
    let generation = Generation(u64::from_be_bytes(head[24..32].try_into().ok()?));
    let seq = Seq(u64::from_be_bytes(head[32..40].try_into().ok()?));
    Some((
        RecordRef {
            disk,
            generation,
            seq,
            segment: 0,
            offset: start as u64,
            len,
        },
        start + len as usize,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_record_never_panics_on_garbage() {
        let mut data = vec![0u8; 200];
        data[0..4].copy_from_slice(b"BFSP");
        data[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        for cut in 0..data.len() {
            assert!(parse_record(&data[..cut], 0).is_none());
        }
        assert!(parse_record(&data, usize::MAX - 3).is_none());
    }
}
