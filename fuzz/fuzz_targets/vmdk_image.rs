//! Fuzz opening, reading and checking a whole sparse VMDK file: the grain
//! directory and table walk, compressed grain markers and the checker see
//! damaged structures here. The input is written to a scratch file first.
#![no_main]

use std::path::PathBuf;

use blockferry_vmdk::check::check;
use blockferry_vmdk::{DiskRead, OpenMode, VmdkImage};
use libfuzzer_sys::fuzz_target;

fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("blockferry-fuzz-vmdk-{}.vmdk", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(img) = VmdkImage::open(&path, OpenMode::ReadOnly) {
        // A damaged capacity may claim terabytes: read a bounded prefix.
        let mut buf = vec![0u8; img.size().min(1 << 20) as usize];
        let _ = img.read_at(&mut buf, 0);
        let _ = img.allocated_ranges();
    }
    let _ = check(&path);
});
