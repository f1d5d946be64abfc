//! The replica's durable [`GenerationRecord`] (`generation.rec`, beside
//! `state.json`) and promotion.
//!
//! The record is the replica's identity in the DR cycle: its disk id, role
//! and lineage. The store already tracks the wire generation of the last
//! applied frame (`state.json`); the record is kept in step with it: whenever
//! the store is opened or promoted, a record whose wire number lags the
//! state's follows it, and a store without a record (written before records
//! existed) gets one on open (a migration, not an error).
//!
//! No generation id travels with the stream: a new replica starts in the
//! disk's root generation ([`GenerationId::root`]), the one its source's
//! first record starts in too, and a newer wire generation of the same stream
//! (a resync, a resize) keeps the id and only renumbers it
//! ([`GenerationRecord::renumber`]). Only forks (a promotion here, a detach at
//! the source) draw random ids. Records written before root generations
//! existed named each wire generation by [`adopted_id`]; one that never forked
//! is moved into the root generation when the store opens ([`legacy`]).
//!
//! **Promotion** ([`DiskStore::promote`]) makes the replica the writable
//! source in a new generation whose wire number is one more than the one it
//! held. The record is written first (the commit point of the promotion),
//! then the state's generation. From then on the store refuses every frame
//! ([`DiskStore::check_not_promoted`]): frames of the older generation are
//! refused by the sequence check anyway, and a frame that reaches the new
//! number (a fenced source that detached on its own) must not write a copy
//! that is now a source.

use std::path::Path;

use blockferry_proto::{
    CopyRole, DiskId, Generation, GenerationEntry, GenerationId, GenerationRecord, Seq,
};
use tracing::info;

use super::{DiskState, DiskStore};
use crate::crashsafe::FaultPlan;
use crate::error::{Result, TargetError};

/// File name of the record in the disk's directory.
pub const RECORD: &str = "generation.rec";

/// The disk id of a store's disk name: the name itself where it is one (the
/// serve path names stores by the wire id), else derived from the name.
pub fn disk_id_of(name: &str) -> DiskId {
    name.parse().unwrap_or_else(|_| {
        let h = blake3::hash(name.as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&h.as_bytes()[..16]);
        DiskId::from_bytes(b)
    })
}

/// The id that replicas written before root generations existed gave a
/// generation they knew only by its wire number (see [`legacy`]).
pub fn adopted_id(disk: DiskId, number: Generation) -> GenerationId {
    let mut h = blake3::Hasher::new();
    h.update(b"blockferry adopted generation");
    h.update(disk.as_bytes());
    h.update(&number.0.to_be_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.finalize().as_bytes()[..16]);
    GenerationId::from_bytes(b)
}

/// A fresh random generation id.
pub fn random_id() -> GenerationId {
    GenerationId::from_bytes(rand::random())
}

/// The record of a new store, or of a store whose directory has none: a
/// replica in the disk's root generation, at the wire generation and
/// sequence the state holds.
pub(super) fn migrated(state: &DiskState) -> GenerationRecord {
    let disk = disk_id_of(&state.disk);
    GenerationRecord::new(
        disk,
        CopyRole::Replica,
        GenerationEntry {
            id: GenerationId::root(disk),
            number: Generation(state.generation),
            seq: Seq(state.applied_seq),
        },
    )
}

/// A record written before root generations existed that never forked: a
/// replica whose every generation carries the [`adopted_id`] of its number.
/// Those were one data generation restarted under newer wire numbers, so the
/// record becomes the root generation at its current number and sequence,
/// and then compares as related with its source's record. `None` for any
/// other record (kept as it is).
pub fn legacy(record: &GenerationRecord) -> Option<GenerationRecord> {
    let disk = record.disk();
    let adopted = |e: &GenerationEntry| e.id == adopted_id(disk, e.number);
    let cur = record.current();
    let only_adopted =
        record.role() == CopyRole::Replica && adopted(&cur) && record.history().iter().all(adopted);
    only_adopted.then(|| {
        GenerationRecord::new(
            disk,
            CopyRole::Replica,
            GenerationEntry {
                id: GenerationId::root(disk),
                ..cur
            },
        )
    })
}

