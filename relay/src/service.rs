//! The relay service: agents in (through the shared receiving loop of
//! `blockferry_transport::sink`), the spool in the middle, one forwarder per
//! disk out to the target.
//!
//! This module is the async shell of `blockferry_proto::relay`: the sequence,
//! ack and resume logic is proto's `DiskReceiver` upstream (run by the
//! receiving loop) and a forwarding `DiskSender` downstream (run by a
//! `DiskChannel`); which spooled frame goes next and what may be released is
//! proto's `SpoolCursor`, and a restart begins at `RelayRestore::from_spool`.
//! These are the pieces `RelayDisk` joins in the simulation; this module only
//! moves bytes between them, the spool and the sockets.
//!
//! **Fencing.** When the target answers a disk's stream with a newer
//! generation (its replica was promoted), the forwarder marks the disk
//! fenced, once, and the relay passes the typed refusal on to the agent: an
//! open stream ends with `StaleGeneration` before anything more is spooled,
//! and the next one starts at the target's generation, so the agent's frames
//! are nacked as stale and its hello reply names the newer generation.
//!
//! **Streams the relay never held.** A disk's stream counts on across
//! generations, so an agent past its first generation whose disk the spool
//! knows nothing of (reprotect and re-enable, after `blockferry-relay forget`,
//! or a lost spool) resumes where the replica stands: before answering its
//! hello the relay asks the target through the disk's forwarder and takes the
//! target's durable position as acked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockferry_proto::sender::sequenced;
use blockferry_proto::{
    DiskId, DiskSender, ErrorCode, Frame, Generation, HashRangeReply, HashRangeRequest, Hello,
    PushError, ResyncReason, SenderConfig, Seq, SpoolCursor,
};
use blockferry_transport::sink::{self, Accepted, DiskState, FrameSink, ServeOptions, SinkError};
use blockferry_transport::{
    ChannelError, Connector, DiskChannel, PeerIdentity, Progress, RevocationList, Tuning,
    client_config, client_endpoint, server_config, server_endpoint_for,
};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bucket::TokenBucket;
use crate::config::Config;
use crate::gate::ByteGate;
use crate::metrics::{self, Metrics};
use crate::spool::{Entry, Spool, SpoolError, SpoolOptions};

/// Errors starting the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Tls(#[from] blockferry_transport::tls::TlsError),
    #[error(transparent)]
    Endpoint(#[from] blockferry_transport::endpoint::EndpointError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("revocation list {path}: {detail}")]
    Revocation { path: String, detail: String },
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("spool task failed: {0}")]
    Join(String),
    #[error("the spool directory cannot be made private to the relay's user")]
    Private(#[source] blockferry_durable::DurableError),
}

/// A running relay.
#[derive(Debug)]
pub struct RelayHandle {
    /// The QUIC address agents connect to.
    pub listen_addr: SocketAddr,
    /// The metrics address, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    serve: tokio::task::JoinHandle<()>,
}

impl RelayHandle {
    /// Waits until the relay has stopped (after its cancellation token fired).
    pub async fn stopped(self) {
        if let Err(e) = self.serve.await {
            tracing::error!(error = %e, "relay task failed");
        }
    }
}

struct Forwarder {
    wake: Arc<Notify>,
    channel: DiskChannel,
    /// Shared by the forward and release tasks of the disk.
    cursor: Mutex<SpoolCursor>,
    /// The target's generation once it refused this disk's stream as stale:
    /// its replica was promoted, and the agent is fenced.
    fenced: Mutex<Option<Generation>>,
}

