//! Deferred grain tables: the write path of a disk whose writes a redo
//! journal already makes durable (blockferry's thin replica).
//!
//! [`VmdkImage::apply`] makes every batch durable on its own: new grains,
//! `fdatasync`, their table entries, `fdatasync` again. A writer that keeps
//! its own journal pays for those syncs twice. With
//! [`VmdkImage::apply_deferred`] instead:
//!
//! - **What is deferred.** New grains are appended to the file at once,
//!   overwrites of allocated grains go in place, but the grain table entries
//!   that point at new grains change only in memory, and nothing is synced.
//!   Reads through the same [`VmdkImage`] see the new data.
//! - **What the caller must do at a checkpoint**, in this order:
//!   1. `fdatasync` the file ([`VmdkImage::sparse_file`], or
//!      [`VmdkImage::sync`]): the barrier, so no table can point at a grain
//!      that is not on disk;
//!   2. [`VmdkImage::write_deferred_tables`]: the changed tables, redundant
//!      copy first, then primary;
//!   3. when it returned `true`, `fdatasync` again.
//!
//!   Only then may the caller drop the journal records the checkpoint covers.
//! - **What a crash leaves.** Before step 2: the tables as of the last
//!   checkpoint, new grains at the end of the file that no table
//!   references (dead space; the journal's replay writes the data again),
//!   and torn in-place overwrites (the replay rewrites them). After step 2,
//!   before step 3 completes: each table copy old or new, so a redundant
//!   table may differ from its primary; [`VmdkImage::repair_redundant_tables`] on the next open makes
//!   them equal again, and the journal replay redoes what either lost. A
//!   table never points at garbage, so the file always opens and passes
//!   [`check`](crate::check::check) once repaired.
//!
//! [`VmdkImage::set_cid_deferred`] defers the descriptor's CID the same way.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::extent::Grain;
use super::{ExtentData, OpenExtent, VmdkImage, WriteOp};
use crate::VmdkError;
use crate::sparse::{self, SECTOR};

impl VmdkImage {
    /// Sets the CID in the descriptor. With `durable` this is
    /// [`VmdkImage::set_cid`]. Without, an embedded descriptor (monolithicSparse)
    /// is rewritten in place and not synced: it becomes durable with the
    /// checkpoint's first sync of the file, and a crash before that leaves
    /// the old CID, which the caller's recovery sets again. A descriptor
    /// file is always replaced durably.
    pub fn set_cid_deferred(&mut self, cid: u32, durable: bool) -> Result<(), VmdkError> {
        self.descriptor.set_cid(cid);
        self.write_descriptor_inner(durable)
    }

    /// After a crash between the two copies of a table update, makes every
    /// redundant grain table equal to its primary: the primary is what
    /// readers use, and the journal's replay redoes what either copy lost.
    /// Returns how many tables were rewritten. Call it when opening a disk
    /// written with deferred tables, before replaying the journal.
    pub fn repair_redundant_tables(&mut self) -> Result<usize, VmdkError> {
        let mut fixed = 0;
        for e in &mut self.extents {
            let ExtentData::Sparse(s) = &mut e.data else {
                continue;
            };
            let Some(rgd) = s.rgd.clone() else { continue };
            let n = s.header.num_gtes_per_gt as usize;
            let mut buf = vec![0u8; n * 4];
            for (i, (&p, &r)) in s.gd.iter().zip(rgd.iter()).enumerate() {
                if p == 0 || r == 0 {
                    continue;
                }
                let primary = s.read_gt(u64::from(p))?;
                if s.read_gt(u64::from(r))? != primary {
                    sparse::encode_entries(&primary, &mut buf);
                    let off = u64::from(r) * SECTOR;
                    s.file.write_all_at(&buf, off).map_err(VmdkError::io(
                        "write redundant grain table of",
                        &s.path,
                        off,
                    ))?;
                    tracing::warn!(path = %s.path.display(), table = i, "redundant grain table differed from the primary; rewritten");
                    fixed += 1;
                }
            }
            if fixed > 0 {
                s.file
                    .sync_data()
                    .map_err(VmdkError::io("fdatasync", &s.path, 0))?;
            }
        }
        Ok(fixed)
    }

    /// Like [`VmdkImage::apply`] for a disk whose writes a redo journal
    /// covers until the next checkpoint ([module docs](self)): new grains
    /// are written, but their table entries change only in memory (reads
    /// through this image see them), and nothing is synced. Zeros written
    /// where a parentless disk has no grain allocate nothing, and zeros over
    /// an allocated grain are written in place, so a replica that is
    /// overwritten forever leaks no grains.
    pub fn apply_deferred(&mut self, ops: &[WriteOp<'_>]) -> Result<(), VmdkError> {
        self.apply_inner(ops, true)
    }

    /// True when every grain of `[offset, offset + len)` of a parentless
    /// disk is unallocated or zeroed, so the range reads as zeros without
    /// reading it. `false` for a delta (its parent decides) and for flat
    /// extents (use the file system's holes there).
    pub fn reads_unallocated(&self, offset: u64, len: u64) -> bool {
        if self.parent.is_some() {
            return false;
        }
        let end = offset.saturating_add(len).min(self.size);
        let mut pos = offset;
        while pos < end {
            let e = &self.extents[self.extent_index(pos)];
            let ExtentData::Sparse(s) = &e.data else {
                return false;
            };
            let in_ext = pos - e.start;
            if !matches!(s.lookup(in_ext), Ok(Grain::Unallocated | Grain::Zero)) {
                return false;
            }
            let gb = s.header.grain_bytes();
            pos = e.start + (in_ext / gb + 1) * gb;
        }
        true
    }

    /// The file of a disk that is one sparse extent, for the caller's own
    /// syncs at a checkpoint; `None` for any other shape.
    pub fn sparse_file(&self) -> Option<&File> {
        match self.extents.as_slice() {
            [
                OpenExtent {
                    data: ExtentData::Sparse(s),
                    ..
                },
            ] => Some(&s.file),
            _ => None,
        }
    }

    /// Writes the grain tables changed by deferred writes (redundant copy
    /// first), without syncing; returns whether any was written. The caller
    /// syncs the file before (the barrier: no table may point at a grain that
    /// is not on disk) and, when this returns `true`, after.
    pub fn write_deferred_tables(&mut self) -> Result<bool, VmdkError> {
        let mut wrote = false;
        for e in &mut self.extents {
            if let ExtentData::Sparse(s) = &mut e.data
                && !s.dirty.is_empty()
            {
                let dirty: Vec<usize> = s.dirty.iter().copied().collect();
                s.write_gts(&dirty)?;
                s.dirty.clear();
                wrote = true;
            }
        }
        Ok(wrote)
    }
}
