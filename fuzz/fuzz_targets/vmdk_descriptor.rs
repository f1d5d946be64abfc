//! Fuzz the VMDK text descriptor parser: it never panics, and whatever it
//! accepts renders to text it accepts again with the same meaning.
#![no_main]

use blockferry_vmdk::descriptor::Descriptor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(d) = Descriptor::parse_bytes(data) else {
        return;
    };
    let _ = (d.uuid(), d.geometry(), d.adapter_type(), d.capacity_sectors());
    let again = Descriptor::parse(&d.render()).expect("a rendered descriptor parses");
    assert_eq!(again.cid, d.cid);
    assert_eq!(again.parent_cid, d.parent_cid);
    assert_eq!(again.extents.len(), d.extents.len());
    assert_eq!(again.capacity_sectors(), d.capacity_sectors());
});
