//! The per-disk replica store: one directory per protected disk holding the
//! replica VMDK, the redo journal (`journal.wal`), the undo segments of the
//! recovery points (`*.undo`) and the disk state (`state.json`).
//!
//! # Apply, and why a crash never tears a batch
//! 1. Verify every chunk (range, zstd bound, blake3) — a bad chunk rejects
//!    the batch before anything is written.
//! 2. If a recovery point is open, read the current contents of the blocks the
//!    batch overwrites for the first time since that point (undo).
//! 3. Append one journal record (redo + undo) and fdatasync it. From here the
//!    batch is durable: the caller may ack.
//! 4. Write the blocks in place (page cache, writeback started; synced at
//!    the next checkpoint) and rewrite the descriptor's CID in place.
//!
//! [`DiskStore::apply_many`] does this for a run of batches with one sync
//! (group commit); each batch stays its own journal record.
//!
//! A checkpoint (when the journal passes a size, at each recovery point, on
//! close and on open) appends the journalled undo to the open segment and
//! syncs it, syncs the replica, then writes the disk state with the applied
//! sequence and a new journal epoch — which retires every journal record in
//! one atomic rename. On open, records of the current epoch are replayed
//! (rewriting blocks is idempotent), so the replica is at the last durable
//! batch boundary, and the open segment is cut back to its committed length.
//!
//! ENOSPC while journalling leaves every file as it was (the record is not
//! counted, the state is untouched) and the same batch can be retried. The
//! flat extent is preallocated, so in-place writes do not run out of space.
//! Any other failed write or sync poisons the store: the page cache can no
//! longer be trusted, and reopening replays the journal.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use blockferry_proto::extent::ExtentSet;
use blockferry_proto::{Barrier, Consistency, Generation, Seq, SeqOrder, seq_order};

use crate::batch::{ApplyBatch, Undo, Verified, verify_batch};
use crate::crashsafe::{FaultPlan, read_exact_at};
use crate::error::{Result, TargetError};
use crate::replica::{FlatReplica, Replica, SparseReplica};
use crate::retention::{PointStamp, RetentionPolicy, retain};
use crate::segment;
use crate::wal;

const STATE: &str = "state.json";
const WAL: &str = "journal.wal";
const LOCK: &str = "lock";
const REPLICA: &str = "replica.vmdk";
const STATE_FORMAT: u32 = 1;

/// Tunables of a disk store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Checkpoint once the redo journal holds this many bytes.
    pub checkpoint_bytes: u64,
    /// The fault-injection seam (tests); production uses the default.
    pub faults: Arc<FaultPlan>,
    /// New replicas are thin (one monolithicSparse file holding only the
    /// grains written) instead of a preallocated vmfs flat extent. Only
    /// read at creation; an existing replica keeps its kind.
    pub thin: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            checkpoint_bytes: 64 << 20,
            faults: Arc::new(FaultPlan::default()),
            thin: false,
        }
    }
}

/// One recovery point as recorded in the disk state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointMeta {
    pub id: u64,
    /// Creation time, milliseconds since the Unix epoch (target clock).
    pub time_ms: u64,
    #[serde(with = "label_text")]
    pub label: Consistency,
    pub generation: u64,
    /// The disk as it was after this sequence number (the last batch or
    /// barrier applied before the point).
    pub seq: u64,
    /// The barrier that made the point (its own sequence number); equal to
    /// `seq` for scheduled points.
    pub marker_seq: u64,
    /// File name of the point's undo segment.
    pub segment: String,
    /// Committed length of that segment.
    pub segment_len: u64,
    /// The disk size at the point; a disk that grew later exports each point
    /// at its own size. Absent in states written before disks could grow
    /// (the disk's size then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DiskState {
    format: u32,
    disk: String,
    size: u64,
    generation: u64,
    applied_seq: u64,
    wal_epoch: u64,
    created_ms: u64,
    replica: String,
    /// The replica is a thin monolithicSparse file (else vmfs + flat extent).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    thin: bool,
    next_point_id: u64,
    next_file_no: u64,
    points: Vec<PointMeta>,
}

/// What `apply` did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Written and durable.
    Applied,
    /// Already applied earlier (a replay); nothing written, ack it again.
    Duplicate,
}

/// The replica store of one disk, exclusively locked while open.
#[derive(Debug)]
pub struct DiskStore {
    dir: PathBuf,
    state: DiskState,
    replica: Box<dyn Replica>,
    wal: File,
    wal_path: PathBuf,
    wal_pos: u64,
    open_seg: Option<File>,
    /// Disk ranges whose undo the open point already holds (segment + journal).
    cover: ExtentSet,
    /// The undo of the journal's records (batch sequence, old data), kept
    /// here so that a checkpoint appends it to the segment without reading
    /// the journal back.
    journal_undo: Vec<(u64, Undo)>,
    /// Reused encoding buffer of journal records.
    wal_buf: Vec<u8>,
    opts: StoreOptions,
    poisoned: bool,
    /// Exports reading points in steps; while non-zero no point is removed.
    pins: usize,
    _lock: File,
}

pub fn validate_disk_id(disk: &str) -> Result<()> {
    let ok = !disk.is_empty()
        && disk.len() <= 128
        && !disk.starts_with('.')
        && disk
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(TargetError::BadDiskId {
            disk: disk.to_string(),
        })
    }
}

/// The directory of `disk` under the store root.
pub fn disk_dir(root: &Path, disk: &str) -> Result<PathBuf> {
    validate_disk_id(disk)?;
    Ok(root.join(disk))
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| TargetError::io(&path, None, e))?;
    // A child process being spawned by any thread briefly holds a copy of
    // every descriptor (until its exec closes them), and with it the lock of a
    // store just closed. Give such a transient holder a moment before
    // reporting that another process owns the store.
    for attempt in 0..50 {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::WouldBlock) if attempt < 49 => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => break,
            Err(std::fs::TryLockError::Error(e)) => return Err(TargetError::io(&path, None, e)),
        }
    }
    Err(TargetError::Locked {
        path: dir.to_path_buf(),
    })
}

