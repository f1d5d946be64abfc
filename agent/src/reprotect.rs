//! `blockferry-agent reprotect`: this agent takes over as the source of a
//! disk whose replica was promoted (failover) on this host: it installs the
//! promoted copy's generation record as its own and starts the disk with a
//! checksum resync against the target's seed, so that only differing chunks
//! travel.
//!
//! The record is the promoted replica's `STORE/ID/generation.rec`, copied
//! from the target host. Its wire generation is the stream's, and its
//! sequence is where the target's seed starts (the seed store made by
//! `blockferry-target reprotect` holds applied seq = that sequence): the
//! stream's first frame comes after it. The checks ([`check`]) are sans-IO;
//! [`reprotect`] reads and writes the files, under the state directory's
//! lock, so the service cannot run meanwhile.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use blockferry_proto::ids::DiskId;
use blockferry_proto::{CopyRole, GenerationRecord};
use serde::Serialize;

use crate::config::Config;
use crate::state::{DiskState, StateError, StateStore, SyncPhase};

#[derive(Debug, thiserror::Error)]
pub enum ReprotectError {
    #[error("disk {0} is not in the configuration: add a [[disk]] entry with its device first")]
    NotConfigured(DiskId),
    #[error("cannot read the record {path}: {source}")]
    ReadRecord {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a generation record ({message}): give the promoted replica's STORE/ID/generation.rec"
    )]
    BadRecord { path: PathBuf, message: String },
    #[error(
        "the record is of disk {record}, not of disk {disk}: give the generation.rec of this disk's store"
    )]
    WrongDisk { disk: DiskId, record: DiskId },
    #[error(
        "the record is a {role}'s, not a promoted copy's: fail the disk over on this host first (`blockferry-target failover`), then give the promoted record"
    )]
    NotPromoted { role: CopyRole },
    #[error(
        "disk {disk} is protected by this agent (state {state}): reprotecting would drop that protection; fail it over first, or give --force"
    )]
    Protected { disk: DiskId, state: &'static str },
    #[error("cannot open {path} to read its size: {source}")]
    Device {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

/// What `reprotect` installed, as printed (`--json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reprotected {
    pub disk: String,
    pub device: String,
    pub size: u64,
    /// The stream's wire generation (the record's current number).
    pub generation: u64,
    /// The record's sequence: the stream continues after it.
    pub seq: u64,
    /// The record's generations, newest first.
    pub lineage: String,
    /// The phase `run` starts the disk in.
    pub phase: &'static str,
}

/// Whether `record` may replace the agent's view of `disk`, whose state entry
/// is `existing`.
pub fn check(
    disk: DiskId,
    record: &GenerationRecord,
    existing: Option<&DiskState>,
    force: bool,
) -> Result<(), ReprotectError> {
    if record.disk() != disk {
        return Err(ReprotectError::WrongDisk {
            disk,
            record: record.disk(),
        });
    }
    if record.role() != CopyRole::Source {
        return Err(ReprotectError::NotPromoted {
            role: record.role(),
        });
    }
    if let Some(d) = existing
        && d.is_protected()
        && !force
    {
        return Err(ReprotectError::Protected {
            disk,
            state: crate::status::disk_state(d),
        });
    }
    Ok(())
}

/// Installs the record at `record_path` as `disk`'s and resets its state
/// entry to a checksum resync (see the module docs). The agent's previous
/// record, if any, is kept beside it as `ID.generation.before-reprotect`.
pub fn reprotect(
    config: &Config,
    disk: DiskId,
    record_path: &Path,
    force: bool,
) -> Result<Reprotected, ReprotectError> {
    let dc = config
        .disks
        .iter()
        .find(|d| d.id == disk)
        .ok_or(ReprotectError::NotConfigured(disk))?;
    let bytes = std::fs::read(record_path).map_err(|source| ReprotectError::ReadRecord {
        path: record_path.to_owned(),
        source,
    })?;
    let record = GenerationRecord::decode(&bytes).map_err(|e| ReprotectError::BadRecord {
        path: record_path.to_owned(),
        message: e.to_string(),
    })?;
    let store = StateStore::new(&config.state_dir);
    let _lock = store.lock()?;
    let mut state = store.load()?;
    check(disk, &record, state.disk(&disk), force)?;
    let size = std::fs::File::open(&dc.path)
        .and_then(|f| crate::reader::device_size(&f))
        .map_err(|source| ReprotectError::Device {
            path: dc.path.clone(),
            source,
        })?;

    let old_record = store.record_path(&disk);
    match std::fs::read(&old_record) {
        Ok(old) => blockferry_durable::replace_file(
            &old_record.with_extension("generation.before-reprotect"),
            &old,
            None,
        )
        .map_err(StateError::from)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(StateError::Io {
                op: "read",
                path: old_record,
                source,
            }
            .into());
        }
    }
    // The record first: a crash before the state is saved leaves the old
    // entry with the new record, which the next `reprotect` replaces again
    // (and `run` would compare by checksum in the record's generation).
    store.save_record(&record)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let entry = DiskState::reprotected(dc.path.clone(), size, &record, now);
    debug_assert_eq!(entry.phase, SyncPhase::Resync);
    state.set_disk(&disk, entry);
    store.save(&state)?;
    Ok(Reprotected {
        disk: disk.to_string(),
        device: dc.path.display().to_string(),
        size,
        generation: record.current().number.0,
        seq: record.current().seq.0,
        lineage: record.lineage().to_string(),
        phase: "resync",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Fence, HandOff, new_record, random_generation_id};
    use blockferry_proto::{Generation, Seq};

    const DISK: DiskId = DiskId::from_bytes([9; 16]);

    /// The promoted replica's record: it followed the source to seq 40 and
    /// was promoted at seq 30.
    fn promoted() -> GenerationRecord {
        let source = new_record(DISK, Generation(1));
        let mut replica = new_record(DISK, Generation(1)).into_seed();
        replica.follow(&source, Seq(40)).unwrap();
        replica.promote_at(Seq(30), random_generation_id()).unwrap();
        replica
    }

    #[test]
    fn a_promoted_record_of_the_disk_is_accepted_for_a_fenced_or_new_disk() {
        let r = promoted();
        assert_eq!(r.current().seq, Seq(30));
        check(DISK, &r, None, false).unwrap();
        let mut d = DiskState::new("/dev/vdb".into(), 1 << 20);
        d.fenced = Some(Fence {
            by_generation: 2,
            since: 1,
        });
        check(DISK, &r, Some(&d), false).unwrap();
        d.fenced = None;
        d.handed_off = Some(HandOff {
            final_seq: 3,
            generation: 1,
            since: 1,
        });
        check(DISK, &r, Some(&d), false).unwrap();
    }

    #[test]
    fn a_record_of_another_disk_or_not_promoted_is_refused() {
        let other = DiskId::from_bytes([1; 16]);
        let e = check(other, &promoted(), None, true).unwrap_err();
        assert!(matches!(e, ReprotectError::WrongDisk { .. }), "{e}");
        let replica = new_record(DISK, Generation(1)).into_seed();
        let e = check(DISK, &replica, None, true).unwrap_err();
        assert!(e.to_string().contains("failover"), "{e}");
    }

    #[test]
    fn an_actively_protected_disk_is_refused_unless_forced() {
        let d = DiskState::new("/dev/vdb".into(), 1 << 20);
        let e = check(DISK, &promoted(), Some(&d), false).unwrap_err();
        assert!(e.to_string().contains("drop that protection"), "{e}");
        assert!(e.to_string().contains("--force"), "{e}");
        check(DISK, &promoted(), Some(&d), true).unwrap();
    }

    /// A configuration in `dir` whose disk is a 1 MiB file.
    fn config(dir: &Path) -> Config {
        let dev = dir.join("disk.img");
        std::fs::write(&dev, vec![0u8; 1 << 20]).unwrap();
        let text = format!(
            "state_dir = \"state\"\n[relay]\naddress = \"127.0.0.1:4433\"\nca = \"ca.pem\"\ncert = \"a.pem\"\nkey = \"a.key\"\n[[disk]]\nid = \"{DISK}\"\npath = \"{}\"\n",
            dev.display()
        );
        Config::parse(&text, &dir.join("agent.toml")).unwrap()
    }

    #[test]
    fn reprotect_installs_the_record_and_starts_a_resync_after_its_seq() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let store = StateStore::new(&config.state_dir);
        let old = store.load_record(&DISK, Generation(1)).unwrap();
        let r = promoted();
        let file = dir.path().join("generation.rec");
        std::fs::write(&file, r.encode()).unwrap();

        let out = reprotect(&config, DISK, &file, false).unwrap();
        assert_eq!((out.size, out.seq, out.phase), (1 << 20, 30, "resync"));
        assert_eq!(out.generation, r.current().number.0);
        assert_eq!(store.load_record(&DISK, Generation(1)).unwrap(), r);
        let before = std::fs::read(
            store
                .record_path(&DISK)
                .with_extension("generation.before-reprotect"),
        )
        .unwrap();
        assert_eq!(GenerationRecord::decode(&before).unwrap(), old);
        let st = store.load().unwrap();
        let d = st.disk(&DISK).unwrap();
        assert_eq!(d.phase, SyncPhase::Resync);
        assert_eq!(d.generation, r.current().number.0);
        assert_eq!(d.reprotected.map(|p| p.seq), Some(30));

        // Now protected (reprotecting): a second one needs --force.
        let e = reprotect(&config, DISK, &file, false).unwrap_err();
        assert!(matches!(e, ReprotectError::Protected { .. }), "{e}");
    }

    #[test]
    fn reprotect_is_refused_while_the_service_holds_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let file = dir.path().join("generation.rec");
        std::fs::write(&file, promoted().encode()).unwrap();
        let _service = StateStore::new(&config.state_dir).lock().unwrap();
        let e = reprotect(&config, DISK, &file, false).unwrap_err();
        assert!(
            matches!(e, ReprotectError::State(StateError::Busy { .. })),
            "{e}"
        );
        assert!(
            !StateStore::new(&config.state_dir)
                .record_path(&DISK)
                .exists()
        );
    }
}
