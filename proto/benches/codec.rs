//! Micro-benchmarks of the data path's per-chunk work: frame encode/decode of
//! a 16-chunk batch (1 MiB of 64 KiB chunks), and blake3 and zstd of a 64 KiB
//! chunk, for half-compressible and incompressible data.
//!
//! Compare the rows with each other, not with absolute numbers from another
//! machine: `cargo bench -p blockferry-proto --bench codec`.

use blockferry_proto::{DiskId, ExtentBatch, Frame, Generation, Seq, build_chunk, verify_chunk};
use bytes::BytesMut;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHUNK: usize = 64 << 10;

/// Half of each 4 KiB block random, half a repeated byte: zstd level 1
/// compresses it about 2:1, like typical file-system data.
fn half_compressible(rng: &mut StdRng) -> Vec<u8> {
    let mut v = vec![0u8; CHUNK];
    for block in v.chunks_mut(4096) {
        let (a, b) = block.split_at_mut(2048);
        rng.fill(a);
        b.fill(b'x');
    }
    v
}

fn incompressible(rng: &mut StdRng) -> Vec<u8> {
    let mut v = vec![0u8; CHUNK];
    rng.fill(&mut v[..]);
    v
}

fn batch(data: &[u8], level: Option<i32>) -> Frame {
    let chunks = (0..16u64)
        .map(|i| build_chunk(i * CHUNK as u64, data, level).expect("valid chunk"))
        .collect();
    Frame::Batch(ExtentBatch {
        disk: DiskId([1; 16]),
        generation: Generation(1),
        seq: Seq(1),
        chunks,
    })
}

fn codec(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(1);
    let data = incompressible(&mut rng);
    let frame = batch(&data, None);
    let encoded = frame.to_bytes().expect("within limits");
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("encode_batch_16x64k", |b| {
        let mut buf = BytesMut::with_capacity(encoded.len());
        b.iter(|| {
            buf.clear();
            frame.encode(&mut buf).expect("within limits");
        });
    });
    g.bench_function("decode_batch_16x64k_copy", |b| {
        b.iter(|| Frame::decode(&encoded).expect("valid"));
    });
    g.bench_function("decode_batch_16x64k_zero_copy", |b| {
        // The copy into the receive buffer is setup, not decoding.
        b.iter_batched(
            || BytesMut::from(&encoded[..]),
            |mut buf| Frame::decode_buf(&mut buf).expect("valid"),
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

fn chunk_work(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(2);
    let inputs = [
        ("half_compressible", half_compressible(&mut rng)),
        ("incompressible", incompressible(&mut rng)),
    ];
    let mut g = c.benchmark_group("chunk_64k");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    for (name, data) in &inputs {
        g.bench_with_input(BenchmarkId::new("blake3", name), data, |b, d| {
            b.iter(|| blake3::hash(d));
        });
        g.bench_with_input(BenchmarkId::new("zstd1_compress", name), data, |b, d| {
            b.iter(|| zstd::bulk::compress(d, 1).expect("compresses"));
        });
        g.bench_with_input(BenchmarkId::new("build_chunk_zstd1", name), data, |b, d| {
            b.iter(|| build_chunk(0, d, Some(1)).expect("valid"));
        });
        let built = build_chunk(0, data, Some(1)).expect("valid");
        g.bench_with_input(BenchmarkId::new("verify_chunk", name), &built, |b, c| {
            b.iter(|| verify_chunk(c).expect("verifies"));
        });
    }
    g.finish();
}

criterion_group!(benches, codec, chunk_work);
criterion_main!(benches);
