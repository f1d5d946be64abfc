//! The reader on real block devices: loop devices this test creates and
//! detaches itself (root only: ignored unless run with --ignored).

mod reader_support;

use std::io::Write;
use std::process::Command;

use blockferry_agent::reader::{self, ReaderConfig, ReaderError};
use blockferry_testkit::devices::LoopDev;
use blockferry_testkit::privileged::require_root;
use reader_support::{check_fine_range, check_range, mixed_data, read_ranges, read_ranges_fine};

fn backing_file(data: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(data).expect("write backing file");
    f.as_file().sync_all().expect("sync backing file");
    f
}

#[test]
#[ignore = "needs root: loop devices"]
fn loop_device_chunks_decode_to_the_backing_bytes() {
    require_root("loop_device_chunks_decode_to_the_backing_bytes");
    // Not a multiple of the chunk size: the device's last chunk is short.
    let data = mixed_data(6 * 1024 * 1024 + 3 * 512, 11);
    let backing = backing_file(&data);
    for direct_io in [false, true] {
        let lo = LoopDev::attach(backing.path(), direct_io);
        let size = data.len() as u64;
        for queue_depth in [1u32, 64] {
            let config = ReaderConfig {
                queue_depth,
                ..ReaderConfig::default()
            };
            let ranges = [(0, size), (65536 * 3 + 17, 200_000), (size - 512, 512)];
            let results = read_ranges(&lo.path, &config, &ranges);
            for (r, res) in ranges.iter().zip(&results) {
                check_range(&data, 65536, *r, res);
            }
            // Tracked writes read at 4 KiB, with O_DIRECT, up to the short tail.
            let fine = [
                (4096 * 7 + 5, 100),
                (65536 - 4096, 12288),
                (size - 700, 700),
            ];
            let results = read_ranges_fine(&lo.path, &config, &fine);
            for (r, res) in fine.iter().zip(&results) {
                check_fine_range(&data, 65536, *r, res);
            }
        }
        let (handle, _events) = reader::spawn(&lo.path, &ReaderConfig::default()).unwrap();
        assert_eq!(handle.size(), size, "BLKGETSIZE64 of {}", lo.path.display());
        assert!(handle.direct(), "block devices take O_DIRECT");
        let err = handle.submit(size - 4096, 8192).unwrap_err();
        assert!(matches!(err, ReaderError::BeyondEnd { .. }), "{err}");
        assert!(err.to_string().contains(&lo.path.display().to_string()));
    }
}

#[test]
#[ignore = "needs root: loop devices"]
fn loop_device_leaf_hashes_match_the_backing_file() {
    require_root("loop_device_leaf_hashes_match_the_backing_file");
    let data = mixed_data(2 * 1024 * 1024 + 512, 12);
    let backing = backing_file(&data);
    let lo = LoopDev::attach(backing.path(), true);
    let config = ReaderConfig::default();
    let from_device = reader::leaf_hashes(&lo.path, &config).unwrap().leaves;
    let from_file = reader::leaf_hashes(backing.path(), &config).unwrap().leaves;
    let want: Vec<[u8; 32]> = data
        .chunks(65536)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect();
    assert_eq!(from_device, want);
    assert_eq!(from_file, want);
}

#[test]
#[ignore = "needs root: loop devices"]
fn grown_loop_device_is_read_to_its_new_end_after_a_size_refresh() {
    require_root("grown_loop_device_is_read_to_its_new_end_after_a_size_refresh");
    let mut data = mixed_data(1024 * 1024 + 512, 13);
    let mut backing = backing_file(&data);
    let lo = LoopDev::attach(backing.path(), true);
    let (handle, mut events) = reader::spawn(&lo.path, &ReaderConfig::default()).unwrap();
    let old = data.len() as u64;
    assert_eq!(handle.size(), old);

    let more = mixed_data(700 * 1024, 14);
    backing.write_all(&more).unwrap();
    backing.as_file().sync_all().unwrap();
    data.extend_from_slice(&more);
    let status = Command::new("losetup")
        .arg("-c")
        .arg(&lo.path)
        .status()
        .unwrap();
    assert!(status.success(), "losetup -c failed");

    // Until the size is refreshed the new space is refused, not guessed.
    assert!(matches!(
        handle.submit(old, 512),
        Err(ReaderError::BeyondEnd { .. })
    ));
    assert_eq!(handle.refresh_size().unwrap(), data.len() as u64);
    let whole = (0, data.len() as u64);
    handle.submit(whole.0, whole.1).unwrap();
    handle.close();
    let mut result = reader_support::RangeResult::default();
    while let Some(ev) = events.blocking_next() {
        match ev {
            reader::ReaderEvent::Chunk { chunk, .. } => result.chunks.push(chunk),
            reader::ReaderEvent::RangeDone { ok, .. } => result.ok = Some(ok),
            other => panic!("unexpected {other:?}"),
        }
    }
    check_range(&data, 65536, whole, &result);
}
