//! The one place the target writer calls libc directly: preallocation of the
//! flat extent, so in-place writes of applied batches can never hit ENOSPC,
//! early writeback of those writes, finding never-written ranges, and
//! reflink clones of the flat extent for test failovers.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Allocates `[0, len)` of `file` (extends its size too).
pub fn fallocate(file: &File, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: the fd is owned by `file`, open for the duration of the call;
    // posix_fallocate takes no pointers.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Starts writeback of `[offset, offset + len)` (len 0: to the end of the
/// file) without waiting for it, so
/// that the checkpoint's fdatasync finds little left to write.
pub fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let n = libc::off64_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: the fd is owned by `file` and open for the call; sync_file_range
    // takes no pointers. SYNC_FILE_RANGE_WRITE only initiates writeback.
    let rc =
        unsafe { libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The first offset at or after `offset` that holds data (`SEEK_DATA`), or
/// `None` when there is none. Preallocated, never-written ranges are holes
/// for this purpose (unless the page cache holds data for them). Changes the
/// file position, which the target never uses (all I/O is positional).
pub fn seek_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    let off =
        libc::off64_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: the fd is owned by `file` and open for the call; lseek takes no
    // pointers.
    let rc = unsafe { libc::lseek64(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Makes `dst` share all of `src`'s extents (`FICLONE`, a reflink): O(1) in
/// the file's size on XFS and btrfs. Fails with EOPNOTSUPP, EXDEV or EINVAL
/// where the file system cannot, and the caller copies instead. The kernel
/// writes `src`'s dirty pages back before sharing them.
pub fn ficlone(dst: &File, src: &File) -> io::Result<()> {
    // SAFETY: both fds are owned by their `File`s and open for the call;
    // FICLONE takes the source fd as its integer argument, no pointers.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
