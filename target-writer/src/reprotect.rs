//! Reprotect at the target: an existing disk (the original disk after a
//! failover, or the recovery copy after a failback) becomes the replica the
//! recovered source replicates into, so only what differs travels. And the
//! planned failover of such a store in place: the seed itself becomes the
//! writable disk again.
//!
//! **Reprotect** ([`reprotect`]) reads two generation records: the source's
//! (the promoted replica's `generation.rec`, or the agent's record) and the
//! seed's (its former agent's record, or none: a disk of unknown history),
//! and compares them ([`plan`]):
//!
//! - in sync, or the seed behind the source: go ahead. The seed is always
//!   synced by a checksum compare (the agent asks for the hash tree of the
//!   store and sends only chunks whose hashes differ), also where the records
//!   would allow a delta by generation: nothing proves that the seed was not
//!   written since its record was;
//! - split brain (both changed since their common point): refused with both
//!   lineages, until the user names the seed as the copy whose changes are
//!   discarded (`--discard-changes-of seed`, [`resolve_split_brain`]);
//! - unrelated (or no seed record): refused unless `--allow-unrelated`, then
//!   the checksum compare covers the whole disk ("full");
//! - the seed ahead of the source: refused (fail over to the seed instead).
//!
//! Then the store of the disk is made around the seed
//! ([`DiskStore::create_seed`]) with a record that follows the source: a
//! [`CopyRole::Seed`] in the source's current generation through the source's
//! sequence, so the source's frames (its wire generation or newer, the next
//! sequence) pass the store's sequence check. A store already there is
//! retired (renamed to `DISK.retired-<unix ms>`, nothing deleted) when it is
//! a promoted copy without a running test failover — the recovery copy after
//! a failback; anything else is refused with advice. A rerun after a crash
//! finishes the job: a retired store is not retired twice, and a seed store
//! already made for the same seed and source is reported as done.
//!
//! **Failover in place** ([`failover_in_place`], the target side of a
//! planned failback): the seed store's replica is complete and its newest
//! point is its last applied sequence (the source's final point arrived),
//! so the record is promoted and the store closed: the device (or VMDK) is
//! released and is the writable disk, holding exactly that point.

use std::path::{Path, PathBuf};

use blockferry_proto::frame::{ByteRange, HashRangeReply, HashRangeRequest, RangeDigest};
use blockferry_proto::generation::{
    Comparison, Side, SplitBrainReport, SyncMode, Unrelated, resolve_split_brain,
};
use blockferry_proto::hashtree::{ComparerLimits, DEFAULT_FANOUT, TreeShape};
use blockferry_proto::{CopyRole, DiskId, Frame, Generation, GenerationEntry, GenerationRecord};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::error::{Result, TargetError};
use crate::promote::{Promoted, promote_store};
use crate::store::generation::disk_id_of;
use crate::store::{DiskStore, ExternalReplica, StoreOptions, disk_dir, summary};

/// The default read rate of a seed for the time estimate (bytes per second).
pub const DEFAULT_READ_RATE: u64 = 200 << 20;

/// The default chunk size of the checksum resync (the target's
/// `resync_chunk_kib` and the agents' `chunk_size_kib`).
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 10;

/// What to reprotect, as the command line gives it.
#[derive(Debug, Clone)]
pub struct ReprotectRequest {
    /// The store root.
    pub root: PathBuf,
    pub disk: String,
    /// The seed: a block device or a VMDK descriptor; absolute.
    pub seed: PathBuf,
    /// The source's encoded generation record.
    pub source_record: PathBuf,
    /// The seed's encoded generation record; `None`: unknown history.
    pub seed_record: Option<PathBuf>,
    /// Discard the seed's changes since the common point (split brain).
    pub discard_seed: bool,
    /// Accept a seed that shares no generation with the source.
    pub allow_unrelated: bool,
    /// Say what would happen; change nothing.
    pub dry_run: bool,
    /// Resync chunk size of the estimate.
    pub chunk_size: u64,
    /// Read rate of the seed for the estimate, bytes per second.
    pub read_rate: u64,
}

/// How the seed is brought up to the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Both records are in the same generation: nothing should differ.
    InSync,
    /// The records prove a delta from the common point (still synced by
    /// checksum compare: a seed's record does not prove its content).
    DeltaByGeneration,
    /// The seed may differ anywhere since the common point.
    ChecksumCompare,
    /// Nothing in common: the checksum compare covers the whole disk.
    Full,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::InSync => "in-sync",
            Mode::DeltaByGeneration => "delta-by-generation",
            Mode::ChecksumCompare => "checksum-compare",
            Mode::Full => "full",
        }
    }
}

/// The outcome of comparing the two records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub mode: Mode,
    /// The point both copies hold (generation and sequence), if any.
    pub common: Option<GenerationEntry>,
    /// The seed's changes since the common point are discarded.
    pub discarded: bool,
    /// The record the seed store starts with: a seed following the source.
    pub record: GenerationRecord,
}

