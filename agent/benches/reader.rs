//! Reader throughput: io_uring read + blake3 + zstd-1 of a 256 MiB file of
//! half-compressible data, against a plain buffered `read` of the same file
//! (page cache dropped first) measured in the same run. Prints MB/s of each
//! and their ratio on the last line.
//!
//! `cargo bench -p blockferry-agent --bench reader` (BF_BENCH_MIB sets the size).

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use blockferry_agent::reader::{self, ReaderConfig, ReaderEvent};
use criterion::{Criterion, Throughput};

/// Like fio's `buffer_compress_percentage=50`: every 512 bytes hold 256
/// random bytes and 256 bytes of a repeating pattern; zstd-1 halves it.
fn write_half_compressible(path: &Path, len: usize) {
    let mut f = File::create(path).expect("create bench file");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut block = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < len {
        for (i, seg) in block.chunks_mut(512).enumerate() {
            for b in &mut seg[..256] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            seg[256..].fill((i % 251) as u8);
        }
        let n = block.len().min(len - written);
        f.write_all(&block[..n]).expect("write bench file");
        written += n;
    }
    f.sync_all().expect("sync bench file");
}

fn plain_read(path: &Path) -> u64 {
    let mut f = File::open(path).expect("open bench file");
    reader::evict_page_cache(&f).expect("drop page cache");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).expect("read bench file");
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

/// Plain `read` with O_DIRECT, 1 MiB at a time: what the device gives a
/// single synchronous reader that bypasses the page cache like the reader.
fn direct_read(path: &Path) -> u64 {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open bench file with O_DIRECT");
    // O_DIRECT wants an aligned buffer: over-allocate and start at the first
    // 4 KiB boundary.
    let mut raw = vec![0u8; (1 << 20) + 4096];
    let skip = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[skip..skip + (1 << 20)];
    let mut total = 0u64;
    loop {
        let n = f.read(buf).expect("read bench file");
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

/// Returns (plain bytes, wire bytes).
fn pipeline(path: &Path, config: &ReaderConfig) -> (u64, u64) {
    if let Ok(f) = File::open(path) {
        // O_DIRECT bypasses the cache anyway; this keeps both sides equal.
        reader::evict_page_cache(&f).expect("drop page cache");
    }
    let (handle, mut events) = reader::spawn(path, config).expect("start reader");
    handle.submit(0, handle.size()).expect("submit");
    handle.close();
    let (mut plain, mut wire) = (0u64, 0u64);
    while let Some(ev) = events.blocking_next() {
        match ev {
            ReaderEvent::Chunk { chunk, .. } => {
                plain += u64::from(chunk.len);
                wire += chunk.payload.len() as u64;
            }
            ReaderEvent::RangeDone { ok, .. } => assert!(ok),
            other => panic!("reader: {other:?}"),
        }
    }
    handle.join();
    (plain, wire)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `cargo test --benches` runs this without `--bench`: a quick smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let mib: usize = std::env::var("BF_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if smoke { 8 } else { 256 });
    let len = mib << 20;
    let dir = match std::env::var_os("BF_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("bench dir");
    let path = dir.path().join("half-compressible.img");
    write_half_compressible(&path, len);

    let ship = ReaderConfig::default();
    if smoke {
        assert_eq!(pipeline(&path, &ship).0, len as u64);
        assert_eq!(plain_read(&path), len as u64);
        assert_eq!(direct_read(&path), len as u64);
        return;
    }
    let hash_only = ReaderConfig {
        hash_only: true,
        ..ReaderConfig::default()
    };

    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    {
        let mut g = c.benchmark_group("reader");
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function("baseline_plain_read", |b| b.iter(|| plain_read(&path)));
        g.bench_function("baseline_direct_read", |b| b.iter(|| direct_read(&path)));
        g.bench_function("uring_blake3_zstd1", |b| b.iter(|| pipeline(&path, &ship)));
        g.bench_function("uring_blake3_hash_only", |b| {
            b.iter(|| pipeline(&path, &hash_only))
        });
        g.finish();
    }
    c.final_summary();

    // Interleaved runs in this same invocation, so that the noise of a
    // shared machine hits both sides alike.
    let (mut base, mut direct, mut full, mut hashed) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut ratio_wire = 0.0;
    for _ in 0..3 {
        let t = Instant::now();
        assert_eq!(plain_read(&path), len as u64);
        base.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(direct_read(&path), len as u64);
        direct.push(t.elapsed());
        let t = Instant::now();
        let (plain, wire) = pipeline(&path, &ship);
        full.push(t.elapsed());
        assert_eq!(plain, len as u64);
        ratio_wire = wire as f64 / plain as f64;
        let t = Instant::now();
        pipeline(&path, &hash_only);
        hashed.push(t.elapsed());
    }
    let mbps = |d: Duration| len as f64 / d.as_secs_f64() / 1e6;
    let (b, d, f, h) = (median(base), median(direct), median(full), median(hashed));
    println!(
        "reader {mib} MiB half-compressible: plain read {:.0} MB/s, O_DIRECT read {:.0} MB/s, \
         read+blake3+zstd1 {:.0} MB/s (wire/plain {:.2}), read+blake3 only {:.0} MB/s",
        mbps(b),
        mbps(d),
        mbps(f),
        ratio_wire,
        mbps(h)
    );
    println!(
        "pipeline_vs_read_ratio={:.2} pipeline_vs_direct_read_ratio={:.2} hash_only_vs_read_ratio={:.2}",
        mbps(f) / mbps(b),
        mbps(f) / mbps(d),
        mbps(h) / mbps(b)
    );
}
