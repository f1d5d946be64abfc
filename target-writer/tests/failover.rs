//! Failover on the target host: the writable disk of a chosen point equals
//! that point's export byte for byte and the replica is promoted at the
//! point's sequence (frames refused from then on); the point changes only
//! with --discard-writes, never after commit; a planned failover takes only
//! the final point of a stopped source; a failover interrupted at any step
//! finishes when run again. Stores are built through the store API; the
//! temp dirs share no extents, so the disks are exports (the reflink path
//! is the test failover's, tested there and in the root test below).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use blockferry_proto::{Barrier, CopyRole, DiskId, Generation, Seq};
use blockferry_target::export::{ExportFormat, export_point_live};
use blockferry_target::failover::{
    CopyMethod, DrState, Failover, FailoverError, FailoverRequest, FailoverState, PointChoice,
    TestFailoverRequest, cleanup, commit, dr_status, failover, real, test_failover,
};
use blockferry_target::retention::RetentionPolicy;
use blockferry_target::{Consistency, DiskStore, StoreOptions, TargetError};
use blockferry_testkit::devices::{LoopDev, Mounted};
use blockferry_testkit::privileged::{require_root, run};
use common::*;
use rand::{SeedableRng, rngs::StdRng};

const SIZE: u64 = 8 << 20;
const BIN: &str = env!("CARGO_BIN_EXE_blockferry-target");

fn barrier(seq: u64) -> Barrier {
    Barrier {
        disk: DiskId::default(),
        generation: Generation(1),
        seq: Seq(seq),
        consistency: Consistency::CrashConsistent,
        timestamp_ns: 0,
    }
}

/// A store of `DISK` with batches 1..=10, a point (barrier 11), batches
/// 12..=21, a point (barrier 22), and batches 23..=25 after it. Returns the
/// store and the two points' ids.
fn store_with_points(root: &Path) -> (Mutex<DiskStore>, u64, u64) {
    let mut rng = StdRng::seed_from_u64(11);
    let opts = StoreOptions {
        checkpoint_bytes: 1 << 20,
        ..StoreOptions::default()
    };
    let mut s = DiskStore::create(root, DISK, SIZE, now_ms(), opts).unwrap();
    let mut seq = 0;
    let mut ids = Vec::new();
    for _ in 0..2 {
        for _ in 0..10 {
            seq += 1;
            s.apply(&random_batch(&mut rng, seq, SIZE)).unwrap();
        }
        seq += 1;
        ids.push(s.barrier(&barrier(seq), now_ms()).unwrap().unwrap().id);
    }
    for _ in 0..3 {
        seq += 1;
        s.apply(&random_batch(&mut rng, seq, SIZE)).unwrap();
    }
    (Mutex::new(s), ids[0], ids[1])
}

