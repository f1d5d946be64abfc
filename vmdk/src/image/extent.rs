//! One hosted sparse extent (`KDMV`): its grain directory and redundant
//! directory, grain tables loaded on first use, where each grain is, and
//! the allocation of new tables at the end of the file.

use std::collections::BTreeSet;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::OpenMode;
use super::file::{corrupt, file_len};
use crate::VmdkError;
use crate::sparse::{self, GTE_UNALLOCATED, GTE_ZERO, HEADER_LEN, SECTOR, SparseHeader};

/// Where a grain of a sparse extent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Grain {
    /// Byte offset of the grain in the extent file.
    Data(u64),
    /// Byte offset of the marker of a compressed grain.
    Compressed(u64),
    Zero,
    Unallocated,
}

/// An open hosted sparse extent.
#[derive(Debug)]
pub(crate) struct SparseExtent {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) header: SparseHeader,
    pub(super) gd: Vec<u32>,
    pub(super) rgd: Option<Vec<u32>>,
    /// Primary grain tables, loaded on first use.
    pub(super) gts: Vec<OnceLock<Box<[u32]>>>,
    /// Next free sector for a grain or table (end of file, grain-aligned).
    pub(super) next_free: u64,
    /// Tables changed in memory by deferred writes, written by
    /// [`VmdkImage::write_deferred_tables`](super::VmdkImage::write_deferred_tables).
    pub(super) dirty: BTreeSet<usize>,
}

impl SparseExtent {
    pub(super) fn open(
        file: File,
        path: &Path,
        header: SparseHeader,
        mode: OpenMode,
    ) -> Result<SparseExtent, VmdkError> {
        if header.is_compressed() && mode == OpenMode::ReadWrite {
            return Err(VmdkError::Unsupported {
                path: path.to_owned(),
                what: "writing a streamOptimized (compressed) extent".into(),
            });
        }
        let file_len = file_len(&file, path)?;
        let header = if header.gd_offset == sparse::GD_AT_END {
            // streamOptimized written in one pass: the directory's place is
            // only known at the end, in the footer copy of the header.
            let off = file_len
                .checked_sub(sparse::FOOTER_FROM_END)
                .ok_or_else(|| {
                    corrupt(path, 0, "stream-optimized file is too short for its footer")
                })?;
            let mut b = [0u8; HEADER_LEN];
            file.read_exact_at(&mut b, off)
                .map_err(VmdkError::io("read footer of", path, off))?;
            let footer = SparseHeader::parse(&b).map_err(|source| VmdkError::Header {
                path: path.to_owned(),
                source,
            })?;
            if footer.gd_offset == sparse::GD_AT_END {
                return Err(corrupt(
                    path,
                    off,
                    "footer does not say where the grain directory is",
                ));
            }
            footer
        } else {
            header
        };
        let gd_bytes = header.num_gd_entries() * 4;
        let read_dir = |sector: u64, what: &str| -> Result<Vec<u32>, VmdkError> {
            let off = sector * SECTOR;
            if off.saturating_add(gd_bytes) > file_len {
                return Err(corrupt(
                    path,
                    off,
                    format!(
                        "{what} of {gd_bytes} bytes runs past the end of the file ({file_len} bytes)"
                    ),
                ));
            }
            let mut b = vec![0u8; gd_bytes as usize];
            file.read_exact_at(&mut b, off).map_err(VmdkError::io(
                "read grain directory of",
                path,
                off,
            ))?;
            Ok(sparse::decode_entries(&b))
        };
        let gd = read_dir(header.gd_offset, "grain directory")?;
        let rgd = if header.has_redundant() {
            Some(read_dir(header.rgd_offset, "redundant grain directory")?)
        } else {
            None
        };
        let gts = (0..gd.len()).map(|_| OnceLock::new()).collect();
        let next_free = file_len
            .div_ceil(SECTOR)
            .max(header.overhead)
            .next_multiple_of(header.grain_size);
        Ok(SparseExtent {
            file,
            path: path.to_owned(),
            header,
            gd,
            rgd,
            gts,
            next_free,
            dirty: Default::default(),
        })
    }

