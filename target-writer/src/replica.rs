//! The replica disk of one protected disk: what ESXi would run. Today a
//! `createType="vmfs"` descriptor plus a preallocated raw `-flat.vmdk`
//! extent; the store talks to it only through [`Replica`], so the
//! monolithicSparse (thin) replica plugs in behind the same trait.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::crashsafe::{FaultPlan, read_exact_at};
use crate::error::{Result, TargetError};
use crate::sys;

/// What the store needs from a replica image. Writes need not be durable
/// until `sync`: the redo journal covers them until then.
pub trait Replica: Send + std::fmt::Debug {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write_at(&mut self, faults: &FaultPlan, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every write so far durable.
    fn sync(&mut self, faults: &FaultPlan) -> Result<()>;
    /// Called after each applied group of batches: a chance to start
    /// writeback, so the checkpoint's sync finds little left to write.
    fn start_writeback(&mut self) {}
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

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(TargetError::OutOfRange {
                disk: self.desc_path.display().to_string(),
                offset,
                len: len as u64,
                size: self.size,
            }),
        }
    }

    pub fn flat_path(&self) -> &Path {
        &self.flat_path
    }

    /// Extends the flat extent to `size` bytes, preallocated like at creation
    /// so in-place writes never run out of space, and syncs it. The caller
    /// rewrites the descriptor once the new size is committed.
    pub fn grow(&mut self, faults: &FaultPlan, size: u64) -> Result<()> {
        sys::fallocate(&self.flat, size)
            .map_err(|e| TargetError::io(&self.flat_path, Some(self.size), e))?;
        faults.sync_data(&self.flat, &self.flat_path)?;
        self.size = size;
        Ok(())
    }
}

impl Replica for FlatReplica {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        read_exact_at(&self.flat, &self.flat_path, buf, offset)
    }

    fn write_at(&mut self, faults: &FaultPlan, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        faults.write_at(&self.flat, &self.flat_path, buf, offset)
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

/// The descriptor of a replica: `createType="vmfs"` with one VMFS extent,
/// rendered by the VMDK module. The uuid is derived from `uuid_seed` so that
/// rewriting the descriptor (new CID) keeps the disk's identity.
pub fn vmfs_descriptor(flat_name: &str, size: u64, cid: u32, uuid_seed: &str) -> String {
    use crate::vmdk::descriptor::{Access, CreateType, Descriptor, Extent, ExtentKind};
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&blake3::hash(uuid_seed.as_bytes()).as_bytes()[..16]);
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