fn request(point: u64, out: &Path) -> FailoverRequest {
    FailoverRequest {
        disk: DISK.into(),
        point: PointChoice::Id(point),
        out: out.to_path_buf(),
        attach: false,
        force: false,
        planned: false,
        discard_writes: false,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap()
}

/// Point `id` exported raw.
fn export_raw(store: &Mutex<DiskStore>, id: u64, path: &Path) -> Vec<u8> {
    let stop = AtomicBool::new(false);
    export_point_live(
        store,
        id,
        ExportFormat::Raw,
        path,
        None,
        &stop,
        &mut |_, _| {},
    )
    .unwrap();
    std::fs::read(path).unwrap()
}

/// The writable disk of `rec` equals point `id`'s export byte for byte.
fn assert_disk_is_point(store: &Mutex<DiskStore>, rec: &Failover, id: u64, scratch: &Path) {
    let want = export_raw(store, id, &scratch.join(format!("point-{id}.raw")));
    let got = std::fs::read(&rec.flat).unwrap();
    assert_eq!(
        first_diff(&got, &want),
        None,
        "the writable disk differs from point {id}"
    );
    assert!(rec.descriptor.exists());
}

fn point_seq(store: &Mutex<DiskStore>, id: u64) -> u64 {
    let s = lock(store);
    real::point_seq(s.points().iter().find(|p| p.id == id).unwrap())
}

#[test]
fn an_unplanned_failover_to_an_older_point_is_that_points_disk_and_promotes_the_record_at_its_seq()
{
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let (store, older, _) = store_with_points(&root);
    let before = lock(&store).generation_record_now().unwrap();
    let applied = lock(&store).applied_seq();
    let out = tmp.path().join("fo");
    let rec = failover(
        &store,
        &request(older, &out),
        now_ms(),
        &AtomicBool::new(false),
    )
    .unwrap();

    assert_eq!(rec.state, FailoverState::FailedOver);
    assert!(rec.is_promoted());
    assert_eq!(
        rec.seq, 11,
        "the point holds the stream through its barrier"
    );
    assert_eq!(rec.seq, point_seq(&store, older));
    assert_disk_is_point(&store, &rec, older, tmp.path());

    let s = lock(&store);
    let r = s.generation_record();
    assert_eq!(r.role(), CopyRole::Source);
    assert_eq!(r.current().seq, Seq(rec.seq), "promoted at the point");
    assert_eq!(r.history()[0].id, before.current().id);
    assert_eq!(r.history()[0].seq, Seq(rec.seq));
    assert_eq!(Some(r.current().number.0), rec.generation);
    assert_eq!(
        rec.generation_id.as_deref(),
        Some(format!("{:#}", r.current().id).trim_start_matches('g'))
    );
    assert_eq!(s.applied_seq(), applied, "the replica's data is untouched");
    drop(s);

    // Frames of the former source are refused from now on.
    let mut rng = StdRng::seed_from_u64(99);
    let e = lock(&store)
        .apply(&random_batch(&mut rng, applied + 1, SIZE))
        .unwrap_err();
    assert!(matches!(e, TargetError::StaleGeneration { .. }), "{e:?}");

    // Retention keeps the point the disk was made of.
    let keep_newest = RetentionPolicy {
        keep_all_secs: 0,
        tiers: Vec::new(),
    };
    let dropped = lock(&store)
        .apply_retention(&keep_newest, 4_000_000_000_000)
        .unwrap();
    assert!(
        !dropped.contains(&older),
        "retention removed the failover's point"
    );

    // The promotion and the record survive reopening the store.
    let summary = rec.summary();
    assert_eq!(summary.vmdk, rec.descriptor);
    assert!(summary.seconds.is_some());
    lock(&store).checkpoint().unwrap();
    drop(store);
    let s = DiskStore::open(&root, DISK, StoreOptions::default()).unwrap();
    assert_eq!(s.generation_record().current().seq, Seq(rec.seq));
    assert_eq!(real::read_record(&root, DISK).unwrap(), Some(rec));
    assert_eq!(dr_status(&root, DISK).unwrap().state, DrState::FailedOver);
}

#[test]
fn the_point_changes_only_with_discard_writes_and_then_from_the_record_before_the_promotion() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let (store, older, newer) = store_with_points(&root);
    let before = lock(&store).generation_record_now().unwrap();
    let stop = AtomicBool::new(false);
    let out = tmp.path().join("fo");
    let first = failover(&store, &request(older, &out), now_ms(), &stop).unwrap();
    // The workload writes its disk.
    std::fs::write(&first.flat, b"written at the recovery site").unwrap();

    let mut req = request(newer, &tmp.path().join("fo2"));
    let e = failover(&store, &req, now_ms(), &stop).unwrap_err();
    assert!(
        matches!(
            e,
            TargetError::Failover(FailoverError::WritesWouldBeLost { point, new_point, .. })
                if point == older && new_point == newer
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("--discard-writes"), "{e}");
    assert!(first.flat.exists(), "the refused change removed the disk");
    assert_eq!(
        real::read_record(&root, DISK).unwrap().as_ref(),
        Some(&first)
    );

    // The same failover again changes nothing.
    let again = failover(&store, &request(older, &out), now_ms(), &stop).unwrap();
    assert_eq!(again, first);

    req.discard_writes = true;
    let second = failover(&store, &req, now_ms(), &stop).unwrap();
    assert_eq!(second.point, newer);
    assert_eq!(second.discarded, vec![older]);
    assert!(!first.flat.exists() && !first.descriptor.exists());
    assert!(!out.exists(), "the first failover's directory is gone");
    assert_disk_is_point(&store, &second, newer, tmp.path());
    let s = lock(&store);
    let r = s.generation_record();
    assert_eq!(r.current().seq, Seq(second.seq));
    assert_eq!(second.seq, 22);
    assert_eq!(
        r.history()[0].id,
        before.current().id,
        "promoted from the saved record"
    );
    assert!(
        !r.history().iter().any(|e| Some(
            format!("{:#}", e.id).trim_start_matches('g').to_string()
        ) == first.generation_id),
        "the first promotion is no part of the lineage"
    );
    assert_ne!(second.generation_id, first.generation_id);
}

#[test]
fn a_committed_failover_cannot_change_its_point_nor_be_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let (store, older, newer) = store_with_points(&root);
    let e = commit(&store, now_ms()).unwrap_err();
    assert!(
        matches!(
            e,
            TargetError::Failover(FailoverError::NotFailedOver { .. })
        ),
        "{e:?}"
    );
    let stop = AtomicBool::new(false);
    let out = tmp.path().join("fo");
    let rec = failover(&store, &request(older, &out), now_ms(), &stop).unwrap();
    let done = commit(&store, now_ms()).unwrap();
    assert_eq!(done.state, FailoverState::Committed);
    assert!(done.committed_ms.is_some());
    assert_eq!(
        commit(&store, now_ms()).unwrap(),
        done,
        "commit is idempotent"
    );

    let mut req = request(newer, &out);
    req.discard_writes = true;
    let e = failover(&store, &req, now_ms(), &stop).unwrap_err();
    assert!(
        matches!(e, TargetError::Failover(FailoverError::Committed { point, .. }) if point == older),
        "{e:?}"
    );
    let e = cleanup(&root, DISK, now_ms()).unwrap_err();
    assert!(
        matches!(
            e,
            TargetError::Failover(FailoverError::FailedOverNoCleanup { .. })
        ),
        "{e:?}"
    );
    assert!(
        rec.flat.exists() && rec.descriptor.exists(),
        "the disk stays"
    );
    let st = dr_status(&root, DISK).unwrap();
    assert_eq!((st.state, st.point), (DrState::Committed, Some(older)));
    assert_eq!(st.role.as_deref(), Some("source"));
}

