//! `blockferry-agent run`: the replication service. It joins the tracker, the
//! reader and the relay channel of every protected disk:
//!
//! ```text
//! tracker ──dirty ranges──► reader (io_uring) ──chunks──► shipper ──batches──► relay
//!    ▲                                                        │
//!    └──── failed reads go back dirty ◄──── shipped / acked ◄─┘
//! ```
//!
//! One task owns the tracker and all per-disk bookkeeping (what is dirty, being
//! read, shipped, durable); one shipper task per disk turns reader output into
//! batches and pushes them, feeling the relay's backpressure. Memory is bounded
//! by the bytes allowed in reads at once and by the channel's send window.
//!
//! Phases of a disk (persisted in the agent state):
//! - **initial sync**: the whole disk is read once, in order; what is durable at
//!   the target is remembered, so a restart continues where it stopped;
//! - **resync**: after an unclean stop, a tracker drop or a stream that cannot
//!   resume, the agent and the target compare blake3 hash trees and only the
//!   differing chunks are marked dirty;
//! - **continuous**: tracked writes are read and shipped as they complete.
//!
//! Tracking starts before anything is read, so a write during any phase is
//! caught by the tracker and shipped again after it.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blockferry_proto::frame::{Chunk, Consistency, Encoding, HashRangeReply, HashRangeRequest};
use blockferry_proto::hashtree::{ComparerLimits, TreeShape};
use blockferry_proto::{DiskSender, Generation, SenderConfig, Seq};
use blockferry_transport::{Connector, DiskChannel, TlsIdentity, Tuning};
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DiskConfig};
use crate::reader::{self, ReadHandle, ReaderConfig, ReaderEvent, ReaderEvents};
use crate::resync::{self, HashExchange, ResyncError};
use crate::rpo::Rpo;
use crate::state::{AgentState, DiskState, StateStore, SyncPhase};
use crate::status::{self, DiskStatus, Status};
use crate::tracker::{DeviceId, Notice, Tracker, TrackerError};

/// Errors that stop the service. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error(transparent)]
    Reader(#[from] crate::reader::ReaderError),
    #[error("certificates: {0}")]
    Tls(String),
    #[error("{0}")]
    Disk(String),
}

