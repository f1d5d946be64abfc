//! The per-disk replica store: one directory per protected disk holding the
//! replica VMDK, the redo journal (`journal.wal`), the undo segments of the
//! recovery points (`*.undo`), the disk state (`state.json`) and the
//! replica's generation record (`generation.rec`).
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
//!
//! # Seeds
//! A store may keep its replica outside its directory: an existing disk taken
//! as the replica ([`DiskStore::create_seed`], reprotect), a block device or
//! a VMDK, named by its absolute path in the state ([`ExternalReplica`]) and
//! reopened from there. The store's own files (journal, undo segments, state,
//! record) stay in its directory; creating it writes nothing to the seed. A
//! seed cannot grow, and it is complete only after its first checksum resync
//! ends with a barrier.
//!
//! By job: this file holds the disk state and opening; `apply` the apply path,
//! checkpoint and growth; `recovery` the replay after a crash; `points` the
//! recovery points, retention and pins; `view` reading a point;
//! `generation` the generation record and promotion.

mod apply;
pub mod generation;
mod points;
mod recovery;
#[cfg(test)]
mod seed_tests;
#[cfg(test)]
mod tests;
mod view;

pub use apply::next_in_sequence;
pub use points::{PointPins, label_name, parse_label};
use recovery::preallocate_journal;
pub use view::{PointImage, PointView};

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockferry_proto::Consistency;
use blockferry_proto::extent::ExtentSet;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::batch::Undo;
use crate::crashsafe::FaultPlan;
use crate::error::{Result, TargetError};
use crate::replica::{DeviceReplica, FlatReplica, Replica, SparseReplica, VmdkSeedReplica};

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
    #[serde(with = "points::label_text")]
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
    /// Cut while the replica was incomplete (before the initial sync or a
    /// resync finished): its data is a mix of old and new blocks, so it is
    /// neither exported nor failed over to without `--force`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incomplete: bool,
}

/// What kind of existing disk a seed is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeedKind {
    /// A block device, written in place.
    Device,
    /// A VMDK: a flat (vmfs or monolithicFlat) descriptor with its extent,
    /// or a monolithicSparse file.
    Vmdk,
}

impl SeedKind {
    /// The kind of the disk at `path`: a block device, else a VMDK.
    pub fn detect(path: &Path) -> Result<SeedKind> {
        use std::os::unix::fs::FileTypeExt;
        let meta = std::fs::metadata(path).map_err(|e| TargetError::io(path, None, e))?;
        if meta.file_type().is_block_device() {
            Ok(SeedKind::Device)
        } else if meta.is_file() {
            Ok(SeedKind::Vmdk)
        } else {
            Err(TargetError::NotASeed {
                path: path.to_path_buf(),
                reason: "neither a block device nor a VMDK file".into(),
            })
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SeedKind::Device => "device",
            SeedKind::Vmdk => "vmdk",
        }
    }
}

/// A replica that lives outside the store's directory: an existing disk
/// taken as the seed of a reprotect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalReplica {
    pub kind: SeedKind,
    /// Absolute: the store is opened from any working directory.
    pub path: PathBuf,
}

impl ExternalReplica {
    /// The seed at `path`, of the kind found there. `path` must be absolute.
    pub fn at(path: &Path) -> Result<ExternalReplica> {
        if !path.is_absolute() {
            return Err(TargetError::NotASeed {
                path: path.to_path_buf(),
                reason: "the path must be absolute (it is kept in the store's state)".into(),
            });
        }
        Ok(ExternalReplica {
            kind: SeedKind::detect(path)?,
            path: path.to_path_buf(),
        })
    }

