//! Helpers shared by the store tests: random batches and an in-memory model of
//! the disk; qemu-img, temp dirs and channels come from the testkit.
#![allow(dead_code)]
#![allow(unused_imports)]

use std::path::Path;

pub use blockferry_testkit::channel::relay_channel;
pub use blockferry_testkit::data::{fast_tempdir, first_diff};
pub use blockferry_testkit::qemu::{have_qemu_img, qemu_info, qemu_same};

use blockferry_target::{ApplyBatch, Chunk};
use rand::Rng;

pub const DISK: &str = "disk-a";

/// Data that is sometimes compressible, sometimes random, sometimes zero.
pub fn random_data(rng: &mut impl Rng, len: usize) -> Vec<u8> {
    match rng.gen_range(0..4) {
        0 => vec![0u8; len],
        1 => {
            let b: u8 = rng.r#gen();
            (0..len).map(|i| b.wrapping_add((i / 512) as u8)).collect()
        }
        _ => (0..len).map(|_| rng.r#gen()).collect(),
    }
}

/// A batch of 1..=6 chunks at random 512-aligned places (they may overlap).
pub fn random_batch(rng: &mut impl Rng, seq: u64, size: u64) -> ApplyBatch {
    let n = rng.gen_range(1..=6);
    let mut chunks = Vec::new();
    for _ in 0..n {
        let len = rng.gen_range(1..=256u64) * 512;
        let offset = rng.gen_range(0..=(size - len) / 512) * 512;
        let data = random_data(rng, len as usize);
        let c = if data.iter().all(|b| *b == 0) && rng.gen_bool(0.7) {
            blockferry_target::batch::zero_chunk(offset, len as u32)
        } else if rng.gen_bool(0.5) {
            blockferry_target::batch::zstd_chunk(offset, &data, 1).expect("zstd")
        } else {
            blockferry_target::batch::raw_chunk(offset, data)
        };
        chunks.push(c);
    }
    ApplyBatch {
        disk: DISK.into(),
        generation: 1,
        seq,
        chunks,
    }
}

/// The plain data of a chunk (what the replica must hold afterwards).
pub fn plain(c: &Chunk) -> Vec<u8> {
    match c.encoding {
        blockferry_target::Encoding::Raw => c.payload.to_vec(),
        blockferry_target::Encoding::Zero => vec![0u8; c.len as usize],
        blockferry_target::Encoding::Zstd => {
            zstd::bulk::decompress(&c.payload, c.len as usize).expect("zstd")
        }
    }
}

pub fn model_apply(model: &mut [u8], b: &ApplyBatch) {
    for c in &b.chunks {
        let o = c.offset as usize;
        model[o..o + c.len as usize].copy_from_slice(&plain(c));
    }
}

/// The disk after batches with seq <= `seq` (batches are in seq order, from 1).
pub fn model_at(batches: &[ApplyBatch], size: u64, seq: u64) -> Vec<u8> {
    let mut m = vec![0u8; size as usize];
    for b in batches.iter().take_while(|b| b.seq <= seq) {
        model_apply(&mut m, b);
    }
    m
}

pub fn now_ms() -> u64 {
    1_800_000_000_000
}

/// Reads the replica's flat extent.
pub fn replica_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("replica-flat.vmdk")).expect("read flat extent")
}
