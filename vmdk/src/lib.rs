//! VMDK disks, written from scratch: the on-disk format of blockferry's
//! replicas and exports, usable on its own.
//!
//! Pure parsing (no I/O, never panics, fuzzed) lives in [`descriptor`] (the
//! text descriptor) and [`sparse`] (the `KDMV` sparse extent header and its
//! layout). Files are touched only by [`image`] (open, create, read and
//! write a disk), [`export`] (write any disk out as a new VMDK) and
//! [`check`] (the structural checker). qemu-img is the independent oracle
//! of the tests: what this crate writes, qemu-img reads as the same bytes,
//! and what qemu-img writes, this crate reads.
//!
//! # Using it
//!
//! - Create: [`VmdkImage::create`] with [`CreateOptions`] of kind
//!   [`DiskKind::Vmfs`] (descriptor + raw `NAME-flat.vmdk`, what ESXi runs),
//!   [`DiskKind::MonolithicFlat`], or [`DiskKind::MonolithicSparse`] (one
//!   thin file; with [`CreateOptions::parent`] a delta over a parent).
//! - Open: [`VmdkImage::open`] with an [`OpenMode`], or
//!   [`VmdkImage::open_with`] and [`OpenOptions`].
//! - Write: [`VmdkImage::apply`] takes a batch of [`WriteOp`]s (data or
//!   zeroes) and returns once the batch is durable. For sparse extents new
//!   grains are written first, then `fdatasync`, then their entries in the
//!   redundant and primary grain tables, then `fdatasync` again: a crash
//!   leaves a grain either unreferenced (dead space) or fully written, never
//!   a table entry pointing at garbage. Overwrites of grains already
//!   allocated go in place and are as torn as any `pwrite` on a crash.
//! - Journaled writers: [`image::deferred`] defers the grain tables and the
//!   syncs to the caller's checkpoints (what is deferred, what the caller
//!   must do at a checkpoint, what a crash leaves).
//! - CID: [`VmdkImage::set_cid`] after a change (use [`new_cid`]), as VMware
//!   does on its first write after open; descriptor files are replaced by
//!   write-temp, fsync, rename, fsync-dir, embedded descriptors are
//!   rewritten in place within their sectors.
//! - Read anything: [`DiskRead`] (`size`, `read_at`) is implemented by
//!   [`VmdkImage`] (any opened chain; unallocated sparse grains read through
//!   to the parent named by `parentFileNameHint`, or zeros), [`RawDisk`],
//!   and [`ReadFn`] (a size and a closure, for sources defined elsewhere).
//! - Export: [`export::export_flat`], [`export::export_sparse`],
//!   [`export::export_delta`] take any [`DiskRead`], optionally the ranges
//!   that may hold data, and a progress callback.
//! - Check: [`check::check`] returns a [`check::CheckReport`] listing
//!   structural problems `qemu-img check` does not look for.
//!
//! # Paths in descriptors
//!
//! A descriptor names files: its extents, and a delta's parent. Opening a
//! disk reads (or, read-write, writes) those files, so a descriptor that
//! names `/etc/shadow` or `../../elsewhere` is refused with
//! [`VmdkError::PathOutsideDirectory`] unless the caller opens it with
//! [`OpenOptions::allow_external_paths`]. A `..` that stays inside the
//! directory is fine. Everything [`VmdkImage::create`] makes, and every
//! export whose parent is in the same directory, opens with the default.
//!
//! # What is supported
//!
//! Reading: vmfs, monolithicFlat, monolithicSparse, twoGbMaxExtentSparse,
//! twoGbMaxExtentFlat, streamOptimized (compressed grains, also with the
//! directory only in the footer), ZERO extents. Writing: everything but
//! streamOptimized. Not supported, with an error that names the file and
//! the feature: ESX `COWD`/`VMFSSPARSE`, `SESPARSE`, raw device mappings.
//! Sparse disks hold at most 2 TiB (32-bit grain table entries); larger
//! disks are flat. Unix only (positioned reads and writes).
//!
//! # Example
//!
//! ```
//! use blockferry_vmdk::{CreateOptions, DiskKind, DiskRead, OpenMode, VmdkImage, WriteOp};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk0.vmdk");
//! // A thin 8 GiB disk: one file that only holds what was written.
//! let opts = CreateOptions::new(8 << 30, DiskKind::MonolithicSparse);
//! let mut disk = VmdkImage::create(&path, &opts)?;
//! disk.apply(&[
//!     WriteOp::Data { offset: 1 << 20, data: &[0xab; 4096] },
//!     WriteOp::Zero { offset: 2 << 20, len: 1 << 20 },
//! ])?;
//! disk.set_cid(blockferry_vmdk::new_cid())?;
//! drop(disk);
//!
//! let disk = VmdkImage::open(&path, OpenMode::ReadOnly)?;
//! let mut buf = vec![0u8; 4096];
//! disk.read_at(&mut buf, 1 << 20)?;
//! assert_eq!(buf, [0xab; 4096]);
//! // One 64 KiB grain of data, and the zeroed range as zeroed-grain entries
//! // (they would hide a parent's data in a delta).
//! let grain = 64 << 10;
//! assert_eq!(
//!     disk.allocated_ranges()?,
//!     vec![(1 << 20)..(1 << 20) + grain, (2 << 20)..(3 << 20)]
//! );
//! assert!(blockferry_vmdk::check::check(&path)?.is_clean());
//! # Ok(())
//! # }
//! ```