fn read_state(dir: &Path) -> Result<DiskState> {
    let path = dir.join(STATE);
    let bytes = std::fs::read(&path).map_err(|e| TargetError::io(&path, None, e))?;
    let st: DiskState = serde_json::from_slice(&bytes)
        .map_err(|e| TargetError::corrupt(&path, None, e.to_string()))?;
    if st.format != STATE_FORMAT {
        return Err(TargetError::corrupt(
            &path,
            None,
            format!("unknown format {}", st.format),
        ));
    }
    Ok(st)
}

/// Locks a shared store. A panic while holding the lock left the store as it
/// was between calls (every store call is all-or-nothing), so keep going.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads the recovery points of a disk without locking it (the state file is
/// replaced atomically), so `points` works while the store is being served.
pub fn list_points(root: &Path, disk: &str) -> Result<Vec<PointMeta>> {
    let dir = disk_dir(root, disk)?;
    if !dir.join(STATE).exists() {
        return Err(TargetError::NoDisk {
            disk: disk.to_string(),
            path: root.to_path_buf(),
        });
    }
    Ok(read_state(&dir)?.points)
}

/// Writes zeros up to the checkpoint size (plus room for one large batch),
/// so that journal appends overwrite allocated blocks and each fdatasync is
/// a data flush, not a file-system journal commit for a growing file.
fn preallocate_journal(wal: &File, path: &Path, checkpoint_bytes: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let want = checkpoint_bytes.saturating_add(4 << 20).min(1 << 30);
    let have = wal
        .metadata()
        .map_err(|e| TargetError::io(path, None, e))?
        .len();
    if have >= want {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut off = have;
    while off < want {
        let n = ((want - off) as usize).min(zeros.len());
        wal.write_all_at(&zeros[..n], off)
            .map_err(|e| TargetError::io(path, Some(off), e))?;
        off += n as u64;
    }
    Ok(())
}

/// A content id that differs for every batch boundary of every disk, and is
/// the same when recovery rebuilds the same boundary.
pub fn content_id(disk: &str, created_ms: u64, generation: u64, seq: u64) -> u32 {
    let mut h = blake3::Hasher::new();
    h.update(disk.as_bytes());
    h.update(&created_ms.to_le_bytes());
    h.update(&generation.to_le_bytes());
    h.update(&seq.to_le_bytes());
    let b = h.finalize();
    let cid = u32::from_le_bytes([
        b.as_bytes()[0],
        b.as_bytes()[1],
        b.as_bytes()[2],
        b.as_bytes()[3],
    ]);
    // 0xffffffff means "no parent" in parentCID; never use it as a CID.
    if cid == u32::MAX { 0x1234_5678 } else { cid }
}

/// The disk state as written to `state.json`. An encoding failure is an
/// error: an empty state file would lose every recovery point.
fn encode_state(dir: &Path, st: &DiskState) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(st).map_err(|e| TargetError::EncodeState {
        path: dir.join(STATE),
        reason: e.to_string(),
    })
}

/// Places a frame's `(generation, seq)` against the `held` one with the one
/// check of the sequence invariant ([`blockferry_proto::seq_order`]): `true`
/// for the next frame, `false` for a replay, a typed error otherwise.
pub fn next_in_sequence(disk: &str, held: (u64, u64), got: (u64, u64)) -> Result<bool> {
    let order = seq_order(
        (Generation(held.0), Seq(held.1)),
        (Generation(got.0), Seq(got.1)),
    );
    let disk = disk.to_string();
    match order {
        SeqOrder::Next => Ok(true),
        SeqOrder::Duplicate => Ok(false),
        SeqOrder::Gap { expected } => Err(TargetError::Gap {
            disk,
            generation: got.0,
            got: got.1,
            expected: expected.0,
        }),
        SeqOrder::StaleGeneration { current } => Err(TargetError::StaleGeneration {
            disk,
            got: got.0,
            current: current.0,
        }),
        SeqOrder::Reused { held } => Err(TargetError::ReusedSeq {
            disk,
            generation: got.0,
            got: got.1,
            held: held.0,
        }),
    }
}

/// The text of a recovery point's label, as the state file and the CLI show it.
pub fn label_name(label: Consistency) -> &'static str {
    match label {
        Consistency::NotConsistent => "not-consistent",
        Consistency::CrashConsistent => "crash-consistent",
        Consistency::AppConsistent => "app-consistent",
    }
}

/// The label named `text` by [`label_name`].
pub fn parse_label(text: &str) -> Option<Consistency> {
    [
        Consistency::NotConsistent,
        Consistency::CrashConsistent,
        Consistency::AppConsistent,
    ]
    .into_iter()
    .find(|&c| label_name(c) == text)
}

