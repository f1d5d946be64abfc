//! The sequence invariant at the store, across generations and reopens, and
//! the state file's format.

use super::*;
use blockferry_proto::{Barrier, Generation, Seq};

use crate::batch::{ApplyBatch, raw_chunk};

fn batch(generation: u64, seq: u64) -> ApplyBatch {
    ApplyBatch {
        disk: "d".into(),
        generation,
        seq,
        chunks: vec![raw_chunk(seq * 4096 % (1 << 20), vec![seq as u8; 4096])],
    }
}

fn barrier(generation: u64, seq: u64) -> Barrier {
    Barrier {
        disk: blockferry_proto::DiskId::default(),
        generation: Generation(generation),
        seq: Seq(seq),
        consistency: Consistency::CrashConsistent,
        timestamp_ns: 0,
    }
}

fn store(dir: &Path) -> DiskStore {
    DiskStore::create(dir, "d", 1 << 20, 1, StoreOptions::default()).unwrap()
}

#[test]
fn a_newer_generation_continues_the_sequence_count() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    s.apply_many(&[batch(1, 1), batch(1, 2)]).unwrap();
    assert_eq!(s.apply(&batch(2, 3)).unwrap(), ApplyOutcome::Applied);
    assert_eq!((s.generation(), s.applied_seq()), (2, 3));
    // Across a reopen the count goes on from where it was durable.
    drop(s);
    let mut s = DiskStore::open(tmp.path(), "d", StoreOptions::default()).unwrap();
    assert_eq!((s.generation(), s.applied_seq()), (2, 3));
    assert!(s.barrier(&barrier(2, 4), 5).unwrap().is_some());
    assert_eq!(s.apply(&batch(3, 5)).unwrap(), ApplyOutcome::Applied);
}

#[test]
fn a_newer_generation_restarting_the_count_is_refused_as_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    s.apply_many(&[batch(1, 1), batch(1, 2)]).unwrap();
    let err = s.apply(&batch(2, 1)).unwrap_err();
    assert!(
        matches!(
            err,
            TargetError::ReusedSeq {
                generation: 2,
                got: 1,
                held: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = s.barrier(&barrier(2, 2), 5).unwrap_err();
    assert!(matches!(err, TargetError::ReusedSeq { .. }), "{err}");
    // Nothing was applied: the next frame is still 3.
    assert_eq!((s.generation(), s.applied_seq()), (1, 2));
}

#[test]
fn a_stale_generation_is_refused_after_a_generation_change() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    s.apply_many(&[batch(1, 1), batch(2, 2)]).unwrap();
    let err = s.apply(&batch(1, 3)).unwrap_err();
    assert!(
        matches!(
            err,
            TargetError::StaleGeneration {
                got: 1,
                current: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = s.barrier(&barrier(1, 3), 5).unwrap_err();
    assert!(matches!(err, TargetError::StaleGeneration { .. }), "{err}");
}

#[test]
fn a_gap_in_a_group_rejects_the_whole_group() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    let err = s.apply_many(&[batch(1, 1), batch(2, 3)]).unwrap_err();
    assert!(
        matches!(
            err,
            TargetError::Gap {
                got: 3,
                expected: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(s.applied_seq(), 0);
    // A replay of a durable frame of the current generation is a duplicate.
    s.apply(&batch(1, 1)).unwrap();
    assert_eq!(s.apply(&batch(1, 1)).unwrap(), ApplyOutcome::Duplicate);
}

#[test]
fn the_state_file_keeps_label_text() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    s.create_point(Consistency::AppConsistent, 7).unwrap();
    let text = std::fs::read_to_string(s.dir().join(STATE)).unwrap();
    assert!(text.contains("\"label\": \"app-consistent\""), "{text}");
    drop(s);
    let points = list_points(tmp.path(), "d").unwrap();
    assert_eq!(points[0].label, Consistency::AppConsistent);
}

#[test]
fn scheduled_points_are_incomplete_until_a_barrier_and_again_once_a_resync_begins() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    s.apply(&batch(1, 1)).unwrap();
    let first = s.create_point(Consistency::NotConsistent, 2).unwrap();
    assert!(
        first.incomplete,
        "the first point precedes the initial sync"
    );
    s.apply(&batch(1, 2)).unwrap();
    let b = s.barrier(&barrier(1, 3), 3).unwrap().unwrap();
    assert!(!b.incomplete, "the agent sends barriers only when complete");
    s.apply(&batch(1, 4)).unwrap();
    let after = s.create_point(Consistency::NotConsistent, 4).unwrap();
    assert!(!after.incomplete);
    s.mark_incomplete().unwrap();
    s.apply(&batch(1, 5)).unwrap();
    let during = s.create_point(Consistency::NotConsistent, 5).unwrap();
    assert!(during.incomplete, "a resync began");
    // The labels and the completeness survive a reopen.
    drop(s);
    let s = DiskStore::open(tmp.path(), "d", StoreOptions::default()).unwrap();
    let incomplete: Vec<bool> = s.points().iter().map(|p| p.incomplete).collect();
    assert_eq!(incomplete, [true, false, false, true]);
    assert!(!s.is_complete());
}

#[test]
fn an_incomplete_point_is_refused_naming_the_newest_complete_one_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = store(tmp.path());
    s.apply(&batch(1, 1)).unwrap();
    let p1 = s.create_point(Consistency::NotConsistent, 2).unwrap();
    match s.usable_point(p1.id, false).unwrap_err() {
        e @ TargetError::IncompletePoint {
            latest_complete: None,
            ..
        } => assert!(e.to_string().contains("--force"), "{e}"),
        e => panic!("{e:?}"),
    }
    assert_eq!(s.usable_point(p1.id, true).unwrap().id, p1.id);
    let p2 = s.barrier(&barrier(1, 2), 3).unwrap().unwrap();
    s.mark_incomplete().unwrap();
    s.apply(&batch(1, 3)).unwrap();
    let p3 = s.create_point(Consistency::NotConsistent, 4).unwrap();
    let e = s.usable_point(p3.id, false).unwrap_err();
    assert!(
        matches!(e, TargetError::IncompletePoint { latest_complete: Some(id), .. } if id == p2.id),
        "{e:?}"
    );
    assert!(
        e.to_string().contains(&format!("use point {}", p2.id)),
        "{e}"
    );
    assert_eq!(s.usable_point(p2.id, false).unwrap().id, p2.id);
}

#[test]
fn a_state_without_the_completeness_field_reads_as_incomplete() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    drop(s);
    let path = tmp.path().join("d").join(STATE);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("complete");
    std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let mut s = DiskStore::open(tmp.path(), "d", StoreOptions::default()).unwrap();
    assert!(!s.is_complete());
    s.apply(&batch(1, 1)).unwrap();
    assert!(
        s.create_point(Consistency::NotConsistent, 2)
            .unwrap()
            .incomplete
    );
}
