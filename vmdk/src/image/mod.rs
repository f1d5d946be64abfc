//! Opening, creating, reading and writing VMDK disks (the I/O half).
//!
//! A [`VmdkImage`] is a descriptor, its extents laid end to end, and
//! optionally a parent image (a sparse delta's `parentFileNameHint`). This
//! module holds the types and the accessors; each job has its own file:
//!
//! - `file`: raw file I/O shared by the rest (sizes, range checks, zero
//!   writes) and [`RawDisk`];
//! - `extent`: one hosted sparse extent (grain directory and tables);
//! - `open`: reading a descriptor and opening its extents, with the paths
//!   confined to the descriptor's directory ([`OpenOptions`]);
//! - `chain`: the parent link of a delta ([`ParentLink`]) and reads through it;
//! - `create`: new disks, and the layout of a new sparse file;
//! - `write`: batches of writes ([`VmdkImage::apply`]), the descriptor, resize;
//! - [`deferred`]: the deferred grain tables a journaled writer uses;
//! - `read`: [`DiskRead`](crate::DiskRead) for an image.

mod chain;
mod create;
pub mod deferred;
mod extent;
mod file;
mod open;
mod read;
mod write;

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::VmdkError;
use crate::descriptor::{Access, AdapterType, Descriptor};

pub use chain::ParentLink;
pub(crate) use create::{sparse_layout_for, write_new_sparse};
use extent::SparseExtent;
pub use file::RawDisk;
pub(crate) use file::read_descriptor;
pub(crate) use open::confined;

/// How to open an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Reads only; the files are opened read-only.
    ReadOnly,
    /// Reads and writes (never of a parent: a chain's parents open read-only).
    ReadWrite,
}

/// How [`VmdkImage::open_with`] opens an image: the mode, and whether the
/// descriptor may name files outside its own directory.
///
/// A descriptor is data, and the paths in it (extent files,
/// `parentFileNameHint`) make the opener read, or with
/// [`OpenMode::ReadWrite`] write, the files they name. By default a path
/// that is absolute or climbs out of the descriptor's directory with `..` is
/// refused with [`VmdkError::PathOutsideDirectory`], so a descriptor from
/// elsewhere cannot make this crate read `/etc/shadow` as a flat extent.
/// Every disk this crate creates, and every export whose parent sits in the
/// same directory, names its files relative to that directory and opens
/// with the default. Allow external paths only for images whose origin you
/// trust, e.g. a delta exported next to a parent in another directory
/// (which names the parent by absolute path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Read-only, or read-write.
    pub mode: OpenMode,
    /// Follow extent and parent paths that are absolute or leave the
    /// descriptor's directory. Off by default.
    pub allow_external_paths: bool,
}

impl OpenOptions {
    /// `mode`, with paths confined to each descriptor's directory.
    pub fn new(mode: OpenMode) -> OpenOptions {
        OpenOptions {
            mode,
            allow_external_paths: false,
        }
    }

    /// Allows (or again refuses) extent and parent paths that are absolute
    /// or leave the descriptor's directory.
    pub fn allow_external_paths(mut self, allow: bool) -> OpenOptions {
        self.allow_external_paths = allow;
        self
    }
}

impl From<OpenMode> for OpenOptions {
    fn from(mode: OpenMode) -> OpenOptions {
        OpenOptions::new(mode)
    }
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

/// Options of [`VmdkImage::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes; must be a multiple of 512.
    pub size: u64,
    /// What files the disk is made of.
    pub kind: DiskKind,
    /// `ddb.adapterType` (and the geometry that goes with it).
    pub adapter: AdapterType,
    /// `ddb.virtualHWVersion`.
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
    Data {
        /// Virtual byte offset.
        offset: u64,
        /// The bytes; any length, any alignment.
        data: &'a [u8],
    },
    /// The range reads as zeros afterwards (whole sparse grains become
    /// zeroed-grain entries, which also hide a parent).
    Zero {
        /// Virtual byte offset.
        offset: u64,
        /// Bytes that read as zeros afterwards.
        len: u64,
    },
}

/// What backs one extent of a disk.
#[derive(Debug)]
pub(crate) enum ExtentData {
    Flat {
        file: File,
        path: PathBuf,
        /// Byte offset of the data in the file.
        base: u64,
    },
    Sparse(Box<SparseExtent>),
    Zero,
}

/// One extent line of the descriptor, opened.
#[derive(Debug)]
pub(crate) struct OpenExtent {
    /// Virtual byte range of the disk this extent holds.
    pub(crate) start: u64,
    pub(crate) len: u64,
    pub(crate) access: Access,
    pub(crate) data: ExtentData,
}

/// An opened (or created) VMDK disk, possibly with a parent chain.
#[derive(Debug)]
pub struct VmdkImage {
    pub(crate) path: PathBuf,
    pub(crate) descriptor: Descriptor,
    /// The descriptor is embedded in extent 0 (monolithicSparse).
    pub(crate) embedded: bool,
    pub(crate) extents: Vec<OpenExtent>,
    pub(crate) parent: Option<Box<VmdkImage>>,
    pub(crate) mode: OpenMode,
    /// Virtual size in bytes: the extents' sizes added up.
    pub(crate) size: u64,
}

impl VmdkImage {
    /// The file it was opened by: the descriptor, or the sparse file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed descriptor, as last written.
    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    /// The content id (`CID`) of this disk; a delta's `parentCID` pins it.
    pub fn cid(&self) -> u32 {
        self.descriptor.cid
    }

    /// The opened parent of a delta.
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

    pub(crate) fn writable(&self) -> Result<(), VmdkError> {
        if self.mode == OpenMode::ReadWrite {
            Ok(())
        } else {
            Err(VmdkError::ReadOnly {
                path: self.path.clone(),
            })
        }
    }

    pub(crate) fn extent_index(&self, pos: u64) -> usize {
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
}
