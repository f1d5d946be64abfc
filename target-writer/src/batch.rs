//! What the target applies: batches of chunks and barriers, in the target's own
//! plain types (the relay's frames convert into these), and the verification
//! that runs before a single byte is written: range, size limit, zstd decode
//! with a bound, and blake3 of the plain data.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TargetError};

/// Largest plain chunk accepted; bounds memory per chunk and the zstd output.
pub const MAX_CHUNK_LEN: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    /// The payload is the plain data.
    Raw,
    /// The payload is one zstd frame that decodes to exactly `len` bytes.
    Zstd,
    /// `len` zero bytes; the payload is empty.
    Zero,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub offset: u64,
    /// Length of the plain data.
    pub len: u32,
    /// blake3 of the plain data, computed at the source.
    pub hash: [u8; 32],
    pub encoding: Encoding,
    pub payload: Vec<u8>,
}

impl Chunk {
    /// A raw chunk carrying `data`, hashed here (tests, tools and benches).
    pub fn raw(offset: u64, data: Vec<u8>) -> Self {
        Chunk {
            offset,
            len: data.len() as u32,
            hash: *blake3::hash(&data).as_bytes(),
            encoding: Encoding::Raw,
            payload: data,
        }
    }

    pub fn zero(offset: u64, len: u32) -> Self {
        let zeros = vec![0u8; len as usize];
        Chunk {
            offset,
            len,
            hash: *blake3::hash(&zeros).as_bytes(),
            encoding: Encoding::Zero,
            payload: Vec::new(),
        }
    }

    pub fn zstd(offset: u64, data: &[u8], level: i32) -> std::io::Result<Self> {
        Ok(Chunk {
            offset,
            len: data.len() as u32,
            hash: *blake3::hash(data).as_bytes(),
            encoding: Encoding::Zstd,
            payload: zstd::bulk::compress(data, level)?,
        })
    }
}

/// One ordered unit of replication: applied entirely or not at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyBatch {
    pub disk: String,
    pub generation: u64,
    pub seq: u64,
    pub chunks: Vec<Chunk>,
}

/// How much a recovery point can be trusted (DESIGN.md "How a recovery point
/// earns its label"); the agent earns the label, the target records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    NotConsistent,
    CrashConsistent,
    AppConsistent,
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Consistency::NotConsistent => "not-consistent",
            Consistency::CrashConsistent => "crash-consistent",
            Consistency::AppConsistent => "app-consistent",
        })
    }
}

/// A recovery-point marker. It takes its own `seq` in the disk's sequence
/// space (as batches do), and stands for the disk after every batch before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Barrier {
    pub disk: String,
    pub generation: u64,
    pub seq: u64,
    pub label: Consistency,
    /// The moment the point stands for (source clock), ms since the Unix
    /// epoch; 0 means "use the target's clock".
    pub time_ms: u64,
}

/// Old contents of a disk range saved for a recovery point: the bytes, or
/// `None` when they were all zero (a replica's never-written regions, which
/// an initial sync overwrites with a point open, cost no space or I/O).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undo {
    pub offset: u64,
    pub len: u32,
    pub data: Option<Vec<u8>>,
}

impl Undo {
    /// Saves `data` read at `offset`, dropping it when it is all zero.
    pub fn saved(offset: u64, data: Vec<u8>) -> Undo {
        Undo {
            offset,
            len: data.len() as u32,
            data: (!crate::vmdk::export::is_zero(&data)).then_some(data),
        }
    }

    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// A verified chunk of a batch in plain form. Raw chunks borrow the batch's
/// payload: the apply path copies each byte only into the journal and the
/// replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<'a> {
    pub offset: u64,
    pub data: Cow<'a, [u8]>,
}

