//! Fuzz the target's redo-journal decoder: it never panics, and a record it
//! accepts encodes back to the same record.
#![no_main]

use blockferry_target::wal::{decode, decode_all};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let epoch = data.get(16..24).map_or(0, |b| {
        u64::from_le_bytes(b.try_into().unwrap_or_default())
    });
    let (records, used) = decode_all(data, epoch);
    assert!(used <= data.len());
    if let Ok((rec, n)) = decode(data, epoch) {
        assert_eq!(records.first(), Some(&rec));
        assert!(n <= used);
        let (again, _) = decode(&rec.encode(), epoch).expect("an encoded record decodes");
        assert_eq!(again, rec);
    }
});
