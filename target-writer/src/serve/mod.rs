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
//! A promoted replica ([`DiskStore::promote`]) takes no frames: its streams
//! start at the promoted generation, so the shared receiver nacks the former
//! source's frames as `StaleGeneration` and its hello reply carries the newer
//! generation; a frame that gets past it is refused before it is applied.
//!
//! And the local control socket `<store>/control.sock` ([`crate::control`]):
//! the service holds every store it serves locked, so the command line asks
//! it to export a point. The export reads the point in steps, taking the
//! disk's lock per step ([`crate::export::export_point_live`]), so batches
//! keep being applied meanwhile; retention waits until it is done.
//!
//! The config file is described in [`config`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use blockferry_proto::hashtree::{DEFAULT_FANOUT, HashTree, Responder, TreeShape};
use blockferry_proto::{
    Consistency, DiskId, ErrorCode, Frame, Generation, HashRangeReply, HashRangeRequest, Hello, Seq,
};
use blockferry_transport::endpoint::{Tuning, relay_server_config, server_endpoint};
use blockferry_transport::{
    Accepted, DiskState, FrameSink, PeerIdentity, RevocationList, ServeOptions, SinkError,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::batch::ApplyBatch;
use crate::control::{self, ExportRequest};
use crate::error::TargetError;
use crate::export::export_point_live;
use crate::promote::{Promoted, promote_store};
use crate::retention::scheduled_point_due;
use crate::store::{DiskStore, StoreOptions, lock};

mod config;
mod control_socket;

pub use config::{ConfigError, ServeConfig};

/// The error of a transport call, whose types are the transport's own.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
use control_socket::{bind_control, control_loop};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}")]
    BadConfig {
        path: PathBuf,
        #[source]
        source: config::ConfigError,
    },
    #[error("revocation list {path}: {detail}")]
    Revocations { path: PathBuf, detail: String },
    #[error("cannot set up tls from the configured ca, cert and key")]
    Tls(#[source] BoxError),
    #[error("cannot listen on the configured address")]
    Endpoint(#[source] BoxError),
    #[error("cannot create the store directory {path}")]
    Store {
        path: PathBuf,
        #[source]
        source: crate::error::TargetError,
    },
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
            // A promoted replica is fenced against its former source: the
            // typed refusal travels back through the relay to the agent.
            if let Some((_, generation, _)) = blockferry_proto::sender::sequenced(&a.frame) {
                s.check_not_promoted(generation.0)?;
            }
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

    /// Promotes the replica of a served disk between two applies (the promote
    /// step of a failover while the service runs). The live stream of its
    /// former source is refused at its next frame and ends with
    /// `StaleGeneration`; the next one starts at the promoted generation.
    pub fn promote_blocking(&self, disk: &str) -> Result<Promoted, TargetError> {
        let Ok(id) = disk.parse::<DiskId>() else {
            return Err(TargetError::NoDisk {
                disk: disk.to_string(),
                path: self.cfg.store.clone(),
            });
        };
        let store = self.store(id, None)?;
        let r = promote_store(&mut lock(&store));
        lock(&self.trees).remove(&id);
        if r.is_err() {
            // The record may be on disk while the store in memory is not
            // promoted: reopen from disk before anything more is applied.
            self.drop_store(id);
        }
        r
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
        lock(&store).usable_point(req.point, req.force)?;
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
        let mut s = lock(&store);
        // Hash requests mean a checksum resync runs: points are incomplete
        // until the agent's next barrier.
        s.mark_incomplete().map_err(|e| sink_error(&e))?;
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
    fn authorize(&self, peer: &PeerIdentity, hello: &Hello) -> Result<(), SinkError> {
        // The certificate's role (a relay's, not an agent's) was checked at
        // the handshake; its name must also be a configured peer.
        if !self.0.cfg.peers.contains(&peer.name) {
            return Err(SinkError::new(
                ErrorCode::NotAuthorized,
                format!(
                    "peer {:?} may not write to this target: add it to `peers` in the target config",
                    peer.name
                ),
            ));
        }
        let size = hello.disk_size;
        let max = self.0.cfg.max_disk_bytes;
        if size == 0 || !size.is_multiple_of(512) || size > max {
            warn!(disk = %hello.disk, size, max, "refused: disk size out of bounds");
            return Err(SinkError::new(
                ErrorCode::DiskSizeMismatch,
                format!(
                    "disk {} announces {size} bytes; this target keeps replicas of 512 to {max} bytes in whole 512-byte sectors (raise max_disk_bytes in the target config for a larger disk)",
                    hello.disk
                ),
            ));
        }
        Ok(())
    }

    async fn open(&self, peer: &PeerIdentity, hello: &Hello) -> Result<DiskState, SinkError> {
        // Checked before the stream claimed the disk; again here so that
        // nothing creates a replica without it.
        self.authorize(peer, hello)?;
        let this = self.0.clone();
        let disk = hello.disk;
        let size = hello.disk_size;
        let (generation, seq) = tokio::task::spawn_blocking(move || {
            let store = this.store(disk, Some(size))?;
            let mut s = lock(&store);
            if s.is_promoted() {
                // Its receiver starts at the promoted generation, so every
                // frame of the former source is nacked as stale, and the
                // hello reply tells the sender it was superseded.
                warn!(%disk, generation = s.generation(), "a sender of this promoted replica connected: its frames are refused as stale");
                return Ok((s.generation(), s.applied_seq()));
            }
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
            TargetError::Shrink { .. } | TargetError::SeedCannotGrow { .. } => {
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

/// Starts serving `cfg` until `cancel` fires.
///
/// Everything the service creates from here on (replicas, journals,
/// segments, state, generation records, exports, the control socket) is
/// private to its owner: the process's umask becomes 077.
pub async fn start(
    cfg: ServeConfig,
    cancel: CancellationToken,
) -> Result<TargetHandle, ServeError> {
    blockferry_durable::set_umask(0o077);
    let tuning = if cfg.loopback_tuning {
        Tuning::loopback()
    } else {
        Tuning::default()
    };
    let (ca, identity) = cfg.tls.load().map_err(|e| ServeError::Tls(e.into()))?;
    let revoked = match &cfg.revocation_list {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ServeError::Read {
                path: p.clone(),
                source,
            })?;
            RevocationList::parse(&text).map_err(|detail| ServeError::Revocations {
                path: p.clone(),
                detail,
            })?
        }
        None => RevocationList::default(),
    };
    crate::crashsafe::create_dir_all(&cfg.store).map_err(|source| ServeError::Store {
        path: cfg.store.clone(),
        source,
    })?;
    // Perhaps created before the service kept its files private.
    blockferry_durable::make_private_dir(&cfg.store).map_err(|e| ServeError::Store {
        path: cfg.store.clone(),
        source: TargetError::io(&cfg.store, None, e.source),
    })?;
    let server = server_endpoint(
        cfg.listen,
        relay_server_config(&ca, identity, revoked, &tuning)
            .map_err(|e| ServeError::Endpoint(e.into()))?,
        &tuning,
    )
    .map_err(|e| ServeError::Endpoint(e.into()))?;
    let listen_addr = server
        .local_addr()
        .map_err(|e| ServeError::Endpoint(e.into()))?;
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