pub mod check;
pub mod descriptor;
pub mod export;
pub mod image;
pub mod sparse;

use std::io;
use std::path::PathBuf;

use thiserror::Error;

pub use descriptor::{AdapterType, CreateType, Descriptor, DescriptorError};
pub use image::{
    CreateOptions, DiskKind, OpenMode, OpenOptions, ParentLink, RawDisk, VmdkImage, WriteOp,
};
pub use sparse::{HeaderError, SparseHeader};

/// Errors of VMDK I/O. Every variant names the file; I/O errors carry the
/// byte offset in that file where it makes sense.
#[derive(Debug, Error)]
pub enum VmdkError {
    /// An I/O call failed: `op` on `path` at byte `offset` of that file.
    #[error("{op} {path} at offset {offset}")]
    Io {
        op: &'static str,
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// The text descriptor of `path` does not parse.
    #[error("bad descriptor in {path}")]
    Descriptor {
        path: PathBuf,
        #[source]
        source: DescriptorError,
    },
    /// The `KDMV` header of the sparse extent `path` does not parse.
    #[error("bad sparse extent header in {path}")]
    Header {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    /// A feature of the format this crate does not implement.
    #[error("{path}: {what} is not supported; convert it with `qemu-img convert -O vmdk`")]
    Unsupported { path: PathBuf, what: String },
    /// The structures of `path` contradict each other or the file.
    #[error("{path}: corrupt at offset {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    /// The parent of a delta is not the disk the delta was taken from.
    #[error(
        "{path}: parent {parent} has CID {found:08x} but parentCID is {expected:08x}; the parent changed after this delta was taken"
    )]
    ParentCidMismatch {
        path: PathBuf,
        parent: PathBuf,
        expected: u32,
        found: u32,
    },
    /// A read or write beyond the virtual size.
    #[error(
        "{path}: access of {len} bytes at offset {offset} is past the end of the disk ({size} bytes)"
    )]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A request or a disk this crate refuses, with the reason in `what`.
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    /// A write to an image opened with [`OpenMode::ReadOnly`].
    #[error("{path}: opened read-only; open it with OpenMode::ReadWrite to write")]
    ReadOnly { path: PathBuf },
    /// A descriptor names a file by absolute path or one that climbs out of
    /// its directory, and the caller did not allow that.
    #[error(
        "{path}: {what} path {named:?} is absolute or leaves the descriptor's directory; move the files beside the descriptor and name them relatively, or, if you trust this image, open it with OpenOptions::allow_external_paths"
    )]
    PathOutsideDirectory {
        path: PathBuf,
        /// `extent` or `parentFileNameHint`.
        what: &'static str,
        /// The path as the descriptor writes it.
        named: String,
    },
    /// A [`DiskRead`] implemented outside this module failed; wrap its error here.
    #[error("reading the source disk at offset {offset}")]
    Source {
        offset: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl From<blockferry_durable::DurableError> for VmdkError {
    fn from(e: blockferry_durable::DurableError) -> VmdkError {
        VmdkError::Io {
            op: e.op,
            path: e.path,
            offset: 0,
            source: e.source,
        }
    }
}

impl VmdkError {
    pub(crate) fn io<'p>(
        op: &'static str,
        path: &'p std::path::Path,
        offset: u64,
    ) -> impl FnOnce(io::Error) -> VmdkError + 'p {
        move |source| VmdkError::Io {
            op,
            path: path.to_owned(),
            offset,
            source,
        }
    }
}

/// Read access to a virtual disk, whatever its format.
pub trait DiskRead {
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` with the disk's bytes at `offset`. Reads past the end are refused.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VmdkError>;
}

impl<T: DiskRead + ?Sized> DiskRead for &T {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VmdkError> {
        (**self).read_at(buf, offset)
    }
}

impl<T: DiskRead + ?Sized> DiskRead for Box<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VmdkError> {
        (**self).read_at(buf, offset)
    }
}

/// A [`DiskRead`] from a size and a closure, for sources defined elsewhere
/// (a recovery point of the store, a block device reader). The closure's
/// error is kept as the source of [`VmdkError::Source`].
pub struct ReadFn<F> {
    size: u64,
    read: F,
}

impl<F> ReadFn<F> {
    /// A disk of `size` bytes whose reads call `read(buf, offset)`.
    pub fn new(size: u64, read: F) -> ReadFn<F> {
        ReadFn { size, read }
    }
}

impl<F> std::fmt::Debug for ReadFn<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadFn").field("size", &self.size).finish()
    }
}

impl<F, E> DiskRead for ReadFn<F>
where
    F: Fn(&mut [u8], u64) -> Result<(), E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), VmdkError> {
        (self.read)(buf, offset).map_err(|e| VmdkError::Source {
            offset,
            source: e.into(),
        })
    }
}

/// A fresh content id. VMware changes the CID on the first write after
/// open; blockferry changes it per applied batch. Never returns
/// [`descriptor::CID_NO_PARENT`].
pub fn new_cid() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut h = blake3::Hasher::new();
    h.update(&nanos.to_le_bytes());
    h.update(&n.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    let b = h.finalize();
    let b = b.as_bytes();
    let cid = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if cid == descriptor::CID_NO_PARENT {
        0xfffe_fffe
    } else {
        cid
    }
}

/// 16 fresh random-looking bytes for `ddb.uuid` (not security relevant).
pub fn new_uuid() -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&new_cid().to_le_bytes());
    h.update(&new_cid().to_le_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}
