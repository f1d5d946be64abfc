//! A thin replica (one monolithicSparse file) holds only the grains that were
//! written: qemu-img map shows data exactly there, zeros allocate nothing,
//! and the file stays small.

mod common;

use blockferry_target::vmdk::check::check;
use blockferry_target::{ApplyBatch, Chunk, DiskStore, StoreOptions};
use common::*;
use std::process::Command;

const SIZE: u64 = 64 << 20;
const GRAIN: u64 = 64 << 10;

fn batch(seq: u64, chunks: Vec<Chunk>) -> ApplyBatch {
    ApplyBatch {
        disk: DISK.into(),
        generation: 1,
        seq,
        chunks,
    }
}

/// Byte ranges qemu-img reports as holding data, merged.
fn data_ranges(vmdk: &std::path::Path) -> Vec<(u64, u64)> {
    let out = Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "vmdk"])
        .arg(vmdk)
        .output()
        .expect("run qemu-img map");
    assert!(out.status.success(), "qemu-img map: {out:?}");
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().unwrap() {
        if e["data"] != true {
            continue;
        }
        let start = e["start"].as_u64().unwrap();
        let end = start + e["length"].as_u64().unwrap();
        match ranges.last_mut() {
            Some(r) if r.1 == start => r.1 = end,
            _ => ranges.push((start, end)),
        }
    }
    ranges
}

#[test]
fn a_thin_replica_holds_only_the_grains_written() {
    if !have_qemu_img() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let opts = || StoreOptions {
        thin: true,
        ..StoreOptions::default()
    };
    let mut s = DiskStore::create(tmp.path(), DISK, SIZE, now_ms(), opts()).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let b1 = batch(
        1,
        vec![
            // One whole grain, part of another, a zero chunk over nothing,
            // and data that a later batch overwrites with zeros.
            blockferry_target::batch::raw_chunk(1 << 20, vec![0xa5; GRAIN as usize]),
            blockferry_target::batch::raw_chunk((10 << 20) + 4096, vec![0x5a; 4096]),
            blockferry_target::batch::zero_chunk(20 << 20, 1 << 20),
            blockferry_target::batch::raw_chunk(30 << 20, vec![0x77; GRAIN as usize]),
        ],
    );
    let b2 = batch(
        2,
        vec![blockferry_target::batch::zero_chunk(30 << 20, GRAIN as u32)],
    );
    for b in [&b1, &b2] {
        s.apply(b).unwrap();
        model_apply(&mut model, b);
    }
    let desc = s.replica_path().to_path_buf();
    drop(s);

    let model_path = tmp.path().join("model.raw");
    std::fs::write(&model_path, &model).unwrap();
    assert!(qemu_same(&model_path, &desc), "replica equals the model");
    let info = qemu_info(&desc);
    assert_eq!(info[0]["virtual-size"].as_u64(), Some(SIZE));
    assert_eq!(
        info[0]["format-specific"]["data"]["create-type"],
        "monolithicSparse"
    );
    // The grain overwritten with zeros stays allocated (zeros in place: a
    // replica overwritten forever must not leak grains); nothing else is.
    assert_eq!(
        data_ranges(&desc),
        vec![
            (1 << 20, (1 << 20) + GRAIN),
            (10 << 20, (10 << 20) + GRAIN),
            (30 << 20, (30 << 20) + GRAIN),
        ]
    );
    let file_len = std::fs::metadata(&desc).unwrap().len();
    assert!(
        file_len < 1 << 20,
        "a 64 MiB thin replica with 3 grains takes {file_len} bytes"
    );
    let report = check(&desc).unwrap();
    assert!(report.is_clean(), "{report:?}");

    // Reopened, it keeps replicating into the same file.
    let mut s = DiskStore::open(tmp.path(), DISK, opts()).unwrap();
    let b3 = batch(
        3,
        vec![blockferry_target::batch::raw_chunk(
            40 << 20,
            vec![0x11; 8192],
        )],
    );
    s.apply(&b3).unwrap();
    model_apply(&mut model, &b3);
    s.close().unwrap();
    std::fs::write(&model_path, &model).unwrap();
    assert!(qemu_same(&model_path, &desc), "after reopen");
    assert_eq!(data_ranges(&desc).len(), 4);
}