/// Bytes of reads in flight per disk: bounds memory together with the window.
const READ_WINDOW: u64 = 64 << 20;
/// Initial sync reads the disk in pieces of this size.
const SYNC_PIECE: u64 = 16 << 20;
/// How often bookkeeping runs when no event wakes the loop.
const TICK: Duration = Duration::from_millis(20);
/// How often progress is persisted (fsynced).
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// How often the status file is rewritten (not fsynced: it describes the moment).
const STATUS_EVERY: Duration = Duration::from_millis(200);
/// How long a clean stop waits for the target to make everything durable.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What a shipper tells the main loop.
#[derive(Debug)]
enum Shipped {
    /// `read` was pushed in frames up to `last_seq` (or failed and must be re-read).
    Read {
        disk: usize,
        read: u64,
        ok: bool,
        last_seq: Seq,
        plain: u64,
        wire: u64,
    },
    /// The reader or the channel stopped.
    Stopped { disk: usize, error: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadKind {
    Sync,
    Dirty,
}

#[derive(Debug)]
struct InRead {
    range: Range<u64>,
    kind: ReadKind,
}

/// Every disk's bookkeeping, owned by the main loop.
struct Disk {
    cfg: DiskConfig,
    /// Whether the shipper may ask for recovery points: not while the replica
    /// is incomplete (initial sync, resync), where a point could not be used and
    /// would only cost the target undo data.
    points: Arc<AtomicBool>,
    dev: DeviceId,
    size: u64,
    reader: ReadHandle,
    channel: DiskChannel,
    state: DiskState,
    reads: BTreeMap<u64, InRead>,
    read_bytes: u64,
    /// Initial sync: next offset to submit, and the end offsets of sync reads
    /// in order with the sequence that makes them durable.
    sync_next: Option<u64>,
    sync_shipped: VecDeque<(u64, Option<Seq>)>,
    resync_wanted: Option<&'static str>,
    resync: Option<tokio::task::JoinHandle<Result<resync::ResyncPlan, ResyncError>>>,
    rpo: Rpo,
    rpo_alerted: bool,
    durable: Seq,
    last_seq: Seq,
    bytes_read: u64,
    bytes_sent: u64,
    resync_hash_bytes: u64,
    progress: SyncProgress,
    error: Option<String>,
}

/// Runs the service until `cancel` fires, then stops cleanly.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), ServiceError> {
    let store = StateStore::new(&config.state_dir);
    let mut state = store.load()?;
    let was_clean = state.clean_shutdown;
    state.clean_shutdown = false;
    store.save(&state)?;
    if !was_clean {
        tracing::warn!(
            "the last stop was not clean: every disk is compared by checksum with the target before replication continues"
        );
    }

    let identity = TlsIdentity::load(&config.relay.cert, &config.relay.key)
        .map_err(|e| ServiceError::Tls(e.to_string()))?;
    let agent_name = agent_name(&config)?;
    let ca = blockferry_transport::tls::load_certs(&config.relay.ca)
        .map_err(|e| ServiceError::Tls(e.to_string()))?;
    let tuning = if config.relay.address.ip().is_loopback() {
        Tuning::loopback()
    } else {
        Tuning::default()
    };
    let client = blockferry_transport::client_config(&ca, identity, &tuning)
        .map_err(|e| ServiceError::Tls(e.to_string()))?;
    let endpoint = blockferry_transport::client_endpoint(
        blockferry_transport::endpoint::any_addr_for(config.relay.address),
        client,
        &tuning,
    )
    .map_err(|e| ServiceError::Tls(e.to_string()))?;
    let connector = Connector::new(
        endpoint,
        config.relay.address,
        config.relay.server_name.clone(),
    );

    // Pinned: the kernel keeps tracking while this process is down, so a clean
    // restart needs no resync and writes made meanwhile are not lost.
    let (mut tracker, continuity) = Tracker::load_persistent(&config.tracker_pin_dir)?;
    if !continuity.is_continuous() {
        tracing::warn!(
            ?continuity,
            "kernel tracking was not continuous since the last run: known disks are compared by checksum"
        );
    }
    let (shipped_tx, mut shipped_rx) = mpsc::channel::<Shipped>(256);
    let mut disks = Vec::new();
    for (i, dc) in config.disks.iter().enumerate() {
        // Tracking starts first: a write from here on is seen, whatever is read.
        let dev = tracker.protect(&dc.path)?;
        let size = tracker
            .device(dev)
            .map(|d| d.size_bytes())
            .ok_or_else(|| ServiceError::Disk(format!("{} vanished", dc.path.display())))?;
        let (reader, events) = reader::spawn(&dc.path, &reader_config(&config))?;
        let prev = state.disk(&dc.id).cloned();
        let mut ds = prev.clone().unwrap_or(DiskState {
            path: dc.path.clone(),
            size,
            generation: 1,
            phase: SyncPhase::InitialSync { next_offset: 0 },
            last_resync: None,
        });
        let mut resync_wanted = None;
        if prev.is_some() && !was_clean {
            resync_wanted = Some("the last stop was not clean");
        } else if prev.is_some() && !tracker.continuous(dev) {
            resync_wanted = Some("kernel tracking was not continuous while the agent was down");
        }
        if ds.size < size {
            // The replica grows at the first Hello, which carries the new size;
            // the old range was tracked, the new one is shipped whole.
            tracing::info!(disk = %dc.id, old = ds.size, new = size, "disk grew while the agent was down");
            tracker.mark_dirty(dev, ds.size..size);
            ds.size = size;
        } else if ds.size != size {
            tracing::warn!(disk = %dc.id, old = ds.size, new = size, "disk shrank while the agent was down");
            ds.size = size;
            resync_wanted = Some("the disk size changed");
        }
        ds.path = dc.path.clone();
        let sync_next = match ds.phase {
            SyncPhase::InitialSync { next_offset } if resync_wanted.is_none() => {
                Some(next_offset.min(size))
            }
            _ => None,
        };
        if resync_wanted.is_some() || matches!(ds.phase, SyncPhase::Resync) {
            resync_wanted.get_or_insert("a resync was under way");
            ds.phase = SyncPhase::Resync;
        }
        let sender = DiskSender::new(
            SenderConfig::default(),
            agent_name.clone(),
            dc.id,
            size,
            Generation(ds.generation),
        );
        let channel = DiskChannel::spawn(connector.clone(), sender, cancel.child_token());
        let points = Arc::new(AtomicBool::new(false));
        spawn_shipper(
            i,
            events,
            channel.clone(),
            shipped_tx.clone(),
            config.replication.max_batch as usize,
            config.replication.bandwidth_bytes_per_sec,
            points.clone(),
        );
        state.set_disk(&dc.id, ds.clone());
        tracing::info!(disk = %dc.id, device = %dc.path.display(), size, phase = ?ds.phase, "protecting");
        disks.push(Disk {
            cfg: dc.clone(),
            points,
            dev,
            size,
            reader,
            channel,
            state: ds,
            reads: BTreeMap::new(),
            read_bytes: 0,
            sync_next,
            sync_shipped: VecDeque::new(),
            resync_wanted,
            resync: None,
            rpo: Rpo::new(),
            rpo_alerted: false,
            durable: Seq::ZERO,
            last_seq: Seq::ZERO,
            bytes_read: 0,
            bytes_sent: 0,
            resync_hash_bytes: 0,
            progress: SyncProgress::new(),
            error: None,
        });
    }
    drop(shipped_tx);
    store.save(&state)?;
    tracker.forget_inherited()?;

    let mut svc = Service {
        config,
        store,
        state,
        disks,
        last_save: Instant::now(),
        last_status: Instant::now(),
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            notices = tracker.next() => match notices {
                Ok(notices) => svc.handle_notices(&mut tracker, notices),
                Err(e) => break Err(ServiceError::Tracker(e)),
            },
            Some(msg) = shipped_rx.recv() => svc.handle_shipped(&mut tracker, msg),
            _ = tick.tick() => {
                if let Err(e) = svc.handle_tick(&mut tracker) {
                    break Err(e);
                }
            }
        }
    };
    let clean = result.is_ok() && svc.drain(&mut tracker, &mut shipped_rx).await;
    svc.state.clean_shutdown = clean;
    svc.save_progress();
    svc.store.save(&svc.state)?;
    if clean {
        tracing::info!("stopped cleanly: everything tracked is durable at the target");
    } else {
        tracing::warn!(
            "stopped with data not yet durable at the target: the next start resyncs by checksum"
        );
    }
    connector.endpoint().close(0u32.into(), b"agent stopping");
    result
}

