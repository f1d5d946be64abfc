//! The replica disk of one protected disk: what ESXi would run. Either a
//! `createType="vmfs"` descriptor plus a preallocated raw `-flat.vmdk`
//! extent ([`FlatReplica`]), or one thin monolithicSparse file
//! ([`SparseReplica`]) that only holds the grains ever written. A seed is an
//! existing disk outside the store taken as the replica (reprotect: the
//! original disk comes back as the copy the recovered one replicates into):
//! a block device ([`DeviceReplica`]) or an existing VMDK ([`VmdkSeedReplica`]).
//! The store talks to each only through [`Replica`].

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::crashsafe::{FaultPlan, read_exact_at};
use crate::error::{Result, TargetError};
use crate::sys;
use crate::vmdk::{CreateOptions, DiskKind, DiskRead, OpenMode, VmdkImage, WriteOp};

/// What the store needs from a replica image. Writes need not be durable
/// until `sync`: the redo journal covers them until then.
pub trait Replica: Send + std::fmt::Debug {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write_at(&mut self, faults: &FaultPlan, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every write so far durable.
    fn sync(&mut self, faults: &FaultPlan) -> Result<()>;
    /// True when `[offset, offset + len)` is known to read as zeros without
    /// reading it (never written). `false` is always a safe answer.
    fn known_zero(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }
    /// Called after each applied group of batches: a chance to start
    /// writeback, so the checkpoint's sync finds little left to write.
    fn start_writeback(&mut self) {}
    /// Grows the replica to `size` bytes (durable on return); the caller
    /// commits the new size and then rewrites the descriptor with `set_cid`.
    fn grow(&mut self, faults: &FaultPlan, size: u64) -> Result<()>;
    /// Records a new content id in the descriptor. `durable` asks for the
    /// full temp-fsync-rename-fsync dance; otherwise a plain rename (the store
    /// rewrites the descriptor durably on recovery, so a lost update is redone).
    fn set_cid(&mut self, faults: &FaultPlan, cid: u32, durable: bool) -> Result<()>;
    /// The descriptor (the file a user hands to qemu-img or ESXi).
    fn path(&self) -> &Path;
}

#[derive(Debug)]
pub struct FlatReplica {
    dir: PathBuf,
    desc_name: String,
    flat_name: String,
    flat_path: PathBuf,
    desc_path: PathBuf,
    flat: File,
    size: u64,
    uuid_seed: String,
}

pub fn flat_name_for(desc_name: &str) -> String {
    let stem = desc_name.strip_suffix(".vmdk").unwrap_or(desc_name);
    format!("{stem}-flat.vmdk")
}

impl FlatReplica {
    /// Creates the preallocated flat extent and the descriptor.
    pub fn create(
        faults: &FaultPlan,
        dir: &Path,
        desc_name: &str,
        size: u64,
        cid: u32,
        uuid_seed: &str,
    ) -> Result<Self> {
        let flat_name = flat_name_for(desc_name);
        let flat_path = dir.join(&flat_name);
        let flat = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&flat_path)
            .map_err(|e| TargetError::io(&flat_path, None, e))?;
        sys::fallocate(&flat, size).map_err(|e| TargetError::io(&flat_path, Some(0), e))?;
        faults.sync_data(&flat, &flat_path)?;
        let mut r = FlatReplica {
            dir: dir.to_path_buf(),
            desc_name: desc_name.to_string(),
            flat_name,
            desc_path: dir.join(desc_name),
            flat_path,
            flat,
            size,
            uuid_seed: uuid_seed.to_string(),
        };
        r.set_cid(faults, cid, true)?;
        Ok(r)
    }

    pub fn open(dir: &Path, desc_name: &str, size: u64, uuid_seed: &str) -> Result<Self> {
        let flat_name = flat_name_for(desc_name);
        let flat_path = dir.join(&flat_name);
        let flat = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&flat_path)
            .map_err(|e| TargetError::io(&flat_path, None, e))?;
        let actual = flat
            .metadata()
            .map_err(|e| TargetError::io(&flat_path, None, e))?
            .len();
        if actual > size {
            // A grow that crashed before the disk state committed the new
            // size: nothing was written past the old end yet.
            tracing::warn!(path = %flat_path.display(), actual, size, "cutting back an interrupted grow");
            flat.set_len(size)
                .map_err(|e| TargetError::io(&flat_path, Some(size), e))?;
            flat.sync_all()
                .map_err(|e| TargetError::io(&flat_path, None, e))?;
        } else if actual != size {
            return Err(TargetError::corrupt(
                &flat_path,
                None,
                format!("flat extent is {actual} bytes, the disk is {size} bytes"),
            ));
        }
        Ok(FlatReplica {
            dir: dir.to_path_buf(),
            desc_name: desc_name.to_string(),
            flat_name,
            desc_path: dir.join(desc_name),
            flat_path,
            flat,
            size,
            uuid_seed: uuid_seed.to_string(),
        })
    }

    pub fn flat_path(&self) -> &Path {
        &self.flat_path
    }
}

