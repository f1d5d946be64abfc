//! The replica and its recovery points against a model disk, with qemu-img as
//! the independent oracle.

mod common;

use blockferry_proto::{DiskId, Generation, Seq};
use blockferry_target::export::{ExportFormat, export_point};
use blockferry_target::retention::{RetentionPolicy, Tier};
use blockferry_target::vmdk::check::check;
use blockferry_target::{Barrier, Consistency, DiskStore, StoreOptions, TargetError};
use common::*;
use rand::{Rng, SeedableRng, rngs::StdRng};

const SIZE: u64 = 4 << 20;

fn opts(checkpoint_bytes: u64) -> StoreOptions {
    StoreOptions {
        checkpoint_bytes,
        ..StoreOptions::default()
    }
}

#[test]
fn replica_equals_the_model_after_every_batch_and_every_point_exports_equal() {
    replica_and_points_against_the_model(false);
}

#[test]
fn thin_replica_equals_the_model_after_every_batch_and_every_point_exports_equal() {
    replica_and_points_against_the_model(true);
}

fn replica_and_points_against_the_model(thin: bool) {
    if !have_qemu_img() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let mut rng = StdRng::seed_from_u64(0xb10c);
    // A small checkpoint size so batches cross checkpoints and journal replays.
    let store_opts = || StoreOptions {
        thin,
        ..opts(256 << 10)
    };
    let mut s = DiskStore::create(&root, DISK, SIZE, now_ms(), store_opts()).unwrap();
    let model_path = tmp.path().join("model.raw");
    let mut model = vec![0u8; SIZE as usize];
    let mut snapshots = Vec::new();
    let mut cids = std::collections::BTreeSet::new();
    // Barriers take their own sequence numbers, between the batches'.
    let mut seq = 0;
    for _ in 0..24 {
        seq += 1;
        let b = random_batch(&mut rng, seq, SIZE);
        s.apply(&b).unwrap();
        model_apply(&mut model, &b);
        std::fs::write(&model_path, &model).unwrap();
        if thin {
            // A thin replica's grain tables reach the file at checkpoints
            // (after their grains are synced); in between the store reads
            // them from memory and the journal holds the batches.
            let mut got = vec![0u8; SIZE as usize];
            s.read_at(&mut got, 0).unwrap();
            assert_eq!(
                first_diff(&got, &model),
                None,
                "store read after batch {seq}"
            );
            if seq % 3 == 0 {
                s.checkpoint().unwrap();
            }
        }
        if !thin || seq % 3 == 0 {
            assert!(
                qemu_same(&model_path, s.replica_path()),
                "after batch {seq}"
            );
        }
        cids.insert(s.cid());
        if rng.gen_bool(0.3) {
            seq += 1;
            let label =
                [Consistency::CrashConsistent, Consistency::AppConsistent][rng.gen_range(0..2)];
            let barrier = Barrier {
                disk: DiskId::default(),
                generation: Generation(1),
                seq: Seq(seq),
                consistency: label,
                timestamp_ns: (now_ms() + seq * 1000) * 1_000_000,
            };
            let p = s.barrier(&barrier, now_ms()).unwrap().unwrap();
            assert_eq!(p.label, label);
            assert_eq!(p.marker_seq, seq);
            // A replayed barrier makes no second point.
            assert_eq!(s.barrier(&barrier, now_ms()).unwrap(), Some(p.clone()));
            snapshots.push((p.id, model.clone()));
        }
    }
    assert_eq!(cids.len(), 24, "the CID changes with every batch");
    let info = qemu_info(s.replica_path());
    assert_eq!(info[0]["virtual-size"], SIZE);
    assert_eq!(info[0]["format"], "vmdk");
    let create_type = if thin { "monolithicSparse" } else { "vmfs" };
    assert_eq!(
        info[0]["format-specific"]["data"]["create-type"],
        create_type
    );
    assert!(!snapshots.is_empty());
    for (id, snap) in &snapshots {
        let raw = tmp.path().join(format!("p{id}.raw"));
        export_point(&mut s, *id, ExportFormat::Raw, &raw, None, &mut |_, _| {}).unwrap();
        let got = std::fs::read(&raw).unwrap();
        assert_eq!(first_diff(&got, snap), None, "raw export of point {id}");
        let vmdk = tmp.path().join(format!("p{id}.vmdk"));
        export_point(
            &mut s,
            *id,
            ExportFormat::VmdkFlat,
            &vmdk,
            None,
            &mut |_, _| {},
        )
        .unwrap();
        std::fs::write(&model_path, snap).unwrap();
        assert!(
            qemu_same(&model_path, &vmdk),
            "vmdk-flat export of point {id}"
        );
        let sparse = tmp.path().join(format!("p{id}-sparse.vmdk"));
        export_point(
            &mut s,
            *id,
            ExportFormat::VmdkSparse,
            &sparse,
            None,
            &mut |_, _| {},
        )
        .unwrap();
        assert!(
            qemu_same(&model_path, &sparse),
            "vmdk-sparse export of point {id}"
        );
        assert!(check(&sparse).unwrap().is_clean(), "checker on point {id}");
    }
    // A chain of deltas, each chained by parentCID to the previous export.
    let mut parent = tmp.path().join(format!("p{}-sparse.vmdk", snapshots[0].0));
    for (i, (id, snap)) in snapshots.iter().enumerate().skip(1) {
        let delta = tmp.path().join(format!("d{id}.vmdk"));
        export_point(
            &mut s,
            *id,
            ExportFormat::VmdkSparse,
            &delta,
            Some(&parent),
            &mut |_, _| {},
        )
        .unwrap();
        std::fs::write(&model_path, snap).unwrap();
        assert!(qemu_same(&model_path, &delta), "delta export of point {id}");
        let chain = qemu_info(&delta);
        assert_eq!(
            chain.as_array().unwrap().len(),
            i + 1,
            "backing chain of point {id}"
        );
        assert_eq!(chain[0]["virtual-size"], SIZE);
        assert!(check(&delta).unwrap().is_clean(), "checker on delta {id}");
        parent = delta;
    }
    // Reopening keeps everything.
    drop(s);
    let mut s = DiskStore::open(&root, DISK, store_opts()).unwrap();
    assert_eq!(s.applied_seq(), seq);
    std::fs::write(&model_path, &model).unwrap();
    assert!(qemu_same(&model_path, s.replica_path()), "after reopen");
    if thin {
        let report = check(s.replica_path()).unwrap();
        assert!(report.is_clean(), "checker on the thin replica: {report:?}");
    }
    for (id, snap) in &snapshots {
        let img = s.point_image(*id).unwrap();
        let mut got = vec![0u8; SIZE as usize];
        img.read_at(&mut got, 0).unwrap();
        assert_eq!(first_diff(&got, snap), None, "point {id} after reopen");
    }
}

