//! Writing any [`DiskRead`] out as a new VMDK: flat (vmfs or
//! monolithicFlat), monolithicSparse, or a sparse delta chained by
//! `parentCID` to an earlier export.
//!
//! Exports are written for speed: the source is read in 4 MiB steps, zero
//! detection is per 64 KiB grain, grains are appended in large sequential
//! writes, all grain tables are built in memory and written once at the end,
//! and the sparse header goes last, after an fsync, so an interrupted export
//! is not a valid VMDK. An existing output file is replaced.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use blockferry_durable::parent_dir;

use crate::descriptor::{Access, AdapterType, CreateType, Descriptor, Extent, ExtentKind};
use crate::image::{DiskKind, OpenMode, VmdkImage, sparse_layout_for, write_new_sparse};
use crate::sparse::{GTE_UNALLOCATED, GTE_ZERO, Layout, SECTOR};
use crate::{DiskRead, VmdkError, new_cid, new_uuid};

/// Bytes read from the source per step.
const STEP: u64 = 4 << 20;

/// Disk database and identity of an export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// `ddb.adapterType` (and the geometry that goes with it).
    pub adapter: AdapterType,
    /// `ddb.virtualHWVersion`.
    pub hw_version: u32,
    /// `None`: a fresh CID.
    pub cid: Option<u32>,
    /// `None`: a fresh uuid.
    pub uuid: Option<[u8; 16]>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            adapter: AdapterType::LsiLogic,
            hw_version: 13,
            cid: None,
            uuid: None,
        }
    }
}

/// Progress of an export: bytes of the source examined so far, of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the source examined.
    pub done: u64,
    /// Bytes of the source to examine in all.
    pub total: u64,
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// Files written, descriptor (or the sparse file) first.
    pub files: Vec<PathBuf>,
    /// CID of the new disk (the `parentCID` for a later delta).
    pub cid: u32,
    /// Bytes of data written (non-zero grains, or non-zero flat blocks).
    pub data_bytes: u64,
    /// Grains recorded as zeroed-grain entries (deltas only).
    pub zero_grains: u64,
}

use blockferry_durable::is_zero;

/// Sort, clip to `size`, merge, and optionally widen to `align` boundaries.
fn normalize(ranges: Option<&[Range<u64>]>, size: u64, align: u64) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = match ranges {
        None => std::iter::once(0..size).collect(),
        Some(r) => r
            .iter()
            .map(|r| {
                let s = r.start.min(size) / align * align;
                let e = r
                    .end
                    .min(size)
                    .div_ceil(align)
                    .saturating_mul(align)
                    .min(size);
                s..e
            })
            .filter(|r| r.start < r.end)
            .collect(),
    };
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

fn create_truncate(path: &Path) -> Result<File, VmdkError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(VmdkError::io("create", path, 0))
}

fn file_name(path: &Path) -> Result<&str, VmdkError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| VmdkError::Invalid {
            path: path.to_owned(),
            what: "output file name is not UTF-8".into(),
        })
}

fn check_size(path: &Path, size: u64) -> Result<(), VmdkError> {
    if size == 0 || !size.is_multiple_of(SECTOR) {
        return Err(VmdkError::Invalid {
            path: path.to_owned(),
            what: format!("source size {size} is not a positive multiple of 512"),
        });
    }
    Ok(())
}

/// One step's writes: slices of `buf` and the file offsets they go to.
struct Job {
    buf: Vec<u8>,
    writes: Vec<(Range<usize>, u64)>,
}

/// Steps in flight between the reading and the writing thread.
const DEPTH: usize = 2;

/// The calling thread reads and scans; one helper thread writes. Reading
/// step k+1 overlaps writing step k, which is what keeps an export at the
/// speed of the slower of the two (qemu-img overlaps them with coroutines).
struct Writer {
    tx: std::sync::mpsc::SyncSender<Job>,
    bufs: std::sync::mpsc::Receiver<Vec<u8>>,
    allocated: usize,
}

impl Writer {
    /// A buffer of `len` bytes: new while fewer than DEPTH + 1 exist, else
    /// one the writer has finished with.
    fn buffer(&mut self, len: usize) -> Option<Vec<u8>> {
        if self.allocated <= DEPTH {
            self.allocated += 1;
            return Some(vec![0u8; len]);
        }
        let mut b = self.bufs.recv().ok()?;
        b.resize(len, 0);
        Some(b)
    }

