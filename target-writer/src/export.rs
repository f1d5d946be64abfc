//! Writing a recovery point out as a disk image others can run: raw, a
//! monolithicFlat VMDK (descriptor + `-flat.vmdk`), or a sparse VMDK. Reads
//! go through [`PointImage`], so every format sees the same bytes.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use crate::error::{Result, TargetError};
use crate::replica::{flat_descriptor, flat_name_for};
use crate::store::{DiskStore, PointImage};

/// Unit of reading and of the zero test: large enough for sequential I/O.
const STEP: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Raw,
    VmdkFlat,
    VmdkSparse,
}

impl std::str::FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "raw" => Ok(ExportFormat::Raw),
            "vmdk-flat" => Ok(ExportFormat::VmdkFlat),
            "vmdk-sparse" => Ok(ExportFormat::VmdkSparse),
            _ => Err(format!(
                "unknown format {s:?}: use raw, vmdk-flat or vmdk-sparse"
            )),
        }
    }
}

/// Exports point `point` of `store` to `out`; `progress(done, total)` is
/// called after each step. Returns the files written.
pub fn export_point(
    store: &mut DiskStore,
    point: u64,
    format: ExportFormat,
    out: &Path,
    parent: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<PathBuf>> {
    if parent.is_some() {
        return Err(TargetError::Unsupported {
            what: "export as a delta of an earlier export".into(),
            hint: "export the full point instead".into(),
        });
    }
    let cid = crate::store::content_id(store.disk(), point, 0, 0);
    let seed = format!("{}/export/{point}", store.disk());
    let img = store.point_image(point)?;
    match format {
        ExportFormat::Raw => {
            write_raw(&img, out, progress)?;
            Ok(vec![out.to_path_buf()])
        }
        ExportFormat::VmdkFlat => {
            let name = out.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                TargetError::Unsupported {
                    what: format!("output name {}", out.display()),
                    hint: "use a UTF-8 file name ending in .vmdk".into(),
                }
            })?;
            let flat_name = flat_name_for(name);
            let flat = out.with_file_name(&flat_name);
            write_raw(&img, &flat, progress)?;
            let text =
                flat_descriptor("monolithicFlat", "FLAT", &flat_name, img.size(), cid, &seed);
            write_synced(out, text.as_bytes())?;
            Ok(vec![out.to_path_buf(), flat])
        }
        ExportFormat::VmdkSparse => Err(TargetError::Unsupported {
            what: "sparse VMDK export".into(),
            hint: "use --format vmdk-flat or raw".into(),
        }),
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = File::create(path).map_err(|e| TargetError::io(path, None, e))?;
    f.write_all_at(bytes, 0)
        .map_err(|e| TargetError::io(path, Some(0), e))?;
    f.sync_all().map_err(|e| TargetError::io(path, None, e))
}

/// Writes the point as a raw image; all-zero steps become holes.
pub fn write_raw(
    img: &PointImage<'_>,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let size = img.size();
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(|e| TargetError::io(out, None, e))?;
    f.set_len(size)
        .map_err(|e| TargetError::io(out, Some(size), e))?;
    let mut buf = vec![0u8; STEP];
    let mut off = 0u64;
    while off < size {
        let n = ((size - off) as usize).min(STEP);
        let b = &mut buf[..n];
        img.read_at(b, off)?;
        if b.iter().any(|x| *x != 0) {
            f.write_all_at(b, off)
                .map_err(|e| TargetError::io(out, Some(off), e))?;
        }
        off += n as u64;
        progress(off, size);
    }
    f.sync_all().map_err(|e| TargetError::io(out, None, e))
}
