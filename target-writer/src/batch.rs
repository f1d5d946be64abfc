//! What the target applies: batches of proto [`Chunk`]s addressed to one
//! store, and the verification that runs before a single byte is written:
//! range against the disk, then proto's [`verify_chunk`] (size limit, bounded
//! zstd decode, blake3 of the plain data). Payloads stay the `Bytes` they
//! arrived in: a raw chunk is never copied on the way in.

use blockferry_proto::frame::MAX_CHUNK_LEN;
use blockferry_proto::{Chunk, ChunkError, PlainData, verify_chunk};
use bytes::Bytes;

use crate::error::{Result, TargetError};

/// One ordered unit of replication: applied entirely or not at all. `disk` is
/// the name of the store it is addressed to (the disk id's text for a served
/// disk); the chunks are the wire's, shared with the frame they came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyBatch {
    pub disk: String,
    pub generation: u64,
    pub seq: u64,
    pub chunks: Vec<Chunk>,
}

impl ApplyBatch {
    /// The batch of a proto frame for the store named `disk`; the payloads
    /// are shared, not copied.
    pub fn from_proto(disk: &str, b: &blockferry_proto::ExtentBatch) -> Self {
        ApplyBatch {
            disk: disk.to_string(),
            generation: b.generation.0,
            seq: b.seq.0,
            chunks: b.chunks.clone(),
        }
    }
}

/// A raw chunk carrying `data`, hashed here (tests, tools and benches that
/// need a given encoding; the source uses [`blockferry_proto::build_chunk`]).
pub fn raw_chunk(offset: u64, data: Vec<u8>) -> Chunk {
    Chunk {
        offset,
        len: data.len() as u32,
        hash: *blake3::hash(&data).as_bytes(),
        encoding: blockferry_proto::Encoding::Raw,
        payload: Bytes::from(data),
    }
}

/// A chunk of `len` zero bytes.
pub fn zero_chunk(offset: u64, len: u32) -> Chunk {
    Chunk {
        offset,
        len,
        hash: blockferry_proto::chunk::zero_hash(len),
        encoding: blockferry_proto::Encoding::Zero,
        payload: Bytes::new(),
    }
}

/// A zstd chunk of `data` at `level`, even when it does not shrink.
pub fn zstd_chunk(offset: u64, data: &[u8], level: i32) -> std::io::Result<Chunk> {
    Ok(Chunk {
        offset,
        len: data.len() as u32,
        hash: *blake3::hash(data).as_bytes(),
        encoding: blockferry_proto::Encoding::Zstd,
        payload: Bytes::from(zstd::bulk::compress(data, level)?),
    })
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
            data: (!blockferry_durable::is_zero(&data)).then_some(data),
        }
    }

    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.len)
    }
}

/// A verified chunk of a batch in plain form. Raw chunks share the batch's
/// payload: the apply path copies each byte only into the journal and the
/// replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub offset: u64,
    pub data: Bytes,
}

/// Checks every chunk of `batch` against a disk of `size` bytes and returns the
/// plain data. Any failure rejects the whole batch: nothing has been written.
pub fn verify_batch(batch: &ApplyBatch, disk: &str, size: u64) -> Result<Vec<Verified>> {
    if batch.disk != disk {
        return Err(TargetError::WrongDisk {
            disk: disk.to_string(),
            got: batch.disk.clone(),
        });
    }
    let mut out = Vec::with_capacity(batch.chunks.len());
    for c in &batch.chunks {
        let len = u64::from(c.len);
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
        let data = verify_chunk(c).map_err(|e| chunk_error(disk, batch.seq, c, e))?;
        let data = match data {
            PlainData::Data(b) => b,
            PlainData::Zero(_) => data_of_zeros(c.len),
        };
        out.push(Verified {
            offset: c.offset,
            data,
        });
    }
    Ok(out)
}