    /// Opens the seed: writable (a device exclusively) or read-only.
    pub fn open(&self, writable: bool) -> Result<Box<dyn Replica>> {
        Ok(match self.kind {
            SeedKind::Device => Box::new(DeviceReplica::open(&self.path, writable)?),
            SeedKind::Vmdk => Box::new(VmdkSeedReplica::open(&self.path, writable)?),
        })
    }
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
    /// The replica holds a whole copy of the source: a barrier arrived since
    /// the disk was created or a resync last began (the agent sends barriers
    /// only once its initial sync or resync is done). States written before
    /// this existed read as incomplete until the next barrier.
    #[serde(default)]
    complete: bool,
    /// The replica is an existing disk outside the store (a seed); `replica`
    /// and `thin` do not apply then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    external: Option<ExternalReplica>,
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
    /// The replica's generation record, in step with `state.generation`.
    record: blockferry_proto::GenerationRecord,
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

pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
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

/// A store as its files describe it, read without locking it.
#[derive(Debug, Clone)]
pub struct StoreSummary {
    pub dir: PathBuf,
    pub size: u64,
    pub generation: u64,
    pub applied_seq: u64,
    pub complete: bool,
    /// The seed the replica is, if it is one.
    pub seed: Option<ExternalReplica>,
    /// The generation record (`None` in a store written before records).
    pub record: Option<blockferry_proto::GenerationRecord>,
    /// The newest recovery point's sequence.
    pub latest_point_seq: Option<u64>,
}

/// The store of `disk` under `root` as its state and record files say,
/// without locking it; `None` when there is no committed store.
pub fn summary(root: &Path, disk: &str) -> Result<Option<StoreSummary>> {
    let dir = disk_dir(root, disk)?;
    if !dir.join(STATE).exists() {
        return Ok(None);
    }
    let st = read_state(&dir)?;
    let record = generation::read(&dir)?;
    Ok(Some(StoreSummary {
        size: st.size,
        generation: st.generation,
        applied_seq: st.applied_seq,
        complete: st.complete,
        seed: st.external,
        record,
        latest_point_seq: st.points.last().map(|p| p.seq),
        dir,
    }))
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
        crate::crashsafe::create_dir_all(&dir)?;
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
            complete: false,
            external: None,
        };
        // The record first: the state file is the commit point of creation.
        let record = generation::migrated(&state);
        generation::write(f, &dir, &record)?;
        f.write_atomic(&dir, STATE, &encode_state(&dir, &state)?)?;
        info!(disk, size, "created replica");
        Ok(DiskStore::assemble(
            dir, state, replica, wal, wal_path, opts, record, lock,
        ))
    }

    /// Creates the store of `disk` around an existing disk, the `seed`
    /// (reprotect): the journal, state and `record` in the store's
    /// directory, the replica being the seed itself. Nothing is written to
    /// the seed. The store holds `record`'s current generation through its
    /// sequence, so the source's frames (its wire generation or a newer one,
    /// the sequence after the record's) pass the sequence check; the replica
    /// is incomplete until the first checksum resync ends with a barrier.
    pub fn create_seed(
        root: &Path,
        disk: &str,
        seed: &ExternalReplica,
        record: blockferry_proto::GenerationRecord,
        now_ms: u64,
        opts: StoreOptions,
    ) -> Result<Self> {
        let dir = disk_dir(root, disk)?;
        if record.disk() != generation::disk_id_of(disk) {
            return Err(TargetError::Generation {
                disk: disk.to_string(),
                source: blockferry_proto::GenerationError::WrongDisk {
                    ours: generation::disk_id_of(disk),
                    theirs: record.disk(),
                },
            });
        }
        // The seed first: a busy or unusable seed leaves no directory behind.
        let replica = seed.open(true)?;
        let size = replica.size();
        if size == 0 || !size.is_multiple_of(512) {
            return Err(TargetError::NotASeed {
                path: seed.path.clone(),
                reason: format!("its size {size} is not a positive multiple of 512 bytes"),
            });
        }
        crate::crashsafe::create_dir_all(&dir)?;
        let lock = lock_dir(&dir)?;
        if dir.join(STATE).exists() {
            return Err(TargetError::Exists {
                disk: disk.to_string(),
                path: dir,
            });
        }
        let f = &opts.faults;
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
        let cur = record.current();
        let state = DiskState {
            format: STATE_FORMAT,
            disk: disk.to_string(),
            size,
            generation: cur.number.0,
            applied_seq: cur.seq.0,
            wal_epoch: 1,
            created_ms: now_ms,
            replica: seed.path.display().to_string(),
            thin: false,
            next_point_id: 1,
            next_file_no: 1,
            points: Vec::new(),
            complete: false,
            external: Some(seed.clone()),
        };
        // The record first: the state file is the commit point of creation.
        generation::write(f, &dir, &record)?;
        f.write_atomic(&dir, STATE, &encode_state(&dir, &state)?)?;
        info!(disk, size, seed = %seed.path.display(), kind = seed.kind.name(), generation = cur.number.0, applied_seq = cur.seq.0, "created a seed replica");
        Ok(DiskStore::assemble(
            dir, state, replica, wal, wal_path, opts, record, lock,
        ))
    }

    /// A store over its opened parts, with nothing journalled or pending yet.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        dir: PathBuf,
        state: DiskState,
        replica: Box<dyn Replica>,
        wal: File,
        wal_path: PathBuf,
        opts: StoreOptions,
        record: blockferry_proto::GenerationRecord,
        lock: File,
    ) -> DiskStore {
        DiskStore {
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
            record,
            _lock: lock,
        }
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
        let mut state = read_state(&dir)?;
        let (record, completed) = generation::open_record(&opts.faults, &dir, &state)?;
        if let Some(st) = completed {
            // A promotion committed its record but not yet the state.
            opts.faults
                .write_atomic(&dir, STATE, &encode_state(&dir, &st)?)?;
            state = st;
        }
        let replica: Box<dyn Replica> = if let Some(seed) = &state.external {
            // A promoted seed belongs to the workload: read it, never hold it.
            let r = seed.open(record.role() != blockferry_proto::CopyRole::Source)?;
            if r.size() != state.size {
                return Err(TargetError::corrupt(
                    &seed.path,
                    None,
                    format!(
                        "the seed is {} bytes, the store's disk {} bytes: it was resized or replaced; reprotect onto it again",
                        r.size(),
                        state.size
                    ),
                ));
            }
            r
        } else if state.thin {
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
        let mut s = DiskStore::assemble(dir, state, replica, wal, wal_path, opts, record, lock);
        s.recover()?;
        // The journal replay may have applied a newer wire generation.
        if generation::in_step(&mut s.record, &s.state)? {
            generation::write(&s.opts.faults, &s.dir, &s.record)?;
        }
        Ok(s)
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

    /// Whether the replica holds a whole copy of the source (see
    /// [`PointMeta::incomplete`]).
    pub fn is_complete(&self) -> bool {
        self.state.complete
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

    /// The existing disk this store's replica is (a seed), if it is one.
    pub fn seed(&self) -> Option<&ExternalReplica> {
        self.state.external.as_ref()
    }

    /// The raw flat extent of a vmfs replica (`None` for a thin one and
    /// for a seed, which is no file of the store's).
    pub fn flat_extent_path(&self) -> Option<PathBuf> {
        (!self.state.thin && self.state.external.is_none()).then(|| {
            self.dir
                .join(crate::replica::flat_name_for(&self.state.replica))
        })
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

    /// Syncs everything and releases the store.
    pub fn close(mut self) -> Result<()> {
        self.checkpoint()
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
