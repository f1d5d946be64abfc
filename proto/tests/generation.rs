//! Data generations: every comparison outcome, bounded histories, split-brain
//! resolution, repeated failover/failback and the whole DR cycle as a sequence
//! of records on two copies, and the durable encoding.
//!
//! One file of about 900 lines on purpose: the scenarios share the record
//! builders at the top, and the DR cycle reads as one story.

use blockferry_proto::generation::{
    Lineage, MAX_HISTORY, Resolution, Side, SplitBrainReport, Unrelated, resolve_split_brain,
};
use blockferry_proto::*;
use proptest::prelude::*;

const DISK: DiskId = DiskId([7; 16]);

/// A generation id from a counter, distinct for distinct `n`, printed as
/// `g` and four times the low byte of `n`.
fn gid(n: u64) -> GenerationId {
    let mut b = [n as u8; 16];
    b[8..].copy_from_slice(&n.to_be_bytes());
    GenerationId(b)
}

fn entry(id: u64, number: u64, seq: u64) -> GenerationEntry {
    GenerationEntry {
        id: gid(id),
        number: Generation(number),
        seq: Seq(seq),
    }
}

/// A newly protected disk at the source and its replica, both at `seq`.
fn protected(seq: u64) -> (GenerationRecord, GenerationRecord) {
    let source = GenerationRecord::new(DISK, CopyRole::Source, entry(1, 1, seq));
    let replica = GenerationRecord::new(DISK, CopyRole::Replica, entry(1, 1, seq));
    (source, replica)
}

fn at(mut r: GenerationRecord, seq: u64) -> GenerationRecord {
    r.set_seq(Seq(seq)).expect("sequence moves forward");
    r
}

fn durable(r: &GenerationRecord) -> GenerationRecord {
    let back = GenerationRecord::decode(&r.encode()).expect("an encoded record decodes");
    assert_eq!(&back, r);
    back
}

#[test]
fn a_source_and_its_replica_in_one_generation_are_in_sync_whatever_their_sequences() {
    let (a, b) = protected(0);
    let (a, b) = (at(a, 120), at(b, 90));
    assert_eq!(a.compare(&b), Comparison::InSync { current: gid(1) });
    assert_eq!(b.compare(&a), Comparison::InSync { current: gid(1) });
}

#[test]
fn a_replica_promoted_after_a_planned_failover_is_ahead_by_a_delta_from_the_final_point() {
    let (a, b) = protected(0);
    let (mut a, mut b) = (at(a, 100), at(b, 100));
    a.demote().unwrap();
    b.promote(gid(2)).unwrap();
    assert_eq!(
        b.current().number,
        Generation(2),
        "fences the old wire generation"
    );
    let common = entry(1, 1, 100);
    assert_eq!(
        b.compare(&a),
        Comparison::Ahead {
            common,
            mode: SyncMode::Delta
        }
    );
    assert_eq!(
        a.compare(&b),
        Comparison::Behind {
            common,
            mode: SyncMode::Delta
        }
    );
}

#[test]
fn an_unplanned_failover_while_the_source_still_writes_is_split_brain_from_the_chosen_point() {
    let (a, b) = protected(0);
    // The replica is promoted at point #100; the source went on to #120.
    let (a, mut b) = (at(a, 120), at(b, 100));
    b.promote(gid(2)).unwrap();
    let expected = Comparison::SplitBrain {
        common: Some(entry(1, 1, 100)),
        ours: gid(2),
        theirs: gid(1),
    };
    assert_eq!(b.compare(&a), expected);
    assert_eq!(a.compare(&b), expected.mirror());
}

#[test]
fn a_source_still_writable_is_split_brain_even_if_it_has_not_passed_the_chosen_point() {
    // Its record cannot prove that nothing was written after its last frame.
    let (a, b) = protected(100);
    let mut b = b;
    b.promote(gid(2)).unwrap();
    assert!(matches!(
        b.compare(&a),
        Comparison::SplitBrain {
            common: Some(c),
            ..
        } if c == entry(1, 1, 100)
    ));
}

#[test]
fn a_fenced_source_that_detaches_keeps_the_split_brain_at_the_chosen_point() {
    let (a, b) = protected(0);
    let (mut a, mut b) = (at(a, 120), at(b, 100));
    b.promote(gid(2)).unwrap();
    a.detach(gid(3)).unwrap();
    assert_eq!(a.current().number, Generation(2));
    assert_eq!(
        a.compare(&b),
        Comparison::SplitBrain {
            common: Some(entry(1, 1, 100)),
            ours: gid(3),
            theirs: gid(2),
        }
    );
}

