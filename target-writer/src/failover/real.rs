//! Failover (unplanned and planned): the writable disk of a chosen recovery
//! point becomes the disk the workload runs on, and the replica is promoted
//! at that point ([`DiskStore::promote_at`]), which fences its former
//! source. Until `--commit`, the point can change (`--discard-writes`:
//! the writable disk made before may have been written).
//!
//! # The record and crash safety
//!
//! `failover.json` in the disk's directory ([`Failover`]) is written durably
//! before anything is made and after every step: the writable disk (clone
//! or export, as the test failover makes it), the loop device, the
//! promotion. Rerunning the same command after a crash at any step finishes
//! it: a copy without its method recorded is removed and made again, a loop
//! device is found by its backing file, and a promotion is redone from the
//! record the replica held before it (saved in the record before the first
//! promotion, so a crash between the store's record and this one loses
//! nothing; a redone promotion draws a new generation id that nothing has
//! seen yet). The same record is what lets the point change: the replica is
//! promoted again from that saved record at the new point.
//!
//! A planned failover ([`FailoverRequest::planned`]) is the same, but only
//! to the final point of a source that stopped: the point is complete, the
//! latest, and the replica holds nothing after it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use blockferry_proto::{GenerationRecord, Seq};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::test::{self, TestState};
use super::{CopyMethod, PointChoice, choose_point, disk_paths, make_disk, read_json, write_json};
use crate::error::{Result, TargetError};
use crate::store::generation::random_id;
use crate::store::{DiskStore, PointMeta, disk_dir, lock};

/// The record's file name in the disk's directory.
pub const RECORD: &str = "failover.json";

/// Where a failover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverState {
    /// The replica is promoted at the point (or being promoted: see
    /// [`Failover::is_promoted`]); the point can still change.
    FailedOver,
    /// Final: the point cannot change any more.
    Committed,
}

impl FailoverState {
    pub fn name(self) -> &'static str {
        match self {
            FailoverState::FailedOver => "failed-over",
            FailoverState::Committed => "committed",
        }
    }
}

impl std::fmt::Display for FailoverState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The durable record of a disk's failover (`failover.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failover {
    pub disk: String,
    pub state: FailoverState,
    /// Asked as a planned failover (the final point of a stopped source).
    #[serde(default)]
    pub planned: bool,
    pub point: u64,
    /// The last sequence of the disk's stream the point holds (through its
    /// barrier): where the replica's record is promoted.
    pub seq: u64,
    /// When this point was asked for.
    pub started_ms: u64,
    /// The directory the disk is written to.
    pub out: PathBuf,
    /// Whether the failover created `out` (then a change of `--out` removes it).
    pub created_out: bool,
    /// The descriptor to run (ESXi, qemu).
    pub descriptor: PathBuf,
    /// The raw extent beside it (what a loop device is attached to).
    pub flat: PathBuf,
    /// Whether a loop device was asked for.
    #[serde(default)]
    pub attach: bool,
    /// How the disk was made; `None` until it is whole.
    pub method: Option<CopyMethod>,
    #[serde(default)]
    pub loop_device: Option<PathBuf>,
    /// The replica's generation record before its first promotion (hex of
    /// its encoding): a change of point promotes it again at the new point.
    #[serde(default)]
    pub before: Option<String>,
    /// The promoted generation: wire number, id (32 hex digits), lineage.
    /// `None` until the replica is promoted at this point.
    #[serde(default)]
    pub generation: Option<u64>,
    #[serde(default)]
    pub generation_id: Option<String>,
    #[serde(default)]
    pub lineage: Option<String>,
    /// Seconds from the command to the writable disk and the promotion.
    #[serde(default)]
    pub ready_secs: Option<f64>,
    /// When the replica was promoted at this point ("failed over since").
    #[serde(default)]
    pub failed_over_ms: Option<u64>,
    #[serde(default)]
    pub committed_ms: Option<u64>,
    /// Points failed over to before this one, whose disks were discarded.
    #[serde(default)]
    pub discarded: Vec<u64>,
}