/// Brings `record` in step with the state: the sequence it holds, and the
/// wire generation of the last applied frame if that moved on. Returns
/// whether the record changed in a way that must be written (a new wire
/// number; the sequence alone is restored from the state on open).
pub(super) fn in_step(record: &mut GenerationRecord, state: &DiskState) -> Result<bool> {
    if record.role() == CopyRole::Source {
        // A promoted record holds the point it was promoted at and takes no
        // frames: the replica's data and wire number may go further (a
        // failover to an older point), and do not move it.
        return Ok(false);
    }
    let cur = record.current();
    let mut renumbered = false;
    if state.generation > cur.number.0 {
        // The stream restarted under a newer wire number (a resync, a
        // resize): the same data generation, so the id stays.
        record
            .renumber(Generation(state.generation))
            .map_err(|e| generation_error(&state.disk, e))?;
        renumbered = true;
    }
    // A promoted record holds the point it was promoted at (which may lie
    // before the last applied batch): the store takes no frames after it.
    if record.role() != CopyRole::Source && state.applied_seq > cur.seq.0 {
        record
            .set_seq(Seq(state.applied_seq))
            .map_err(|e| generation_error(&state.disk, e))?;
    }
    if record.role() == CopyRole::Seed && state.complete {
        // A barrier arrived since the seed was taken: its checksum resync
        // ended, so it holds the source's data exactly, like any replica.
        *record = GenerationRecord::from_parts(
            record.disk(),
            CopyRole::Replica,
            record.current(),
            record.history().to_vec(),
        )
        .map_err(|e| generation_error(&state.disk, e))?;
        return Ok(true);
    }
    Ok(renumbered)
}

fn generation_error(disk: &str, source: blockferry_proto::GenerationError) -> TargetError {
    TargetError::Generation {
        disk: disk.to_string(),
        source,
    }
}