#[test]
fn a_replica_behind_a_detached_source_gets_a_delta_from_what_it_holds() {
    let (a, b) = protected(0);
    let (mut a, b) = (at(a, 400), at(b, 100));
    a.detach(gid(2)).unwrap();
    let a = at(a, 450);
    assert_eq!(
        a.compare(&b),
        Comparison::Ahead {
            common: entry(1, 1, 100),
            mode: SyncMode::Delta
        }
    );
}

#[test]
fn a_replica_holding_frames_past_the_point_its_peer_left_the_generation_is_split_brain() {
    let (a, b) = protected(0);
    let (mut a, b) = (at(a, 100), at(b, 130));
    a.detach(gid(2)).unwrap();
    assert_eq!(
        a.compare(&b),
        Comparison::SplitBrain {
            common: Some(entry(1, 1, 100)),
            ours: gid(2),
            theirs: gid(1),
        }
    );
}

#[test]
fn two_sources_in_one_generation_are_split_brain_from_an_unknown_point() {
    let (a, _) = protected(10);
    let twin = at(a.clone(), 12);
    assert_eq!(
        a.compare(&twin),
        Comparison::SplitBrain {
            common: None,
            ours: gid(1),
            theirs: gid(1),
        }
    );
}

#[test]
fn both_promoted_from_a_shared_older_generation_is_split_brain_at_the_fork() {
    let (a, b) = protected(0);
    let (mut a, mut b) = (at(a, 50), at(b, 50));
    a.detach(gid(2)).unwrap();
    let mut a = at(a, 70);
    a.detach(gid(3)).unwrap();
    b.promote(gid(4)).unwrap();
    let b = at(b, 60);
    assert_eq!(
        a.compare(&b),
        Comparison::SplitBrain {
            common: Some(entry(1, 1, 50)),
            ours: gid(3),
            theirs: gid(4),
        }
    );
}

#[test]
fn records_of_different_disks_are_unrelated() {
    let (a, _) = protected(0);
    let other = GenerationRecord::new(DiskId([8; 16]), CopyRole::Replica, entry(1, 1, 0));
    assert_eq!(
        a.compare(&other),
        Comparison::Unrelated(Unrelated::DifferentDisk {
            ours: DISK,
            theirs: DiskId([8; 16]),
        })
    );
    assert_eq!(other.compare(&a), a.compare(&other).mirror());
}

#[test]
fn copies_without_a_common_generation_are_unrelated() {
    let a = GenerationRecord::new(DISK, CopyRole::Source, entry(1, 1, 0));
    let b = GenerationRecord::new(DISK, CopyRole::Replica, entry(2, 1, 0));
    assert_eq!(
        a.compare(&b),
        Comparison::Unrelated(Unrelated::NoCommonGeneration)
    );
}

#[test]
fn a_common_point_inside_the_bounded_history_is_found_and_one_older_is_forgotten() {
    let (mut a, b) = protected(5);
    for i in 0..MAX_HISTORY as u64 {
        a.detach(gid(100 + i)).unwrap();
    }
    assert_eq!(a.history().len(), MAX_HISTORY);
    assert!(matches!(
        a.compare(&b),
        Comparison::Ahead { common, mode: SyncMode::Delta } if common == entry(1, 1, 5)
    ));
    a.detach(gid(999)).unwrap();
    assert_eq!(a.history().len(), MAX_HISTORY, "history stays bounded");
    assert_eq!(
        a.compare(&b),
        Comparison::Unrelated(Unrelated::NoCommonGeneration)
    );
}

#[test]
fn a_fork_truncated_out_of_one_history_is_unrelated() {
    let (a, b) = protected(0);
    let (mut a, mut b) = (a, b);
    a.detach(gid(2)).unwrap();
    b.promote(gid(3)).unwrap();
    assert!(matches!(a.compare(&b), Comparison::SplitBrain { .. }));
    for i in 0..MAX_HISTORY as u64 {
        a.detach(gid(100 + i)).unwrap();
    }
    assert_eq!(
        a.compare(&b),
        Comparison::Unrelated(Unrelated::NoCommonGeneration)
    );
}