#[test]
fn a_planned_failover_is_refused_while_the_replica_holds_batches_after_the_latest_point() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let (store, older, newer) = store_with_points(&root);
    let stop = AtomicBool::new(false);
    let out = tmp.path().join("fo");
    let mut req = request(newer, &out);
    req.planned = true;
    let e = failover(&store, &req, now_ms(), &stop).unwrap_err();
    assert!(
        matches!(&e, TargetError::Failover(FailoverError::NotPlannable { reason, .. })
            if reason.contains("batches after it")),
        "{e:?}"
    );
    assert!(e.to_string().contains("handoff"), "{e}");
    req.point = PointChoice::Id(older);
    let e = failover(&store, &req, now_ms(), &stop).unwrap_err();
    assert!(e.to_string().contains("not the latest point"), "{e}");
    assert!(!out.exists(), "a refused failover made nothing");
    assert_eq!(real::read_record(&root, DISK).unwrap(), None);
    assert!(!lock(&store).is_promoted());

    // The source sends its final point and stops.
    let applied = lock(&store).applied_seq();
    let last = lock(&store)
        .barrier(&barrier(applied + 1), now_ms())
        .unwrap()
        .unwrap();
    req.point = PointChoice::Latest;
    let rec = failover(&store, &req, now_ms(), &stop).unwrap();
    assert!(rec.planned);
    assert_eq!((rec.point, rec.seq), (last.id, applied + 1));
    assert_eq!(
        lock(&store).generation_record().current().seq,
        Seq(applied + 1)
    );
    assert_disk_is_point(&store, &rec, last.id, tmp.path());
}

