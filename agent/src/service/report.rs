//! The status snapshot of `blockferry-agent status`, written by the main loop.

use std::time::Instant;

use super::{Service, unix_ns};
use crate::status::{self, DiskStatus, Status};
use crate::tracker::Tracker;

impl Service {
    pub(super) fn write_status(&mut self, tracker: &Tracker) {
        let now = Instant::now();
        let mut st = Status {
            pid: std::process::id(),
            service_running: true,
            updated_ms: unix_ns() / 1_000_000,
            relay: self.config.relay.address.to_string(),
            connected: false,
            disks: Vec::new(),
        };
        for d in &mut self.disks {
            let progress = d.channel.progress().borrow().clone();
            st.connected |= progress.connected;
            let dirty = tracker.dirty(d.dev).map_or(0, |s| s.total_bytes());
            let sync_percent = d.phase.sync_percent();
            let state = status::disk_state(d.phase.state());
            let rpo = d.rpo.current(now);
            st.disks.push(DiskStatus {
                id: d.cfg.id.to_string(),
                device: d.cfg.path.display().to_string(),
                size: d.phase.size(),
                generation: d.phase.state().generation,
                role: d.record.role().to_string(),
                state: state.to_owned(),
                connected: progress.connected,
                sync_percent,
                rpo_ms: rpo.as_millis() as u64,
                worst_rpo_ms: d.rpo.worst().as_millis() as u64,
                backlog_bytes: dirty + d.read_bytes + progress.unacked_bytes as u64,
                bytes_read: d.bytes_read,
                bytes_sent: d.bytes_sent,
                resync_hash_bytes: d.resync_hash_bytes,
                last_resync: d.phase.state().last_resync,
                durable_seq: progress.durable.0,
                replica_seq: progress.replica.0,
                last_error: d.error.clone().or(progress.last_error),
                action: status::disk_action(d.phase.state()),
            });
        }
        if let Err(e) = status::write(&self.config.state_dir, &st) {
            tracing::warn!(error = %e, "status not written");
        }
    }
}
