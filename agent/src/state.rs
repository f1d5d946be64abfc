//! The agent's durable state: which disks it protects, their generation, how far the
//! initial sync got, and whether the last stop was clean. A clean restart needs no
//! resync; an unclean one resyncs by checksum, never by full copy.
//!
//! Written crash-safely with [`blockferry_durable::replace_file`], so a crash at any
//! moment leaves either the old or the new state; a new state directory has its
//! parent fsynced, so it survives a crash too.
//!
//! Beside it, each protected device's [`GenerationRecord`] (`<disk id>.generation`,
//! a [`CopyRole::Source`]): its lineage in the DR cycle. A disk protected
//! before records existed gets one when the service starts (a migration), in
//! the wire generation its state holds. A new record starts in the disk's
//! root generation ([`GenerationId::root`]), the one a new replica starts in
//! too, so the replica made by the stream shares the source's lineage without
//! ids travelling. A stream restarted under a newer wire number (a resync, a
//! resize) keeps its generation id ([`restarted_record`]); only a fenced
//! source (its replica was promoted elsewhere) detaches into a generation of
//! its own, with a random id, so that what it writes from then on is told
//! apart from what the promoted copy holds. `blockferry-agent reprotect`
//! installs a promoted copy's record in place of the agent's (the disk
//! continues that copy's lineage), and `handoff` demotes the record once the
//! replica holds the final point.

use std::collections::BTreeMap;
use std::path::PathBuf;

use blockferry_durable::DurableError;

use blockferry_proto::ids::DiskId;
use blockferry_proto::{
    CopyRole, Generation, GenerationEntry, GenerationId, GenerationRecord, Seq,
};
use serde::{Deserialize, Serialize};

const FILE: &str = "agent-state.json";
/// Held (flock) by the process that owns the state: `run` and `handoff`.
const LOCK_FILE: &str = "agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {op} agent state {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent state not saved; check that the state directory is writable and has space")]
    Save(#[from] DurableError),
    #[error(
        "agent state {path} is damaged ({message}); move it away to start over with a checksum resync of every disk"
    )]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "another blockferry-agent (the service, or a handoff) holds {path}: stop it first (for example `systemctl stop blockferry-agent`), then run this again"
    )]
    Busy { path: PathBuf },
    #[error(
        "generation record {path} is damaged ({message}); move it away to adopt the disk's current generation (a later reprotect then compares by checksum)"
    )]
    CorruptRecord { path: PathBuf, message: String },
}

/// Where the initial copy of a disk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum SyncPhase {
    /// Copying the whole disk; everything below `next_offset` is durable at the target.
    InitialSync { next_offset: u64 },
    /// Comparing hashes with the target; only differing chunks travel.
    Resync,
    /// Replicating tracked changes.
    Continuous,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskState {
    pub path: PathBuf,
    pub size: u64,
    /// Bumped whenever tracking was lost and a resync starts a new history.
    pub generation: u64,
    pub phase: SyncPhase,
    /// Unix seconds of the last completed resync, if any.
    pub last_resync: Option<u64>,
    /// Set once the disk's replica was promoted elsewhere: nothing is shipped
    /// (tracking goes on) until the disk is protected again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<Fence>,
    /// Set once `blockferry-agent handoff` brought the disk to RPO zero and
    /// demoted its record: the other site's copy takes over, nothing is
    /// shipped (tracking goes on) until the disk is reprotected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed_off: Option<HandOff>,
    /// Set by `blockferry-agent reprotect` until the first checksum resync
    /// after it completes: the stream continues a promoted copy's record,
    /// whose replica already holds everything through `seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprotected: Option<Reprotected>,
}

impl DiskState {
    /// A disk seen for the first time: an initial sync from offset zero in
    /// wire generation 1.
    pub fn new(path: PathBuf, size: u64) -> Self {
        DiskState {
            path,
            size,
            generation: 1,
            phase: SyncPhase::InitialSync { next_offset: 0 },
            last_resync: None,
            fenced: None,
            handed_off: None,
            reprotected: None,
        }
    }