impl Replica for FlatReplica {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.desc_path, self.size, offset, buf.len())?;
        read_exact_at(&self.flat, &self.flat_path, buf, offset)
    }

    fn write_at(&mut self, faults: &FaultPlan, buf: &[u8], offset: u64) -> Result<()> {
        check_range(&self.desc_path, self.size, offset, buf.len())?;
        faults.write_at(&self.flat, &self.flat_path, buf, offset)
    }

    fn known_zero(&self, offset: u64, len: u64) -> bool {
        // A hole up to the end of the range: preallocated and never written.
        match sys::seek_data(&self.flat, offset) {
            Ok(None) => true,
            Ok(Some(data)) => data >= offset.saturating_add(len),
            Err(_) => false,
        }
    }

    fn start_writeback(&mut self) {
        // Overlap the replica's writeback with the next batches instead of
        // stalling on all of it at the checkpoint; once per group, not per
        // chunk (a 4 KiB chunk would cost a syscall and an I/O submission).
        // Only a hint: durability still comes from the checkpoint's sync.
        if let Err(e) = crate::sys::start_writeback(&self.flat, 0, 0) {
            tracing::debug!(path = %self.flat_path.display(), error = %e, "cannot start writeback");
        }
    }

    fn sync(&mut self, faults: &FaultPlan) -> Result<()> {
        faults.sync_data(&self.flat, &self.flat_path)
    }

    /// Extends the flat extent, preallocated like at creation so in-place
    /// writes never run out of space.
    fn grow(&mut self, faults: &FaultPlan, size: u64) -> Result<()> {
        sys::fallocate(&self.flat, size)
            .map_err(|e| TargetError::io(&self.flat_path, Some(self.size), e))?;
        faults.sync_data(&self.flat, &self.flat_path)?;
        self.size = size;
        Ok(())
    }

    fn set_cid(&mut self, faults: &FaultPlan, cid: u32, durable: bool) -> Result<()> {
        let text = vmfs_descriptor(&self.flat_name, self.size, cid, &self.uuid_seed);
        if !durable {
            // Per batch: the CID fields have a fixed width, so the new text
            // has the old length and overwrites it in place — no new inode,
            // no rename, so the journal's fdatasync stays a pure data flush.
            // The text is far smaller than a page; recovery rewrites the
            // descriptor durably in any case.
            let f = OpenOptions::new()
                .write(true)
                .open(&self.desc_path)
                .map_err(|e| TargetError::io(&self.desc_path, None, e))?;
            let len = f
                .metadata()
                .map_err(|e| TargetError::io(&self.desc_path, None, e))?
                .len();
            if len == text.len() as u64 {
                return faults.write_at(&f, &self.desc_path, text.as_bytes(), 0);
            }
        }
        faults.write_atomic(&self.dir, &self.desc_name, text.as_bytes())
    }

    fn path(&self) -> &Path {
        &self.desc_path
    }
}

/// Refuses reads and writes that do not lie within the disk.
fn check_range(disk: &Path, size: u64, offset: u64, len: usize) -> Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(TargetError::OutOfRange {
            disk: disk.display().to_string(),
            offset,
            len: len as u64,
            size,
        }),
    }
}

/// The identity of a replica's disk, the same whenever its descriptor is
/// rewritten.
fn replica_uuid(uuid_seed: &str) -> [u8; 16] {
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&blake3::hash(uuid_seed.as_bytes()).as_bytes()[..16]);
    uuid
}

/// A thin replica: one monolithicSparse file with 64 KiB grains, holding
/// only what was written. Writes go through the VMDK module's deferred mode
/// (the store's redo journal covers them); `sync` writes the new grains,
/// syncs them, and only then points the grain tables at them. A crash
/// before that leaves unreferenced grains at the end of the file (space
/// only; the journal's replay writes the data again).
#[derive(Debug)]
pub struct SparseReplica {
    image: VmdkImage,
    path: PathBuf,
    size: u64,
    /// Bytes written by the current group of batches.
    unflushed: u64,
}