#[test]
fn a_seed_is_synced_by_checksum_compare_even_in_the_same_generation() {
    let (a, b) = protected(0);
    let (a, seed) = (at(a, 40), at(b, 40).into_seed());
    let common = entry(1, 1, 40);
    let ahead = Comparison::Ahead {
        common,
        mode: SyncMode::ChecksumCompare,
    };
    assert_eq!(a.compare(&seed), ahead);
    assert_eq!(seed.compare(&a), ahead.mirror());

    let mut promoted = a.clone();
    promoted.demote().unwrap();
    promoted.promote(gid(2)).unwrap();
    assert_eq!(promoted.compare(&seed), ahead);
}

#[test]
fn discarding_the_old_sources_changes_makes_it_a_seed_at_the_chosen_point() {
    let (a, b) = protected(0);
    let (mut a, mut b) = (at(a, 120), at(b, 100));
    b.promote(gid(2)).unwrap();
    a.detach(gid(3)).unwrap();
    let b = at(b, 150);
    let Resolution { source, discarded } = resolve_split_brain(&a, &b, Side::Ours).unwrap();
    assert_eq!(source, Side::Theirs);
    assert_eq!(discarded.role(), CopyRole::Seed);
    assert_eq!(discarded.current(), entry(1, 1, 100));
    assert_eq!(
        b.compare(&discarded),
        Comparison::Ahead {
            common: entry(1, 1, 100),
            mode: SyncMode::ChecksumCompare
        }
    );
    // Naming the same copy from the other side gives the same record.
    let other = resolve_split_brain(&b, &a, Side::Theirs).unwrap();
    assert_eq!(other.source, Side::Ours);
    assert_eq!(other.discarded, discarded);
}

#[test]
fn discarding_the_promoted_copys_changes_rolls_it_back_onto_the_old_sources_lineage() {
    let (a, b) = protected(0);
    let (mut a, mut b) = (at(a, 120), at(b, 100));
    b.promote(gid(2)).unwrap();
    a.detach(gid(3)).unwrap();
    let r = resolve_split_brain(&a, &b, Side::Theirs).unwrap();
    assert_eq!(r.source, Side::Ours);
    assert_eq!(
        a.compare(&r.discarded),
        Comparison::Ahead {
            common: entry(1, 1, 100),
            mode: SyncMode::ChecksumCompare
        }
    );
}

#[test]
fn resolving_two_sources_of_one_generation_compares_from_the_generations_start() {
    let (mut a, _) = protected(10);
    a.detach(gid(2)).unwrap();
    let a = at(a, 30);
    let twin = at(a.clone(), 40);
    let r = resolve_split_brain(&a, &twin, Side::Theirs).unwrap();
    assert_eq!(r.discarded.current(), entry(2, 2, 10));
    assert_eq!(
        a.compare(&r.discarded),
        Comparison::Ahead {
            common: entry(2, 2, 10),
            mode: SyncMode::ChecksumCompare
        }
    );
}

#[test]
fn resolving_without_a_split_brain_is_refused() {
    let (a, b) = protected(3);
    assert_eq!(
        resolve_split_brain(&a, &b, Side::Theirs),
        Err(GenerationError::NotSplitBrain(Comparison::InSync {
            current: gid(1)
        }))
    );
    let other = GenerationRecord::new(DISK, CopyRole::Replica, entry(9, 1, 0));
    assert!(matches!(
        resolve_split_brain(&a, &other, Side::Theirs),
        Err(GenerationError::NotSplitBrain(Comparison::Unrelated(_)))
    ));
}

#[test]
fn operations_that_would_break_the_record_are_refused() {
    let (mut a, mut b) = protected(10);
    assert_eq!(a.promote(gid(2)), Err(GenerationError::AlreadySource));
    assert!(matches!(
        b.detach(gid(2)),
        Err(GenerationError::NotSource { .. })
    ));
    assert!(matches!(b.demote(), Err(GenerationError::NotSource { .. })));
    assert_eq!(
        a.detach(gid(1)),
        Err(GenerationError::DuplicateId { id: gid(1) })
    );
    assert_eq!(
        a.set_seq(Seq(9)),
        Err(GenerationError::SeqBehind {
            held: Seq(10),
            got: Seq(9)
        })
    );
    assert_eq!(b.follow(&a, Seq(10)), Ok(()));
    assert_eq!(a.follow(&b, Seq(10)), Err(GenerationError::AlreadySource));
    let stranger = GenerationRecord::new(DiskId([1; 16]), CopyRole::Source, entry(5, 1, 0));
    assert!(matches!(
        b.follow(&stranger, Seq(10)),
        Err(GenerationError::WrongDisk { .. })
    ));
    a.detach(gid(2)).unwrap();
    // The new generation starts at #10: a replica cannot hold it through #5.
    assert!(matches!(
        b.follow(&a, Seq(5)),
        Err(GenerationError::SeqOrder { .. })
    ));
    let full = GenerationRecord::new(DISK, CopyRole::Replica, entry(1, u64::MAX, 0));
    let mut full = full;
    assert_eq!(
        full.promote(gid(2)),
        Err(GenerationError::NumberExhausted(Generation(u64::MAX)))
    );
}

