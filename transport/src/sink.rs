//! The receiving endpoint shared by the relay (from agents) and the target
//! (from the relay): accepts authenticated connections, one bidirectional
//! stream per disk, and drives proto's [`DiskReceiver`] for each. The embedding
//! process only implements [`FrameSink`]: where frames go and how they become
//! durable.
//!
//! Per stream, one task owns the receiver: it reads frames, hands accepted
//! ones to an apply task through a bounded queue (backpressure: when the sink
//! is slow the reader stops, and QUIC flow control stops the sender), and
//! turns the apply task's "durable through N" into acks.
//!
//! A connection carries every disk of its peer, so what concerns one disk
//! ends that disk's stream only: a hello the sink does not authorise (checked
//! before the stream claims the disk, so it never supersedes the rightful
//! writer's stream), a refused open, a failed apply or hash request are
//! answered with an error frame on the stream. Only a peer that breaks the
//! protocol (malformed or out-of-order frames) loses the whole connection.

use std::future::Future;
use std::sync::Arc;

use blockferry_proto::receiver::{DiskReceiver, ReceiverConfig};
use blockferry_proto::sender::sequenced;
use blockferry_proto::{
    DiskId, ErrorCode, ErrorFrame, Frame, Generation, HashRangeReply, HashRangeRequest, Hello, Seq,
};
use bytes::Bytes;
use std::collections::HashMap;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::framed::{FrameReader, FrameWriter, FramedError, close_with_error};
use crate::tls::{PeerIdentity, peer_identity};

/// A refusal or failure of the sink, sent to the peer as an error frame.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SinkError {
    pub code: ErrorCode,
    pub message: String,
}

impl SinkError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        SinkError {
            code,
            message: message.into(),
        }
    }
}

/// Durable state of a disk at the sink, answered to a Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskState {
    pub generation: Generation,
    pub durable_seq: Seq,
}

/// A frame accepted in order, with its encoded bytes as received.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub frame: Frame,
    pub raw: Bytes,
}

/// What a receiving process plugs into [`serve`].
pub trait FrameSink: Send + Sync + 'static {
    /// Whether `peer` may open the stream `hello` describes. Decided before
    /// the stream claims its disk, so a hello the peer may not send never
    /// disturbs the stream of the sender that may. A refusal ends this stream
    /// only: the connection is shared by every disk of the peer. Default: any
    /// authenticated peer may.
    fn authorize(&self, _peer: &PeerIdentity, _hello: &Hello) -> Result<(), SinkError> {
        Ok(())
    }

    /// `peer` opened the stream of `hello.disk`: authorize it and return the
    /// disk's durable state (zero sequence for a disk never seen).
    fn open(
        &self,
        peer: &PeerIdentity,
        hello: &Hello,
    ) -> impl Future<Output = Result<DiskState, SinkError>> + Send;

    /// Applies consecutive batches/barriers of `disk` (already checked by the
    /// receiver) and returns once they are durable. An error ends the disk's
    /// stream with an error frame (not the connection, which other disks
    /// share); the sender resends everything after the last ack.
    fn apply(
        &self,
        disk: DiskId,
        frames: Vec<Accepted>,
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// For a sink that forwards (the relay): the progress of its channel to the
    /// next hop, whose `replica` field says through which sequence the replica
    /// has `disk` durable. The default, `None`, means this sink is the replica.
    fn replica_progress(&self, _disk: DiskId) -> Option<watch::Receiver<crate::client::Progress>> {
        None
    }

    /// Answers a checksum-resync request.
    fn hash_ranges(
        &self,
        peer: &PeerIdentity,
        req: HashRangeRequest,
    ) -> impl Future<Output = Result<HashRangeReply, SinkError>> + Send;

    /// `peer` connected (metrics, logs). Default: nothing.
    fn connected(&self, _peer: &PeerIdentity) {}

    /// The connection of `peer` closed (metrics, logs). Default: nothing.
    fn disconnected(&self, _peer: &PeerIdentity) {}
}

/// Options of [`serve`].
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Verify every chunk (decode and blake3) before it is applied.
    pub verify_chunks: bool,
    /// Frames queued between reader and apply per stream.
    pub apply_queue: usize,
    /// Most frames handed to one `apply` call (group commit).
    pub max_apply_frames: usize,
    /// Most encoded bytes handed to one `apply` call.
    pub max_apply_bytes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            verify_chunks: true,
            apply_queue: 16,
            max_apply_frames: 64,
            max_apply_bytes: 32 << 20,
        }
    }
}

