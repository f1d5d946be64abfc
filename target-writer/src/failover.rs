//! Test failover: a writable copy of a recovery point (a vmfs VMDK that ESXi
//! or qemu runs, optionally attached as a loop device) made while replication
//! goes on, and its cleanup.
//!
//! On XFS or btrfs the copy is a reflink clone of the replica's flat extent
//! (`FICLONE`) with the undo of the newer points written over it, so it costs
//! the changes since the point, not the disk. Elsewhere, and for thin
//! replicas, it is an export of the point.
//!
//! Crash safety: the record `test-failover.json` in the disk's directory is
//! written durably *before* anything is made, naming every file the test
//! failover will create; cleanup works from it (and finds loop devices by
//! their backing file), so a crash at any moment leaves nothing it cannot
//! remove. While the record says the test failover exists, retention keeps
//! its point ([`pinned_points`]).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{Result, TargetError};
use crate::export::{ExportFormat, export_point_live};
use crate::store::{DiskStore, PointMeta, PointView, disk_dir, lock};

/// The record's file name in the disk's directory.
pub const RECORD: &str = "test-failover.json";

/// Unit of copying the undo onto a clone; the store is locked per step.
const STEP: u64 = 4 << 20;

/// Which point a (test) failover uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PointChoice {
    /// The newest point.
    Latest,
    /// The newest crash- or app-consistent point that is complete.
    LatestConsistent,
    Id(u64),
}

impl std::str::FromStr for PointChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "latest" => Ok(PointChoice::Latest),
            "latest-consistent" => Ok(PointChoice::LatestConsistent),
            _ => s.parse().map(PointChoice::Id).map_err(|_| {
                format!("bad point {s:?}: use latest, latest-consistent or a point id")
            }),
        }
    }
}

impl TryFrom<String> for PointChoice {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<PointChoice> for String {
    fn from(p: PointChoice) -> String {
        match p {
            PointChoice::Latest => "latest".into(),
            PointChoice::LatestConsistent => "latest-consistent".into(),
            PointChoice::Id(id) => id.to_string(),
        }
    }
}

/// How the copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMethod {
    Reflink,
    Export,
}

/// Where a test failover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TestState {
    /// Being made (or interrupted while being made: clean it up).
    Preparing,
    Running,
    CleanedUp,
}

impl TestState {
    pub fn name(self) -> &'static str {
        match self {
            TestState::Preparing => "preparing",
            TestState::Running => "running",
            TestState::CleanedUp => "cleaned-up",
        }
    }
}

/// The durable record of a disk's test failover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestFailover {
    pub disk: String,
    pub point: u64,
    pub started_ms: u64,
    pub state: TestState,
    /// The directory the disk was written to.
    pub out: PathBuf,
    /// Whether the test failover created `out` (then cleanup removes it).
    pub created_out: bool,
    /// The descriptor to run (ESXi, qemu).
    pub descriptor: PathBuf,
    /// The raw extent beside it (what a loop device is attached to).
    pub flat: PathBuf,
    pub method: Option<CopyMethod>,
    #[serde(default)]
    pub loop_device: Option<PathBuf>,
    /// Seconds from the request to a writable disk.
    #[serde(default)]
    pub ready_secs: Option<f64>,
    #[serde(default)]
    pub cleaned_ms: Option<u64>,
}

/// A test failover to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFailoverRequest {
    pub disk: String,
    pub point: PointChoice,
    /// Absolute: the service runs in another directory than the client.
    pub out: PathBuf,
    #[serde(default)]
    pub attach: bool,
    /// Use a point cut while the replica was incomplete.
    #[serde(default)]
    pub force: bool,
}

/// The record of `disk`'s test failover under the store `root`, if any.
pub fn read_record(root: &Path, disk: &str) -> Result<Option<TestFailover>> {
    read_record_in(&disk_dir(root, disk)?)
}

fn read_record_in(dir: &Path) -> Result<Option<TestFailover>> {
    let path = dir.join(RECORD);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| TargetError::corrupt(&path, None, e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TargetError::io(&path, None, e)),
    }
}

