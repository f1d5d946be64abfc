//! Writing: batches of data and zero writes ([`VmdkImage::apply`]), planned
//! per grain and executed in the crash-safe order (new grains, fdatasync,
//! tables); the descriptor (CID); and resizing a thin disk in place.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use super::extent::Grain;
use super::file::{Piece, check_range, corrupt, write_piece};
use super::{ExtentData, OpenExtent, VmdkImage, WriteOp};
use crate::VmdkError;
use crate::descriptor::{Access, AdapterType, Geometry};
use crate::sparse::{GTE_ZERO, SECTOR};

/// Largest single write when streaming new grains.
const MAX_IO: usize = 8 << 20;

/// Pending work for one grain within a batch.
enum GrainPlan<'a> {
    /// Grain already allocated at byte `at` of the file: write pieces in
    /// place at these file offsets.
    InPlace {
        at: u64,
        pieces: Vec<(u64, Piece<'a>)>,
    },
    /// Grain gets a new full-grain buffer (borrowed when one write covers
    /// the whole grain: no copy before it goes to the file).
    New(Cow<'a, [u8]>),
    /// Grain becomes a zeroed-grain entry.
    Zero,
}

impl VmdkImage {
    /// Set the CID and persist the descriptor durably.
    pub fn set_cid(&mut self, cid: u32) -> Result<(), VmdkError> {
        self.descriptor.set_cid(cid);
        self.write_descriptor()
    }

    /// Changes the virtual size of a parentless monolithicSparse disk in
    /// place: the header's capacity and the descriptor's extent line. The
    /// grain directories must have room for the new size (they are laid out
    /// whole sectors at a time, so a disk can grow up to the next multiple of
    /// 128 × 32 MiB); new tables are allocated when first written. Shrinking
    /// is only for undoing an interrupted grow (nothing written past the end).
    /// Durable on return.
    pub fn resize_in_place(&mut self, size: u64) -> Result<(), VmdkError> {
        self.writable()?;
        let path = self.path.clone();
        let [
            OpenExtent {
                data: ExtentData::Sparse(s),
                len,
                ..
            },
        ] = self.extents.as_mut_slice()
        else {
            return Err(VmdkError::Unsupported {
                path,
                what: "resizing a disk that is not one sparse extent".into(),
            });
        };
        if self.parent.is_some() || !size.is_multiple_of(SECTOR) || size == 0 {
            return Err(VmdkError::Invalid {
                path,
                what: format!("cannot resize to {size} bytes (a delta, or not whole sectors)"),
            });
        }
        let mut h = s.header;
        h.capacity = size / SECTOR;
        let entries = h.num_gd_entries() as usize;
        // Room: up to the first table after each directory.
        let room = |dir_sector: u64, dir: &[u32]| {
            dir.iter()
                .copied()
                .filter(|&t| u64::from(t) > dir_sector)
                .min()
                .map_or(0, |t| ((u64::from(t) - dir_sector) * SECTOR / 4) as usize)
        };
        let mut fits = entries <= room(h.gd_offset, &s.gd);
        if let Some(rgd) = &s.rgd {
            fits &= entries <= room(h.rgd_offset, rgd);
        }
        if !fits {
            return Err(VmdkError::Unsupported {
                path,
                what: format!(
                    "growing this thin disk to {size} bytes: its grain directory has no room (export the point and recreate a larger replica, or use a flat replica)"
                ),
            });
        }
        s.gd.resize(entries, 0);
        if let Some(rgd) = &mut s.rgd {
            rgd.resize(entries, 0);
        }
        s.gts.resize_with(entries, OnceLock::new);
        s.file.write_all_at(&h.encode(), 0).map_err(VmdkError::io(
            "write header of",
            &s.path,
            0,
        ))?;
        s.file
            .sync_data()
            .map_err(VmdkError::io("fdatasync", &s.path, 0))?;
        s.header = h;
        *len = size;
        self.size = size;
        self.descriptor.extents[0].sectors = size / SECTOR;
        let adapter = self
            .descriptor
            .adapter_type()
            .unwrap_or(AdapterType::LsiLogic);
        let geo = Geometry::for_capacity(size / SECTOR, &adapter);
        self.descriptor
            .ddb_set("ddb.geometry.cylinders", geo.cylinders.to_string());
        self.descriptor
            .ddb_set("ddb.geometry.heads", geo.heads.to_string());
        self.descriptor
            .ddb_set("ddb.geometry.sectors", geo.sectors.to_string());
        self.write_descriptor_inner(true)
    }

    pub(super) fn write_descriptor(&mut self) -> Result<(), VmdkError> {
        self.write_descriptor_inner(true)
    }

    pub(super) fn write_descriptor_inner(&mut self, durable: bool) -> Result<(), VmdkError> {
        self.writable()?;
        let text = self.descriptor.render();
        if !self.embedded {
            blockferry_durable::replace_file(&self.path, text.as_bytes(), None)?;
            return Ok(());
        }
        let Some(OpenExtent {
            data: ExtentData::Sparse(s),
            ..
        }) = self.extents.first()
        else {
            return Err(corrupt(
                &self.path,
                0,
                "embedded descriptor without a sparse extent",
            ));
        };
        let room = s.header.descriptor_size * SECTOR;
        // Keep at least one NUL so readers find the end.
        if text.len() as u64 >= room {
            return Err(VmdkError::Invalid {
                path: self.path.clone(),
                what: format!(
                    "descriptor of {} bytes does not fit the {room} bytes reserved in the file",
                    text.len()
                ),
            });
        }
        let mut b = vec![0u8; room as usize];
        b[..text.len()].copy_from_slice(text.as_bytes());
        let off = s.header.descriptor_offset * SECTOR;
        s.file.write_all_at(&b, off).map_err(VmdkError::io(
            "write embedded descriptor of",
            &self.path,
            off,
        ))?;
        if !durable {
            return Ok(());
        }
        s.file
            .sync_data()
            .map_err(VmdkError::io("fdatasync", &self.path, 0))
    }
    /// Write `data` at `offset`; durable on return.
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> Result<(), VmdkError> {
        self.apply(&[WriteOp::Data { offset, data }])
    }

    /// Make `len` bytes at `offset` read as zeros; durable on return.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), VmdkError> {
        self.apply(&[WriteOp::Zero { offset, len }])
    }

    /// Apply a batch of writes in order (a later op wins where ops overlap);
    /// durable on return. The whole batch is range-checked before anything is
    /// written. See the [crate docs](crate) for the order of writes in sparse extents.
    pub fn apply(&mut self, ops: &[WriteOp<'_>]) -> Result<(), VmdkError> {
        self.apply_inner(ops, false)
    }
    pub(super) fn apply_inner(
        &mut self,
        ops: &[WriteOp<'_>],
        deferred: bool,
    ) -> Result<(), VmdkError> {
        self.writable()?;
        for op in ops {
            let (offset, len) = match *op {
                WriteOp::Data { offset, data } => (offset, data.len() as u64),
                WriteOp::Zero { offset, len } => (offset, len),
            };
            check_range(&self.path, offset, len, self.size)?;
            let end = offset + len;
            for e in &self.extents {
                if e.start >= end || e.start + e.len <= offset {
                    continue;
                }
                if e.access != Access::Rw || matches!(e.data, ExtentData::Zero) {
                    return Err(VmdkError::Invalid {
                        path: self.path.clone(),
                        what: format!(
                            "bytes {offset}..{end} reach an extent that is {} {}, which cannot be written",
                            e.access.as_str(),
                            if matches!(e.data, ExtentData::Zero) {
                                "ZERO"
                            } else {
                                "data"
                            }
                        ),
                    });
                }
            }
        }
        // Plans per (extent, grain) for sparse extents; flat writes go straight out.
        let mut plans: BTreeMap<(usize, u64), GrainPlan<'_>> = BTreeMap::new();
        let mut dirty_files: Vec<usize> = Vec::new();
        for op in ops {
            let (offset, len, bytes) = match *op {
                WriteOp::Data { offset, data } => (offset, data.len() as u64, Some(data)),
                WriteOp::Zero { offset, len } => (offset, len, None),
            };
            let mut pos = offset;
            let end = offset + len;
            while pos < end {
                let xi = self.extent_index(pos);
                let ext = &self.extents[xi];
                if ext.access != Access::Rw {
                    return Err(VmdkError::ReadOnly {
                        path: self.path.clone(),
                    });
                }
                let in_ext = pos - ext.start;
                let n = (end - pos).min(ext.len - in_ext);
                let piece_of = |from: u64, n: u64| match bytes {
                    Some(b) => {
                        Piece::Bytes(&b[(from - offset) as usize..(from - offset + n) as usize])
                    }
                    None => Piece::Zeros(n as usize),
                };
                match &ext.data {
                    ExtentData::Zero => {
                        return Err(VmdkError::Invalid {
                            path: self.path.clone(),
                            what: format!(
                                "offset {pos} is in a ZERO extent, which cannot be written"
                            ),
                        });
                    }
                    ExtentData::Flat { file, path, base } => {
                        write_piece(file, path, base + in_ext, piece_of(pos, n))?;
                        if !dirty_files.contains(&xi) {
                            dirty_files.push(xi);
                        }
                    }
                    ExtentData::Sparse(s) => {
                        let gb = s.header.grain_bytes();
                        let mut p = in_ext;
                        let stop = in_ext + n;
                        while p < stop {
                            let grain = p / gb;
                            let g_off = p % gb;
                            let m = (stop - p).min(gb - g_off);
                            let vpos = ext.start + p;
                            let piece = piece_of(vpos, m);
                            let whole = g_off == 0 && m == gb;
                            let nothing_to_do = deferred
                                && bytes.is_none()
                                && self.parent.is_none()
                                && !plans.contains_key(&(xi, grain))
                                && matches!(s.lookup(p)?, Grain::Unallocated | Grain::Zero);
                            if nothing_to_do {
                                // Already reads as zeros.
                            } else if whole
                                && bytes.is_none()
                                && s.header.has_zero_grain()
                                && !deferred
                            {
                                plans.insert((xi, grain), GrainPlan::Zero);
                            } else {
                                let mut plan = match plans.remove(&(xi, grain)) {
                                    Some(GrainPlan::Zero) => {
                                        GrainPlan::New(Cow::Owned(vec![0u8; gb as usize]))
                                    }
                                    Some(other) => other,
                                    None => match s.lookup(p)? {
                                        Grain::Data(at) => GrainPlan::InPlace {
                                            at,
                                            pieces: Vec::new(),
                                        },
                                        Grain::Zero => {
                                            GrainPlan::New(Cow::Owned(vec![0u8; gb as usize]))
                                        }
                                        // Compressed extents only open read-only.
                                        Grain::Compressed(_) => {
                                            return Err(VmdkError::ReadOnly {
                                                path: self.path.clone(),
                                            });
                                        }
                                        Grain::Unallocated => match piece {
                                            Piece::Bytes(b) if whole => {
                                                GrainPlan::New(Cow::Borrowed(b))
                                            }
                                            _ => {
                                                let mut buf = vec![0u8; gb as usize];
                                                if !whole {
                                                    self.read_beneath(
                                                        &mut buf,
                                                        ext.start + grain * gb,
                                                        ext.start + ext.len,
                                                    )?;
                                                }
                                                GrainPlan::New(Cow::Owned(buf))
                                            }
                                        },
                                    },
                                };
                                match &mut plan {
                                    GrainPlan::InPlace { at, pieces } => {
                                        pieces.push((*at + g_off, piece))
                                    }
                                    // This very piece is the whole grain.
                                    GrainPlan::New(Cow::Borrowed(b)) if matches!(piece, Piece::Bytes(p) if std::ptr::eq(*b, p)) =>
                                        {}
                                    GrainPlan::New(buf) => {
                                        let dst =
                                            &mut buf.to_mut()[g_off as usize..(g_off + m) as usize];
                                        match piece {
                                            Piece::Bytes(b) => dst.copy_from_slice(b),
                                            Piece::Zeros(_) => dst.fill(0),
                                        }
                                    }
                                    GrainPlan::Zero => {}
                                }
                                plans.insert((xi, grain), plan);
                            }
                            p += m;
                        }
                    }
                }
                pos += n;
            }
        }
        self.execute_plans(plans, &mut dirty_files, deferred)?;
        if deferred {
            return Ok(());
        }
        for xi in dirty_files {
            let (file, path) = match &self.extents[xi].data {
                ExtentData::Flat { file, path, .. } => (file, path),
                ExtentData::Sparse(s) => (&s.file, &s.path),
                ExtentData::Zero => continue,
            };
            file.sync_data()
                .map_err(VmdkError::io("fdatasync", path, 0))?;
        }
        Ok(())
    }
    fn execute_plans(
        &mut self,
        plans: BTreeMap<(usize, u64), GrainPlan<'_>>,
        dirty_files: &mut Vec<usize>,
        deferred: bool,
    ) -> Result<(), VmdkError> {
        // Group by extent; BTreeMap order gives grains ascending per extent.
        let mut by_extent: BTreeMap<usize, Vec<(u64, GrainPlan<'_>)>> = BTreeMap::new();
        for ((xi, g), plan) in plans {
            by_extent.entry(xi).or_default().push((g, plan));
        }
        for (xi, plans) in by_extent {
            let path = self.path.clone();
            let ExtentData::Sparse(s) = &mut self.extents[xi].data else {
                continue;
            };
            if !dirty_files.contains(&xi) {
                dirty_files.push(xi);
            }
            let gb = s.header.grain_bytes();
            // 1. In-place overwrites and the new grains, appended in runs.
            let mut new_entries: Vec<(u64, u32)> = Vec::new();
            let mut run: Vec<u8> = Vec::new();
            let mut run_start = s.next_free;
            for (g, plan) in &plans {
                match plan {
                    GrainPlan::InPlace { pieces, .. } => {
                        for (at, piece) in pieces {
                            write_piece(&s.file, &s.path, *at, *piece)?;
                        }
                    }
                    GrainPlan::New(buf) => {
                        let sector = s.next_free;
                        let s32 = u32::try_from(sector).map_err(|_| {
                            corrupt(
                                &path,
                                sector * SECTOR,
                                "sparse extent is full (2 TiB of sectors)",
                            )
                        })?;
                        if deferred {
                            // Straight from the batch to the page cache.
                            s.file
                                .write_all_at(buf, sector * SECTOR)
                                .map_err(VmdkError::io(
                                    "write grain of",
                                    &s.path,
                                    sector * SECTOR,
                                ))?;
                        } else {
                            run.extend_from_slice(buf);
                        }
                        s.next_free += s.header.grain_size;
                        new_entries.push((*g, s32));
                        if run.len() >= MAX_IO {
                            s.file.write_all_at(&run, run_start * SECTOR).map_err(
                                VmdkError::io("write grains of", &s.path, run_start * SECTOR),
                            )?;
                            run.clear();
                            run_start = s.next_free;
                        }
                    }
                    GrainPlan::Zero => new_entries.push((*g, GTE_ZERO)),
                }
            }
            if !run.is_empty() {
                s.file
                    .write_all_at(&run, run_start * SECTOR)
                    .map_err(VmdkError::io(
                        "write grains of",
                        &s.path,
                        run_start * SECTOR,
                    ))?;
            }
            debug_assert_eq!(gb % SECTOR, 0);
            if new_entries.is_empty() {
                continue;
            }
            if deferred {
                for (g, v) in new_entries {
                    let t = s.set_gte(g, v)?;
                    s.dirty.insert(t);
                }
                continue;
            }
            // 2. Barrier: grain data is durable before any table points at it.
            s.file
                .sync_data()
                .map_err(VmdkError::io("fdatasync", &s.path, 0))?;
            // 3. Table entries, redundant then primary copy.
            let mut touched: Vec<usize> = Vec::new();
            for (g, v) in new_entries {
                let t = s.set_gte(g, v)?;
                if touched.last() != Some(&t) {
                    touched.push(t);
                }
            }
            s.write_gts(&touched)?;
        }
        Ok(())
    }
}