/// The common point as `--json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonPoint {
    /// The generation id, 32 hex digits.
    pub generation: String,
    /// Its wire number.
    pub number: u64,
    pub seq: u64,
}

/// What the seed's sync will cost, before anything moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub size: u64,
    pub chunk_size: u64,
    /// Hash traffic when nothing differs (one round-trip at the root).
    pub hash_bytes_min: u64,
    /// Hash traffic when everything differs (every node of the tree).
    pub hash_bytes_max: u64,
    /// Data that may travel: what differs is known only once compared, so
    /// at most the disk.
    pub data_bytes_max: u64,
    /// The target reads the whole seed once to hash it.
    pub read_bytes: u64,
    pub read_rate_bytes_per_s: u64,
    pub read_seconds: f64,
}

/// What reprotect did (or, with `dry_run`, would do), as `--json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reprotected {
    pub disk: String,
    pub seed: PathBuf,
    /// `device` or `vmdk`.
    pub kind: String,
    /// `in-sync`, `delta-by-generation`, `checksum-compare` or `full`.
    pub mode: String,
    /// How the first sync runs: always a checksum compare for a seed.
    pub sync: String,
    pub common: Option<CommonPoint>,
    /// The seed's changes since the common point are discarded.
    pub discarded: bool,
    /// Where the store that was in the way went (or would go).
    pub retired: Option<PathBuf>,
    /// The wire generation and sequence the store holds: the source's next
    /// frame is `applied_seq + 1` in this generation or a newer one.
    pub generation: u64,
    pub applied_seq: u64,
    /// The seed store's lineage.
    pub lineage: String,
    /// A store for this seed and source existed already (a rerun).
    pub already: bool,
    pub dry_run: bool,
    pub estimate: Estimate,
}

