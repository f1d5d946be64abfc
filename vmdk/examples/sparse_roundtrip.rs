//! Creates a thin (monolithicSparse) disk, writes data and zeros, reads
//! them back, and checks the result.
//!
//! `cargo run -p blockferry-vmdk --example sparse_roundtrip -- DISK.vmdk`
//! (the file must not exist yet; `qemu-img compare` or `info` can read it).

use std::path::PathBuf;

use blockferry_vmdk::check::check;
use blockferry_vmdk::{CreateOptions, DiskKind, DiskRead, OpenMode, VmdkImage, WriteOp};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path: PathBuf = std::env::args_os()
        .nth(1)
        .ok_or("usage: sparse_roundtrip DISK.vmdk (a path that does not exist yet)")?
        .into();
    let size = 64 << 20;
    let mut disk = VmdkImage::create(&path, &CreateOptions::new(size, DiskKind::MonolithicSparse))?;
    let pattern: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    // Durable on return: new grains, fdatasync, then the tables that point at them.
    disk.apply(&[
        WriteOp::Data {
            offset: 3 << 20,
            data: &pattern,
        },
        WriteOp::Zero {
            offset: 8 << 20,
            len: 1 << 20,
        },
    ])?;
    disk.set_cid(blockferry_vmdk::new_cid())?;
    drop(disk);

    let disk = VmdkImage::open(&path, OpenMode::ReadOnly)?;
    let mut back = vec![0u8; pattern.len()];
    disk.read_at(&mut back, 3 << 20)?;
    if back != pattern {
        return Err("the data read back differs from the data written".into());
    }
    println!(
        "{}: {} bytes virtual, CID {:08x}, defined ranges {:?}",
        path.display(),
        disk.size(),
        disk.cid(),
        disk.allocated_ranges()?
    );
    let report = check(&path)?;
    println!("check: {} problem(s)", report.problem_count);
    Ok(())
}
