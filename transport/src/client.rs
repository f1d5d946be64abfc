//! The sending side (agent → relay, and anything else that pushes frames to a
//! [`crate::sink`]): a [`DiskChannel`] per disk owns proto's [`DiskSender`] and
//! one stream, reconnects with backoff when the connection drops, and resumes
//! from the peer's durable sequence. Pushes wait while the send window is full:
//! that is the backpressure the caller feels.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use blockferry_proto::{
    Chunk, Consistency, DiskSender, Frame, HashRangeReply, HashRangeRequest, PushError,
    ResyncReason, SenderEvent, Seq,
};
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::framed::{FrameReader, FrameWriter, FramedError};

/// Errors of the sending side.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot connect to {addr} ({server_name}): {detail}")]
    Connect {
        addr: SocketAddr,
        server_name: String,
        detail: String,
    },
    #[error("the disk channel has stopped")]
    Stopped,
    #[error("push refused: {0}")]
    Push(PushError),
    #[error("the connection dropped before the reply")]
    Disconnected,
}

/// One shared connection to a peer, re-established on demand.
#[derive(Debug)]
pub struct Connector {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    server_name: String,
    conn: Mutex<Option<quinn::Connection>>,
}

impl Connector {
    pub fn new(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        server_name: impl Into<String>,
    ) -> Arc<Self> {
        Arc::new(Connector {
            endpoint,
            addr,
            server_name: server_name.into(),
            conn: Mutex::new(None),
        })
    }

    /// The live connection, connecting if there is none.
    pub async fn connection(&self) -> Result<quinn::Connection, ChannelError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let err = |detail: String| ChannelError::Connect {
            addr: self.addr,
            server_name: self.server_name.clone(),
            detail,
        };
        let conn = self
            .endpoint
            .connect(self.addr, &self.server_name)
            .map_err(|e| err(e.to_string()))?
            .await
            .map_err(|e| err(e.to_string()))?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// The endpoint (to close it at shutdown).
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }
}

/// What the channel has achieved so far.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Everything through this sequence is durable at the peer.
    pub durable: Seq,
    /// Everything through this sequence is durable at the replica at the end
    /// of the chain (equal to `durable` when the peer is the target).
    pub replica: Seq,
    /// Last sequence pushed.
    pub last: Seq,
    pub connected: bool,
    pub unacked_bytes: usize,
    /// Set when the stream cannot continue without a checksum resync.
    pub resync: Option<ResyncReason>,
    /// The last connection or peer error, for status output.
    pub last_error: Option<String>,
    /// Reconnections after the first connection.
    pub reconnects: u64,
}

enum Cmd {
    Batch(Vec<Chunk>, oneshot::Sender<Result<Seq, ChannelError>>),
    Barrier(Consistency, u64, oneshot::Sender<Result<Seq, ChannelError>>),
    Numbered(Frame, oneshot::Sender<Result<Seq, ChannelError>>),
    Hash(
        HashRangeRequest,
        oneshot::Sender<Result<HashRangeReply, ChannelError>>,
    ),
    StartGeneration(blockferry_proto::Generation),
    /// Wakes the task after [`DiskChannel::resize`] (the size itself is in
    /// the shared atomic, so it is seen before any later push).
    Resize,
}

/// The sending side of one disk. Cheap to clone.
#[derive(Debug, Clone)]
pub struct DiskChannel {
    cmd: mpsc::Sender<Cmd>,
    progress: watch::Receiver<Progress>,
    /// The disk size the next Hello must announce.
    size: Arc<AtomicU64>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cmd::Batch(..) => "Batch",
            Cmd::Barrier(..) => "Barrier",
            Cmd::Numbered(..) => "Numbered",
            Cmd::Hash(..) => "Hash",
            Cmd::StartGeneration(..) => "StartGeneration",
            Cmd::Resize => "Resize",
        })
    }
}