#[test]
fn a_hash_mismatch_rejects_the_whole_batch_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = DiskStore::create(tmp.path(), DISK, SIZE, now_ms(), opts(8 << 20)).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    s.apply(&random_batch(&mut rng, 1, SIZE)).unwrap();
    s.create_point(Consistency::CrashConsistent, now_ms())
        .unwrap();
    let before = replica_bytes(s.dir());
    let wal_before = std::fs::read(s.dir().join("journal.wal")).unwrap();
    let mut bad = random_batch(&mut rng, 2, SIZE);
    let mut broken = blockferry_target::batch::raw_chunk(8192, vec![0x5a; 4096]);
    let mut flipped = broken.payload.to_vec();
    flipped[4095] ^= 0x80;
    broken.payload = flipped.into();
    bad.chunks.push(broken);
    let err = s.apply(&bad).unwrap_err();
    assert!(
        matches!(err, TargetError::HashMismatch { offset: 8192, .. }),
        "{err}"
    );
    assert_eq!(s.applied_seq(), 1);
    assert_eq!(first_diff(&replica_bytes(s.dir()), &before), None);
    assert_eq!(
        std::fs::read(s.dir().join("journal.wal")).unwrap(),
        wal_before
    );
    // The same sequence number is still free for the good batch.
    let good = random_batch(&mut rng, 2, SIZE);
    s.apply(&good).unwrap();
    let mut model = before;
    model_apply(&mut model, &good);
    assert_eq!(first_diff(&replica_bytes(s.dir()), &model), None);
}

