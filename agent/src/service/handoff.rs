//! `blockferry-agent handoff`: the service run for one disk until the
//! sans-IO [`crate::handoff::Handoff`] says it is at RPO zero with a final
//! point durable at the replica; then the record is demoted and the disk
//! handed off. Run while the service is stopped (it takes the same state
//! lock), with the device held exclusively for the whole operation, so no
//! file system or workload writes to it meanwhile.
//!
//! The pinned tracker is resumed as the service resumes it, so what was
//! written while the service was down is shipped too. The other configured
//! disks are tracked but not shipped (their events must not be consumed
//! unseen); a disk that collected writes meanwhile is resynced by checksum at
//! the next start of the service.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use blockferry_proto::frame::Consistency;
use blockferry_proto::{DiskId, Seq};
use futures::FutureExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{Service, ServiceError, Started, TICK, start, unix_ns};
use crate::config::Config;
use crate::handoff::{Action, DiskView, Handoff};
use crate::state::{StateStore, SyncPhase};

/// What `handoff` printed (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct HandedOff {
    pub disk: String,
    /// The final point: the replica holds everything through it.
    pub final_seq: u64,
    /// The wire generation of the final point.
    pub generation: u64,
    /// The record's generations, newest first (now a replica's).
    pub lineage: String,
    pub seconds: f64,
    /// Encoded payload bytes put on the wire by this handoff.
    pub bytes_shipped: u64,
}

/// Hands off `disk` (see the module docs), giving up after `timeout`.
/// `cancel` (an interrupt) stops it like an error: the disk stays the source.
pub async fn handoff(
    config: Config,
    disk: DiskId,
    timeout: Duration,
    cancel: CancellationToken,
) -> Result<HandedOff, ServiceError> {
    let t0 = Instant::now();
    let dc = config
        .disks
        .iter()
        .find(|d| d.id == disk)
        .cloned()
        .ok_or(ServiceError::NotConfigured(disk))?;
    // Checked again under the lock below; this one answers before the
    // device is touched.
    let store = StateStore::new(&config.state_dir);
    let probe = store.lock()?;
    match store.load()?.disk(&disk) {
        None => return Err(ServiceError::NeverProtected(disk)),
        Some(d) if !d.is_protected() => {
            return Err(ServiceError::NotProtected {
                disk,
                state: crate::status::disk_state(d),
            });
        }
        Some(_) => {}
    }
    drop(probe);
    let _device = hold_exclusively(&dc.path)?;

    let Started {
        mut svc,
        mut tracker,
        mut shipped_rx,
        connector,
    } = start(config, Some(disk), &cancel)?;
    svc.no_points = true;
    if svc.disks[0].phase.halted() {
        // Fenced meanwhile, or a handoff that demoted the record and stopped
        // before saving the state (completed by `start`): nothing to ship.
        let d = &svc.disks[0];
        let done = d.phase.handed_off().map(|h| HandedOff {
            disk: disk.to_string(),
            final_seq: h.final_seq,
            generation: h.generation,
            lineage: d.record.lineage().to_string(),
            seconds: t0.elapsed().as_secs_f64(),
            bytes_shipped: 0,
        });
        let state = crate::status::disk_state(d.phase.state());
        svc.finish_partial_run(&tracker, true);
        connector.endpoint().close(0u32.into(), b"handoff done");
        return done.ok_or(ServiceError::NotProtected { disk, state });
    }
    let mut core = Handoff::new(Instant::now(), timeout);
    let mut final_push: Option<tokio::task::JoinHandle<Option<Seq>>> = None;
    let mut bar = HandoffProgress::new(&dc.path);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: Result<Seq, ServiceError> = loop {
        tokio::select! {
            _ = cancel.cancelled() => break Err(ServiceError::Interrupted),
            notices = tracker.next() => match notices {
                Ok(notices) => svc.handle_notices(&mut tracker, notices),
                Err(e) => break Err(ServiceError::Tracker(e)),
            },
            Some(msg) = shipped_rx.recv() => svc.handle_shipped(&mut tracker, msg),
            _ = tick.tick() => {
                if let Err(e) = svc.handle_tick(&mut tracker) {
                    break Err(e);
                }
                // Writes still in the ring buffer count before "quiet".
                match tracker.poll_now() {
                    Ok(notices) => svc.handle_notices(&mut tracker, notices),
                    Err(e) => break Err(ServiceError::Tracker(e)),
                }
                let d = &svc.disks[0];
                if let Some(h) = final_push.as_mut()
                    && let Some(pushed) = h.now_or_never()
                {
                    final_push = None;
                    match pushed.ok().flatten() {
                        Some(seq) => core.handle_final_pushed(seq),
                        None => core.handle_final_failed(),
                    }
                }
                let p = d.channel.progress().borrow().clone();
                let dirty = tracker.dirty(d.dev).map_or(0, |s| s.total_bytes());
                let view = DiskView {
                    connected: p.connected,
                    fenced: d.phase.fence().is_some(),
                    quiet: dirty == 0
                        && d.reads.is_empty()
                        && d.resync.is_none()
                        && !d.phase.resync_pending()
                        && d.phase.state().phase == SyncPhase::Continuous,
                    last: p.last,
                    durable: p.durable,
                    replica: p.replica,
                };
                bar.update(dirty + d.read_bytes, view);
                match core.poll(view, Instant::now()) {
                    Action::Wait => {}
                    Action::PushFinal => {
                        let channel = d.channel.clone();
                        final_push = Some(tokio::spawn(async move {
                            channel
                                .push_barrier(Consistency::CrashConsistent, unix_ns())
                                .await
                                .ok()
                        }));
                    }
                    Action::Done { final_seq } => break Ok(final_seq),
                    Action::Fail(e) => {
                        if let Some(cause) = &d.error {
                            tracing::error!(disk = %d.cfg.id, "last error: {cause}");
                        }
                        break Err(ServiceError::Handoff(e));
                    }
                }
            }
        }
    };
    bar.finish();
    let outcome = match result {
        Ok(final_seq) => svc.complete_handoff(final_seq),
        Err(e) => Err(e),
    };
    let drained = svc.drain(&mut tracker, &mut shipped_rx).await;
    svc.finish_partial_run(&tracker, drained);
    svc.write_status(&tracker);
    connector.endpoint().close(0u32.into(), b"handoff done");
    let (final_seq, generation, lineage) = outcome?;
    Ok(HandedOff {
        disk: disk.to_string(),
        final_seq: final_seq.0,
        generation,
        lineage,
        seconds: t0.elapsed().as_secs_f64(),
        bytes_shipped: svc.disks[0].bytes_sent,
    })
}

