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