impl Failover {
    /// The replica is promoted at this record's point and the disk is whole:
    /// the failover is done (and its disk may have been written since).
    pub fn is_promoted(&self) -> bool {
        self.generation_id.is_some() && self.method.is_some()
    }

    /// What `failover --json` prints.
    pub fn summary(&self) -> FailoverSummary {
        FailoverSummary {
            disk: self.disk.clone(),
            point: self.point,
            seq: self.seq,
            method: self.method,
            vmdk: self.descriptor.clone(),
            flat: self.flat.clone(),
            loop_device: self.loop_device.clone(),
            generation: self.generation,
            generation_id: self.generation_id.clone(),
            lineage: self.lineage.clone(),
            state: self.state,
            planned: self.planned,
            seconds: self.ready_secs,
        }
    }

    /// The record saved before the first promotion.
    fn saved_before(&self) -> Result<Option<GenerationRecord>> {
        let Some(hex) = &self.before else {
            return Ok(None);
        };
        let bad = |reason: String| {
            TargetError::corrupt(
                format!("{RECORD} of disk {}", self.disk),
                None,
                format!("the saved record before the promotion: {reason}"),
            )
        };
        let bytes = decode_hex(hex).ok_or_else(|| bad("not hex".into()))?;
        GenerationRecord::decode(&bytes)
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }
}

/// A failover's outcome as `failover --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverSummary {
    pub disk: String,
    pub point: u64,
    pub seq: u64,
    pub method: Option<CopyMethod>,
    pub vmdk: PathBuf,
    pub flat: PathBuf,
    pub loop_device: Option<PathBuf>,
    pub generation: Option<u64>,
    pub generation_id: Option<String>,
    pub lineage: Option<String>,
    pub state: FailoverState,
    pub planned: bool,
    /// Seconds from the command to the writable disk.
    pub seconds: Option<f64>,
}

/// A failover to make (or to finish, or to move to another point).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    pub disk: String,
    pub point: PointChoice,
    /// Absolute: the service runs in another directory than the client.
    pub out: PathBuf,
    #[serde(default)]
    pub attach: bool,
    /// Use a point cut while the replica was incomplete (not for `planned`).
    #[serde(default)]
    pub force: bool,
    /// Only to the final point of a stopped source (see the module doc).
    #[serde(default)]
    pub planned: bool,
    /// Moving a done failover to another point removes its writable disk.
    #[serde(default)]
    pub discard_writes: bool,
}

/// Make a disk's failover final.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    pub disk: String,
}

/// A failover request that is refused; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error(
        "disk {disk} has a test failover of point {point} ({state}): remove it first with `blockferry-target failover --cleanup --disk {disk}`, then fail over"
    )]
    TestRunning {
        disk: String,
        point: u64,
        state: &'static str,
    },
    #[error(
        "disk {disk} is {state} to point {point}: a test failover is for a protected disk; the failed-over disk is the one to run"
    )]
    FailedOverNoTest {
        disk: String,
        point: u64,
        state: FailoverState,
    },
    #[error(
        "disk {disk} is {state} to point {point}, not in a test failover: --cleanup removes only what a test failover made, and the failed-over disk stays"
    )]
    FailedOverNoCleanup {
        disk: String,
        point: u64,
        state: FailoverState,
    },
    #[error(
        "the failover of disk {disk} to point {point} is committed: its point cannot change any more"
    )]
    Committed { disk: String, point: u64 },
    #[error(
        "disk {disk} is failed over to point {point}, and its writable disk {} may have been written: to fail over to point {new_point} instead and discard those writes, add --discard-writes",
        descriptor.display()
    )]
    WritesWouldBeLost {
        disk: String,
        point: u64,
        new_point: u64,
        descriptor: PathBuf,
    },
    #[error(
        "a planned failover of disk {disk} to point {point} is refused: {reason}. It takes only the final point of a source that stopped: run `blockferry-agent handoff` on the source site first, or fail over without --planned and accept the loss"
    )]
    NotPlannable {
        disk: String,
        point: u64,
        reason: String,
    },
    #[error(
        "disk {disk} is not failed over: fail it over first with `blockferry-target failover --disk {disk} --point P --out DIR`"
    )]
    NotFailedOver { disk: String },
    #[error(
        "the failover of disk {disk} to point {point} did not finish: run the same failover command again, then commit"
    )]
    Unfinished { disk: String, point: u64 },
}

