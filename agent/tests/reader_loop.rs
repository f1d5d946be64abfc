//! The reader on real block devices: loop devices this test creates and
//! detaches itself (root only; skipped otherwise unless CI is set).

mod reader_support;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use blockferry_agent::reader::{self, ReaderConfig, ReaderError};
use reader_support::{check_fine_range, check_range, mixed_data, read_ranges, read_ranges_fine};

fn is_root_or_skip(test: &str) -> bool {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test} needs root and CI is set"
        );
        eprintln!("skipping {test}: needs root");
    }
    root
}

/// A loop device over a file; detached on drop, also when the test fails.
struct LoopDev {
    dev: PathBuf,
}

impl LoopDev {
    fn attach(backing: &Path, direct_io: bool) -> LoopDev {
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        if direct_io {
            cmd.arg("--direct-io=on");
        }
        let out = cmd.arg(backing).output().expect("run losetup");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        LoopDev { dev }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        match Command::new("losetup").arg("-d").arg(&self.dev).status() {
            Ok(s) if s.success() => {}
            other => eprintln!("cannot detach {}: {other:?}", self.dev.display()),
        }
    }
}

fn backing_file(data: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(data).expect("write backing file");
    f.as_file().sync_all().expect("sync backing file");
    f
}

#[test]
fn loop_device_chunks_decode_to_the_backing_bytes() {
    if !is_root_or_skip("loop_device_chunks_decode_to_the_backing_bytes") {
        return;
    }
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
            let results = read_ranges(&lo.dev, &config, &ranges);
            for (r, res) in ranges.iter().zip(&results) {
                check_range(&data, 65536, *r, res);
            }
            // Tracked writes read at 4 KiB, with O_DIRECT, up to the short tail.
            let fine = [
                (4096 * 7 + 5, 100),
                (65536 - 4096, 12288),
                (size - 700, 700),
            ];
            let results = read_ranges_fine(&lo.dev, &config, &fine);
            for (r, res) in fine.iter().zip(&results) {
                check_fine_range(&data, 65536, *r, res);
            }
        }
        let (handle, _events) = reader::spawn(&lo.dev, &ReaderConfig::default()).unwrap();
        assert_eq!(handle.size(), size, "BLKGETSIZE64 of {}", lo.dev.display());
        assert!(handle.direct(), "block devices take O_DIRECT");
        let err = handle.submit(size - 4096, 8192).unwrap_err();
        assert!(matches!(err, ReaderError::BeyondEnd { .. }), "{err}");
        assert!(err.to_string().contains(&lo.dev.display().to_string()));
    }
}

#[test]
fn loop_device_leaf_hashes_match_the_backing_file() {
    if !is_root_or_skip("loop_device_leaf_hashes_match_the_backing_file") {
        return;
    }
    let data = mixed_data(2 * 1024 * 1024 + 512, 12);
    let backing = backing_file(&data);
    let lo = LoopDev::attach(backing.path(), true);
    let config = ReaderConfig::default();
    let from_device = reader::leaf_hashes(&lo.dev, &config).unwrap().leaves;
    let from_file = reader::leaf_hashes(backing.path(), &config).unwrap().leaves;
    let want: Vec<[u8; 32]> = data
        .chunks(65536)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect();
    assert_eq!(from_device, want);
    assert_eq!(from_file, want);
}

#[test]
fn grown_loop_device_is_read_to_its_new_end_after_a_size_refresh() {
    if !is_root_or_skip("grown_loop_device_is_read_to_its_new_end_after_a_size_refresh") {
        return;
    }
    let mut data = mixed_data(1024 * 1024 + 512, 13);
    let mut backing = backing_file(&data);
    let lo = LoopDev::attach(backing.path(), true);
    let (handle, mut events) = reader::spawn(&lo.dev, &ReaderConfig::default()).unwrap();
    let old = data.len() as u64;
    assert_eq!(handle.size(), old);

    let more = mixed_data(700 * 1024, 14);
    backing.write_all(&more).unwrap();
    backing.as_file().sync_all().unwrap();
    data.extend_from_slice(&more);
    let status = Command::new("losetup")
        .arg("-c")
        .arg(&lo.dev)
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