#[test]
fn the_split_brain_message_shows_both_lineages_and_what_to_do() {
    let (a, b) = protected(0);
    let (mut a, mut b) = (at(a, 120), at(b, 100));
    b.promote(gid(2)).unwrap();
    a.detach(gid(3)).unwrap();
    let report = SplitBrainReport {
        ours_name: "site-a",
        ours: &a,
        theirs_name: "site-b",
        theirs: &b,
    };
    assert_eq!(
        report.to_string(),
        "disk 07070707-0707-0707-0707-070707070707 is in split brain: both copies changed \
         since g01010101 at #100; site-a: g03030303 at #120 <- g01010101 to #120; \
         site-b: g02020202 at #100 <- g01010101 to #100; nothing was synced: discard the changes \
         of one with --discard-changes-of site-a or --discard-changes-of site-b"
    );
}

#[test]
fn generation_ids_print_short_and_in_full() {
    let id = GenerationId([0x3f, 0x2a, 0x9c, 0x1d, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    assert_eq!(id.to_string(), "g3f2a9c1d");
    assert_eq!(format!("{id:#}"), "g3f2a9c1d000102030405060708090a0b");
    let mut r = GenerationRecord::new(
        DISK,
        CopyRole::Replica,
        GenerationEntry {
            id,
            number: Generation(1),
            seq: Seq(4),
        },
    );
    r.promote(GenerationId([0xee; 16])).unwrap();
    assert_eq!(
        Lineage::to_string(&r.lineage()),
        "geeeeeeee at #4 <- g3f2a9c1d to #4"
    );
}

/// Runs the cycle of DESIGN.md "The DR cycle" on two copies, A (the original
/// site) and B (the recovery site), with every record stored and reloaded at
/// every stage.
#[test]
fn the_whole_dr_cycle_as_records_on_two_copies() {
    // Protect: initial sync and continuous delta, A → B.
    let (a, b) = protected(0);
    let (a, b) = (durable(&at(a, 100)), durable(&at(b, 100)));
    assert!(matches!(a.compare(&b), Comparison::InSync { .. }));

    // Unplanned failover to point #90 while A still writes (to #120).
    let mut a = at(a, 120);
    let mut b = b;
    b.promote_at(Seq(90), gid(2)).unwrap();
    assert_eq!(b.history(), &[entry(1, 1, 90)]);
    let mut b = durable(&b);
    assert!(
        b.current().number > a.current().number,
        "A's frames are stale at B"
    );

    // A is fenced and detaches: its writes go on in a generation of its own.
    a.detach(gid(3)).unwrap();
    let a = durable(&at(a, 130));

    // The workload runs on B.
    b.set_seq(Seq(200)).unwrap();

    // A returns: reprotect refuses with both histories.
    let sb = b.compare(&a);
    assert!(matches!(
        sb,
        Comparison::SplitBrain { common: Some(c), .. } if c == entry(1, 1, 90)
    ));
    let msg = SplitBrainReport {
        ours_name: "site-b",
        ours: &b,
        theirs_name: "site-a",
        theirs: &a,
    }
    .to_string();
    assert!(msg.contains(&b.lineage().to_string()) && msg.contains(&a.lineage().to_string()));
    assert!(msg.contains("--discard-changes-of site-a"));

    // The user discards A's changes: A is a seed, synced by checksum compare.
    let r = resolve_split_brain(&b, &a, Side::Theirs).unwrap();
    assert_eq!(r.source, Side::Ours);
    let mut a = durable(&r.discarded);
    assert!(matches!(
        b.compare(&a),
        Comparison::Ahead {
            mode: SyncMode::ChecksumCompare,
            ..
        }
    ));

    // Reprotect B → A completes; A follows B and replication goes on.
    a.follow(&b, Seq(200)).unwrap();
    let a = durable(&at(a, 260));
    let b = at(b, 260);
    assert_eq!(b.compare(&a), Comparison::InSync { current: gid(2) });

    // Planned failback: B stops, final sync, demoted; A promoted.
    let (mut a, mut b) = (a, b);
    b.demote().unwrap();
    a.promote(gid(4)).unwrap();
    let (a, b) = (durable(&a), durable(&b));
    assert!(
        a.current().number > b.current().number,
        "B's frames are stale at A"
    );
    assert_eq!(
        a.compare(&b),
        Comparison::Ahead {
            common: GenerationEntry {
                id: gid(2),
                number: Generation(2),
                seq: Seq(260)
            },
            mode: SyncMode::Delta
        }
    );

    // Re-enable A → B, delta only; B follows and the cycle is closed.
    let a = at(a, 300);
    let mut b = b;
    b.follow(&a, Seq(300)).unwrap();
    assert_eq!(a.compare(&b), Comparison::InSync { current: gid(4) });
    assert_eq!(a.role(), CopyRole::Source);
    assert_eq!(b.role(), CopyRole::Replica);
}

#[test]
fn repeated_failover_and_failback_cycles_stay_deltas_and_never_unrelated() {
    let (mut src, mut dst) = protected(0);
    let mut seq = 0;
    for cycle in 0..(4 * MAX_HISTORY as u64) {
        seq += 10;
        src.set_seq(Seq(seq)).unwrap();
        dst.set_seq(Seq(seq)).unwrap();
        assert!(matches!(src.compare(&dst), Comparison::InSync { .. }));
        // Planned failover: demote, promote, the old source follows.
        src.demote().unwrap();
        dst.promote(gid(1000 + cycle)).unwrap();
        assert!(matches!(
            dst.compare(&src),
            Comparison::Ahead { common, mode: SyncMode::Delta } if common.seq == Seq(seq)
        ));
        src.follow(&dst, Seq(seq)).unwrap();
        std::mem::swap(&mut src, &mut dst);
    }
    assert_eq!(src.history().len(), MAX_HISTORY);
}

#[test]
fn repeated_unplanned_failovers_each_need_a_named_victim_and_then_compare_checksums() {
    let (mut src, mut dst) = protected(0);
    let mut seq = 0;
    for cycle in 0..(2 * MAX_HISTORY as u64) {
        seq += 10;
        dst.set_seq(Seq(seq)).unwrap();
        src.set_seq(Seq(seq + 5)).unwrap();
        dst.promote(gid(2000 + 2 * cycle)).unwrap();
        src.detach(gid(2001 + 2 * cycle)).unwrap();
        assert!(matches!(dst.compare(&src), Comparison::SplitBrain { .. }));
        let r = resolve_split_brain(&dst, &src, Side::Theirs).unwrap();
        assert!(matches!(
            dst.compare(&r.discarded),
            Comparison::Ahead {
                mode: SyncMode::ChecksumCompare,
                ..
            }
        ));
        src = r.discarded;
        src.follow(&dst, Seq(seq)).unwrap();
        std::mem::swap(&mut src, &mut dst);
    }
}

#[test]
fn decoding_refuses_every_damaged_record_with_a_typed_error() {
    let (mut a, _) = protected(7);
    a.detach(gid(2)).unwrap();
    let bytes = a.encode();
    assert_eq!(bytes.len(), a.encoded_len());
    for cut in 0..bytes.len() {
        assert!(
            matches!(
                GenerationRecord::decode(&bytes[..cut]),
                Err(DecodeGenerationError::Truncated { .. })
            ),
            "prefix of {cut} bytes"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        GenerationRecord::decode(&longer),
        Err(DecodeGenerationError::TrailingBytes { .. })
    ));
    for i in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[i] ^= 0x10;
        assert!(GenerationRecord::decode(&bad).is_err(), "flip at byte {i}");
    }
    let mut magic = bytes.clone();
    magic[0] = b'X';
    assert_eq!(
        GenerationRecord::decode(&magic),
        Err(DecodeGenerationError::BadMagic)
    );
    let mut version = bytes.clone();
    version[4] = 2;
    assert_eq!(
        GenerationRecord::decode(&version),
        Err(DecodeGenerationError::UnsupportedVersion(2))
    );
}

/// Re-seals `bytes` with a valid checksum, to reach the checks behind it.
fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len() - 8;
    let sum = blake3::hash(&bytes[..n]);
    bytes[n..].copy_from_slice(&sum.as_bytes()[..8]);
    bytes
}