#[test]
fn replays_are_harmless_and_gaps_are_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = DiskStore::create(tmp.path(), DISK, SIZE, now_ms(), opts(8 << 20)).unwrap();
    let mut rng = StdRng::seed_from_u64(8);
    let b: Vec<_> = (1..=4).map(|q| random_batch(&mut rng, q, SIZE)).collect();
    s.apply(&b[0]).unwrap();
    s.apply(&b[1]).unwrap();
    let err = s.apply(&b[3]).unwrap_err();
    assert!(
        matches!(
            err,
            TargetError::Gap {
                got: 4,
                expected: 3,
                ..
            }
        ),
        "{err}"
    );
    // Replaying an older batch after a newer one must not roll data back.
    assert_eq!(
        s.apply(&b[0]).unwrap(),
        blockferry_target::ApplyOutcome::Duplicate
    );
    assert_eq!(
        first_diff(&replica_bytes(s.dir()), &model_at(&b, SIZE, 2)),
        None
    );
    let mut stale = b[2].clone();
    stale.generation = 0;
    assert!(matches!(
        s.apply(&stale).unwrap_err(),
        TargetError::StaleGeneration { .. }
    ));
    let mut other = b[2].clone();
    other.disk = "disk-b".into();
    assert!(matches!(
        s.apply(&other).unwrap_err(),
        TargetError::WrongDisk { .. }
    ));
    s.apply(&b[2]).unwrap();
    s.apply(&b[3]).unwrap();
    assert_eq!(
        first_diff(&replica_bytes(s.dir()), &model_at(&b, SIZE, 4)),
        None
    );
}

#[test]
fn no_space_for_the_journal_leaves_files_consistent_and_a_retry_applies() {
    let tmp = tempfile::tempdir().unwrap();
    let o = opts(8 << 20);
    let faults = o.faults.clone();
    let mut s = DiskStore::create(tmp.path(), DISK, SIZE, now_ms(), o).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    let b: Vec<_> = (1..=3).map(|q| random_batch(&mut rng, q, SIZE)).collect();
    s.apply(&b[0]).unwrap();
    s.create_point(Consistency::CrashConsistent, now_ms())
        .unwrap();
    faults.enospc_write_at(1);
    let err = s.apply(&b[1]).unwrap_err();
    assert!(err.is_no_space(), "{err}");
    assert_eq!(s.applied_seq(), 1);
    assert_eq!(
        first_diff(&replica_bytes(s.dir()), &model_at(&b, SIZE, 1)),
        None
    );
    // Space is back: the same batch goes through, and so does the next.
    s.apply(&b[1]).unwrap();
    s.apply(&b[2]).unwrap();
    // And everything survives a reopen (journal replay).
    drop(s);
    let mut s = DiskStore::open(tmp.path(), DISK, opts(1 << 20)).unwrap();
    assert_eq!(s.applied_seq(), 3);
    assert_eq!(
        first_diff(&replica_bytes(s.dir()), &model_at(&b, SIZE, 3)),
        None
    );
    let id = s.points()[0].id;
    let img = s.point_image(id).unwrap();
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(&mut got, 0).unwrap();
    assert_eq!(first_diff(&got, &model_at(&b, SIZE, 1)), None);
}

/// Runs a fixed script of batches and points, failing the k-th sync; after
/// the failure the store is dropped (as a crash would) and reopened.
#[test]
fn a_failed_sync_at_any_step_recovers_to_a_batch_boundary_with_exact_points() {
    failed_sync_at_any_step(false);
}

