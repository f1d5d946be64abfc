//! Turning the plain bytes of one chunk into what goes on the wire: blake3 of
//! the plain data, then a zero marker, zstd, or the raw bytes.

use blockferry_durable::is_zero;
use bytes::Bytes;

use super::{Chunk, Encoding};

/// Compressed output must save at least 1/`PAYS_DIVISOR` of the chunk, else
/// the chunk is stored raw: the receiver then skips a decompression that
/// would buy almost nothing.
const PAYS_DIVISOR: usize = 16;

/// Per-worker state: a reusable zstd context and the hash of an all-zero chunk.
pub(crate) struct Encoder {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    zero_hash: Option<(usize, [u8; 32])>,
    hash_only: bool,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("compress", &self.compressor.is_some())
            .field("hash_only", &self.hash_only)
            .finish()
    }
}

impl Encoder {
    pub(crate) fn new(zstd_level: Option<i32>, hash_only: bool) -> std::io::Result<Self> {
        let compressor = match zstd_level {
            Some(level) if !hash_only => Some(zstd::bulk::Compressor::new(level)?),
            _ => None,
        };
        Ok(Encoder {
            compressor,
            zero_hash: None,
            hash_only,
        })
    }

    /// Encodes the chunk at `offset` whose plain bytes are `data`.
    pub(crate) fn encode(&mut self, offset: u64, data: &[u8]) -> Chunk {
        let len = data.len() as u32;
        if is_zero(data) {
            // Hashing zeros is a quarter of the work of a sparse disk's
            // initial sync; every full-size zero chunk has the same hash.
            let hash = match self.zero_hash {
                Some((n, h)) if n == data.len() => h,
                _ => {
                    let h = *blake3::hash(data).as_bytes();
                    self.zero_hash = Some((data.len(), h));
                    h
                }
            };
            return Chunk {
                offset,
                len,
                hash,
                encoding: Encoding::Zero,
                payload: Bytes::new(),
            };
        }
        let hash = *blake3::hash(data).as_bytes();
        if self.hash_only {
            return Chunk {
                offset,
                len,
                hash,
                encoding: Encoding::Raw,
                payload: Bytes::new(),
            };
        }
        // One allocation per chunk, sized for zstd's worst case, becomes the
        // payload either way: no copy of the compressed bytes, and the raw
        // fallback reuses it.
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
        if let Some(c) = self.compressor.as_mut() {
            let limit = data.len() - data.len() / PAYS_DIVISOR;
            // An error here only means "did not fit" or a zstd failure; in
            // both cases the raw bytes are the correct fallback.
            if let Ok(n) = c.compress_to_buffer(data, &mut out)
                && n <= limit
            {
                out.truncate(n);
                // Batches wait for acks holding their payloads: give back
                // the slack (glibc shrinks in place, without a copy).
                out.shrink_to_fit();
                return Chunk {
                    offset,
                    len,
                    hash,
                    encoding: Encoding::Zstd,
                    payload: Bytes::from(out),
                };
            }
        }
        out.clear();
        out.extend_from_slice(data);
        Chunk {
            offset,
            len,
            hash,
            encoding: Encoding::Raw,
            payload: Bytes::from(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incompressible_chunk_is_stored_raw_and_compressible_as_zstd() {
        let mut e = Encoder::new(Some(1), false).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let c = e.encode(0, &random);
        assert_eq!(c.encoding, Encoding::Raw);
        assert_eq!(&c.payload[..], &random[..]);
        let text = b"blockferry ".repeat(6000);
        let c = e.encode(0, &text);
        assert_eq!(c.encoding, Encoding::Zstd);
        assert_eq!(
            zstd::bulk::decompress(&c.payload, text.len()).unwrap(),
            text
        );
        assert_eq!(c.hash, *blake3::hash(&text).as_bytes());
    }
}