    /// The entry of a disk reprotected from a promoted copy's `record`: the
    /// device at `path` of `size` bytes starts with a checksum resync in the
    /// record's wire generation; no sequence at or below the record's is
    /// used again.
    pub fn reprotected(path: PathBuf, size: u64, record: &GenerationRecord, now_s: u64) -> Self {
        DiskState {
            generation: record.current().number.0,
            phase: SyncPhase::Resync,
            reprotected: Some(Reprotected {
                seq: record.current().seq.0,
                since: now_s,
            }),
            ..DiskState::new(path, size)
        }
    }

    /// Whether `run` protects the disk now: not fenced, not handed off.
    pub fn is_protected(&self) -> bool {
        self.fenced.is_none() && self.handed_off.is_none()
    }
}

/// The planned failover of a disk to its replica, done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandOff {
    /// The final point: the replica holds everything through it.
    pub final_seq: u64,
    /// The wire generation of the final point.
    pub generation: u64,
    /// Unix seconds when the hand-off completed.
    pub since: u64,
}

impl HandOff {
    /// What the user should do, for `status`.
    pub fn advice(&self) -> String {
        format!(
            "handed off: the replica holds everything through seq {} (a planned failover); nothing is shipped (writes are still tracked). Fail over on the replica's site (`blockferry-target failover --planned --store STORE --disk ID --point latest`), then reprotect this disk from the promoted copy",
            self.final_seq
        )
    }
}

/// A disk reprotected from a promoted copy's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reprotected {
    /// The record's sequence: the target's seed starts there, so the stream's
    /// first frame must come after it.
    pub seq: u64,
    /// Unix seconds of the reprotect.
    pub since: u64,
}

/// Why and since when a disk is fenced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    /// The generation the promoted copy holds: frames of ours are refused.
    pub by_generation: u64,
    /// Unix seconds when the refusal arrived.
    pub since: u64,
}

impl Fence {
    /// What the user should do, for `status` and the log.
    pub fn advice(&self) -> String {
        format!(
            "fenced: the replica was promoted to generation {}; nothing is shipped (writes are still tracked). Fail back or reprotect from the promoted copy, or protect this disk as a new one",
            self.by_generation
        )
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// False from the moment the service starts until it has stopped cleanly.
    pub clean_shutdown: bool,
    pub disks: BTreeMap<String, DiskState>,
}

impl AgentState {
    pub fn disk(&self, id: &DiskId) -> Option<&DiskState> {
        self.disks.get(&id.to_string())
    }

    pub fn disk_mut(&mut self, id: &DiskId) -> Option<&mut DiskState> {
        self.disks.get_mut(&id.to_string())
    }