/// Accepts connections on `endpoint` until `cancel` fires, serving each with `sink`.
pub async fn serve<S: FrameSink>(
    endpoint: quinn::Endpoint,
    sink: Arc<S>,
    opts: ServeOptions,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Slots::default());
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let sink = sink.clone();
        let opts = opts.clone();
        let cancel = cancel.clone();
        let slots = slots.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused a connection at the handshake");
                    return;
                }
            };
            let peer = match peer_identity(&conn) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused a connection without a usable identity");
                    conn.close(
                        quinn::VarInt::from_u32(u32::from(ErrorCode::NotAuthorized.as_u16())),
                        b"no identity",
                    );
                    return;
                }
            };
            let span = tracing::info_span!("peer", peer = %peer.name, %remote);
            serve_connection(conn, peer, sink, opts, slots, cancel)
                .instrument(span)
                .await;
        });
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"shutting down");
}

async fn serve_connection<S: FrameSink>(
    conn: quinn::Connection,
    peer: PeerIdentity,
    sink: Arc<S>,
    opts: ServeOptions,
    slots: Arc<Slots>,
    cancel: CancellationToken,
) {
    tracing::info!("connected");
    sink.connected(&peer);
    loop {
        let (send, recv) = tokio::select! {
            _ = cancel.cancelled() => {
                conn.close(quinn::VarInt::from_u32(0), b"shutting down");
                break;
            }
            s = conn.accept_bi() => match s {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(reason = %e, "disconnected");
                    break;
                }
            },
        };
        let conn = conn.clone();
        let peer = peer.clone();
        let sink = sink.clone();
        let opts = opts.clone();
        let cancel = cancel.clone();
        let slots = slots.clone();
        tokio::spawn(
            async move {
                if let Err(e) =
                    serve_stream(&conn, (send, recv), &peer, sink, opts, &slots, cancel).await
                {
                    tracing::warn!(error = %e.message, code = ?e.code, "closing the connection");
                    conn.close(
                        quinn::VarInt::from_u32(u32::from(e.code.as_u16())),
                        e.message
                            .as_bytes()
                            .get(..e.message.len().min(256))
                            .unwrap_or(b""),
                    );
                }
            }
            .in_current_span(),
        );
    }
    sink.disconnected(&peer);
}

