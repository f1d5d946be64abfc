//! Raw file I/O under every image: file and device sizes, range checks,
//! opening by mode, writing zeros without allocating them, and [`RawDisk`].

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::OpenMode;
use crate::descriptor::Descriptor;
use crate::{DiskRead, VmdkError};

/// Reads `len` bytes at `offset` of `file` and parses them as a descriptor
/// (a descriptor file, or the one embedded in a sparse extent).
pub(crate) fn read_descriptor(
    file: &File,
    path: &Path,
    offset: u64,
    len: u64,
    what: &'static str,
) -> Result<Descriptor, VmdkError> {
    let mut b = vec![0u8; len as usize];
    file.read_exact_at(&mut b, offset)
        .map_err(VmdkError::io(what, path, offset))?;
    Descriptor::parse_bytes(&b).map_err(|source| VmdkError::Descriptor {
        path: path.to_owned(),
        source,
    })
}

/// Source of zero bytes for zero writes without an allocation.
static ZEROS: [u8; 64 << 10] = [0u8; 64 << 10];

/// A plain file or block device as a [`DiskRead`] (raw images, models in tests).
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawDisk {
    /// Opens `path` read-only; its size is the file's (or the device's) length.
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

/// Length of a file or block device.
pub(crate) fn file_len(file: &File, path: &Path) -> Result<u64, VmdkError> {
    // Block devices report 0 in metadata; seeking to the end gives their size.
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
        .map_err(VmdkError::io("seek to end of", path, 0))
}

/// Refuses an access of `len` bytes at `offset` that does not lie within `size`.
pub(crate) fn check_range(path: &Path, offset: u64, len: u64, size: u64) -> Result<(), VmdkError> {
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

/// A [`VmdkError::Corrupt`] naming `path` and the byte `offset` in it.
pub(crate) fn corrupt(path: &Path, offset: u64, what: impl Into<String>) -> VmdkError {
    VmdkError::Corrupt {
        path: path.to_owned(),
        offset,
        what: what.into(),
    }
}

/// A piece of a write: bytes of the batch, or zeros.
#[derive(Clone, Copy)]
pub(crate) enum Piece<'a> {
    Bytes(&'a [u8]),
    Zeros(usize),
}

/// Opens an image file, for writing too with [`OpenMode::ReadWrite`].
pub(crate) fn open_file(path: &Path, mode: OpenMode) -> Result<File, VmdkError> {
    fs::OpenOptions::new()
        .read(true)
        .write(mode == OpenMode::ReadWrite)
        .open(path)
        .map_err(VmdkError::io("open", path, 0))
}

/// Writes `piece` at byte `at` of `file`.
pub(crate) fn write_piece(
    file: &File,
    path: &Path,
    at: u64,
    piece: Piece<'_>,
) -> Result<(), VmdkError> {
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
