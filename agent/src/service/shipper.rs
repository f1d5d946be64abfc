//! The per-disk shipper task: reader output → batches → the disk's channel,
//! and what was shipped back to the service's main loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use blockferry_proto::Seq;
use blockferry_proto::frame::{Chunk, Consistency, Encoding};
use blockferry_transport::{ChannelError, DiskChannel};
use futures::FutureExt;
use tokio::sync::mpsc;

use super::pacer::Pacer;
use super::unix_ns;
use crate::reader::{ReaderError, ReaderEvent, ReaderEvents};

/// Why a shipper stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// The reader of the disk failed.
    #[error(transparent)]
    Reader(#[from] ReaderError),
    /// The channel to the relay refused a push or stopped.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("the service stopped while the shipper was reporting to it")]
    ServiceStopped,
}

/// What a shipper tells the main loop.
#[derive(Debug)]
pub(super) enum Shipped {
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
    Stopped { disk: usize, error: ShipError },
}

/// The per-disk shipper: reader output → batches → channel. Batches close when
/// full, or when the reader has nothing more ready, so a quiet disk ships at once
/// and a busy one ships large batches. When the reader runs dry after shipping,
/// at most once per [`POINT_EVERY`], a barrier asks the target for a recovery
/// point. It is labelled not consistent: the agent does not yet prove write
/// ordering for its reads, and a label is never assumed.
pub(super) fn spawn_shipper(
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
    async fn run(&mut self, mut events: ReaderEvents) -> Result<(), ShipError> {
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
                ReaderEvent::Fatal(e) => return Err(e.into()),
            }
        }
    }

    /// Pushes the gathered batch, then reports every read whose chunks are all
    /// pushed: they are durable once `last_seq` is.
    async fn flush(&mut self) -> Result<(), ShipError> {
        if !self.batch.is_empty() {
            self.pacer.pace(self.batch_bytes as u64).await;
            let chunks = std::mem::take(&mut self.batch);
            self.batch_bytes = 0;
            self.last_seq = self.channel.push_batch(chunks).await?;
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
                .map_err(|_| ShipError::ServiceStopped)?;
        }
        Ok(())
    }

    async fn point(&mut self) -> Result<(), ShipError> {
        self.last_seq = self
            .channel
            .push_barrier(Consistency::NotConsistent, unix_ns())
            .await?;
        self.since_point = false;
        self.last_point = tokio::time::Instant::now();
        Ok(())
    }
}