fn vmdk_err(e: crate::vmdk::VmdkError) -> TargetError {
    if let crate::vmdk::VmdkError::Io {
        source,
        path,
        offset,
        ..
    } = &e
        && matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        )
    {
        return TargetError::io(
            path,
            Some(*offset),
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
    }
    TargetError::from(e)
}

impl SparseReplica {
    pub fn create(dir: &Path, name: &str, size: u64, cid: u32, uuid_seed: &str) -> Result<Self> {
        let path = dir.join(name);
        let mut opts = CreateOptions::new(size, DiskKind::MonolithicSparse);
        opts.cid = Some(cid);
        opts.uuid = Some(replica_uuid(uuid_seed));
        let image = VmdkImage::create(&path, &opts).map_err(vmdk_err)?;
        Ok(SparseReplica {
            image,
            path,
            size,
            unflushed: 0,
        })
    }

    pub fn open(dir: &Path, name: &str, size: u64) -> Result<Self> {
        let path = dir.join(name);
        let mut image = VmdkImage::open(&path, OpenMode::ReadWrite).map_err(vmdk_err)?;
        let kind = &image.descriptor().create_type;
        if *kind != crate::vmdk::descriptor::CreateType::MonolithicSparse
            || image.parent().is_some()
            || image.sparse_file().is_none()
        {
            return Err(TargetError::corrupt(
                &path,
                None,
                format!(
                    "a thin replica must be one monolithicSparse extent without a parent, this is {kind}"
                ),
            ));
        }
        let actual = DiskRead::size(&image);
        if actual > size {
            // A grow that crashed before the disk state committed the new
            // size: nothing was written past the old end yet.
            tracing::warn!(path = %path.display(), actual, size, "cutting back an interrupted grow");
            image.resize_in_place(size).map_err(vmdk_err)?;
        } else if actual != size {
            return Err(TargetError::corrupt(
                &path,
                None,
                format!("thin replica is {actual} bytes, the disk is {size} bytes"),
            ));
        }
        image.repair_redundant_tables().map_err(vmdk_err)?;
        Ok(SparseReplica {
            image,
            path,
            size,
            unflushed: 0,
        })
    }

    /// The one sparse extent file (`open` and `create` make sure there is one).
    fn file(&self) -> &File {
        self.image
            .sparse_file()
            .expect("a thin replica is one sparse extent")
    }
}

/// A write into a sparse image: zeros allocate nothing where nothing was
/// written (thin stays thin).
fn write_op(buf: &[u8], offset: u64) -> WriteOp<'_> {
    if blockferry_durable::is_zero(buf) {
        WriteOp::Zero {
            offset,
            len: buf.len() as u64,
        }
    } else {
        WriteOp::Data { offset, data: buf }
    }
}

impl Replica for SparseReplica {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.path, self.size, offset, buf.len())?;
        DiskRead::read_at(&self.image, buf, offset).map_err(vmdk_err)
    }

    fn write_at(&mut self, _faults: &FaultPlan, buf: &[u8], offset: u64) -> Result<()> {
        check_range(&self.path, self.size, offset, buf.len())?;
        let op = write_op(buf, offset);
        self.unflushed += buf.len() as u64;
        self.image.apply_deferred(&[op]).map_err(vmdk_err)
    }

    fn known_zero(&self, offset: u64, len: u64) -> bool {
        self.image.reads_unallocated(offset, len)
    }

    fn start_writeback(&mut self) {
        // As for the flat extent: the new grains head for the disk now, so
        // the checkpoint's barrier finds little left to write. Not after
        // small groups: scattered small writes each allocate a whole
        // 64 KiB grain, and writing those back early only competes with the
        // journal's syncs; the checkpoint writes them in one go.
        let large = self.unflushed >= 1 << 20;
        self.unflushed = 0;
        if !large {
            return;
        }
        if let Err(e) = sys::start_writeback(self.file(), 0, 0) {
            tracing::debug!(path = %self.path.display(), error = %e, "cannot start writeback");
        }
    }

    fn sync(&mut self, faults: &FaultPlan) -> Result<()> {
        // New grains (and the descriptor) first: the barrier before any
        // table points at them. Both syncs go through the fault seam.
        faults.sync_data(self.file(), &self.path)?;
        if self.image.write_deferred_tables().map_err(vmdk_err)? {
            faults.sync_data(self.file(), &self.path)?;
        }
        Ok(())
    }

    fn grow(&mut self, _faults: &FaultPlan, size: u64) -> Result<()> {
        self.image.resize_in_place(size).map_err(vmdk_err)?;
        self.size = size;
        Ok(())
    }

    fn set_cid(&mut self, _faults: &FaultPlan, cid: u32, durable: bool) -> Result<()> {
        self.image.set_cid_deferred(cid, durable).map_err(vmdk_err)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// A block device taken as the replica (a seed). Opened `O_EXCL` while the
/// store is open, so nobody mounts it while the stream writes into it (and
/// the open fails while it is mounted or held by another exclusive opener).
/// A promoted store opens it read-only and shared: the workload owns it then.
/// The device has no descriptor and no CID, and it cannot grow.
#[derive(Debug)]
pub struct DeviceReplica {
    path: PathBuf,
    file: File,
    size: u64,
}

impl DeviceReplica {
    /// Opens the block device at `path`: read-write and exclusive when
    /// `writable`, else read-only and shared.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let mut o = OpenOptions::new();
        o.read(true);
        if writable {
            // O_EXCL without O_CREAT on a block device: an exclusive open
            // that fails with EBUSY while it is mounted or held.
            o.write(true).custom_flags(libc::O_EXCL);
        }
        let mut file = o.open(path).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => TargetError::SeedBusy {
                path: path.to_path_buf(),
            },
            _ => TargetError::io(path, None, e),
        })?;
        let meta = file
            .metadata()
            .map_err(|e| TargetError::io(path, None, e))?;
        if !meta.file_type().is_block_device() {
            return Err(TargetError::NotASeed {
                path: path.to_path_buf(),
                reason: "not a block device".into(),
            });
        }
        // A block device's length is where SEEK_END lands (BLKGETSIZE64).
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| TargetError::io(path, None, e))?;
        Ok(DeviceReplica {
            path: path.to_path_buf(),
            file,
            size,
        })
    }
}

