//! A real full file system under the store (a small tmpfs this test mounts and
//! unmounts): applies fail with the typed "no space" error, every file stays
//! consistent, and once space is freed the same batches go through.

mod common;

use std::path::{Path, PathBuf};

use blockferry_target::{ApplyBatch, Consistency, DiskStore, PointMeta, StoreOptions, TargetError};
use blockferry_testkit::devices::Tmpfs;
use blockferry_testkit::privileged::require_root;
use common::*;
use rand::{SeedableRng, rngs::StdRng};

const SIZE: u64 = 4 << 20;

fn fill_up(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0x55u8; 64 << 10];
    let mut n = 0;
    while f.write_all(&block).is_ok() {
        n += block.len() as u64;
    }
    n
}

fn opts(thin: bool) -> StoreOptions {
    StoreOptions {
        checkpoint_bytes: 1 << 20,
        thin,
        ..StoreOptions::default()
    }
}

/// A store on a small tmpfs with one point after batch 1, applied until the
/// file system is full (the undo kept for the point grows).
struct Full {
    fs: Tmpfs,
    root: PathBuf,
    s: DiskStore,
    batches: Vec<ApplyBatch>,
    point: PointMeta,
    filler: PathBuf,
    /// Batches acknowledged before the failure.
    acked: usize,
}

/// Needs root (the caller is an ignored root-only test).
fn apply_until_full(thin: bool, seed: u64) -> Full {
    let fs = Tmpfs::mount(16 << 20);
    let root = fs.path().join("store");
    let mut s = DiskStore::create(&root, DISK, SIZE, now_ms(), opts(thin)).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let batches: Vec<_> = (1..=400).map(|q| random_batch(&mut rng, q, SIZE)).collect();
    s.apply(&batches[0]).unwrap();
    let point = s
        .create_point(Consistency::CrashConsistent, now_ms())
        .unwrap();
    let filler = fs.path().join("filler");
    fill_up(&filler);
    let mut acked = 1;
    let err = loop {
        assert!(acked < batches.len(), "never ran out of space");
        match s.apply(&batches[acked]) {
            Ok(_) => acked += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, TargetError::NoSpace { .. }), "{err}");
    assert!(err.to_string().contains("no space"), "{err}");
    eprintln!("stopped after batch {acked}: {err}");
    Full {
        fs,
        root,
        s,
        batches,
        point,
        filler,
        acked,
    }
}

#[test]
#[ignore = "needs root: mounts a tmpfs"]
fn a_full_file_system_stops_applies_cleanly_and_they_resume_when_space_frees() {
    require_root("a_full_file_system_stops_applies_cleanly_and_they_resume_when_space_frees");
    let Full {
        fs: _fs,
        root,
        mut s,
        batches,
        point,
        filler,
        acked: i,
        ..
    } = apply_until_full(false, 33);
    // Whatever the store reports as durable is exactly in the replica.
    let applied = s.applied_seq();
    assert!(
        applied as usize >= i,
        "acked batches lost: applied {applied}, acked {i}"
    );
    assert_eq!(
        first_diff(&replica_bytes(s.dir()), &model_at(&batches, SIZE, applied)),
        None
    );
    // Still full: retrying fails the same clean way.
    let again = s.apply(&batches[applied as usize]);
    assert!(
        matches!(again, Err(TargetError::NoSpace { .. }) | Ok(_)),
        "{again:?}"
    );

    // Space frees: the batches go through, from where the store stands.
    std::fs::remove_file(&filler).unwrap();
    for b in &batches[s.applied_seq() as usize..] {
        s.apply(b).unwrap();
    }
    s.close().unwrap();
    let mut s = DiskStore::open(&root, DISK, opts(false)).unwrap();
    assert_eq!(s.applied_seq(), batches.len() as u64);
    assert_eq!(
        first_diff(
            &replica_bytes(s.dir()),
            &model_at(&batches, SIZE, batches.len() as u64)
        ),
        None
    );
    let img = s.point_image(point.id).unwrap();
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(&mut got, 0).unwrap();
    assert_eq!(first_diff(&got, &model_at(&batches, SIZE, 1)), None);
}

/// A thin replica allocates as it goes, so "no space" can also come after the
/// batch was journalled, while writing the replica. The store then stops
/// (as the service does, it is dropped and reopened, which replays the
/// journal); nothing acknowledged is lost, and once space frees the replay
/// and the remaining batches go through.
#[test]
#[ignore = "needs root: mounts a tmpfs"]
fn a_full_file_system_under_a_thin_replica_loses_nothing_and_resumes() {
    require_root("a_full_file_system_under_a_thin_replica_loses_nothing_and_resumes");
    let Full {
        fs,
        root,
        s,
        batches,
        point,
        filler,
        acked,
    } = apply_until_full(true, 34);
    drop(s);
    // Still full: reopening either works or says "no space" again.
    match DiskStore::open(&root, DISK, opts(true)) {
        Ok(s) => drop(s),
        Err(e) => assert!(matches!(e, TargetError::NoSpace { .. }), "{e}"),
    }

    std::fs::remove_file(&filler).unwrap();
    let mut s = DiskStore::open(&root, DISK, opts(true)).unwrap();
    let applied = s.applied_seq();
    assert!(
        applied as usize >= acked,
        "acked batches lost: applied {applied}, acked {acked}"
    );
    let mut got = vec![0u8; SIZE as usize];
    s.read_at(&mut got, 0).unwrap();
    assert_eq!(first_diff(&got, &model_at(&batches, SIZE, applied)), None);
    for b in &batches[applied as usize..] {
        s.apply(b).unwrap();
    }
    let img = s.point_image(point.id).unwrap();
    img.read_at(&mut got, 0).unwrap();
    assert_eq!(first_diff(&got, &model_at(&batches, SIZE, 1)), None);
    let desc = s.replica_path().to_path_buf();
    s.close().unwrap();
    let report = blockferry_target::vmdk::check::check(&desc).unwrap();
    assert!(report.is_clean(), "{report:?}");
    if have_qemu_img() {
        let model = fs.path().join("model.raw");
        std::fs::write(&model, model_at(&batches, SIZE, batches.len() as u64)).unwrap();
        assert!(qemu_same(&model, &desc));
    }
}
