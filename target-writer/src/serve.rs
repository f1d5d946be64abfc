//! `blockferry-target serve`: receives batches and barriers from the relay
//! over QUIC (the shared receiving endpoint of `blockferry-transport`) and
//! applies them to the disk stores. This module is the thin async shell: the
//! sink converts proto frames to the store's types and runs the blocking
//! store calls on the blocking pool; acks go out once `apply` returned, i.e.
//! once the journal is synced.
//!
//! Also here: scheduled recovery points (labelled not-consistent: nothing
//! proves the write order at an arbitrary moment), retention after each new
//! point, and answers to checksum-resync requests from a hash tree of the
//! replica built on demand and cached until the next write.
//!
//! And the local control socket `<store>/control.sock` ([`crate::control`]):
//! the service holds every store it serves locked, so the command line asks
//! it to export a point. The export reads the point in steps, taking the
//! disk's lock per step ([`crate::export::export_point_live`]), so batches
//! keep being applied meanwhile; retention waits until it is done.
//!
//! Config (`target.toml`; relative paths are taken from its directory):
//!
//! ```toml
//! listen = "0.0.0.0:7411"      # port 0 picks one; printed as `listening quic=…`
//! store = "target-store"       # one directory per disk id
//! ca = "pki/ca.crt"
//! cert = "pki/target.crt"
//! key = "pki/target.key"
//! # revocation_list = "pki/revoked.txt"
//! # loopback_tuning = false
//! # peers = ["relay"]          # certificate names allowed to send
//! # point_every_secs = 600     # scheduled points; 0 = only barriers
//! # resync_chunk_kib = 64      # the agents' chunk_size_kib
//! # checkpoint_mib = 64
//! # [retention]
//! # keep_all_secs = 3600
//! # tiers = [{ every_secs = 600, up_to_secs = 86400 }, { every_secs = 86400, up_to_secs = 604800 }]
//! ```

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use blockferry_proto::hashtree::{DEFAULT_FANOUT, HashTree, Responder, TreeShape};
use blockferry_proto::{
    DiskId, ErrorCode, Frame, Generation, HashRangeReply, HashRangeRequest, Hello, Seq,
};
use blockferry_transport::endpoint::{Tuning, server_config, server_endpoint};
use blockferry_transport::tls::load_certs;
use blockferry_transport::{
    Accepted, DiskState, FrameSink, PeerIdentity, RevocationList, ServeOptions, SinkError,
    TlsIdentity,
};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use blockferry_proto::Consistency;

use crate::batch::ApplyBatch;
use crate::control::{self, ExportRequest, ProgressThrottle, Reply};
use crate::error::TargetError;
use crate::export::export_point_live;
use crate::retention::{RetentionPolicy, scheduled_point_due};
use crate::store::{DiskStore, StoreOptions, lock};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {detail}")]
    Config { path: PathBuf, detail: String },
    #[error("tls setup: {0}")]
    Tls(String),
    #[error("cannot listen: {0}")]
    Endpoint(String),
    #[error("cannot listen on the control socket {path}")]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another service answers on {path}: a store is served by one process, stop the other one first"
    )]
    ControlBusy { path: PathBuf },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: String,
    store: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    revocation_list: Option<PathBuf>,
    #[serde(default)]
    loopback_tuning: bool,
    /// Certificate names allowed to send (the relays).
    peers: Option<Vec<String>>,
    /// Seconds between scheduled points; 0 disables them.
    point_every_secs: Option<u64>,
    retention: Option<RetentionPolicy>,
    resync_chunk_kib: Option<u32>,
    checkpoint_mib: Option<u64>,
    /// New replicas are thin monolithicSparse files.
    #[serde(default)]
    thin_replicas: bool,
}

/// The validated configuration of `serve` (paths resolved against the
/// config file's directory).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub store: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub revocation_list: Option<PathBuf>,
    pub loopback_tuning: bool,
    pub peers: HashSet<String>,
    pub point_every_secs: u64,
    pub retention: RetentionPolicy,
    pub resync_chunk_size: u64,
    pub checkpoint_bytes: u64,
    /// Create new replicas thin (monolithicSparse) instead of vmfs + flat.
    pub thin_replicas: bool,
}