#[test]
fn decoding_refuses_well_sealed_records_that_break_the_invariants() {
    let (mut a, _) = protected(7);
    a.detach(gid(2)).unwrap();
    let bytes = a.encode();
    let mut role = bytes.clone();
    role[5] = 9;
    assert_eq!(
        GenerationRecord::decode(&reseal(role)),
        Err(DecodeGenerationError::UnknownRole(9))
    );
    let mut reserved = bytes.clone();
    reserved[7] = 1;
    assert_eq!(
        GenerationRecord::decode(&reseal(reserved)),
        Err(DecodeGenerationError::Reserved(1))
    );
    // The history entry takes the current generation's id.
    let mut dup = bytes.clone();
    let (cur, hist) = (24, 24 + 32);
    let id: Vec<u8> = dup[cur..cur + 16].to_vec();
    dup[hist..hist + 16].copy_from_slice(&id);
    assert!(matches!(
        GenerationRecord::decode(&reseal(dup)),
        Err(DecodeGenerationError::Invalid(
            GenerationError::DuplicateId { .. }
        ))
    ));
    // The history entry's number is not below the current one.
    let mut number = bytes.clone();
    number[hist + 16..hist + 24].copy_from_slice(&9u64.to_be_bytes());
    assert!(matches!(
        GenerationRecord::decode(&reseal(number)),
        Err(DecodeGenerationError::Invalid(
            GenerationError::NumberOrder { .. }
        ))
    ));
    // The history entry holds more than the current one.
    let mut seq = bytes.clone();
    seq[hist + 24..hist + 32].copy_from_slice(&99u64.to_be_bytes());
    assert!(matches!(
        GenerationRecord::decode(&reseal(seq)),
        Err(DecodeGenerationError::Invalid(
            GenerationError::SeqOrder { .. }
        ))
    ));
    let mut long = bytes;
    long[6] = (MAX_HISTORY + 1) as u8;
    assert!(matches!(
        GenerationRecord::decode(&long),
        Err(DecodeGenerationError::Invalid(
            GenerationError::HistoryTooLong { .. }
        ))
    ));
}