/// Reads an encoded generation record of `disk` from `path`.
pub fn read_record_file(path: &Path, disk: DiskId) -> Result<GenerationRecord> {
    let bytes = std::fs::read(path).map_err(|e| TargetError::RecordFile {
        path: path.to_path_buf(),
        reason: match e.kind() {
            std::io::ErrorKind::NotFound => {
                "it does not exist; copy it from the host that keeps it".into()
            }
            _ => format!("cannot read it: {e}"),
        },
    })?;
    let r = GenerationRecord::decode(&bytes).map_err(|e| TargetError::RecordFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if r.disk() != disk {
        return Err(TargetError::RecordFile {
            path: path.to_path_buf(),
            reason: format!(
                "it is the record of disk {}, not of disk {disk}: pass the record of this disk",
                r.disk()
            ),
        });
    }
    Ok(r)
}

/// Compares the seed's record (`None`: unknown history) with the source's
/// and decides, or refuses (see the module docs). `disk` names the disk in
/// messages. No I/O.
pub fn plan(
    disk: &str,
    seed: Option<&GenerationRecord>,
    source: &GenerationRecord,
    discard_seed: bool,
    allow_unrelated: bool,
) -> Result<Plan> {
    let record = GenerationRecord::from_parts(
        source.disk(),
        CopyRole::Seed,
        source.current(),
        source.history().to_vec(),
    )
    .map_err(|e| TargetError::Generation {
        disk: disk.to_string(),
        source: e,
    })?;
    let unrelated = |why: String| -> Result<Plan> {
        if !allow_unrelated {
            return Err(TargetError::Unrelated {
                disk: disk.to_string(),
                why,
            });
        }
        Ok(Plan {
            mode: Mode::Full,
            common: None,
            discarded: false,
            record: record.clone(),
        })
    };
    let Some(seed) = seed else {
        return unrelated("the seed's history is unknown: no --seed-record".into());
    };
    let plan = |mode, common| Plan {
        mode,
        common,
        discarded: false,
        record: record.clone(),
    };
    match seed.compare(source) {
        Comparison::InSync { .. } => {
            let (a, b) = (seed.current(), source.current());
            let common = GenerationEntry {
                seq: a.seq.min(b.seq),
                number: a.number.min(b.number),
                ..a
            };
            Ok(plan(Mode::InSync, Some(common)))
        }
        Comparison::Behind { common, mode } => Ok(plan(
            match mode {
                SyncMode::Delta => Mode::DeltaByGeneration,
                SyncMode::ChecksumCompare => Mode::ChecksumCompare,
            },
            Some(common),
        )),
        c @ Comparison::Ahead { .. } => Err(TargetError::SeedAhead {
            disk: disk.to_string(),
            comparison: c.to_string(),
        }),
        Comparison::SplitBrain { common, .. } => {
            if !discard_seed {
                let report = SplitBrainReport {
                    ours_name: "seed",
                    ours: seed,
                    theirs_name: "source",
                    theirs: source,
                };
                return Err(TargetError::SplitBrain {
                    disk: disk.to_string(),
                    report: report.to_string(),
                });
            }
            let r = resolve_split_brain(seed, source, Side::Ours).map_err(|e| {
                TargetError::Generation {
                    disk: disk.to_string(),
                    source: e,
                }
            })?;
            Ok(Plan {
                mode: Mode::ChecksumCompare,
                common: common.map(|_| r.discarded.current()),
                discarded: true,
                record,
            })
        }
        Comparison::Unrelated(Unrelated::DifferentDisk { ours, theirs }) => {
            Err(TargetError::RecordFile {
                path: PathBuf::from("--seed-record"),
                reason: format!(
                    "the seed's record is of disk {ours}, the source's of disk {theirs}"
                ),
            })
        }
        Comparison::Unrelated(Unrelated::NoCommonGeneration) => unrelated(
            "no generation in common, or the common one is older than the records keep".into(),
        ),
    }
}

/// Hash traffic of a checksum resync of a disk of `size` bytes in chunks of
/// `chunk_size`, by the tree the agent's comparer and the target's responder
/// use (fan-out [`DEFAULT_FANOUT`], [`ComparerLimits`] ranges per request):
/// `(min, max)` encoded frame bytes, for nothing and everything differing.
pub fn hash_traffic(size: u64, chunk_size: u64) -> Result<(u64, u64)> {
    let shape =
        TreeShape::new(chunk_size, DEFAULT_FANOUT).map_err(|e| TargetError::Unsupported {
            what: format!("a resync chunk size of {chunk_size} bytes"),
            hint: e.to_string(),
        })?;
    let frames = |ranges: usize| -> (u64, u64) {
        let r = ByteRange { offset: 0, len: 0 };
        let req = Frame::HashRequest(HashRangeRequest {
            disk: DiskId::default(),
            generation: Generation(0),
            request_id: 0,
            ranges: vec![r; ranges],
        });
        let rep = Frame::HashReply(HashRangeReply {
            disk: DiskId::default(),
            generation: Generation(0),
            request_id: 0,
            digests: vec![
                RangeDigest {
                    range: r,
                    digest: [0; 32]
                };
                ranges
            ],
        });
        (req.encoded_len() as u64, rep.encoded_len() as u64)
    };
    let (one_req, one_rep) = frames(1);
    let (two_req, two_rep) = frames(2);
    let per_range = (two_req - one_req) + (two_rep - one_rep);
    let per_exchange = (one_req + one_rep) - per_range;
    // Everything differing: the comparer asks about every node, level by
    // level from the root, at most `max_ranges` nodes per request.
    let per_request = ComparerLimits::default().max_ranges as u64;
    let leaves = shape.leaves(size).max(1);
    let mut max = 0u64;
    let mut nodes = leaves;
    for _ in 0..=shape.height(leaves) {
        max += nodes.div_ceil(per_request) * per_exchange + nodes * per_range;
        nodes = nodes.div_ceil(u64::from(DEFAULT_FANOUT));
    }
    Ok((per_exchange + per_range, max))
}

fn estimate(size: u64, chunk_size: u64, read_rate: u64) -> Result<Estimate> {
    let (hash_bytes_min, hash_bytes_max) = hash_traffic(size, chunk_size)?;
    Ok(Estimate {
        size,
        chunk_size,
        hash_bytes_min,
        hash_bytes_max,
        data_bytes_max: size,
        read_bytes: size,
        read_rate_bytes_per_s: read_rate,
        read_seconds: size as f64 / read_rate.max(1) as f64,
    })
}

fn common_point(e: &GenerationEntry) -> CommonPoint {
    CommonPoint {
        generation: format!("{:#}", e.id).trim_start_matches('g').to_string(),
        number: e.number.0,
        seq: e.seq.0,
    }
}

/// A store already in the disk's place.
enum InTheWay {
    /// None: the place is free.
    Free,
    /// A promoted copy that may be retired.
    Retire,
    /// The seed store this request makes, made already (a rerun).
    Done,
}

/// Decides about a store already under `root` for `disk` (read without
/// locking; [`retire`] checks again under the lock).
fn in_the_way(
    root: &Path,
    disk: &str,
    seed: &ExternalReplica,
    record: &GenerationRecord,
) -> Result<InTheWay> {
    let Some(s) = summary(root, disk)? else {
        return Ok(InTheWay::Free);
    };
    let role = s.record.as_ref().map(|r| r.role());
    if s.seed.as_ref() == Some(seed)
        && s.record
            .as_ref()
            .is_some_and(|r| r.current().id == record.current().id && r.role() != CopyRole::Source)
    {
        return Ok(InTheWay::Done);
    }
    if role != Some(CopyRole::Source) {
        return Err(TargetError::StoreInTheWay {
            disk: disk.to_string(),
            path: s.dir,
            reason: format!(
                "holds a {} that is not promoted: reprotect replaces only a failed-over (promoted) copy. If serve made it when the agent connected before reprotect ran, stop serve, move the directory away and run reprotect again; otherwise fail the disk over first",
                role.map_or("replica".to_string(), |r| r.to_string())
            ),
        });
    }
    if let Some(t) = crate::failover::read_record(root, disk)?
        && t.state != crate::failover::TestState::CleanedUp
    {
        return Err(TargetError::StoreInTheWay {
            disk: disk.to_string(),
            path: s.dir,
            reason: format!(
                "has a test failover ({}): remove it with `blockferry-target failover --cleanup --store {} --disk {disk}` and run reprotect again",
                t.state.name(),
                root.display()
            ),
        });
    }
    Ok(InTheWay::Retire)
}

fn retired_path(root: &Path, disk: &str, now_ms: u64) -> PathBuf {
    root.join(format!("{disk}.retired-{now_ms}"))
}

/// Renames the promoted store of `disk` out of the way, durably, under its
/// lock (refused while serve holds it). Returns the new path.
fn retire(root: &Path, disk: &str, now_ms: u64) -> Result<PathBuf> {
    let dir = disk_dir(root, disk)?;
    let _lock = crate::store::lock_dir(&dir).map_err(|e| match e {
        TargetError::Locked { path } => TargetError::ReprotectLocked { path },
        e => e,
    })?;
    // Checked again under the lock: nobody promoted or un-promoted it since.
    let s = summary(root, disk)?;
    if s.as_ref().and_then(|s| s.record.as_ref()).map(|r| r.role()) != Some(CopyRole::Source) {
        return Err(TargetError::StoreInTheWay {
            disk: disk.to_string(),
            path: dir,
            reason: "changed while reprotect looked at it: run reprotect again".into(),
        });
    }
    let to = retired_path(root, disk, now_ms);
    std::fs::rename(&dir, &to).map_err(|e| TargetError::io(&dir, None, e))?;
    blockferry_durable::sync_dir(root).map_err(crate::crashsafe::from_durable)?;
    info!(disk, retired = %to.display(), "the promoted store was retired (renamed, nothing deleted)");
    Ok(to)
}

/// Reprotects `req.disk` onto the seed (see the module docs). `now_ms`
/// stamps the store and the retired directory's name.
pub fn reprotect(req: &ReprotectRequest, now_ms: u64) -> Result<Reprotected> {
    crate::store::validate_disk_id(&req.disk)?;
    let id = disk_id_of(&req.disk);
    let seed = ExternalReplica::at(&req.seed)?;
    let source = read_record_file(&req.source_record, id)?;
    if source.role() != CopyRole::Source {
        return Err(TargetError::NotASourceRecord {
            path: req.source_record.clone(),
            role: source.role().to_string(),
        });
    }
    let seed_record = req
        .seed_record
        .as_deref()
        .map(|p| read_record_file(p, id))
        .transpose()?;
    let plan = plan(
        &req.disk,
        seed_record.as_ref(),
        &source,
        req.discard_seed,
        req.allow_unrelated,
    )?;
    let way = in_the_way(&req.root, &req.disk, &seed, &plan.record)?;
    let cur = plan.record.current();
    let mut out = Reprotected {
        disk: req.disk.clone(),
        seed: seed.path.clone(),
        kind: seed.kind.name().to_string(),
        mode: plan.mode.name().to_string(),
        sync: "checksum-compare".to_string(),
        common: plan.common.as_ref().map(common_point),
        discarded: plan.discarded,
        retired: None,
        generation: cur.number.0,
        applied_seq: cur.seq.0,
        lineage: plan.record.lineage().to_string(),
        already: matches!(way, InTheWay::Done),
        dry_run: req.dry_run,
        estimate: estimate(0, req.chunk_size, req.read_rate)?,
    };
    if req.dry_run || out.already {
        // Only looked at: the seed is opened read-only and shared.
        let size = seed.open(false)?.size();
        out.estimate = estimate(size, req.chunk_size, req.read_rate)?;
        if matches!(way, InTheWay::Retire) {
            out.retired = Some(retired_path(&req.root, &req.disk, now_ms));
        }
        return Ok(out);
    }
    if matches!(way, InTheWay::Retire) {
        // A seed that is busy or unusable stops the command before the
        // promoted store is moved.
        drop(seed.open(true)?);
        out.retired = Some(retire(&req.root, &req.disk, now_ms)?);
    }
    let store = DiskStore::create_seed(
        &req.root,
        &req.disk,
        &seed,
        plan.record.clone(),
        now_ms,
        StoreOptions::default(),
    )
    .map_err(|e| match e {
        TargetError::Locked { path } => TargetError::ReprotectLocked { path },
        e => e,
    })?;
    out.estimate = estimate(store.size(), req.chunk_size, req.read_rate)?;
    out.generation = store.generation();
    out.applied_seq = store.applied_seq();
    store.close()?;
    info!(disk = %req.disk, seed = %seed.path.display(), mode = plan.mode.name(), "reprotected: the seed is the replica; its first sync is a checksum compare");
    Ok(out)
}

/// What a failover in place did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InPlace {
    /// The promotion (the new generation; frames of the former source are
    /// refused from now on).
    #[serde(flatten)]
    pub promoted: Promoted,
    /// The writable disk: the seed itself, released by the store.
    pub path: PathBuf,
    /// `device` or `vmdk`.
    pub kind: String,
    /// The recovery point it holds exactly (the source's final point).
    pub point: u64,
}

