//! The reader on regular files: content, hashes, zero markers, odd sizes,
//! queue depths, refusal of ranges past the end.

mod reader_support;

use std::io::Write;

use blockferry_agent::reader::{self, Encoding, ReaderConfig, ReaderError, ReaderEvent};
use reader_support::{check_range, mixed_data, read_ranges};

fn temp_file(data: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(data).expect("write temp file");
    f.as_file().sync_all().expect("sync temp file");
    f
}

#[test]
fn whole_file_of_odd_size_decodes_to_the_source_with_matching_hashes() {
    let data = mixed_data(3 * 1024 * 1024 + 12_345, 1);
    let f = temp_file(&data);
    let config = ReaderConfig::default();
    let len = data.len() as u64;
    let results = read_ranges(f.path(), &config, &[(0, len)]);
    check_range(&data, 65536, (0, len), &results[0]);
    let last = results[0].chunks.last().unwrap();
    assert_eq!(u64::from(last.len), len % 65536, "last chunk is short");
    // The mixed data has every kind of chunk; make sure each path ran.
    for enc in [Encoding::Raw, Encoding::Zstd, Encoding::Zero] {
        assert!(
            results[0].chunks.iter().any(|c| c.encoding == enc),
            "no {enc:?} chunk"
        );
    }
}

#[test]
fn zero_chunks_come_as_markers_without_payload() {
    let mut data = vec![0u8; 1024 * 1024];
    data[5 * 65536 + 7] = 1;
    let f = temp_file(&data);
    let results = read_ranges(
        f.path(),
        &ReaderConfig::default(),
        &[(0, data.len() as u64)],
    );
    check_range(&data, 65536, (0, data.len() as u64), &results[0]);
    for c in &results[0].chunks {
        let want = if c.offset == 5 * 65536 {
            Encoding::Zstd
        } else {
            Encoding::Zero
        };
        assert_eq!(c.encoding, want, "chunk at {}", c.offset);
    }
}

#[test]
fn unaligned_ranges_are_widened_to_the_chunk_grid_in_submission_order() {
    let data = mixed_data(2 * 1024 * 1024 + 777, 2);
    let f = temp_file(&data);
    let size = data.len() as u64;
    let ranges = [
        (100, 5),
        (size - 1, 1),
        (70_000, 300_000),
        (0, 0),
        (4096, 4096),
        (1_000_000, 0),
        (0, size),
        (size, 0),
    ];
    for chunk_size in [4096u32, 65536, 1 << 20] {
        let config = ReaderConfig {
            chunk_size,
            ..ReaderConfig::default()
        };
        let results = read_ranges(f.path(), &config, &ranges);
        for (r, res) in ranges.iter().zip(&results) {
            check_range(&data, u64::from(chunk_size), *r, res);
        }
    }
}