async fn serve_stream<S: FrameSink>(
    conn: &quinn::Connection,
    (send, recv): (quinn::SendStream, quinn::RecvStream),
    peer: &PeerIdentity,
    sink: Arc<S>,
    opts: ServeOptions,
    slots: &Slots,
    cancel: CancellationToken,
) -> Result<(), SinkError> {
    let mut reader = FrameReader::new(recv);
    let mut writer = FrameWriter::new(send);
    let protocol = |e: FramedError| SinkError::new(e.code(), e.to_string());
    let hello = match reader.next().await {
        Ok(Some(Frame::Hello(h))) => h,
        Ok(Some(other)) => {
            let msg = format!("expected hello, got {:?}", other.frame_type());
            close_with_error(conn, Some(&mut writer), ErrorCode::Protocol, &msg).await;
            return Err(SinkError::new(ErrorCode::Protocol, msg));
        }
        Ok(None) => return Ok(()),
        Err(e) => {
            if e.is_protocol_violation() {
                close_with_error(conn, Some(&mut writer), e.code(), &e.to_string()).await;
            }
            return Err(protocol(e));
        }
    };
    let disk = hello.disk;
    let span = tracing::info_span!("disk", %disk);
    async move {
        if let Err(e) = sink.authorize(peer, &hello) {
            tracing::warn!(code = ?e.code, error = %e.message, "refused the hello");
            refuse_stream(&mut writer, disk, &e).await;
            return Ok(());
        }
        // One stream per disk: a new one (a reconnecting sender) supersedes
        // the old, and is answered only once the old one has finished
        // applying what it accepted, so the durable state it reports is exact
        // and nothing is applied twice.
        let cancel = cancel.child_token();
        let _slot = slots.claim(disk, cancel.clone()).await;
        let state = match sink.open(peer, &hello).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(code = ?e.code, error = %e.message, "refused the disk");
                refuse_stream(&mut writer, disk, &e).await;
                return Ok(());
            }
        };
        let mut rx = DiskReceiver::new(
            ReceiverConfig {
                verify_chunks: opts.verify_chunks,
            },
            disk,
            state.generation,
            state.durable_seq,
        );
        rx.handle_frame(Frame::Hello(hello))
            .map_err(|e| SinkError::new(e.code(), e.to_string()))?;

        let (out_tx, mut out_rx) = mpsc::channel::<Frame>(64);
        let write_task = tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                if let Err(e) = writer.send(&f).await {
                    tracing::debug!(error = %e, "reply stream closed");
                    return;
                }
            }
            if let Err(e) = writer.finish() {
                tracing::debug!(error = %e, "reply stream already closed");
            }
        });
        let (apply_tx, apply_rx) = mpsc::channel::<Accepted>(opts.apply_queue.max(1));
        let (durable_tx, mut durable_rx) = mpsc::unbounded_channel::<Result<Seq, SinkError>>();
        let apply_task = tokio::spawn(
            apply_loop(sink.clone(), disk, apply_rx, durable_tx, opts.clone()).in_current_span(),
        );
        // A forwarding sink (the relay) reports what the replica further down
        // has durable, so the sender's RPO runs until the write is there.
        let mut replica = sink.replica_progress(disk);
        if let Some(w) = replica.as_mut() {
            rx.handle_replica_durable(w.borrow_and_update().replica);
        }
        let result = async {
            flush(&mut rx, &out_tx).await;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    r = replica_changed(&mut replica) => match r {
                        Some(seq) => rx.handle_replica_durable(seq),
                        None => replica = None,
                    },
                    d = durable_rx.recv() => match d {
                        Some(Ok(seq)) => rx.handle_durable(seq),
                        Some(Err(e)) => return Err(End::Refused(e)),
                        None => return Err(End::Refused(SinkError::new(ErrorCode::Internal, "apply task ended"))),
                    },
                    f = reader.next_raw() => match f {
                        Ok(Some((Frame::HashRequest(req), _))) => {
                            // The hello authorised this stream for its own
                            // disk, opened at its size; no other.
                            if req.disk != disk {
                                return Err(End::Refused(SinkError::new(
                                    ErrorCode::NotAuthorized,
                                    format!(
                                        "a hash request for disk {} on the stream of disk {disk}: ask on that disk's own stream",
                                        req.disk
                                    ),
                                )));
                            }
                            let reply = sink.hash_ranges(peer, req).await.map_err(End::Refused)?;
                            if out_tx.send(Frame::HashReply(reply)).await.is_err() {
                                return Ok(());
                            }
                        }
                        Ok(Some((frame, raw))) => match rx.handle_frame(frame) {
                            Ok(Some(frame)) => {
                                let accepted = Accepted { frame, raw };
                                // While the apply queue is full keep turning
                                // durable notices into acks, or both sides wait.
                                let mut pending = Some(accepted);
                                while let Some(a) = pending.take() {
                                    match apply_tx.try_send(a) {
                                        Ok(()) => {}
                                        Err(mpsc::error::TrySendError::Full(a)) => {
                                            tokio::select! {
                                                p = apply_tx.reserve() => match p {
                                                    Ok(permit) => permit.send(a),
                                                    Err(_) => return Err(End::Refused(SinkError::new(ErrorCode::Internal, "apply task ended"))),
                                                },
                                                d = durable_rx.recv() => {
                                                    match d {
                                                        Some(Ok(seq)) => rx.handle_durable(seq),
                                                        Some(Err(e)) => return Err(End::Refused(e)),
                                                        None => return Err(End::Refused(SinkError::new(ErrorCode::Internal, "apply task ended"))),
                                                    }
                                                    flush(&mut rx, &out_tx).await;
                                                    pending = Some(a);
                                                }
                                            }
                                        }
                                        Err(mpsc::error::TrySendError::Closed(_)) => {
                                            return Err(End::Refused(SinkError::new(ErrorCode::Internal, "apply task ended")));
                                        }
                                    }
                                }
                            }
                            Ok(None) => {}
                            Err(e) if e.is_fatal() => {
                                return Err(End::Violation(SinkError::new(e.code(), e.to_string())));
                            }
                            Err(e) => tracing::warn!(error = %e, "refused a frame (nacked)"),
                        },
                        Ok(None) => return Ok(()),
                        Err(e) => {
                            if e.is_protocol_violation() {
                                tracing::warn!(error = %e, "malformed frame");
                            }
                            return Err(End::Violation(protocol(e)));
                        }
                    },
                }
                flush(&mut rx, &out_tx).await;
            }
        }
        .await;
        drop(apply_tx);
        let result = match result {
            Ok(()) => Ok(()),
            // This disk only: the peer reads why on the stream, which then
            // ends; its other disks keep the connection.
            Err(End::Refused(e)) => {
                tracing::warn!(code = ?e.code, error = %e.message, "ending the disk's stream");
                if out_tx.send(error_frame(disk, &e)).await.is_err() {
                    tracing::debug!("reply stream already closed");
                }
                Ok(())
            }
            Err(End::Violation(e)) => Err(e),
        };
        drop(out_tx);
        // Frames already handed over finish applying (they are in order and
        // valid); acks for them simply do not go out.
        if let Err(e) = apply_task.await {
            tracing::error!(error = %e, "apply task failed");
        }
        if let Err(e) = write_task.await {
            tracing::error!(error = %e, "writer task failed");
        }
        result
    }
    .instrument(span)
    .await
}