/// Serde of a point's label as its text, so state files keep their format.
mod label_text {
    use blockferry_proto::Consistency;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(label: &Consistency, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(super::label_name(*label))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Consistency, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_label(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown label {text:?}")))
    }
}

impl DiskStore {
    /// Creates the replica of a new disk of `size` bytes (all zero).
    pub fn create(
        root: &Path,
        disk: &str,
        size: u64,
        now_ms: u64,
        opts: StoreOptions,
    ) -> Result<Self> {
        let dir = disk_dir(root, disk)?;
        if size == 0 || !size.is_multiple_of(512) {
            return Err(TargetError::BadSize { size });
        }
        std::fs::create_dir_all(&dir).map_err(|e| TargetError::io(&dir, None, e))?;
        let lock = lock_dir(&dir)?;
        if dir.join(STATE).exists() {
            return Err(TargetError::Exists {
                disk: disk.to_string(),
                path: dir,
            });
        }
        // Leftovers of a creation that crashed before its state file existed.
        for name in [
            REPLICA.to_string(),
            crate::replica::flat_name_for(REPLICA),
            WAL.to_string(),
        ] {
            let p = dir.join(name);
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| TargetError::io(&p, None, e))?;
            }
        }
        let f = &opts.faults;
        let cid = content_id(disk, now_ms, 0, 0);
        let seed = format!("{disk}/{now_ms}");
        let replica: Box<dyn Replica> = if opts.thin {
            Box::new(SparseReplica::create(&dir, REPLICA, size, cid, &seed)?)
        } else {
            Box::new(FlatReplica::create(f, &dir, REPLICA, size, cid, &seed)?)
        };
        let wal_path = dir.join(WAL);
        let wal = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&wal_path)
            .map_err(|e| TargetError::io(&wal_path, None, e))?;
        preallocate_journal(&wal, &wal_path, opts.checkpoint_bytes)?;
        f.sync_data(&wal, &wal_path)?;
        let state = DiskState {
            format: STATE_FORMAT,
            disk: disk.to_string(),
            size,
            generation: 0,
            applied_seq: 0,
            wal_epoch: 1,
            created_ms: now_ms,
            replica: REPLICA.to_string(),
            thin: opts.thin,
            next_point_id: 1,
            next_file_no: 1,
            points: Vec::new(),
        };
        // The state file is the commit point of creation.
        f.write_atomic(&dir, STATE, &encode_state(&dir, &state)?)?;
        info!(disk, size, "created replica");
        Ok(DiskStore {
            dir,
            state,
            replica,
            wal,
            wal_path,
            wal_pos: 0,
            open_seg: None,
            cover: ExtentSet::new(),
            journal_undo: Vec::new(),
            wal_buf: Vec::new(),
            opts,
            poisoned: false,
            pins: 0,
            _lock: lock,
        })
    }

    /// Opens an existing replica, replaying the journal after a crash.
    pub fn open(root: &Path, disk: &str, opts: StoreOptions) -> Result<Self> {
        let dir = disk_dir(root, disk)?;
        if !dir.join(STATE).exists() {
            return Err(TargetError::NoDisk {
                disk: disk.to_string(),
                path: root.to_path_buf(),
            });
        }
        let lock = lock_dir(&dir)?;
        let state = read_state(&dir)?;
        let replica: Box<dyn Replica> = if state.thin {
            Box::new(SparseReplica::open(&dir, &state.replica, state.size)?)
        } else {
            Box::new(FlatReplica::open(
                &dir,
                &state.replica,
                state.size,
                &format!("{disk}/{}", state.created_ms),
            )?)
        };
        let wal_path = dir.join(WAL);
        let wal = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&wal_path)
            .map_err(|e| TargetError::io(&wal_path, None, e))?;
        preallocate_journal(&wal, &wal_path, opts.checkpoint_bytes)?;
        let mut s = DiskStore {
            dir,
            state,
            replica,
            wal,
            wal_path,
            wal_pos: 0,
            open_seg: None,
            cover: ExtentSet::new(),
            journal_undo: Vec::new(),
            wal_buf: Vec::new(),
            opts,
            poisoned: false,
            pins: 0,
            _lock: lock,
        };
        s.recover()?;
        Ok(s)
    }

    fn recover(&mut self) -> Result<()> {
        let f = self.opts.faults.clone();
        // Cut the open segment back to what the last checkpoint committed.
        if let Some(p) = self.state.points.last() {
            let path = self.dir.join(&p.segment);
            let seg = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| TargetError::io(&path, None, e))?;
            seg.set_len(p.segment_len)
                .map_err(|e| TargetError::io(&path, Some(p.segment_len), e))?;
            f.sync_data(&seg, &path)?;
            let idx = segment::scan(&path, p.segment_len, self.state.size)?;
            for e in &idx.entries {
                self.cover.insert(e.offset..e.offset + e.len);
            }
            self.open_seg = Some(seg);
        }
        let buf =
            std::fs::read(&self.wal_path).map_err(|e| TargetError::io(&self.wal_path, None, e))?;
        let (records, used) = wal::decode_all(&buf, self.state.wal_epoch);
        for rec in &records {
            for c in &rec.redo {
                let data = c.plain().ok_or_else(|| {
                    TargetError::corrupt(
                        &self.wal_path,
                        None,
                        format!(
                            "chunk at disk offset {} of batch {} does not decode",
                            c.offset, rec.seq
                        ),
                    )
                })?;
                self.replica.write_at(&f, &data, c.offset)?;
            }
            for c in &rec.undo {
                self.cover.insert(c.offset..c.end());
                self.journal_undo.push((rec.seq, c.clone()));
            }
            self.state.generation = rec.generation;
            self.state.applied_seq = rec.seq;
        }
        self.wal_pos = used as u64;
        if !records.is_empty() {
            info!(disk = %self.state.disk, batches = records.len(), applied_seq = self.state.applied_seq, "replayed journal");
        }
        self.remove_strays()?;
        if records.is_empty() {
            let cid = self.cid();
            self.replica.set_cid(&f, cid, true)?;
        } else {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Deletes files a crash left behind: temp files and segments that no
    /// committed state refers to.
    fn remove_strays(&self) -> Result<()> {
        let live: BTreeSet<&str> = self
            .state
            .points
            .iter()
            .map(|p| p.segment.as_str())
            .collect();
        let rd = std::fs::read_dir(&self.dir).map_err(|e| TargetError::io(&self.dir, None, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| TargetError::io(&self.dir, None, e))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            let stray = name.ends_with(".tmp") || (name.ends_with(".undo") && !live.contains(name));
            if stray {
                debug!(file = name, "removing leftover file");
                let p = ent.path();
                std::fs::remove_file(&p).map_err(|e| TargetError::io(&p, None, e))?;
            }
        }
        Ok(())
    }

    pub fn disk(&self) -> &str {
        &self.state.disk
    }

    pub fn size(&self) -> u64 {
        self.state.size
    }

    pub fn generation(&self) -> u64 {
        self.state.generation
    }

    /// The last batch that is durable (and will survive any crash).
    pub fn applied_seq(&self) -> u64 {
        self.state.applied_seq
    }

    pub fn points(&self) -> &[PointMeta] {
        &self.state.points
    }

    /// Reads the replica (the newest state) at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.replica.read_at(buf, offset)
    }

    /// The replica's descriptor, the file to hand to qemu-img or ESXi.
    pub fn replica_path(&self) -> &Path {
        self.replica.path()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn cid(&self) -> u32 {
        content_id(
            &self.state.disk,
            self.state.created_ms,
            self.state.generation,
            self.state.applied_seq,
        )
    }

    /// The CID of the disk's content at `p` (the replica had it at that
    /// boundary; exports of the point carry it, which identifies them later).
    pub fn point_cid(&self, p: &PointMeta) -> u32 {
        content_id(&self.state.disk, self.state.created_ms, p.generation, p.seq)
    }

    fn check_usable(&self) -> Result<()> {
        if self.poisoned {
            Err(TargetError::Poisoned {
                disk: self.state.disk.clone(),
            })
        } else {
            Ok(())
        }
    }

    /// Poisons the store after a failed replica write or sync, whatever the
    /// cause, and hands the error back.
    fn replica_failed(&mut self, e: TargetError) -> TargetError {
        warn!(disk = %self.state.disk, error = %e, "replica write failed; reopen to replay the journal");
        self.poisoned = true;
        e
    }

    /// Runs `f`; any error other than "no space" leaves the store poisoned.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let r = f(self);
        if let Err(e) = &r
            && !e.is_no_space()
        {
            warn!(disk = %self.state.disk, error = %e, "store stopped; reopen to replay the journal");
            self.poisoned = true;
        }
        r
    }

    /// Verifies and applies one batch; returns once it is durable.
    pub fn apply(&mut self, batch: &ApplyBatch) -> Result<ApplyOutcome> {
        let mut out = self.apply_many(std::slice::from_ref(batch))?;
        Ok(out.pop().unwrap_or(ApplyOutcome::Duplicate))
    }

    /// Verifies and applies consecutive batches with one journal sync (group
    /// commit); returns once all are durable. Each batch is still its own
    /// journal record, so a crash leaves the replica at a batch boundary. Any
    /// bad batch rejects the whole call before anything is written.
    pub fn apply_many(&mut self, batches: &[ApplyBatch]) -> Result<Vec<ApplyOutcome>> {
        self.check_usable()?;
        let disk = self.state.disk.clone();
        let span = tracing::debug_span!("apply", disk = %disk, batches = batches.len());
        let _g = span.enter();
        let (mut generation, mut applied) = (self.state.generation, self.state.applied_seq);
        let mut outcomes = Vec::with_capacity(batches.len());
        let mut redo_all = Vec::new();
        let mut undo_all = Vec::new();
        let mut pending = ExtentSet::new();
        let mut bytes = std::mem::take(&mut self.wal_buf);
        bytes.clear();
        for batch in batches {
            if batch.disk != disk {
                return Err(TargetError::WrongDisk {
                    disk,
                    got: batch.disk.clone(),
                });
            }
            if !next_in_sequence(&disk, (generation, applied), (batch.generation, batch.seq))? {
                debug!(seq = batch.seq, "replayed batch ignored");
                outcomes.push(ApplyOutcome::Duplicate);
                continue;
            }
            let redo = verify_batch(batch, &disk, self.state.size)?;
            // Reading undo data writes nothing, so a failure here leaves the store usable.
            let undo = self.capture_undo(&redo, &mut pending)?;
            wal::encode_into(
                &mut bytes,
                self.state.wal_epoch,
                batch.generation,
                batch.seq,
                &batch.chunks,
                &undo,
            );
            redo_all.push(redo);
            undo_all.extend(undo.into_iter().map(|c| (batch.seq, c)));
            generation = batch.generation;
            applied = batch.seq;
            outcomes.push(ApplyOutcome::Applied);
        }
        if redo_all.is_empty() {
            self.wal_buf = bytes;
            return Ok(outcomes);
        }
        let journalled = self.journal(&bytes, applied);
        self.wal_buf = bytes;
        journalled?;
        self.journal_undo.extend(undo_all);
        self.guarded(|s| {
            let f = s.opts.faults.clone();
            for c in redo_all.iter().flatten() {
                // Even "no space" (a thin replica's new grain): the page
                // cache may hold part of the batch; only a replay is sure.
                s.replica
                    .write_at(&f, &c.data, c.offset)
                    .map_err(|e| s.replica_failed(e))?;
            }
            s.replica.start_writeback();
            s.cover.extend_from(&pending);
            s.state.generation = generation;
            s.state.applied_seq = applied;
            let cid = s.cid();
            s.replica.set_cid(&f, cid, false)?;
            if s.wal_pos >= s.opts.checkpoint_bytes {
                s.checkpoint_inner()?;
            }
            Ok(outcomes)
        })
    }

    /// The current contents of every range of `redo` that the open point has
    /// not saved yet (neither in its segment, nor in the journal, nor earlier
    /// in this group: `pending`), adding those ranges to `pending`.
    fn capture_undo(&self, redo: &[Verified], pending: &mut ExtentSet) -> Result<Vec<Undo>> {
        let mut undo = Vec::new();
        if self.open_seg.is_none() {
            return Ok(undo);
        }
        for c in redo {
            let end = c.offset + c.data.len() as u64;
            for r in self.cover.uncovered(c.offset..end) {
                for std::ops::Range { start: a, end: b } in pending.uncovered(r) {
                    if self.replica.known_zero(a, b - a) {
                        // Never written: no read (which would also fill
                        // the page cache with zeros), and no undo data.
                        undo.push(Undo {
                            offset: a,
                            len: (b - a) as u32,
                            data: None,
                        });
                        continue;
                    }
                    let mut data = vec![0u8; (b - a) as usize];
                    self.replica.read_at(&mut data, a)?;
                    undo.push(Undo::saved(a, data));
                }
            }
            pending.insert(c.offset..end);
        }
        Ok(undo)
    }

    /// Appends `rec` to the journal and syncs it. On ENOSPC the journal
    /// position is not advanced, so the next append overwrites the partial
    /// record and nothing else changed.
    fn journal(&mut self, bytes: &[u8], seq: u64) -> Result<()> {
        let f = self.opts.faults.clone();
        let pos = self.wal_pos;
        let res = f
            .write_at(&self.wal, &self.wal_path, bytes, pos)
            .and_then(|()| f.sync_data(&self.wal, &self.wal_path));
        match res {
            Ok(()) => {
                self.wal_pos = pos + bytes.len() as u64;
                Ok(())
            }
            Err(e) if e.is_no_space() => {
                warn!(disk = %self.state.disk, seq, "no space for the journal; batch not applied, retry later");
                Err(e)
            }
            Err(e) => {
                self.poisoned = true;
                Err(e)
            }
        }
    }

    /// Makes the replica and the open point's undo durable and retires the
    /// journal. Cheap when the journal is empty.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.check_usable()?;
        self.guarded(|s| s.checkpoint_inner())
    }

    fn checkpoint_inner(&mut self) -> Result<()> {
        if self.wal_pos == 0 {
            return Ok(());
        }
        let f = self.opts.faults.clone();
        let mut new_seg_len = None;
        if let (Some(seg), Some(p)) = (&self.open_seg, self.state.points.last()) {
            // Through one reused buffer of a few MiB: the undo of a whole
            // checkpoint interval in one fresh allocation costs more in page
            // faults than the copy itself.
            let path = self.dir.join(&p.segment);
            let mut out = std::mem::take(&mut self.wal_buf);
            out.clear();
            let mut pos = p.segment_len;
            let mut written = Ok(());
            let last = self.journal_undo.len().saturating_sub(1);
            for (i, (seq, c)) in self.journal_undo.iter().enumerate() {
                segment::encode_undo(&mut out, *seq, c);
                if out.len() >= 4 << 20 || i == last {
                    written = f.write_at(seg, &path, &out, pos);
                    if written.is_err() {
                        break;
                    }
                    pos += out.len() as u64;
                    out.clear();
                }
            }
            self.wal_buf = out;
            written?;
            if pos > p.segment_len {
                f.sync_data(seg, &path)?;
            }
            new_seg_len = Some(pos);
        }
        // A failed sync may have dropped dirty pages: only a replay is sure.
        self.replica.sync(&f).map_err(|e| self.replica_failed(e))?;
        let mut st = self.state.clone();
        st.wal_epoch += 1;
        if let (Some(len), Some(p)) = (new_seg_len, st.points.last_mut()) {
            p.segment_len = len;
        }
        self.write_state(&st)?;
        self.state = st;
        self.wal_pos = 0;
        self.journal_undo.clear();
        let cid = self.cid();
        self.replica.set_cid(&f, cid, true)?;
        debug!(disk = %self.state.disk, applied_seq = self.state.applied_seq, "checkpoint");
        Ok(())
    }

    /// Grows the replica to `size` bytes (the protected disk grew): the flat
    /// extent is extended and preallocated, then the disk state commits the
    /// new size, then the descriptor's extent line and geometry are rewritten.
    /// A crash before the state is written leaves the old size (open cuts the
    /// extent back); after it, open rewrites the descriptor. Recovery points
    /// taken before keep their own size. A replica never shrinks: that would
    /// destroy the data past the new end.
    pub fn grow(&mut self, size: u64) -> Result<()> {
        self.check_usable()?;
        let old = self.state.size;
        if size == old {
            return Ok(());
        }
        if size < old {
            return Err(TargetError::Shrink {
                disk: self.state.disk.clone(),
                size: old,
                new_size: size,
            });
        }
        if !size.is_multiple_of(512) {
            return Err(TargetError::BadSize { size });
        }
        self.guarded(|s| {
            let f = s.opts.faults.clone();
            s.replica.grow(&f, size)?;
            let mut st = s.state.clone();
            st.size = size;
            s.write_state(&st)?;
            s.state = st;
            let cid = s.cid();
            s.replica.set_cid(&f, cid, true)?;
            info!(disk = %s.state.disk, old, size, "grew replica");
            Ok(())
        })
    }

    fn write_state(&self, st: &DiskState) -> Result<()> {
        let bytes = encode_state(&self.dir, st)?;
        self.opts.faults.write_atomic(&self.dir, STATE, &bytes)
    }

    /// Handles a barrier from the agent: a recovery point of the disk after
    /// every batch before the barrier's own sequence number, which it
    /// consumes. A replayed barrier changes nothing and returns its point
    /// (`None` if retention removed it since).
    ///
    /// The caller routes the barrier to the store of its disk (by its
    /// `disk` id); the store checks its place in the sequence. A barrier's
    /// time of 0 means "use the target's clock".
    pub fn barrier(&mut self, b: &Barrier, now_ms: u64) -> Result<Option<PointMeta>> {
        self.check_usable()?;
        let (generation, seq) = (b.generation.0, b.seq.0);
        let held = (self.state.generation, self.state.applied_seq);
        if !next_in_sequence(&self.state.disk, held, (generation, seq))? {
            return Ok(self
                .state
                .points
                .iter()
                .rev()
                .find(|p| p.generation == generation && p.marker_seq == seq)
                .cloned());
        }
        let time_ms = match b.timestamp_ns / 1_000_000 {
            0 => now_ms,
            t => t,
        };
        self.new_point(b.consistency, time_ms, Some((generation, seq)))
            .map(Some)
    }

    /// Creates a recovery point of the disk as it is now (the scheduler uses
    /// `NotConsistent`: nothing proves the write order at an arbitrary moment).
    pub fn create_point(&mut self, label: Consistency, now_ms: u64) -> Result<PointMeta> {
        self.new_point(label, now_ms, None)
    }

    /// Creates a point at the current data boundary; `marker` is the
    /// (generation, seq) of the barrier that asked for it, committed with it.
    fn new_point(
        &mut self,
        label: Consistency,
        now_ms: u64,
        marker: Option<(u64, u64)>,
    ) -> Result<PointMeta> {
        self.check_usable()?;
        self.guarded(|s| {
            s.checkpoint_inner()?;
            let f = s.opts.faults.clone();
            let id = s.state.next_point_id;
            let name = format!("point-{id:08}-{}.undo", s.state.next_file_no);
            let path = s.dir.join(&name);
            let seg = segment::create(&f, &path, id, s.state.size)?;
            f.sync_dir(&s.dir)?;
            let p = PointMeta {
                id,
                time_ms: now_ms,
                label,
                generation: marker.map_or(s.state.generation, |m| m.0),
                seq: s.state.applied_seq,
                marker_seq: marker.map_or(s.state.applied_seq, |m| m.1),
                segment: name,
                segment_len: segment::HEADER_LEN,
                size: Some(s.state.size),
            };
            let mut st = s.state.clone();
            if let Some((generation, seq)) = marker {
                // The barrier's sequence number becomes durable with the point.
                st.generation = generation;
                st.applied_seq = seq;
            }
            st.next_point_id += 1;
            st.next_file_no += 1;
            st.points.push(p.clone());
            s.write_state(&st)?;
            s.state = st;
            s.open_seg = Some(seg);
            s.cover = ExtentSet::new();
            info!(disk = %s.state.disk, point = id, seq = p.seq, label = label_name(label), "recovery point");
            Ok(p)
        })
    }

    /// Drops the points the policy does not keep; returns their ids.
    pub fn apply_retention(&mut self, policy: &RetentionPolicy, now_ms: u64) -> Result<Vec<u64>> {
        self.check_usable()?;
        if self.pins > 0 {
            // Removing a point rewrites segments an export is reading; the
            // next point after the export catches up.
            debug!(disk = %self.state.disk, "retention deferred while a point is exported");
            return Ok(Vec::new());
        }
        let stamps: Vec<PointStamp> = self
            .state
            .points
            .iter()
            .map(|p| PointStamp {
                id: p.id,
                time_ms: p.time_ms,
                label: p.label,
            })
            .collect();
        let keep = retain(&stamps, policy, now_ms);
        let drop: Vec<u64> = stamps
            .iter()
            .map(|p| p.id)
            .filter(|id| !keep.contains(id))
            .collect();
        for id in &drop {
            self.remove_point(*id)?;
        }
        Ok(drop)
    }

    /// Removes one point. The newest point cannot be removed (its segment is
    /// the one being written).
    pub fn remove_point(&mut self, id: u64) -> Result<()> {
        self.check_usable()?;
        if self.pins > 0 {
            return Err(TargetError::Unsupported {
                what: "removing a recovery point while a point of the disk is exported".into(),
                hint: "try again once the export has finished".into(),
            });
        }
        let Some(i) = self.state.points.iter().position(|p| p.id == id) else {
            return Err(TargetError::NoSuchPoint {
                disk: self.state.disk.clone(),
                point: id,
            });
        };
        if i + 1 == self.state.points.len() {
            return Err(TargetError::Unsupported {
                what: "removing the newest recovery point".into(),
                hint: "it is removed once a newer point exists".into(),
            });
        }
        self.guarded(|s| {
            let f = s.opts.faults.clone();
            let mut st = s.state.clone();
            let gone = st.points.remove(i);
            let mut obsolete = vec![gone.segment.clone()];
            if i > 0 {
                // The previous point needs the old contents `gone` saved for
                // blocks it has not saved itself: merge, older data first.
                let prev = st.points[i - 1].clone();
                let name = format!("point-{:08}-{}.undo", prev.id, st.next_file_no);
                st.next_file_no += 1;
                let len = s.merge_segments(&prev, &gone, &name)?;
                f.sync_dir(&s.dir)?;
                obsolete.push(prev.segment.clone());
                st.points[i - 1].segment = name;
                st.points[i - 1].segment_len = len;
            }
            s.write_state(&st)?;
            s.state = st;
            for name in obsolete {
                let p = s.dir.join(name);
                std::fs::remove_file(&p).map_err(|e| TargetError::io(&p, None, e))?;
            }
            f.sync_dir(&s.dir)?;
            info!(disk = %s.state.disk, point = id, "recovery point removed");
            Ok(())
        })
    }

    fn merge_segments(&self, older: &PointMeta, newer: &PointMeta, name: &str) -> Result<u64> {
        let f = &self.opts.faults;
        let size = self.state.size;
        let path = self.dir.join(name);
        let out = segment::create(f, &path, older.id, size)?;
        let mut pos = segment::HEADER_LEN;
        let mut cover = ExtentSet::new();
        let mut buf = Vec::new();
        for (k, meta) in [older, newer].into_iter().enumerate() {
            let seg_path = self.dir.join(&meta.segment);
            let idx = segment::scan(&seg_path, meta.segment_len, size)?;
            let file = File::open(&seg_path).map_err(|e| TargetError::io(&seg_path, None, e))?;
            for e in idx.entries {
                let parts = if k == 0 {
                    std::iter::once(e.offset..e.offset + e.len).collect()
                } else {
                    cover.uncovered(e.offset..e.offset + e.len)
                };
                for std::ops::Range { start: a, end: b } in parts {
                    match e.file_pos {
                        Some(at) => {
                            let mut data = vec![0u8; (b - a) as usize];
                            read_exact_at(&file, &seg_path, &mut data, at + (a - e.offset))?;
                            segment::encode_record(&mut buf, e.seq, a, &data);
                        }
                        None => segment::encode_zero_record(&mut buf, e.seq, a, (b - a) as u32),
                    }
                    if buf.len() >= 4 << 20 {
                        f.write_at(&out, &path, &buf, pos)?;
                        pos += buf.len() as u64;
                        buf.clear();
                    }
                }
                if k == 0 {
                    cover.insert(e.offset..e.offset + e.len);
                }
            }
        }
        f.write_at(&out, &path, &buf, pos)?;
        pos += buf.len() as u64;
        f.sync_data(&out, &path)?;
        Ok(pos)
    }

    /// The disk as it was at point `id`, readable at any offset.
    pub fn point_image(&mut self, id: u64) -> Result<PointImage<'_>> {
        self.checkpoint()?;
        let mut view = PointView::new(self, id)?;
        view.refresh(self)?;
        Ok(PointImage { store: self, view })
    }

    /// Keeps every recovery point (and its segment files) as they are until
    /// the matching [`DiskStore::unpin_points`]: a [`PointView`] read in steps
    /// between other calls relies on it. Retention is deferred meanwhile.
    pub fn pin_points(&mut self) {
        self.pins += 1;
    }

    pub fn unpin_points(&mut self) {
        self.pins = self.pins.saturating_sub(1);
    }

    /// Byte ranges that may differ between points `older` and `newer`: the
    /// union of the undo saved from `older` up to `newer`. Used for deltas.
    pub fn changed_between(&mut self, older: u64, newer: u64) -> Result<ExtentSet> {
        self.checkpoint()?;
        let pos = |id: u64| self.state.points.iter().position(|p| p.id == id);
        let (Some(a), Some(b)) = (pos(older), pos(newer)) else {
            return Err(TargetError::NoSuchPoint {
                disk: self.state.disk.clone(),
                point: if pos(older).is_none() { older } else { newer },
            });
        };
        let mut set = ExtentSet::new();
        for meta in &self.state.points[a.min(b)..a.max(b)] {
            let path = self.dir.join(&meta.segment);
            for e in segment::scan(&path, meta.segment_len, self.state.size)?.entries {
                set.insert(e.offset..e.offset + e.len);
            }
        }
        Ok(set)
    }

    /// Syncs everything and releases the store.
    pub fn close(mut self) -> Result<()> {
        self.checkpoint()
    }
}