    pub fn set_disk(&mut self, id: &DiskId, disk: DiskState) {
        self.disks.insert(id.to_string(), disk);
    }
}

/// The state file in a state directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Loads the state; a missing file is a first start (an empty state, clean).
    pub fn load(&self) -> Result<AgentState, StateError> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentState {
                clean_shutdown: true,
                disks: BTreeMap::new(),
            }),
            Err(source) => Err(StateError::Io {
                op: "read",
                path,
                source,
            }),
        }
    }

    /// Takes the state directory for this process (creating it if needed):
    /// refused while another process holds it. Released when the lock is
    /// dropped or the process dies.
    pub fn lock(&self) -> Result<StateLock, StateError> {
        blockferry_durable::create_dir_all(&self.dir)?;
        let path = self.dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StateError::Io {
                op: "open",
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(StateLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(StateError::Busy { path }),
            Err(std::fs::TryLockError::Error(source)) => Err(StateError::Io {
                op: "lock",
                path,
                source,
            }),
        }
    }

    /// The generation record file of `disk`.
    pub fn record_path(&self, disk: &DiskId) -> PathBuf {
        self.dir.join(format!("{disk}.generation"))
    }

    /// The record of `disk`; a disk without one (protected before records
    /// existed, or new) gets a source record in `generation`, saved now.
    pub fn load_record(
        &self,
        disk: &DiskId,
        generation: Generation,
    ) -> Result<GenerationRecord, StateError> {
        let path = self.record_path(disk);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let r =
                    GenerationRecord::decode(&bytes).map_err(|e| StateError::CorruptRecord {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
                if r.disk() != *disk {
                    return Err(StateError::CorruptRecord {
                        path,
                        message: format!("it names disk {}", r.disk()),
                    });
                }
                Ok(r)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let r = new_record(*disk, generation);
                self.save_record(&r)?;
                Ok(r)
            }
            Err(source) => Err(StateError::Io {
                op: "read",
                path,
                source,
            }),
        }
    }

    /// Replaces the record of its disk durably.
    pub fn save_record(&self, record: &GenerationRecord) -> Result<(), StateError> {
        blockferry_durable::create_dir_all(&self.dir)?;
        blockferry_durable::replace_file(
            &self.record_path(&record.disk()),
            &record.encode(),
            None,
        )?;
        Ok(())
    }

    /// Replaces the state durably.
    pub fn save(&self, state: &AgentState) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StateError::Corrupt {
            path: self.path(),
            message: e.to_string(),
        })?;
        blockferry_durable::create_dir_all(&self.dir)?;
        blockferry_durable::replace_file(&self.path(), &bytes, None)?;
        Ok(())
    }
}

/// The state directory taken by this process ([`StateStore::lock`]).
#[derive(Debug)]
pub struct StateLock {
    _file: std::fs::File,
}

/// A fresh random generation id.
pub fn random_generation_id() -> GenerationId {
    GenerationId::from_bytes(rand::random())
}

/// The record of a disk that has none yet: a source in the disk's root
/// generation (the same id a new replica of it starts in), with the wire
/// number `generation` its state holds.
pub fn new_record(disk: DiskId, generation: Generation) -> GenerationRecord {
    GenerationRecord::new(
        disk,
        CopyRole::Source,
        GenerationEntry {
            id: GenerationId::root(disk),
            number: generation,
            seq: Seq::ZERO,
        },
    )
}

