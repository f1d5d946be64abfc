//! Failover: a writable disk made of a recovery point (a vmfs VMDK that ESXi
//! or qemu runs, optionally attached as a loop device on this host).
//!
//! - [`test`](mod@test): the non-disruptive drill. The copy is thrown away by
//!   `failover --cleanup`; replication goes on untouched.
//! - [`real`]: the failover. The copy becomes the disk the workload runs on,
//!   and the replica is promoted at the point ([`crate::DiskStore::promote_at`]):
//!   its former source is fenced. The point can change until `--commit`.
//!
//! Both make the disk alike (`make_disk`): on XFS or btrfs a reflink clone
//! of the replica's flat extent (`FICLONE`) with the undo of the newer points
//! written over it, so it costs the changes since the point, not the disk;
//! elsewhere, and for thin replicas, an export of the point. Each keeps a
//! durable record in the disk's directory (`test-failover.json`,
//! `failover.json`), written before anything is made and naming every file
//! it makes, so that a crash at any step leaves nothing that cannot be
//! removed or finished. While a record holds a point, retention keeps it
//! ([`pinned_points`]).

pub mod real;
pub mod test;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{Result, TargetError};
use crate::export::{ExportFormat, export_point_live};
use crate::store::{DiskStore, PointMeta, PointView, lock};

pub use real::{
    CommitRequest, Failover, FailoverError, FailoverRequest, FailoverState, FailoverSummary,
    commit, failover, point_seq,
};
pub use test::{
    RECORD, TestFailover, TestFailoverRequest, TestState, cleanup, read_record, test_failover,
};

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

/// Where a disk is in the DR cycle, as `points` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrState {
    /// Replicated; no failover of any kind.
    Protected,
    /// A test failover exists (being made or running).
    TestFailover,
    /// A failover was asked for and has not finished (rerun it).
    FailingOver,
    FailedOver,
    Committed,
    /// Promoted with `promote`, not by a failover.
    Promoted,
}

impl DrState {
    pub fn name(self) -> &'static str {
        match self {
            DrState::Protected => "protected",
            DrState::TestFailover => "test-failover",
            DrState::FailingOver => "failing-over",
            DrState::FailedOver => "failed-over",
            DrState::Committed => "committed",
            DrState::Promoted => "promoted",
        }
    }
}

/// A disk's role and DR state, read from its records (the store need not
/// be opened: it works while `serve` holds it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrStatus {
    pub disk: String,
    /// The copy's role in its generation record (`replica`, `source`, `seed`).
    pub role: Option<String>,
    pub state: DrState,
    /// The point of the test failover or failover, if any.
    pub point: Option<u64>,
    /// Since when (Unix milliseconds): the test failover's start, the
    /// promotion, or the commit.
    pub since_ms: Option<u64>,
    pub failover: Option<Failover>,
    pub test_failover: Option<TestFailover>,
}