/// The store as the simulation (and any driver of sequenced frames) sees it.
/// The caller has routed the frames to the store of their disk.
impl blockferry_proto::DurableApply for DiskStore {
    type Error = TargetError;

    fn apply_batches(&mut self, batches: &[blockferry_proto::ExtentBatch]) -> Result<()> {
        let disk = self.state.disk.clone();
        let batches: Vec<ApplyBatch> = batches
            .iter()
            .map(|b| ApplyBatch::from_proto(&disk, b))
            .collect();
        self.apply_many(&batches).map(drop)
    }

    fn apply_barrier(&mut self, barrier: &Barrier) -> Result<()> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        self.barrier(barrier, now_ms).map(drop)
    }

    fn durable(&self) -> (Generation, Seq) {
        (
            Generation(self.state.generation),
            Seq(self.state.applied_seq),
        )
    }
}

/// Saved bytes of the point: disk range `[start, end)` is at `pos` in
/// segment `file`, or was all zero (`pos` is `None`).
#[derive(Debug, Clone, Copy)]
struct Piece {
    end: u64,
    file: usize,
    pos: Option<u64>,
}

#[derive(Debug)]
struct SegFile {
    name: String,
    path: PathBuf,
    file: File,
    /// Committed length indexed so far.
    scanned: u64,
}

