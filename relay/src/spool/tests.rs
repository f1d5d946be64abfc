use super::*;

fn disk(n: u8) -> DiskId {
    DiskId::from_bytes([n; 16])
}

fn entry(d: u8, seq: u64, len: usize) -> Entry {
    Entry {
        disk: disk(d),
        generation: Generation(1),
        seq: Seq(seq),
        frame: Bytes::from(vec![seq as u8; len]),
    }
}

fn small() -> SpoolOptions {
    SpoolOptions {
        segment_bytes: 4096,
        fsync: true,
    }
}

#[test]
fn appended_records_survive_reopen_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), small()).unwrap();
    for seq in 1..=20 {
        s.append(&[entry(1, seq, 1000), entry(2, seq, 10)]).unwrap();
    }
    drop(s);
    let s = Spool::open(dir.path(), small()).unwrap();
    let p = s.pending(disk(1), Seq::ZERO, 100);
    assert_eq!(
        p.iter().map(|r| r.seq.0).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    for r in &p {
        assert_eq!(s.read(r).unwrap(), Bytes::from(vec![r.seq.0 as u8; 1000]));
    }
    assert_eq!(s.pending(disk(2), Seq(18), 100).len(), 2);
    assert_eq!(s.live_bytes(), 20 * 1010);
}

#[test]
fn a_full_file_system_after_everything_was_released_starts_a_new_segment() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    for seq in 1..=5 {
        s.append(&[entry(1, seq, 1000)]).unwrap();
    }
    // Everything is released while the file system still has room: the
    // active segment keeps its dead records (it is far from full).
    s.release(disk(1), Seq(5)).unwrap();
    let segments = |dir: &Path| {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("seg-")
            })
            .count()
    };
    assert_eq!(segments(dir.path()), 1);
    assert!(s.file_bytes() > 5000);
    // Then an append finds the file system full (as a failed write
    // leaves it): the next append must not wait for a release that never
    // comes, but start over and free the dead records' space.
    s.starved = true;
    s.append(&[entry(1, 6, 1000)]).unwrap();
    assert_eq!(segments(dir.path()), 1);
    assert!(s.file_bytes() < 2000, "{} bytes", s.file_bytes());
    drop(s);
    let s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    let seqs: Vec<u64> = s
        .pending(disk(1), Seq::ZERO, 100)
        .iter()
        .map(|r| r.seq.0)
        .collect();
    assert_eq!(seqs, vec![6]);
}

#[test]
fn released_records_are_gone_after_reopen_and_segments_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), small()).unwrap();
    for seq in 1..=20 {
        s.append(&[entry(1, seq, 1000)]).unwrap();
    }
    let before = fs::read_dir(dir.path()).unwrap().count();
    s.release(disk(1), Seq(15)).unwrap();
    let after = fs::read_dir(dir.path()).unwrap().count();
    assert!(after < before, "{before} -> {after}");
    drop(s);
    let s = Spool::open(dir.path(), small()).unwrap();
    let seqs: Vec<u64> = s
        .pending(disk(1), Seq::ZERO, 100)
        .iter()
        .map(|r| r.seq.0)
        .collect();
    assert_eq!(seqs, (16..=20).collect::<Vec<_>>());
    assert_eq!(s.durable_position(disk(1)), Some((Generation(1), Seq(20))));
}

#[test]
fn fully_released_disk_keeps_its_position_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), small()).unwrap();
    s.register_disk(disk(3), 1 << 30).unwrap();
    for seq in 1..=10 {
        s.append(&[entry(3, seq, 1000)]).unwrap();
    }
    s.release(disk(3), Seq(10)).unwrap();
    s.write_positions().unwrap();
    drop(s);
    let s = Spool::open(dir.path(), small()).unwrap();
    assert_eq!(s.pending_count(disk(3)), 0);
    assert_eq!(s.durable_position(disk(3)), Some((Generation(1), Seq(10))));
    assert_eq!(s.disk_size(disk(3)), Some(1 << 30));
}

#[test]
fn torn_tail_is_cut_and_appending_continues() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    s.append(&[entry(1, 1, 100), entry(1, 2, 100)]).unwrap();
    drop(s);
    let seg = dir.path().join("seg-0000000000000001.log");
    let len = fs::metadata(&seg).unwrap().len();
    // A crash in the middle of the second record.
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 30)
        .unwrap();
    let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(s.pending_count(disk(1)), 1);
    s.append(&[entry(1, 2, 100)]).unwrap();
    drop(s);
    let s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    let seqs: Vec<u64> = s
        .pending(disk(1), Seq::ZERO, 10)
        .iter()
        .map(|r| r.seq.0)
        .collect();
    assert_eq!(seqs, vec![1, 2]);
}

#[test]
fn flipped_byte_is_detected_as_corrupt_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    s.append(&[entry(1, 1, 100), entry(1, 2, 100)]).unwrap();
    drop(s);
    let seg = dir.path().join("seg-0000000000000001.log");
    let mut data = fs::read(&seg).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    fs::write(&seg, data).unwrap();
    let s = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(s.pending_count(disk(1)), 1);
}

