//! Writing a recovery point out as a disk image others can run: raw, a
//! vmfs VMDK (descriptor + `-flat.vmdk`), a monolithicSparse VMDK, or a
//! sparse delta chained to an earlier export by `parentCID`. Reads
//! go through [`PointImage`], so every format sees the same bytes.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use std::ops::Range;

use crate::error::{Result, TargetError};
use crate::store::{DiskStore, PointImage};
use crate::vmdk::export::{ExportOptions, Progress, export_delta, export_flat, export_sparse};
use crate::vmdk::{DiskKind, OpenMode, VmdkImage};

/// Unit of reading and of the zero test: large enough for sequential I/O.
const STEP: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
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
/// called after each step. With `parent` (an earlier sparse or flat export of
/// a point of the same disk, found by its CID), writes a sparse delta holding
/// only the grains that may differ. Returns the files written.
pub fn export_point(
    store: &mut DiskStore,
    point: u64,
    format: ExportFormat,
    out: &Path,
    parent: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<PathBuf>> {
    let changed = match parent {
        None => None,
        Some(parent_path) => {
            if format != ExportFormat::VmdkSparse {
                return Err(TargetError::Unsupported {
                    what: format!("--parent with format {format:?}"),
                    hint: "a delta is always a sparse VMDK: use --format vmdk-sparse".into(),
                });
            }
            let parent_cid = VmdkImage::open(parent_path, OpenMode::ReadOnly)?.cid();
            let Some(older) = store
                .points()
                .iter()
                .find(|p| store.point_cid(p) == parent_cid)
                .map(|p| p.id)
            else {
                return Err(TargetError::Unsupported {
                    what: format!(
                        "{} (CID {parent_cid:08x}) as a parent",
                        parent_path.display()
                    ),
                    hint: "it is not an unmodified export of a recovery point of this disk; export the full point".into(),
                });
            };
            let set = store.changed_between(older, point)?;
            Some(set.iter().map(|(a, b)| a..b).collect::<Vec<Range<u64>>>())
        }
    };
    let meta = store
        .points()
        .iter()
        .find(|p| p.id == point)
        .cloned()
        .ok_or_else(|| TargetError::NoSuchPoint {
            disk: store.disk().to_string(),
            point,
        })?;
    let opts = ExportOptions {
        cid: Some(store.point_cid(&meta)),
        ..ExportOptions::default()
    };
    let img = store.point_image(point)?;
    let mut vprogress = |p: Progress| progress(p.done, p.total);
    let files = match (format, changed) {
        (ExportFormat::Raw, _) => {
            write_raw(&img, out, progress)?;
            vec![out.to_path_buf()]
        }
        (ExportFormat::VmdkFlat, _) => {
            export_flat(&img, None, out, DiskKind::Vmfs, &opts, &mut vprogress)?.files
        }
        (ExportFormat::VmdkSparse, None) => {
            export_sparse(&img, None, out, &opts, &mut vprogress)?.files
        }
        (ExportFormat::VmdkSparse, Some(changed)) => {
            let parent = parent.unwrap_or(out);
            export_delta(&img, &changed, parent, out, &opts, &mut vprogress)?.files
        }
    };
    Ok(files)
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