/// Where each byte of the disk at one recovery point `P` is: the undo saved
/// by the oldest point `>= P` whose segment holds it, else the replica.
///
/// The view is monotone, which is what lets an export read it in steps while
/// batches are applied in between: only the newest segment grows (sealed
/// segments never change), new points add newer segments, and a byte saved
/// by a segment is never saved by an older one later. So [`PointView::refresh`]
/// only indexes what was appended since the last refresh, and a byte read from
/// the replica is one no segment held yet — one not written since `P`.
/// Two conditions are the caller's: the journalled undo of the open point is
/// in its segment (a checkpoint) before each refresh, and no point is removed
/// while the view is used ([`DiskStore::pin_points`]).
#[derive(Debug)]
pub struct PointView {
    point: PointMeta,
    files: Vec<SegFile>,
    /// Disjoint saved ranges by start; gaps read from the replica.
    pieces: BTreeMap<u64, Piece>,
    cover: ExtentSet,
}

impl PointView {
    /// An empty view of point `id` of `store`; [`PointView::refresh`] fills it.
    pub fn new(store: &DiskStore, id: u64) -> Result<Self> {
        let point = store
            .state
            .points
            .iter()
            .find(|p| p.id == id)
            .cloned()
            .ok_or_else(|| TargetError::NoSuchPoint {
                disk: store.state.disk.clone(),
                point: id,
            })?;
        Ok(PointView {
            point,
            files: Vec::new(),
            pieces: BTreeMap::new(),
            cover: ExtentSet::new(),
        })
    }

