//! Fuzz the generation-record decoder: it never panics on any input, a record
//! it accepts encodes back to the same bytes, and comparing, resolving and
//! printing accepted records never panics either.
#![no_main]

use blockferry_proto::GenerationRecord;
use blockferry_proto::generation::{Side, SplitBrainReport, resolve_split_brain};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Two records back to back exercise the comparison of decoded records.
    let split = data.first().map_or(0, |&b| usize::from(b) * 4).min(data.len());
    let (first, second) = data.split_at(split);
    let Ok(ours) = GenerationRecord::decode(data) else {
        let (Ok(a), Ok(b)) = (
            GenerationRecord::decode(first.get(1..).unwrap_or_default()),
            GenerationRecord::decode(second),
        ) else {
            return;
        };
        assert_eq!(b.compare(&a), a.compare(&b).mirror());
        for side in [Side::Ours, Side::Theirs] {
            if let Ok(r) = resolve_split_brain(&a, &b, side) {
                let _ = r.discarded.compare(&a);
            }
        }
        let _ = SplitBrainReport {
            ours_name: "a",
            ours: &a,
            theirs_name: "b",
            theirs: &b,
        }
        .to_string();
        return;
    };
    assert_eq!(ours.encode(), data);
    assert_eq!(ours.encoded_len(), data.len());
    let _ = ours.compare(&ours);
    let _ = ours.lineage().to_string();
});
