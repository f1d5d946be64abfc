//! The main loop's handling of each disk's events: tracker notices, shipped
//! reads and the periodic tick. Decisions are [`DiskPhase`]'s; here they are
//! carried out on the tracker, the reader and the channel.

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use blockferry_proto::hashtree::{ComparerLimits, TreeShape};
use futures::FutureExt;

use super::exchange::ChannelExchange;
use super::{
    Disk, InRead, READ_WINDOW, ReadKind, SAVE_EVERY, STATUS_EVERY, Service, ServiceError, Shipped,
    reader_config,
};
use crate::config::Config;
use crate::phase::{Resize, SyncAdvance};
use crate::resync::{self, ResyncError};
use crate::state::{StateStore, random_generation_id, restarted_record};
use crate::tracker::{DeviceId, Notice, Tracker};
use blockferry_proto::ResyncReason;

impl Service {
    fn disk_of(&mut self, dev: DeviceId) -> Option<&mut Disk> {
        self.disks.iter_mut().find(|d| d.dev == dev)
    }

    pub(super) fn handle_notices(&mut self, tracker: &mut Tracker, notices: Vec<Notice>) {
        let now = Instant::now();
        for n in notices {
            match n {
                Notice::Extent { device, .. } => {
                    if let Some(d) = self.disk_of(device) {
                        d.rpo.handle_dirty(now);
                    }
                }
                Notice::Flush { .. } => {}
                Notice::Resync { device, dropped } => {
                    let size = tracker.device(device).map(|i| i.size_bytes());
                    if let Some(d) = self.disk_of(device) {
                        d.rpo.handle_dirty(now);
                        let resize = size.and_then(|s| d.phase.handle_resize(&d.cfg.path, s));
                        match resize {
                            Some(Resize::Grew { old, grown }) => {
                                let size = grown.end;
                                match d.reader.refresh_size() {
                                    Ok(seen) if seen == size => {}
                                    Ok(seen) => {
                                        tracing::warn!(disk = %d.cfg.id, tracker = size, reader = seen,
                                        "the reader sees another size than the tracker")
                                    }
                                    Err(e) => tracing::warn!(disk = %d.cfg.id, error = %e,
                                        "cannot re-read the device size"),
                                }
                                tracing::info!(disk = %d.cfg.id, old, new = size, "disk grew: growing the replica");
                                // Before the grown range is marked dirty: the relay
                                // and the target hear the new size in a Hello before
                                // any chunk past the old end.
                                if let Err(e) = d.channel.resize(size) {
                                    tracing::warn!(disk = %d.cfg.id, error = %e, "cannot resize the stream");
                                }
                                tracker.mark_dirty(device, grown);
                            }
                            Some(Resize::Shrank { message }) => {
                                tracing::error!(disk = %d.cfg.id, "{message}");
                                d.error = Some(message);
                            }
                            None => {
                                tracing::error!(disk = %d.cfg.id, dropped,
                                    "tracker lost events: resyncing the disk by checksum");
                                d.phase.handle_tracking_lost();
                            }
                        }
                    }
                }
            }
        }
    }

    pub(super) fn handle_shipped(&mut self, tracker: &mut Tracker, msg: Shipped) {
        match msg {
            Shipped::Read {
                disk,
                read,
                ok,
                last_seq,
                plain,
                wire,
            } => {
                let Some(d) = self.disks.get_mut(disk) else {
                    return;
                };
                d.bytes_read += plain;
                d.bytes_sent += wire;
                d.last_seq = d.last_seq.max(last_seq);
                let Some(r) = d.reads.remove(&read) else {
                    return;
                };
                d.read_bytes -= r.range.end - r.range.start;
                if ok && d.phase.fence().is_none() {
                    d.rpo.handle_shipped(read, last_seq.0);
                    d.unacked.push_back((last_seq, r.range.clone()));
                } else {
                    // A read that finished after the fence was refused with
                    // the stream: it stays the source's, dirty, like the rest.
                    // Not read: it goes back dirty and is read again later.
                    tracker.mark_dirty(d.dev, r.range.clone());
                    d.rpo.handle_returned(read);
                }
                if r.kind == ReadKind::Sync {
                    d.phase.handle_sync_shipped(r.range.end, last_seq);
                }
            }
            Shipped::Stopped { disk, error } => {
                if let Some(d) = self.disks.get_mut(disk) {
                    tracing::error!(disk = %d.cfg.id, %error, "shipping stopped");
                    d.error = Some(error.to_string());
                }
            }
        }
    }

