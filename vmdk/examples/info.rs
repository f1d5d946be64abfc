//! Prints what a VMDK is: create type, size, CID, extents, the parent
//! chain, the ranges each layer defines, and the structural check.
//!
//! `cargo run -p blockferry-vmdk --example info -- DISK.vmdk [--allow-external-paths]`

use std::path::PathBuf;

use blockferry_vmdk::check::check_with;
use blockferry_vmdk::{DiskRead, OpenMode, OpenOptions, VmdkImage};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args_os().skip(1);
    let path: PathBuf = args
        .next()
        .ok_or("usage: info DISK.vmdk [--allow-external-paths]")?
        .into();
    let allow = args.next().is_some_and(|a| a == "--allow-external-paths");
    let opts = OpenOptions::new(OpenMode::ReadOnly).allow_external_paths(allow);
    let disk = VmdkImage::open_with(&path, opts)?;
    let mut layer = Some(&disk);
    let mut depth = 0;
    while let Some(img) = layer {
        let d = img.descriptor();
        let defined: u64 = img
            .allocated_ranges()?
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        println!("{:depth$}{}", "", img.path().display(), depth = depth * 2);
        println!(
            "{:depth$}  createType {}, {} bytes, CID {:08x}, {} extent(s), {} bytes defined here",
            "",
            d.create_type,
            img.size(),
            img.cid(),
            d.extents.len(),
            defined,
            depth = depth * 2
        );
        for f in img.files().iter().skip(1) {
            println!(
                "{:depth$}  extent file {}",
                "",
                f.display(),
                depth = depth * 2
            );
        }
        layer = img.parent();
        depth += 1;
    }
    let report = check_with(&path, allow)?;
    println!("check: {} problem(s)", report.problem_count);
    for p in &report.problems {
        println!("  {p}");
    }
    Ok(())
}