#[test]
fn a_failover_interrupted_at_any_step_finishes_when_run_again() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let (store, older, _) = store_with_points(&root);
    let stop = AtomicBool::new(false);
    let out = tmp.path().join("fo");
    let req = request(older, &out);
    let dir = root.join(DISK);

    // Crash 1: the record is written, nothing is made, nothing promoted.
    let (descriptor, flat) = blockferry_target::failover::disk_paths(&out, DISK);
    let written = Failover {
        disk: DISK.into(),
        state: FailoverState::FailedOver,
        planned: false,
        point: older,
        seq: point_seq(&store, older),
        started_ms: now_ms(),
        out: out.clone(),
        created_out: true,
        descriptor: descriptor.clone(),
        flat: flat.clone(),
        attach: false,
        method: None,
        loop_device: None,
        before: None,
        generation: None,
        generation_id: None,
        lineage: None,
        ready_secs: None,
        failed_over_ms: None,
        committed_ms: None,
        discarded: Vec::new(),
    };
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(&flat, b"half a copy").unwrap();
    std::fs::write(
        dir.join(real::RECORD),
        serde_json::to_vec(&written).unwrap(),
    )
    .unwrap();
    assert_eq!(dr_status(&root, DISK).unwrap().state, DrState::FailingOver);
    let rec = failover(&store, &req, now_ms(), &stop).unwrap();
    assert!(rec.is_promoted());
    assert_disk_is_point(&store, &rec, older, tmp.path());
    assert_eq!(lock(&store).generation_record().current().seq, Seq(rec.seq));
    let lineage = lock(&store).generation_record().clone();

    // Crash 2: the store was promoted, then the disk went and the record
    // lost everything after saving the record before the promotion.
    std::fs::remove_file(&rec.flat).unwrap();
    std::fs::remove_file(&rec.descriptor).unwrap();
    let mut lost = rec.clone();
    lost.method = None;
    lost.generation = None;
    lost.generation_id = None;
    lost.lineage = None;
    std::fs::write(dir.join(real::RECORD), serde_json::to_vec(&lost).unwrap()).unwrap();
    let again = failover(&store, &req, now_ms(), &stop).unwrap();
    assert!(again.is_promoted());
    assert_disk_is_point(&store, &again, older, tmp.path());
    let r = lock(&store).generation_record().clone();
    assert_eq!(r.current().seq, Seq(again.seq));
    assert_eq!(
        r.history(),
        lineage.history(),
        "promoted again from the same record"
    );
    assert_eq!(r.role(), CopyRole::Source);
    commit(&store, now_ms()).unwrap();
}

#[test]
fn a_failover_failing_before_the_promotion_leaves_nothing_and_promotes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let (store, older, _) = store_with_points(&root);
    let out = tmp.path().join("fo");
    // Cancelled (the service stopping) in the middle of the export.
    let e = failover(
        &store,
        &request(older, &out),
        now_ms(),
        &AtomicBool::new(true),
    )
    .unwrap_err();
    assert!(format!("{e:?}").contains("Cancelled"), "{e:?}");
    assert!(!out.exists());
    assert_eq!(real::read_record(&root, DISK).unwrap(), None);
    assert!(!lock(&store).is_promoted());
    assert_eq!(dr_status(&root, DISK).unwrap().state, DrState::Protected);
}