/// Opens the device with `O_EXCL`: refused while a file system is mounted
/// on it or another process holds it exclusively. Held until dropped.
fn hold_exclusively(path: &std::path::Path) -> Result<File, ServiceError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
        .map_err(|source| {
            if source.raw_os_error() == Some(libc::EBUSY) {
                ServiceError::DeviceBusy(path.to_owned())
            } else {
                ServiceError::Device {
                    path: path.to_owned(),
                    source,
                }
            }
        })
}

impl Service {
    /// The replica holds the final point: demote the record (saved first: a
    /// crash before the state is saved is completed by the next start), then
    /// mark the disk handed off. Returns the final point, its generation and
    /// the lineage.
    fn complete_handoff(&mut self, final_seq: Seq) -> Result<(Seq, u64, String), ServiceError> {
        let d = &mut self.disks[0];
        let mut r = d.record.clone();
        r.set_seq(r.current().seq.max(final_seq))
            .and_then(|()| r.demote())?;
        self.store.save_record(&r)?;
        d.record = r;
        let number = d.record.current().number;
        d.phase
            .handle_handed_off(final_seq, number, unix_ns() / 1_000_000_000);
        self.state.set_disk(&d.cfg.id, d.phase.state().clone());
        self.store.save(&self.state)?;
        tracing::info!(disk = %d.cfg.id, %final_seq, lineage = %d.record.lineage(), "handed off");
        Ok((final_seq, number.0, d.record.lineage().to_string()))
    }

    /// The end of a run that shipped only some disks (a handoff): the stop
    /// is as clean as the one before it; the shipped disk resyncs if it is
    /// not drained, a tracked-only disk if it collected writes or was not
    /// tracked continuously.
    fn finish_partial_run(&mut self, tracker: &crate::tracker::Tracker, drained: bool) {
        self.save_progress();
        self.state.clean_shutdown = self.was_clean;
        let mut resync = Vec::new();
        if !drained {
            resync.extend(
                self.disks
                    .iter()
                    .filter(|d| !d.phase.halted())
                    .map(|d| d.cfg.id),
            );
        }
        for b in &self.bystanders {
            if !b.continuous || tracker.dirty(b.dev).is_some_and(|s| !s.is_empty()) {
                resync.push(b.id);
            }
        }
        for id in resync {
            // Halted disks ship nothing anyway; a reprotect resets them.
            if let Some(d) = self.state.disk_mut(&id)
                && d.is_protected()
            {
                tracing::info!(disk = %id, "its next start compares it by checksum");
                d.phase = SyncPhase::Resync;
            }
        }
        if let Err(e) = self.store.save(&self.state) {
            tracing::warn!(error = %e, "agent state not saved: the next start resyncs by checksum");
        }
    }
}

/// A spinner with the backlog and the replica's sequence on a terminal,
/// log lines otherwise.
struct HandoffProgress {
    bar: Option<indicatif::ProgressBar>,
    device: PathBuf,
    last_log: Instant,
}

impl HandoffProgress {
    fn new(device: &std::path::Path) -> Self {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        HandoffProgress {
            bar,
            device: device.to_owned(),
            last_log: Instant::now(),
        }
    }

    fn update(&mut self, backlog: u64, v: DiskView) {
        let msg = format!(
            "handoff {}: {} to ship, replica at seq {} of {}{}",
            self.device.display(),
            backlog,
            v.replica,
            v.last,
            if v.connected {
                ""
            } else {
                " (relay not connected)"
            }
        );
        if let Some(bar) = &self.bar {
            bar.set_message(msg);
        } else if self.last_log.elapsed() >= Duration::from_secs(5) {
            self.last_log = Instant::now();
            tracing::info!("{msg}");
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_is_held_exclusively() {
        // A regular file has no exclusive holders: it opens, and the open
        // file is what the handoff keeps until it ends.
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(hold_exclusively(f.path()).is_ok());
        let e = hold_exclusively(std::path::Path::new("/nonexistent/dev")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dev"), "{e}");
    }
}
