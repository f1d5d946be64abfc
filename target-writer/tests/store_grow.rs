//! A replica grows with its protected disk: the flat extent, descriptor and
//! state agree at the new size, data before the old end is kept, earlier
//! recovery points export at their own size, shrinking is refused, and a
//! failure at any sync of the grow leaves the old or the new size, never a
//! mix.

mod common;

use blockferry_target::export::{ExportFormat, export_point};
use blockferry_target::vmdk::check::check;
use blockferry_target::{Consistency, DiskStore, StoreOptions, TargetError};
use common::*;
use rand::{SeedableRng, rngs::StdRng};

const OLD: u64 = 1 << 20;
const NEW: u64 = 3 << 20;

fn opts() -> StoreOptions {
    StoreOptions {
        checkpoint_bytes: 256 << 10,
        ..StoreOptions::default()
    }
}

#[test]
fn grown_replica_keeps_its_data_and_earlier_points_keep_their_size() {
    grown_replica(false);
}

#[test]
fn grown_thin_replica_keeps_its_data_and_earlier_points_keep_their_size() {
    grown_replica(true);
}

fn grown_replica(thin: bool) {
    if !have_qemu_img() {
        return;
    }
    let opts = || StoreOptions { thin, ..opts() };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let mut rng = StdRng::seed_from_u64(0x96);
    let mut s = DiskStore::create(&root, DISK, OLD, now_ms(), opts()).unwrap();
    let mut model = vec![0u8; OLD as usize];
    for seq in 1..=6 {
        let b = random_batch(&mut rng, seq, OLD);
        s.apply(&b).unwrap();
        model_apply(&mut model, &b);
    }
    let before = s
        .create_point(Consistency::CrashConsistent, now_ms())
        .unwrap();
    let at_point = model.clone();

    s.grow(NEW).unwrap();
    model.resize(NEW as usize, 0);
    for seq in 7..=14 {
        // Batches now land anywhere, the new range included.
        let b = random_batch(&mut rng, seq, NEW);
        s.apply(&b).unwrap();
        model_apply(&mut model, &b);
    }
    drop(s);
    let mut s = DiskStore::open(&root, DISK, opts()).unwrap();
    assert_eq!(s.size(), NEW);
    let model_path = tmp.path().join("model.raw");
    std::fs::write(&model_path, &model).unwrap();
    assert!(qemu_same(&model_path, s.replica_path()), "grown replica");
    let info = qemu_info(s.replica_path());
    assert_eq!(info[0]["virtual-size"].as_u64(), Some(NEW));
    assert!(check(s.replica_path()).unwrap().is_clean());

    let raw = tmp.path().join("before.raw");
    export_point(
        &mut s,
        before.id,
        ExportFormat::Raw,
        &raw,
        None,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(
        first_diff(&std::fs::read(&raw).unwrap(), &at_point),
        None,
        "a point taken before the grow exports at its own size and content"
    );

    let err = s.grow(OLD).unwrap_err();
    assert!(matches!(err, TargetError::Shrink { .. }), "{err}");
    assert!(err.to_string().contains("grow the disk back"), "{err}");
    assert_eq!(s.size(), NEW, "a refused shrink changes nothing");
}

#[test]
fn failed_sync_during_grow_leaves_the_old_or_the_new_size() {
    if !have_qemu_img() {
        return;
    }
    let mut rng = StdRng::seed_from_u64(0x97);
    let batches: Vec<_> = (1..=4)
        .map(|seq| random_batch(&mut rng, seq, OLD))
        .collect();
    let model = model_at(&batches, OLD, 4);
    let mut saw_old = false;
    let mut saw_new = false;
    for k in 1.. {
        let tmp = fast_tempdir();
        let o = opts();
        let faults = o.faults.clone();
        let mut s = DiskStore::create(tmp.path(), DISK, OLD, now_ms(), o).unwrap();
        for b in &batches {
            s.apply(b).unwrap();
        }
        faults.fail_sync_at(k);
        if s.grow(NEW).is_ok() {
            break; // k is past the grow's last sync
        }
        drop(s);
        faults.clear();
        let s = DiskStore::open(tmp.path(), DISK, opts()).unwrap();
        let size = s.size();
        assert!(size == OLD || size == NEW, "sync {k}: size {size}");
        saw_old |= size == OLD;
        saw_new |= size == NEW;
        let mut want = model.clone();
        want.resize(size as usize, 0);
        assert_eq!(
            first_diff(&replica_bytes(s.dir()), &want),
            None,
            "sync {k}: the flat extent holds the data at {size} bytes"
        );
        let info = qemu_info(s.replica_path());
        assert_eq!(info[0]["virtual-size"].as_u64(), Some(size), "sync {k}");
        assert!(check(s.replica_path()).unwrap().is_clean(), "sync {k}");
    }
    assert!(saw_old, "some failure left the old size");
    assert!(
        saw_new,
        "some failure came after the new size was committed"
    );
}