    pub fn point(&self) -> &PointMeta {
        &self.point
    }

    /// The disk size at the point.
    pub fn size(&self, store: &DiskStore) -> u64 {
        self.point.size.unwrap_or(store.state.size)
    }

    /// Indexes the undo committed since the last refresh (all of it the
    /// first time).
    pub fn refresh(&mut self, store: &DiskStore) -> Result<()> {
        let Some(i) = store
            .state
            .points
            .iter()
            .position(|p| p.id == self.point.id)
        else {
            return Err(TargetError::NoSuchPoint {
                disk: store.state.disk.clone(),
                point: self.point.id,
            });
        };
        for (k, meta) in store.state.points[i..].iter().enumerate() {
            if k == self.files.len() {
                let path = store.dir.join(&meta.segment);
                let file = File::open(&path).map_err(|e| TargetError::io(&path, None, e))?;
                self.files.push(SegFile {
                    name: meta.segment.clone(),
                    path,
                    file,
                    scanned: segment::HEADER_LEN,
                });
            }
            let sf = &mut self.files[k];
            if sf.name != meta.segment || meta.segment_len < sf.scanned {
                // Only a removed point rewrites segments, and pins keep them.
                return Err(TargetError::corrupt(
                    &sf.path,
                    None,
                    format!(
                        "undo of point {} was rewritten while point {} was read",
                        meta.id, self.point.id
                    ),
                ));
            }
            if meta.segment_len == sf.scanned {
                continue;
            }
            let idx =
                segment::scan_range(&sf.path, sf.scanned, meta.segment_len, store.state.size)?;
            sf.scanned = meta.segment_len;
            for e in idx.entries {
                for std::ops::Range { start: a, end: b } in
                    self.cover.uncovered(e.offset..e.offset + e.len)
                {
                    self.pieces.insert(
                        a,
                        Piece {
                            end: b,
                            file: k,
                            pos: e.file_pos.map(|at| at + (a - e.offset)),
                        },
                    );
                }
                self.cover.insert(e.offset..e.offset + e.len);
            }
        }
        Ok(())
    }

