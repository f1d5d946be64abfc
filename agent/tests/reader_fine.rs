//! Fine-grained reads of tracked writes (`submit_fine`): ranges widened only to
//! 4 KiB and cut at the chunk grid; and the whole way of such chunks through
//! the wire codec, the receiver's batch check and the target's apply.

mod reader_support;

use std::collections::HashMap;
use std::io::Write;

use blockferry_agent::reader::{self, ReaderConfig};
use blockferry_proto::{DiskId, ExtentBatch, Frame, Generation, Seq};
use blockferry_target::{DiskStore, StoreOptions};
use bytes::BytesMut;
use reader_support::{RangeResult, check_fine_range, mixed_data, read_ranges, read_ranges_fine};

fn temp_file(data: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(data).expect("write temp file");
    f.as_file().sync_all().expect("sync temp file");
    f
}

/// Ranges a tracker hands out: single sectors, 4 KiB blocks, runs that cross
/// one or several grid boundaries, the device's tail, empty ranges.
fn tracked_ranges(size: u64) -> Vec<(u64, u64)> {
    vec![
        (100, 5),
        (4096, 4096),
        (65536 - 4096, 8192),
        (65536 - 512, 1024),
        (70_000, 300_000),
        (1_000_000, 0),
        (size - 1, 1),
        (size - 5000, 5000),
        (3 * 65536, 65536),
        (0, size),
        (size, 0),
    ]
}

#[test]
fn fine_ranges_are_widened_to_4k_and_cut_only_at_the_chunk_grid() {
    let data = mixed_data(2 * 1024 * 1024 + 1536, 5);
    let f = temp_file(&data);
    let size = data.len() as u64;
    let ranges = tracked_ranges(size);
    for chunk_size in [4096u32, 65536, 1 << 20] {
        let config = ReaderConfig {
            chunk_size,
            queue_depth: 8,
            ..ReaderConfig::default()
        };
        let results = read_ranges_fine(f.path(), &config, &ranges);
        for (r, res) in ranges.iter().zip(&results) {
            check_fine_range(&data, u64::from(chunk_size), *r, res);
            // At most one chunk of the range per chunk of the grid.
            let mut per_leaf: HashMap<u64, u32> = HashMap::new();
            for c in &res.chunks {
                *per_leaf
                    .entry(c.offset / u64::from(chunk_size))
                    .or_default() += 1;
                let last = c.offset + u64::from(c.len) - 1;
                assert_eq!(
                    c.offset / u64::from(chunk_size),
                    last / u64::from(chunk_size),
                    "chunk at {} crosses the grid",
                    c.offset
                );
            }
            assert!(per_leaf.values().all(|&n| n == 1), "range {r:?}");
        }
    }
}

#[test]
fn a_4k_write_costs_a_4k_read_not_a_whole_chunk() {
    let data = mixed_data(4 * 1024 * 1024, 6);
    let f = temp_file(&data);
    let writes: Vec<(u64, u64)> = (0..64u64).map(|i| (i * 61_440 + 8192, 4096)).collect();
    let config = ReaderConfig::default();
    let read = |results: &[RangeResult]| -> u64 {
        results
            .iter()
            .flat_map(|r| &r.chunks)
            .map(|c| u64::from(c.len))
            .sum()
    };
    let fine = read(&read_ranges_fine(f.path(), &config, &writes));
    let coarse = read(&read_ranges(f.path(), &config, &writes));
    assert_eq!(fine, 64 * 4096, "fine reads cover exactly the writes");
    assert_eq!(coarse, 64 * 65536, "whole-chunk reads cover whole chunks");
}

#[test]
fn fine_and_chunk_spans_match_what_the_reader_reads() {
    let data = mixed_data(1024 * 1024 + 512, 7);
    let f = temp_file(&data);
    let (handle, _events) = reader::spawn(f.path(), &ReaderConfig::default()).expect("reader");
    let size = data.len() as u64;
    assert_eq!(handle.fine_span(100..105), 0..4096);
    assert_eq!(handle.fine_span(4095..4097), 0..8192);
    assert_eq!(handle.fine_span(size - 1..size), size - 512..size);
    assert_eq!(handle.fine_span(7..7), 7..7);
    assert_eq!(handle.chunk_span(100..105), 0..65536);
    assert_eq!(handle.chunk_span(size - 1..size), 1024 * 1024..size);
    handle.join();
}

/// A disk of a size that is a multiple of 512 but not of 4096, so that the
/// last fine chunk is 512-aligned and short.
#[test]
fn fine_chunks_pass_the_wire_and_the_target_apply_makes_the_replica_equal_the_source() {
    let size: u64 = 3 * 1024 * 1024 + 1536;
    let old = mixed_data(size as usize, 8);
    let f = temp_file(&old);
    let store_dir = tempfile::tempdir().expect("store dir");
    let disk = "fine-reads";
    let mut store =
        DiskStore::create(store_dir.path(), disk, size, 1, StoreOptions::default()).expect("store");
    let config = ReaderConfig::default();

    // Initial sync in whole chunks.
    let sync = read_ranges(f.path(), &config, &[(0, size)]);
    apply(&mut store, disk, 1, sync[0].chunks.clone(), size);

    // Tracked writes of every shape, then read at 4 KiB granularity.
    let mut new = old.clone();
    let ranges = tracked_ranges(size);
    for (i, &(o, l)) in ranges.iter().enumerate() {
        if l == 0 || l == size {
            continue;
        }
        for (k, b) in new[o as usize..(o + l) as usize].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(k as u8) | 1;
        }
    }
    // Zeroed 4 KiB block: comes as a zero marker.
    new[8 * 65536..8 * 65536 + 4096].fill(0);
    let f = temp_file(&new);
    let mut writes: Vec<(u64, u64)> = ranges
        .into_iter()
        .filter(|&(_, l)| l != 0 && l != size)
        .collect();
    writes.push((8 * 65536, 4096));
    let results = read_ranges_fine(f.path(), &config, &writes);
    let chunks: Vec<_> = results.into_iter().flat_map(|r| r.chunks).collect();
    assert!(
        chunks.iter().any(|c| c.len % 4096 != 0),
        "the short tail chunk must be among them"
    );
    assert!(chunks.iter().all(|c| c.len <= 65536));
    apply(&mut store, disk, 2, chunks, size);

    let mut replica = vec![0u8; size as usize];
    store.read_at(&mut replica, 0).expect("read replica");
    assert!(replica == new, "the replica differs from the source");
    store.close().expect("close store");
}

/// Sends `chunks` as one batch the way the relay and the target see it:
/// encoded, decoded, checked, converted, applied.
fn apply(
    store: &mut DiskStore,
    disk: &str,
    seq: u64,
    chunks: Vec<blockferry_proto::Chunk>,
    size: u64,
) {
    let frame = Frame::Batch(ExtentBatch {
        disk: DiskId::from_bytes([7; 16]),
        generation: Generation(1),
        seq: Seq(seq),
        chunks,
    });
    let mut buf = BytesMut::new();
    frame.encode(&mut buf).expect("encode");
    let frame = Frame::decode_exact(buf.freeze()).expect("decode");
    blockferry_proto::check_batch(&frame, Some(size)).expect("receiver accepts the batch");
    let Frame::Batch(b) = frame else {
        panic!("not a batch")
    };
    let batch = blockferry_target::ApplyBatch::from_proto(disk, &b);
    store.apply(&batch).expect("target applies the batch");
}
