//! Writing a recovery point out as a disk image others can run: raw, a
//! vmfs VMDK (descriptor + `-flat.vmdk`), a monolithicSparse VMDK, or a
//! sparse delta chained to an earlier export by `parentCID`. Reads
//! go through one [`PointView`] — of a store opened for the export
//! ([`export_point`]) or of one that keeps being written
//! ([`export_point_live`]) — so every format sees the same bytes.

use std::fs::OpenOptions;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::warn;

use crate::error::{Result, TargetError};
use crate::store::{DiskStore, PointView, lock};
use crate::vmdk::export::{ExportOptions, Progress, export_delta, export_flat, export_sparse};
use crate::vmdk::{DiskKind, DiskRead, OpenMode, VmdkError, VmdkImage};

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

/// What an export takes from the store before reading: the CID the export
/// carries and, for a delta, the ranges that may differ from its parent.
struct Plan {
    cid: u32,
    changed: Option<Vec<Range<u64>>>,
}

fn plan(
    store: &mut DiskStore,
    point: u64,
    format: ExportFormat,
    parent: Option<&Path>,
) -> Result<Plan> {
    let changed = match parent {
        None => None,
        Some(parent_path) => {
            if format != ExportFormat::VmdkSparse {
                return Err(TargetError::Unsupported {
                    what: format!("--parent with format {format:?}"),
                    hint: "a delta is always a sparse VMDK: use --format vmdk-sparse".into(),
                });
            }
            // The user named this parent, and the chain behind it is what earlier
            // exports wrote (absolute paths when it spans directories): follow it.
            let opts = crate::vmdk::OpenOptions::new(OpenMode::ReadOnly).allow_external_paths(true);
            let parent_cid = VmdkImage::open_with(parent_path, opts)?.cid();
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
            Some(set.iter().collect::<Vec<Range<u64>>>())
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
    Ok(Plan {
        cid: store.point_cid(&meta),
        changed,
    })
}

/// Exports point `point` of `store` to `out`; `progress(done, total)` is
/// called after each step. With `parent` (an earlier sparse or flat export of
/// a point of the same disk, found by its CID), writes a sparse delta holding
/// only the grains that may differ. An existing output is replaced; a failed
/// export removes the output files it created. Returns the files written.
pub fn export_point(
    store: &mut DiskStore,
    point: u64,
    format: ExportFormat,
    out: &Path,
    parent: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<PathBuf>> {
    refuse_into_store(store, format, out)?;
    let plan = plan(store, point, format, parent)?;
    let img = store.point_image(point)?;
    write_cleaning_up(&img, &plan, format, out, parent, progress)
}

/// Exports point `point` of a store that keeps being written: the same as
/// [`export_point`], but the store's lock is taken only per read step (a few
/// MiB), so batches, new points and checkpoints go on between the steps.
///
/// Correct because the view of the point is monotone (see
/// [`crate::store::PointView`]): before each step the journalled undo is
/// checkpointed into the open segment and the view indexes what the segments
/// gained since the previous step, so every byte read is the point's. Points
/// are pinned meanwhile, so retention (which rewrites segments) waits for the
/// next point after the export. `cancel` stops the export at the next step
/// (the service shutting down, the client gone); its output is removed.
pub fn export_point_live(
    store: &Mutex<DiskStore>,
    point: u64,
    format: ExportFormat,
    out: &Path,
    parent: Option<&Path>,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<PathBuf>> {
    // Pinned before the plan is made, so the point cannot go in between.
    let _pins = DiskStore::pin_points(store);
    let (plan, view, size) = {
        let mut s = lock(store);
        refuse_into_store(&s, format, out)?;
        let plan = plan(&mut s, point, format, parent)?;
        let view = PointView::new(&s, point)?;
        let size = view.size(&s);
        (plan, view, size)
    };
    let img = LiveImage {
        store,
        view: Mutex::new(view),
        size,
        cancel,
    };
    write_cleaning_up(&img, &plan, format, out, parent, progress)
}

/// A point of a shared store, read one locked step at a time.
struct LiveImage<'a> {
    store: &'a Mutex<DiskStore>,
    view: Mutex<PointView>,
    size: u64,
    cancel: &'a AtomicBool,
}

impl LiveImage<'_> {
    fn step(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(TargetError::Cancelled);
        }
        let mut s = lock(self.store);
        // The open point's undo of batches applied since the last step is in
        // the journal only; the view reads segments.
        s.checkpoint()?;
        let mut v = lock(&self.view);
        v.refresh(&s)?;
        v.read_at(&s, buf, offset)
    }
}

impl DiskRead for LiveImage<'_> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), VmdkError> {
        self.step(buf, offset).map_err(|e| VmdkError::Source {
            offset,
            source: Box::new(e),
        })
    }
}

/// The files an export to `out` writes.
fn outputs(format: ExportFormat, out: &Path) -> Vec<PathBuf> {
    let mut v = vec![out.to_path_buf()];
    if format == ExportFormat::VmdkFlat
        && let Some(name) = out.file_name().and_then(|n| n.to_str())
    {
        let stem = name.strip_suffix(".vmdk").unwrap_or(name);
        v.push(out.with_file_name(format!("{stem}-flat.vmdk")));
    }
    v
}

/// Where `path` lands once symbolic links are followed: its directory
/// resolved, and the file itself when it exists (it may be a link).
fn resolved(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = path.canonicalize() {
        return Some(p);
    }
    // The nearest existing ancestor resolved, the rest as written.
    let mut rest = Vec::new();
    let mut cur = path;
    loop {
        rest.push(cur.file_name()?);
        cur = cur.parent()?;
        let base = if cur.as_os_str().is_empty() {
            Path::new(".")
        } else {
            cur
        };
        if let Ok(mut p) = base.canonicalize() {
            p.extend(rest.iter().rev());
            return Some(p);
        }
    }
}