    pub(super) fn handle_tick(&mut self, tracker: &mut Tracker) -> Result<(), ServiceError> {
        let now = Instant::now();
        let mut fenced = false;
        let no_points = self.no_points;
        for d in &mut self.disks {
            let progress = d.channel.progress().borrow().clone();
            // The RPO runs until the write is durable at the replica, not at the relay.
            d.rpo.handle_ack(progress.replica.0);
            if let Some(err) = &progress.last_error {
                d.error = Some(err.clone());
            }
            // A reprotected disk ships nothing before its peer holds the
            // promoted record's sequence (see `DiskPhase::handle_peer_durable`).
            if let Err(e) = d
                .phase
                .handle_peer_durable(progress.connected, progress.durable)
            {
                let msg = e.to_string();
                if d.error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(disk = %d.cfg.id, "{msg}");
                }
                d.error = Some(msg);
            }
            // A range is forgotten only once the replica holds it: what the
            // relay spooled but the target has not applied may still be
            // refused (a promoted replica fences this source), and must then
            // go back to the dirty set.
            while d
                .unacked
                .front()
                .is_some_and(|(s, _)| *s <= progress.replica)
            {
                d.unacked.pop_front();
            }
            if let Some(ResyncReason::StaleGeneration { ours, peer }) = progress.resync
                && let Some(fence) = d
                    .phase
                    .handle_fenced(peer, super::unix_ns() / 1_000_000_000)
            {
                // Once: the stream stays refused, and the fence is persisted
                // below, so neither this run nor the next logs it again.
                tracing::error!(disk = %d.cfg.id, stream = %ours, promoted = %peer, "{}", fence.advice());
                // What the sender held unacked is dropped with the fence:
                // it stays the source's, tracked as dirty.
                for (_, range) in d.unacked.drain(..) {
                    tracker.mark_dirty(d.dev, range);
                }
                Self::detach_record(d, &self.store);
                fenced = true;
            }
            if progress.resync.is_some()
                && let Some(generation) = d.phase.handle_peer_resync()
            {
                if d.record.current().number < generation {
                    Self::renumber_record(d, &self.store, generation);
                }
                let channel = d.channel.clone();
                tokio::spawn(async move { channel.start_generation(generation).await });
            }
            Self::advance_sync(d, progress.durable);
            Self::poll_resync(d, tracker);
            if let Some(why) = d.phase.poll_resync_start(progress.connected) {
                Self::start_resync(d, tracker, &self.config, why);
            }
            Self::schedule_reads(d, tracker)?;
            d.points
                .store(d.phase.points_allowed() && !no_points, Ordering::Relaxed);
            let rpo = d.rpo.current(now);
            if rpo > self.config.replication.rpo_alert && !d.rpo_alerted {
                d.rpo_alerted = true;
                tracing::warn!(disk = %d.cfg.id, rpo_s = rpo.as_secs_f64(),
                    threshold_s = self.config.replication.rpo_alert.as_secs_f64(),
                    "RPO above the alert threshold");
            } else if rpo <= self.config.replication.rpo_alert / 2 && d.rpo_alerted {
                d.rpo_alerted = false;
                tracing::info!(disk = %d.cfg.id, rpo_s = rpo.as_secs_f64(), "RPO back under the alert threshold");
            }
        }
        if fenced || now.duration_since(self.last_save) >= SAVE_EVERY {
            self.last_save = now;
            self.save_progress();
            self.store.save(&self.state)?;
        }
        if now.duration_since(self.last_status) >= STATUS_EVERY {
            self.last_status = now;
            self.write_status(tracker);
        }
        Ok(())
    }

    /// The stream restarts under wire number `generation` (a resync): the
    /// data generation is the same, only renumbered. A record that cannot be
    /// saved is logged: the next start adopts the number again.
    fn renumber_record(d: &mut Disk, store: &StateStore, generation: blockferry_proto::Generation) {
        match restarted_record(&d.record, generation, d.last_seq) {
            Ok(r) => match store.save_record(&r) {
                Ok(()) => d.record = r,
                Err(e) => {
                    tracing::warn!(disk = %d.cfg.id, error = %e, "generation record not saved")
                }
            },
            Err(e) => {
                tracing::warn!(disk = %d.cfg.id, error = %e, "generation record not renumbered")
            }
        }
    }

    /// The fenced source goes on in a generation of its own, so a later
    /// comparison with the promoted copy sees what it wrote since. A record
    /// that cannot be saved is logged: the next start adopts the generation
    /// again.
    fn detach_record(d: &mut Disk, store: &StateStore) {
        let mut r = d.record.clone();
        let held = r.current().seq.max(d.last_seq);
        let detached = r
            .set_seq(held)
            .and_then(|()| r.detach(random_generation_id()));
        match detached {
            Ok(()) => match store.save_record(&r) {
                Ok(()) => d.record = r,
                Err(e) => {
                    tracing::warn!(disk = %d.cfg.id, error = %e, "generation record not saved")
                }
            },
            Err(e) => {
                tracing::warn!(disk = %d.cfg.id, error = %e, "generation record not detached")
            }
        }
    }

    /// Moves the durable prefix of the initial sync forward and shows it.
    pub(super) fn advance_sync(d: &mut Disk, durable: blockferry_proto::Seq) {
        let size = d.phase.size();
        match d.phase.handle_durable(durable) {
            SyncAdvance::Idle => {}
            SyncAdvance::Progress { done } => d.progress.update(&d.cfg, done, size),
            SyncAdvance::Complete => d.progress.finish(&d.cfg, size),
        }
    }

    fn start_resync(d: &mut Disk, tracker: &mut Tracker, config: &Config, why: &str) {
        tracing::info!(disk = %d.cfg.id, reason = why, "checksum resync starts");
        // The comparison reads the whole disk after this point, so what was
        // dirty before it is covered by the comparison.
        tracker.take_dirty(d.dev, u64::MAX);
        let path = d.cfg.path.clone();
        let size = d.phase.size();
        let chunk = u64::from(config.replication.chunk_size);
        let rc = reader_config(config);
        let mut exchange = ChannelExchange::new(d.channel.clone());
        let disk = d.cfg.id;
        let generation = d.phase.generation();
        d.resync = Some(tokio::spawn(async move {
            let shape = TreeShape::new(chunk, blockferry_proto::hashtree::DEFAULT_FANOUT)?;
            let tree = tokio::task::spawn_blocking(move || resync::local_tree(&path, shape, &rc))
                .await
                .map_err(|e| ResyncError::Exchange(e.to_string()))??;
            let comparer = blockferry_proto::hashtree::Comparer::new(
                tree,
                size,
                disk,
                generation,
                ComparerLimits::default(),
            );
            resync::compare(comparer, &mut exchange).await
        }));
    }

    fn poll_resync(d: &mut Disk, tracker: &mut Tracker) {
        let Some(handle) = d.resync.as_mut() else {
            return;
        };
        let Some(result) = handle.now_or_never() else {
            return;
        };
        d.resync = None;
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.as_secs());
        match result.map_err(|e| ResyncError::Exchange(e.to_string())) {
            Ok(Ok(plan)) => {
                let size = d.phase.size();
                for r in &plan.ranges {
                    tracker.mark_dirty(d.dev, r.offset..(r.offset + r.len).min(size));
                }
                d.resync_hash_bytes += plan.stats.bytes();
                d.phase.handle_resync_done(true, now_s);
                tracing::info!(disk = %d.cfg.id, differing_bytes = plan.bytes,
                    ranges = plan.ranges.len(), hash_bytes = plan.stats.bytes(),
                    "checksum resync compared; shipping the differences");
            }
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(disk = %d.cfg.id, error = %e, "checksum resync failed; retrying");
                d.error = Some(e.to_string());
                d.phase.handle_resync_done(false, now_s);
            }
        }
    }

    /// Submits reads while the read window has room: first tracked writes (they
    /// age the RPO), then the next piece of the initial sync.
    pub(super) fn schedule_reads(d: &mut Disk, tracker: &mut Tracker) -> Result<(), ServiceError> {
        let size = d.phase.size();
        if d.read_bytes < READ_WINDOW && d.phase.may_read_dirty() {
            let room = READ_WINDOW - d.read_bytes;
            let taken = tracker.take_dirty(d.dev, room);
            if !taken.is_empty() {
                let emptied = tracker.dirty(d.dev).is_none_or(|s| s.is_empty());
                for r in taken {
                    let r = r.start..r.end.min(size);
                    if r.is_empty() {
                        continue;
                    }
                    // Only the written 4 KiB blocks are read, not whole chunks: a
                    // 4 KiB write costs 4 KiB of reading, hashing and shipping.
                    let id = d.reader.submit_fine(r.start, r.end - r.start)?;
                    let wide = d.reader.fine_span(r.clone());
                    d.read_bytes += wide.end - wide.start;
                    d.rpo.handle_taken(id, emptied);
                    d.reads.insert(
                        id,
                        InRead {
                            range: wide,
                            kind: ReadKind::Dirty,
                        },
                    );
                }
            }
        }
        while let Some(piece) = d.phase.poll_sync_read(d.read_bytes, READ_WINDOW) {
            let id = d.reader.submit(piece.start, piece.end - piece.start)?;
            d.read_bytes += piece.end - piece.start;
            d.reads.insert(
                id,
                InRead {
                    range: piece,
                    kind: ReadKind::Sync,
                },
            );
        }
        Ok(())
    }
}