#[test]
fn a_thin_replica_recovers_from_a_failed_sync_at_any_step() {
    failed_sync_at_any_step(true);
}

fn failed_sync_at_any_step(thin: bool) {
    let store_opts = |checkpoint_bytes| StoreOptions {
        thin,
        ..opts(checkpoint_bytes)
    };
    let mut rng = StdRng::seed_from_u64(10);
    const SMALL: u64 = 1 << 20;
    let batches: Vec<_> = (1..=8).map(|q| random_batch(&mut rng, q, SMALL)).collect();
    // The model after each batch, computed once.
    let models: Vec<Vec<u8>> = (0..=8).map(|q| model_at(&batches, SMALL, q)).collect();
    let point_after = [2u64, 5, 6];
    let mut k = 1;
    loop {
        let tmp = fast_tempdir();
        let o = store_opts(96 << 10);
        let faults = o.faults.clone();
        let mut s = DiskStore::create(tmp.path(), DISK, SMALL, now_ms(), o).unwrap();
        faults.fail_sync_at(k);
        let mut failed_at = None;
        'script: for b in &batches {
            let before = s.applied_seq();
            if let Err(e) = s.apply(b) {
                failed_at = Some((before, e));
                break 'script;
            }
            if point_after.contains(&b.seq)
                && let Err(e) = s.create_point(Consistency::CrashConsistent, now_ms() + b.seq)
            {
                failed_at = Some((b.seq, e));
                break 'script;
            }
        }
        let Some((before, err)) = failed_at else {
            break; // k is past the last sync of the script
        };
        assert!(!err.is_no_space(), "{err}");
        drop(s);
        faults.clear();
        let mut s = DiskStore::open(tmp.path(), DISK, store_opts(1 << 20)).unwrap();
        let applied = s.applied_seq();
        assert!(
            applied == before || applied == before + 1,
            "sync {k}: applied {applied}, failure after {before}"
        );
        let mut replica = vec![0u8; SMALL as usize];
        s.read_at(&mut replica, 0).unwrap();
        assert_eq!(
            first_diff(&replica, &models[applied as usize].clone()),
            None,
            "sync {k}: replica is not at batch boundary {applied}"
        );
        if thin && have_qemu_img() {
            // Opening replayed and checkpointed: the file itself is current.
            let model = tmp.path().join("model.raw");
            std::fs::write(&model, &models[applied as usize]).unwrap();
            assert!(
                qemu_same(&model, s.replica_path()),
                "sync {k}: qemu-img compare"
            );
            let report = check(s.replica_path()).unwrap();
            assert!(report.is_clean(), "sync {k}: {report:?}");
        }
        let points = s.points().to_vec();
        for p in &points {
            let img = s.point_image(p.id).unwrap();
            let mut got = vec![0u8; SMALL as usize];
            img.read_at(&mut got, 0).unwrap();
            assert_eq!(
                first_diff(&got, &models[p.seq as usize].clone()),
                None,
                "sync {k}: point {}",
                p.id
            );
        }
        // Replication continues where it stopped.
        for b in &batches[applied as usize..] {
            s.apply(b).unwrap();
        }
        s.read_at(&mut replica, 0).unwrap();
        assert_eq!(first_diff(&replica, &models[8].clone()), None);
        k += 1;
        assert!(k < 500, "script never finished");
    }
    assert!(k > 10, "the script should sync many times, saw {k}");
}