impl ServeConfig {
    pub fn load(path: &Path) -> Result<Self, ServeError> {
        let text = std::fs::read_to_string(path).map_err(|source| ServeError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|detail| ServeError::Config {
            path: path.to_path_buf(),
            detail,
        })
    }

    /// Parses config text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let listen = raw.listen.parse().map_err(|_| {
            format!(
                "listen = {:?} is not an address: write IP:PORT, for example \"0.0.0.0:7411\"",
                raw.listen
            )
        })?;
        let chunk_kib = raw.resync_chunk_kib.unwrap_or(64);
        if !(4..=1024).contains(&chunk_kib) || !chunk_kib.is_power_of_two() {
            return Err(format!(
                "resync_chunk_kib = {chunk_kib} must be a power of two from 4 to 1024 (the agents' chunk_size_kib)"
            ));
        }
        let retention = raw.retention.unwrap_or_default();
        if retention.tiers.iter().any(|t| t.every_secs == 0) {
            return Err("retention tiers need every_secs > 0".into());
        }
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        Ok(ServeConfig {
            listen,
            store: abs(raw.store),
            ca: abs(raw.ca),
            cert: abs(raw.cert),
            key: abs(raw.key),
            revocation_list: raw.revocation_list.map(abs),
            loopback_tuning: raw.loopback_tuning,
            peers: raw
                .peers
                .unwrap_or_else(|| vec!["relay".to_string()])
                .into_iter()
                .collect(),
            point_every_secs: raw.point_every_secs.unwrap_or(600),
            retention,
            resync_chunk_size: u64::from(chunk_kib) << 10,
            checkpoint_bytes: raw.checkpoint_mib.unwrap_or(64) << 20,
            thin_replicas: raw.thin_replicas,
        })
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

type Shared<T> = Arc<Mutex<T>>;

/// The target's [`FrameSink`]: one store per disk, opened on first contact.
#[derive(Debug)]
pub struct TargetSink {
    cfg: ServeConfig,
    stores: Mutex<HashMap<DiskId, Shared<DiskStore>>>,
    /// Resync trees by disk, valid for the applied sequence they were built at.
    trees: Mutex<HashMap<DiskId, (u64, Responder)>>,
}