/// One operation on a record.
#[derive(Clone, Debug)]
enum Op {
    Write(u8),
    Promote(u64),
    Detach(u64),
    Demote,
    Seed,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<u8>().prop_map(Op::Write),
        any::<u64>().prop_map(Op::Promote),
        any::<u64>().prop_map(Op::Detach),
        Just(Op::Demote),
        Just(Op::Seed),
    ]
}

/// Applies `o` to `r`; `Err` when the record refuses it.
fn apply_one(r: &mut GenerationRecord, o: &Op) -> Result<(), GenerationError> {
    match o {
        Op::Write(n) => r.set_seq(Seq(r.current().seq.0 + u64::from(*n))),
        Op::Promote(id) => r.promote(gid(*id)),
        Op::Detach(id) => r.detach(gid(*id)),
        Op::Demote => r.demote(),
        Op::Seed => {
            *r = r.clone().into_seed();
            Ok(())
        }
    }
}

/// Applies `ops`, skipping the ones the record refuses.
fn apply(r: &mut GenerationRecord, ops: &[Op]) {
    for o in ops {
        let _refused = apply_one(r, o);
    }
}

fn role() -> impl Strategy<Value = CopyRole> {
    prop_oneof![
        Just(CopyRole::Source),
        Just(CopyRole::Replica),
        Just(CopyRole::Seed)
    ]
}

fn record() -> impl Strategy<Value = GenerationRecord> {
    (
        any::<[u8; 16]>(),
        role(),
        any::<u64>(),
        0u64..1000,
        proptest::collection::vec(op(), 0..40),
    )
        .prop_map(|(disk, role, first, seq, ops)| {
            let mut r = GenerationRecord::new(DiskId(disk), role, entry(first, 1, seq));
            apply(&mut r, &ops);
            r
        })
}

