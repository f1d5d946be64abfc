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
//! The phases of a disk (initial sync, resync, continuous) are decided by the
//! sans-IO [`crate::phase::DiskPhase`]; this module only drives it: it feeds it
//! tracker notices, shipped reads and the channel's progress, and carries out
//! what it asks (reads, comparisons, a new generation). Tracking starts before
//! anything is read, so a write during any phase is caught by the tracker and
//! shipped again after it.
//!
//! Files by job: this one sets up and runs the loop; `disk` handles the events
//! of a disk; `drain` is the clean stop; `report` the status file; `progress`
//! the initial sync's progress display; `shipper` (with `pacer`) turns reader
//! output into batches; `exchange` carries a resync's hash requests;
//! `handoff` runs the loop for one disk until the planned failover's final
//! point is durable at the replica (`blockferry-agent handoff`).
//!
//! One process at a time owns the state directory (a lock file there):
//! `reprotect` and `handoff` refuse while the service runs.

mod disk;
mod drain;
mod exchange;
mod handoff;
mod pacer;
mod progress;
mod report;
mod shipper;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blockferry_proto::{DiskSender, SenderConfig, Seq};
use blockferry_transport::endpoint::EndpointError;
use blockferry_transport::{Connector, DiskChannel, Tuning};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DiskConfig};
use crate::phase::DiskPhase;
use crate::reader::{self, ReadHandle, ReaderConfig};
use crate::resync::{self, ResyncError};
use crate::rpo::Rpo;
use crate::state::{AgentState, StateStore};
use crate::tracker::{DeviceId, Tracker, TrackerError};

pub use handoff::{HandedOff, handoff};
use progress::SyncProgress;
pub use shipper::ShipError;
use shipper::{Shipped, spawn_shipper};