fn sink_error(e: &TargetError) -> SinkError {
    let code = match e {
        TargetError::HashMismatch { .. }
        | TargetError::Decompress { .. }
        | TargetError::BadChunk { .. } => ErrorCode::Integrity,
        TargetError::ChunkTooLarge { .. } => ErrorCode::TooLarge,
        TargetError::OutOfRange { .. } | TargetError::WrongDisk { .. } => ErrorCode::Protocol,
        TargetError::Gap { .. } => ErrorCode::SequenceGap,
        TargetError::StaleGeneration { .. } => ErrorCode::StaleGeneration,
        TargetError::ReusedSeq { .. } => ErrorCode::Protocol,
        TargetError::NoSpace { .. } | TargetError::Locked { .. } => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    SinkError::new(code, e.to_string())
}

impl TargetSink {
    pub fn new(cfg: ServeConfig) -> Self {
        TargetSink {
            cfg,
            stores: Mutex::new(HashMap::new()),
            trees: Mutex::new(HashMap::new()),
        }
    }

    fn store_opts(&self) -> StoreOptions {
        StoreOptions {
            checkpoint_bytes: self.cfg.checkpoint_bytes,
            thin: self.cfg.thin_replicas,
            ..StoreOptions::default()
        }
    }

    /// The open store of `disk`, opening (or, with `create_size`, creating) it.
    fn store(
        &self,
        disk: DiskId,
        create_size: Option<u64>,
    ) -> Result<Shared<DiskStore>, TargetError> {
        let mut stores = lock(&self.stores);
        if let Some(s) = stores.get(&disk) {
            return Ok(s.clone());
        }
        let name = disk.to_string();
        let s = match DiskStore::open(&self.cfg.store, &name, self.store_opts()) {
            Ok(s) => s,
            Err(TargetError::NoDisk { .. }) if create_size.is_some() => DiskStore::create(
                &self.cfg.store,
                &name,
                create_size.unwrap_or(0),
                now_ms(),
                self.store_opts(),
            )?,
            Err(e) => return Err(e),
        };
        let s = Arc::new(Mutex::new(s));
        stores.insert(disk, s.clone());
        Ok(s)
    }

    /// Forgets a store after a failed write, so the next use reopens it
    /// and replays its journal.
    fn drop_store(&self, disk: DiskId) {
        lock(&self.stores).remove(&disk);
        lock(&self.trees).remove(&disk);
    }

    fn apply_blocking(&self, disk: DiskId, frames: &[Accepted]) -> Result<(), TargetError> {
        let store = self.store(disk, None)?;
        let mut s = lock(&store);
        let name = disk.to_string();
        let mut new_point = false;
        // Runs of batches between barriers share one journal sync.
        let mut run = Vec::new();
        for a in frames {
            match &a.frame {
                Frame::Batch(b) => run.push(ApplyBatch::from_proto(&name, b)),
                Frame::Barrier(b) => {
                    s.apply_many(&std::mem::take(&mut run))?;
                    new_point |= s.barrier(b, now_ms())?.is_some();
                }
                other => {
                    warn!(disk = %name, frame = ?other.frame_type(), "unexpected frame in the apply queue, ignored")
                }
            }
        }
        s.apply_many(&run)?;
        let now = now_ms();
        let last = s.points().last().map(|p| (p.time_ms, p.seq));
        let changed_since = last.is_none_or(|(_, seq)| seq < s.applied_seq());
        if changed_since
            && scheduled_point_due(last.map(|(t, _)| t), self.cfg.point_every_secs, now)
        {
            s.create_point(Consistency::NotConsistent, now)?;
            new_point = true;
        }
        if new_point {
            let dropped = s.apply_retention(&self.cfg.retention, now)?;
            if !dropped.is_empty() {
                info!(disk = %name, points = ?dropped, "retention removed recovery points");
            }
        }
        Ok(())
    }

    /// Exports a point for a control-socket client: from the disk's store as
    /// the service holds it (opened now if no relay has written to it yet),
    /// reading in steps so applies go on.
    fn export_blocking(
        &self,
        req: &ExportRequest,
        stop: &AtomicBool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Vec<PathBuf>, TargetError> {
        let Ok(disk) = req.disk.parse::<DiskId>() else {
            return Err(TargetError::NoDisk {
                disk: req.disk.clone(),
                path: self.cfg.store.clone(),
            });
        };
        let store = self.store(disk, None)?;
        export_point_live(
            &store,
            req.point,
            req.format,
            &req.out,
            req.parent.as_deref(),
            stop,
            progress,
        )
    }

    fn hash_blocking(&self, req: &HashRangeRequest) -> Result<HashRangeReply, SinkError> {
        let store = self.store(req.disk, None).map_err(|e| match e {
            TargetError::NoDisk { .. } => SinkError::new(ErrorCode::UnknownDisk, e.to_string()),
            e => sink_error(&e),
        })?;
        let s = lock(&store);
        let applied = s.applied_seq();
        let mut trees = lock(&self.trees);
        let fresh = trees.get(&req.disk).is_some_and(|(seq, _)| *seq == applied);
        if !fresh {
            let shape = TreeShape::new(self.cfg.resync_chunk_size, DEFAULT_FANOUT)
                .map_err(|e| SinkError::new(ErrorCode::Internal, e.to_string()))?;
            let size = s.size();
            let cs = self.cfg.resync_chunk_size;
            let mut leaves = Vec::with_capacity(size.div_ceil(cs) as usize);
            let mut buf = vec![0u8; cs as usize];
            let mut off = 0;
            while off < size {
                let n = (size - off).min(cs) as usize;
                s.read_at(&mut buf[..n], off).map_err(|e| sink_error(&e))?;
                leaves.push(*blake3::hash(&buf[..n]).as_bytes());
                off += n as u64;
            }
            let tree = HashTree::new(shape, size, leaves)
                .map_err(|e| SinkError::new(ErrorCode::Internal, e.to_string()))?;
            trees.insert(req.disk, (applied, Responder::new(tree)));
        }
        let Some((_, responder)) = trees.get_mut(&req.disk) else {
            return Err(SinkError::new(ErrorCode::Internal, "hash tree vanished"));
        };
        responder
            .handle_request(req)
            .map_err(|e| SinkError::new(ErrorCode::Protocol, e.to_string()))
    }
}

fn join_error(e: tokio::task::JoinError) -> SinkError {
    SinkError::new(ErrorCode::Internal, format!("apply task failed: {e}"))
}

/// The [`FrameSink`] handed to the transport: a cheap handle on the shared sink.
#[derive(Debug, Clone)]
pub struct TargetService(pub Arc<TargetSink>);

impl FrameSink for TargetService {
    async fn open(&self, peer: &PeerIdentity, hello: &Hello) -> Result<DiskState, SinkError> {
        if !self.0.cfg.peers.contains(&peer.name) {
            return Err(SinkError::new(
                ErrorCode::NotAuthorized,
                format!(
                    "peer {:?} may not write to this target: add it to `peers` in the target config",
                    peer.name
                ),
            ));
        }
        let this = self.0.clone();
        let disk = hello.disk;
        let size = hello.disk_size;
        let (generation, seq) = tokio::task::spawn_blocking(move || {
            let store = this.store(disk, Some(size))?;
            let mut s = lock(&store);
            let have = s.size();
            if size > have {
                let r = s.grow(size);
                // The range digests cover the old size; a failed grow leaves
                // the store poisoned, to be reopened.
                drop(s);
                lock(&this.trees).remove(&disk);
                if let Err(e) = r {
                    this.drop_store(disk);
                    return Err(e);
                }
                s = lock(&store);
            } else if size < have {
                return Err(TargetError::Shrink {
                    disk: disk.to_string(),
                    size: have,
                    new_size: size,
                });
            }
            Ok::<_, TargetError>((s.generation(), s.applied_seq()))
        })
        .await
        .map_err(join_error)?
        .map_err(|e| match e {
            TargetError::Shrink { .. } => {
                SinkError::new(ErrorCode::DiskSizeMismatch, e.to_string())
            }
            e => sink_error(&e),
        })?;
        info!(%disk, peer = %peer.name, generation, durable_seq = seq, "disk stream opened");
        Ok(DiskState {
            generation: Generation(generation),
            durable_seq: Seq(seq),
        })
    }

    async fn apply(&self, disk: DiskId, frames: Vec<Accepted>) -> Result<(), SinkError> {
        let this = self.0.clone();
        let r = tokio::task::spawn_blocking(move || this.apply_blocking(disk, &frames))
            .await
            .map_err(join_error)?;
        if let Err(e) = r {
            warn!(%disk, error = %e, "apply failed");
            if matches!(
                e,
                TargetError::Poisoned { .. } | TargetError::Io { .. } | TargetError::Corrupt { .. }
            ) {
                self.0.drop_store(disk);
            }
            return Err(sink_error(&e));
        }
        Ok(())
    }

    async fn hash_ranges(
        &self,
        _peer: &PeerIdentity,
        req: HashRangeRequest,
    ) -> Result<HashRangeReply, SinkError> {
        let this = self.0.clone();
        tokio::task::spawn_blocking(move || this.hash_blocking(&req))
            .await
            .map_err(join_error)?
    }
}

/// A running target: where it listens, and the task serving it.
#[derive(Debug)]
pub struct TargetHandle {
    pub listen_addr: SocketAddr,
    /// The control socket (removed once `serve` has ended).
    pub control_socket: PathBuf,
    pub serve: tokio::task::JoinHandle<()>,
}

/// Binds the control socket: a socket file nobody answers on (a service
/// that died) is replaced; one that answers is another service of this store.
fn bind_control(path: &Path) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| ServeError::Control {
        path: path.to_path_buf(),
        source,
    };
    if path.symlink_metadata().is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::ControlBusy {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    // Whoever can connect can write files as this service: its user only,
    // from the first moment. The socket is bound inside a private directory,
    // restricted, and only then moved to its place.
    use std::os::unix::fs::DirBuilderExt;
    let dir = path.with_extension(format!("bind-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(err)?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(err)?;
    let private = dir.join("control.sock");
    let bound = UnixListener::bind(&private)
        .and_then(|l| {
            std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&private, path)?;
            Ok(l)
        })
        .map_err(err);
    if let Err(e) = std::fs::remove_dir_all(&dir) {
        warn!(path = %dir.display(), error = %e, "cannot remove the directory the control socket was bound in");
    }
    bound
}

/// Accepts control connections until `cancel`, then waits for the running
/// exports (which stop at their next step and remove their output).
async fn control_loop(listener: UnixListener, sink: Arc<TargetSink>, cancel: CancellationToken) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    conns.spawn(control_conn(stream, sink.clone(), cancel.clone()));
                }
                Err(e) => {
                    // Out of descriptors, say: back off instead of spinning.
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            Some(r) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = r {
                    warn!(error = %e, "control connection task failed");
                }
            }
        }
    }
    while conns.join_next().await.is_some() {}
}

