//! Durable file primitives and the fault-injection seam.
//!
//! Every write and sync of the store goes through here, so tests can make the
//! k-th write or sync fail, which is how crash and full-disk paths are
//! exercised without a special device. The durable dance itself (temp file,
//! fsync, rename, directory fsync) is `blockferry-durable`'s; this seam only
//! runs its steps through the counters, so each step can be made to fail.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, TargetError};

/// Which operation of the store should fail. Counting starts at 1; 0 disables.
/// Production code uses the default (no faults).
#[derive(Debug, Default)]
pub struct FaultPlan {
    fail_sync_at: AtomicU64,
    enospc_write_at: AtomicU64,
    syncs: AtomicU64,
    writes: AtomicU64,
}

impl FaultPlan {
    /// The `k`-th sync (fdatasync/fsync) from now fails with EIO.
    pub fn fail_sync_at(&self, k: u64) {
        self.syncs.store(0, Ordering::SeqCst);
        self.fail_sync_at.store(k, Ordering::SeqCst);
    }

    /// The `k`-th write from now fails with ENOSPC, as a full disk would.
    pub fn enospc_write_at(&self, k: u64) {
        self.writes.store(0, Ordering::SeqCst);
        self.enospc_write_at.store(k, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.fail_sync_at.store(0, Ordering::SeqCst);
        self.enospc_write_at.store(0, Ordering::SeqCst);
    }

    fn hit(counter: &AtomicU64, at: &AtomicU64) -> bool {
        let target = at.load(Ordering::SeqCst);
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        target != 0 && n == target
    }

    pub(crate) fn write_at(&self, file: &File, path: &Path, buf: &[u8], offset: u64) -> Result<()> {
        if Self::hit(&self.writes, &self.enospc_write_at) {
            return Err(TargetError::io(
                path,
                Some(offset),
                io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        file.write_all_at(buf, offset)
            .map_err(|e| TargetError::io(path, Some(offset), e))
    }

    pub(crate) fn sync_data(&self, file: &File, path: &Path) -> Result<()> {
        if Self::hit(&self.syncs, &self.fail_sync_at) {
            return Err(TargetError::io(
                path,
                None,
                io::Error::other("injected sync failure"),
            ));
        }
        file.sync_data().map_err(|e| TargetError::io(path, None, e))
    }

    /// Replaces `dir/name` with `bytes` atomically and durably, as
    /// [`blockferry_durable::replace_file`] does, with each write and sync
    /// going through the seam.
    pub(crate) fn write_atomic(&self, dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
        let dst = dir.join(name);
        let tmp = blockferry_durable::temp_path(&dst);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| TargetError::io(&tmp, None, e))?;
        let res = self
            .write_at(&f, &tmp, bytes, 0)
            .and_then(|()| self.sync_data(&f, &tmp));
        if let Err(e) = res {
            // A half-written temp file is harmless (never renamed), but do not leave it.
            if let Err(rm) = std::fs::remove_file(&tmp) {
                tracing::warn!(path = %tmp.display(), error = %rm, "cannot remove temp file");
            }
            return Err(e);
        }
        std::fs::rename(&tmp, &dst).map_err(|e| TargetError::io(&dst, None, e))?;
        self.sync_dir(dir)
    }

    pub(crate) fn sync_dir(&self, dir: &Path) -> Result<()> {
        if Self::hit(&self.syncs, &self.fail_sync_at) {
            return Err(TargetError::io(
                dir,
                None,
                io::Error::other("injected sync failure"),
            ));
        }
        blockferry_durable::sync_dir(dir).map_err(from_durable)
    }
}

/// Creates `dir` and its missing ancestors durably (each new directory's
/// parent fsynced).
pub(crate) fn create_dir_all(dir: &Path) -> Result<()> {
    blockferry_durable::create_dir_all(dir).map_err(from_durable)
}

/// A failed durable step as the target's error, keeping "no space" apart.
pub(crate) fn from_durable(e: blockferry_durable::DurableError) -> TargetError {
    let path: PathBuf = e.path;
    TargetError::io(path, None, e.source)
}

/// Reads exactly `buf.len()` bytes at `offset`.
pub(crate) fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset)
        .map_err(|e| TargetError::io(path, Some(offset), e))
}