/// Refuses an export whose output would land in a disk's directory of the
/// store (the replica, its journal, segments or state, of this disk or
/// another) or on the replica itself (a seed outside the store): the export
/// would overwrite what it reads, and the store would be lost.
fn refuse_into_store(store: &DiskStore, format: ExportFormat, out: &Path) -> Result<()> {
    let disk_dir = store
        .dir()
        .canonicalize()
        .unwrap_or_else(|_| store.dir().to_path_buf());
    let root = disk_dir
        .parent()
        .map_or_else(|| disk_dir.clone(), Path::to_path_buf);
    let replica: Vec<PathBuf> = outputs(ExportFormat::VmdkFlat, store.replica_path())
        .iter()
        .filter_map(|p| resolved(p))
        .collect();
    for o in outputs(format, out) {
        let Some(r) = resolved(&o) else { continue };
        // Inside a disk's directory of the store (this disk's or another's),
        // or one of the replica's files wherever they are.
        let in_a_disk = r.starts_with(&root) && r.parent().is_some_and(|p| p != root);
        if in_a_disk || replica.contains(&r) {
            return Err(TargetError::ExportIntoStore {
                out: o,
                store: root,
            });
        }
    }
    Ok(())
}

/// The directory an export is written in before it replaces `out`.
fn staging_dir(out: &Path) -> Result<PathBuf> {
    let name =
        out.file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| TargetError::Unsupported {
                what: format!("exporting to {}", out.display()),
                hint: "give a file name for --out".into(),
            })?;
    Ok(blockferry_durable::parent_dir(out).join(format!(".{name}.partial")))
}

/// Writes the export in a private staging directory next to `out`, with the
/// final file names (a sparse or flat VMDK names its own files), and moves
/// the files into place only once all of them are written and synced: a
/// failed or interrupted export leaves an existing output as it was.
///
/// A delta is written in place: its `parentFileNameHint` is relative to its
/// own directory, so it cannot be staged elsewhere.
fn write_cleaning_up(
    src: &dyn DiskRead,
    plan: &Plan,
    format: ExportFormat,
    out: &Path,
    parent: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<PathBuf>> {
    if plan.changed.is_some() {
        return write_in_place(src, plan, format, out, parent, progress);
    }
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let stage = staging_dir(out)?;
    // A leftover of an interrupted export of the same output.
    match std::fs::remove_dir_all(&stage) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(TargetError::io(&stage, None, e)),
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&stage)
        .map_err(|e| TargetError::io(&stage, None, e))?;
    let name = out.file_name().unwrap_or_default();
    let staged = stage.join(name);
    let r = write_image(src, plan, format, &staged, parent, progress).and_then(|files| {
        let dir = blockferry_durable::parent_dir(out);
        let done: Vec<PathBuf> = files
            .iter()
            .map(|f| dir.join(f.file_name().unwrap_or_default()))
            .collect();
        // The descriptor last: it is what names the others.
        let mut order: Vec<usize> = (0..files.len()).collect();
        order.sort_by_key(|&i| files[i].file_name() == Some(name));
        for i in order {
            let (f, dest) = (&files[i], &done[i]);
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| TargetError::io(f, None, e))?;
            std::fs::rename(f, dest).map_err(|e| TargetError::io(dest, None, e))?;
        }
        blockferry_durable::sync_dir(&dir)
            .map_err(|e| TargetError::io(&dir, None, std::io::Error::other(e.to_string())))?;
        Ok(done)
    });
    match std::fs::remove_dir_all(&stage) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(path = %stage.display(), error = %e, "cannot remove an export's staging directory")
        }
    }
    r
}

fn write_in_place(
    src: &dyn DiskRead,
    plan: &Plan,
    format: ExportFormat,
    out: &Path,
    parent: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<PathBuf>> {
    // Only files this export creates are removed on failure: an existing
    // `out` may be the parent the checks refused to overwrite.
    let created: Vec<PathBuf> = outputs(format, out)
        .into_iter()
        .filter(|p| !p.exists())
        .collect();
    let r = write_image(src, plan, format, out, parent, progress);
    if r.is_err() {
        for p in &created {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %p.display(), error = %e, "cannot remove a failed export's output")
                }
            }
        }
    }
    r
}

fn write_image(
    src: &dyn DiskRead,
    plan: &Plan,
    format: ExportFormat,
    out: &Path,
    parent: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<PathBuf>> {
    let opts = ExportOptions {
        cid: Some(plan.cid),
        ..ExportOptions::default()
    };
    let mut vprogress = |p: Progress| progress(p.done, p.total);
    let files = match (format, &plan.changed) {
        (ExportFormat::Raw, _) => {
            write_raw(src, out, progress)?;
            vec![out.to_path_buf()]
        }
        (ExportFormat::VmdkFlat, _) => {
            export_flat(src, None, out, DiskKind::Vmfs, &opts, &mut vprogress)?.files
        }
        (ExportFormat::VmdkSparse, None) => {
            export_sparse(src, None, out, &opts, &mut vprogress)?.files
        }
        (ExportFormat::VmdkSparse, Some(changed)) => {
            let parent = parent.unwrap_or(out);
            export_delta(src, changed, parent, out, &opts, &mut vprogress)?.files
        }
    };
    Ok(files)
}

/// Writes the point as a raw image; all-zero steps become holes.
pub fn write_raw(img: &dyn DiskRead, out: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
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
