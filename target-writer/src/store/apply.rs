//! Apply: verify, capture undo, journal and sync, write in place; the
//! checkpoint that retires the journal; growing the replica; the sequence
//! check every sequenced frame passes.

use blockferry_proto::extent::ExtentSet;
use blockferry_proto::{Barrier, Generation, Seq, SeqOrder, seq_order};
use tracing::{debug, info, warn};

use crate::batch::{ApplyBatch, Undo, Verified, verify_batch};
use crate::error::{Result, TargetError};
use crate::segment;
use crate::wal;

use super::*;

/// Places a frame's `(generation, seq)` against the `held` one with the one
/// check of the sequence invariant ([`blockferry_proto::seq_order`]): `true`
/// for the next frame, `false` for a replay, a typed error otherwise.
pub fn next_in_sequence(disk: &str, held: (u64, u64), got: (u64, u64)) -> Result<bool> {
    let order = seq_order(
        (Generation(held.0), Seq(held.1)),
        (Generation(got.0), Seq(got.1)),
    );
    let disk = disk.to_string();
    match order {
        SeqOrder::Next => Ok(true),
        SeqOrder::Duplicate => Ok(false),
        SeqOrder::Gap { expected } => Err(TargetError::Gap {
            disk,
            generation: got.0,
            got: got.1,
            expected: expected.0,
        }),
        SeqOrder::StaleGeneration { current } => Err(TargetError::StaleGeneration {
            disk,
            got: got.0,
            current: current.0,
        }),
        SeqOrder::Reused { held } => Err(TargetError::ReusedSeq {
            disk,
            generation: got.0,
            got: got.1,
            held: held.0,
        }),
    }
}

impl DiskStore {
    pub(super) fn check_usable(&self) -> Result<()> {
        if self.poisoned {
            Err(TargetError::Poisoned {
                disk: self.state.disk.clone(),
            })
        } else {
            Ok(())
        }
    }

    /// Poisons the store after a failed replica write or sync, whatever the
    /// cause, and hands the error back.
    pub(super) fn replica_failed(&mut self, e: TargetError) -> TargetError {
        warn!(disk = %self.state.disk, error = %e, "replica write failed; reopen to replay the journal");
        self.poisoned = true;
        e
    }