/// How a stream's loop ended early.
enum End {
    /// The sink refused or failed this disk: the stream ends with an error
    /// frame, the connection stays.
    Refused(SinkError),
    /// The peer broke the protocol: the connection closes.
    Violation(SinkError),
}

fn error_frame(disk: DiskId, e: &SinkError) -> Frame {
    Frame::Error(ErrorFrame {
        code: e.code,
        disk: Some(disk),
        message: e.message.chars().take(1024).collect(),
    })
}

/// Tells the peer why this disk's stream is refused, and ends the stream. The
/// connection carries the peer's other disks and stays open.
async fn refuse_stream(writer: &mut FrameWriter, disk: DiskId, e: &SinkError) {
    if let Err(err) = writer.send(&error_frame(disk, e)).await {
        tracing::debug!(error = %err, "could not send the refusal");
    }
    if let Err(err) = writer.finish() {
        tracing::debug!(error = %err, "stream already closed");
    }
}

/// The next replica position of a forwarding sink; never resolves for a sink
/// that is the replica. `None` when the watch closed.
async fn replica_changed(w: &mut Option<watch::Receiver<crate::client::Progress>>) -> Option<Seq> {
    match w {
        Some(w) => match w.changed().await {
            Ok(()) => Some(w.borrow_and_update().replica),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// The live stream of each disk.
#[derive(Debug, Default)]
struct Slots {
    next_id: std::sync::atomic::AtomicU64,
    map: std::sync::Mutex<HashMap<DiskId, Slot>>,
}

#[derive(Debug)]
struct Slot {
    id: u64,
    cancel: CancellationToken,
    /// Dropped by the stream when it has fully finished.
    done: watch::Receiver<()>,
}

/// Held by a stream while it serves its disk.
struct SlotGuard<'a> {
    slots: &'a Slots,
    disk: DiskId,
    id: u64,
    _done: watch::Sender<()>,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.slots.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&self.disk).is_some_and(|s| s.id == self.id) {
            map.remove(&self.disk);
        }
    }
}

impl Slots {
    /// Makes this stream the disk's live one, stopping and awaiting the previous.
    async fn claim(&self, disk: DiskId, cancel: CancellationToken) -> SlotGuard<'_> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = watch::channel(());
        let prev = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.insert(
                disk,
                Slot {
                    id,
                    cancel,
                    done: rx,
                },
            )
        };
        if let Some(mut prev) = prev {
            tracing::info!("a new stream supersedes the previous one of this disk");
            prev.cancel.cancel();
            // Err once the old stream dropped its sender: it has finished.
            while prev.done.changed().await.is_ok() {}
        }
        SlotGuard {
            slots: self,
            disk,
            id,
            _done: tx,
        }
    }
}

async fn flush(rx: &mut DiskReceiver, out: &mpsc::Sender<Frame>) {
    while let Some(f) = rx.poll_transmit() {
        if out.send(f).await.is_err() {
            return;
        }
    }
}

async fn apply_loop<S: FrameSink>(
    sink: Arc<S>,
    disk: DiskId,
    mut rx: mpsc::Receiver<Accepted>,
    durable: mpsc::UnboundedSender<Result<Seq, SinkError>>,
    opts: ServeOptions,
) {
    while let Some(first) = rx.recv().await {
        let mut bytes = first.raw.len();
        let mut group = vec![first];
        // Group commit: whatever is already queued shares one fsync.
        while group.len() < opts.max_apply_frames && bytes < opts.max_apply_bytes {
            match rx.try_recv() {
                Ok(a) => {
                    bytes += a.raw.len();
                    group.push(a);
                }
                Err(_) => break,
            }
        }
        let last = group
            .last()
            .and_then(|a| sequenced(&a.frame))
            .map(|(_, _, s)| s);
        match sink.apply(disk, group).await {
            Ok(()) => {
                if let Some(seq) = last
                    && durable.send(Ok(seq)).is_err()
                {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(code = ?e.code, error = %e.message, "apply failed");
                if durable.send(Err(e)).is_err() {
                    tracing::debug!("stream already closed");
                }
                return;
            }
        }
    }
}
