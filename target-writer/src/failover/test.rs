//! Test failover: a writable copy of a recovery point made while
//! replication goes on, and its cleanup.
//!
//! Crash safety: the record `test-failover.json` in the disk's directory is
//! written durably *before* anything is made, naming every file the test
//! failover will create; cleanup works from it (and finds loop devices by
//! their backing file), so a crash at any moment leaves nothing it cannot
//! remove. While the record says the test failover exists, retention keeps
//! its point ([`super::pinned_points`]).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{CopyMethod, PointChoice, choose_point, disk_paths, make_disk, read_json, write_json};
use crate::error::{Result, TargetError};
use crate::store::{DiskStore, PointMeta, disk_dir, lock};

/// The record's file name in the disk's directory.
pub const RECORD: &str = "test-failover.json";

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

pub(super) fn read_record_in(dir: &Path) -> Result<Option<TestFailover>> {
    read_json(&dir.join(RECORD))
}

fn write_record(dir: &Path, rec: &TestFailover) -> Result<()> {
    write_json(&dir.join(RECORD), rec)
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
    let (dir, point, rec) = {
        let s = lock(store);
        if let Some(f) = super::real::read_record_in(s.dir())? {
            return Err(super::FailoverError::FailedOverNoTest {
                disk: f.disk,
                point: f.point,
                state: f.state,
            }
            .into());
        }
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
        let (descriptor, flat) = disk_paths(&req.out, &req.disk);
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
        (dir, point, rec)
    };
    let disk = req.disk.clone();
    match make(store, req, rec, &point, now_ms, cancel) {
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
    now_ms: u64,
    cancel: &AtomicBool,
) -> Result<TestFailover> {
    let seed = format!("test-failover/{}/{now_ms}", req.disk);
    let method = make_disk(
        store,
        point,
        &req.out,
        &rec.descriptor,
        &rec.flat,
        &seed,
        cancel,
    )?;
    rec.method = Some(method);
    if req.attach {
        rec.loop_device = Some(super::attach_loop(&rec.flat)?);
        // Recorded at once: cleanup also finds it by its backing file.
        let dir = lock(store).dir().to_path_buf();
        write_record(&dir, &rec)?;
    }
    Ok(rec)
}

/// Removes everything the test failover of `disk` made: its loop devices,
/// its files, its directory if it created it; then marks the record cleaned
/// up, which releases the point. Works after a crash at any step, and again.
/// A failed-over disk is refused: cleanup is for test failovers only.
pub fn cleanup(root: &Path, disk: &str, now_ms: u64) -> Result<TestFailover> {
    let dir = disk_dir(root, disk)?;
    let pending = read_record_in(&dir)?.is_some_and(|r| r.state != TestState::CleanedUp);
    if !pending && let Some(f) = super::real::read_record_in(&dir)? {
        return Err(super::FailoverError::FailedOverNoCleanup {
            disk: f.disk,
            point: f.point,
            state: f.state,
        }
        .into());
    }
    cleanup_in(&dir, disk, now_ms)
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
    super::remove_disk(disk, &rec.descriptor, &rec.flat)?;
    super::remove_out(&rec.out, rec.created_out)?;
    rec.state = TestState::CleanedUp;
    rec.cleaned_ms = Some(now_ms);
    write_record(dir, &rec)?;
    info!(disk, point = rec.point, "test failover cleaned up");
    Ok(rec)
}