/// The message of an error with its sources, for a client without our log.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    msg
}

/// How long a control client has to send its request line.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// One control connection: one request line, progress lines, one answer.
async fn control_conn(stream: UnixStream, sink: Arc<TargetSink>, cancel: CancellationToken) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd.take(control::MAX_REQUEST as u64 + 1));
    let mut line = Vec::new();
    // A client that connects and says nothing does not hold a task forever.
    let read = tokio::time::timeout(REQUEST_TIMEOUT, rd.read_until(b'\n', &mut line));
    let read = tokio::select! {
        _ = cancel.cancelled() => return,
        r = read => r,
    };
    match read {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            debug!(error = %e, "control connection read failed");
            return;
        }
        Err(_) => {
            debug!("control client sent no request");
            return;
        }
    }
    let line = line.strip_suffix(b"\n").unwrap_or(&line);
    let req = match control::decode_request(line) {
        Ok(req) => req,
        Err(e) => {
            warn!(error = %e, "bad control request refused");
            let reply = Reply::Error(e.to_string());
            answer_and_close(rd.into_inner().into_inner(), wr, &reply, &cancel).await;
            return;
        }
    };
    let span = tracing::info_span!("export", disk = %req.disk, point = req.point);
    let reply = run_export(req, &mut wr, sink, &cancel)
        .instrument(span)
        .await;
    answer_and_close(rd.into_inner().into_inner(), wr, &reply, &cancel).await;
}

