//! Helpers shared by the reader tests: test data, and running a reader to the
//! end while checking the order and content of what it produced.

#![allow(dead_code)]

use std::path::Path;

use blockferry_agent::reader::{self, Encoding, ReaderConfig, ReaderEvent};
pub use blockferry_testkit::data::mixed_data;

/// The plain bytes of a chunk, checked by the same code the relay and the
/// target run (decode, then compare blake3 with the hash sent).
pub fn plain(c: &blockferry_agent::reader::Chunk) -> Vec<u8> {
    blockferry_proto::verify_chunk(c)
        .expect("chunk verifies")
        .to_bytes()
        .to_vec()
}

/// Everything one range produced.
#[derive(Debug, Default)]
pub struct RangeResult {
    pub chunks: Vec<blockferry_agent::reader::Chunk>,
    pub failed: Vec<(u64, String)>,
    pub ok: Option<bool>,
}

/// Submits `ranges`, closes, and collects the events, asserting the order
/// promised by the reader: ranges in submission order, each followed by its
/// `RangeDone`, chunks by ascending offset.
pub fn read_ranges(path: &Path, config: &ReaderConfig, ranges: &[(u64, u64)]) -> Vec<RangeResult> {
    read_ranges_as(path, config, ranges, false)
}

/// [`read_ranges`] with `submit_fine` (4 KiB widening) instead of `submit`.
pub fn read_ranges_fine(
    path: &Path,
    config: &ReaderConfig,
    ranges: &[(u64, u64)],
) -> Vec<RangeResult> {
    read_ranges_as(path, config, ranges, true)
}

fn read_ranges_as(
    path: &Path,
    config: &ReaderConfig,
    ranges: &[(u64, u64)],
    fine: bool,
) -> Vec<RangeResult> {
    let (handle, mut events) = reader::spawn(path, config).expect("start reader");
    let ids: Vec<_> = ranges
        .iter()
        .map(|&(o, l)| {
            if fine {
                handle.submit_fine(o, l).expect("submit_fine")
            } else {
                handle.submit(o, l).expect("submit")
            }
        })
        .collect();
    handle.close();
    let mut results: Vec<RangeResult> = ranges.iter().map(|_| RangeResult::default()).collect();
    let mut current = 0usize;
    while let Some(ev) = events.blocking_next() {
        match ev {
            ReaderEvent::Chunk { range, chunk } => {
                assert_eq!(range, ids[current], "chunk out of range order");
                let r = &mut results[current];
                if let Some(prev) = r.chunks.last() {
                    assert!(prev.offset < chunk.offset, "chunks out of offset order");
                }
                r.chunks.push(chunk);
            }
            ReaderEvent::ChunkFailed {
                range,
                offset,
                error,
            } => {
                assert_eq!(range, ids[current]);
                results[current].failed.push((offset, error.to_string()));
            }
            ReaderEvent::RangeDone { range, ok } => {
                assert_eq!(range, ids[current], "range done out of order");
                results[current].ok = Some(ok);
                current += 1;
            }
            ReaderEvent::Fatal(e) => panic!("reader failed: {e}"),
        }
    }
    handle.join();
    assert_eq!(current, ranges.len(), "every range must be reported done");
    results
}

/// Checks that the chunks of the range `(offset, len)` cover exactly the
/// chunk-grid widening of it, and that each decodes to the source bytes
/// with the right hash.
pub fn check_range(src: &[u8], chunk_size: u64, (offset, len): (u64, u64), r: &RangeResult) {
    assert_eq!(r.ok, Some(true));
    assert!(r.failed.is_empty());
    let size = src.len() as u64;
    let (start, end) = if len == 0 {
        (offset, offset)
    } else {
        (
            offset / chunk_size * chunk_size,
            (offset + len).div_ceil(chunk_size) * chunk_size,
        )
    };
    let end = end.min(size);
    let mut at = start;
    for c in &r.chunks {
        assert_eq!(c.offset, at, "gap or overlap in chunks");
        let want_len = chunk_size.min(size - at);
        assert_eq!(
            u64::from(c.len),
            want_len,
            "chunk at {at} has the wrong length"
        );
        let source = &src[at as usize..(at + want_len) as usize];
        assert_eq!(
            c.hash,
            *blake3::hash(source).as_bytes(),
            "hash of chunk at {at}"
        );
        let decoded = plain(c);
        assert!(
            decoded == source,
            "payload of chunk at {at} differs from the source"
        );
        let all_zero = source.iter().all(|&b| b == 0);
        assert_eq!(
            c.encoding == Encoding::Zero,
            all_zero,
            "zero marker at {at}"
        );
        if c.encoding == Encoding::Zero {
            assert!(c.payload.is_empty());
        }
        if c.encoding == Encoding::Zstd {
            assert!(c.payload.len() < source.len());
        }
        at += want_len;
    }
    assert_eq!(at, end, "chunks end at {at}, range ends at {end}");
}

/// Checks that the chunks of a fine range `(offset, len)` cover exactly its
/// 4 KiB widening, are cut at every chunk-grid boundary and nowhere else, and
/// that each decodes to the source bytes with the right hash.
pub fn check_fine_range(src: &[u8], chunk_size: u64, (offset, len): (u64, u64), r: &RangeResult) {
    const GRAIN: u64 = 4096;
    assert_eq!(r.ok, Some(true));
    assert!(r.failed.is_empty());
    let size = src.len() as u64;
    let (start, end) = if len == 0 {
        (offset, offset)
    } else {
        (
            offset / GRAIN * GRAIN,
            ((offset + len).div_ceil(GRAIN) * GRAIN).min(size),
        )
    };
    let mut at = start;
    for c in &r.chunks {
        assert_eq!(c.offset, at, "gap or overlap in chunks");
        let next_grid = (at / chunk_size + 1) * chunk_size;
        let want_len = next_grid.min(end) - at;
        assert_eq!(
            u64::from(c.len),
            want_len,
            "chunk at {at} must end at the grid boundary or the range end"
        );
        let source = &src[at as usize..(at + want_len) as usize];
        assert_eq!(
            c.hash,
            *blake3::hash(source).as_bytes(),
            "hash of chunk at {at}"
        );
        assert!(
            plain(c) == source,
            "payload of chunk at {at} differs from the source"
        );
        assert_eq!(
            c.encoding == Encoding::Zero,
            source.iter().all(|&b| b == 0),
            "zero marker at {at}"
        );
        at += want_len;
    }
    assert_eq!(at, end, "chunks end at {at}, range ends at {end}");
}