    /// Ranges where the point differs from the current replica (may be a
    /// superset), as of the last refresh.
    pub fn differs_from_replica(&self) -> &ExtentSet {
        &self.cover
    }

    /// Reads the point at `offset`, as of the last refresh.
    pub fn read_at(&self, store: &DiskStore, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size(store);
        let end = match offset.checked_add(buf.len() as u64) {
            Some(e) if e <= size => e,
            _ => {
                return Err(TargetError::OutOfRange {
                    disk: store.state.disk.clone(),
                    offset,
                    len: buf.len() as u64,
                    size,
                });
            }
        };
        // The piece that starts before `offset` may reach into the range.
        let first = self
            .pieces
            .range(..offset)
            .next_back()
            .filter(|(_, p)| p.end > offset)
            .map(|(s, p)| (*s, *p));
        let rest = self.pieces.range(offset..end).map(|(s, p)| (*s, *p));
        let mut at = offset;
        for (start, p) in first.into_iter().chain(rest) {
            if start > at {
                let dst = &mut buf[(at - offset) as usize..(start - offset) as usize];
                store.replica.read_at(dst, at)?;
                at = start;
            }
            let to = p.end.min(end);
            let dst = &mut buf[(at - offset) as usize..(to - offset) as usize];
            let sf = &self.files[p.file];
            match p.pos {
                Some(pos) => read_exact_at(&sf.file, &sf.path, dst, pos + (at - start))?,
                None => dst.fill(0),
            }
            at = to;
        }
        if at < end {
            store
                .replica
                .read_at(&mut buf[(at - offset) as usize..], at)?;
        }
        Ok(())
    }
}

