//! Export speed against `qemu-img convert -O vmdk` of the same data, in the
//! same run. A benchmark, not a test: ignored by default, never asserts a
//! timing. Run it in release:
//!
//! ```text
//! cargo test --release -p blockferry-target --test vmdk_export_bench -- --ignored --nocapture
//! ```
//!
//! `BLOCKFERRY_BENCH_EXPORT_MIB` sets the disk size (default 2048). The last
//! line printed is `export_sparse_ratio=… export_flat_ratio=…` (our time /
//! qemu-img's time; below 1.0 is faster than qemu-img). Our exports end
//! with fdatasync; qemu-img convert by default never flushes, so its time
//! includes `sync -d` of its output; the line before gives the ratios
//! against qemu-img's unflushed time too.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockferry_target::vmdk::export::{ExportOptions, export_flat, export_sparse};
use blockferry_target::vmdk::{DiskKind, RawDisk};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// Runs qemu-img convert; returns (time of the convert alone, time until its
/// output is also on disk). qemu-img's default cache mode for convert
/// never flushes, while an export must be durable, so the fair baseline
/// adds an fdatasync of qemu's output files (`sync -d`).
fn qemu_convert(src: &Path, out: &Path, sub: &str) -> (Duration, Duration) {
    let t = Instant::now();
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vmdk", "-o"])
        .arg(format!("subformat={sub}"))
        .arg(src)
        .arg(out)
        .status()
        .expect("run qemu-img convert");
    let converted = t.elapsed();
    assert!(st.success());
    let flat = out.with_file_name("q-flat.vmdk");
    let mut sync = Command::new("sync");
    sync.arg("-d").arg(out);
    if flat.exists() {
        sync.arg(&flat);
    }
    assert!(sync.status().unwrap().success());
    (converted, t.elapsed())
}

fn remove(dir: &Path, prefix: &str) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with(prefix) {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
}

#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn export_vs_qemu_img_convert() {
    let mib: u64 = std::env::var("BLOCKFERRY_BENCH_EXPORT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let size = mib << 20;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let used = size / 10 * 6;
    // What the store knows and passes to an export: where data may be.
    // qemu-img learns the same from the raw file's holes (SEEK_DATA).
    let data_range = 0..used;
    let allocated = [data_range];
    // A used disk: the first 60 % holds data with one 64 KiB grain in eight
    // zero, the rest was never written.
    {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&src)
            .unwrap();
        f.set_len(size).unwrap();
        let mut rng = StdRng::seed_from_u64(42);
        let mut buf = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < used {
            rng.fill_bytes(&mut buf);
            for g in buf.chunks_mut(64 << 10).step_by(8) {
                g.fill(0);
            }
            let n = (used - off).min(buf.len() as u64) as usize;
            f.write_all_at(&buf[..n], off).unwrap();
            off += n as u64;
        }
        f.sync_all().unwrap();
    }
    let raw = RawDisk::open(&src).unwrap();
    let opts = ExportOptions::default();
    // best[0..4]: qemu sparse, ours sparse, qemu flat, ours flat (durable);
    // best_nosync: qemu sparse, qemu flat without the final fdatasync.
    let mut best = [Duration::MAX; 4];
    let mut best_nosync = [Duration::MAX; 2];
    let mut run = |which: usize| -> Duration {
        // Start each run with nothing dirty, so no run pays for another's writeback.
        assert!(Command::new("sync").status().unwrap().success());
        let q = dir.path().join("q.vmdk");
        let o = dir.path().join("o.vmdk");
        let t = Instant::now();
        match which {
            0 => {
                let (c, _) = qemu_convert(&src, &q, "monolithicSparse");
                best_nosync[0] = best_nosync[0].min(c);
            }
            1 => drop(export_sparse(&raw, Some(&allocated), &o, &opts, &mut |_| {}).unwrap()),
            2 => {
                let (c, _) = qemu_convert(&src, &q, "monolithicFlat");
                best_nosync[1] = best_nosync[1].min(c);
            }
            _ => drop(
                export_flat(
                    &raw,
                    Some(&allocated),
                    &o,
                    DiskKind::Vmfs,
                    &opts,
                    &mut |_| {},
                )
                .unwrap(),
            ),
        }
        let d = t.elapsed();
        if which == 1 {
            let st = Command::new("qemu-img")
                .args(["compare", "-q", "-f", "raw", "-F", "vmdk"])
                .arg(&src)
                .arg(&o)
                .status()
                .unwrap();
            assert!(st.success(), "sparse export differs from the source");
        }
        remove(dir.path(), "q");
        remove(dir.path(), "o");
        d
    };
    // Interleaved, order reversed every other round, best of each, so cache
    // and disk state favour no one.
    for round in 0..4 {
        let order: [usize; 4] = if round % 2 == 0 {
            [0, 1, 2, 3]
        } else {
            [1, 0, 3, 2]
        };
        for which in order {
            best[which] = best[which].min(run(which));
        }
    }
    let [qemu_sparse, ours_sparse, qemu_flat, ours_flat] = best;
    println!(
        "{mib} MiB: sparse ours {:.3}s qemu-img {:.3}s ({:.3}s unflushed); flat ours {:.3}s qemu-img {:.3}s ({:.3}s unflushed)",
        ours_sparse.as_secs_f64(),
        qemu_sparse.as_secs_f64(),
        best_nosync[0].as_secs_f64(),
        ours_flat.as_secs_f64(),
        qemu_flat.as_secs_f64(),
        best_nosync[1].as_secs_f64(),
    );
    println!(
        "vs unflushed qemu-img: export_sparse_ratio={:.2} export_flat_ratio={:.2}",
        ours_sparse.as_secs_f64() / best_nosync[0].as_secs_f64(),
        ours_flat.as_secs_f64() / best_nosync[1].as_secs_f64()
    );
    println!(
        "export_sparse_ratio={:.2} export_flat_ratio={:.2}",
        ours_sparse.as_secs_f64() / qemu_sparse.as_secs_f64(),
        ours_flat.as_secs_f64() / qemu_flat.as_secs_f64()
    );
}