/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl DiskChannel {
    /// Starts the channel task for `sender` over `connector`; it runs until
    /// `cancel` fires or every handle is dropped.
    pub fn spawn(connector: Arc<Connector>, sender: DiskSender, cancel: CancellationToken) -> Self {
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let (prog_tx, prog_rx) = watch::channel(Progress::default());
        let disk = sender.disk();
        let size = Arc::new(AtomicU64::new(sender.disk_size()));
        let task = Task {
            size: size.clone(),
            connector,
            sender,
            cmd_rx,
            progress: prog_tx,
            pending: None,
            hashes: HashMap::new(),
            cancel,
        };
        tokio::spawn(tracing::Instrument::instrument(
            task.run(),
            tracing::info_span!("disk", %disk),
        ));
        DiskChannel {
            cmd: cmd_tx,
            progress: prog_rx,
            size,
        }
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ChannelError>>) -> Cmd,
    ) -> Result<T, ChannelError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(make(tx))
            .await
            .map_err(|_| ChannelError::Stopped)?;
        rx.await.map_err(|_| ChannelError::Stopped)?
    }

    /// Pushes a batch; waits while the window is full. Returns its sequence.
    pub async fn push_batch(&self, chunks: Vec<Chunk>) -> Result<Seq, ChannelError> {
        self.call(|tx| Cmd::Batch(chunks, tx)).await
    }

    /// Pushes a recovery-point barrier.
    pub async fn push_barrier(
        &self,
        consistency: Consistency,
        timestamp_ns: u64,
    ) -> Result<Seq, ChannelError> {
        self.call(|tx| Cmd::Barrier(consistency, timestamp_ns, tx))
            .await
    }

    /// Pushes a frame numbered elsewhere (a forwarder's channel).
    pub async fn push_numbered(&self, frame: Frame) -> Result<Seq, ChannelError> {
        self.call(|tx| Cmd::Numbered(frame, tx)).await
    }

    /// Asks the peer for range digests (checksum resync).
    pub async fn hash_ranges(&self, req: HashRangeRequest) -> Result<HashRangeReply, ChannelError> {
        self.call(|tx| Cmd::Hash(req, tx)).await
    }

    /// After a resync: continue in `generation`.
    pub async fn start_generation(
        &self,
        generation: blockferry_proto::Generation,
    ) -> Result<(), ChannelError> {
        self.cmd
            .send(Cmd::StartGeneration(generation))
            .await
            .map_err(|_| ChannelError::Stopped)
    }

    /// The disk grew (or shrank) to `size` bytes: the channel says Hello again
    /// on a new stream with that size and resumes from the peer's durable
    /// sequence, so nothing held is lost. Takes effect at once, without
    /// waiting for the peer: a push made after this call (from any task)
    /// reaches the peer only after a Hello with the new size, so a chunk past
    /// the old end is never sent under the old size.
    pub fn resize(&self, size: u64) -> Result<(), ChannelError> {
        self.size.store(size, Ordering::SeqCst);
        match self.cmd.try_send(Cmd::Resize) {
            // A full queue wakes the task anyway; it checks the size first.
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(ChannelError::Stopped),
        }
    }

    /// The progress watch (durable sequence, errors, resync requests).
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// Waits until everything through `seq` is durable at the peer.
    pub async fn wait_durable(&self, seq: Seq) -> Result<(), ChannelError> {
        let mut rx = self.progress.clone();
        rx.wait_for(|p| p.durable >= seq)
            .await
            .map(|_| ())
            .map_err(|_| ChannelError::Stopped)
    }
}

struct Task {
    size: Arc<AtomicU64>,
    connector: Arc<Connector>,
    sender: DiskSender,
    cmd_rx: mpsc::Receiver<Cmd>,
    progress: watch::Sender<Progress>,
    /// A push waiting for room in the window.
    pending: Option<Cmd>,
    hashes: HashMap<u64, oneshot::Sender<Result<HashRangeReply, ChannelError>>>,
    cancel: CancellationToken,
}

enum LinkEnd {
    Cancelled,
    Lost(String),
    /// The disk size changed: open a new stream at once, whose Hello says so.
    Resized,
}