/// `len` zero bytes, for a zero chunk written in place.
fn data_of_zeros(len: u32) -> Bytes {
    Bytes::from(vec![0u8; len as usize])
}

fn chunk_error(disk: &str, seq: u64, c: &Chunk, e: ChunkError) -> TargetError {
    let disk = disk.to_string();
    match e {
        ChunkError::Decompress { offset, reason } => TargetError::Decompress {
            disk,
            seq,
            offset,
            len: c.len,
            reason,
        },
        ChunkError::LengthMismatch { offset, got, .. }
            if c.encoding == blockferry_proto::Encoding::Zstd =>
        {
            TargetError::Decompress {
                disk,
                seq,
                offset,
                len: c.len,
                reason: format!("decoded {got} bytes"),
            }
        }
        ChunkError::BadLength { len, .. } if len > MAX_CHUNK_LEN as usize => {
            TargetError::ChunkTooLarge {
                disk,
                seq,
                len: len as u64,
                limit: u64::from(MAX_CHUNK_LEN),
            }
        }
        ChunkError::HashMismatch { offset } | ChunkError::LengthMismatch { offset, .. } => {
            TargetError::HashMismatch { disk, seq, offset }
        }
        source @ (ChunkError::BadLength { .. } | ChunkError::Compress { .. }) => {
            TargetError::BadChunk { disk, seq, source }
        }
    }
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
            raw_chunk(0, data.clone()),
            zstd_chunk(8192, &data, 1).unwrap(),
            zero_chunk(16384, 4096),
        ]);
        let plain = verify_batch(&b, "d", 1 << 20).unwrap();
        assert_eq!(plain[0].data, data);
        assert_eq!(plain[1].data, data);
        assert_eq!(plain[2].data, vec![0u8; 4096]);
    }

    #[test]
    fn verify_shares_a_raw_payload_instead_of_copying_it() {
        let b = batch(vec![raw_chunk(0, vec![5u8; 4096])]);
        let plain = verify_batch(&b, "d", 1 << 20).unwrap();
        assert_eq!(plain[0].data.as_ptr(), b.chunks[0].payload.as_ptr());
    }

    #[test]
    fn verify_rejects_a_flipped_payload_bit() {
        let mut c = raw_chunk(0, vec![1u8; 4096]);
        let mut p = c.payload.to_vec();
        p[100] ^= 1;
        c.payload = Bytes::from(p);
        let err = verify_batch(&batch(vec![c]), "d", 1 << 20).unwrap_err();
        assert!(matches!(err, TargetError::HashMismatch { offset: 0, .. }));
    }

    #[test]
    fn verify_rejects_a_zstd_bomb_beyond_its_length() {
        let big = vec![0u8; 1 << 20];
        let mut c = zstd_chunk(0, &big, 1).unwrap();
        c.len = 4096; // claims less than the frame decodes to
        let err = verify_batch(&batch(vec![c]), "d", 1 << 22).unwrap_err();
        assert!(matches!(err, TargetError::Decompress { .. }));
    }

    #[test]
    fn verify_refuses_a_chunk_over_the_proto_limit() {
        let c = raw_chunk(0, vec![0u8; MAX_CHUNK_LEN as usize + 512]);
        let err = verify_batch(&batch(vec![c]), "d", 1 << 24).unwrap_err();
        assert!(matches!(err, TargetError::ChunkTooLarge { .. }));
    }

    #[test]
    fn verify_refuses_ranges_beyond_the_disk_end() {
        let c = raw_chunk((1 << 20) - 512, vec![0u8; 1024]);
        let err = verify_batch(&batch(vec![c]), "d", 1 << 20).unwrap_err();
        assert!(matches!(err, TargetError::OutOfRange { .. }));
        let c = raw_chunk(u64::MAX - 10, vec![0u8; 1024]);
        assert!(verify_batch(&batch(vec![c]), "d", 1 << 20).is_err());
    }
}