    /// `false` when the writer thread has stopped (its error is reported by `with_writer`).
    fn submit(&mut self, job: Job) -> bool {
        self.tx.send(job).is_ok()
    }
}

fn writer_stopped(path: &Path) -> VmdkError {
    VmdkError::Invalid {
        path: path.to_owned(),
        what: "export writer thread stopped".into(),
    }
}

fn with_writer<R>(
    file: &File,
    path: &Path,
    body: impl FnOnce(&mut Writer) -> Result<R, VmdkError>,
) -> Result<R, VmdkError> {
    std::thread::scope(|scope| {
        let (tx, jobs) = std::sync::mpsc::sync_channel::<Job>(DEPTH);
        let (buf_tx, bufs) = std::sync::mpsc::sync_channel::<Vec<u8>>(DEPTH + 2);
        let handle = scope.spawn(move || -> Result<(), VmdkError> {
            for job in jobs {
                for (r, at) in &job.writes {
                    file.write_all_at(&job.buf[r.clone()], *at)
                        .map_err(VmdkError::io("write", path, *at))?;
                }
                // After the last step the reader is gone; the buffer is then freed.
                drop(buf_tx.send(job.buf));
            }
            Ok(())
        });
        let mut w = Writer {
            tx,
            bufs,
            allocated: 0,
        };
        let result = body(&mut w);
        // Closing the job channel lets the writer finish what is queued and end.
        drop(w);
        let written = handle.join().map_err(|_| writer_stopped(path))?;
        // A write error explains a stopped producer better than the producer's own error.
        written?;
        result
    })
}

/// Export `src` as a flat VMDK: descriptor at `out` plus `NAME-flat.vmdk`
/// (thin on the file system: zero blocks are holes). `kind` is
/// [`DiskKind::Vmfs`] (what ESXi runs) or [`DiskKind::MonolithicFlat`].
/// `ranges`: where `src` may hold data (`None`: everywhere); the rest is
/// written as zeros (holes).
pub fn export_flat(
    src: &dyn DiskRead,
    ranges: Option<&[Range<u64>]>,
    out: &Path,
    kind: DiskKind,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<ExportSummary, VmdkError> {
    let size = src.size();
    check_size(out, size)?;
    let (ct, ek) = match kind {
        DiskKind::Vmfs => (CreateType::Vmfs, ExtentKind::Vmfs),
        DiskKind::MonolithicFlat => (CreateType::MonolithicFlat, ExtentKind::Flat),
        DiskKind::MonolithicSparse => {
            return Err(VmdkError::Invalid {
                path: out.to_owned(),
                what: "export_flat makes flat disks; use export_sparse".into(),
            });
        }
    };
    let name = file_name(out)?;
    let flat_name = format!("{}-flat.vmdk", name.strip_suffix(".vmdk").unwrap_or(name));
    let flat_path = out.with_file_name(&flat_name);
    let f = create_truncate(&flat_path)?;
    f.set_len(size)
        .map_err(VmdkError::io("set length of", &flat_path, size))?;
    let ranges = normalize(ranges, size, SECTOR);
    let total = ranges.iter().map(|r| r.end - r.start).sum();
    const BLOCK: usize = 64 << 10;
    let data_bytes = with_writer(&f, &flat_path, |w| {
        let mut done = 0u64;
        let mut data_bytes = 0u64;
        for r in &ranges {
            let mut pos = r.start;
            while pos < r.end {
                let n = (r.end - pos).min(STEP) as usize;
                let mut buf = w.buffer(n).ok_or_else(|| writer_stopped(&flat_path))?;
                src.read_at(&mut buf, pos)?;
                // Write maximal runs of non-zero 64 KiB blocks; zeros stay holes.
                let mut writes = Vec::new();
                let mut i = 0usize;
                while i < n {
                    let blk = |i: usize| &buf[i..(i + BLOCK).min(n)];
                    if is_zero(blk(i)) {
                        i += BLOCK;
                        continue;
                    }
                    let mut j = i + BLOCK;
                    while j < n && !is_zero(blk(j)) {
                        j += BLOCK;
                    }
                    let j = j.min(n);
                    writes.push((i..j, pos + i as u64));
                    data_bytes += (j - i) as u64;
                    i = j;
                }
                if !w.submit(Job { buf, writes }) {
                    return Err(writer_stopped(&flat_path));
                }
                pos += n as u64;
                done += n as u64;
                progress(Progress { done, total });
            }
        }
        Ok(data_bytes)
    })?;
    f.sync_data()
        .map_err(VmdkError::io("fdatasync", &flat_path, 0))?;
    let cid = opts.cid.unwrap_or_else(new_cid);
    let d = export_descriptor(ct, ek, flat_name, size, cid, opts);
    // The descriptor goes last: once it exists the export is complete.
    blockferry_durable::replace_file(out, d.render().as_bytes(), None)?;
    Ok(ExportSummary {
        files: vec![out.to_owned(), flat_path],
        cid,
        data_bytes,
        zero_grains: 0,
    })
}

/// What to do with an all-zero grain of the source.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ZeroGrains {
    /// Leave unallocated (base disk: reads as zeros).
    Skip,
    /// Record a zeroed-grain entry (delta: hides the parent).
    Mark,
}