/// The DR status of `disk` in the store at `root`.
pub fn dr_status(root: &Path, disk: &str) -> Result<DrStatus> {
    let dir = crate::store::disk_dir(root, disk)?;
    let path = dir.join(crate::store::generation::RECORD);
    let role = match std::fs::read(&path) {
        Ok(bytes) => Some(
            blockferry_proto::GenerationRecord::decode(&bytes)
                .map_err(|e| TargetError::corrupt(&path, None, e.to_string()))?
                .role()
                .to_string(),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(TargetError::io(&path, None, e)),
    };
    let fo = real::read_record_in(&dir)?;
    let tf = test::read_record_in(&dir)?;
    let (state, point, since_ms) = match (&fo, &tf) {
        (Some(f), _) if f.state == FailoverState::Committed => {
            (DrState::Committed, Some(f.point), f.committed_ms)
        }
        (Some(f), _) if f.is_promoted() => (DrState::FailedOver, Some(f.point), f.failed_over_ms),
        (Some(f), _) => (DrState::FailingOver, Some(f.point), Some(f.started_ms)),
        (None, Some(t)) if t.state != TestState::CleanedUp => {
            (DrState::TestFailover, Some(t.point), Some(t.started_ms))
        }
        _ if role.as_deref() == Some("source") => (DrState::Promoted, None, None),
        _ => (DrState::Protected, None, None),
    };
    Ok(DrStatus {
        disk: disk.to_string(),
        role,
        state,
        point,
        since_ms,
        failover: fo,
        test_failover: tf,
    })
}

/// Points of the disk in `dir` that a test failover or a failover holds:
/// retention keeps them.
pub fn pinned_points(dir: &Path) -> Result<Vec<u64>> {
    let mut pinned: Vec<u64> = test::read_record_in(dir)?
        .filter(|r| r.state != TestState::CleanedUp)
        .map(|r| r.point)
        .into_iter()
        .collect();
    pinned.extend(real::read_record_in(dir)?.map(|r| r.point));
    Ok(pinned)
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

/// The descriptor and flat extent of `disk`'s writable disk in `out`.
pub fn disk_paths(out: &Path, disk: &str) -> (PathBuf, PathBuf) {
    let name = format!("{disk}.vmdk");
    (
        out.join(&name),
        out.join(crate::replica::flat_name_for(&name)),
    )
}

/// Makes the writable disk of `point` as `descriptor` + `flat` (in `out`,
/// created if missing): a reflink clone where the file system shares
/// extents, else an export. `seed` makes the descriptor's CID its own.
pub(crate) fn make_disk(
    store: &Mutex<DiskStore>,
    point: &PointMeta,
    out: &Path,
    descriptor: &Path,
    flat: &Path,
    seed: &str,
    cancel: &AtomicBool,
) -> Result<CopyMethod> {
    crate::crashsafe::create_dir_all(out)?;
    let flat_src = lock(store).flat_extent_path();
    let cloned = match flat_src {
        Some(src) => clone_point(store, point.id, &src, flat)?,
        None => false,
    };
    if cloned {
        let (size, cid) = {
            let s = lock(store);
            (point.size.unwrap_or(s.size()), s.point_cid(point))
        };
        let flat_name =
            flat.file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| TargetError::Unsupported {
                    what: format!("the path {}", flat.display()),
                    hint: "use a UTF-8 path".into(),
                })?;
        let text = crate::replica::vmfs_descriptor(flat_name, size, cid, seed);
        blockferry_durable::replace_file(descriptor, text.as_bytes(), None)
            .map_err(crate::crashsafe::from_durable)?;
        Ok(CopyMethod::Reflink)
    } else {
        export_point_live(
            store,
            point.id,
            ExportFormat::VmdkFlat,
            descriptor,
            None,
            cancel,
            &mut |_, _| {},
        )?;
        Ok(CopyMethod::Export)
    }
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
                info!(error = %e, "no reflink here; the disk is an export");
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

/// Detaches the loop devices of `flat` and removes `descriptor` and `flat`
/// (either may be missing), durably.
fn remove_disk(disk: &str, descriptor: &Path, flat: &Path) -> Result<()> {
    for dev in loops_of(flat)? {
        run("losetup", &["-d", &dev])?;
        info!(disk, device = dev, "loop device detached");
    }
    for f in [descriptor, flat] {
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(TargetError::io(f, None, e)),
        }
    }
    if let Some(dir) = flat.parent()
        && dir.exists()
    {
        blockferry_durable::sync_dir(dir).map_err(crate::crashsafe::from_durable)?;
    }
    Ok(())
}

/// Removes the directory `out` if the failover `created` it (and it is
/// empty: anything else a user put there stays), and syncs its parent.
fn remove_out(out: &Path, created: bool) -> Result<()> {
    if created {
        match std::fs::remove_dir(out) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %out.display(), error = %e, "failover directory left in place (not empty)")
            }
        }
    }
    if let Some(parent) = out.parent()
        && parent.exists()
    {
        blockferry_durable::sync_dir(parent).map_err(crate::crashsafe::from_durable)?;
    }
    Ok(())
}

/// Reads a JSON record; `None` when there is none.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| TargetError::corrupt(path, None, e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TargetError::io(path, None, e)),
    }
}

/// Replaces a JSON record durably.
fn write_json<T: Serialize>(path: &Path, rec: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(rec).map_err(|e| TargetError::EncodeState {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    blockferry_durable::replace_file(path, &bytes, None).map_err(crate::crashsafe::from_durable)
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