impl Task {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        let mut connected_once = false;
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let end = match self.connector.connection().await {
                Ok(conn) => {
                    if connected_once {
                        self.progress.send_modify(|p| p.reconnects += 1);
                    }
                    connected_once = true;
                    match conn.open_bi().await {
                        Ok((send, recv)) => {
                            let started = Instant::now();
                            let end = self
                                .link(FrameWriter::new(send), FrameReader::new(recv))
                                .await;
                            if started.elapsed() > BACKOFF_MAX {
                                backoff = BACKOFF_MIN;
                            }
                            match end {
                                LinkEnd::Lost(why) => LinkEnd::Lost(with_close_reason(why, &conn)),
                                end => end,
                            }
                        }
                        Err(e) => LinkEnd::Lost(format!("cannot open a stream: {e}")),
                    }
                }
                Err(e) => LinkEnd::Lost(e.to_string()),
            };
            self.sender.handle_disconnected();
            for (_, tx) in self.hashes.drain() {
                reply(tx, Err(ChannelError::Disconnected));
            }
            match end {
                LinkEnd::Cancelled => return,
                LinkEnd::Resized => {
                    tracing::info!(
                        size = self.sender.disk_size(),
                        "disk resized: greeting the peer again"
                    );
                    continue;
                }
                LinkEnd::Lost(why) => {
                    tracing::warn!(error = %why, retry_in = ?backoff, "link to the peer lost");
                    self.progress.send_modify(|p| {
                        p.connected = false;
                        p.last_error = Some(why);
                    });
                }
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn publish(&self) {
        let s = &self.sender;
        self.progress.send_if_modified(|p| {
            let new = (
                s.durable_seq(),
                s.replica_seq(),
                s.last_seq(),
                s.is_connected(),
                s.unacked_bytes(),
            );
            let old = (p.durable, p.replica, p.last, p.connected, p.unacked_bytes);
            if new == old {
                return false;
            }
            (p.durable, p.replica, p.last, p.connected, p.unacked_bytes) = new;
            true
        });
    }

    /// Applies a command; a push that finds the window full is parked.
    fn command(&mut self, cmd: Cmd) -> Option<Frame> {
        match cmd {
            // The size was taken from the atomic when the command arrived.
            Cmd::Resize => {}
            Cmd::Batch(chunks, tx) => match self.sender.push_batch(chunks) {
                Ok(seq) => {
                    reply(tx, Ok(seq));
                }
                Err(r) if r.error == PushError::WindowFull => {
                    self.pending = Some(Cmd::Batch(r.item, tx));
                }
                Err(r) => {
                    reply(tx, Err(ChannelError::Push(r.error)));
                }
            },
            Cmd::Barrier(c, ts, tx) => match self.sender.push_barrier(c, ts) {
                Ok(seq) => {
                    reply(tx, Ok(seq));
                }
                Err(PushError::WindowFull) => self.pending = Some(Cmd::Barrier(c, ts, tx)),
                Err(e) => {
                    reply(tx, Err(ChannelError::Push(e)));
                }
            },
            Cmd::Numbered(frame, tx) => match self.sender.push_numbered(frame) {
                Ok(seq) => {
                    reply(tx, Ok(seq));
                }
                Err(r) if r.error == PushError::WindowFull => {
                    self.pending = Some(Cmd::Numbered(r.item, tx));
                }
                Err(r) => {
                    reply(tx, Err(ChannelError::Push(r.error)));
                }
            },
            Cmd::Hash(req, tx) => {
                // Sent directly: digest requests are not sequenced and not held.
                if self.sender.is_connected() {
                    self.hashes.insert(req.request_id, tx);
                    return Some(Frame::HashRequest(req));
                }
                reply(tx, Err(ChannelError::Disconnected));
            }
            Cmd::StartGeneration(g) => {
                self.sender.start_generation(g);
                self.progress.send_modify(|p| p.resync = None);
            }
        }
        None
    }

    /// One connection's life: Hello, then frames out and acks in, until the
    /// link fails or the task is cancelled.
    async fn link(&mut self, mut writer: FrameWriter, mut reader: FrameReader) -> LinkEnd {
        self.resized();
        self.sender.handle_connected();
        let lost = |e: FramedError| LinkEnd::Lost(e.to_string());
        loop {
            while let Some(f) = self.sender.poll_transmit(Instant::now()) {
                if let Err(e) = writer.send(&f).await {
                    return lost(e);
                }
            }
            if let Some(cmd) = self.pending.take() {
                if let Some(f) = self.command(cmd)
                    && let Err(e) = writer.send(&f).await
                {
                    return lost(e);
                }
                if self.pending.is_none() {
                    // The parked push went in; transmit it before waiting.
                    self.publish();
                    continue;
                }
            }
            self.publish();
            let timeout = self.sender.poll_timeout();
            tokio::select! {
                _ = self.cancel.cancelled() => return LinkEnd::Cancelled,
                f = reader.next() => match f {
                    Ok(Some(Frame::HashReply(r))) => {
                        if let Some(tx) = self.hashes.remove(&r.request_id) {
                            reply(tx, Ok(r));
                        }
                    }
                    Ok(Some(frame)) => {
                        if let Err(e) = self.sender.handle_frame(frame, Instant::now()) {
                            return LinkEnd::Lost(format!("protocol error from the peer: {e}"));
                        }
                        if let Some(end) = self.events() {
                            return end;
                        }
                    }
                    Ok(None) => return LinkEnd::Lost("the peer closed the stream".into()),
                    Err(e) => return lost(e),
                },
                cmd = self.cmd_rx.recv(), if self.pending.is_none() => match cmd {
                    Some(cmd) if self.resized() => {
                        // Handled on the next stream, after the new Hello.
                        if !matches!(cmd, Cmd::Resize) {
                            self.pending = Some(cmd);
                        }
                        return LinkEnd::Resized;
                    }
                    Some(cmd) => {
                        if let Some(f) = self.command(cmd)
                            && let Err(e) = writer.send(&f).await
                        {
                            return lost(e);
                        }
                    }
                    // Every handle is gone: nothing more will be pushed.
                    None if self.sender.unacked_frames() == 0 => return LinkEnd::Cancelled,
                    None => {}
                },
                _ = sleep_until(timeout), if timeout.is_some() => {
                    self.sender.handle_timeout(Instant::now());
                }
            }
        }
    }

    /// Takes a size set by [`DiskChannel::resize`] into the sender; true when
    /// it changed (the peer hears of it only in a new Hello).
    fn resized(&mut self) -> bool {
        let size = self.size.load(Ordering::SeqCst);
        if size == self.sender.disk_size() {
            return false;
        }
        self.sender.set_disk_size(size);
        true
    }

    fn events(&mut self) -> Option<LinkEnd> {
        while let Some(ev) = self.sender.poll_event() {
            match ev {
                SenderEvent::Resumed { durable } => {
                    tracing::info!(%durable, "peer ready, resuming");
                    self.progress.send_modify(|p| p.last_error = None);
                }
                SenderEvent::Acked { .. } => {}
                SenderEvent::ResyncNeeded(r) => {
                    tracing::warn!(reason = ?r, "the peer needs a checksum resync of this disk");
                    self.progress.send_modify(|p| p.resync = Some(r));
                }
                SenderEvent::PeerError { code, message } => {
                    return Some(LinkEnd::Lost(format!("peer refused ({code:?}): {message}")));
                }
            }
        }
        None
    }
}

/// A refusing peer closes the connection with its reason, which may overtake
/// the error frame on the stream: the reason is what the user must read.
fn with_close_reason(why: String, conn: &quinn::Connection) -> String {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) if !c.reason.is_empty() => {
            format!(
                "{why}: the peer closed the connection: {}",
                String::from_utf8_lossy(&c.reason)
            )
        }
        _ => why,
    }
}

/// Answers a caller; one that stopped waiting has nothing to learn.
fn reply<T>(tx: oneshot::Sender<T>, v: T) {
    if tx.send(v).is_err() {
        tracing::trace!("caller stopped waiting for the reply");
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
