//! Opening, creating, reading and writing VMDK disks (the I/O half).
//!
//! A [`VmdkImage`] is a descriptor, its extents laid end to end, and
//! optionally a parent image (a sparse delta's `parentFileNameHint`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tracing::debug;

use super::descriptor::{
    Access, AdapterType, CID_NO_PARENT, CreateType, Descriptor, Extent, ExtentKind,
    MAX_DESCRIPTOR_LEN,
};
use super::sparse::{
    self, DEFAULT_DESCRIPTOR_SECTORS, GTE_UNALLOCATED, GTE_ZERO, HEADER_LEN, Layout, SECTOR,
    SparseHeader,
};
use super::{DiskRead, VmdkError, new_cid, new_uuid};

/// Chains deeper than this are refused (it also stops a delta naming itself).
const MAX_CHAIN_DEPTH: usize = 64;
/// Largest single write when streaming new grains.
const MAX_IO: usize = 8 << 20;
static ZEROS: [u8; 64 << 10] = [0u8; 64 << 10];

/// How to open an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    ReadOnly,
    ReadWrite,
}

/// The kinds of disk [`VmdkImage::create`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// `createType="vmfs"`: descriptor + `NAME-flat.vmdk` (what ESXi runs).
    Vmfs,
    /// `createType="monolithicFlat"`: descriptor + `NAME-flat.vmdk`.
    MonolithicFlat,
    /// One thin file with embedded descriptor, 64 KiB grains.
    MonolithicSparse,
}

/// A parent link of a sparse delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLink {
    /// CID of the parent at the time the delta was taken.
    pub cid: u32,
    /// `parentFileNameHint`: path of the parent, relative to the delta's directory or absolute.
    pub file_name_hint: String,
}

/// Options of [`VmdkImage::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes; must be a multiple of 512.
    pub size: u64,
    pub kind: DiskKind,
    pub adapter: AdapterType,
    pub hw_version: u32,
    /// `None`: a fresh CID.
    pub cid: Option<u32>,
    /// `None`: a fresh uuid.
    pub uuid: Option<[u8; 16]>,
    /// Parent of a sparse delta (only with [`DiskKind::MonolithicSparse`]).
    pub parent: Option<ParentLink>,
}

impl CreateOptions {
    /// lsilogic, hardware version 13 (ESXi 6.5 and later), fresh CID and uuid.
    pub fn new(size: u64, kind: DiskKind) -> CreateOptions {
        CreateOptions {
            size,
            kind,
            adapter: AdapterType::LsiLogic,
            hw_version: 13,
            cid: None,
            uuid: None,
            parent: None,
        }
    }
}

/// One operation of a batch given to [`VmdkImage::apply`].
#[derive(Debug, Clone, Copy)]
pub enum WriteOp<'a> {
    /// Write `data` at byte `offset`.
    Data { offset: u64, data: &'a [u8] },
    /// The range reads as zeros afterwards (whole sparse grains become
    /// zeroed-grain entries, which also hide a parent).
    Zero { offset: u64, len: u64 },
}

/// A plain file or block device as a [`DiskRead`] (raw images, models in tests).
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawDisk {
    pub fn open(path: &Path) -> Result<RawDisk, VmdkError> {
        let file = File::open(path).map_err(VmdkError::io("open", path, 0))?;
        let size = file_len(&file, path)?;
        Ok(RawDisk {
            file,
            path: path.to_owned(),
            size,
        })
    }
}

impl DiskRead for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VmdkError> {
        check_range(&self.path, offset, buf.len() as u64, self.size)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(VmdkError::io("read", &self.path, offset))
    }
}

fn file_len(file: &File, path: &Path) -> Result<u64, VmdkError> {
    // Block devices report 0 in metadata; seeking to the end gives their size.
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
        .map_err(VmdkError::io("seek to end of", path, 0))
}

fn check_range(path: &Path, offset: u64, len: u64, size: u64) -> Result<(), VmdkError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(VmdkError::OutOfRange {
            path: path.to_owned(),
            offset,
            len,
            size,
        }),
    }
}

