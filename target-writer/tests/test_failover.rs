//! Test failover: a writable copy of a point made while batches keep being
//! applied equals the export of the same point (qemu-img compare), the
//! replica keeps advancing, retention keeps the point until cleanup, cleanup
//! removes every file and the loop device, and an incomplete point is
//! refused without --force. On XFS the copy is a reflink clone that shares
//! the replica's extents; on ext4 (and the temp dirs) it is an export.

mod common;

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use blockferry_proto::{Barrier, DiskId, Generation, Seq};
use blockferry_target::export::{ExportFormat, export_point_live};
use blockferry_target::failover::{
    CopyMethod, PointChoice, TestFailoverRequest, TestState, cleanup, read_record, test_failover,
};
use blockferry_target::retention::RetentionPolicy;
use blockferry_target::{Consistency, DiskStore, StoreOptions, TargetError};
use blockferry_testkit::devices::{LoopDev, Mounted};
use blockferry_testkit::privileged::{require_root, run};
use common::*;
use rand::{SeedableRng, rngs::StdRng};

const SIZE: u64 = 32 << 20;

fn barrier(seq: u64) -> Barrier {
    Barrier {
        disk: DiskId::default(),
        generation: Generation(1),
        seq: Seq(seq),
        consistency: Consistency::CrashConsistent,
        timestamp_ns: 0,
    }
}

/// Keeps only the newest point of points made long before `now`.
fn keep_newest() -> RetentionPolicy {
    RetentionPolicy {
        keep_all_secs: 0,
        tiers: Vec::new(),
    }
}
const LATER: u64 = 4_000_000_000_000;

/// A store of `DISK` under `root` with batches 1..=20, a crash-consistent
/// point after 10 (returned) and one after 20.
fn store_with_points(root: &Path, rng: &mut StdRng) -> (Mutex<DiskStore>, u64, u64) {
    let opts = StoreOptions {
        checkpoint_bytes: 1 << 20,
        ..StoreOptions::default()
    };
    let mut s = DiskStore::create(root, DISK, SIZE, now_ms(), opts).unwrap();
    let mut seq = 0;
    let mut tested = 0;
    for round in 0..2 {
        for _ in 0..10 {
            seq += 1;
            s.apply(&random_batch(rng, seq, SIZE)).unwrap();
        }
        seq += 1;
        let p = s.barrier(&barrier(seq), now_ms()).unwrap().unwrap();
        if round == 0 {
            tested = p.id;
        }
    }
    (Mutex::new(s), tested, seq)
}

/// Makes a test failover of the older point into `out` while another thread
/// keeps applying batches; checks it against the export of the same point and
/// returns how it was made.
fn test_failover_while_applying(root: &Path, out: &Path, attach: bool) -> CopyMethod {
    let mut rng = StdRng::seed_from_u64(7);
    let (store, point, last_seq) = store_with_points(root, &mut rng);
    let seq = AtomicU64::new(last_seq);
    let done = AtomicBool::new(false);
    let req = TestFailoverRequest {
        disk: DISK.into(),
        point: PointChoice::Id(point),
        out: out.to_path_buf(),
        attach,
        force: false,
    };
    let rec = std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut rng = StdRng::seed_from_u64(8);
            // At least a few batches, and until the test failover is made.
            while !done.load(Ordering::SeqCst) || seq.load(Ordering::SeqCst) < last_seq + 5 {
                let next = seq.load(Ordering::SeqCst) + 1;
                let b = random_batch(&mut rng, next, SIZE);
                lock(&store).apply(&b).unwrap();
                seq.store(next, Ordering::SeqCst);
            }
        });
        let stop = AtomicBool::new(false);
        let rec = test_failover(&store, &req, now_ms(), &stop).unwrap();
        done.store(true, Ordering::SeqCst);
        rec
    });
    assert_eq!(rec.state, TestState::Running);
    assert_eq!(rec.point, point);
    assert!(
        lock(&store).applied_seq() >= last_seq + 5,
        "the replica kept advancing"
    );

    // The same point exported, after all those batches.
    let raw = root.join("export.raw");
    let stop = AtomicBool::new(false);
    export_point_live(
        &store,
        point,
        ExportFormat::Raw,
        &raw,
        None,
        &stop,
        &mut |_, _| {},
    )
    .unwrap();
    assert!(
        qemu_same(&raw, &rec.descriptor),
        "qemu-img compare: the test failover differs from the export of point {point}"
    );
    if let Some(dev) = &rec.loop_device {
        let on_dev = std::fs::read(dev).unwrap();
        assert_eq!(first_diff(&on_dev, &std::fs::read(&raw).unwrap()), None);
    }

    // Retention keeps the tested point while the test failover exists.
    let dropped = lock(&store).apply_retention(&keep_newest(), LATER).unwrap();
    assert!(
        !dropped.contains(&point),
        "retention removed the tested point"
    );
    assert!(lock(&store).points().iter().any(|p| p.id == point));

    let method = rec.method.unwrap();
    let cleaned = cleanup(root, DISK, now_ms()).unwrap();
    assert_eq!(cleaned.state, TestState::CleanedUp);
    assert!(!rec.descriptor.exists() && !rec.flat.exists());
    assert!(!out.exists(), "the directory it created is gone");
    if let Some(dev) = &rec.loop_device {
        let list = run("losetup", &["-l", "-n", "-O", "NAME"]);
        assert!(
            !list.lines().any(|l| Path::new(l.trim()) == dev),
            "{} still attached",
            dev.display()
        );
    }
    // Released: the next retention pass may drop it.
    let dropped = lock(&store).apply_retention(&keep_newest(), LATER).unwrap();
    assert!(dropped.contains(&point));
    method
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap()
}