fn write_record(dir: &Path, rec: &TestFailover) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(rec).map_err(|e| TargetError::EncodeState {
        path: dir.join(RECORD),
        reason: e.to_string(),
    })?;
    blockferry_durable::replace_file(&dir.join(RECORD), &bytes, None)
        .map_err(crate::crashsafe::from_durable)
}

/// Points of the disk in `dir` that a test failover holds: retention keeps them.
pub fn pinned_points(dir: &Path) -> Result<Vec<u64>> {
    Ok(read_record_in(dir)?
        .filter(|r| r.state != TestState::CleanedUp)
        .map(|r| r.point)
        .into_iter()
        .collect())
}

/// The point `choice` names among `points`, checked: an incomplete point
/// only with `force`.
pub fn choose_point(store: &DiskStore, choice: PointChoice, force: bool) -> Result<PointMeta> {
    let points = store.points();
    let id = match choice {
        PointChoice::Id(id) => id,
        PointChoice::Latest => points.last().map(|p| p.id).ok_or_else(|| no_point(store))?,
        PointChoice::LatestConsistent => points
            .iter()
            .rev()
            .find(|p| !p.incomplete && p.label != blockferry_proto::Consistency::NotConsistent)
            .map(|p| p.id)
            .ok_or_else(|| TargetError::Unsupported {
                what: format!("a consistent point of disk {}", store.disk()),
                hint: "none exists yet: name a point by id, or use latest".into(),
            })?,
    };
    store.usable_point(id, force).cloned()
}

fn no_point(store: &DiskStore) -> TargetError {
    TargetError::Unsupported {
        what: format!("a recovery point of disk {}", store.disk()),
        hint: "the disk has none yet; wait for the first point".into(),
    }
}

/// Makes a test failover of a store that keeps being written (the service's,
/// or one opened for this call): writes the record, clones or exports the
/// point into `req.out`, attaches a loop device if asked. `now_ms` stamps it.
pub fn test_failover(
    store: &Mutex<DiskStore>,
    req: &TestFailoverRequest,
    now_ms: u64,
    cancel: &AtomicBool,
) -> Result<TestFailover> {
    let started = std::time::Instant::now();
    // Pinned first: the point cannot go while it is chosen and copied.
    let _pins = DiskStore::pin_points(store);
    let (dir, point, flat_src, rec) = {
        let s = lock(store);
        if let Some(r) = read_record_in(s.dir())?
            && r.state != TestState::CleanedUp
        {
            return Err(TargetError::Unsupported {
                what: format!(
                    "a second test failover of disk {} (point {} in {} is {})",
                    r.disk,
                    r.point,
                    r.out.display(),
                    r.state.name()
                ),
                hint: format!(
                    "remove it first with `blockferry-target failover --cleanup --disk {}`",
                    r.disk
                ),
            });
        }
        let point = choose_point(&s, req.point, req.force)?;
        let dir = s.dir().to_path_buf();
        let descriptor = req.out.join(format!("{}.vmdk", req.disk));
        let flat = req
            .out
            .join(crate::replica::flat_name_for(&format!("{}.vmdk", req.disk)));
        for f in [&descriptor, &flat] {
            if f.exists() {
                return Err(TargetError::Exists {
                    disk: req.disk.clone(),
                    path: f.clone(),
                });
            }
        }
        let rec = TestFailover {
            disk: req.disk.clone(),
            point: point.id,
            started_ms: now_ms,
            state: TestState::Preparing,
            out: req.out.clone(),
            created_out: !req.out.exists(),
            descriptor,
            flat,
            method: None,
            loop_device: None,
            ready_secs: None,
            cleaned_ms: None,
        };
        // Durable before anything is made, so cleanup finds it after a
        // crash; written under the store's lock, so a second request sees it.
        write_record(&dir, &rec)?;
        (dir, point, s.flat_extent_path(), rec)
    };
    let disk = req.disk.clone();
    match make(store, req, rec, &point, flat_src.as_deref(), now_ms, cancel) {
        Ok(mut rec) => {
            rec.ready_secs = Some(started.elapsed().as_secs_f64());
            rec.state = TestState::Running;
            write_record(&dir, &rec)?;
            info!(disk, point = point.id, method = ?rec.method, secs = rec.ready_secs, "test failover running");
            Ok(rec)
        }
        Err(e) => {
            // Leave nothing half made; the record says what to remove.
            if let Err(c) = cleanup_in(&dir, &disk, now_ms) {
                warn!(disk, error = %c, "cannot remove a failed test failover; run failover --cleanup");
            }
            Err(e)
        }
    }
}