impl Replica for DeviceReplica {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.path, self.size, offset, buf.len())?;
        read_exact_at(&self.file, &self.path, buf, offset)
    }

    fn write_at(&mut self, faults: &FaultPlan, buf: &[u8], offset: u64) -> Result<()> {
        check_range(&self.path, self.size, offset, buf.len())?;
        faults.write_at(&self.file, &self.path, buf, offset)
    }

    fn start_writeback(&mut self) {
        if let Err(e) = sys::start_writeback(&self.file, 0, 0) {
            tracing::debug!(path = %self.path.display(), error = %e, "cannot start writeback");
        }
    }

    fn sync(&mut self, faults: &FaultPlan) -> Result<()> {
        faults.sync_data(&self.file, &self.path)
    }

    fn grow(&mut self, _faults: &FaultPlan, size: u64) -> Result<()> {
        Err(TargetError::SeedCannotGrow {
            path: self.path.clone(),
            size: self.size,
            new_size: size,
        })
    }

    /// A device has no descriptor to carry a content id.
    fn set_cid(&mut self, _faults: &FaultPlan, _cid: u32, _durable: bool) -> Result<()> {
        Ok(())
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// An existing VMDK taken as the replica (a seed): a flat disk (`vmfs` or
/// `monolithicFlat` descriptor and its raw extent) or a `monolithicSparse`
/// file, without a parent, anywhere outside the store. Writes go through the
/// VMDK module's deferred mode (the store's redo journal covers them), like
/// a thin replica's. The descriptor's CID is rewritten only once the stream
/// wrote into the disk, so opening the store leaves the seed untouched.
#[derive(Debug)]
pub struct VmdkSeedReplica {
    image: VmdkImage,
    path: PathBuf,
    size: u64,
    /// Data was written through this handle: the CID must change.
    written: bool,
}

impl VmdkSeedReplica {
    /// Opens the VMDK whose descriptor is `path`, writable when `writable`.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        use crate::vmdk::descriptor::CreateType;
        let mode = if writable {
            OpenMode::ReadWrite
        } else {
            OpenMode::ReadOnly
        };
        let image = VmdkImage::open(path, mode).map_err(vmdk_err)?;
        let kind = &image.descriptor().create_type;
        let shape_ok = matches!(
            kind,
            CreateType::Vmfs | CreateType::MonolithicFlat | CreateType::MonolithicSparse
        );
        if !shape_ok || image.parent().is_some() {
            return Err(TargetError::NotASeed {
                path: path.to_path_buf(),
                reason: format!(
                    "a VMDK seed is a vmfs, monolithicFlat or monolithicSparse disk without a parent, this is {kind}{}; convert it with `qemu-img convert -O vmdk` first",
                    if image.parent().is_some() {
                        " with a parent"
                    } else {
                        ""
                    }
                ),
            });
        }
        if writable {
            // A file cannot be opened exclusively; what would write it behind
            // the stream's back is a loop device over it (a failover's disk).
            for f in image.files() {
                if let Some(device) = loop_device_over(&f) {
                    return Err(TargetError::SeedAttached { path: f, device });
                }
            }
        }
        let size = DiskRead::size(&image);
        let mut r = VmdkSeedReplica {
            image,
            path: path.to_path_buf(),
            size,
            written: false,
        };
        if writable && r.image.sparse_file().is_some() {
            r.image.repair_redundant_tables().map_err(vmdk_err)?;
        }
        Ok(r)
    }
}