impl Forwarder {
    fn cursor(&self) -> std::sync::MutexGuard<'_, SpoolCursor> {
        self.cursor.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fenced(&self) -> Option<Generation> {
        *self.fenced.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the fence is new.
    fn fence(&self, by: Generation) -> bool {
        let mut f = self.fenced.lock().unwrap_or_else(|e| e.into_inner());
        let new = f.is_none_or(|g| g < by);
        if new {
            *f = Some(by);
        }
        new
    }
}

/// The refusal passed on to the agent of a fenced disk.
fn fenced_error(disk: DiskId, by: Generation) -> SinkError {
    SinkError::new(
        ErrorCode::StaleGeneration,
        format!(
            "disk {disk}: the replica was promoted to generation {by}; this source is fenced and its frames are refused (reprotect it from the promoted copy)"
        ),
    )
}

struct Shared {
    cfg: Config,
    spool: Arc<Mutex<Spool>>,
    gate: ByteGate,
    metrics: Arc<Metrics>,
    forwarders: Mutex<HashMap<DiskId, Arc<Forwarder>>>,
    target: Arc<Connector>,
    /// The relay's own name, sent to the target in each Hello.
    identity: String,
    bucket: Option<Mutex<TokenBucket>>,
    cancel: CancellationToken,
}

/// Runs `f` on the spool from a blocking thread (file I/O and fsync).
async fn on_spool<T: Send + 'static>(
    spool: &Arc<Mutex<Spool>>,
    f: impl FnOnce(&mut Spool) -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = spool.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    })
    .await
    .map_err(|e| SpoolError::Io {
        action: "run spool task for",
        path: Default::default(),
        offset: 0,
        source: std::io::Error::other(e.to_string()),
    })?
}

/// Starts the relay described by `cfg`; it runs until `cancel` fires.
///
/// Everything the relay creates from here on (spool segments, state,
/// indexes) is private to its owner: the process's umask becomes 077.
pub async fn start(cfg: Config, cancel: CancellationToken) -> Result<RelayHandle, RelayError> {
    blockferry_durable::set_umask(0o077);
    let tuning = if cfg.loopback_tuning {
        Tuning::loopback()
    } else {
        Tuning::default()
    };
    let (ca, identity) = cfg.tls.load()?;
    let own_name = identity
        .chain
        .first()
        .map(|c| PeerIdentity::from_der(c))
        .transpose()?
        .map(|p| p.name)
        .unwrap_or_else(|| "relay".into());
    let revoked = match &cfg.revocation_list {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| RelayError::Revocation {
                path: path.display().to_string(),
                detail: e.to_string(),
            })?;
            RevocationList::parse(&text).map_err(|detail| RelayError::Revocation {
                path: path.display().to_string(),
                detail,
            })?
        }
        None => RevocationList::default(),
    };
    let server = server_endpoint_for(
        cfg.listen,
        server_config(&ca, identity.clone(), revoked, &tuning)?,
        &tuning,
        &identity,
    )?;
    let listen_addr = server.local_addr().map_err(|source| {
        blockferry_transport::endpoint::EndpointError::Bind {
            addr: cfg.listen,
            source,
        }
    })?;
    let client = client_endpoint(
        blockferry_transport::endpoint::any_addr_for(cfg.target.address),
        client_config(&ca, identity, &tuning)?,
        &tuning,
    )?;
    let target = Connector::new(client, cfg.target.address, cfg.target.server_name.clone());

    let spool_dir = cfg.spool_dir.clone();
    let opts = SpoolOptions {
        segment_bytes: cfg.spool_segment_bytes,
        fsync: true,
    };
    let spool = tokio::task::spawn_blocking(move || {
        let spool = Spool::open(&spool_dir, opts)?;
        // Created before the relay kept its files private, perhaps.
        blockferry_durable::make_private_dir(&spool_dir).map_err(RelayError::Private)?;
        Ok::<_, RelayError>(spool)
    })
    .await
    .map_err(|e| RelayError::Join(e.to_string()))??;
    let used = spool.live_bytes();
    let disks = spool.disks();
    let metrics = Arc::new(Metrics::default());
    metrics.spool_bytes.store(used, Ordering::Relaxed);
    tracing::info!(
        spool = %cfg.spool_dir.display(),
        bytes = used,
        disks = disks.len(),
        "spool opened"
    );

    let metrics_addr = match cfg.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RelayError::Metrics { addr, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| RelayError::Metrics { addr, source })?;
            tokio::spawn(metrics::serve(l, metrics.clone(), cancel.clone()));
            Some(bound)
        }
        None => None,
    };

    let bucket = cfg
        .target
        .bandwidth_limit
        .map(|rate| Mutex::new(TokenBucket::new(rate, rate.max(1 << 20), Instant::now())));
    let shared = Arc::new(Shared {
        gate: ByteGate::new(cfg.spool_limit, used),
        cfg,
        spool: Arc::new(Mutex::new(spool)),
        metrics: metrics.clone(),
        forwarders: Mutex::new(HashMap::new()),
        target,
        identity: own_name,
        bucket,
        cancel: cancel.clone(),
    });
    // Replay: every disk with spooled frames (or a known position) forwards
    // again from where the target left off.
    for disk in disks {
        shared.forwarder(disk, None);
    }
    tracing::info!(quic = %listen_addr, target = %shared.cfg.target.address, "relay listening");
    let sink = Arc::new(RelaySink {
        shared: shared.clone(),
    });
    let serve = tokio::spawn(async move {
        sink::serve(server, sink, ServeOptions::default(), cancel.clone()).await;
        shared
            .target
            .endpoint()
            .close(0u32.into(), b"relay stopping");
    });
    Ok(RelayHandle {
        listen_addr,
        metrics_addr,
        metrics,
        serve,
    })
}