/// The copy (clone or export) and the loop device of a test failover whose
/// record is written.
fn make(
    store: &Mutex<DiskStore>,
    req: &TestFailoverRequest,
    mut rec: TestFailover,
    point: &PointMeta,
    flat_src: Option<&Path>,
    now_ms: u64,
    cancel: &AtomicBool,
) -> Result<TestFailover> {
    let disk = &req.disk;
    let (descriptor, flat) = (rec.descriptor.clone(), rec.flat.clone());
    crate::crashsafe::create_dir_all(&req.out)?;
    let cloned = match flat_src {
        Some(src) => clone_point(store, point.id, src, &flat)?,
        None => false,
    };
    if cloned {
        let (size, cid) = {
            let s = lock(store);
            (point.size.unwrap_or(s.size()), s.point_cid(point))
        };
        let flat_name = crate::replica::flat_name_for(&format!("{disk}.vmdk"));
        let seed = format!("test-failover/{disk}/{now_ms}");
        let text = crate::replica::vmfs_descriptor(&flat_name, size, cid, &seed);
        blockferry_durable::replace_file(&descriptor, text.as_bytes(), None)
            .map_err(crate::crashsafe::from_durable)?;
        rec.method = Some(CopyMethod::Reflink);
    } else {
        export_point_live(
            store,
            point.id,
            ExportFormat::VmdkFlat,
            &descriptor,
            None,
            cancel,
            &mut |_, _| {},
        )?;
        rec.method = Some(CopyMethod::Export);
    }
    if req.attach {
        rec.loop_device = Some(attach_loop(&flat)?);
        // Recorded at once: cleanup also finds it by its backing file.
        let dir = lock(store).dir().to_path_buf();
        write_record(&dir, &rec)?;
    }
    Ok(rec)
}

