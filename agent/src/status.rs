//! What `blockferry-agent status` shows: the running service writes a snapshot of
//! every disk's replication state next to its state file once a second.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::{DiskState, SyncPhase};

const FILE: &str = "status.json";

/// Snapshot of the service.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    /// Whether the service that wrote the snapshot still runs. When it does
    /// not, each disk's role, state and action come from the agent state,
    /// which `reprotect` and `handoff` change while the service is stopped.
    #[serde(default = "yes")]
    pub service_running: bool,
    /// Unix milliseconds of the snapshot.
    pub updated_ms: u64,
    pub relay: String,
    pub connected: bool,
    pub disks: Vec<DiskStatus>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskStatus {
    pub id: String,
    pub device: String,
    pub size: u64,
    pub generation: u64,
    /// What the copy is to the disk: `source` (protected from here) or
    /// `replica` (handed off: the other site's copy took over).
    pub role: String,
    /// See [`disk_state`]: initial-sync, resync, reprotecting, protected,
    /// fenced or handed-off.
    pub state: String,
    /// Whether the disk's stream to the relay is up.
    pub connected: bool,
    /// Percent of the initial sync done, while it runs.
    pub sync_percent: Option<f64>,
    /// Age of the oldest write not yet durable at the target, milliseconds.
    pub rpo_ms: u64,
    /// Worst RPO seen since start, milliseconds.
    pub worst_rpo_ms: u64,
    /// Bytes tracked dirty, being read, or sent and not yet durable.
    pub backlog_bytes: u64,
    /// Plain bytes of the device shipped since start.
    pub bytes_read: u64,
    /// Encoded payload bytes put on the wire since start.
    pub bytes_sent: u64,
    /// Bytes of hash traffic of checksum resyncs since start.
    pub resync_hash_bytes: u64,
    /// Last completed resync, Unix seconds.
    pub last_resync: Option<u64>,
    /// Everything through this sequence is durable at the relay...
    pub durable_seq: u64,
    /// ... and through this one at the replica.
    pub replica_seq: u64,
    pub last_error: Option<String>,
    /// What the user should do, when the disk needs it (fenced, handed off).
    pub action: Option<String>,
}

/// The state `status` shows for a disk: `fenced` or `handed-off` (nothing
/// is shipped), `reprotecting` (the checksum resync after a reprotect),
/// `initial-sync`, `resync`, or `protected` (continuous replication).
pub fn disk_state(d: &DiskState) -> &'static str {
    if d.fenced.is_some() {
        "fenced"
    } else if d.handed_off.is_some() {
        "handed-off"
    } else if d.reprotected.is_some() {
        "reprotecting"
    } else {
        match d.phase {
            SyncPhase::InitialSync { .. } => "initial-sync",
            SyncPhase::Resync => "resync",
            SyncPhase::Continuous => "protected",
        }
    }
}

/// What the user should do about a disk, if anything.
pub fn disk_action(d: &DiskState) -> Option<String> {
    d.fenced
        .map(|f| f.advice())
        .or_else(|| d.handed_off.map(|h| h.advice()))
}

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "no status at {path}: is `blockferry-agent run` running with this configuration? ({source})"
    )]
    Missing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("status file {path} is unreadable: {message}")]
    Bad { path: PathBuf, message: String },
    #[error("cannot write status file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Replaces the snapshot through a temp file and a rename, so a reader never
/// sees half of it. Deliberately not [`blockferry_durable::replace_file`]: the
/// snapshot describes the moment and is not state, and the service rewrites it
/// several times a second from its main loop, where an fsync on a busy disk
/// would stall replication.
pub fn write(state_dir: &Path, status: &Status) -> Result<(), StatusError> {
    let dst = path(state_dir);
    let tmp = blockferry_durable::temp_path(&dst);
    let err = |source| StatusError::Write {
        path: dst.clone(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(status).map_err(|e| err(e.into()))?;
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &dst));
    if written.is_err() {
        // Each write has a temp file of its own: do not leave it behind
        // (a full disk would otherwise collect one five times a second).
        let _ignored = std::fs::remove_file(&tmp);
    }
    written.map_err(err)
}

