//! Helpers the integration tests share: raw peeks and pokes into the
//! sparse files they made, to inject damage.
#![allow(dead_code)] // each test file uses a part

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use blockferry_vmdk::SparseHeader;

/// Grain table entries of a sparse file we made: (primary GT sector, redundant GT sector).
pub fn gt_sectors(path: &Path) -> (SparseHeader, u64, u64) {
    let f = File::open(path).unwrap();
    let mut h = [0u8; 512];
    f.read_exact_at(&mut h, 0).unwrap();
    let h = SparseHeader::parse(&h).unwrap();
    let mut e = [0u8; 4];
    f.read_exact_at(&mut e, h.gd_offset * 512).unwrap();
    let gt = u32::from_le_bytes(e) as u64;
    f.read_exact_at(&mut e, h.rgd_offset * 512).unwrap();
    let rgt = u32::from_le_bytes(e) as u64;
    (h, gt, rgt)
}

pub fn poke_u32(path: &Path, at: u64, v: u32) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&v.to_le_bytes(), at).unwrap();
}

pub fn peek_u32(path: &Path, at: u64) -> u32 {
    let f = File::open(path).unwrap();
    let mut e = [0u8; 4];
    f.read_exact_at(&mut e, at).unwrap();
    u32::from_le_bytes(e)
}