/// Checks every chunk of `batch` against a disk of `size` bytes and returns the
/// plain data. Any failure rejects the whole batch: nothing has been written.
pub fn verify_batch<'a>(batch: &'a ApplyBatch, disk: &str, size: u64) -> Result<Vec<Verified<'a>>> {
    if batch.disk != disk {
        return Err(TargetError::WrongDisk {
            disk: disk.to_string(),
            got: batch.disk.clone(),
        });
    }
    let mut out = Vec::with_capacity(batch.chunks.len());
    for c in &batch.chunks {
        let len = u64::from(c.len);
        if len > MAX_CHUNK_LEN {
            return Err(TargetError::ChunkTooLarge {
                disk: disk.to_string(),
                seq: batch.seq,
                len,
                limit: MAX_CHUNK_LEN,
            });
        }
        match c.offset.checked_add(len) {
            Some(end) if end <= size => {}
            _ => {
                return Err(TargetError::OutOfRange {
                    disk: disk.to_string(),
                    offset: c.offset,
                    len,
                    size,
                });
            }
        }
        let data = match c.encoding {
            Encoding::Raw => {
                if c.payload.len() as u64 != len {
                    return Err(TargetError::HashMismatch {
                        disk: disk.to_string(),
                        seq: batch.seq,
                        offset: c.offset,
                    });
                }
                Cow::Borrowed(c.payload.as_slice())
            }
            Encoding::Zero => Cow::Owned(vec![0u8; c.len as usize]),
            Encoding::Zstd => Cow::Owned(decode_zstd(&c.payload, c.len).map_err(|reason| {
                TargetError::Decompress {
                    disk: disk.to_string(),
                    seq: batch.seq,
                    offset: c.offset,
                    len: c.len,
                    reason,
                }
            })?),
        };
        if blake3::hash(&data).as_bytes() != &c.hash {
            return Err(TargetError::HashMismatch {
                disk: disk.to_string(),
                seq: batch.seq,
                offset: c.offset,
            });
        }
        if !data.is_empty() {
            out.push(Verified {
                offset: c.offset,
                data,
            });
        }
    }
    Ok(out)
}

/// Decodes at most `len` bytes: a frame that claims more is refused before it
/// can allocate, one that yields less is refused after.
fn decode_zstd(payload: &[u8], len: u32) -> std::result::Result<Vec<u8>, String> {
    let data = zstd::bulk::decompress(payload, len as usize).map_err(|e| e.to_string())?;
    if data.len() != len as usize {
        return Err(format!("decoded {} bytes", data.len()));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(chunks: Vec<Chunk>) -> ApplyBatch {
        ApplyBatch {
            disk: "d".into(),
            generation: 1,
            seq: 1,
            chunks,
        }
    }

    #[test]
    fn verify_decodes_every_encoding() {
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 7) as u8).collect();
        let b = batch(vec![
            Chunk::raw(0, data.clone()),
            Chunk::zstd(8192, &data, 1).unwrap(),
            Chunk::zero(16384, 4096),
        ]);
        let plain = verify_batch(&b, "d", 1 << 20).unwrap();
        assert_eq!(plain[0].data, data);
        assert_eq!(plain[1].data, data);
        assert_eq!(plain[2].data, vec![0u8; 4096]);
    }

    #[test]
    fn verify_rejects_a_flipped_payload_bit() {
        let mut c = Chunk::raw(0, vec![1u8; 4096]);
        c.payload[100] ^= 1;
        let err = verify_batch(&batch(vec![c]), "d", 1 << 20).unwrap_err();
        assert!(matches!(err, TargetError::HashMismatch { offset: 0, .. }));
    }

    #[test]
    fn verify_rejects_a_zstd_bomb_beyond_its_length() {
        let big = vec![0u8; 1 << 20];
        let mut c = Chunk::zstd(0, &big, 1).unwrap();
        c.len = 4096; // claims less than the frame decodes to
        let err = verify_batch(&batch(vec![c]), "d", 1 << 22).unwrap_err();
        assert!(matches!(err, TargetError::Decompress { .. }));
    }

    #[test]
    fn verify_refuses_ranges_beyond_the_disk_end() {
        let c = Chunk::raw((1 << 20) - 512, vec![0u8; 1024]);
        let err = verify_batch(&batch(vec![c]), "d", 1 << 20).unwrap_err();
        assert!(matches!(err, TargetError::OutOfRange { .. }));
        let c = Chunk::raw(u64::MAX - 10, vec![0u8; 1024]);
        assert!(verify_batch(&batch(vec![c]), "d", 1 << 20).is_err());
    }
}