pub fn read(state_dir: &Path) -> Result<Status, StatusError> {
    let p = path(state_dir);
    let bytes = std::fs::read(&p).map_err(|source| StatusError::Missing {
        path: p.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| StatusError::Bad {
        path: p,
        message: e.to_string(),
    })
}

/// What `blockferry-agent status` shows: the service's snapshot while it
/// runs; otherwise the snapshot (if any) with each disk's role, state and
/// action from the agent state and the generation records, and the disks the
/// snapshot does not know (a disk reprotected before the service ran).
pub fn current(state_dir: &Path) -> Result<Status, StatusError> {
    let snapshot = read(state_dir);
    if let Ok(st) = &snapshot
        && Path::new("/proc").join(st.pid.to_string()).exists()
    {
        return snapshot;
    }
    let store = crate::state::StateStore::new(state_dir);
    let state = match store.load() {
        Ok(state) if !state.disks.is_empty() => state,
        _ => return snapshot,
    };
    let mut st = snapshot.unwrap_or_default();
    overlay_state(&mut st, &state, |id| {
        let disk: blockferry_proto::DiskId = id.parse().ok()?;
        let bytes = std::fs::read(store.record_path(&disk)).ok()?;
        let r = blockferry_proto::GenerationRecord::decode(&bytes).ok()?;
        Some(r.role().to_string())
    });
    Ok(st)
}

/// The DR view of `state` over a snapshot whose service no longer runs;
/// `role` reads a disk's record role by id.
pub fn overlay_state(
    st: &mut Status,
    state: &crate::state::AgentState,
    role: impl Fn(&str) -> Option<String>,
) {
    st.service_running = false;
    st.connected = false;
    for (id, d) in &state.disks {
        let i = match st.disks.iter().position(|s| &s.id == id) {
            Some(i) => i,
            None => {
                st.disks.push(DiskStatus {
                    id: id.clone(),
                    ..DiskStatus::default()
                });
                st.disks.len() - 1
            }
        };
        let s = &mut st.disks[i];
        s.device = d.path.display().to_string();
        s.size = d.size;
        s.generation = d.generation;
        s.state = disk_state(d).to_owned();
        s.connected = false;
        s.sync_percent = None;
        s.action = disk_action(d);
        if let Some(r) = role(id) {
            s.role = r;
        }
    }
}

/// The human-readable table of `blockferry-agent status`.
pub fn render(status: &Status, now_ms: u64) -> String {
    let age = now_ms.saturating_sub(status.updated_ms);
    if !status.service_running {
        let mut out = String::from(
            "the agent service is not running: the states below are what it starts from\n",
        );
        out.push_str(&render_disks(status));
        return out;
    }
    let mut out = format!(
        "agent pid {} · relay {} ({}) · updated {:.1} s ago{}\n",
        status.pid,
        status.relay,
        if status.connected {
            "connected"
        } else {
            "not connected"
        },
        age as f64 / 1000.0,
        if age > 5000 {
            " — stale: is the agent still running?"
        } else {
            ""
        }
    );
    out.push_str(&render_disks(status));
    out
}

fn render_disks(status: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<38} {:<14} {:<8} {:<13} {:>9} {:>12} {:>12} {:>8}\n",
        "DISK", "DEVICE", "ROLE", "STATE", "RPO", "BACKLOG", "SENT", "GEN"
    ));
    for d in &status.disks {
        let state = match d.sync_percent {
            Some(p) => format!("{} {p:.0}%", d.state),
            None => d.state.clone(),
        };
        out.push_str(&format!(
            "{:<38} {:<14} {:<8} {:<13} {:>8.1}s {:>12} {:>12} {:>8}\n",
            d.id,
            d.device,
            d.role,
            state,
            d.rpo_ms as f64 / 1000.0,
            human(d.backlog_bytes),
            human(d.bytes_sent),
            d.generation
        ));
        if let Some(a) = &d.action {
            out.push_str(&format!("    {a}\n"));
        }
        if let Some(e) = &d.last_error {
            out.push_str(&format!("    last error: {e}\n"));
        }
    }
    out
}

fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_and_renders() {
        let dir = tempfile::tempdir().unwrap();
        let s = Status {
            pid: 42,
            service_running: true,
            updated_ms: 1000,
            relay: "127.0.0.1:4433".into(),
            connected: true,
            disks: vec![DiskStatus {
                id: "00000000-0000-0000-0000-000000000001".into(),
                device: "/dev/loop3".into(),
                state: "initial-sync".into(),
                sync_percent: Some(42.0),
                bytes_sent: 3 << 20,
                ..DiskStatus::default()
            }],
        };
        write(dir.path(), &s).unwrap();
        let back = read(dir.path()).unwrap();
        assert_eq!(back.disks[0].sync_percent, Some(42.0));
        let text = render(&back, 1500);
        assert!(text.contains("initial-sync 42%"), "{text}");
        assert!(text.contains("3.0 MiB"), "{text}");
    }

    #[test]
    fn each_dr_state_has_its_name_and_the_halted_ones_their_advice() {
        use crate::state::{Fence, HandOff, Reprotected};
        let mut d = DiskState::new("/dev/vdb".into(), 1 << 20);
        assert_eq!(disk_state(&d), "initial-sync");
        d.phase = SyncPhase::Resync;
        assert_eq!(disk_state(&d), "resync");
        d.reprotected = Some(Reprotected { seq: 3, since: 1 });
        assert_eq!(disk_state(&d), "reprotecting");
        d.reprotected = None;
        d.phase = SyncPhase::Continuous;
        assert_eq!(disk_state(&d), "protected");
        assert_eq!(disk_action(&d), None);
        d.handed_off = Some(HandOff {
            final_seq: 9,
            generation: 2,
            since: 5,
        });
        assert_eq!(disk_state(&d), "handed-off");
        assert!(disk_action(&d).unwrap().contains("failover --planned"));
        d.handed_off = None;
        d.fenced = Some(Fence {
            by_generation: 3,
            since: 5,
        });
        assert_eq!(disk_state(&d), "fenced");
        assert!(disk_action(&d).unwrap().contains("reprotect"));
    }

    #[test]
    fn a_stopped_service_shows_the_state_that_reprotect_and_handoff_left() {
        use crate::state::{AgentState, DiskState, HandOff};
        let mut snap = Status {
            pid: 1,
            service_running: true,
            connected: true,
            disks: vec![DiskStatus {
                id: "a".into(),
                role: "source".into(),
                state: "protected".into(),
                connected: true,
                ..DiskStatus::default()
            }],
            ..Status::default()
        };
        let mut state = AgentState::default();
        let mut a = DiskState::new("/dev/vdb".into(), 8);
        a.handed_off = Some(HandOff {
            final_seq: 4,
            generation: 1,
            since: 2,
        });
        state.disks.insert("a".into(), a);
        let mut b = DiskState::new("/dev/vdc".into(), 8);
        b.phase = crate::state::SyncPhase::Resync;
        b.reprotected = Some(crate::state::Reprotected { seq: 7, since: 1 });
        state.disks.insert("b".into(), b);
        overlay_state(&mut snap, &state, |id| {
            Some(if id == "a" { "replica" } else { "source" }.to_owned())
        });
        assert!(!snap.service_running);
        let a = &snap.disks[0];
        assert_eq!(
            (a.role.as_str(), a.state.as_str()),
            ("replica", "handed-off")
        );
        assert!(!a.connected);
        assert!(a.action.as_deref().unwrap().contains("failover --planned"));
        let b = &snap.disks[1];
        assert_eq!(
            (b.id.as_str(), b.role.as_str(), b.state.as_str()),
            ("b", "source", "reprotecting")
        );
        let text = render(&snap, 0);
        assert!(text.contains("not running"), "{text}");
        assert!(text.contains("handed-off"), "{text}");
    }

    #[test]
    fn missing_status_says_what_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let e = read(dir.path()).unwrap_err();
        assert!(e.to_string().contains("running"), "{e}");
    }
}