/// A read-only view of the disk at one recovery point.
#[derive(Debug)]
pub struct PointImage<'a> {
    store: &'a DiskStore,
    view: PointView,
}

impl PointImage<'_> {
    /// The disk size at the point (smaller than the replica's when the disk
    /// grew after it).
    pub fn size(&self) -> u64 {
        self.view.size(self.store)
    }

    pub fn point(&self) -> &PointMeta {
        self.view.point()
    }

    /// Ranges where the point differs from the current replica (may be a superset).
    pub fn differs_from_replica(&self) -> &ExtentSet {
        self.view.differs_from_replica()
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.view.read_at(self.store, buf, offset)
    }
}

impl crate::vmdk::DiskRead for PointImage<'_> {
    fn size(&self) -> u64 {
        PointImage::size(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), crate::vmdk::VmdkError> {
        PointImage::read_at(self, buf, offset).map_err(|e| crate::vmdk::VmdkError::Source {
            offset,
            source: Box::new(e),
        })
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        if !self.poisoned
            && self.wal_pos > 0
            && let Err(e) = self.checkpoint_inner()
        {
            warn!(disk = %self.state.disk, error = %e, "checkpoint on close failed; the journal is replayed on next open");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::raw_chunk;

    fn batch(generation: u64, seq: u64) -> ApplyBatch {
        ApplyBatch {
            disk: "d".into(),
            generation,
            seq,
            chunks: vec![raw_chunk(seq * 4096 % (1 << 20), vec![seq as u8; 4096])],
        }
    }

    fn barrier(generation: u64, seq: u64) -> Barrier {
        Barrier {
            disk: blockferry_proto::DiskId::default(),
            generation: Generation(generation),
            seq: Seq(seq),
            consistency: Consistency::CrashConsistent,
            timestamp_ns: 0,
        }
    }

    fn store(dir: &Path) -> DiskStore {
        DiskStore::create(dir, "d", 1 << 20, 1, StoreOptions::default()).unwrap()
    }

    #[test]
    fn a_newer_generation_continues_the_sequence_count() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = store(tmp.path());
        s.apply_many(&[batch(1, 1), batch(1, 2)]).unwrap();
        assert_eq!(s.apply(&batch(2, 3)).unwrap(), ApplyOutcome::Applied);
        assert_eq!((s.generation(), s.applied_seq()), (2, 3));
        // Across a reopen the count goes on from where it was durable.
        drop(s);
        let mut s = DiskStore::open(tmp.path(), "d", StoreOptions::default()).unwrap();
        assert_eq!((s.generation(), s.applied_seq()), (2, 3));
        assert!(s.barrier(&barrier(2, 4), 5).unwrap().is_some());
        assert_eq!(s.apply(&batch(3, 5)).unwrap(), ApplyOutcome::Applied);
    }

    #[test]
    fn a_newer_generation_restarting_the_count_is_refused_as_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = store(tmp.path());
        s.apply_many(&[batch(1, 1), batch(1, 2)]).unwrap();
        let err = s.apply(&batch(2, 1)).unwrap_err();
        assert!(
            matches!(
                err,
                TargetError::ReusedSeq {
                    generation: 2,
                    got: 1,
                    held: 2,
                    ..
                }
            ),
            "{err}"
        );
        let err = s.barrier(&barrier(2, 2), 5).unwrap_err();
        assert!(matches!(err, TargetError::ReusedSeq { .. }), "{err}");
        // Nothing was applied: the next frame is still 3.
        assert_eq!((s.generation(), s.applied_seq()), (1, 2));
    }

    #[test]
    fn a_stale_generation_is_refused_after_a_generation_change() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = store(tmp.path());
        s.apply_many(&[batch(1, 1), batch(2, 2)]).unwrap();
        let err = s.apply(&batch(1, 3)).unwrap_err();
        assert!(
            matches!(
                err,
                TargetError::StaleGeneration {
                    got: 1,
                    current: 2,
                    ..
                }
            ),
            "{err}"
        );
        let err = s.barrier(&barrier(1, 3), 5).unwrap_err();
        assert!(matches!(err, TargetError::StaleGeneration { .. }), "{err}");
    }

    #[test]
    fn a_gap_in_a_group_rejects_the_whole_group() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = store(tmp.path());
        let err = s.apply_many(&[batch(1, 1), batch(2, 3)]).unwrap_err();
        assert!(
            matches!(
                err,
                TargetError::Gap {
                    got: 3,
                    expected: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(s.applied_seq(), 0);
        // A replay of a durable frame of the current generation is a duplicate.
        s.apply(&batch(1, 1)).unwrap();
        assert_eq!(s.apply(&batch(1, 1)).unwrap(), ApplyOutcome::Duplicate);
    }

    #[test]
    fn the_state_file_keeps_label_text() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = store(tmp.path());
        s.create_point(Consistency::AppConsistent, 7).unwrap();
        let text = std::fs::read_to_string(s.dir().join(STATE)).unwrap();
        assert!(text.contains("\"label\": \"app-consistent\""), "{text}");
        drop(s);
        let points = list_points(tmp.path(), "d").unwrap();
        assert_eq!(points[0].label, Consistency::AppConsistent);
    }
}