/// The reader settings of the configuration (hash-only readers of a resync
/// override what they need).
fn reader_config(config: &Config) -> ReaderConfig {
    ReaderConfig {
        chunk_size: config.replication.chunk_size,
        queue_depth: config.replication.queue_depth,
        zstd_level: Some(config.replication.zstd_level),
        ..ReaderConfig::default()
    }
}

/// The agent's name is the common name of its certificate: the relay checks it.
fn agent_name(config: &Config) -> Result<String, ServiceError> {
    let certs = blockferry_transport::tls::load_certs(&config.relay.cert)
        .map_err(|e| ServiceError::Tls(e.to_string()))?;
    let first = certs.first().ok_or_else(|| {
        ServiceError::Tls(format!(
            "{} holds no certificate; issue one with `blockferry-relay pki issue-agent`",
            config.relay.cert.display()
        ))
    })?;
    blockferry_transport::PeerIdentity::from_der(first)
        .map(|p| p.name)
        .map_err(|e| ServiceError::Tls(e.to_string()))
}

struct Service {
    config: Config,
    store: StateStore,
    state: AgentState,
    disks: Vec<Disk>,
    last_save: Instant,
    last_status: Instant,
}

impl Service {
    fn disk_of(&mut self, dev: DeviceId) -> Option<&mut Disk> {
        self.disks.iter_mut().find(|d| d.dev == dev)
    }

