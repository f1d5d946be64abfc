//! Building chunks at the source and verifying them at relay and target.
//!
//! The hash is always over the plain data, so every hop checks the same value
//! whatever encoding the chunk travelled in, and a relay may re-compress.

use bytes::Bytes;

use crate::frame::{Chunk, Encoding, MAX_CHUNK_LEN};

/// The plain data of a verified chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlainData {
    /// `len` zero bytes; nothing was allocated for them.
    Zero(u32),
    /// The bytes themselves.
    Data(Bytes),
}

impl PlainData {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            PlainData::Zero(n) => *n as usize,
            PlainData::Data(b) => b.len(),
        }
    }

    /// Whether the data is empty (never true for a verified chunk).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The data as bytes, materialising zeros if needed.
    pub fn to_bytes(&self) -> Bytes {
        match self {
            PlainData::Zero(n) => Bytes::from(vec![0u8; *n as usize]),
            PlainData::Data(b) => b.clone(),
        }
    }
}

/// Why a chunk failed verification or could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk at offset {offset}: blake3 of the plain data does not match the hash sent")]
    HashMismatch { offset: u64 },
    #[error("chunk at offset {offset}: zstd payload does not decompress: {reason}")]
    Decompress { offset: u64, reason: String },
    #[error("chunk at offset {offset}: decoded to {got} bytes, expected {expected}")]
    LengthMismatch {
        offset: u64,
        expected: u32,
        got: usize,
    },
    #[error("chunk at offset {offset}: length {len} outside 1..={MAX_CHUNK_LEN}")]
    BadLength { offset: u64, len: usize },
    #[error("chunk at offset {offset}: zstd compression failed: {reason}")]
    Compress { offset: u64, reason: String },
}

/// Zero bytes to hash all-zero chunks without allocating.
static ZEROS: [u8; MAX_CHUNK_LEN as usize] = [0; MAX_CHUNK_LEN as usize];

/// blake3 of `len` zero bytes.
pub fn zero_hash(len: u32) -> [u8; 32] {
    let len = (len as usize).min(ZEROS.len());
    *blake3::hash(&ZEROS[..len]).as_bytes()
}

/// Decodes the chunk's payload (zstd bounded to the announced plain length)
/// and checks its blake3 against the hash sent with it.
pub fn verify_chunk(chunk: &Chunk) -> Result<PlainData, ChunkError> {
    let offset = chunk.offset;
    if chunk.len == 0 || chunk.len > MAX_CHUNK_LEN {
        return Err(ChunkError::BadLength {
            offset,
            len: chunk.len as usize,
        });
    }
    let (data, hash) = match chunk.encoding {
        Encoding::Zero => {
            if !chunk.payload.is_empty() {
                return Err(ChunkError::LengthMismatch {
                    offset,
                    expected: 0,
                    got: chunk.payload.len(),
                });
            }
            (PlainData::Zero(chunk.len), zero_hash(chunk.len))
        }
        Encoding::Raw => {
            let hash = *blake3::hash(&chunk.payload).as_bytes();
            (PlainData::Data(chunk.payload.clone()), hash)
        }
        Encoding::Zstd => {
            // The capacity bounds the output: a zstd bomb fails instead of
            // allocating more than one chunk.
            let plain =
                zstd::bulk::decompress(&chunk.payload, chunk.len as usize).map_err(|e| {
                    ChunkError::Decompress {
                        offset,
                        reason: e.to_string(),
                    }
                })?;
            let hash = *blake3::hash(&plain).as_bytes();
            (PlainData::Data(Bytes::from(plain)), hash)
        }
    };
    if data.len() != chunk.len as usize {
        return Err(ChunkError::LengthMismatch {
            offset,
            expected: chunk.len,
            got: data.len(),
        });
    }
    if hash != chunk.hash {
        return Err(ChunkError::HashMismatch { offset });
    }
    Ok(data)
}

/// Builds a chunk from plain data read at `offset`: hashes it, sends all-zero
/// data as a zero marker, and compresses with zstd at `zstd_level` when that
/// makes it smaller (`None`: never compress).
pub fn build_chunk(offset: u64, data: &[u8], zstd_level: Option<i32>) -> Result<Chunk, ChunkError> {
    let len = u32::try_from(data.len())
        .ok()
        .filter(|&l| l > 0 && l <= MAX_CHUNK_LEN)
        .ok_or(ChunkError::BadLength {
            offset,
            len: data.len(),
        })?;
    let hash = *blake3::hash(data).as_bytes();
    if is_all_zero(data) {
        return Ok(Chunk {
            offset,
            len,
            hash,
            encoding: Encoding::Zero,
            payload: Bytes::new(),
        });
    }
    if let Some(level) = zstd_level {
        let compressed = zstd::bulk::compress(data, level).map_err(|e| ChunkError::Compress {
            offset,
            reason: e.to_string(),
        })?;
        if compressed.len() < data.len() {
            return Ok(Chunk {
                offset,
                len,
                hash,
                encoding: Encoding::Zstd,
                payload: Bytes::from(compressed),
            });
        }
    }
    Ok(Chunk {
        offset,
        len,
        hash,
        encoding: Encoding::Raw,
        payload: Bytes::copy_from_slice(data),
    })
}

/// Whether every byte of `data` is zero; word-at-a-time because it runs on
/// every chunk read.
pub fn is_all_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    words
        .by_ref()
        .all(|w| w.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_chunks_verify_to_the_same_data() {
        let compressible = vec![b'a'; 65536];
        let zero = vec![0u8; 65536];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mixed: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for (data, enc) in [
            (&compressible, Encoding::Zstd),
            (&zero, Encoding::Zero),
            (&mixed, Encoding::Raw),
        ] {
            let c = build_chunk(4096, data, Some(1)).unwrap();
            assert_eq!(c.encoding, enc);
            assert_eq!(verify_chunk(&c).unwrap().to_bytes(), &data[..]);
        }
    }

    #[test]
    fn corrupted_payload_fails_with_hash_mismatch() {
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let mut c = build_chunk(0, &data, None).unwrap();
        let mut p = c.payload.to_vec();
        p[100] ^= 1;
        c.payload = Bytes::from(p);
        assert_eq!(
            verify_chunk(&c),
            Err(ChunkError::HashMismatch { offset: 0 })
        );
    }

    #[test]
    fn zstd_bomb_is_bounded_by_announced_length() {
        let big = vec![b'x'; 1 << 20];
        let mut c = build_chunk(0, &big, Some(1)).unwrap();
        c.len = 4096;
        assert!(matches!(
            verify_chunk(&c),
            Err(ChunkError::Decompress { .. } | ChunkError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn is_all_zero_checks_every_byte() {
        for n in [0usize, 1, 15, 16, 17, 4096] {
            let mut v = vec![0u8; n];
            assert!(is_all_zero(&v));
            if n > 0 {
                v[n - 1] = 1;
                assert!(!is_all_zero(&v));
                v[n - 1] = 0;
                v[0] = 1;
                assert!(!is_all_zero(&v));
            }
        }
    }
}