    pub(super) fn read_gt(&self, sector: u64) -> Result<Box<[u32]>, VmdkError> {
        let n = self.header.num_gtes_per_gt as usize;
        let mut b = vec![0u8; n * 4];
        let off = sector * SECTOR;
        self.file.read_exact_at(&mut b, off).map_err(VmdkError::io(
            "read grain table of",
            &self.path,
            off,
        ))?;
        Ok(sparse::decode_entries(&b).into_boxed_slice())
    }

    pub(super) fn gt(&self, gd_idx: usize) -> Result<Option<&[u32]>, VmdkError> {
        let Some(&sector) = self.gd.get(gd_idx) else {
            return Ok(None);
        };
        if sector == 0 {
            return Ok(None);
        }
        let cell = &self.gts[gd_idx];
        if let Some(t) = cell.get() {
            return Ok(Some(t));
        }
        let t = self.read_gt(u64::from(sector))?;
        Ok(Some(cell.get_or_init(|| t)))
    }

    pub(super) fn lookup(&self, offset: u64) -> Result<Grain, VmdkError> {
        let (gd_idx, gt_idx) = self.header.locate(offset);
        let Some(gt) = self.gt(gd_idx)? else {
            return Ok(Grain::Unallocated);
        };
        Ok(match gt.get(gt_idx).copied().unwrap_or(GTE_UNALLOCATED) {
            GTE_UNALLOCATED => Grain::Unallocated,
            // Sector 1 is always header or metadata, never a grain: treat a
            // 1 as zeroed even when the flag is missing.
            GTE_ZERO => Grain::Zero,
            s if self.header.is_compressed() => Grain::Compressed(u64::from(s) * SECTOR),
            s => Grain::Data(u64::from(s) * SECTOR),
        })
    }

    /// Read and inflate the compressed grain whose marker is at byte `at`.
    pub(super) fn read_compressed(&self, at: u64, out: &mut [u8]) -> Result<(), VmdkError> {
        let mut m = [0u8; sparse::GRAIN_MARKER_LEN];
        self.file.read_exact_at(&mut m, at).map_err(VmdkError::io(
            "read grain marker of",
            &self.path,
            at,
        ))?;
        let grain_err = |e: sparse::GrainError| corrupt(&self.path, at, e.to_string());
        let (_, size) =
            sparse::parse_grain_marker(&m, self.header.grain_bytes()).map_err(grain_err)?;
        let mut data = vec![0u8; size as usize];
        let off = at + sparse::GRAIN_MARKER_LEN as u64;
        self.file
            .read_exact_at(&mut data, off)
            .map_err(VmdkError::io("read compressed grain of", &self.path, off))?;
        sparse::inflate_grain(&data, out).map_err(grain_err)
    }