/// Reflinks the replica's flat extent to `dst` and writes the undo of the
/// points newer than `id` over it. Returns false (and leaves no `dst`) when
/// the file system cannot share extents.
fn clone_point(store: &Mutex<DiskStore>, id: u64, src: &Path, dst: &Path) -> Result<bool> {
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| TargetError::io(dst, None, e))?;
    let (view, size) = {
        let mut s = lock(store);
        // The open point's undo goes from the journal to its segment, and the
        // replica's writes to the file, so replica and segments agree at
        // this instant: the clone is the replica now, the view says where
        // the point differs from it.
        s.checkpoint()?;
        let input = std::fs::File::open(src).map_err(|e| TargetError::io(src, None, e))?;
        if let Err(e) = crate::sys::ficlone(&out, &input) {
            drop(s);
            let unsupported = matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY)
            );
            std::fs::remove_file(dst).map_err(|e| TargetError::io(dst, None, e))?;
            if unsupported {
                info!(error = %e, "no reflink here; the test failover is an export");
                return Ok(false);
            }
            return Err(TargetError::io(dst, None, e));
        }
        let mut view = PointView::new(&s, id)?;
        view.refresh(&s)?;
        let size = view.size(&s);
        (view, size)
    };
    out.set_len(size)
        .map_err(|e| TargetError::io(dst, Some(size), e))?;
    // Every range of the cover is saved undo (segments, which the pin keeps),
    // never the replica, so reading it later in steps is still the point.
    let ranges: Vec<_> = view.differs_from_replica().iter().collect();
    let mut buf = Vec::new();
    for r in ranges {
        let end = r.end.min(size);
        let mut at = r.start;
        while at < end {
            let n = (end - at).min(STEP);
            buf.resize(n as usize, 0);
            view.read_at(&lock(store), &mut buf, at)?;
            use std::os::unix::fs::FileExt;
            out.write_all_at(&buf, at)
                .map_err(|e| TargetError::io(dst, Some(at), e))?;
            at += n;
        }
    }
    out.sync_all().map_err(|e| TargetError::io(dst, None, e))?;
    Ok(true)
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| TargetError::Unsupported {
            what: format!("running {program}: {e}"),
            hint: format!("install {program} (util-linux)"),
        })?;
    if !out.status.success() {
        return Err(TargetError::Unsupported {
            what: format!(
                "{program} {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            hint: "run as root, or leave out --attach".into(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| TargetError::Unsupported {
        what: format!("the path {}", p.display()),
        hint: "use a UTF-8 path".into(),
    })
}

fn attach_loop(flat: &Path) -> Result<PathBuf> {
    let dev = run("losetup", &["--find", "--show", path_str(flat)?])?;
    Ok(PathBuf::from(dev.trim()))
}

/// Loop devices whose backing file is `flat` (`losetup -j`).
fn loops_of(flat: &Path) -> Result<Vec<String>> {
    if !flat.exists() {
        return Ok(Vec::new());
    }
    // Without losetup nothing can have been attached (--attach needs it too),
    // and a cleanup must not fail for a tool it does not need.
    let probe = Command::new("losetup").arg("--version").output();
    if probe.is_err() {
        return Ok(Vec::new());
    }
    let out = run("losetup", &["-j", path_str(flat)?])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(':').next())
        .filter(|d| d.starts_with("/dev/"))
        .map(str::to_string)
        .collect())
}

/// Removes everything the test failover of `disk` made: its loop devices,
/// its files, its directory if it created it; then marks the record cleaned
/// up, which releases the point. Works after a crash at any step, and again.
pub fn cleanup(root: &Path, disk: &str, now_ms: u64) -> Result<TestFailover> {
    cleanup_in(&disk_dir(root, disk)?, disk, now_ms)
}

fn cleanup_in(dir: &Path, disk: &str, now_ms: u64) -> Result<TestFailover> {
    let Some(mut rec) = read_record_in(dir)? else {
        return Err(TargetError::Unsupported {
            what: format!("cleaning up disk {disk}"),
            hint: "it has no test failover; start one with `blockferry-target failover --test`"
                .into(),
        });
    };
    if rec.state == TestState::CleanedUp {
        return Ok(rec);
    }
    for dev in loops_of(&rec.flat)? {
        run("losetup", &["-d", &dev])?;
        info!(disk, device = dev, "loop device detached");
    }
    for f in [&rec.descriptor, &rec.flat] {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(TargetError::io(f, None, e)),
        }
    }
    if rec.created_out {
        match std::fs::remove_dir(&rec.out) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %rec.out.display(), error = %e, "test failover directory left in place (not empty)")
            }
        }
    }
    if let Some(parent) = rec.out.parent()
        && parent.exists()
    {
        blockferry_durable::sync_dir(parent).map_err(crate::crashsafe::from_durable)?;
    }
    rec.state = TestState::CleanedUp;
    rec.cleaned_ms = Some(now_ms);
    write_record(dir, &rec)?;
    info!(disk, point = rec.point, "test failover cleaned up");
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_choices_parse_and_print_back() {
        for (text, p) in [
            ("latest", PointChoice::Latest),
            ("latest-consistent", PointChoice::LatestConsistent),
            ("42", PointChoice::Id(42)),
        ] {
            assert_eq!(text.parse::<PointChoice>().unwrap(), p);
            assert_eq!(String::from(p), text);
        }
        assert!("newest".parse::<PointChoice>().is_err());
        assert!("-1".parse::<PointChoice>().is_err());
    }
}