fn write_sparse(
    src: &dyn DiskRead,
    ranges: &[Range<u64>],
    out: &Path,
    d: &Descriptor,
    zeros: ZeroGrains,
    progress: &mut dyn FnMut(Progress),
) -> Result<(u64, u64), VmdkError> {
    let size = src.size();
    let layout: Layout = sparse_layout_for(out, size / SECTOR, d)?;
    let h = layout.header;
    let gb = h.grain_bytes();
    let f = create_truncate(out)?;
    let mut gtes = vec![GTE_UNALLOCATED; h.num_grains() as usize];
    let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
    let (data_bytes, zero_grains) = with_writer(&f, out, |w| {
        let mut next = h.overhead;
        let mut done = 0u64;
        let mut data_bytes = 0u64;
        let mut zero_grains = 0u64;
        for r in ranges {
            let mut pos = r.start;
            while pos < r.end {
                let n = (r.end - pos).min(STEP);
                let mut buf = w
                    .buffer(n.next_multiple_of(gb) as usize)
                    .ok_or_else(|| writer_stopped(out))?;
                // The last grain of a disk whose size is not a grain multiple
                // is padded with zeros, as VMware does.
                buf[n as usize..].fill(0);
                src.read_at(&mut buf[..n as usize], pos)?;
                // Non-zero grains are appended in order, so runs of them in
                // the step are runs in the file: one write per run.
                let mut writes: Vec<(Range<usize>, u64)> = Vec::new();
                for (k, g) in buf.chunks_exact(gb as usize).enumerate() {
                    let grain = (pos / gb) as usize + k;
                    if !is_zero(g) {
                        gtes[grain] = u32::try_from(next).map_err(|_| VmdkError::Invalid {
                            path: out.to_owned(),
                            what: "sparse file would pass 2 TiB; export as flat".into(),
                        })?;
                        let from = k * gb as usize;
                        let at = next * SECTOR;
                        match writes.last_mut() {
                            Some((r, _)) if r.end == from => r.end = from + gb as usize,
                            _ => writes.push((from..from + gb as usize, at)),
                        }
                        next += h.grain_size;
                        data_bytes += gb;
                    } else if zeros == ZeroGrains::Mark {
                        gtes[grain] = GTE_ZERO;
                        zero_grains += 1;
                    }
                }
                if !w.submit(Job { buf, writes }) {
                    return Err(writer_stopped(out));
                }
                pos += n;
                done += n;
                progress(Progress { done, total });
            }
        }
        Ok((data_bytes, zero_grains))
    })?;
    // Data first, then (inside write_new_sparse) tables, fsync, header, fsync.
    f.sync_data().map_err(VmdkError::io("fdatasync", out, 0))?;
    write_new_sparse(&f, out, &layout, d, Some(&gtes))?;
    Ok((data_bytes, zero_grains))
}

fn sparse_descriptor(
    out: &Path,
    size: u64,
    cid: u32,
    opts: &ExportOptions,
) -> Result<Descriptor, VmdkError> {
    let file = file_name(out)?.to_owned();
    Ok(export_descriptor(
        CreateType::MonolithicSparse,
        ExtentKind::Sparse,
        file,
        size,
        cid,
        opts,
    ))
}