#[test]
fn queue_depth_one_and_a_large_one_give_the_same_chunks() {
    let data = mixed_data(4 * 1024 * 1024 + 512, 3);
    let f = temp_file(&data);
    let size = data.len() as u64;
    let ranges = [
        (0, size / 2),
        (size / 3, size / 3),
        (size / 2, size - size / 2),
    ];
    let mut all = Vec::new();
    for (queue_depth, workers, output_capacity) in [(1, 1, 1), (256, 2, 64), (8, 3, 2)] {
        let config = ReaderConfig {
            queue_depth,
            workers,
            output_capacity,
            ..ReaderConfig::default()
        };
        let results = read_ranges(f.path(), &config, &ranges);
        for (r, res) in ranges.iter().zip(&results) {
            check_range(&data, 65536, *r, res);
        }
        all.push(
            results
                .iter()
                .flat_map(|r| r.chunks.iter().map(|c| (c.offset, c.hash)))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(all[0], all[1]);
    assert_eq!(all[0], all[2]);
}

#[test]
fn page_cache_mode_and_no_compression_read_the_same_bytes() {
    let data = mixed_data(1024 * 1024 + 3, 4);
    let f = temp_file(&data);
    let config = ReaderConfig {
        direct: false,
        zstd_level: None,
        ..ReaderConfig::default()
    };
    let len = data.len() as u64;
    let results = read_ranges(f.path(), &config, &[(0, len)]);
    check_range(&data, 65536, (0, len), &results[0]);
    assert!(
        results[0]
            .chunks
            .iter()
            .all(|c| c.encoding != Encoding::Zstd)
    );
}

#[test]
fn range_past_the_end_is_refused_with_device_and_offset() {
    let data = mixed_data(100_000, 5);
    let f = temp_file(&data);
    let (handle, _events) = reader::spawn(f.path(), &ReaderConfig::default()).unwrap();
    assert_eq!(handle.size(), 100_000);
    for (offset, len) in [(99_999, 2), (100_001, 0), (200_000, 10), (1, u64::MAX)] {
        let err = handle.submit(offset, len).unwrap_err();
        assert!(
            matches!(err, ReaderError::BeyondEnd { offset: o, .. } if o == offset),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&offset.to_string()), "{msg}");
        assert!(msg.contains(&f.path().display().to_string()), "{msg}");
    }
    // The last byte itself is fine.
    handle.submit(99_999, 1).unwrap();
}

#[test]
fn bad_config_and_missing_file_are_refused_with_the_reason() {
    let f = temp_file(&[1, 2, 3]);
    let config = ReaderConfig {
        chunk_size: 65535,
        ..ReaderConfig::default()
    };
    let err = reader::spawn(f.path(), &config).unwrap_err();
    assert!(err.to_string().contains("65535"), "{err}");
    let missing = f.path().with_extension("missing");
    let err = reader::spawn(&missing, &ReaderConfig::default()).unwrap_err();
    assert!(matches!(err, ReaderError::Open { .. }), "{err}");
}

#[test]
fn dropping_the_events_stops_the_reader() {
    let data = mixed_data(8 * 1024 * 1024, 6);
    let f = temp_file(&data);
    let config = ReaderConfig {
        output_capacity: 1,
        ..ReaderConfig::default()
    };
    let (handle, mut events) = reader::spawn(f.path(), &config).unwrap();
    handle.submit(0, data.len() as u64).unwrap();
    assert!(matches!(
        events.blocking_next(),
        Some(ReaderEvent::Chunk { .. })
    ));
    drop(events);
    // Returns only once every thread has exited and every buffer came home.
    handle.join();
}

#[test]
fn leaf_hashes_are_the_blake3_of_each_chunk() {
    let data = mixed_data(5 * 65536 + 100, 7);
    let f = temp_file(&data);
    let hashes = reader::leaf_hashes(f.path(), &ReaderConfig::default()).unwrap();
    assert_eq!(hashes.size, data.len() as u64);
    let leaves = hashes.leaves;
    let want: Vec<[u8; 32]> = data
        .chunks(65536)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect();
    assert_eq!(leaves, want);
}

#[tokio::test]
async fn events_can_be_awaited_from_async_code() {
    let data = mixed_data(600_000, 8);
    let f = temp_file(&data);
    let (handle, mut events) = reader::spawn(f.path(), &ReaderConfig::default()).unwrap();
    let id = handle.submit(0, data.len() as u64).unwrap();
    handle.close();
    let mut got = Vec::new();
    while let Some(ev) = events.next().await {
        match ev {
            ReaderEvent::Chunk { chunk, .. } => got.extend(reader_support::plain(&chunk)),
            ReaderEvent::RangeDone { range, ok } => assert!(range == id && ok),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got == data);
}

#[test]
fn hash_only_mode_carries_hashes_and_no_payload() {
    let data = mixed_data(1024 * 1024 + 9, 9);
    let f = temp_file(&data);
    let config = ReaderConfig {
        hash_only: true,
        ..ReaderConfig::default()
    };
    let (handle, mut events) = reader::spawn(f.path(), &config).unwrap();
    handle.submit(0, data.len() as u64).unwrap();
    handle.close();
    let mut n = 0;
    while let Some(ev) = events.blocking_next() {
        if let ReaderEvent::Chunk { chunk, .. } = ev {
            let at = chunk.offset as usize;
            let src = &data[at..at + chunk.len as usize];
            assert_eq!(chunk.hash, *blake3::hash(src).as_bytes());
            assert!(chunk.payload.is_empty());
            let zero = src.iter().all(|&b| b == 0);
            assert_eq!(chunk.encoding == Encoding::Zero, zero);
            n += 1;
        }
    }
    assert_eq!(n, data.len().div_ceil(65536));
}