#[test]
fn a_test_failover_without_reflink_is_an_export_equal_to_the_point_and_holds_it_until_cleanup() {
    if !have_qemu_img() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let out = tmp.path().join("tf");
    let method = test_failover_while_applying(&root, &out, false);
    // The temp dir is ext4 or tmpfs on these machines: no shared extents.
    if !shares_extents_here(tmp.path()) {
        assert_eq!(method, CopyMethod::Export);
    }
    let rec = read_record(&root, DISK).unwrap().unwrap();
    assert_eq!(rec.state, TestState::CleanedUp);
    assert!(rec.cleaned_ms.is_some());
}

/// Whether FICLONE works in `dir` (XFS, btrfs).
fn shares_extents_here(dir: &Path) -> bool {
    let a = dir.join("probe-a");
    let b = dir.join("probe-b");
    std::fs::write(&a, [1u8; 4096]).unwrap();
    let ok = std::process::Command::new("cp")
        .args(["--reflink=always"])
        .arg(&a)
        .arg(&b)
        .output()
        .is_ok_and(|o| o.status.success());
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    ok
}

#[test]
fn an_incomplete_point_is_refused_for_test_failover_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let mut s = DiskStore::create(&root, DISK, SIZE, now_ms(), StoreOptions::default()).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    s.apply(&random_batch(&mut rng, 1, SIZE)).unwrap();
    let first = s
        .create_point(Consistency::NotConsistent, now_ms())
        .unwrap();
    assert!(first.incomplete);
    let store = Mutex::new(s);
    let mut req = TestFailoverRequest {
        disk: DISK.into(),
        point: PointChoice::Latest,
        out: tmp.path().join("tf"),
        attach: false,
        force: false,
    };
    let stop = AtomicBool::new(false);
    let e = test_failover(&store, &req, now_ms(), &stop).unwrap_err();
    assert!(
        matches!(e, TargetError::IncompletePoint { point, .. } if point == first.id),
        "{e:?}"
    );
    assert!(!req.out.exists(), "nothing was made");
    req.point = PointChoice::LatestConsistent;
    assert!(test_failover(&store, &req, now_ms(), &stop).is_err());
    req.point = PointChoice::Latest;
    req.force = true;
    let rec = test_failover(&store, &req, now_ms(), &stop).unwrap();
    assert_eq!((rec.point, rec.state), (first.id, TestState::Running));
    // One test failover per disk at a time.
    assert!(test_failover(&store, &req, now_ms(), &stop).is_err());
    cleanup(&root, DISK, now_ms()).unwrap();
}

/// A file system of `fstype` on a loop device, mounted for this test.
fn mounted(fstype: &str) -> (LoopDev, tempfile::TempDir, Mounted) {
    let dev = LoopDev::new(512 << 20, false);
    match fstype {
        "xfs" => run("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", dev.path_str()]),
        _ => run("mkfs.ext4", &["-q", "-F", dev.path_str()]),
    };
    let mnt = tempfile::tempdir().unwrap();
    let m = Mounted::new(&["-t", fstype, dev.path_str()], mnt.path());
    (dev, mnt, m)
}

