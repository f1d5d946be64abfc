//! Damaged VMDKs give errors or problem reports, never a panic: random
//! byte corruption of valid images (ours and qemu's layout are the same)
//! through open, read and the checker.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use blockferry_target::vmdk::check::check;
use blockferry_target::vmdk::{CreateOptions, DiskKind, DiskRead, OpenMode, VmdkImage, WriteOp};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Open, read (a bounded prefix: a damaged capacity may claim terabytes)
/// and check; any outcome but a panic is fine.
fn exercise(path: &std::path::Path) {
    if let Ok(img) = VmdkImage::open(path, OpenMode::ReadOnly) {
        let n = img.size().min(4 << 20) as usize;
        let mut buf = vec![0u8; n];
        let _ = img.read_at(&mut buf, 0);
        let _ = img.allocated_ranges();
    }
    let _ = check(path);
}

#[test]
fn corrupted_sparse_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.vmdk");
    let mut img = VmdkImage::create(
        &good,
        &CreateOptions::new(3 << 20, DiskKind::MonolithicSparse),
    )
    .unwrap();
    let data = vec![0x5au8; 200_000];
    img.apply(&[
        WriteOp::Data {
            offset: 4096,
            data: &data,
        },
        WriteOp::Zero {
            offset: 1 << 20,
            len: 128 << 10,
        },
    ])
    .unwrap();
    drop(img);
    let original = std::fs::read(&good).unwrap();
    let mut rng = StdRng::seed_from_u64(99);
    let bad = dir.path().join("bad.vmdk");
    for round in 0..300 {
        let mut bytes = original.clone();
        let hits = rng.gen_range(1..8);
        for _ in 0..hits {
            // Mostly metadata (header, descriptor, directories, tables),
            // sometimes anywhere.
            let limit = if rng.gen_bool(0.8) {
                (64 << 10).min(bytes.len())
            } else {
                bytes.len()
            };
            let at = rng.gen_range(0..limit);
            match rng.gen_range(0..3) {
                0 => bytes[at] = rng.r#gen(),
                1 => bytes[at] ^= 1 << rng.gen_range(0..8),
                _ => {
                    // A plausible-looking large number in a 32-bit field.
                    let at = at & !3;
                    if at + 4 <= bytes.len() {
                        let v: u32 = rng.r#gen::<u32>() >> rng.gen_range(0..32);
                        bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        if round % 10 == 0 {
            bytes.truncate(rng.gen_range(0..bytes.len()));
        }
        std::fs::write(&bad, &bytes).unwrap();
        exercise(&bad);
    }
}

#[test]
fn corrupted_descriptor_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("d.vmdk");
    drop(VmdkImage::create(&good, &CreateOptions::new(1 << 20, DiskKind::Vmfs)).unwrap());
    let original = std::fs::read(&good).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..300 {
        let mut bytes = original.clone();
        for _ in 0..rng.gen_range(1..6) {
            let at = rng.gen_range(0..bytes.len());
            bytes[at] = *b"0123456789abcdef \"=\nRWFLATVMFSZERO#-"
                .get(rng.gen_range(0..36))
                .unwrap();
        }
        let f = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&good)
            .unwrap();
        f.write_all_at(&bytes, 0).unwrap();
        drop(f);
        exercise(&good);
    }
}