impl Shared {
    fn spool_lock(&self) -> std::sync::MutexGuard<'_, Spool> {
        self.spool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The forwarder of `disk`, started on first use.
    /// `generation` is used for a disk the spool knows nothing about yet.
    fn forwarder(self: &Arc<Self>, disk: DiskId, generation: Option<Generation>) -> Arc<Forwarder> {
        let mut map = self.forwarders.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = map.get(&disk) {
            return f.clone();
        }
        let restore = self
            .spool_lock()
            .restore(disk, generation.unwrap_or(Generation(0)));
        let sender = DiskSender::forwarding(
            SenderConfig {
                max_unacked_frames: 256,
                max_unacked_bytes: 128 << 20,
                retransmit_after: None,
            },
            self.identity.clone(),
            disk,
            restore.disk_size,
            restore.generation,
        );
        let channel = DiskChannel::spawn(self.target.clone(), sender, self.cancel.clone());
        let f = Arc::new(Forwarder {
            wake: Arc::new(Notify::new()),
            channel,
            cursor: Mutex::new(SpoolCursor::restore(&restore)),
            fenced: Mutex::new(None),
        });
        map.insert(disk, f.clone());
        let span = tracing::info_span!("forward", %disk);
        tokio::spawn(forward(self.clone(), disk, f.clone()).instrument(span.clone()));
        tokio::spawn(release(self.clone(), disk, f.clone()).instrument(span));
        f
    }
}

/// Most bytes read from the spool per trip by a forwarder.
const FORWARD_READ_BYTES: u64 = 32 << 20;