    fn handle_notices(&mut self, tracker: &mut Tracker, notices: Vec<Notice>) {
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
                        match size {
                            Some(size) if size > d.size => {
                                let old = d.size;
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
                                d.size = size;
                                d.state.size = size;
                                // Before the grown range is marked dirty: the relay
                                // and the target hear the new size in a Hello before
                                // any chunk past the old end.
                                if let Err(e) = d.channel.resize(size) {
                                    tracing::warn!(disk = %d.cfg.id, error = %e, "cannot resize the stream");
                                }
                                // The old range stays tracked; the new one is shipped.
                                tracker.mark_dirty(device, old..size);
                            }
                            Some(size) if size != d.size => {
                                // The replica keeps its size: what lies past it is
                                // not shipped until the disk is protected again.
                                let msg = format!(
                                    "{} shrank from {} to {size} bytes; the replica keeps its {} bytes (a replica never shrinks: grow the disk back, or protect it as a new disk)",
                                    d.cfg.path.display(),
                                    d.size,
                                    d.size
                                );
                                tracing::error!(disk = %d.cfg.id, "{msg}");
                                d.error = Some(msg);
                                d.resync_wanted = Some("the disk changed size");
                            }
                            _ => {
                                tracing::error!(disk = %d.cfg.id, dropped,
                                    "tracker lost events: resyncing the disk by checksum");
                                d.resync_wanted = Some("the tracker lost events");
                            }
                        }
                    }
                }
            }
        }
    }

    fn handle_shipped(&mut self, tracker: &mut Tracker, msg: Shipped) {
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
                if ok {
                    d.rpo.handle_shipped(read, last_seq.0);
                } else {
                    // Not read: it goes back dirty and is read again later.
                    tracker.mark_dirty(d.dev, r.range.clone());
                    d.rpo.handle_returned(read);
                }
                // A failed sync read still counts as synced: its range is dirty
                // and tracked now, and ships as a tracked write.
                if r.kind == ReadKind::Sync
                    && let Some(entry) = d
                        .sync_shipped
                        .iter_mut()
                        .find(|(end, s)| *end == r.range.end && s.is_none())
                {
                    entry.1 = Some(last_seq);
                }
            }
            Shipped::Stopped { disk, error } => {
                if let Some(d) = self.disks.get_mut(disk) {
                    tracing::error!(disk = %d.cfg.id, %error, "shipping stopped");
                    d.error = Some(error);
                }
            }
        }
    }

    fn handle_tick(&mut self, tracker: &mut Tracker) -> Result<(), ServiceError> {
        let now = Instant::now();
        for d in &mut self.disks {
            let progress = d.channel.progress().borrow().clone();
            d.durable = progress.durable;
            // The RPO runs until the write is durable at the replica, not at the relay.
            d.rpo.handle_ack(progress.replica.0);
            if let Some(err) = &progress.last_error {
                d.error = Some(err.clone());
            }
            if progress.resync.is_some() && d.resync.is_none() && d.resync_wanted.is_none() {
                d.resync_wanted = Some("the stream cannot resume where it stopped");
                d.state.generation += 1;
                let channel = d.channel.clone();
                let generation = Generation(d.state.generation);
                tokio::spawn(async move { channel.start_generation(generation).await });
            }
            Self::advance_sync(d);
            Self::poll_resync(d, tracker);
            if d.resync_wanted.is_some() && d.resync.is_none() && progress.connected {
                Self::start_resync(d, tracker, &self.config);
            }
            Self::schedule_reads(d, tracker)?;
            let complete = d.sync_next.is_none()
                && d.sync_shipped.is_empty()
                && d.resync.is_none()
                && d.resync_wanted.is_none()
                && matches!(d.state.phase, SyncPhase::Continuous);
            d.points.store(complete, Ordering::Relaxed);
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
        if now.duration_since(self.last_save) >= SAVE_EVERY {
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

    /// Moves the durable prefix of the initial sync forward.
    fn advance_sync(d: &mut Disk) {
        while let Some(&(end, Some(seq))) = d.sync_shipped.front() {
            if seq > d.durable {
                break;
            }
            d.sync_shipped.pop_front();
            d.state.phase = SyncPhase::InitialSync { next_offset: end };
        }
        if let SyncPhase::InitialSync { next_offset } = d.state.phase
            && d.sync_next.is_some()
        {
            d.progress.update(&d.cfg, next_offset, d.size);
        }
        if d.sync_next == Some(d.size) && d.sync_shipped.is_empty() {
            d.sync_next = None;
            d.state.phase = SyncPhase::Continuous;
            d.progress.finish(&d.cfg, d.size);
        }
    }

    fn start_resync(d: &mut Disk, tracker: &mut Tracker, config: &Config) {
        let why = d.resync_wanted.take().unwrap_or("asked");
        tracing::info!(disk = %d.cfg.id, reason = why, "checksum resync starts");
        d.state.phase = SyncPhase::Resync;
        // Everything is compared, so nothing needs the initial sync any more;
        // writes from now on are tracked and shipped on top.
        d.sync_next = None;
        d.sync_shipped.clear();
        // The comparison reads the whole disk after this point, so what was
        // dirty before it is covered by the comparison.
        tracker.take_dirty(d.dev, u64::MAX);
        let path = d.cfg.path.clone();
        let size = d.size;
        let chunk = u64::from(config.replication.chunk_size);
        let rc = reader_config(config);
        let mut exchange = ChannelExchange {
            channel: d.channel.clone(),
            pending: FuturesUnordered::new(),
        };
        let disk = d.cfg.id;
        let generation = Generation(d.state.generation);
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
        match result.map_err(|e| ResyncError::Exchange(e.to_string())) {
            Ok(Ok(plan)) => {
                for r in &plan.ranges {
                    tracker.mark_dirty(d.dev, r.offset..(r.offset + r.len).min(d.size));
                }
                d.resync_hash_bytes += plan.stats.bytes();
                let now_s = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |t| t.as_secs());
                d.state.last_resync = Some(now_s);
                d.state.phase = SyncPhase::Continuous;
                tracing::info!(disk = %d.cfg.id, differing_bytes = plan.bytes,
                    ranges = plan.ranges.len(), hash_bytes = plan.stats.bytes(),
                    "checksum resync compared; shipping the differences");
            }
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(disk = %d.cfg.id, error = %e, "checksum resync failed; retrying");
                d.error = Some(e.to_string());
                d.resync_wanted = Some("the previous attempt failed");
            }
        }
    }

    /// Submits reads while the read window has room: first tracked writes (they
    /// age the RPO), then the next piece of the initial sync.
    fn schedule_reads(d: &mut Disk, tracker: &mut Tracker) -> Result<(), ServiceError> {
        if d.read_bytes < READ_WINDOW && d.resync.is_none() {
            let room = READ_WINDOW - d.read_bytes;
            let taken = tracker.take_dirty(d.dev, room);
            if !taken.is_empty() {
                let emptied = tracker.dirty(d.dev).is_none_or(|s| s.is_empty());
                for r in taken {
                    let r = r.start..r.end.min(d.size);
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
        while let Some(next) = d.sync_next {
            if next >= d.size || d.read_bytes >= READ_WINDOW {
                break;
            }
            let end = (next + SYNC_PIECE).min(d.size);
            let id = d.reader.submit(next, end - next)?;
            d.read_bytes += end - next;
            d.reads.insert(
                id,
                InRead {
                    range: next..end,
                    kind: ReadKind::Sync,
                },
            );
            d.sync_shipped.push_back((end, None));
            d.sync_next = Some(end);
        }
        Ok(())
    }

    fn save_progress(&mut self) {
        for d in &self.disks {
            self.state.set_disk(&d.cfg.id, d.state.clone());
        }
    }

    fn write_status(&mut self, tracker: &Tracker) {
        let now = Instant::now();
        let mut st = Status {
            pid: std::process::id(),
            updated_ms: unix_ns() / 1_000_000,
            relay: self.config.relay.address.to_string(),
            connected: false,
            disks: Vec::new(),
        };
        for d in &mut self.disks {
            let progress = d.channel.progress().borrow().clone();
            st.connected |= progress.connected;
            let dirty = tracker.dirty(d.dev).map_or(0, |s| s.total_bytes());
            let sync_percent = match d.state.phase {
                SyncPhase::InitialSync { next_offset } if d.size > 0 => {
                    Some(next_offset as f64 * 100.0 / d.size as f64)
                }
                _ => None,
            };
            let state = if !progress.connected {
                "disconnected"
            } else {
                match d.state.phase {
                    SyncPhase::InitialSync { .. } => "initial-sync",
                    SyncPhase::Resync => "resync",
                    SyncPhase::Continuous => "replicating",
                }
            };
            let rpo = d.rpo.current(now);
            st.disks.push(DiskStatus {
                id: d.cfg.id.to_string(),
                device: d.cfg.path.display().to_string(),
                size: d.size,
                generation: d.state.generation,
                state: state.to_owned(),
                sync_percent,
                rpo_ms: rpo.as_millis() as u64,
                worst_rpo_ms: d.rpo.worst().as_millis() as u64,
                backlog_bytes: dirty + d.read_bytes + progress.unacked_bytes as u64,
                bytes_read: d.bytes_read,
                bytes_sent: d.bytes_sent,
                resync_hash_bytes: d.resync_hash_bytes,
                last_resync: d.state.last_resync,
                durable_seq: progress.durable.0,
                replica_seq: progress.replica.0,
                last_error: d.error.clone().or(progress.last_error),
            });
        }
        if let Err(e) = status::write(&self.config.state_dir, &st) {
            tracing::warn!(error = %e, "status not written");
        }
    }

    /// A clean stop: ship what is tracked, wait until the target has it durable.
    /// Returns whether nothing tracked is left behind.
    async fn drain(&mut self, tracker: &mut Tracker, rx: &mut mpsc::Receiver<Shipped>) -> bool {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            if let Ok(notices) = tracker.poll_now() {
                self.handle_notices(tracker, notices);
            }
            while let Some(Some(msg)) = rx.recv().now_or_never() {
                self.handle_shipped(tracker, msg);
            }
            let mut idle = true;
            for d in &mut self.disks {
                let progress = d.channel.progress().borrow().clone();
                if !progress.connected {
                    // Nothing can become durable: stop now, resync at the next start.
                    return false;
                }
                d.durable = progress.durable;
                d.rpo.handle_ack(progress.replica.0);
                Self::advance_sync(d);
                // The initial sync is not finished at a stop: it resumes later.
                d.sync_next = None;
                if d.resync.is_some() || d.resync_wanted.is_some() {
                    return false;
                }
                if Self::schedule_reads(d, tracker).is_err() {
                    return false;
                }
                let dirty = tracker.dirty(d.dev).is_some_and(|s| !s.is_empty());
                if dirty || !d.reads.is_empty() || progress.durable < d.last_seq {
                    idle = false;
                }
            }
            if idle {
                return true;
            }
            if Instant::now() >= deadline {
                tracing::warn!("the target did not make everything durable in time");
                return false;
            }
            tokio::select! {
                Some(msg) = rx.recv() => self.handle_shipped(tracker, msg),
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }
}

/// Progress of an initial sync: a bar (bytes, rate, ETA) on a terminal, a log
/// line every few seconds otherwise, as services log.
struct SyncProgress {
    started: Option<(Instant, u64)>,
    last_log: Instant,
    bar: Option<indicatif::ProgressBar>,
}

/// How often an initial sync logs its progress when not on a terminal.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(5);

impl SyncProgress {
    fn new() -> Self {
        SyncProgress {
            started: None,
            last_log: Instant::now(),
            bar: None,
        }
    }

    /// `done` bytes of `size` are durable at the relay.
    fn update(&mut self, disk: &DiskConfig, done: u64, size: u64) {
        let now = Instant::now();
        let (t0, from) = *self.started.get_or_insert((now, done));
        if self.bar.is_none() && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let bar = indicatif::ProgressBar::new(size);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(format!("initial sync {}", disk.path.display()));
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        } else if now.duration_since(self.last_log) >= PROGRESS_LOG_EVERY {
            self.last_log = now;
            let secs = now.duration_since(t0).as_secs_f64().max(0.001);
            let rate = (done - from.min(done)) as f64 / secs;
            let eta = if rate > 0.0 {
                format!("{:.0}", (size - done.min(size)) as f64 / rate)
            } else {
                "unknown".to_owned()
            };
            tracing::info!(disk = %disk.id, done_bytes = done, size_bytes = size,
                percent = format!("{:.1}", done as f64 * 100.0 / size.max(1) as f64),
                mb_per_s = format!("{:.1}", rate / 1e6), eta_s = eta,
                "initial sync progress");
        }
    }

    fn finish(&mut self, disk: &DiskConfig, size: u64) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let rate = self.started.map(|(t0, from)| {
            (size - from.min(size)) as f64 / t0.elapsed().as_secs_f64().max(0.001) / 1e6
        });
        tracing::info!(disk = %disk.id, size_bytes = size,
            mb_per_s = rate.map(|r| format!("{r:.1}")).unwrap_or_default(),
            "initial sync complete");
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| t.as_nanos() as u64)
}

type PendingReply = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<HashRangeReply, blockferry_transport::ChannelError>>
            + Send,
    >,
>;

/// Hash requests and replies over the disk's channel, several in flight.
struct ChannelExchange {
    channel: DiskChannel,
    pending: FuturesUnordered<PendingReply>,
}

impl HashExchange for ChannelExchange {
    async fn send(&mut self, request: HashRangeRequest) -> Result<(), ResyncError> {
        let channel = self.channel.clone();
        self.pending
            .push(Box::pin(async move { channel.hash_ranges(request).await }));
        Ok(())
    }

    async fn recv(&mut self) -> Result<HashRangeReply, ResyncError> {
        match self.pending.next().await {
            Some(r) => r.map_err(|e| ResyncError::Exchange(e.to_string())),
            None => Err(ResyncError::Exchange("no request in flight".into())),
        }
    }
}

/// The per-disk shipper: reader output → batches → channel. Batches close when
/// full, or when the reader has nothing more ready, so a quiet disk ships at once
/// and a busy one ships large batches. When the reader runs dry after shipping,
/// at most once per [`POINT_EVERY`], a barrier asks the target for a recovery
/// point. It is labelled not consistent: the agent does not yet prove write
/// ordering for its reads, and a label is never assumed.
fn spawn_shipper(
    disk: usize,
    events: ReaderEvents,
    channel: DiskChannel,
    tx: mpsc::Sender<Shipped>,
    max_batch: usize,
    rate: Option<u64>,
    points_allowed: Arc<AtomicBool>,
) {
    let mut shipper = Shipper {
        points_allowed,
        disk,
        channel,
        tx,
        max_batch,
        batch: Vec::new(),
        batch_bytes: 0,
        sizes: BTreeMap::new(),
        done: Vec::new(),
        last_seq: Seq::ZERO,
        pacer: Pacer::new(rate),
        since_point: false,
        last_point: tokio::time::Instant::now(),
    };
    tokio::spawn(async move {
        if let Err(e) = shipper.run(events).await
            && shipper
                .tx
                .send(Shipped::Stopped { disk, error: e })
                .await
                .is_err()
        {
            tracing::debug!("service already stopped");
        }
    });
}

/// How long a partial batch waits for more chunks before it is shipped.
const LINGER: Duration = Duration::from_millis(3);

/// How often at most a shipper asks for a recovery point.
const POINT_EVERY: Duration = Duration::from_secs(1);

struct Shipper {
    points_allowed: Arc<AtomicBool>,
    disk: usize,
    channel: DiskChannel,
    tx: mpsc::Sender<Shipped>,
    max_batch: usize,
    batch: Vec<Chunk>,
    batch_bytes: usize,
    /// Plain and wire bytes per read, until the read is reported.
    sizes: BTreeMap<u64, (u64, u64)>,
    /// Reads whose chunks have all been gathered, with their outcome.
    done: Vec<(u64, bool)>,
    last_seq: Seq,
    pacer: Pacer,
    since_point: bool,
    last_point: tokio::time::Instant,
}

impl Shipper {
    async fn run(&mut self, mut events: ReaderEvents) -> Result<(), String> {
        loop {
            let ev = match events.next().now_or_never() {
                Some(ev) => ev,
                None if !self.batch.is_empty() => {
                    // Nothing ready yet: linger briefly so a streaming reader
                    // fills batches, then ship what is gathered.
                    match tokio::time::timeout(LINGER, events.next()).await {
                        Ok(ev) => ev,
                        Err(_) => {
                            self.flush().await?;
                            continue;
                        }
                    }
                }
                None => {
                    // Idle: report reads, maybe ask for a point, then wait.
                    self.flush().await?;
                    if self.since_point
                        && self.last_point.elapsed() >= POINT_EVERY
                        && self.points_allowed.load(Ordering::Relaxed)
                    {
                        self.point().await?;
                    }
                    tokio::select! {
                        ev = events.next() => ev,
                        _ = tokio::time::sleep(POINT_EVERY), if self.since_point => continue,
                    }
                }
            };
            let Some(ev) = ev else {
                return Ok(());
            };
            match ev {
                ReaderEvent::Chunk { range, chunk } => {
                    let wire = if chunk.encoding == Encoding::Zero {
                        0
                    } else {
                        chunk.payload.len()
                    };
                    let e = self.sizes.entry(range).or_default();
                    e.0 += u64::from(chunk.len);
                    e.1 += wire as u64;
                    self.batch_bytes += wire + 64;
                    self.batch.push(chunk);
                    if self.batch_bytes >= self.max_batch
                        || self.batch.len() >= blockferry_proto::frame::MAX_CHUNKS_PER_BATCH
                    {
                        self.flush().await?;
                    }
                }
                ReaderEvent::ChunkFailed {
                    range,
                    offset,
                    error,
                } => {
                    tracing::warn!(read = range, offset, %error, "chunk not read; it stays dirty");
                }
                ReaderEvent::RangeDone { range, ok } => self.done.push((range, ok)),
                ReaderEvent::Fatal(e) => return Err(e.to_string()),
            }
        }
    }

    /// Pushes the gathered batch, then reports every read whose chunks are all
    /// pushed: they are durable once `last_seq` is.
    async fn flush(&mut self) -> Result<(), String> {
        if !self.batch.is_empty() {
            self.pacer.pace(self.batch_bytes as u64).await;
            let chunks = std::mem::take(&mut self.batch);
            self.batch_bytes = 0;
            self.last_seq = self
                .channel
                .push_batch(chunks)
                .await
                .map_err(|e| e.to_string())?;
            self.since_point = true;
        }
        for (read, ok) in std::mem::take(&mut self.done) {
            let (plain, wire) = self.sizes.remove(&read).unwrap_or((0, 0));
            let msg = Shipped::Read {
                disk: self.disk,
                read,
                ok,
                last_seq: self.last_seq,
                plain,
                wire,
            };
            self.tx
                .send(msg)
                .await
                .map_err(|_| "the service stopped".to_owned())?;
        }
        Ok(())
    }

    async fn point(&mut self) -> Result<(), String> {
        self.last_seq = self
            .channel
            .push_barrier(Consistency::NotConsistent, unix_ns())
            .await
            .map_err(|e| e.to_string())?;
        self.since_point = false;
        self.last_point = tokio::time::Instant::now();
        Ok(())
    }
}

/// Bandwidth cap of the agent: spaces pushes so the wire sees at most `rate`
/// bytes per second on average.
struct Pacer {
    rate: Option<u64>,
    next: tokio::time::Instant,
}

impl Pacer {
    fn new(rate: Option<u64>) -> Self {
        Pacer {
            rate,
            next: tokio::time::Instant::now(),
        }
    }

    async fn pace(&mut self, bytes: u64) {
        let Some(rate) = self.rate.filter(|&r| r > 0) else {
            return;
        };
        let now = tokio::time::Instant::now();
        if self.next < now {
            self.next = now;
        }
        tokio::time::sleep_until(self.next).await;
        self.next += Duration::from_secs_f64(bytes as f64 / rate as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_pushes_to_the_rate() {
        let mut p = Pacer::new(Some(1_000_000));
        let t0 = tokio::time::Instant::now();
        for _ in 0..10 {
            p.pace(100_000).await;
        }
        // Ten pushes of 0.1 s each: the tenth may start after 0.9 s.
        assert_eq!(tokio::time::Instant::now() - t0, Duration::from_millis(900));
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_without_rate_never_waits() {
        let mut p = Pacer::new(None);
        let t0 = tokio::time::Instant::now();
        p.pace(1 << 30).await;
        assert_eq!(tokio::time::Instant::now(), t0);
    }
}