#[test]
fn a_test_failover_and_a_failover_of_one_disk_exclude_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let (store, older, _) = store_with_points(&root);
    let stop = AtomicBool::new(false);
    let treq = TestFailoverRequest {
        disk: DISK.into(),
        point: PointChoice::Id(older),
        out: tmp.path().join("tf"),
        attach: false,
        force: false,
    };
    test_failover(&store, &treq, now_ms(), &stop).unwrap();
    assert_eq!(dr_status(&root, DISK).unwrap().state, DrState::TestFailover);
    let e = failover(
        &store,
        &request(older, &tmp.path().join("fo")),
        now_ms(),
        &stop,
    )
    .unwrap_err();
    assert!(
        matches!(e, TargetError::Failover(FailoverError::TestRunning { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("--cleanup"), "{e}");
    assert!(!lock(&store).is_promoted());
    cleanup(&root, DISK, now_ms()).unwrap();
    failover(
        &store,
        &request(older, &tmp.path().join("fo")),
        now_ms(),
        &stop,
    )
    .unwrap();
    let e = test_failover(&store, &treq, now_ms(), &stop).unwrap_err();
    assert!(
        matches!(
            e,
            TargetError::Failover(FailoverError::FailedOverNoTest { .. })
        ),
        "{e:?}"
    );
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN).args(args).output().unwrap()
}

fn cli_json(args: &[&str]) -> serde_json::Value {
    let out = cli(args);
    assert!(
        out.status.success(),
        "blockferry-target {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_failover_command_prints_its_outcome_and_points_shows_the_disks_state() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let (store, older, newer) = store_with_points(&root);
    lock(&store).checkpoint().unwrap();
    drop(store);
    let root_s = root.to_str().unwrap();
    let out: PathBuf = tmp.path().join("fo");
    let out_s = out.to_str().unwrap();
    let older_s = older.to_string();
    let base = ["--store", root_s, "--disk", DISK];

    let points = cli_json(&[&["points"][..], &base, &["--json"]].concat());
    assert_eq!(points["state"], "protected");
    assert_eq!(points["role"], "replica");

    let fo = cli_json(
        &[
            &["failover"][..],
            &base,
            &["--point", &older_s, "--out", out_s, "--json"],
        ]
        .concat(),
    );
    for field in [
        "disk",
        "point",
        "seq",
        "method",
        "vmdk",
        "flat",
        "loop_device",
        "generation",
        "generation_id",
        "lineage",
        "state",
        "seconds",
    ] {
        assert!(fo.get(field).is_some(), "no {field} in {fo}");
    }
    assert_eq!(fo["point"], older);
    assert_eq!(fo["seq"], 11);
    assert_eq!(fo["method"], "export");
    assert_eq!(fo["state"], "failed-over");
    assert!(fo["loop_device"].is_null());
    assert!(fo["seconds"].as_f64().is_some());
    assert_eq!(fo["generation_id"].as_str().unwrap().len(), 32);

    let text = cli(&[&["points"][..], &base].concat());
    let text = String::from_utf8_lossy(&text.stdout);
    let first = text.lines().next().unwrap();
    assert!(
        first.contains("source") && first.contains(&format!("failed over to point {older}")),
        "{text}"
    );

    let refused = cli(&[
        &["failover"][..],
        &base,
        &["--point", &newer.to_string(), "--out", out_s],
    ]
    .concat());
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--discard-writes"));

    let done = cli_json(&[&["failover", "--commit"][..], &base, &["--json"]].concat());
    assert_eq!(done["state"], "committed");
    let points = cli_json(&[&["points"][..], &base, &["--json"]].concat());
    assert_eq!(points["state"], "committed");
    assert_eq!(points["state_point"], older);
    let at: Vec<_> = points["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["failover"].is_null())
        .collect();
    assert_eq!(at.len(), 1);
    assert_eq!(at[0]["id"], older);
    let cleanup = cli(&[&["failover", "--cleanup"][..], &base].concat());
    assert!(!cleanup.status.success());
    assert!(String::from_utf8_lossy(&cleanup.stderr).contains("test failover"));
}

/// An XFS file system with reflinks on a loop device, mounted for this test.
fn mounted_xfs() -> (LoopDev, tempfile::TempDir, Mounted) {
    let dev = LoopDev::new(512 << 20, false);
    run("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", dev.path_str()]);
    let mnt = tempfile::tempdir().unwrap();
    let m = Mounted::new(&["-t", "xfs", dev.path_str()], mnt.path());
    (dev, mnt, m)
}

/// Loop devices backed by `file`.
fn loops_of(file: &Path) -> Vec<String> {
    run("losetup", &["-j", file.to_str().unwrap()])
        .lines()
        .filter_map(|l| l.split(':').next())
        .map(str::to_string)
        .collect()
}

#[test]
#[ignore = "needs root: loop device, mkfs.xfs, mount, losetup"]
fn on_xfs_a_failover_is_a_reflink_clone_on_a_loop_device_and_a_change_of_point_detaches_it() {
    require_root(
        "on_xfs_a_failover_is_a_reflink_clone_on_a_loop_device_and_a_change_of_point_detaches_it",
    );
    let (_dev, _mnt, m) = mounted_xfs();
    let root = m.path().join("store");
    let (store, older, newer) = store_with_points(&root);
    let stop = AtomicBool::new(false);
    let mut req = request(older, &m.path().join("fo"));
    req.attach = true;
    let first = failover(&store, &req, now_ms(), &stop).unwrap();
    assert_eq!(first.method, Some(CopyMethod::Reflink));
    let dev = first.loop_device.clone().unwrap();
    let want = export_raw(&store, older, &m.path().join("older.raw"));
    assert_eq!(first_diff(&std::fs::read(&dev).unwrap(), &want), None);

    req.point = PointChoice::Id(newer);
    req.out = m.path().join("fo2");
    req.discard_writes = true;
    let second = failover(&store, &req, now_ms(), &stop).unwrap();
    assert!(!first.flat.exists());
    let backing = run("losetup", &["-l", "-n", "-O", "BACK-FILE"]);
    assert!(
        !backing.contains(first.flat.to_str().unwrap()),
        "the first point's loop device is still attached:\n{backing}"
    );
    let dev2 = second.loop_device.clone().unwrap();
    assert_eq!(
        loops_of(&second.flat),
        vec![dev2.to_str().unwrap().to_string()]
    );
    let want = export_raw(&store, newer, &m.path().join("newer.raw"));
    assert_eq!(first_diff(&std::fs::read(&dev2).unwrap(), &want), None);
    run("losetup", &["-d", dev2.to_str().unwrap()]);
    drop(store);
}