impl Replica for VmdkSeedReplica {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.path, self.size, offset, buf.len())?;
        DiskRead::read_at(&self.image, buf, offset).map_err(vmdk_err)
    }

    fn write_at(&mut self, _faults: &FaultPlan, buf: &[u8], offset: u64) -> Result<()> {
        check_range(&self.path, self.size, offset, buf.len())?;
        let op = write_op(buf, offset);
        self.written = true;
        self.image.apply_deferred(&[op]).map_err(vmdk_err)
    }

    fn known_zero(&self, offset: u64, len: u64) -> bool {
        self.image.reads_unallocated(offset, len)
    }

    fn sync(&mut self, _faults: &FaultPlan) -> Result<()> {
        // As for a thin replica: the data first (the barrier before any
        // grain table points at a new grain), then the tables.
        self.image.sync().map_err(vmdk_err)?;
        if self.image.write_deferred_tables().map_err(vmdk_err)? {
            self.image.sync().map_err(vmdk_err)?;
        }
        Ok(())
    }

    fn grow(&mut self, _faults: &FaultPlan, size: u64) -> Result<()> {
        Err(TargetError::SeedCannotGrow {
            path: self.path.clone(),
            size: self.size,
            new_size: size,
        })
    }

    fn set_cid(&mut self, _faults: &FaultPlan, cid: u32, durable: bool) -> Result<()> {
        // A descriptor file is replaced durably on every change: only at
        // checkpoints, not per batch (recovery sets it again after a crash).
        let embedded = self.image.sparse_file().is_some();
        if !self.written || !(durable || embedded) {
            return Ok(());
        }
        self.image.set_cid_deferred(cid, durable).map_err(vmdk_err)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// A loop device whose backing file is `file`, from sysfs (no tool, no root).
fn loop_device_over(file: &Path) -> Option<PathBuf> {
    let file = std::fs::canonicalize(file).ok()?;
    let entries = std::fs::read_dir("/sys/block").ok()?;
    entries.flatten().find_map(|e| {
        let name = e.file_name();
        let name = name.to_str()?;
        if !name.starts_with("loop") {
            return None;
        }
        let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
        (Path::new(backing.trim_end()) == file).then(|| Path::new("/dev").join(name))
    })
}

/// The descriptor of a replica: `createType="vmfs"` with one VMFS extent,
/// rendered by the VMDK module. The uuid is derived from `uuid_seed` so that
/// rewriting the descriptor (new CID) keeps the disk's identity.
pub fn vmfs_descriptor(flat_name: &str, size: u64, cid: u32, uuid_seed: &str) -> String {
    use crate::vmdk::descriptor::{Access, CreateType, Descriptor, Extent, ExtentKind};
    let uuid = replica_uuid(uuid_seed);
    let extent = Extent {
        access: Access::Rw,
        sectors: size / 512,
        kind: ExtentKind::Vmfs,
        file: Some(flat_name.to_string()),
        offset: 0,
    };
    let mut d = Descriptor::new(CreateType::Vmfs, vec![extent], cid);
    d.set_disk_database(&crate::vmdk::AdapterType::LsiLogic, 13, uuid, false);
    d.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_never_written_ranges_are_known_zero() {
        let dir = tempfile::tempdir().unwrap();
        let faults = FaultPlan::default();
        let mut flat = FlatReplica::create(&faults, dir.path(), "f.vmdk", 4 << 20, 1, "s").unwrap();
        let mut thin = SparseReplica::create(dir.path(), "t.vmdk", 4 << 20, 1, "s").unwrap();
        let replicas: [&mut dyn Replica; 2] = [&mut flat, &mut thin];
        for r in replicas {
            assert!(r.known_zero(0, 4 << 20));
            r.write_at(&faults, &[1u8; 4096], 1 << 20).unwrap();
            assert!(!r.known_zero(0, 4 << 20), "{r:?}");
            assert!(!r.known_zero((1 << 20) + 1024, 512), "inside the write");
            assert!(r.known_zero(2 << 20, 1 << 20), "{r:?}");
            r.sync(&faults).unwrap();
            assert!(!r.known_zero(1 << 20, 4096), "after sync: {r:?}");
        }
    }
}