/// The descriptor of an export: one read-write extent `file` of `size`
/// bytes, and the disk database of `opts`.
fn export_descriptor(
    create_type: CreateType,
    kind: ExtentKind,
    file: String,
    size: u64,
    cid: u32,
    opts: &ExportOptions,
) -> Descriptor {
    let mut d = Descriptor::new(
        create_type,
        vec![Extent {
            access: Access::Rw,
            sectors: size / SECTOR,
            kind,
            file: Some(file),
            offset: 0,
        }],
        cid,
    );
    d.set_disk_database(
        &opts.adapter,
        opts.hw_version,
        opts.uuid.unwrap_or_else(new_uuid),
        true,
    );
    d
}

/// Export `src` as a monolithicSparse VMDK at `out`, with grains only where
/// the data is non-zero. `ranges`: where `src` may hold data (`None`:
/// everywhere); grains outside them are left unallocated.
pub fn export_sparse(
    src: &dyn DiskRead,
    ranges: Option<&[Range<u64>]>,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<ExportSummary, VmdkError> {
    let size = src.size();
    check_size(out, size)?;
    let cid = opts.cid.unwrap_or_else(new_cid);
    let d = sparse_descriptor(out, size, cid, opts)?;
    let ranges = normalize(ranges, size, 64 << 10);
    let (data_bytes, zero_grains) =
        write_sparse(src, &ranges, out, &d, ZeroGrains::Skip, progress)?;
    Ok(ExportSummary {
        files: vec![out.to_owned()],
        cid,
        data_bytes,
        zero_grains,
    })
}

/// Export the grains of `src` that cover `changed` as a monolithicSparse
/// delta at `out` whose parent is the earlier export `parent`: `parentCID`
/// is the parent's CID, `parentFileNameHint` its name (relative when both
/// are in one directory, absolute otherwise). Changed grains that are now
/// all zero become zeroed-grain entries so they hide the parent's data.
///
/// The parent is opened with the default path policy. A delta written into
/// another directory than its parent names the parent by absolute path, so
/// reopening it (or exporting a further delta over it) needs
/// [`OpenOptions::allow_external_paths`](crate::OpenOptions::allow_external_paths);
/// keep a chain in one directory to avoid that.
pub fn export_delta(
    src: &dyn DiskRead,
    changed: &[Range<u64>],
    parent: &Path,
    out: &Path,
    opts: &ExportOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<ExportSummary, VmdkError> {
    let size = src.size();
    check_size(out, size)?;
    let p = VmdkImage::open(parent, OpenMode::ReadOnly)?;
    let hint = parent_hint(parent, out)?;
    if let (Ok(a), Ok(b)) = (parent.canonicalize(), out.canonicalize())
        && a == b
    {
        return Err(VmdkError::Invalid {
            path: out.to_owned(),
            what: "the delta would overwrite its own parent; choose another output path".into(),
        });
    }
    let cid = opts.cid.unwrap_or_else(new_cid);
    let mut d = sparse_descriptor(out, size, cid, opts)?;
    d.parent_cid = p.cid();
    d.parent_file_name_hint = Some(hint);
    drop(p);
    let ranges = normalize(Some(changed), size, 64 << 10);
    let (data_bytes, zero_grains) =
        write_sparse(src, &ranges, out, &d, ZeroGrains::Mark, progress)?;
    Ok(ExportSummary {
        files: vec![out.to_owned()],
        cid,
        data_bytes,
        zero_grains,
    })
}

/// `parentFileNameHint` for `parent` as seen from `out`'s directory.
fn parent_hint(parent: &Path, out: &Path) -> Result<String, VmdkError> {
    let canon = |p: &Path| -> Result<PathBuf, VmdkError> {
        parent_dir(p)
            .canonicalize()
            .map_err(VmdkError::io("resolve directory of", p, 0))
    };
    let pdir = canon(parent)?;
    let odir = canon(out)?;
    let pname = file_name(parent)?;
    if pdir == odir {
        return Ok(pname.to_owned());
    }
    pdir.join(pname)
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| VmdkError::Invalid {
            path: parent.to_owned(),
            what: "parent path is not UTF-8".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_sorts_clips_merges_and_aligns() {
        let r = normalize(Some(&[100..200, 0..10, 5000..9000, 150..300]), 8192, 512);
        assert_eq!(r, vec![0..512, 4608..8192]);
        assert_eq!(normalize(None, 4096, 512), vec![0..4096]);
        let past_end = 9000..9100;
        assert!(normalize(Some(&[past_end]), 8192, 512).is_empty());
    }
}