/// Planned failover of a seed store in place (failback, target side): the
/// store must not be held (stop serve first), its replica must be a seed,
/// complete, and hold nothing after its newest point (the source's final
/// point, e.g. after `blockferry-agent handoff`). Promotes the record and
/// closes the store, releasing the device: the returned path is the writable
/// disk. A rerun on a seed store already promoted this way reports it again.
pub fn failover_in_place(root: &Path, disk: &str) -> Result<InPlace> {
    let refuse = |reason: String| TargetError::NotInPlace {
        disk: disk.to_string(),
        reason,
    };
    let mut s = DiskStore::open(root, disk, StoreOptions::default()).map_err(|e| match e {
        TargetError::Locked { path } => refuse(format!(
            "the store {} is held by another process: stop blockferry-target serve (once the final point arrived) and run the failover again",
            path.display()
        )),
        e => e,
    })?;
    let Some(seed) = s.seed().cloned() else {
        return Err(refuse(
            "its replica is no seed (no existing disk to give back): use an unplanned failover to a point".into(),
        ));
    };
    let latest = s.points().last().cloned();
    if s.is_promoted() {
        // A rerun after the promotion committed: report it again.
        let p = crate::promote::report(s.disk(), s.generation_record());
        s.close()?;
        return Ok(InPlace {
            promoted: p,
            path: seed.path,
            kind: seed.kind.name().to_string(),
            point: latest.map_or(0, |p| p.id),
        });
    }
    if !s.is_complete() {
        return Err(refuse(
            "the seed's first sync has not finished (no barrier since reprotect): let the source ship to RPO zero and take a final point (blockferry-agent handoff), then run the failover again".into(),
        ));
    }
    // The newest point's barrier is the last frame the replica applied.
    let Some(point) = latest.filter(|p| p.marker_seq == s.applied_seq() && !p.incomplete) else {
        return Err(refuse(format!(
            "the replica holds batches up to {} after its newest point{}: the source's final point has not arrived; run blockferry-agent handoff on the source host, wait for it to finish, then run the failover again",
            s.applied_seq(),
            s.points().last().map_or(String::new(), |p| format!(
                " (point {} at {})",
                p.id, p.marker_seq
            ))
        )));
    };
    let promoted = promote_store(&mut s)?;
    s.close()?;
    info!(disk, path = %seed.path.display(), point = point.id, "failed over in place: the seed is the writable disk");
    Ok(InPlace {
        promoted,
        path: seed.path,
        kind: seed.kind.name().to_string(),
        point: point.id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockferry_proto::hashtree::{Comparer, HashTree, Responder};
    use blockferry_proto::{GenerationId, Seq};

    use crate::batch::{ApplyBatch, raw_chunk};
    use crate::vmdk::{CreateOptions, DiskKind, VmdkImage};

    const DISK: &str = "d";

    fn entry(id: GenerationId, number: u64, seq: u64) -> GenerationEntry {
        GenerationEntry {
            id,
            number: Generation(number),
            seq: Seq(seq),
        }
    }

    fn root() -> GenerationId {
        GenerationId::root(disk_id_of(DISK))
    }

    /// The replica promoted at seq 8 of the root generation (an unplanned
    /// failover at site B).
    fn promoted() -> GenerationRecord {
        let mut r = GenerationRecord::new(disk_id_of(DISK), CopyRole::Replica, entry(root(), 1, 8));
        r.promote(GenerationId::from_bytes([0xbb; 16])).unwrap();
        r
    }

    /// The original source's record: still a source, through `seq`.
    fn original(role: CopyRole, seq: u64) -> GenerationRecord {
        GenerationRecord::new(disk_id_of(DISK), role, entry(root(), 1, seq))
    }

    #[test]
    fn a_demoted_seed_behind_the_source_is_a_delta_by_generation_from_the_common_point() {
        let p = plan(
            DISK,
            Some(&original(CopyRole::Replica, 8)),
            &promoted(),
            false,
            false,
        )
        .unwrap();
        assert_eq!(p.mode, Mode::DeltaByGeneration);
        assert_eq!(p.common, Some(entry(root(), 1, 8)));
        assert!(!p.discarded);
        // The seed store follows the source: its frames come next.
        assert_eq!(p.record.role(), CopyRole::Seed);
        assert_eq!(p.record.current(), promoted().current());
        assert_eq!(p.record.history(), promoted().history());
    }

    #[test]
    fn a_split_brain_is_refused_with_both_lineages_until_the_seeds_changes_are_discarded() {
        // The original source wrote on after the failover point.
        let seed = original(CopyRole::Source, 10);
        let source = promoted();
        let e = plan(DISK, Some(&seed), &source, false, false).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, TargetError::SplitBrain { .. }), "{msg}");
        assert!(msg.contains(&seed.lineage().to_string()), "{msg}");
        assert!(msg.contains(&source.lineage().to_string()), "{msg}");
        assert!(msg.contains("--discard-changes-of seed"), "{msg}");
        let p = plan(DISK, Some(&seed), &source, true, false).unwrap();
        assert_eq!(p.mode, Mode::ChecksumCompare);
        assert!(p.discarded);
        assert_eq!(
            p.common,
            Some(entry(root(), 1, 8)),
            "back to the failover point"
        );
    }

    #[test]
    fn a_seed_of_unknown_or_unrelated_history_is_refused_unless_a_full_compare_is_allowed() {
        let stranger = GenerationRecord::new(
            disk_id_of(DISK),
            CopyRole::Source,
            entry(GenerationId::from_bytes([0x55; 16]), 1, 3),
        );
        for seed in [None, Some(&stranger)] {
            let e = plan(DISK, seed, &promoted(), false, false).unwrap_err();
            assert!(matches!(e, TargetError::Unrelated { .. }), "{e}");
            assert!(e.to_string().contains("--allow-unrelated"), "{e}");
            let p = plan(DISK, seed, &promoted(), false, true).unwrap();
            assert_eq!((p.mode, p.common), (Mode::Full, None));
        }
    }

    /// Runs a checksum resync of `ours` against `theirs` with the real state
    /// machines, answering each request at once; returns the responder's bytes.
    fn exchange(shape: TreeShape, ours: &[u8], theirs: &[u8]) -> u64 {
        let mut c = Comparer::new(
            HashTree::from_bytes(shape, ours).unwrap(),
            theirs.len() as u64,
            DiskId::default(),
            Generation(1),
            ComparerLimits::default(),
        );
        let mut r = Responder::new(HashTree::from_bytes(shape, theirs).unwrap());
        while !c.is_done() {
            let req = c.poll_request().expect("a request while not done");
            c.handle_reply(&r.handle_request(&req).unwrap()).unwrap();
        }
        r.stats().bytes()
    }

    #[test]
    fn the_hash_traffic_estimate_is_what_a_resync_of_equal_and_of_wholly_different_disks_costs() {
        let cs = 4096;
        let shape = TreeShape::new(cs, DEFAULT_FANOUT).unwrap();
        let size = cs * 5000 + 512;
        let (min, max) = hash_traffic(size, cs).unwrap();
        let a = vec![0u8; size as usize];
        let b = vec![1u8; size as usize];
        assert_eq!(exchange(shape, &a, &a), min);
        assert_eq!(exchange(shape, &a, &b), max);
    }

    fn write_record(dir: &Path, name: &str, r: &GenerationRecord) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, r.encode()).unwrap();
        p
    }

    fn batch(generation: u64, seq: u64) -> ApplyBatch {
        ApplyBatch {
            disk: DISK.into(),
            generation,
            seq,
            chunks: vec![raw_chunk(seq * 4096, vec![seq as u8; 4096])],
        }
    }

    fn barrier(generation: u64, seq: u64) -> blockferry_proto::Barrier {
        blockferry_proto::Barrier {
            disk: DiskId::default(),
            generation: Generation(generation),
            seq: Seq(seq),
            consistency: blockferry_proto::Consistency::CrashConsistent,
            timestamp_ns: 0,
        }
    }

    struct Site {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        seed: PathBuf,
        req: ReprotectRequest,
    }

    /// A store whose replica of `d` was promoted after seq 3 (the recovery
    /// copy after a failback), the source record it left, a VMDK seed and the
    /// seed's record (demoted at seq 3).
    fn site() -> Site {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        let mut s = DiskStore::create(&root, DISK, 1 << 20, 1, StoreOptions::default()).unwrap();
        s.apply_many(&[batch(1, 1), batch(1, 2), batch(1, 3)])
            .unwrap();
        let source = s.promote(GenerationId::from_bytes([0xaa; 16])).unwrap();
        s.close().unwrap();
        let seed = tmp.path().join("seed.vmdk");
        VmdkImage::create(&seed, &CreateOptions::new(1 << 20, DiskKind::Vmfs)).unwrap();
        let req = ReprotectRequest {
            root: root.clone(),
            disk: DISK.into(),
            seed: seed.clone(),
            source_record: write_record(tmp.path(), "source.rec", &source),
            seed_record: Some(write_record(
                tmp.path(),
                "seed.rec",
                &original(CopyRole::Replica, 3),
            )),
            discard_seed: false,
            allow_unrelated: false,
            dry_run: false,
            chunk_size: DEFAULT_CHUNK_SIZE,
            read_rate: DEFAULT_READ_RATE,
        };
        Site {
            _tmp: tmp,
            root,
            seed,
            req,
        }
    }

    #[test]
    fn reprotect_retires_the_promoted_store_and_makes_the_seed_the_replica_the_source_continues() {
        let site = site();
        let mut dry = site.req.clone();
        dry.dry_run = true;
        let r = reprotect(&dry, 7).unwrap();
        assert!(r.dry_run);
        assert_eq!(
            (r.mode.as_str(), r.kind.as_str()),
            ("delta-by-generation", "vmdk")
        );
        assert_eq!(r.retired, Some(site.root.join("d.retired-7")));
        assert_eq!(r.estimate.data_bytes_max, 1 << 20);
        assert!(
            !site.root.join("d.retired-7").exists(),
            "a dry run changes nothing"
        );
        assert!(
            summary(&site.root, DISK)
                .unwrap()
                .unwrap()
                .record
                .unwrap()
                .role()
                == CopyRole::Source
        );

        let r = reprotect(&site.req, 9).unwrap();
        assert!(!r.dry_run && !r.already);
        let retired = site.root.join("d.retired-9");
        assert_eq!(r.retired.as_deref(), Some(retired.as_path()));
        assert!(retired.join("state.json").exists(), "retired, not deleted");
        assert_eq!(r.common.as_ref().map(|c| c.seq), Some(3));
        assert_eq!((r.generation, r.applied_seq), (2, 3));
        let json = serde_json::to_value(&r).unwrap();
        for k in [
            "disk",
            "seed",
            "kind",
            "mode",
            "common",
            "retired",
            "generation",
            "applied_seq",
            "dry_run",
        ] {
            assert!(json.get(k).is_some(), "--json has {k}");
        }
        let mut s = DiskStore::open(&site.root, DISK, StoreOptions::default()).unwrap();
        assert_eq!(
            s.seed().map(|x| x.path.as_path()),
            Some(site.seed.as_path())
        );
        assert_eq!(s.generation_record().role(), CopyRole::Seed);
        // The promoted source's frames: its wire generation, after seq 3.
        assert_eq!(s.apply(&batch(2, 4)).unwrap(), crate::ApplyOutcome::Applied);
        drop(s);
        // A rerun (after a crash, say) finds the job done.
        let again = reprotect(&site.req, 11).unwrap();
        assert!(again.already && again.retired.is_none());
        assert!(!site.root.join("d.retired-11").exists());
    }

    #[test]
    fn reprotect_refuses_a_held_store_a_replica_that_is_not_promoted_and_a_replica_record_as_source()
     {
        let site = site();
        let held = DiskStore::open(&site.root, DISK, StoreOptions::default()).unwrap();
        let e = reprotect(&site.req, 9).unwrap_err();
        assert!(matches!(e, TargetError::ReprotectLocked { .. }), "{e}");
        assert!(e.to_string().contains("stop serve"), "{e}");
        drop(held);

        let mut req = site.req.clone();
        req.source_record = req.seed_record.clone().unwrap();
        let e = reprotect(&req, 9).unwrap_err();
        assert!(matches!(e, TargetError::NotASourceRecord { .. }), "{e}");

        let mut req = site.req.clone();
        req.source_record = site.root.join("missing.rec");
        let e = reprotect(&req, 9).unwrap_err();
        assert!(e.to_string().contains("missing.rec"), "{e}");

        // A replica that still follows its source is never replaced.
        std::fs::remove_dir_all(site.root.join(DISK)).unwrap();
        DiskStore::create(&site.root, DISK, 1 << 20, 1, StoreOptions::default())
            .unwrap()
            .close()
            .unwrap();
        let e = reprotect(&site.req, 9).unwrap_err();
        assert!(matches!(e, TargetError::StoreInTheWay { .. }), "{e}");
        assert!(site.root.join(DISK).join("state.json").exists());
    }

    #[test]
    fn the_service_continues_the_source_on_a_seed_compares_it_by_checksum_and_refuses_a_larger_source()
     {
        use blockferry_transport::{FrameSink, PeerIdentity};
        let name = "01234567-89ab-cdef-0011-223344556677";
        let id: DiskId = name.parse().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        // The seed holds the old data; the source differs in one chunk.
        let old = blockferry_testkit::data::mixed_data(1 << 20, 5);
        let seed = tmp.path().join("seed.vmdk");
        let mut img =
            VmdkImage::create(&seed, &CreateOptions::new(1 << 20, DiskKind::Vmfs)).unwrap();
        img.apply(&[crate::vmdk::WriteOp::Data {
            offset: 0,
            data: &old,
        }])
        .unwrap();
        drop(img);
        let mut source =
            GenerationRecord::new(id, CopyRole::Replica, entry(GenerationId::root(id), 1, 8));
        source
            .promote(GenerationId::from_bytes([0xcc; 16]))
            .unwrap();
        let seed_rec =
            GenerationRecord::new(id, CopyRole::Replica, entry(GenerationId::root(id), 1, 8));
        let req = ReprotectRequest {
            root: root.clone(),
            disk: name.into(),
            seed,
            source_record: write_record(tmp.path(), "source.rec", &source),
            seed_record: Some(write_record(tmp.path(), "seed.rec", &seed_rec)),
            discard_seed: false,
            allow_unrelated: false,
            dry_run: false,
            chunk_size: DEFAULT_CHUNK_SIZE,
            read_rate: DEFAULT_READ_RATE,
        };
        reprotect(&req, 1).unwrap();
        let cfg = crate::serve::ServeConfig::parse(
            &format!(
                "listen = \"127.0.0.1:0\"\nstore = {root:?}\nca = \"ca\"\ncert = \"c\"\nkey = \"k\"\n"
            ),
            tmp.path(),
        )
        .unwrap();
        let shape = TreeShape::new(cfg.resync_chunk_size, DEFAULT_FANOUT).unwrap();
        let sink =
            crate::serve::TargetService(std::sync::Arc::new(crate::serve::TargetSink::new(cfg)));
        let peer = PeerIdentity {
            name: "relay".into(),
            serial: Vec::new(),
        };
        let hello = |disk_size| blockferry_proto::Hello {
            agent: "b".into(),
            disk: id,
            disk_size,
            generation: Generation(2),
            oldest_held: Seq(9),
            next_seq: Seq(9),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let e = sink.open(&peer, &hello(2 << 20)).await.unwrap_err();
            assert_eq!(e.code, blockferry_proto::ErrorCode::DiskSizeMismatch, "{e}");
            assert!(e.message.contains("seed cannot grow"), "{e}");
            // The source's stream continues after the common point.
            let st = sink.open(&peer, &hello(1 << 20)).await.unwrap();
            assert_eq!((st.generation, st.durable_seq), (Generation(2), Seq(8)));
            // The checksum compare, against the seed's content.
            let mut new = old.clone();
            new[300_000..300_100].fill(0xee);
            let mut c = Comparer::new(
                HashTree::from_bytes(shape, &new).unwrap(),
                1 << 20,
                id,
                Generation(2),
                ComparerLimits::default(),
            );
            while !c.is_done() {
                let req = c.poll_request().unwrap();
                let reply = sink.hash_ranges(&peer, req).await.unwrap();
                c.handle_reply(&reply).unwrap();
            }
            let cs = shape.chunk_size;
            assert_eq!(c.differing_chunks(), vec![300_000 / cs..300_000 / cs + 1]);
        });
    }

    #[test]
    #[ignore = "needs root: loop device"]
    fn a_device_seed_is_reprotected_and_given_back_writable_at_its_final_point() {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        blockferry_testkit::privileged::require_root(
            "a_device_seed_is_reprotected_and_given_back_writable_at_its_final_point",
        );
        let dev = blockferry_testkit::devices::LoopDev::new(1 << 20, false);
        let old = blockferry_testkit::data::mixed_data(1 << 20, 3);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&dev.path)
            .unwrap();
        f.write_all_at(&old, 0).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let excl = || {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_EXCL)
                .open(&dev.path)
        };
        let site = site();
        let mut req = site.req.clone();
        req.seed = dev.path.clone();
        let r = reprotect(&req, 9).unwrap();
        assert_eq!(
            (r.kind.as_str(), r.mode.as_str()),
            ("device", "delta-by-generation")
        );
        assert_eq!(dev.read_all(), old, "reprotect wrote nothing to the seed");
        let mut s = DiskStore::open(&site.root, DISK, StoreOptions::default()).unwrap();
        assert_eq!(
            excl().unwrap_err().raw_os_error(),
            Some(libc::EBUSY),
            "nobody mounts the seed while it is replicated into"
        );
        s.apply(&batch(2, 4)).unwrap();
        s.barrier(&barrier(2, 5), 5).unwrap();
        drop(s);
        let f = failover_in_place(&site.root, DISK).unwrap();
        assert_eq!(
            (f.path.as_path(), f.kind.as_str()),
            (dev.path.as_path(), "device")
        );
        assert!(
            excl().is_ok(),
            "the device is released: it is the writable disk"
        );
        let mut want = old;
        want[4 * 4096..5 * 4096].fill(4);
        assert!(dev.read_all() == want, "the device holds the final point");
    }

    #[test]
    fn a_seed_fails_over_in_place_only_at_its_final_point() {
        let site = site();
        reprotect(&site.req, 9).unwrap();
        let e = failover_in_place(&site.root, DISK).unwrap_err();
        assert!(e.to_string().contains("first sync has not finished"), "{e}");
        let mut s = DiskStore::open(&site.root, DISK, StoreOptions::default()).unwrap();
        s.apply(&batch(2, 4)).unwrap();
        s.barrier(&barrier(2, 5), 5).unwrap();
        s.apply(&batch(2, 6)).unwrap();
        drop(s);
        let e = failover_in_place(&site.root, DISK).unwrap_err();
        assert!(e.to_string().contains("final point has not arrived"), "{e}");
        let mut s = DiskStore::open(&site.root, DISK, StoreOptions::default()).unwrap();
        let p = s.barrier(&barrier(2, 7), 8).unwrap().unwrap();
        drop(s);
        let f = failover_in_place(&site.root, DISK).unwrap();
        assert_eq!(f.path, site.seed);
        assert_eq!(
            (f.point, f.promoted.role.as_str(), f.promoted.seq),
            (p.id, "source", 7)
        );
        assert_eq!(f.promoted.generation, 3, "one more than the source's");
        let s = DiskStore::open(&site.root, DISK, StoreOptions::default()).unwrap();
        assert!(s.is_promoted());
        drop(s);
        let again = failover_in_place(&site.root, DISK).unwrap();
        assert_eq!(again, f, "a rerun reports the same promotion");
    }
}