/// Errors that stop the service. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error(transparent)]
    Reader(#[from] crate::reader::ReaderError),
    #[error("certificates of the relay connection: check cert, key and ca under [relay]")]
    Tls(#[from] blockferry_transport::tls::TlsError),
    #[error("{} holds no certificate; issue one with `blockferry-relay pki issue-agent`", .0.display())]
    NoCertificate(PathBuf),
    #[error("cannot set up the connection to the relay")]
    Endpoint(#[from] EndpointError),
    #[error("{} vanished while being protected; check the device", .0.display())]
    DiskVanished(PathBuf),
    #[error("disk {0} is not in the configuration: check --disk and the [[disk]] entries")]
    NotConfigured(blockferry_proto::DiskId),
    #[error(
        "disk {0} was never protected by this agent: there is nothing to hand off (run the service first)"
    )]
    NeverProtected(blockferry_proto::DiskId),
    #[error(
        "disk {disk} is {state}: only a protected disk can be handed off (see `blockferry-agent status`)"
    )]
    NotProtected {
        disk: blockferry_proto::DiskId,
        state: &'static str,
    },
    #[error(
        "{} is in use (a mounted file system or another exclusive holder): unmount it or stop the workload, then run handoff again", .0.display()
    )]
    DeviceBusy(PathBuf),
    #[error("cannot open {path}: {source}")]
    Device {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Handoff(#[from] crate::handoff::HandoffError),
    #[error("interrupted: the disk is still the source; run handoff again to finish")]
    Interrupted,
    #[error("generation record not demoted: the disk is still the source")]
    Record(#[from] blockferry_proto::GenerationError),
}

/// Bytes of reads in flight per disk: bounds memory together with the window.
const READ_WINDOW: u64 = 64 << 20;
/// How often bookkeeping runs when no event wakes the loop.
const TICK: Duration = Duration::from_millis(20);
/// How often progress is persisted (fsynced).
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// How often the status file is rewritten (not fsynced: it describes the moment).
const STATUS_EVERY: Duration = Duration::from_millis(200);
/// How long a clean stop waits for the target to make everything durable.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// The phase decisions; the rest of this struct carries them out.
    phase: DiskPhase,
    /// Whether the shipper may ask for recovery points, from
    /// [`DiskPhase::points_allowed`].
    points: Arc<AtomicBool>,
    dev: DeviceId,
    reader: ReadHandle,
    channel: DiskChannel,
    reads: BTreeMap<u64, InRead>,
    read_bytes: u64,
    resync: Option<tokio::task::JoinHandle<Result<resync::ResyncPlan, ResyncError>>>,
    rpo: Rpo,
    rpo_alerted: bool,
    last_seq: Seq,
    bytes_read: u64,
    bytes_sent: u64,
    resync_hash_bytes: u64,
    progress: SyncProgress,
    error: Option<String>,
    /// The device's generation record (a source), saved beside the state.
    record: blockferry_proto::GenerationRecord,
    /// Ranges shipped in frames up to a sequence not yet durable at the
    /// replica, oldest first (bounded by the relay's spool: a few bytes per
    /// read). A fence means the replica refuses what it has not applied,
    /// including what the relay spooled, so these go back to the dirty set.
    unacked: std::collections::VecDeque<(Seq, Range<u64>)>,
}

/// Runs the service until `cancel` fires, then stops cleanly.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), ServiceError> {
    let Started {
        mut svc,
        mut tracker,
        mut shipped_rx,
        connector,
    } = start(config, None, &cancel)?;
    // Every configured disk is tracked from here on: what systemd waits for
    // (Type=notify) before it counts the agent as started.
    blockferry_transport::notify::ready();
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

/// A started service: the loop's parts.
struct Started {
    svc: Service,
    tracker: Tracker,
    shipped_rx: mpsc::Receiver<Shipped>,
    connector: Arc<Connector>,
}

/// Takes the state directory, loads the state and the tracker, and starts
/// the reader, channel and shipper of every configured disk, or with `only`
/// of that one disk: the others are then tracked (so that no write of theirs
/// is consumed unseen) but not shipped.
fn start(
    config: Config,
    only: Option<blockferry_proto::DiskId>,
    cancel: &CancellationToken,
) -> Result<Started, ServiceError> {
    let store = StateStore::new(&config.state_dir);
    // One process owns the state: `reprotect` and `handoff` refuse while
    // the service runs.
    let lock = store.lock()?;
    let mut state = store.load()?;
    let was_clean = state.clean_shutdown;
    state.clean_shutdown = false;
    store.save(&state)?;
    if !was_clean {
        tracing::warn!(
            "the last stop was not clean: every disk is compared by checksum with the target before replication continues"
        );
    }

    let connector = connect(&config)?;
    let agent_name = agent_name(&config)?;

    // Pinned: the kernel keeps tracking while this process is down, so a clean
    // restart needs no resync and writes made meanwhile are not lost.
    let (mut tracker, continuity) = Tracker::load_persistent(&config.tracker_pin_dir)?;
    if !continuity.is_continuous() {
        tracing::warn!(
            ?continuity,
            "kernel tracking was not continuous since the last run: known disks are compared by checksum"
        );
    }
    let (shipped_tx, shipped_rx) = mpsc::channel::<Shipped>(256);
    let mut disks = Vec::new();
    let mut bystanders = Vec::new();
    for dc in &config.disks {
        // Tracking starts first: a write from here on is seen, whatever is read.
        let dev = tracker.protect(&dc.path)?;
        if only.is_some_and(|id| id != dc.id) {
            bystanders.push(Bystander {
                id: dc.id,
                dev,
                continuous: tracker.continuous(dev),
            });
            continue;
        }
        let i = disks.len();
        let size = tracker
            .device(dev)
            .map(|d| d.size_bytes())
            .ok_or_else(|| ServiceError::DiskVanished(dc.path.clone()))?;
        let (reader, events) = reader::spawn(&dc.path, &reader_config(&config))?;
        let prev = state.disk(&dc.id).cloned();
        let old_size = prev.as_ref().map(|p| p.size);
        let (mut phase, grown) =
            DiskPhase::start(prev, &dc.path, size, was_clean, tracker.continuous(dev));
        if let Some(grown) = grown {
            tracing::info!(disk = %dc.id, old = grown.start, new = size, "disk grew while the agent was down");
            tracker.mark_dirty(dev, grown);
        } else if let Some(old) = old_size.filter(|&old| old != size) {
            tracing::warn!(disk = %dc.id, old, new = size, "disk shrank while the agent was down");
        }
        let record = store.load_record(&dc.id, phase.generation())?;
        if record.role() != blockferry_proto::CopyRole::Source && !phase.halted() {
            // A handoff demoted the record and stopped before it saved the
            // state: the replica holds everything through the record's seq.
            phase.handle_handed_off(
                record.current().seq,
                record.current().number,
                unix_ns() / 1_000_000_000,
            );
        }
        if let Some(fence) = phase.fence() {
            tracing::warn!(disk = %dc.id, lineage = %record.lineage(), "{}", fence.advice());
        }
        if let Some(h) = phase.handed_off() {
            tracing::info!(disk = %dc.id, lineage = %record.lineage(), "{}", h.advice());
        }
        let sender = DiskSender::new(
            SenderConfig::default(),
            agent_name.clone(),
            dc.id,
            size,
            phase.generation(),
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
        state.set_disk(&dc.id, phase.state().clone());
        tracing::info!(disk = %dc.id, device = %dc.path.display(), size, phase = ?phase.state().phase, "protecting");
        disks.push(Disk {
            cfg: dc.clone(),
            phase,
            points,
            dev,
            reader,
            channel,
            reads: BTreeMap::new(),
            read_bytes: 0,
            resync: None,
            rpo: Rpo::new(),
            rpo_alerted: false,
            last_seq: Seq::ZERO,
            bytes_read: 0,
            bytes_sent: 0,
            resync_hash_bytes: 0,
            progress: SyncProgress::new(),
            error: None,
            record,
            unacked: std::collections::VecDeque::new(),
        });
    }
    drop(shipped_tx);
    store.save(&state)?;
    if only.is_none() {
        tracker.forget_inherited()?;
    }

    let svc = Service {
        config,
        store,
        state,
        disks,
        bystanders,
        was_clean,
        no_points: false,
        last_save: Instant::now(),
        last_status: Instant::now(),
        _lock: lock,
    };
    Ok(Started {
        svc,
        tracker,
        shipped_rx,
        connector,
    })
}

/// The QUIC endpoint and the connector to the relay, with the agent's certificate.
fn connect(config: &Config) -> Result<Arc<Connector>, ServiceError> {
    let (ca, identity) = config.relay.tls.load()?;
    let tuning = if config.relay.address.ip().is_loopback() {
        Tuning::loopback()
    } else {
        Tuning::default()
    };
    let client = blockferry_transport::client_config(&ca, identity, &tuning)?;
    let endpoint = blockferry_transport::client_endpoint(
        blockferry_transport::endpoint::any_addr_for(config.relay.address),
        client,
        &tuning,
    )?;
    Ok(Connector::new(
        endpoint,
        config.relay.address,
        config.relay.server_name.clone(),
    ))
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
    let certs = blockferry_transport::tls::load_certs(&config.relay.tls.cert)?;
    let first = certs
        .first()
        .ok_or_else(|| ServiceError::NoCertificate(config.relay.tls.cert.clone()))?;
    Ok(blockferry_transport::PeerIdentity::from_der(first)?.name)
}

struct Service {
    config: Config,
    store: StateStore,
    state: AgentState,
    disks: Vec<Disk>,
    /// Disks tracked but not shipped by this process (a handoff of another
    /// disk): what they collect is not shipped, so they resync at the next
    /// start if anything was collected.
    bystanders: Vec<Bystander>,
    /// Whether the stop before this start was clean.
    was_clean: bool,
    /// No recovery points but the final one (a handoff cuts its own).
    no_points: bool,
    last_save: Instant,
    last_status: Instant,
    _lock: crate::state::StateLock,
}

/// A disk tracked, not shipped (see [`Service::bystanders`]).
struct Bystander {
    id: blockferry_proto::DiskId,
    dev: DeviceId,
    continuous: bool,
}

impl Service {
    fn save_progress(&mut self) {
        for d in &self.disks {
            self.state.set_disk(&d.cfg.id, d.phase.state().clone());
        }
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| t.as_nanos() as u64)
}