/// Sends the last line and closes. A Unix stream closed with unread input
/// resets its peer, which then may never read the answer (to a request line
/// that was too long, say): half-close, and discard what the client still
/// sends (bounded) until it closes.
async fn answer_and_close(
    rd: tokio::net::unix::OwnedReadHalf,
    mut wr: tokio::net::unix::OwnedWriteHalf,
    reply: &Reply,
    cancel: &CancellationToken,
) {
    let sent = async {
        wr.write_all(&control::encode(reply)).await?;
        wr.shutdown().await
    };
    if let Err(e) = sent.await {
        debug!(error = %e, "control client gone before the answer");
        return;
    }
    let mut rest = rd.take(control::MAX_REQUEST as u64 * 16);
    let mut discard = tokio::io::sink();
    tokio::select! {
        _ = cancel.cancelled() => {}
        r = tokio::io::copy(&mut rest, &mut discard) => {
            if let Err(e) = r {
                debug!(error = %e, "control connection read failed");
            }
        }
    }
}

/// Runs one export on the blocking pool, forwarding its progress; returns
/// the answer: the files written or the error.
async fn run_export(
    req: ExportRequest,
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    sink: Arc<TargetSink>,
    cancel: &CancellationToken,
) -> Reply {
    info!(format = ?req.format, out = %req.out.display(), "export requested on the control socket");
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Reply>(16);
    let job = {
        let (sink, stop, req) = (sink.clone(), stop.clone(), req.clone());
        tokio::task::spawn_blocking(move || {
            let mut throttle = ProgressThrottle::new();
            let mut progress = |done, total| {
                // Called between read steps, with no store lock held.
                if throttle.due(done, total, Instant::now())
                    && tx.blocking_send(Reply::Progress { done, total }).is_err()
                {
                    stop.store(true, Ordering::Relaxed);
                }
            };
            sink.export_blocking(&req, &stop, &mut progress)
        })
    };
    let mut cancelled = false;
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(m) => {
                    if wr.write_all(&control::encode(&m)).await.is_err() {
                        // The client went away: the export stops at its next step.
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                None => break,
            },
            _ = cancel.cancelled(), if !cancelled => {
                cancelled = true;
                stop.store(true, Ordering::Relaxed);
            }
        }
    }
    match job.await {
        Ok(Ok(files)) => {
            info!(files = files.len(), "export done");
            Reply::Done { files }
        }
        Ok(Err(e)) => {
            let msg = error_chain(&e);
            warn!(error = %msg, "export failed");
            Reply::Error(msg)
        }
        Err(e) => {
            warn!(error = %e, "export task failed");
            Reply::Error(format!("export task failed: {e}"))
        }
    }
}

