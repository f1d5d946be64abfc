//! The durable encoding of a [`GenerationRecord`]: magic, version, role,
//! history count, disk id, the entries (current first), and a blake3-derived
//! checksum over all of it. All integers are big-endian.

use super::{
    CopyRole, GenerationEntry, GenerationError, GenerationId, GenerationRecord, MAX_HISTORY,
};
use crate::ids::{DiskId, Generation, Seq};

impl GenerationRecord {
    /// Encoded length of this record.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + ENTRY_LEN * (1 + self.history.len()) + CHECKSUM_LEN
    }

    /// The durable encoding: versioned and checksummed (see [`decode`](Self::decode)).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.role.to_wire());
        // History length fits: it is at most MAX_HISTORY by invariant.
        out.push(u8::try_from(self.history.len()).unwrap_or(u8::MAX));
        out.push(0);
        out.extend_from_slice(self.disk.as_bytes());
        for e in std::iter::once(&self.current).chain(&self.history) {
            out.extend_from_slice(e.id.as_bytes());
            out.extend_from_slice(&e.number.0.to_be_bytes());
            out.extend_from_slice(&e.seq.0.to_be_bytes());
        }
        let sum = checksum(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Decodes exactly one record from `bytes`. Never panics: short, foreign,
    /// corrupt or inconsistent input is a typed error.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeGenerationError> {
        let header = bytes
            .get(..HEADER_LEN)
            .ok_or(DecodeGenerationError::Truncated {
                len: bytes.len(),
                need: HEADER_LEN,
            })?;
        if header[..4] != MAGIC {
            return Err(DecodeGenerationError::BadMagic);
        }
        if header[4] != VERSION {
            return Err(DecodeGenerationError::UnsupportedVersion(header[4]));
        }
        let count = usize::from(header[6]);
        if count > MAX_HISTORY {
            return Err(GenerationError::HistoryTooLong { len: count }.into());
        }
        let need = HEADER_LEN + ENTRY_LEN * (1 + count) + CHECKSUM_LEN;
        if bytes.len() < need {
            return Err(DecodeGenerationError::Truncated {
                len: bytes.len(),
                need,
            });
        }
        if bytes.len() > need {
            return Err(DecodeGenerationError::TrailingBytes {
                len: bytes.len(),
                need,
            });
        }
        let (body, sum) = bytes.split_at(need - CHECKSUM_LEN);
        if checksum(body) != sum {
            return Err(DecodeGenerationError::ChecksumMismatch);
        }
        let role =
            CopyRole::from_wire(header[5]).ok_or(DecodeGenerationError::UnknownRole(header[5]))?;
        if header[7] != 0 {
            return Err(DecodeGenerationError::Reserved(header[7]));
        }
        let disk = DiskId(array(&header[8..24]));
        let mut entries = body[HEADER_LEN..]
            .chunks_exact(ENTRY_LEN)
            .map(|e| GenerationEntry {
                id: GenerationId(array(&e[..16])),
                number: Generation(u64::from_be_bytes(array(&e[16..24]))),
                seq: Seq(u64::from_be_bytes(array(&e[24..32]))),
            });
        let current = entries.next().ok_or(DecodeGenerationError::Truncated {
            len: bytes.len(),
            need,
        })?;
        Ok(GenerationRecord::from_parts(
            disk,
            role,
            current,
            entries.collect(),
        )?)
    }
}

/// An encoded record that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeGenerationError {
    #[error(
        "generation record is {len} bytes where {need} are needed: it is truncated; restore it from a backup or re-create the replica"
    )]
    Truncated { len: usize, need: usize },
    #[error(
        "generation record is {len} bytes where {need} are expected: remove the trailing bytes or restore it from a backup"
    )]
    TrailingBytes { len: usize, need: usize },
    #[error("not a generation record (bad magic): check the path")]
    BadMagic,
    #[error("generation record version {0} is not supported: upgrade blockferry")]
    UnsupportedVersion(u8),
    #[error(
        "generation record checksum does not match: it is corrupt; restore it from a backup or re-create the replica"
    )]
    ChecksumMismatch,
    #[error("generation record has unknown role {0}: upgrade blockferry")]
    UnknownRole(u8),
    #[error("generation record has reserved byte {0:#04x} set: upgrade blockferry")]
    Reserved(u8),
    #[error("generation record is inconsistent")]
    Invalid(#[from] GenerationError),
}

const MAGIC: [u8; 4] = *b"BFGR";
const VERSION: u8 = 1;
/// Magic, version, role, history count, reserved, disk id.
const HEADER_LEN: usize = 8 + DiskId::LEN;
/// Id, number, sequence.
const ENTRY_LEN: usize = GenerationId::LEN + 8 + 8;
const CHECKSUM_LEN: usize = 8;

fn checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    array(&blake3::hash(body).as_bytes()[..CHECKSUM_LEN])
}

/// Copies a slice whose length the caller has established into an array.
fn array<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&s[..N]);
    a
}