/// Reads the record of the store in `dir`; `None` when there is none.
pub(super) fn read(dir: &Path) -> Result<Option<GenerationRecord>> {
    let path = dir.join(RECORD);
    match std::fs::read(&path) {
        Ok(bytes) => GenerationRecord::decode(&bytes)
            .map(Some)
            .map_err(|e| TargetError::corrupt(&path, None, e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TargetError::io(&path, None, e)),
    }
}

/// Replaces the record durably (temp file, fsync, rename, fsync the directory).
pub(super) fn write(f: &FaultPlan, dir: &Path, record: &GenerationRecord) -> Result<()> {
    f.write_atomic(dir, RECORD, &record.encode())
}

/// The record of a store being opened: read, or migrated, and brought in
/// step with the state. A promotion whose state write did not happen
/// (a crash between the two writes) is completed here: the state takes the
/// record's wire generation. Returns the record and the state to write, if
/// the state must change.
pub(super) fn open_record(
    f: &FaultPlan,
    dir: &Path,
    state: &DiskState,
) -> Result<(GenerationRecord, Option<DiskState>)> {
    let (mut record, mut dirty) = match read(dir)? {
        Some(r) => match legacy(&r) {
            Some(root) => {
                info!(disk = %state.disk, "generation record of an earlier version: moving it into the disk's root generation");
                (root, true)
            }
            None => (r, false),
        },
        None => {
            info!(disk = %state.disk, "no generation record: adopting the replica's generation {}", state.generation);
            (migrated(state), true)
        }
    };
    if record.disk() != disk_id_of(&state.disk) {
        return Err(TargetError::corrupt(
            dir.join(RECORD),
            None,
            format!(
                "the record names disk {} but the store holds {}: move the record away to adopt the store's generation",
                record.disk(),
                state.disk
            ),
        ));
    }
    let mut new_state = None;
    // A promotion at a point of an older generation may lower the number.
    let promoted = record.role() == CopyRole::Source;
    if record.current().number.0 > state.generation
        || (promoted && record.current().number.0 != state.generation)
    {
        let mut st = state.clone();
        st.generation = record.current().number.0;
        new_state = Some(st);
    }
    dirty |= in_step(&mut record, new_state.as_ref().unwrap_or(state))?;
    if dirty {
        write(f, dir, &record)?;
    }
    Ok((record, new_state))
}

impl DiskStore {
    /// After a barrier: a seed whose resync it ended becomes a replica
    /// (durably; a crash before this write is completed on open).
    pub(super) fn settle_record(&mut self) -> Result<()> {
        let mut record = self.record.clone();
        if in_step(&mut record, &self.state)? {
            write(&self.opts.faults, &self.dir, &record)?;
            info!(disk = %self.state.disk, lineage = %record.lineage(), "the seed's resync ended: it is a replica now");
        }
        self.record = record;
        Ok(())
    }

    /// The replica's generation record, holding the applied sequence.
    pub fn generation_record(&self) -> &GenerationRecord {
        &self.record
    }

    /// The replica was promoted: it is a source and takes no frames.
    pub fn is_promoted(&self) -> bool {
        self.record.role() == CopyRole::Source
    }

    /// Refuses a frame of wire generation `got` if the replica was promoted:
    /// a copy that is now a source is written by its workload only.
    pub fn check_not_promoted(&self, got: u64) -> Result<()> {
        if self.is_promoted() {
            return Err(TargetError::StaleGeneration {
                disk: self.state.disk.clone(),
                got,
                current: self.record.current().number.0,
            });
        }
        Ok(())
    }

    /// Promotes the replica (the promote step of a failover): everything it
    /// holds becomes the writable source in the new generation `id`, whose
    /// wire number is one more than the one held. Durable when it returns.
    pub fn promote(&mut self, id: GenerationId) -> Result<GenerationRecord> {
        self.checkpoint()?;
        let mut record = self.record.clone();
        in_step(&mut record, &self.state)?;
        record
            .promote(id)
            .map_err(|e| generation_error(&self.state.disk, e))?;
        let f = self.opts.faults.clone();
        // The record is the commit point; open completes the state after a crash.
        write(&f, &self.dir, &record)?;
        self.record = record;
        let mut st = self.state.clone();
        st.generation = self.record.current().number.0;
        self.guarded(|s| {
            s.write_state(&st)?;
            s.state = st;
            let cid = s.cid();
            s.replica.set_cid(&f, cid, true)
        })?;
        info!(
            disk = %self.state.disk,
            generation = %self.record.current().number,
            lineage = %self.record.lineage(),
            "replica promoted: frames of its former source are refused from now on"
        );
        Ok(self.record.clone())
    }

    /// The record as it stands now: [`generation_record`](Self::generation_record)
    /// brought in step with what the store applied since it was opened (the
    /// record a promotion starts from).
    pub fn generation_record_now(&self) -> Result<GenerationRecord> {
        let mut r = self.record.clone();
        in_step(&mut r, &self.state)?;
        Ok(r)
    }

    /// Promotes the replica at the recovery point that holds the stream
    /// through `point` (the promote step of a failover to that point): the
    /// record goes back to the generation that held `point` and becomes the
    /// writable source in the new generation `id` continuing from it
    /// ([`GenerationRecord::promote_at`]). The replica's data may go beyond
    /// the point; the writable disk is the point's copy, and the store takes
    /// no frames from now on. Durable when it returns.
    pub fn promote_at(&mut self, point: Seq, id: GenerationId) -> Result<GenerationRecord> {
        self.checkpoint()?;
        let before = self.generation_record_now()?;
        self.promote_record_from(&before, point, id)
    }

    /// Changes the point of a promotion that is not final yet: `before` (the
    /// record this replica held before it was promoted, as the failover saved
    /// it) is promoted at `point` instead, with the new generation `id`.
    /// Durable when it returns.
    pub fn promote_again_at(
        &mut self,
        before: &GenerationRecord,
        point: Seq,
        id: GenerationId,
    ) -> Result<GenerationRecord> {
        if before.disk() != self.record.disk() {
            return Err(generation_error(
                &self.state.disk,
                blockferry_proto::GenerationError::WrongDisk {
                    ours: self.record.disk(),
                    theirs: before.disk(),
                },
            ));
        }
        self.checkpoint()?;
        self.promote_record_from(before, point, id)
    }

    fn promote_record_from(
        &mut self,
        before: &GenerationRecord,
        point: Seq,
        id: GenerationId,
    ) -> Result<GenerationRecord> {
        let mut record = before.clone();
        record
            .promote_at(point, id)
            .map_err(|e| generation_error(&self.state.disk, e))?;
        let f = self.opts.faults.clone();
        // The record is the commit point; open completes the state after a
        // crash. The state takes the record's wire number even where it is
        // lower (a point in an older generation): open must not read a
        // larger state number as a newer generation the replica followed.
        write(&f, &self.dir, &record)?;
        self.record = record;
        let mut st = self.state.clone();
        st.generation = self.record.current().number.0;
        self.guarded(|s| {
            s.write_state(&st)?;
            s.state = st;
            let cid = s.cid();
            s.replica.set_cid(&f, cid, true)
        })?;
        info!(
            disk = %self.state.disk,
            point = %point,
            generation = %self.record.current().number,
            lineage = %self.record.lineage(),
            "replica promoted at a recovery point: frames of its former source are refused from now on"
        );
        Ok(self.record.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    const NAME: &str = "01234567-89ab-cdef-0011-223344556677";

    fn store(root: &Path) -> DiskStore {
        DiskStore::create(root, NAME, 1 << 20, 1, StoreOptions::default()).unwrap()
    }

    #[test]
    fn a_store_without_a_record_gets_one_on_open() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path()).close().unwrap();
        let path = dir.path().join(NAME).join(RECORD);
        std::fs::remove_file(&path).unwrap();
        let s = DiskStore::open(dir.path(), NAME, StoreOptions::default()).unwrap();
        let r = s.generation_record();
        assert_eq!(r.disk(), NAME.parse::<DiskId>().unwrap());
        assert_eq!(r.role(), CopyRole::Replica);
        assert_eq!(r.current().number, Generation(s.generation()));
        assert!(path.exists(), "the migration writes the record");
        assert_eq!(read(path.parent().unwrap()).unwrap().as_ref(), Some(r));
    }

    #[test]
    fn a_promotion_survives_reopening_and_grows_the_wire_generation() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(dir.path());
        let before = s.generation();
        let id = GenerationId::from_bytes([9; 16]);
        let r = s.promote(id).unwrap();
        assert_eq!(r.role(), CopyRole::Source);
        assert_eq!(r.current().id, id);
        assert_eq!(r.current().number, Generation(before + 1));
        assert_eq!(s.generation(), before + 1);
        s.close().unwrap();
        let s = DiskStore::open(dir.path(), NAME, StoreOptions::default()).unwrap();
        assert!(s.is_promoted());
        assert_eq!(s.generation_record(), &r);
        assert_eq!(s.generation(), before + 1);
    }

    #[test]
    fn a_promotion_whose_state_write_was_lost_is_completed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(dir.path());
        let state = std::fs::read(dir.path().join(NAME).join("state.json")).unwrap();
        s.promote(GenerationId::from_bytes([5; 16])).unwrap();
        drop(s);
        // The crash came between the record and the state.
        std::fs::write(dir.path().join(NAME).join("state.json"), state).unwrap();
        let s = DiskStore::open(dir.path(), NAME, StoreOptions::default()).unwrap();
        assert!(s.is_promoted());
        assert_eq!(s.generation(), 1);
        assert_eq!(s.generation_record().current().number, Generation(1));
    }

    #[test]
    fn a_promoted_replica_refuses_frames_of_every_generation() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(dir.path());
        assert!(s.check_not_promoted(0).is_ok());
        s.promote(GenerationId::from_bytes([1; 16])).unwrap();
        for got in [0, 1, 2] {
            assert!(matches!(
                s.check_not_promoted(got),
                Err(TargetError::StaleGeneration { current: 1, .. })
            ));
        }
        let mut b = crate::batch::ApplyBatch {
            disk: NAME.to_string(),
            generation: 0,
            seq: 1,
            chunks: Vec::new(),
        };
        assert!(matches!(
            s.apply_many(std::slice::from_ref(&b)),
            Err(TargetError::StaleGeneration { .. })
        ));
        b.generation = 1;
        assert!(matches!(
            s.apply_many(&[b]),
            Err(TargetError::StaleGeneration { .. })
        ));
        assert_eq!(s.applied_seq(), 0, "nothing was applied");
    }

    /// A store holding batches 1..=n, batch k of wire generation `gen_of(k)`;
    /// reopened where the generation changes, so that the record holds each.
    fn store_with_batches(root: &Path, n: u64, gen_of: impl Fn(u64) -> u64) -> DiskStore {
        let mut s = store(root);
        for seq in 1..=n {
            if seq > 1 && gen_of(seq) != gen_of(seq - 1) {
                s.close().unwrap();
                s = DiskStore::open(root, NAME, StoreOptions::default()).unwrap();
            }
            let b = crate::batch::ApplyBatch {
                disk: NAME.to_string(),
                generation: gen_of(seq),
                seq,
                chunks: vec![crate::batch::raw_chunk(seq * 512, vec![seq as u8; 512])],
            };
            s.apply(&b).unwrap();
        }
        s
    }

    #[test]
    fn promote_at_an_older_point_holds_that_point_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store_with_batches(dir.path(), 5, |_| 1);
        let held = s.generation_record_now().unwrap().current();
        let id = GenerationId::from_bytes([7; 16]);
        let r = s.promote_at(Seq(3), id).unwrap();
        assert_eq!(r.role(), CopyRole::Source);
        assert_eq!(r.current().id, id);
        assert_eq!(r.current().seq, Seq(3), "promoted at the point, not at 5");
        assert_eq!(r.current().number, Generation(held.number.0 + 1));
        assert_eq!((r.history()[0].id, r.history()[0].seq), (held.id, Seq(3)));
        assert_eq!(s.applied_seq(), 5, "the replica's data is untouched");
        let b = crate::batch::ApplyBatch {
            disk: NAME.to_string(),
            generation: 2,
            seq: 6,
            chunks: Vec::new(),
        };
        assert!(matches!(
            s.apply_many(&[b]),
            Err(TargetError::StaleGeneration { .. })
        ));
        s.close().unwrap();
        let s = DiskStore::open(dir.path(), NAME, StoreOptions::default()).unwrap();
        assert_eq!(s.generation_record(), &r, "reopening keeps the point");
        assert_eq!(s.generation(), r.current().number.0);
    }

    #[test]
    fn promote_at_a_point_past_the_replica_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store_with_batches(dir.path(), 2, |_| 1);
        let e = s
            .promote_at(Seq(3), GenerationId::from_bytes([7; 16]))
            .unwrap_err();
        assert!(e.to_string().contains("no point #3"), "{e}");
        assert!(!s.is_promoted());
    }

    #[test]
    fn promote_again_at_moves_the_point_from_the_saved_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store_with_batches(dir.path(), 5, |_| 1);
        let before = s.generation_record_now().unwrap();
        let first = s
            .promote_at(Seq(4), GenerationId::from_bytes([1; 16]))
            .unwrap();
        let again = s
            .promote_again_at(&before, Seq(2), GenerationId::from_bytes([2; 16]))
            .unwrap();
        assert_eq!(again.current().seq, Seq(2));
        assert_eq!(again.current().number, first.current().number);
        assert_eq!(
            again.history()[0],
            GenerationEntry {
                seq: Seq(2),
                ..before.current()
            }
        );
        assert_eq!(&again.history()[1..], before.history());
        assert!(
            !again.history().iter().any(|e| e.id == first.current().id),
            "the first promotion is no part of the lineage"
        );
        s.close().unwrap();
        let s = DiskStore::open(dir.path(), NAME, StoreOptions::default()).unwrap();
        assert_eq!(s.generation_record(), &again);
    }

    #[test]
    fn a_promotion_at_a_point_of_an_older_generation_survives_a_lost_state_write() {
        let dir = tempfile::tempdir().unwrap();
        // Batches 1-2 of wire generation 1, 3-4 of 2, 5-6 of 3.
        let mut s = store_with_batches(dir.path(), 6, |seq| seq.div_ceil(2));
        assert_eq!(s.generation(), 3);
        s.checkpoint().unwrap();
        let state = std::fs::read(dir.path().join(NAME).join("state.json")).unwrap();
        let r = s
            .promote_at(Seq(1), GenerationId::from_bytes([3; 16]))
            .unwrap();
        // The three wire generations were restarts of one stream (one data
        // generation, renumbered): the promoted one is numbered above all of
        // them, so every frame its former source sent is refused as stale.
        assert_eq!(
            r.current().number,
            Generation(4),
            "one more than the stream's last wire generation"
        );
        assert_eq!(r.history()[0].number, Generation(3));
        assert_eq!(r.history()[0].seq, Seq(1), "left at the point");
        assert_eq!(s.generation(), 4);
        drop(s);
        // The crash came between the record and the state.
        std::fs::write(dir.path().join(NAME).join("state.json"), state).unwrap();
        let s = DiskStore::open(dir.path(), NAME, StoreOptions::default()).unwrap();
        assert_eq!(
            s.generation_record(),
            &r,
            "no generation adopted from the state"
        );
        assert_eq!(s.generation(), 4, "the state was completed");
    }

    #[test]
    fn a_promotion_at_an_earlier_point_keeps_that_point_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(dir.path());
        let b = |seq| crate::batch::ApplyBatch {
            disk: NAME.to_string(),
            generation: 1,
            seq,
            chunks: Vec::new(),
        };
        s.apply_many(&[b(1), b(2), b(3)]).unwrap();
        let mut r = s.generation_record().clone();
        in_step(&mut r, &s.state).unwrap();
        s.close().unwrap();
        // What a failover to the point at seq 2 writes.
        let rec_dir = dir.path().join(NAME);
        r.promote_at(Seq(2), GenerationId::from_bytes([4; 16]))
            .unwrap();
        std::fs::write(rec_dir.join(RECORD), r.encode()).unwrap();
        let s = DiskStore::open(dir.path(), NAME, StoreOptions::default()).unwrap();
        assert_eq!(s.generation_record().current().seq, Seq(2));
        assert_eq!(s.generation_record(), &r);
    }

    #[test]
    fn a_second_promotion_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = store(dir.path());
        s.promote(GenerationId::from_bytes([1; 16])).unwrap();
        let e = s.promote(GenerationId::from_bytes([2; 16])).unwrap_err();
        assert!(e.to_string().contains("already the source"), "{e}");
    }

    fn root_entry(disk: DiskId, number: u64, seq: u64) -> GenerationEntry {
        GenerationEntry {
            id: GenerationId::root(disk),
            number: Generation(number),
            seq: Seq(seq),
        }
    }

    #[test]
    fn a_new_replica_starts_in_the_disks_root_generation() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let disk = NAME.parse::<DiskId>().unwrap();
        let r = s.generation_record();
        assert_eq!(r.current().id, GenerationId::root(disk));
        assert!(r.history().is_empty());
        // The source's first record starts there too: no id had to travel.
        let source = GenerationRecord::new(disk, CopyRole::Source, root_entry(disk, 1, 0));
        assert!(matches!(
            source.compare(r),
            blockferry_proto::Comparison::InSync { .. }
        ));
    }

    #[test]
    fn the_record_follows_a_newer_wire_generation_under_the_same_id() {
        let disk = NAME.parse::<DiskId>().unwrap();
        let mut r = GenerationRecord::new(disk, CopyRole::Replica, root_entry(disk, 1, 5));
        let mut st = migrated_state(2, 9);
        assert!(in_step(&mut r, &st).unwrap(), "a new number is written");
        assert_eq!(r.current(), root_entry(disk, 2, 9));
        assert!(r.history().is_empty(), "a renumbering is no new generation");
        st.applied_seq = 12;
        assert!(!in_step(&mut r, &st).unwrap());
        assert_eq!(r.current().seq, Seq(12));
    }

    #[test]
    fn a_record_of_an_earlier_version_that_never_forked_moves_into_the_root_generation() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path()).close().unwrap();
        let disk = NAME.parse::<DiskId>().unwrap();
        let adopted = |n: u64, seq: u64| GenerationEntry {
            id: adopted_id(disk, Generation(n)),
            number: Generation(n),
            seq: Seq(seq),
        };
        // What an earlier version wrote after following wire generation 1
        // (the store's state says generation 0, so the record is ahead).
        let old = GenerationRecord::from_parts(
            disk,
            CopyRole::Replica,
            adopted(1, 0),
            vec![adopted(0, 0)],
        )
        .unwrap();
        let rec_dir = dir.path().join(NAME);
        std::fs::write(rec_dir.join(RECORD), old.encode()).unwrap();
        let s = DiskStore::open(dir.path(), NAME, StoreOptions::default()).unwrap();
        assert_eq!(s.generation_record().current(), root_entry(disk, 1, 0));
        assert!(s.generation_record().history().is_empty());
        assert_eq!(
            read(&rec_dir).unwrap().as_ref(),
            Some(s.generation_record())
        );
        drop(s);
        // A record that forked keeps its lineage as it is.
        let mut forked = old.clone();
        forked.promote(GenerationId::from_bytes([7; 16])).unwrap();
        assert_eq!(legacy(&forked), None);
        std::fs::write(rec_dir.join(RECORD), forked.encode()).unwrap();
        let s = DiskStore::open(dir.path(), NAME, StoreOptions::default()).unwrap();
        assert_eq!(s.generation_record(), &forked);
    }

    fn migrated_state(generation: u64, applied_seq: u64) -> DiskState {
        DiskState {
            format: super::super::STATE_FORMAT,
            disk: NAME.to_string(),
            size: 1 << 20,
            generation,
            applied_seq,
            wal_epoch: 1,
            created_ms: 1,
            replica: "replica.vmdk".into(),
            thin: false,
            next_point_id: 1,
            next_file_no: 1,
            points: Vec::new(),
            complete: false,
            external: None,
        }
    }
}