/// Starts serving `cfg` until `cancel` fires.
pub async fn start(
    cfg: ServeConfig,
    cancel: CancellationToken,
) -> Result<TargetHandle, ServeError> {
    let tuning = if cfg.loopback_tuning {
        Tuning::loopback()
    } else {
        Tuning::default()
    };
    let tls = |e: &dyn std::fmt::Display| ServeError::Tls(e.to_string());
    let ca = load_certs(&cfg.ca).map_err(|e| tls(&e))?;
    let identity = TlsIdentity::load(&cfg.cert, &cfg.key).map_err(|e| tls(&e))?;
    let revoked = match &cfg.revocation_list {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ServeError::Read {
                path: p.clone(),
                source,
            })?;
            RevocationList::parse(&text).map_err(|detail| ServeError::Config {
                path: p.clone(),
                detail,
            })?
        }
        None => RevocationList::default(),
    };
    std::fs::create_dir_all(&cfg.store).map_err(|source| ServeError::Read {
        path: cfg.store.clone(),
        source,
    })?;
    let server = server_endpoint(
        cfg.listen,
        server_config(&ca, identity, revoked, &tuning)
            .map_err(|e| ServeError::Endpoint(e.to_string()))?,
        &tuning,
    )
    .map_err(|e| ServeError::Endpoint(e.to_string()))?;
    let listen_addr = server
        .local_addr()
        .map_err(|e| ServeError::Endpoint(e.to_string()))?;
    info!(quic = %listen_addr, store = %cfg.store.display(), "target listening");
    let control_socket = control::socket_path(&cfg.store);
    let listener = bind_control(&control_socket)?;
    info!(control = %control_socket.display(), "control socket listening");
    let sink = Arc::new(TargetService(Arc::new(TargetSink::new(cfg))));
    let opts = ServeOptions {
        // The store verifies every chunk before writing; once is enough.
        verify_chunks: false,
        ..ServeOptions::default()
    };
    let control_cancel = cancel.child_token();
    let control = tokio::spawn(control_loop(
        listener,
        sink.0.clone(),
        control_cancel.clone(),
    ));
    let socket = control_socket.clone();
    let serve = tokio::spawn(async move {
        blockferry_transport::sink::serve(server.clone(), sink, opts, cancel).await;
        server.close(0u32.into(), b"target stopping");
        control_cancel.cancel();
        if let Err(e) = control.await {
            warn!(error = %e, "control task failed");
        }
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(path = %socket.display(), error = %e, "cannot remove the control socket")
            }
        }
    });
    Ok(TargetHandle {
        listen_addr,
        control_socket,
        serve,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_resolves_paths_and_reads_retention() {
        let cfg = ServeConfig::parse(
            r#"
listen = "127.0.0.1:0"
store = "s"
ca = "/etc/bf/ca.crt"
cert = "b"
key = "c"
point_every_secs = 0
[retention]
keep_all_secs = 60
tiers = [{ every_secs = 600, up_to_secs = 86400 }]
"#,
            Path::new("/base"),
        )
        .unwrap();
        assert_eq!(cfg.store, Path::new("/base/s"));
        assert_eq!(cfg.ca, Path::new("/etc/bf/ca.crt"));
        assert_eq!(cfg.retention.keep_all_secs, 60);
        assert_eq!(cfg.retention.tiers.len(), 1);
        assert!(cfg.peers.contains("relay"));
        assert_eq!(cfg.resync_chunk_size, 65536);
    }

    #[test]
    fn config_errors_say_what_to_write() {
        let e = ServeConfig::parse(
            "listen = \"nowhere\"\nstore = \"s\"\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.contains("IP:PORT"), "{e}");
        let e = ServeConfig::parse(
            "listen = \"127.0.0.1:1\"\nstore = \"s\"\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\nbogus = 1\n",
            Path::new("."),
        )
        .unwrap_err();
        assert!(e.contains("bogus"), "{e}");
    }
}