/// Reads spooled frames of `disk` in order and pushes them to the target,
/// from where the disk's cursor says.
async fn forward(shared: Arc<Shared>, disk: DiskId, fwd: Arc<Forwarder>) {
    let mut progress = fwd.channel.progress();
    loop {
        let after = {
            let mut cursor = fwd.cursor();
            cursor.handle_target_durable(progress.borrow().durable);
            cursor.forwarded()
        };
        // One trip to the spool for a run of records: the lock is shared
        // with appends, which hold it through their fsync.
        let recs = match on_spool(&shared.spool, move |s| {
            let mut out = Vec::new();
            let mut bytes = 0u64;
            for r in s.pending(disk, after, 32) {
                if bytes >= FORWARD_READ_BYTES {
                    break;
                }
                match s.read(&r) {
                    Ok(b) => {
                        bytes += b.len() as u64;
                        out.push((r, b));
                    }
                    // Released meanwhile (the target already had it) or an
                    // I/O error: forward what was read, then look again.
                    Err(e) => {
                        tracing::debug!(error = %e, seq = %r.seq, "re-reading the spool");
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the spool");
                Vec::new()
            }
        };
        if recs.is_empty() {
            tokio::select! {
                _ = shared.cancel.cancelled() => return,
                _ = fwd.wake.notified() => {}
            }
            continue;
        }
        let mut moved = false;
        for (r, raw) in recs {
            let frame = match Frame::decode_exact(raw) {
                Ok(f) => f,
                Err(e) => {
                    // The record passed its checksum, so this is a bug, not a
                    // torn write: stop this disk loudly rather than skip data.
                    tracing::error!(seq = %r.seq, error = %e, "spooled frame does not decode; forwarding of this disk stopped");
                    return;
                }
            };
            if let Err(e) = fwd.cursor().check_forward(&frame) {
                // The target acked past this frame meanwhile: read on from
                // where it is.
                tracing::debug!(error = %e, "the target is ahead; reading the spool again");
                break;
            }
            let frame = match shared.cfg.target.recompress_level {
                Some(level) => {
                    match tokio::task::spawn_blocking(move || recompress(frame, level)).await {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::error!(error = %e, "recompression task failed");
                            return;
                        }
                    }
                }
                None => frame,
            };
            let len = frame.encoded_len() as u64;
            if let Some(bucket) = &shared.bucket {
                let wait = bucket
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take(len, Instant::now());
                if !wait.is_zero() {
                    tokio::select! {
                        _ = shared.cancel.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
            match fwd.channel.push_numbered(frame).await {
                Ok(seq) => {
                    fwd.cursor().handle_forwarded(seq);
                    moved = true;
                    shared.metrics.bytes_out.fetch_add(len, Ordering::Relaxed);
                }
                Err(ChannelError::Push(PushError::OutOfSequence { .. })) => {
                    // The target is ahead (it acked more than we knew after a
                    // restart): continue after its durable sequence.
                    break;
                }
                Err(e) => {
                    tracing::info!(error = %e, "forwarder stopped");
                    return;
                }
            }
        }
        if !moved {
            // Nothing could be forwarded from where the cursor stands: wait
            // for the target's next ack (or new frames) rather than spin.
            tokio::select! {
                _ = shared.cancel.cancelled() => return,
                _ = fwd.wake.notified() => {}
                r = progress.changed() => if r.is_err() { return },
            }
        }
    }
}

/// Turns the target's acks into spool releases, as the disk's cursor decides.
async fn release(shared: Arc<Shared>, disk: DiskId, fwd: Arc<Forwarder>) {
    let mut progress = fwd.channel.progress();
    let mut connected = false;
    let mut last_resync = None;
    loop {
        let (durable, now_connected, resync) = {
            let p = progress.borrow_and_update();
            (p.durable, p.connected, p.resync)
        };
        if now_connected != connected {
            connected = now_connected;
            shared
                .metrics
                .target_connected
                .store(u64::from(connected), Ordering::Relaxed);
        }
        // Once per reason, not on every progress change.
        if resync != last_resync {
            last_resync = resync;
            match resync {
                Some(ResyncReason::StaleGeneration { ours, peer }) if fwd.fence(peer) => {
                    tracing::warn!(stream = %ours, target = %peer, "the target holds a newer generation of this disk: its replica was promoted; the agent is fenced and its frames refused");
                }
                Some(ResyncReason::StaleGeneration { .. }) => {}
                Some(r) => {
                    tracing::error!(reason = ?r, "the target cannot continue this disk from the spool: a checksum resync from the agent is needed");
                }
                None => {}
            }
        }
        let through = {
            let mut cursor = fwd.cursor();
            cursor.handle_target_durable(durable);
            cursor.poll_release()
        };
        if let Some(through) = through {
            match on_spool(&shared.spool, move |s| s.release(disk, through)).await {
                Ok(freed) => {
                    fwd.cursor().handle_released(through);
                    shared.gate.release(freed);
                    shared.metrics.set_target_acked(disk, through.0);
                    let live = shared.spool_lock().live_bytes();
                    shared.metrics.spool_bytes.store(live, Ordering::Relaxed);
                    tracing::trace!(%through, freed, "released");
                }
                Err(e) => tracing::error!(error = %e, "cannot release spooled frames"),
            }
        }
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            r = progress.changed() => if r.is_err() { return },
        }
    }
}

/// Re-encodes the chunks of a batch at `level` where that makes them smaller.
fn recompress(frame: Frame, level: i32) -> Frame {
    let Frame::Batch(mut b) = frame else {
        return frame;
    };
    for c in &mut b.chunks {
        if c.encoding == blockferry_proto::Encoding::Zero {
            continue;
        }
        let Ok(plain) = blockferry_proto::verify_chunk(c) else {
            continue;
        };
        if let Ok(n) = blockferry_proto::build_chunk(c.offset, &plain.to_bytes(), Some(level))
            && n.payload.len() < c.payload.len()
        {
            *c = n;
        }
    }
    Frame::Batch(b)
}

/// The relay's side of the receiving loop: authorize, spool, wake the forwarder.
/// How long a hello waits for the target to say where a disk unknown to the
/// spool stands.
const LEARN_TIMEOUT: Duration = Duration::from_secs(20);

/// The sequence the target holds durably for `disk`, from the forwarder's
/// hello reply (zero when the target refuses the stream); an error the agent
/// retries on when the target cannot be reached in time.
async fn learn_from_target(fwd: &Forwarder, disk: DiskId) -> Result<Seq, SinkError> {
    let mut progress = fwd.channel.progress();
    let wait = async {
        loop {
            {
                let p = progress.borrow_and_update();
                // A target that refuses the stream (a newer generation,
                // no resume) says nothing to continue from: the usual
                // paths (fence, resync) take over.
                if p.resync.is_some() {
                    return Some(Seq::ZERO);
                }
                if p.connected {
                    return Some(p.durable);
                }
            }
            if progress.changed().await.is_err() {
                return None;
            }
        }
    };
    match tokio::time::timeout(LEARN_TIMEOUT, wait).await {
        Ok(Some(held)) => Ok(held),
        _ => Err(SinkError::new(
            ErrorCode::Unavailable,
            format!(
                "disk {disk} is new to this relay and the target could not be asked where its replica stands within {LEARN_TIMEOUT:?}; the agent retries (check that the target runs)"
            ),
        )),
    }
}

struct RelaySink {
    shared: Arc<Shared>,
}

/// Pause between attempts while the spool's file system is full.
const NO_SPACE_RETRY: Duration = Duration::from_secs(1);

impl RelaySink {
    fn refused(&self, e: SinkError) -> SinkError {
        self.shared
            .metrics
            .refused_connections_total
            .fetch_add(1, Ordering::Relaxed);
        e
    }

    /// Whether `peer` may read or write `disk`: the disk is registered to it.
    fn check_disk(&self, peer: &PeerIdentity, disk: DiskId) -> Result<(), SinkError> {
        if self.shared.cfg.may_write(&peer.name, disk) {
            return Ok(());
        }
        tracing::warn!(agent = %peer.name, %disk, "refused: disk not registered to this agent");
        Err(self.refused(SinkError::new(
            ErrorCode::NotAuthorized,
            format!(
                "agent {} may not use disk {disk}: register the disk under its [[agents]] entry in relay.toml",
                peer.name
            ),
        )))
    }
}

impl FrameSink for RelaySink {
    fn authorize(&self, peer: &PeerIdentity, hello: &Hello) -> Result<(), SinkError> {
        if hello.agent != peer.name {
            return Err(self.refused(SinkError::new(
                ErrorCode::NotAuthorized,
                format!(
                    "hello names agent {:?} but the certificate is {:?}: configure the agent with its certificate's name",
                    hello.agent, peer.name
                ),
            )));
        }
        self.check_disk(peer, hello.disk)?;
        // Before anything is registered or spooled: the size decides how much
        // the target allocates for the replica and its hash trees.
        let size = hello.disk_size;
        let max = self.shared.cfg.max_disk_bytes;
        if size == 0 || !size.is_multiple_of(512) || size > max {
            tracing::warn!(agent = %peer.name, disk = %hello.disk, size, max, "refused: disk size out of bounds");
            return Err(self.refused(SinkError::new(
                ErrorCode::DiskSizeMismatch,
                format!(
                    "disk {} announces {size} bytes; this relay takes disks of 512 to {max} bytes in whole 512-byte sectors (raise max_disk_bytes in relay.toml for a larger disk)",
                    hello.disk
                ),
            )));
        }
        Ok(())
    }

    async fn open(&self, peer: &PeerIdentity, hello: &Hello) -> Result<DiskState, SinkError> {
        // Checked before the stream claimed the disk; again here so that
        // nothing opens a disk without it.
        self.authorize(peer, hello)?;
        let disk = hello.disk;
        let size = hello.disk_size;
        let (known, restore, unknown) = on_spool(&self.shared.spool, move |s| {
            let known = s.disk_size(disk);
            let unknown = !s.holds(disk);
            // A shrunk disk is refused before it is registered: the replica
            // keeps the data past the new end.
            if known.is_none_or(|k| size >= k) {
                s.register_disk(disk, size)?;
            }
            // A disk never seen starts at generation 0, sequence 0: the
            // agent's Hello then says where it stands.
            Ok((known, s.restore(disk, Generation(0)), unknown))
        })
        .await
        .map_err(|e| SinkError::new(ErrorCode::Unavailable, e.to_string()))?;
        if let Some(known) = known
            && size < known
        {
            tracing::warn!(agent = %peer.name, %disk, known, size, "refused: the disk shrank");
            return Err(SinkError::new(
                ErrorCode::DiskSizeMismatch,
                format!(
                    "disk {disk} shrank from {known} to {size} bytes; a replica never shrinks (that would destroy its data past the new end): grow the disk back to {known} bytes, or protect it as a new disk"
                ),
            ));
        }
        let fwd = self.shared.forwarder(disk, Some(hello.generation));
        if let Some(by) = fwd.fenced() {
            // The agent's receiver starts at the promoted generation: it
            // nacks the agent's frames as stale, and its hello reply tells
            // the agent it was superseded.
            tracing::info!(agent = %peer.name, %disk, generation = %by, "fenced disk reconnected: its frames are refused as stale");
            return Ok(DiskState {
                generation: by.max(restore.generation),
                durable_seq: restore.spooled_through,
            });
        }
        if known.is_some_and(|k| size > k) {
            // The target learns the new size from the forwarder's next Hello,
            // before any frame that reaches past the old end is forwarded.
            tracing::info!(%disk, old = ?known, new = size, "disk grew");
            fwd.channel
                .resize(size)
                .map_err(|e| SinkError::new(ErrorCode::Unavailable, e.to_string()))?;
        }
        if unknown && hello.generation > Generation(1) {
            // A stream past its first generation that this relay never held
            // (a reprotected or re-enabled disk, or a spool that was lost):
            // its count continues where the replica stands, so learn that
            // from the target before telling the agent where to resume.
            let held = learn_from_target(&fwd, disk).await?;
            if held > Seq::ZERO {
                let position = (hello.generation, held);
                on_spool(&self.shared.spool, move |s| {
                    s.adopt_position(disk, position)
                })
                .await
                .map_err(|e| SinkError::new(ErrorCode::Unavailable, e.to_string()))?;
                fwd.cursor().handle_target_durable(held);
                tracing::info!(agent = %peer.name, %disk, generation = %hello.generation, durable_seq = %held, "disk stream opened where the replica stands");
                return Ok(DiskState {
                    generation: hello.generation,
                    durable_seq: held,
                });
            }
        }
        let durable_seq = restore.spooled_through;
        tracing::info!(agent = %peer.name, %disk, %durable_seq, "disk stream opened");
        Ok(DiskState {
            generation: restore.generation,
            durable_seq,
        })
    }

    async fn apply(&self, disk: DiskId, frames: Vec<Accepted>) -> Result<(), SinkError> {
        let shared = &self.shared;
        if let Some(by) = shared.forwarder(disk, None).fenced() {
            // Learned while the agent's stream was open: nothing more is
            // spooled (nor acked); the agent reconnects to the refusal.
            return Err(fenced_error(disk, by));
        }
        let bytes: u64 = frames.iter().map(|a| a.raw.len() as u64).sum();
        if shared.gate.is_full_for(bytes) {
            tracing::debug!(%disk, used = shared.gate.used(), "spool full: holding the agent back");
        }
        tokio::select! {
            _ = shared.cancel.cancelled() => {
                return Err(SinkError::new(ErrorCode::Unavailable, "relay shutting down"));
            }
            _ = shared.gate.reserve(bytes) => {}
        }
        let mut entries = Vec::with_capacity(frames.len());
        for a in frames {
            let Some((d, generation, seq)) = sequenced(&a.frame) else {
                continue;
            };
            entries.push(Entry {
                disk: d,
                generation,
                seq,
                frame: a.raw,
            });
        }
        let last = entries.last().map(|e| e.seq);
        let entries = Arc::new(entries);
        loop {
            let batch = entries.clone();
            match on_spool(&shared.spool, move |s| s.append(&batch)).await {
                Ok(_) => break,
                Err(e) if e.is_no_space() => {
                    // Never ack, never drop: the agent keeps the data and waits.
                    tracing::error!(%disk, error = %e, "spool file system is full: acks stopped until space is freed");
                    tokio::select! {
                        _ = shared.cancel.cancelled() => {
                            shared.gate.release(bytes);
                            return Err(SinkError::new(ErrorCode::Unavailable, "relay shutting down"));
                        }
                        _ = tokio::time::sleep(NO_SPACE_RETRY) => {}
                    }
                }
                Err(e) => {
                    shared.gate.release(bytes);
                    tracing::error!(%disk, error = %e, "spool write failed");
                    return Err(SinkError::new(ErrorCode::Unavailable, e.to_string()));
                }
            }
        }
        shared.metrics.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        shared
            .metrics
            .spool_bytes
            .store(shared.gate.used(), Ordering::Relaxed);
        if let Some(seq) = last {
            shared.metrics.set_spooled(disk, seq.0);
        }
        shared.forwarder(disk, None).wake.notify_one();
        Ok(())
    }

    fn replica_progress(&self, disk: DiskId) -> Option<watch::Receiver<Progress>> {
        // Agents learn what the target has durable through this relay's acks.
        Some(self.shared.forwarder(disk, None).channel.progress())
    }

    async fn hash_ranges(
        &self,
        peer: &PeerIdentity,
        req: HashRangeRequest,
    ) -> Result<HashRangeReply, SinkError> {
        // The digests describe the disk's data: only its writer may ask, and
        // an unregistered id never gets a forwarder or a target stream.
        self.check_disk(peer, req.disk)?;
        // The replica is at the target: let everything spooled reach it first,
        // so the digests describe the data the agent already sent.
        let disk = req.disk;
        let fwd = self.shared.forwarder(disk, Some(req.generation));
        let spooled = self
            .shared
            .spool_lock()
            .durable_position(disk)
            .map_or(Seq::ZERO, |p| p.1);
        fwd.channel
            .wait_durable(spooled)
            .await
            .map_err(|e| SinkError::new(ErrorCode::Unavailable, e.to_string()))?;
        fwd.channel
            .hash_ranges(req)
            .await
            .map_err(|e| SinkError::new(ErrorCode::Unavailable, e.to_string()))
    }

    fn connected(&self, _peer: &PeerIdentity) {
        let m = &self.shared.metrics;
        m.agent_connections.fetch_add(1, Ordering::Relaxed);
        m.agent_connections_total.fetch_add(1, Ordering::Relaxed);
    }

    fn disconnected(&self, _peer: &PeerIdentity) {
        let m = &self.shared.metrics;
        // Paired with `connected`; never below zero.
        m.agent_connections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
            .ok();
    }
}