#[test]
#[ignore = "needs root: loop device, mkfs.xfs, mount, losetup"]
fn on_xfs_a_test_failover_is_a_reflink_clone_sharing_the_replicas_extents() {
    require_root("on_xfs_a_test_failover_is_a_reflink_clone_sharing_the_replicas_extents");
    if !have_qemu_img() {
        return;
    }
    let (_dev, _mnt, m) = mounted("xfs");
    let root = m.path().join("store");
    let out = m.path().join("tf");

    // The clone shares extents with the replica: check before cleanup.
    let mut rng = StdRng::seed_from_u64(3);
    let (store, point, _) = store_with_points(&root.join("probe"), &mut rng);
    let req = TestFailoverRequest {
        disk: DISK.into(),
        point: PointChoice::Id(point),
        out: m.path().join("probe-tf"),
        attach: false,
        force: false,
    };
    let rec = test_failover(&store, &req, now_ms(), &AtomicBool::new(false)).unwrap();
    assert_eq!(rec.method, Some(CopyMethod::Reflink));
    let frag = run("filefrag", &["-v", rec.flat.to_str().unwrap()]);
    assert!(
        frag.lines().any(|l| l.contains("shared")),
        "no shared extent in the clone:\n{frag}"
    );
    cleanup(&root.join("probe"), DISK, now_ms()).unwrap();
    drop(store);

    assert_eq!(
        test_failover_while_applying(&root, &out, true),
        CopyMethod::Reflink
    );
}

#[test]
#[ignore = "needs root: loop device, mkfs.ext4, mount, losetup"]
fn on_ext4_a_test_failover_is_an_export_attached_as_a_loop_device() {
    require_root("on_ext4_a_test_failover_is_an_export_attached_as_a_loop_device");
    if !have_qemu_img() {
        return;
    }
    let (_dev, _mnt, m) = mounted("ext4");
    let root = m.path().join("store");
    let out = m.path().join("tf");
    assert_eq!(
        test_failover_while_applying(&root, &out, true),
        CopyMethod::Export
    );
}

#[test]
fn a_failed_test_failover_leaves_nothing_behind_and_releases_its_point() {
    let tmp = tempfile::tempdir().unwrap();
    if shares_extents_here(tmp.path()) {
        // A clone does not stop on the cancel flag; the export path is tested.
        return;
    }
    let root = tmp.path().join("store");
    let mut rng = StdRng::seed_from_u64(5);
    let (store, point, _) = store_with_points(&root, &mut rng);
    let mut req = TestFailoverRequest {
        disk: DISK.into(),
        point: PointChoice::Id(point),
        out: tmp.path().join("tf"),
        attach: false,
        force: false,
    };
    // Cancelled (the service stopping) in the middle of the export.
    let e = test_failover(&store, &req, now_ms(), &AtomicBool::new(true)).unwrap_err();
    assert!(format!("{e:?}").contains("Cancelled"), "{e:?}");
    assert!(
        !req.out.exists(),
        "the failed test failover left its directory"
    );
    let rec = read_record(&root, DISK).unwrap().unwrap();
    assert_eq!(rec.state, TestState::CleanedUp);
    let dropped = lock(&store).apply_retention(&keep_newest(), LATER).unwrap();
    assert!(dropped.contains(&point), "the point is still held");
    // And the next test failover may start.
    req.point = PointChoice::Latest;
    let rec = test_failover(&store, &req, now_ms(), &AtomicBool::new(false)).unwrap();
    assert_eq!(rec.state, TestState::Running);
    cleanup(&root, DISK, now_ms()).unwrap();
}

#[test]
fn the_export_command_refuses_an_incomplete_point_with_advice_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let mut s = DiskStore::create(&root, DISK, SIZE, now_ms(), StoreOptions::default()).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    s.apply(&random_batch(&mut rng, 1, SIZE)).unwrap();
    let p = s
        .create_point(Consistency::NotConsistent, now_ms())
        .unwrap();
    s.close().unwrap();
    let out = tmp.path().join("p.raw");
    let export = |force: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_blockferry-target"));
        cmd.args(["export", "--format", "raw", "--disk", DISK])
            .arg("--store")
            .arg(&root)
            .arg("--out")
            .arg(&out)
            .args(["--point", &p.id.to_string()]);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let refused = export(false);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("incomplete") && err.contains("--force"),
        "{err}"
    );
    assert!(!out.exists());
    let forced = export(true);
    assert!(
        forced.status.success(),
        "{}",
        String::from_utf8_lossy(&forced.stderr)
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), SIZE);
    let points = std::process::Command::new(env!("CARGO_BIN_EXE_blockferry-target"))
        .args(["points", "--disk", DISK, "--store"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&points.stdout).contains("incomplete"));
}