fn corrupt(path: &Path, offset: u64, what: impl Into<String>) -> VmdkError {
    VmdkError::Corrupt {
        path: path.to_owned(),
        offset,
        what: what.into(),
    }
}

fn sync_dir(path: &Path) -> Result<(), VmdkError> {
    let dir = parent_dir(path);
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(VmdkError::io("fsync directory", &dir, 0))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Write a whole file crash-safely: temp file, fsync, rename, fsync the directory.
pub(crate) fn replace_file(path: &Path, contents: &[u8]) -> Result<(), VmdkError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let f = File::create(&tmp).map_err(VmdkError::io("create", &tmp, 0))?;
    f.write_all_at(contents, 0)
        .map_err(VmdkError::io("write", &tmp, 0))?;
    f.sync_all().map_err(VmdkError::io("fsync", &tmp, 0))?;
    std::fs::rename(&tmp, path).map_err(VmdkError::io("rename to", path, 0))?;
    sync_dir(path)
}

/// Where a grain of a sparse extent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grain {
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
    file: File,
    path: PathBuf,
    header: SparseHeader,
    gd: Vec<u32>,
    rgd: Option<Vec<u32>>,
    /// Primary grain tables, loaded on first use.
    gts: Vec<OnceLock<Box<[u32]>>>,
    /// Next free sector for a grain or table (end of file, grain-aligned).
    next_free: u64,
    /// Tables changed in memory by deferred writes, written by `commit`.
    dirty: std::collections::BTreeSet<usize>,
}