#[test]
fn append_continues_one_count_across_generations_and_refuses_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), small()).unwrap();
    s.append(&[entry(1, 1, 10), entry(1, 2, 10)]).unwrap();
    let next_generation = Entry {
        generation: Generation(2),
        ..entry(1, 3, 10)
    };
    s.append(&[next_generation]).unwrap();
    let mut refused = |e: Entry| match s.append(&[e]) {
        Err(SpoolError::OutOfOrder { order, .. }) => order,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(
        refused(Entry {
            generation: Generation(2),
            ..entry(1, 5, 10)
        }),
        SeqOrder::Gap { expected: Seq(4) }
    );
    assert_eq!(
        refused(Entry {
            generation: Generation(2),
            ..entry(1, 3, 10)
        }),
        SeqOrder::Duplicate
    );
    assert_eq!(
        refused(Entry {
            generation: Generation(3),
            ..entry(1, 1, 10)
        }),
        SeqOrder::Reused { held: Seq(3) }
    );
    assert_eq!(
        refused(entry(1, 4, 10)),
        SeqOrder::StaleGeneration {
            current: Generation(2)
        }
    );
    // A refused append leaves nothing behind: the next frame still fits.
    let seqs: Vec<u64> = s
        .pending(disk(1), Seq::ZERO, 10)
        .iter()
        .map(|r| r.seq.0)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
}

#[test]
fn restore_after_reopen_forwards_from_the_first_unacked_frame() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), small()).unwrap();
    s.register_disk(disk(1), 1 << 30).unwrap();
    for seq in 1..=10 {
        s.append(&[entry(1, seq, 100)]).unwrap();
    }
    s.release(disk(1), Seq(4)).unwrap();
    s.write_positions().unwrap();
    drop(s);
    let s = Spool::open(dir.path(), small()).unwrap();
    let r = s.restore(disk(1), Generation(7));
    assert_eq!(r.disk_size, 1 << 30);
    assert_eq!((r.generation, r.spooled_through), (Generation(1), Seq(10)));
    assert_eq!(r.spool_first, Some(Seq(5)));
    // A disk the spool never saw starts at the generation its agent names.
    let r = s.restore(disk(2), Generation(7));
    assert_eq!(
        (r.generation, r.spooled_through),
        (Generation(7), Seq::ZERO)
    );
    assert_eq!(r.spool_first, None);
}

#[test]
fn a_forgotten_disk_starts_afresh_and_its_dead_frames_never_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), small()).unwrap();
    // Disk 1's frames share segments with disk 2's.
    for seq in 1..=10 {
        s.append(&[entry(1, seq, 500), entry(2, seq, 500)]).unwrap();
    }
    s.release(disk(1), Seq(4)).unwrap();
    let f = s.forget(disk(1)).unwrap();
    assert_eq!(f.frames, 6, "frames 5..=10 were waiting");
    assert_eq!(f.bytes, 6 * 500);
    assert_eq!(f.through, Some((Generation(1), Seq(10))));
    assert_eq!(s.pending_count(disk(1)), 0);
    assert_eq!(s.durable_position(disk(1)), None, "nothing is known of it");
    assert_eq!(s.disk_size(disk(1)), None);
    // The new lineage counts from 1 again, in a newer generation.
    let fresh = Entry {
        generation: Generation(3),
        ..entry(1, 1, 100)
    };
    s.append(&[fresh]).unwrap();
    drop(s);
    let s = Spool::open(dir.path(), small()).unwrap();
    let p = s.pending(disk(1), Seq::ZERO, 100);
    assert_eq!(
        p.iter().map(RecordRef::position).collect::<Vec<_>>(),
        vec![(Generation(3), Seq(1))],
        "after a reopen only the new lineage is live"
    );
    assert_eq!(
        s.pending_count(disk(2)),
        10,
        "the other disk keeps everything"
    );
}

#[test]
fn a_spool_is_opened_by_one_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open(dir.path(), small()).unwrap();
    let err = Spool::open(dir.path(), small()).unwrap_err();
    assert!(matches!(err, SpoolError::Busy { .. }), "{err}");
    assert!(err.to_string().contains("stop it first"), "{err}");
    drop(s);
    Spool::open(dir.path(), small()).expect("free once closed");
}

#[test]
fn a_position_learnt_from_the_target_is_taken_only_for_a_disk_the_spool_does_not_hold() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Spool::open(dir.path(), small()).unwrap();
    // A release before anything arrived records zero: still unknown.
    s.release(disk(1), Seq::ZERO).unwrap();
    assert!(!s.holds(disk(1)));
    s.adopt_position(disk(1), (Generation(2), Seq(236)))
        .unwrap();
    assert!(s.holds(disk(1)));
    // The stream continues after it, across a reopen.
    let next = Entry {
        generation: Generation(2),
        ..entry(1, 237, 10)
    };
    s.append(&[next]).unwrap();
    drop(s);
    let mut s = Spool::open(dir.path(), small()).unwrap();
    assert_eq!(s.durable_position(disk(1)), Some((Generation(2), Seq(237))));
    // A disk the spool holds keeps its own position.
    s.adopt_position(disk(1), (Generation(2), Seq(9))).unwrap();
    assert_eq!(s.durable_position(disk(1)), Some((Generation(2), Seq(237))));
}