/// The record of `disk`'s failover under the store `root`, if any.
pub fn read_record(root: &Path, disk: &str) -> Result<Option<Failover>> {
    read_record_in(&disk_dir(root, disk)?)
}

pub(crate) fn read_record_in(dir: &Path) -> Result<Option<Failover>> {
    read_json(&dir.join(RECORD))
}

fn write_record(dir: &Path, rec: &Failover) -> Result<()> {
    write_json(&dir.join(RECORD), rec)
}

/// The last sequence of the stream a point holds: a barrier's point holds
/// its barrier too (no data), so a source that stopped at its final
/// barrier and the replica promoted at that point name the same place.
pub fn point_seq(p: &PointMeta) -> u64 {
    p.seq.max(p.marker_seq)
}

/// Fails the disk of a store over (the service's store, or one opened for
/// this call): the writable disk of the chosen point in `req.out`, a loop
/// device if asked, the replica promoted at the point. Finishes a failover
/// a crash interrupted; moves a done one to another point only with
/// `discard_writes`. `now_ms` stamps it.
pub fn failover(
    store: &Mutex<DiskStore>,
    req: &FailoverRequest,
    now_ms: u64,
    cancel: &AtomicBool,
) -> Result<Failover> {
    let started = Instant::now();
    // Pinned first: the point cannot go while it is chosen and copied.
    let _pins = DiskStore::pin_points(store);
    let (dir, point, rec) = {
        let s = lock(store);
        let dir = s.dir().to_path_buf();
        let rec = plan(&s, req, now_ms)?;
        // Durable before anything is made: a rerun finds what to finish.
        write_record(&dir, &rec)?;
        let point = s.usable_point(rec.point, true)?.clone();
        (dir, point, rec)
    };
    let fresh = rec.before.is_none();
    match finish(store, &dir, &point, rec, started, now_ms, cancel) {
        Ok(rec) => Ok(rec),
        Err(e) if fresh && !lock(store).is_promoted() => {
            // A first failover that failed before the promotion changes
            // nothing: what it made goes, with its record.
            if let Err(c) = abandon(&dir) {
                tracing::warn!(error = %c, "cannot remove a failed failover; run it again to finish it");
            }
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// Removes the disk, the directory (if made) and the record of a failover
/// that never promoted the replica.
fn abandon(dir: &Path) -> Result<()> {
    let Some(rec) = read_record_in(dir)? else {
        return Ok(());
    };
    super::remove_disk(&rec.disk, &rec.descriptor, &rec.flat)?;
    super::remove_out(&rec.out, rec.created_out)?;
    let path = dir.join(RECORD);
    std::fs::remove_file(&path).map_err(|e| TargetError::io(&path, None, e))?;
    blockferry_durable::sync_dir(dir).map_err(crate::crashsafe::from_durable)
}

/// The steps of a failover whose record is written: the disk, the loop
/// device, the promotion; each skipped when done.
fn finish(
    store: &Mutex<DiskStore>,
    dir: &Path,
    point: &PointMeta,
    mut rec: Failover,
    started: Instant,
    now_ms: u64,
    cancel: &AtomicBool,
) -> Result<Failover> {
    let dir = dir.to_path_buf();
    let whole = rec.method.is_some() && rec.descriptor.exists() && rec.flat.exists();
    if !whole {
        // Never made, or a copy a crash interrupted: made (again).
        super::remove_disk(&rec.disk, &rec.descriptor, &rec.flat)?;
        rec.method = None;
        rec.loop_device = None;
        let seed = format!("failover/{}/{now_ms}", rec.disk);
        let method = make_disk(
            store,
            point,
            &rec.out,
            &rec.descriptor,
            &rec.flat,
            &seed,
            cancel,
        )?;
        rec.method = Some(method);
        write_record(&dir, &rec)?;
    }
    if rec.attach {
        let dev = match super::loops_of(&rec.flat)?.into_iter().next() {
            Some(dev) => PathBuf::from(dev),
            None => super::attach_loop(&rec.flat)?,
        };
        if rec.loop_device.as_ref() != Some(&dev) {
            rec.loop_device = Some(dev);
            write_record(&dir, &rec)?;
        }
    }
    let mut s = lock(store);
    if !promoted_here(&s, &rec) {
        let id = random_id();
        let r = if s.is_promoted() {
            let before = rec.saved_before()?.ok_or_else(|| already_promoted(&s))?;
            s.promote_again_at(&before, Seq(rec.seq), id)?
        } else {
            let before = s.generation_record_now()?;
            // Saved before the promotion: after a crash between the two
            // writes, the rerun promotes again from it.
            rec.before = Some(encode_hex(&before.encode()));
            write_record(&dir, &rec)?;
            s.promote_at(Seq(rec.seq), id)?
        };
        let cur = r.current();
        rec.generation = Some(cur.number.0);
        rec.generation_id = Some(format!("{:#}", cur.id).trim_start_matches('g').to_string());
        rec.lineage = Some(r.lineage().to_string());
        rec.failed_over_ms = Some(now_ms);
        rec.ready_secs = Some(started.elapsed().as_secs_f64());
        write_record(&dir, &rec)?;
        info!(
            disk = rec.disk,
            point = rec.point,
            seq = rec.seq,
            method = ?rec.method,
            secs = rec.ready_secs,
            lineage = rec.lineage.as_deref(),
            "failed over: the writable disk is ready and the replica is promoted at the point"
        );
    }
    Ok(rec)
}

/// Whether the store's record is the promotion `rec` names.
fn promoted_here(s: &DiskStore, rec: &Failover) -> bool {
    let r = s.generation_record();
    s.is_promoted()
        && r.current().seq == Seq(rec.seq)
        && rec.generation_id.as_deref()
            == Some(format!("{:#}", r.current().id).trim_start_matches('g'))
}

fn already_promoted(s: &DiskStore) -> TargetError {
    TargetError::AlreadyPromoted {
        disk: s.disk().to_string(),
        lineage: s.generation_record().lineage().to_string(),
    }
}

/// Decides, under the store's lock, the record of the failover `req` asks
/// for: the record to finish, or a new one (the previous point's disk
/// removed when the point changes).
fn plan(s: &DiskStore, req: &FailoverRequest, now_ms: u64) -> Result<Failover> {
    let dir = s.dir();
    if let Some(t) = test::read_record_in(dir)?
        && t.state != TestState::CleanedUp
    {
        return Err(FailoverError::TestRunning {
            disk: t.disk,
            point: t.point,
            state: t.state.name(),
        }
        .into());
    }
    let prev = read_record_in(dir)?;
    if let Some(p) = &prev
        && p.state == FailoverState::Committed
    {
        return Err(FailoverError::Committed {
            disk: p.disk.clone(),
            point: p.point,
        }
        .into());
    }
    if s.is_promoted() && prev.as_ref().is_none_or(|p| p.before.is_none()) {
        // Promoted by `promote`, not by a failover: nothing to go back to.
        return Err(already_promoted(s));
    }
    let point = choose_point(s, req.point, req.force && !req.planned)?;
    if req.planned {
        check_planned(s, &point)?;
    }
    let (descriptor, flat) = disk_paths(&req.out, &req.disk);
    let mut discarded = Vec::new();
    let mut before = None;
    let mut created_out = !req.out.exists();
    if let Some(mut p) = prev {
        let redo = req.discard_writes && p.is_promoted();
        if p.point == point.id && p.out == req.out && !redo {
            // The same failover again: finish it, or report it as it is.
            // A loop device asked for before stays; one that failed to
            // attach before promotion can be left out on the rerun.
            p.attach = req.attach || (p.attach && p.is_promoted());
            p.planned |= req.planned;
            return Ok(p);
        }
        if p.is_promoted() && !req.discard_writes {
            return Err(FailoverError::WritesWouldBeLost {
                disk: p.disk,
                point: p.point,
                new_point: point.id,
                descriptor: p.descriptor,
            }
            .into());
        }
        check_free(&req.disk, &[&descriptor, &flat], &[&p.descriptor, &p.flat])?;
        super::remove_disk(&p.disk, &p.descriptor, &p.flat)?;
        if p.out == req.out {
            created_out = p.created_out;
            super::remove_out(&p.out, false)?;
        } else {
            super::remove_out(&p.out, p.created_out)?;
        }
        info!(
            disk = p.disk,
            point = p.point,
            new_point = point.id,
            "the writable disk of the previous point is removed"
        );
        let was_promoted = p.is_promoted();
        discarded = p.discarded;
        if was_promoted {
            discarded.push(p.point);
        }
        before = p.before;
    } else {
        check_free(&req.disk, &[&descriptor, &flat], &[])?;
    }
    Ok(Failover {
        disk: req.disk.clone(),
        state: FailoverState::FailedOver,
        planned: req.planned,
        point: point.id,
        seq: point_seq(&point),
        started_ms: now_ms,
        out: req.out.clone(),
        created_out,
        descriptor,
        flat,
        attach: req.attach,
        method: None,
        loop_device: None,
        before,
        generation: None,
        generation_id: None,
        lineage: None,
        ready_secs: None,
        failed_over_ms: None,
        committed_ms: None,
        discarded,
    })
}

/// Refuses files in the way that are not the previous failover's own.
fn check_free(disk: &str, files: &[&PathBuf], own: &[&PathBuf]) -> Result<()> {
    for f in files {
        if f.exists() && !own.contains(f) {
            return Err(TargetError::Exists {
                disk: disk.to_string(),
                path: (*f).clone(),
            });
        }
    }
    Ok(())
}

/// A planned failover goes only to the final point of a source that
/// stopped: complete, the latest, and nothing applied after it.
fn check_planned(s: &DiskStore, p: &PointMeta) -> Result<()> {
    let refuse = |reason: String| -> Result<()> {
        Err(FailoverError::NotPlannable {
            disk: s.disk().to_string(),
            point: p.id,
            reason,
        }
        .into())
    };
    if p.incomplete {
        return refuse("it was cut while the replica was incomplete".into());
    }
    let latest = s.points().last().map_or(0, |l| l.id);
    if latest != p.id {
        return refuse(format!("it is not the latest point ({latest} is)"));
    }
    let held = point_seq(p);
    if s.applied_seq() != held {
        return refuse(format!(
            "the replica holds batches after it (through #{}, the point through #{held})",
            s.applied_seq()
        ));
    }
    Ok(())
}

/// Makes the failover of the store's disk final: from now on its point
/// cannot change. Committing again changes nothing.
pub fn commit(store: &Mutex<DiskStore>, now_ms: u64) -> Result<Failover> {
    // Under the store's lock: a change of point cannot slip in between.
    let s = lock(store);
    let Some(mut rec) = read_record_in(s.dir())? else {
        return Err(FailoverError::NotFailedOver {
            disk: s.disk().to_string(),
        }
        .into());
    };
    if rec.state == FailoverState::Committed {
        return Ok(rec);
    }
    if !rec.is_promoted() || !promoted_here(&s, &rec) {
        return Err(FailoverError::Unfinished {
            disk: rec.disk,
            point: rec.point,
        }
        .into());
    }
    rec.state = FailoverState::Committed;
    rec.committed_ms = Some(now_ms);
    write_record(s.dir(), &rec)?;
    info!(disk = rec.disk, point = rec.point, "failover committed");
    Ok(rec)
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_bad_text() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(decode_hex(&encode_hex(&b)).unwrap(), b);
        for bad in ["a", "zz", "0g", "é0"] {
            assert!(decode_hex(bad).is_none(), "{bad}");
        }
    }
}