impl SparseExtent {
    fn open(
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

    fn read_gt(&self, sector: u64) -> Result<Box<[u32]>, VmdkError> {
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

    fn gt(&self, gd_idx: usize) -> Result<Option<&[u32]>, VmdkError> {
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

    fn lookup(&self, offset: u64) -> Result<Grain, VmdkError> {
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
    fn read_compressed(&self, at: u64, out: &mut [u8]) -> Result<(), VmdkError> {
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
    fn ensure_gt(&mut self, gd_idx: usize) -> Result<(), VmdkError> {
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

    fn set_gte(&mut self, grain: u64, value: u32) -> Result<usize, VmdkError> {
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
    fn write_gts(&self, gd_idxs: &[usize]) -> Result<(), VmdkError> {
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
    fn allocated(&self) -> Result<Vec<Range<u64>>, VmdkError> {
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

#[derive(Debug)]
enum ExtentData {
    Flat {
        file: File,
        path: PathBuf,
        /// Byte offset of the data in the file.
        base: u64,
    },
    Sparse(Box<SparseExtent>),
    Zero,
}

#[derive(Debug)]
struct OpenExtent {
    /// Virtual byte range of the disk this extent holds.
    start: u64,
    len: u64,
    access: Access,
    data: ExtentData,
}

/// An opened (or created) VMDK disk, possibly with a parent chain.
#[derive(Debug)]
pub struct VmdkImage {
    path: PathBuf,
    descriptor: Descriptor,
    /// The descriptor is embedded in extent 0 (monolithicSparse).
    embedded: bool,
    extents: Vec<OpenExtent>,
    parent: Option<Box<VmdkImage>>,
    mode: OpenMode,
    size: u64,
}

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

#[derive(Clone, Copy)]
enum Piece<'a> {
    Bytes(&'a [u8]),
    Zeros(usize),
}

impl VmdkImage {
    /// Open a descriptor file or a monolithic sparse file.
    pub fn open(path: &Path, mode: OpenMode) -> Result<VmdkImage, VmdkError> {
        Self::open_depth(path, mode, 0)
    }

    fn open_file(path: &Path, mode: OpenMode) -> Result<File, VmdkError> {
        OpenOptions::new()
            .read(true)
            .write(mode == OpenMode::ReadWrite)
            .open(path)
            .map_err(VmdkError::io("open", path, 0))
    }

    fn open_depth(path: &Path, mode: OpenMode, depth: usize) -> Result<VmdkImage, VmdkError> {
        if depth > MAX_CHAIN_DEPTH {
            return Err(VmdkError::Invalid {
                path: path.to_owned(),
                what: format!("parent chain is deeper than {MAX_CHAIN_DEPTH} (a loop?)"),
            });
        }
        let file = Self::open_file(path, mode)?;
        let len = file_len(&file, path)?;
        let mut head = vec![0u8; HEADER_LEN.min(len as usize)];
        file.read_exact_at(&mut head, 0)
            .map_err(VmdkError::io("read", path, 0))?;
        let dir = parent_dir(path);
        let (descriptor, embedded, first) = if head.starts_with(b"KDMV") {
            let header = SparseHeader::parse(&head).map_err(|source| VmdkError::Header {
                path: path.to_owned(),
                source,
            })?;
            if header.descriptor_offset == 0 || header.descriptor_size == 0 {
                return Err(VmdkError::Invalid {
                    path: path.to_owned(),
                    what: "is a sparse extent without a descriptor; open the descriptor file that names it".into(),
                });
            }
            let off = header.descriptor_offset * SECTOR;
            let n = (header.descriptor_size * SECTOR).min(MAX_DESCRIPTOR_LEN as u64);
            if off.saturating_add(n) > len {
                return Err(corrupt(
                    path,
                    off,
                    "embedded descriptor runs past the end of the file",
                ));
            }
            let mut b = vec![0u8; n as usize];
            file.read_exact_at(&mut b, off).map_err(VmdkError::io(
                "read embedded descriptor of",
                path,
                off,
            ))?;
            let d = Descriptor::parse_bytes(&b).map_err(|source| VmdkError::Descriptor {
                path: path.to_owned(),
                source,
            })?;
            let ext = SparseExtent::open(file, path, header, mode)?;
            (d, true, Some(ext))
        } else if head.starts_with(b"COWD") {
            return Err(VmdkError::Unsupported {
                path: path.to_owned(),
                what: "ESX sparse (COWD) extent".into(),
            });
        } else {
            if len > MAX_DESCRIPTOR_LEN as u64 {
                return Err(VmdkError::Invalid {
                    path: path.to_owned(),
                    what: format!(
                        "not a VMDK: no KDMV magic and {len} bytes is too big for a descriptor"
                    ),
                });
            }
            let mut b = vec![0u8; len as usize];
            file.read_exact_at(&mut b, 0)
                .map_err(VmdkError::io("read", path, 0))?;
            let d = Descriptor::parse_bytes(&b).map_err(|source| VmdkError::Descriptor {
                path: path.to_owned(),
                source,
            })?;
            (d, false, None)
        };
        match &descriptor.create_type {
            CreateType::Vmfs
            | CreateType::MonolithicFlat
            | CreateType::MonolithicSparse
            | CreateType::TwoGbMaxExtentFlat
            | CreateType::TwoGbMaxExtentSparse => {}
            CreateType::StreamOptimized if mode == OpenMode::ReadOnly => {}
            CreateType::StreamOptimized => {
                return Err(VmdkError::Unsupported {
                    path: path.to_owned(),
                    what: "writing createType streamOptimized (compressed grains)".into(),
                });
            }
            other => {
                return Err(VmdkError::Unsupported {
                    path: path.to_owned(),
                    what: format!("createType {other}"),
                });
            }
        }
        let mut first = first;
        let mut extents = Vec::with_capacity(descriptor.extents.len());
        let mut start = 0u64;
        for (i, e) in descriptor.extents.iter().enumerate() {
            let len = e.sectors * SECTOR;
            let data = match e.kind {
                ExtentKind::Zero => ExtentData::Zero,
                ExtentKind::Flat | ExtentKind::Vmfs => {
                    let p = dir.join(e.file.as_deref().unwrap_or_default());
                    let f = Self::open_file(&p, mode)?;
                    let flen = file_len(&f, &p)?;
                    let base = e.offset * SECTOR;
                    if base.saturating_add(len) > flen {
                        return Err(VmdkError::Invalid {
                            path: p,
                            what: format!(
                                "flat extent is {flen} bytes but the descriptor needs {} (wrong size?)",
                                base.saturating_add(len)
                            ),
                        });
                    }
                    ExtentData::Flat {
                        file: f,
                        path: p,
                        base,
                    }
                }
                ExtentKind::Sparse => {
                    let ext = match first.take() {
                        Some(ext) if i == 0 => ext,
                        _ => {
                            let p = dir.join(e.file.as_deref().unwrap_or_default());
                            let f = Self::open_file(&p, mode)?;
                            let mut h = [0u8; HEADER_LEN];
                            f.read_exact_at(&mut h, 0).map_err(VmdkError::io(
                                "read sparse header of",
                                &p,
                                0,
                            ))?;
                            let header =
                                SparseHeader::parse(&h).map_err(|source| VmdkError::Header {
                                    path: p.clone(),
                                    source,
                                })?;
                            SparseExtent::open(f, &p, header, mode)?
                        }
                    };
                    if ext.header.capacity < e.sectors {
                        return Err(corrupt(
                            &ext.path,
                            12,
                            format!(
                                "sparse extent holds {} sectors but the descriptor says {}",
                                ext.header.capacity, e.sectors
                            ),
                        ));
                    }
                    ExtentData::Sparse(Box::new(ext))
                }
                other => {
                    return Err(VmdkError::Unsupported {
                        path: path.to_owned(),
                        what: format!("extent type {}", other.as_str()),
                    });
                }
            };
            extents.push(OpenExtent {
                start,
                len,
                access: e.access,
                data,
            });
            start = start.checked_add(len).ok_or_else(|| VmdkError::Invalid {
                path: path.to_owned(),
                what: "extents add up to more than 2^64 bytes".into(),
            })?;
        }
        let parent =
            if descriptor.has_parent() {
                let hint = descriptor.parent_file_name_hint.as_deref().ok_or_else(|| {
                    VmdkError::Invalid {
                        path: path.to_owned(),
                        what: "has a parentCID but no parentFileNameHint".into(),
                    }
                })?;
                let ppath = dir.join(hint);
                let parent = Self::open_depth(&ppath, OpenMode::ReadOnly, depth + 1)?;
                if parent.descriptor.cid != descriptor.parent_cid {
                    return Err(VmdkError::ParentCidMismatch {
                        path: path.to_owned(),
                        parent: ppath,
                        expected: descriptor.parent_cid,
                        found: parent.descriptor.cid,
                    });
                }
                Some(Box::new(parent))
            } else {
                None
            };
        debug!(path = %path.display(), create_type = %descriptor.create_type, size = start, "opened vmdk");
        Ok(VmdkImage {
            path: path.to_owned(),
            descriptor,
            embedded,
            extents,
            parent,
            mode,
            size: start,
        })
    }

    /// Create a new disk at `path` (the descriptor, or the single sparse file).
    /// Flat kinds also create `NAME-flat.vmdk` next to it, full size and
    /// thin on the file system. Existing files are refused.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<VmdkImage, VmdkError> {
        if opts.size == 0 || !opts.size.is_multiple_of(SECTOR) {
            return Err(VmdkError::Invalid {
                path: path.to_owned(),
                what: format!("disk size {} is not a positive multiple of 512", opts.size),
            });
        }
        let sectors = opts.size / SECTOR;
        let cid = opts.cid.unwrap_or_else(new_cid);
        let uuid = opts.uuid.unwrap_or_else(new_uuid);
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| VmdkError::Invalid {
                path: path.to_owned(),
                what: "file name is not UTF-8".into(),
            })?;
        if opts.parent.is_some() && opts.kind != DiskKind::MonolithicSparse {
            return Err(VmdkError::Invalid {
                path: path.to_owned(),
                what: "only a monolithicSparse disk can have a parent".into(),
            });
        }
        let new_file = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(p)
                .map_err(VmdkError::io("create", p, 0))
        };
        match opts.kind {
            DiskKind::Vmfs | DiskKind::MonolithicFlat => {
                let stem = name.strip_suffix(".vmdk").unwrap_or(name);
                let flat_name = format!("{stem}-flat.vmdk");
                let flat_path = parent_dir(path).join(&flat_name);
                let (ct, kind) = match opts.kind {
                    DiskKind::Vmfs => (CreateType::Vmfs, ExtentKind::Vmfs),
                    _ => (CreateType::MonolithicFlat, ExtentKind::Flat),
                };
                let mut d = Descriptor::new(
                    ct,
                    vec![Extent {
                        access: Access::Rw,
                        sectors,
                        kind,
                        file: Some(flat_name),
                        offset: 0,
                    }],
                    cid,
                );
                d.set_disk_database(&opts.adapter, opts.hw_version, uuid, true);
                if path.symlink_metadata().is_ok() {
                    return Err(VmdkError::io("create", path, 0)(std::io::Error::from(
                        std::io::ErrorKind::AlreadyExists,
                    )));
                }
                let f = new_file(&flat_path)?;
                f.set_len(opts.size).map_err(VmdkError::io(
                    "set length of",
                    &flat_path,
                    opts.size,
                ))?;
                f.sync_all()
                    .map_err(VmdkError::io("fsync", &flat_path, 0))?;
                drop(f);
                // The descriptor is created last: its presence means the disk is complete.
                replace_file(path, d.render().as_bytes())?;
            }
            DiskKind::MonolithicSparse => {
                let mut d = Descriptor::new(
                    CreateType::MonolithicSparse,
                    vec![Extent {
                        access: Access::Rw,
                        sectors,
                        kind: ExtentKind::Sparse,
                        file: Some(name.to_owned()),
                        offset: 0,
                    }],
                    cid,
                );
                if let Some(p) = &opts.parent {
                    d.parent_cid = p.cid;
                    d.parent_file_name_hint = Some(p.file_name_hint.clone());
                }
                d.set_disk_database(&opts.adapter, opts.hw_version, uuid, true);
                let layout = sparse_layout_for(path, sectors, &d)?;
                let f = new_file(path)?;
                write_new_sparse(&f, path, &layout, &d, None)?;
            }
        }
        sync_dir(path)?;
        Self::open(path, OpenMode::ReadWrite)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    pub fn cid(&self) -> u32 {
        self.descriptor.cid
    }

    pub fn parent(&self) -> Option<&VmdkImage> {
        self.parent.as_deref()
    }

    /// Paths of every file of this disk (descriptor first, then extents),
    /// without the parent chain; for copying or deleting a disk.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut out = vec![self.path.clone()];
        for e in &self.extents {
            let p = match &e.data {
                ExtentData::Flat { path, .. } => path,
                ExtentData::Sparse(s) => &s.path,
                ExtentData::Zero => continue,
            };
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
        out
    }

    /// Virtual byte ranges this image (not its parents) defines: allocated
    /// or zeroed sparse grains, and whole flat extents.
    pub fn allocated_ranges(&self) -> Result<Vec<Range<u64>>, VmdkError> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for e in &self.extents {
            let ranges = match &e.data {
                ExtentData::Flat { .. } => std::iter::once(0..e.len).collect(),
                ExtentData::Zero => vec![],
                ExtentData::Sparse(s) => s.allocated()?,
            };
            for r in ranges {
                let r = (e.start + r.start)..(e.start + r.end.min(e.len));
                match out.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => out.push(r),
                }
            }
        }
        Ok(out)
    }

    /// Set the CID and persist the descriptor durably.
    pub fn set_cid(&mut self, cid: u32) -> Result<(), VmdkError> {
        self.descriptor.set_cid(cid);
        self.write_descriptor()
    }

    /// Link to a parent (sparse deltas) or unlink with `None`, persisting the descriptor.
    pub fn set_parent(&mut self, parent: Option<ParentLink>) -> Result<(), VmdkError> {
        match parent {
            Some(p) => {
                self.descriptor.parent_cid = p.cid;
                self.descriptor.parent_file_name_hint = Some(p.file_name_hint);
            }
            None => {
                self.descriptor.parent_cid = CID_NO_PARENT;
                self.descriptor.parent_file_name_hint = None;
            }
        }
        self.write_descriptor()
    }

    /// Sets the CID in the descriptor; `durable` syncs it, otherwise it is
    /// written in place and the next [`VmdkImage::commit`] syncs it.
    pub(crate) fn set_cid_deferred(&mut self, cid: u32, durable: bool) -> Result<(), VmdkError> {
        self.descriptor.set_cid(cid);
        self.write_descriptor_inner(durable)
    }

    /// After a crash between the two copies of a table update, makes every
    /// redundant grain table equal to its primary: the primary is what
    /// readers use, and the journal's replay redoes what either copy lost.
    /// Returns how many tables were rewritten.
    pub(crate) fn repair_redundant_tables(&mut self) -> Result<usize, VmdkError> {
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

    /// Changes the virtual size of a parentless monolithicSparse disk in
    /// place: the header's capacity and the descriptor's extent line. The
    /// grain directories must have room for the new size (they are laid out
    /// whole sectors at a time, so a disk can grow up to the next multiple of
    /// 128 × 32 MiB); new tables are allocated when first written. Shrinking
    /// is only for undoing an interrupted grow (nothing written past the end).
    pub(crate) fn resize_in_place(&mut self, size: u64) -> Result<(), VmdkError> {
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
        let geo = super::descriptor::Geometry::for_capacity(size / SECTOR, &adapter);
        self.descriptor
            .ddb_set("ddb.geometry.cylinders", geo.cylinders.to_string());
        self.descriptor
            .ddb_set("ddb.geometry.heads", geo.heads.to_string());
        self.descriptor
            .ddb_set("ddb.geometry.sectors", geo.sectors.to_string());
        self.write_descriptor_inner(true)
    }

    fn write_descriptor(&mut self) -> Result<(), VmdkError> {
        self.write_descriptor_inner(true)
    }

    fn write_descriptor_inner(&mut self, durable: bool) -> Result<(), VmdkError> {
        self.writable()?;
        let text = self.descriptor.render();
        if !self.embedded {
            return replace_file(&self.path, text.as_bytes());
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

    fn writable(&self) -> Result<(), VmdkError> {
        if self.mode == OpenMode::ReadWrite {
            Ok(())
        } else {
            Err(VmdkError::ReadOnly {
                path: self.path.clone(),
            })
        }
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
    /// written. See the module docs for the order of writes in sparse extents.
    pub fn apply(&mut self, ops: &[WriteOp<'_>]) -> Result<(), VmdkError> {
        self.apply_inner(ops, false)
    }

    /// Like [`VmdkImage::apply`] for a disk whose writes a redo journal
    /// covers until [`VmdkImage::write_deferred_tables`]: new grains are written, but their
    /// table entries change only in memory (reads see them), and nothing is
    /// synced. Zeros written where a parentless disk has no grain allocate
    /// nothing, and zeros over an allocated grain are written in place, so
    /// a replica that is overwritten forever leaks no grains.
    pub(crate) fn apply_deferred(&mut self, ops: &[WriteOp<'_>]) -> Result<(), VmdkError> {
        self.apply_inner(ops, true)
    }

    /// True when every grain of `[offset, offset + len)` of a parentless
    /// disk is unallocated or zeroed, so the range reads as zeros.
    pub(crate) fn reads_unallocated(&self, offset: u64, len: u64) -> bool {
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

    /// The file of a single-extent sparse disk (for the caller's own syncs).
    pub(crate) fn sparse_file(&self) -> Option<&File> {
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
    /// is not on disk) and after.
    pub(crate) fn write_deferred_tables(&mut self) -> Result<bool, VmdkError> {
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

    fn apply_inner(&mut self, ops: &[WriteOp<'_>], deferred: bool) -> Result<(), VmdkError> {
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

    /// Read what lies beneath this layer (parent or zeros) for virtual bytes
    /// `[at, at + buf.len())`, clipped to `limit` and the parent's size.
    fn read_beneath(&self, buf: &mut [u8], at: u64, limit: u64) -> Result<(), VmdkError> {
        buf.fill(0);
        let Some(parent) = &self.parent else {
            return Ok(());
        };
        let end = (at + buf.len() as u64).min(limit).min(parent.size);
        if end > at {
            parent.read_at(&mut buf[..(end - at) as usize], at)?;
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

    fn extent_index(&self, pos: u64) -> usize {
        // Extents are few (one, or a handful of 2 GiB pieces).
        self.extents
            .iter()
            .position(|e| pos >= e.start && pos < e.start + e.len)
            .unwrap_or(self.extents.len().saturating_sub(1))
    }

    /// fdatasync every extent file (writes through [`VmdkImage::apply`] already are).
    pub fn sync(&self) -> Result<(), VmdkError> {
        for e in &self.extents {
            match &e.data {
                ExtentData::Flat { file, path, .. } => {
                    file.sync_data()
                        .map_err(VmdkError::io("fdatasync", path, 0))?
                }
                ExtentData::Sparse(s) => {
                    s.file
                        .sync_data()
                        .map_err(VmdkError::io("fdatasync", &s.path, 0))?
                }
                ExtentData::Zero => {}
            }
        }
        Ok(())
    }

    fn read_sparse(
        &self,
        ext: &OpenExtent,
        s: &SparseExtent,
        buf: &mut [u8],
        in_ext: u64,
    ) -> Result<(), VmdkError> {
        let gb = s.header.grain_bytes();
        let end = in_ext + buf.len() as u64;
        let mut p = in_ext;
        while p < end {
            let grain = s.lookup(p)?;
            let grain_start = p - p % gb;
            // Coalesce following grains into one read when they continue the
            // same run: contiguous data in the file, or zeros, or beneath.
            let mut q = end.min(grain_start + gb);
            while q < end {
                let follows = match (grain, s.lookup(q)?) {
                    (Grain::Data(a), Grain::Data(b)) => b == a + (q - grain_start),
                    (Grain::Zero, Grain::Zero) => true,
                    (Grain::Unallocated, Grain::Unallocated) => true,
                    _ => false,
                };
                if !follows {
                    break;
                }
                q = end.min(q + gb);
            }
            let dst = &mut buf[(p - in_ext) as usize..(q - in_ext) as usize];
            match grain {
                Grain::Data(at) => {
                    let off = at + (p - grain_start);
                    s.file.read_exact_at(dst, off).map_err(VmdkError::io(
                        "read grain of",
                        &s.path,
                        off,
                    ))?;
                }
                Grain::Compressed(at) => {
                    let mut g = vec![0u8; gb as usize];
                    s.read_compressed(at, &mut g)?;
                    let from = (p - grain_start) as usize;
                    dst.copy_from_slice(&g[from..from + dst.len()]);
                }
                Grain::Zero => dst.fill(0),
                Grain::Unallocated => self.read_beneath(dst, ext.start + p, ext.start + ext.len)?,
            }
            p = q;
        }
        Ok(())
    }
}

fn write_piece(file: &File, path: &Path, at: u64, piece: Piece<'_>) -> Result<(), VmdkError> {
    match piece {
        Piece::Bytes(b) => file
            .write_all_at(b, at)
            .map_err(VmdkError::io("write", path, at)),
        Piece::Zeros(mut n) => {
            let mut at = at;
            while n > 0 {
                let k = n.min(ZEROS.len());
                file.write_all_at(&ZEROS[..k], at)
                    .map_err(VmdkError::io("write", path, at))?;
                at += k as u64;
                n -= k;
            }
            Ok(())
        }
    }
}

/// Lay out a new, empty sparse extent in `file`: zero-filled metadata area
/// (sparse on the file system), tables, directories, descriptor, and the
/// header last so a half-created file is not a valid extent. `gts`, when
/// given, are the grain table entries to store (one per grain), used by
/// export which writes the grains first.
pub(crate) fn write_new_sparse(
    file: &File,
    path: &Path,
    layout: &Layout,
    d: &Descriptor,
    gts: Option<&[u32]>,
) -> Result<(), VmdkError> {
    let text = d.render();
    let h = layout.header;
    let desc_sectors = h.descriptor_size;
    if text.len() as u64 >= desc_sectors * SECTOR {
        return Err(VmdkError::Invalid {
            path: path.to_owned(),
            what: "descriptor does not fit the sectors reserved for it".into(),
        });
    }
    let cur = file_len(file, path)?;
    if cur < h.overhead * SECTOR {
        file.set_len(h.overhead * SECTOR).map_err(VmdkError::io(
            "set length of",
            path,
            h.overhead * SECTOR,
        ))?;
    }
    // The metadata after the descriptor is contiguous: rgd, rgts, gd, gts.
    let meta_start = h.rgd_offset;
    let meta_end = layout.gt_offset + h.num_gd_entries() * h.gt_sectors();
    let mut meta = vec![0u8; ((meta_end - meta_start) * SECTOR) as usize];
    let put_dir = |meta: &mut [u8], at: u64, first_gt: u64| {
        let dir = layout.directory(first_gt);
        let o = ((at - meta_start) * SECTOR) as usize;
        sparse::encode_entries(&dir, &mut meta[o..o + dir.len() * 4]);
    };
    put_dir(&mut meta, h.rgd_offset, layout.rgt_offset);
    put_dir(&mut meta, h.gd_offset, layout.gt_offset);
    if let Some(gts) = gts {
        for first in [layout.rgt_offset, layout.gt_offset] {
            // GTs are contiguous and sector-aligned with 512 entries each, so
            // the entry array maps directly onto them.
            let o = ((first - meta_start) * SECTOR) as usize;
            sparse::encode_entries(gts, &mut meta[o..o + gts.len() * 4]);
        }
    }
    file.write_all_at(&meta, meta_start * SECTOR)
        .map_err(VmdkError::io(
            "write grain directories of",
            path,
            meta_start * SECTOR,
        ))?;
    let mut desc = vec![0u8; (desc_sectors * SECTOR) as usize];
    desc[..text.len()].copy_from_slice(text.as_bytes());
    file.write_all_at(&desc, SECTOR)
        .map_err(VmdkError::io("write descriptor of", path, SECTOR))?;
    file.sync_data()
        .map_err(VmdkError::io("fdatasync", path, 0))?;
    file.write_all_at(&h.encode(), 0)
        .map_err(VmdkError::io("write header of", path, 0))?;
    file.sync_all().map_err(VmdkError::io("fsync", path, 0))
}

/// Layout of a new monolithic sparse file of `sectors` holding descriptor `d`.
pub(crate) fn sparse_layout_for(
    path: &Path,
    sectors: u64,
    d: &Descriptor,
) -> Result<Layout, VmdkError> {
    // Room for the descriptor to grow (CID, parent hint) without moving data.
    let desc_sectors = (d.render().len() as u64 + 1024)
        .div_ceil(SECTOR)
        .max(DEFAULT_DESCRIPTOR_SECTORS);
    let layout = Layout::new(sectors, desc_sectors).map_err(|source| VmdkError::Header {
        path: path.to_owned(),
        source,
    })?;
    // Grain table entries are 32-bit sector numbers: every grain must start
    // below 2 TiB in the file.
    if layout.header.overhead.saturating_add(sectors) > 1 << 32 {
        return Err(VmdkError::Invalid {
            path: path.to_owned(),
            what: format!(
                "a sparse VMDK holds at most 2 TiB, this disk is {} bytes; use a flat (vmfs) disk",
                sectors * SECTOR
            ),
        });
    }
    Ok(layout)
}

impl DiskRead for VmdkImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VmdkError> {
        check_range(&self.path, offset, buf.len() as u64, self.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let ext = &self.extents[self.extent_index(pos)];
            let in_ext = pos - ext.start;
            let n = ((buf.len() - done) as u64).min(ext.len - in_ext) as usize;
            if ext.access == Access::NoAccess {
                return Err(VmdkError::Invalid {
                    path: self.path.clone(),
                    what: format!("offset {pos} is in a NOACCESS extent"),
                });
            }
            let dst = &mut buf[done..done + n];
            match &ext.data {
                ExtentData::Zero => dst.fill(0),
                ExtentData::Flat { file, path, base } => file
                    .read_exact_at(dst, base + in_ext)
                    .map_err(VmdkError::io("read", path, base + in_ext))?,
                ExtentData::Sparse(s) => self.read_sparse(ext, s, dst, in_ext)?,
            }
            done += n;
        }
        Ok(())
    }
}