/// Two records of one disk grown from one base by independent operations,
/// with ids from a small space so that the sides sometimes share them.
fn related_pair() -> impl Strategy<Value = (GenerationRecord, GenerationRecord)> {
    let small_op = || {
        prop_oneof![
            (0u8..20).prop_map(Op::Write),
            (0u64..6).prop_map(Op::Promote),
            (0u64..6).prop_map(Op::Detach),
            Just(Op::Demote),
            Just(Op::Seed),
        ]
    };
    (
        role(),
        0u64..6,
        proptest::collection::vec(small_op(), 0..12),
        proptest::collection::vec(small_op(), 0..12),
        proptest::collection::vec(small_op(), 0..12),
    )
        .prop_map(|(role, first, base_ops, a_ops, b_ops)| {
            let mut base = GenerationRecord::new(DISK, role, entry(first, 1, 0));
            apply(&mut base, &base_ops);
            let (mut a, mut b) = (base.clone(), base);
            apply(&mut a, &a_ops);
            apply(&mut b, &b_ops);
            (a, b)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_record_round_trips_through_its_encoding(r in record()) {
        let bytes = r.encode();
        prop_assert_eq!(bytes.len(), r.encoded_len());
        prop_assert_eq!(GenerationRecord::decode(&bytes), Ok(r));
    }

    #[test]
    fn a_refused_operation_leaves_the_record_unchanged(r in record(), o in op(), at in any::<u16>()) {
        let mut after = r.clone();
        if apply_one(&mut after, &o).is_err() {
            prop_assert_eq!(&after, &r);
        }
        let mut rolled = r.clone();
        if rolled.promote_at(Seq(u64::from(at)), GenerationId([0xcc; 16])).is_err() {
            prop_assert_eq!(&rolled, &r);
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..700)) {
        let _ = GenerationRecord::decode(&data);
    }

    #[test]
    fn a_mutated_record_is_refused_or_encodes_back_to_the_same_bytes(
        r in record(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = r.encode();
        for (i, v) in flips {
            let i = i.index(bytes.len());
            bytes[i] = v;
        }
        if let Ok(back) = GenerationRecord::decode(&bytes) {
            prop_assert_eq!(back.encode(), bytes);
        }
    }

    #[test]
    fn comparing_from_the_other_side_mirrors_the_outcome((a, b) in related_pair(), c in record()) {
        prop_assert_eq!(b.compare(&a), a.compare(&b).mirror());
        prop_assert_eq!(c.compare(&a), a.compare(&c).mirror());
    }

    /// Two copies of one point, changed independently: whoever started a new
    /// generation is ahead, both → split brain at the fork, neither → in sync.
    #[test]
    fn copies_forked_from_one_point_compare_by_who_started_a_generation(
        first in any::<u64>(),
        seq in 0u64..1000,
        a_steps in proptest::collection::vec((any::<u64>(), any::<u8>()), 0..8),
        b_steps in proptest::collection::vec((any::<u64>(), any::<u8>()), 0..8),
    ) {
        // Each side draws its ids from its own range, as random ids never meet.
        let first = first & !(3 << 62);
        let fork = entry(first, 1, seq);
        let mut a = GenerationRecord::new(DISK, CopyRole::Replica, fork);
        let mut b = a.clone();
        for (r, steps, side) in [(&mut a, &a_steps, 1u64 << 63), (&mut b, &b_steps, 1 << 62)] {
            for &(id, write) in steps {
                let id = gid(id & !(3 << 62) | side);
                if r.role() == CopyRole::Source {
                    r.detach(id).unwrap();
                } else {
                    r.promote(id).unwrap();
                }
                r.set_seq(Seq(r.current().seq.0 + u64::from(write))).unwrap();
            }
        }
        let got = a.compare(&b);
        let forgotten = a_steps.len() > MAX_HISTORY || b_steps.len() > MAX_HISTORY;
        match (a_steps.len(), b_steps.len()) {
            _ if forgotten => {}
            (0, 0) => prop_assert_eq!(got, Comparison::InSync { current: gid(first) }),
            (_, 0) => prop_assert_eq!(got, Comparison::Ahead { common: fork, mode: SyncMode::Delta }),
            (0, _) => prop_assert_eq!(got, Comparison::Behind { common: fork, mode: SyncMode::Delta }),
            _ => {
                let is_split_at_fork = matches!(got, Comparison::SplitBrain { common: Some(c), .. } if c == fork);
                prop_assert!(is_split_at_fork, "{:?}", got);
            }
        }
    }

    #[test]
    fn after_resolving_a_split_brain_the_survivor_is_ahead_by_checksum_compare(
        (a, b) in related_pair(), discard_ours in any::<bool>(),
    ) {
        let discard = if discard_ours { Side::Ours } else { Side::Theirs };
        if let Ok(r) = resolve_split_brain(&a, &b, discard) {
            let survivor = if discard_ours { &b } else { &a };
            prop_assert_eq!(r.discarded.role(), CopyRole::Seed);
            let ahead = matches!(
                survivor.compare(&r.discarded),
                Comparison::Ahead { mode: SyncMode::ChecksumCompare, .. }
            );
            prop_assert!(ahead);
        }
    }
}

#[test]
fn failing_over_to_an_older_point_goes_back_to_the_generation_that_held_it() {
    // The replica followed its source through g1 (to #50) and g2 (to #80).
    let (mut a, mut b) = protected(50);
    a.detach(gid(2)).unwrap();
    let a = at(a, 80);
    b.follow(&a, Seq(80)).unwrap();
    assert_eq!(
        b.clone().promote_at(Seq(81), gid(3)),
        Err(GenerationError::PointAhead {
            held: Seq(80),
            point: Seq(81)
        })
    );
    let mut older = b.clone();
    older.promote_at(Seq(40), gid(3)).unwrap();
    assert_eq!(older.history(), &[entry(1, 1, 40)]);
    assert_eq!(older.current(), entry(3, 2, 40));
    // The source went on past #40 in g1 and g2: both changed since.
    assert!(matches!(
        older.compare(&a),
        Comparison::SplitBrain { common: Some(c), .. } if c == entry(1, 1, 40)
    ));
    let mut latest = b;
    latest.promote_at(Seq(60), gid(4)).unwrap();
    assert_eq!(latest.history(), &[entry(2, 2, 60), entry(1, 1, 50)]);
    assert_eq!(latest.current(), entry(4, 3, 60));
}

#[test]
fn a_seed_never_keeps_its_changes_over_another_copy() {
    // The seed holds g2 past the point where the source left it.
    let (mut a, b) = protected(0);
    a.detach(gid(2)).unwrap();
    let mut seed = b;
    seed.follow(&a, Seq(0)).unwrap();
    let seed = at(seed, 1).into_seed();
    a.detach(gid(3)).unwrap();
    assert!(matches!(a.compare(&seed), Comparison::SplitBrain { .. }));
    assert_eq!(
        resolve_split_brain(&a, &seed, Side::Ours),
        Err(GenerationError::SeedSurvivor)
    );
    let r = resolve_split_brain(&a, &seed, Side::Theirs).unwrap();
    assert!(matches!(
        a.compare(&r.discarded),
        Comparison::Ahead {
            mode: SyncMode::ChecksumCompare,
            ..
        }
    ));
}

#[test]
fn a_source_and_a_replica_made_by_the_stream_start_in_the_same_root_generation() {
    let root = GenerationId::root(DISK);
    assert_eq!(root, GenerationId::root(DISK), "the same at every copy");
    assert_ne!(root, GenerationId::root(DiskId([8; 16])), "one per disk");
    let first = |role| {
        GenerationRecord::new(
            DISK,
            role,
            GenerationEntry {
                id: root,
                number: Generation(1),
                seq: Seq::ZERO,
            },
        )
    };
    let source = at(first(CopyRole::Source), 40);
    let replica = at(first(CopyRole::Replica), 30);
    assert!(matches!(
        source.compare(&replica),
        Comparison::InSync { .. }
    ));
}

#[test]
fn a_restarted_stream_keeps_its_generation_under_a_newer_number() {
    let (mut source, mut replica) = protected(10);
    source.renumber(Generation(3)).unwrap();
    replica.renumber(Generation(3)).unwrap();
    assert_eq!(source.current().id, gid(1), "the id stays");
    assert_eq!(source.current().number, Generation(3));
    assert!(matches!(
        source.compare(&replica),
        Comparison::InSync { .. }
    ));
    assert_eq!(
        source.renumber(Generation(2)),
        Err(GenerationError::NumberOrder {
            id: gid(1),
            number: Generation(2),
            newer: Generation(3),
        }),
        "a number never goes back"
    );
    // A promotion after a renumbered stream continues above its number.
    replica.promote(gid(2)).unwrap();
    assert_eq!(replica.current().number, Generation(4));
}
