//! Reading an image: [`DiskRead`] for [`VmdkImage`]. Sparse reads coalesce
//! runs of grains (contiguous data, zeros, or what lies beneath) into one
//! read each.

use std::os::unix::fs::FileExt;

use super::extent::{Grain, SparseExtent};
use super::file::check_range;
use super::{ExtentData, OpenExtent, VmdkImage};
use crate::descriptor::Access;
use crate::{DiskRead, VmdkError};

impl VmdkImage {
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