/// `record` after its stream restarted under wire number `number` (a
/// checksum resync, a resize) having shipped through `held`: the same data
/// generation, renumbered. The replica renumbers too when it follows, so no
/// fork appears in either lineage.
pub fn restarted_record(
    record: &GenerationRecord,
    number: Generation,
    held: Seq,
) -> Result<GenerationRecord, blockferry_proto::GenerationError> {
    let mut r = record.clone();
    r.set_seq(r.current().seq.max(held))?;
    r.renumber(number)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_without_a_record_gets_a_source_record_in_its_generation() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        let id = DiskId::from_bytes([7; 16]);
        let r = store.load_record(&id, Generation(3)).unwrap();
        assert_eq!(r.role(), CopyRole::Source);
        assert_eq!(r.current().number, Generation(3));
        assert!(store.record_path(&id).exists(), "the migration saves it");
        assert_eq!(store.load_record(&id, Generation(9)).unwrap(), r);
    }

    #[test]
    fn a_new_record_starts_in_the_root_generation_of_its_disk() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        let id = DiskId::from_bytes([7; 16]);
        let r = store.load_record(&id, Generation(1)).unwrap();
        assert_eq!(r.current().id, GenerationId::root(id));
        assert!(r.history().is_empty());
        let other = StateStore::new(dir.path().join("other"));
        assert_eq!(
            other.load_record(&id, Generation(1)).unwrap().current().id,
            r.current().id,
            "every copy of the disk starts in the same generation"
        );
    }

    #[test]
    fn a_restarted_stream_keeps_its_generation_id_under_a_newer_number() {
        let id = DiskId::from_bytes([7; 16]);
        let r = new_record(id, Generation(1));
        let next = restarted_record(&r, Generation(2), Seq(40)).unwrap();
        assert_eq!(next.current().id, r.current().id);
        assert_eq!(next.current().number, Generation(2));
        assert_eq!(next.current().seq, Seq(40));
        assert!(next.history().is_empty(), "no fork: {}", next.lineage());
        assert!(
            restarted_record(&next, Generation(1), Seq(40)).is_err(),
            "a number never goes back"
        );
    }

    #[test]
    fn a_detached_record_persists() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        let id = DiskId::from_bytes([7; 16]);
        let mut r = store.load_record(&id, Generation(1)).unwrap();
        let old = r.current();
        r.detach(random_generation_id()).unwrap();
        store.save_record(&r).unwrap();
        let again = store.load_record(&id, Generation(1)).unwrap();
        assert_eq!(again, r);
        assert_eq!(again.history()[0], old);
        assert_eq!(again.current().number, Generation(2));
    }

    #[test]
    fn a_damaged_record_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        let id = DiskId::from_bytes([7; 16]);
        std::fs::write(store.record_path(&id), b"junk").unwrap();
        let e = store.load_record(&id, Generation(1)).unwrap_err();
        assert!(e.to_string().contains("move it away"), "{e}");
    }

    #[test]
    fn state_without_a_fence_reads_as_not_fenced() {
        let json = r#"{"clean_shutdown":true,"disks":{"d":{"path":"/dev/vdb","size":512,"generation":1,"phase":{"phase":"continuous"},"last_resync":null}}}"#;
        let s: AgentState = serde_json::from_str(json).unwrap();
        assert_eq!(s.disks["d"].fenced, None);
        assert_eq!(s.disks["d"].handed_off, None);
        assert_eq!(s.disks["d"].reprotected, None);
        assert!(s.disks["d"].is_protected());
    }

    #[test]
    fn a_reprotected_entry_resyncs_in_the_records_generation_after_its_seq() {
        let id = DiskId::from_bytes([7; 16]);
        let mut r = new_record(id, Generation(3));
        r.set_seq(Seq(120)).unwrap();
        let d = DiskState::reprotected("/dev/loop3".into(), 4096, &r, 50);
        assert_eq!(d.phase, SyncPhase::Resync);
        assert_eq!(d.generation, 3);
        assert_eq!(
            d.reprotected,
            Some(Reprotected {
                seq: 120,
                since: 50
            })
        );
        assert!(d.is_protected());
    }

    #[test]
    fn the_state_directory_is_taken_by_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state"));
        let held = store.lock().unwrap();
        let e = store.lock().unwrap_err();
        assert!(matches!(e, StateError::Busy { .. }), "{e}");
        assert!(e.to_string().contains("stop it first"), "{e}");
        drop(held);
        store.lock().expect("free again once released");
    }

    #[test]
    fn missing_state_is_a_clean_first_start() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::new(dir.path()).load().unwrap();
        assert!(s.clean_shutdown);
        assert!(s.disks.is_empty());
    }

    #[test]
    fn state_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        let id = DiskId::from_bytes([7; 16]);
        let mut s = AgentState::default();
        s.set_disk(
            &id,
            DiskState {
                path: "/dev/vdb".into(),
                size: 1 << 30,
                generation: 3,
                phase: SyncPhase::InitialSync { next_offset: 4096 },
                last_resync: None,
                fenced: Some(Fence {
                    by_generation: 4,
                    since: 17,
                }),
                handed_off: Some(HandOff {
                    final_seq: 9,
                    generation: 3,
                    since: 18,
                }),
                reprotected: Some(Reprotected { seq: 5, since: 16 }),
            },
        );
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), s);
    }

    #[test]
    fn save_creates_the_missing_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("a/b"));
        store.save(&AgentState::default()).unwrap();
        assert_eq!(store.load().unwrap(), AgentState::default());
    }

    #[test]
    fn damaged_state_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        let e = StateStore::new(dir.path()).load().unwrap_err();
        assert!(e.to_string().contains("move it away"), "{e}");
    }
}