#[test]
fn retention_drops_points_and_every_remaining_point_stays_exact() {
    let tmp = fast_tempdir();
    let mut s = DiskStore::create(tmp.path(), DISK, SIZE, now_ms(), opts(8 << 20)).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let mut batches = Vec::new();
    let t0 = now_ms();
    let minute = 60_000;
    // One point per minute for 40 minutes, with batches in between.
    for i in 0..40u64 {
        for _ in 0..2 {
            let b = random_batch(&mut rng, batches.len() as u64 + 1, SIZE);
            s.apply(&b).unwrap();
            batches.push(b);
        }
        s.create_point(Consistency::CrashConsistent, t0 + i * minute)
            .unwrap();
    }
    let policy = RetentionPolicy {
        keep_all_secs: 600,
        tiers: vec![Tier {
            every_secs: 600,
            up_to_secs: 1800,
        }],
    };
    let now = t0 + 40 * minute;
    let dropped = s.apply_retention(&policy, now).unwrap();
    assert!(dropped.len() > 20, "dropped {}", dropped.len());
    let points = s.points().to_vec();
    for p in &points {
        let age = (now - p.time_ms) / 1000;
        assert!(age <= 1800, "point {} aged {age}s kept", p.id);
    }
    assert!(
        points
            .iter()
            .filter(|p| (now - p.time_ms) / 1000 > 600)
            .count()
            >= 2
    );
    for p in &points {
        let img = s.point_image(p.id).unwrap();
        let mut got = vec![0u8; SIZE as usize];
        img.read_at(&mut got, 0).unwrap();
        assert_eq!(
            first_diff(&got, &model_at(&batches, SIZE, p.seq)),
            None,
            "point {}",
            p.id
        );
    }
    // Only referenced segment files remain.
    let undo = std::fs::read_dir(s.dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".undo")
        })
        .count();
    assert_eq!(undo, points.len());
}

#[test]
fn reads_beyond_the_disk_end_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = DiskStore::create(tmp.path(), DISK, SIZE, now_ms(), opts(8 << 20)).unwrap();
    let p = s
        .create_point(Consistency::NotConsistent, now_ms())
        .unwrap();
    let img = s.point_image(p.id).unwrap();
    let mut buf = vec![0u8; 1024];
    assert!(matches!(
        img.read_at(&mut buf, SIZE - 512),
        Err(TargetError::OutOfRange { .. })
    ));
    assert!(img.read_at(&mut buf, u64::MAX - 10).is_err());
}

#[test]
fn a_group_of_batches_is_applied_in_order_and_one_bad_batch_rejects_the_group() {
    let tmp = fast_tempdir();
    let mut s = DiskStore::create(tmp.path(), DISK, SIZE, now_ms(), opts(8 << 20)).unwrap();
    let mut rng = StdRng::seed_from_u64(12);
    let b: Vec<_> = (1..=8).map(|q| random_batch(&mut rng, q, SIZE)).collect();
    s.apply(&b[0]).unwrap();
    s.create_point(Consistency::CrashConsistent, now_ms())
        .unwrap();
    // Batches 2..=5 with a bad chunk in 5: nothing of 2..=4 is written either.
    let mut group = b[1..5].to_vec();
    group[3].chunks[0].hash[0] ^= 1;
    let before = replica_bytes(s.dir());
    assert!(matches!(
        s.apply_many(&group).unwrap_err(),
        TargetError::HashMismatch { .. }
    ));
    assert_eq!(s.applied_seq(), 1);
    assert_eq!(first_diff(&replica_bytes(s.dir()), &before), None);
    // A good group, including a replay of batch 1, goes through in order.
    let out = s.apply_many(&b[0..8]).unwrap();
    assert_eq!(out[0], blockferry_target::ApplyOutcome::Duplicate);
    assert!(
        out[1..]
            .iter()
            .all(|o| *o == blockferry_target::ApplyOutcome::Applied)
    );
    assert_eq!(s.applied_seq(), 8);
    assert_eq!(
        first_diff(&replica_bytes(s.dir()), &model_at(&b, SIZE, 8)),
        None
    );
    // The point still reads as the disk after batch 1, also after a reopen.
    drop(s);
    let mut s = DiskStore::open(tmp.path(), DISK, opts(1 << 20)).unwrap();
    let id = s.points()[0].id;
    let img = s.point_image(id).unwrap();
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(&mut got, 0).unwrap();
    assert_eq!(first_diff(&got, &model_at(&b, SIZE, 1)), None);
}
