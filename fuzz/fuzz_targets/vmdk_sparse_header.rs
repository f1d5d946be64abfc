//! Fuzz the sparse extent (`KDMV`) header decoder: it never panics, the
//! sizes derived from an accepted header never overflow, and an accepted
//! header encodes back to one that decodes equal.
#![no_main]

use blockferry_vmdk::sparse::{SECTOR, SparseHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = SparseHeader::parse(data) else {
        return;
    };
    let _ = (h.num_gd_entries(), h.gd_sectors(), h.gt_sectors(), h.grain_bytes());
    let _ = h.locate(h.capacity.saturating_sub(1) * SECTOR);
    assert_eq!(SparseHeader::parse(&h.encode()), Ok(h));
});