    /// Runs `f`; any error other than "no space" leaves the store poisoned.
    pub(super) fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let r = f(self);
        if let Err(e) = &r
            && !e.is_no_space()
        {
            warn!(disk = %self.state.disk, error = %e, "store stopped; reopen to replay the journal");
            self.poisoned = true;
        }
        r
    }

    /// Verifies and applies one batch; returns once it is durable.
    pub fn apply(&mut self, batch: &ApplyBatch) -> Result<ApplyOutcome> {
        let mut out = self.apply_many(std::slice::from_ref(batch))?;
        Ok(out.pop().unwrap_or(ApplyOutcome::Duplicate))
    }

    /// Verifies and applies consecutive batches with one journal sync (group
    /// commit); returns once all are durable. Each batch is still its own
    /// journal record, so a crash leaves the replica at a batch boundary. Any
    /// bad batch rejects the whole call before anything is written.
    pub fn apply_many(&mut self, batches: &[ApplyBatch]) -> Result<Vec<ApplyOutcome>> {
        self.check_usable()?;
        let disk = self.state.disk.clone();
        let span = tracing::debug_span!("apply", disk = %disk, batches = batches.len());
        let _g = span.enter();
        let (mut generation, mut applied) = (self.state.generation, self.state.applied_seq);
        let mut outcomes = Vec::with_capacity(batches.len());
        let mut redo_all = Vec::new();
        let mut undo_all = Vec::new();
        let mut pending = ExtentSet::new();
        let mut bytes = std::mem::take(&mut self.wal_buf);
        bytes.clear();
        for batch in batches {
            if batch.disk != disk {
                return Err(TargetError::WrongDisk {
                    disk,
                    got: batch.disk.clone(),
                });
            }
            self.check_not_promoted(batch.generation)?;
            if !next_in_sequence(&disk, (generation, applied), (batch.generation, batch.seq))? {
                debug!(seq = batch.seq, "replayed batch ignored");
                outcomes.push(ApplyOutcome::Duplicate);
                continue;
            }
            let redo = verify_batch(batch, &disk, self.state.size)?;
            // Reading undo data writes nothing, so a failure here leaves the store usable.
            let undo = self.capture_undo(&redo, &mut pending)?;
            wal::encode_into(
                &mut bytes,
                self.state.wal_epoch,
                batch.generation,
                batch.seq,
                &batch.chunks,
                &undo,
            );
            redo_all.push(redo);
            undo_all.extend(undo.into_iter().map(|c| (batch.seq, c)));
            generation = batch.generation;
            applied = batch.seq;
            outcomes.push(ApplyOutcome::Applied);
        }
        if redo_all.is_empty() {
            self.wal_buf = bytes;
            return Ok(outcomes);
        }
        let journalled = self.journal(&bytes, applied);
        self.wal_buf = bytes;
        journalled?;
        self.journal_undo.extend(undo_all);
        self.guarded(|s| {
            let f = s.opts.faults.clone();
            for c in redo_all.iter().flatten() {
                // Even "no space" (a thin replica's new grain): the page
                // cache may hold part of the batch; only a replay is sure.
                s.replica
                    .write_at(&f, &c.data, c.offset)
                    .map_err(|e| s.replica_failed(e))?;
            }
            s.replica.start_writeback();
            s.cover.extend_from(&pending);
            s.state.generation = generation;
            s.state.applied_seq = applied;
            let cid = s.cid();
            s.replica.set_cid(&f, cid, false)?;
            if s.wal_pos >= s.opts.checkpoint_bytes {
                s.checkpoint_inner()?;
            }
            Ok(outcomes)
        })
    }

    /// The current contents of every range of `redo` that the open point has
    /// not saved yet (neither in its segment, nor in the journal, nor earlier
    /// in this group: `pending`), adding those ranges to `pending`.
    pub(super) fn capture_undo(
        &self,
        redo: &[Verified],
        pending: &mut ExtentSet,
    ) -> Result<Vec<Undo>> {
        let mut undo = Vec::new();
        if self.open_seg.is_none() {
            return Ok(undo);
        }
        for c in redo {
            let end = c.offset + c.data.len() as u64;
            for r in self.cover.uncovered(c.offset..end) {
                for std::ops::Range { start: a, end: b } in pending.uncovered(r) {
                    if self.replica.known_zero(a, b - a) {
                        // Never written: no read (which would also fill
                        // the page cache with zeros), and no undo data.
                        undo.push(Undo {
                            offset: a,
                            len: (b - a) as u32,
                            data: None,
                        });
                        continue;
                    }
                    let mut data = vec![0u8; (b - a) as usize];
                    self.replica.read_at(&mut data, a)?;
                    undo.push(Undo::saved(a, data));
                }
            }
            pending.insert(c.offset..end);
        }
        Ok(undo)
    }

    /// Appends `rec` to the journal and syncs it. On ENOSPC the journal
    /// position is not advanced, so the next append overwrites the partial
    /// record and nothing else changed.
    pub(super) fn journal(&mut self, bytes: &[u8], seq: u64) -> Result<()> {
        let f = self.opts.faults.clone();
        let pos = self.wal_pos;
        let res = f
            .write_at(&self.wal, &self.wal_path, bytes, pos)
            .and_then(|()| f.sync_data(&self.wal, &self.wal_path));
        match res {
            Ok(()) => {
                self.wal_pos = pos + bytes.len() as u64;
                Ok(())
            }
            Err(e) if e.is_no_space() => {
                warn!(disk = %self.state.disk, seq, "no space for the journal; batch not applied, retry later");
                Err(e)
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// Makes the replica and the open point's undo durable and retires the
    /// journal. Cheap when the journal is empty.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.check_usable()?;
        self.guarded(|s| s.checkpoint_inner())
    }

    pub(super) fn checkpoint_inner(&mut self) -> Result<()> {
        if self.wal_pos == 0 {
            return Ok(());
        }
        let f = self.opts.faults.clone();
        let mut new_seg_len = None;
        if let (Some(seg), Some(p)) = (&self.open_seg, self.state.points.last()) {
            // Through one reused buffer of a few MiB: the undo of a whole
            // checkpoint interval in one fresh allocation costs more in page
            // faults than the copy itself.
            let path = self.dir.join(&p.segment);
            let mut out = std::mem::take(&mut self.wal_buf);
            out.clear();
            let mut pos = p.segment_len;
            let mut written = Ok(());
            let last = self.journal_undo.len().saturating_sub(1);
            for (i, (seq, c)) in self.journal_undo.iter().enumerate() {
                segment::encode_undo(&mut out, *seq, c);
                if out.len() >= 4 << 20 || i == last {
                    written = f.write_at(seg, &path, &out, pos);
                    if written.is_err() {
                        break;
                    }
                    pos += out.len() as u64;
                    out.clear();
                }
            }
            self.wal_buf = out;
            written?;
            if pos > p.segment_len {
                f.sync_data(seg, &path)?;
            }
            new_seg_len = Some(pos);
        }
        // A failed sync may have dropped dirty pages: only a replay is sure.
        self.replica.sync(&f).map_err(|e| self.replica_failed(e))?;
        let mut st = self.state.clone();
        st.wal_epoch += 1;
        if let (Some(len), Some(p)) = (new_seg_len, st.points.last_mut()) {
            p.segment_len = len;
        }
        self.write_state(&st)?;
        self.state = st;
        self.wal_pos = 0;
        self.journal_undo.clear();
        let cid = self.cid();
        self.replica.set_cid(&f, cid, true)?;
        debug!(disk = %self.state.disk, applied_seq = self.state.applied_seq, "checkpoint");
        Ok(())
    }

    /// Grows the replica to `size` bytes (the protected disk grew): the flat
    /// extent is extended and preallocated, then the disk state commits the
    /// new size, then the descriptor's extent line and geometry are rewritten.
    /// A crash before the state is written leaves the old size (open cuts the
    /// extent back); after it, open rewrites the descriptor. Recovery points
    /// taken before keep their own size. A replica never shrinks: that would
    /// destroy the data past the new end.
    pub fn grow(&mut self, size: u64) -> Result<()> {
        self.check_usable()?;
        let old = self.state.size;
        if size == old {
            return Ok(());
        }
        if size < old {
            return Err(TargetError::Shrink {
                disk: self.state.disk.clone(),
                size: old,
                new_size: size,
            });
        }
        if !size.is_multiple_of(512) {
            return Err(TargetError::BadSize { size });
        }
        if let Some(seed) = &self.state.external {
            // Refused before anything changes: the store stays usable.
            return Err(TargetError::SeedCannotGrow {
                path: seed.path.clone(),
                size: old,
                new_size: size,
            });
        }
        self.guarded(|s| {
            let f = s.opts.faults.clone();
            s.replica.grow(&f, size)?;
            let mut st = s.state.clone();
            st.size = size;
            s.write_state(&st)?;
            s.state = st;
            let cid = s.cid();
            s.replica.set_cid(&f, cid, true)?;
            info!(disk = %s.state.disk, old, size, "grew replica");
            Ok(())
        })
    }

    pub(super) fn write_state(&self, st: &DiskState) -> Result<()> {
        let bytes = encode_state(&self.dir, st)?;
        self.opts.faults.write_atomic(&self.dir, STATE, &bytes)
    }
}

/// The store as the simulation (and any driver of sequenced frames) sees it.
/// The caller has routed the frames to the store of their disk.
impl blockferry_proto::DurableApply for DiskStore {
    type Error = TargetError;

    fn apply_batches(&mut self, batches: &[blockferry_proto::ExtentBatch]) -> Result<()> {
        let disk = self.state.disk.clone();
        let batches: Vec<ApplyBatch> = batches
            .iter()
            .map(|b| ApplyBatch::from_proto(&disk, b))
            .collect();
        self.apply_many(&batches).map(drop)
    }

    fn apply_barrier(&mut self, barrier: &Barrier) -> Result<()> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        self.barrier(barrier, now_ms).map(drop)
    }

    fn durable(&self) -> (Generation, Seq) {
        (
            Generation(self.state.generation),
            Seq(self.state.applied_seq),
        )
    }
}