    /// Allocate a primary and a redundant table for a GD entry that has none.
    pub(super) fn ensure_gt(&mut self, gd_idx: usize) -> Result<(), VmdkError> {
        if self.gd[gd_idx] != 0 {
            if self.gts[gd_idx].get().is_none() {
                let t = self.read_gt(u64::from(self.gd[gd_idx]))?;
                self.gts[gd_idx] = OnceLock::from(t);
            }
            return Ok(());
        }
        let gt_sectors = self.header.gt_sectors();
        let zero = vec![0u8; (gt_sectors * SECTOR) as usize];
        let primary = self.next_free;
        let redundant = primary + gt_sectors;
        let end = redundant + if self.rgd.is_some() { gt_sectors } else { 0 };
        let to_u32 = |s: u64| {
            u32::try_from(s).map_err(|_| {
                corrupt(
                    &self.path,
                    s * SECTOR,
                    "sparse extent is full (2 TiB of sectors)",
                )
            })
        };
        let (p32, r32) = (to_u32(primary)?, to_u32(redundant)?);
        self.file
            .write_all_at(&zero, primary * SECTOR)
            .map_err(VmdkError::io(
                "write grain table of",
                &self.path,
                primary * SECTOR,
            ))?;
        if self.rgd.is_some() {
            self.file
                .write_all_at(&zero, redundant * SECTOR)
                .map_err(VmdkError::io(
                    "write grain table of",
                    &self.path,
                    redundant * SECTOR,
                ))?;
        }
        // The tables must be durable (zeroed) before a directory points at them.
        self.file
            .sync_data()
            .map_err(VmdkError::io("fdatasync", &self.path, 0))?;
        self.gd[gd_idx] = p32;
        let entry = |v: u32| v.to_le_bytes();
        let off = self.header.gd_offset * SECTOR + gd_idx as u64 * 4;
        self.file
            .write_all_at(&entry(p32), off)
            .map_err(VmdkError::io("write grain directory of", &self.path, off))?;
        if let Some(rgd) = &mut self.rgd {
            rgd[gd_idx] = r32;
            let off = self.header.rgd_offset * SECTOR + gd_idx as u64 * 4;
            self.file
                .write_all_at(&entry(r32), off)
                .map_err(VmdkError::io("write grain directory of", &self.path, off))?;
        }
        self.next_free = end.next_multiple_of(self.header.grain_size);
        self.gts[gd_idx] =
            OnceLock::from(vec![0u32; self.header.num_gtes_per_gt as usize].into_boxed_slice());
        Ok(())
    }

    pub(super) fn set_gte(&mut self, grain: u64, value: u32) -> Result<usize, VmdkError> {
        let per = u64::from(self.header.num_gtes_per_gt);
        let gd_idx = (grain / per) as usize;
        self.ensure_gt(gd_idx)?;
        let t = self.gts[gd_idx]
            .get_mut()
            .ok_or_else(|| corrupt(&self.path, 0, "grain table vanished"))?;
        t[(grain % per) as usize] = value;
        Ok(gd_idx)
    }

    /// Write the given tables to their redundant and primary locations.
    pub(super) fn write_gts(&self, gd_idxs: &[usize]) -> Result<(), VmdkError> {
        let n = self.header.num_gtes_per_gt as usize;
        let mut buf = vec![0u8; n * 4];
        for &i in gd_idxs {
            let Some(t) = self.gts[i].get() else { continue };
            sparse::encode_entries(t, &mut buf);
            if let Some(rgd) = &self.rgd {
                let off = u64::from(rgd[i]) * SECTOR;
                self.file.write_all_at(&buf, off).map_err(VmdkError::io(
                    "write redundant grain table of",
                    &self.path,
                    off,
                ))?;
            }
            let off = u64::from(self.gd[i]) * SECTOR;
            self.file.write_all_at(&buf, off).map_err(VmdkError::io(
                "write grain table of",
                &self.path,
                off,
            ))?;
        }
        Ok(())
    }

    /// Allocated (data or zeroed) grains as byte ranges of the extent.
    pub(super) fn allocated(&self) -> Result<Vec<Range<u64>>, VmdkError> {
        let gb = self.header.grain_bytes();
        let per = u64::from(self.header.num_gtes_per_gt);
        let mut out: Vec<Range<u64>> = Vec::new();
        for gd_idx in 0..self.gd.len() {
            let Some(gt) = self.gt(gd_idx)? else { continue };
            for (j, &e) in gt.iter().enumerate() {
                if e == GTE_UNALLOCATED {
                    continue;
                }
                let start = (gd_idx as u64 * per + j as u64) * gb;
                match out.last_mut() {
                    Some(r) if r.end == start => r.end = start + gb,
                    _ => out.push(start..start + gb),
                }
            }
        }
        Ok(out)
    }
}
