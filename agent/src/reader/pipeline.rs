//! The threads of the reader: one io_uring thread, a pool of hash/compress
//! workers, and a sequencer that restores submission order.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SendError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use blockferry_proto::frame::MAX_CHUNK_LEN;

use super::encode::Encoder;
use super::uring::{ALIGN, BufferPool, Completion, Lease, PushError, ReadOp, UringReader};
use super::{Chunk, RangeId, ReaderConfig, ReaderError, ReaderEvent, open_device};

/// Short reads and EINTR/EAGAIN of one chunk retried before giving up.
const MAX_ATTEMPTS: u32 = 64;

/// Messages to the io_uring thread. Buffers come back on the same channel as
/// new ranges, so that the thread has a single thing to block on when idle.
enum Control {
    Range {
        id: RangeId,
        start: u64,
        end: u64,
        fine: bool,
    },
    Free(Lease),
    Close,
}

#[derive(Debug)]
struct Tag {
    seq: u64,
    range: RangeId,
    last: bool,
    attempts: u32,
}

struct Work {
    seq: u64,
    range: RangeId,
    last: bool,
    offset: u64,
    len: usize,
    lease: Lease,
}

enum Done {
    Chunk {
        range: RangeId,
        last: bool,
        chunk: Chunk,
        // Held until the chunk is emitted: this bounds what the sequencer
        // may hold while it waits for an earlier chunk.
        _lease: Lease,
    },
    Failed {
        range: RangeId,
        last: bool,
        offset: u64,
        error: ReaderError,
    },
    EmptyRange {
        range: RangeId,
    },
}

enum ToSequencer {
    Item(u64, Done),
    Fatal(ReaderError),
}

/// Submits ranges to a running reader. Dropping it closes the input.
#[derive(Debug)]
pub struct ReadHandle {
    ctl: Sender<ControlBox>,
    device: PathBuf,
    /// A second descriptor of the device, to re-read its size.
    file: File,
    size: Arc<AtomicU64>,
    chunk_size: u64,
    direct: bool,
    next_id: AtomicU64,
    closed: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

// `Control` holds a `Lease`, which is not `Debug`-friendly for users; the
// wrapper keeps `ReadHandle: Debug` without exposing internals.
struct ControlBox(Control);

impl std::fmt::Debug for ControlBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Control")
    }
}

impl ReadHandle {
    /// Queues the byte range `[offset, offset + len)`, widened to the chunk
    /// grid. Refused when it ends past the device end.
    ///
    /// For whole-chunk work: initial sync and checksum resync, whose chunks
    /// must line up with the hash tree's leaves.
    pub fn submit(&self, offset: u64, len: u64) -> Result<RangeId, ReaderError> {
        self.submit_as(offset, len, false)
    }

    /// Queues the byte range `[offset, offset + len)` widened only to 4 KiB
    /// (see [`fine_span`](Self::fine_span)), for tracked writes: a 4 KiB write
    /// then costs a 4 KiB read, hash and send instead of a whole chunk's.
    ///
    /// The range is cut at the chunk grid, so its chunks are at most
    /// `chunk_size` long and one grid chunk is covered by at most one chunk
    /// of the range; each chunk's hash covers its own offset and length.
    /// Refused when it ends past the device end.
    pub fn submit_fine(&self, offset: u64, len: u64) -> Result<RangeId, ReaderError> {
        self.submit_as(offset, len, true)
    }

    /// What [`submit_fine`](Self::submit_fine) reads for `range`: the range
    /// widened to 4 KiB (the O_DIRECT alignment of every logical block size
    /// up to 4 KiB), clipped to the device end.
    pub fn fine_span(&self, range: Range<u64>) -> Range<u64> {
        widen(range, ALIGN as u64, self.size())
    }

    /// What [`submit`](Self::submit) reads for `range`: the range widened to
    /// the chunk grid, clipped to the device end.
    pub fn chunk_span(&self, range: Range<u64>) -> Range<u64> {
        widen(range, self.chunk_size, self.size())
    }

    fn submit_as(&self, offset: u64, len: u64, fine: bool) -> Result<RangeId, ReaderError> {
        let size = self.size();
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= size)
            .ok_or_else(|| ReaderError::BeyondEnd {
                device: self.device.clone(),
                offset,
                len,
                size,
            })?;
        if self.closed.load(Ordering::Acquire) {
            return Err(self.stopped());
        }
        let grain = if fine { ALIGN as u64 } else { self.chunk_size };
        let Range { start, end } = widen(offset..end, grain, size);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.ctl
            .send(ControlBox(Control::Range {
                id,
                start,
                end,
                fine,
            }))
            .map_err(|_| self.stopped())?;
        Ok(id)
    }

    /// No more ranges: the events end after the last submitted range.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            // A send error means the reader already stopped, which is the goal.
            if self.ctl.send(ControlBox(Control::Close)).is_err() {
                tracing::debug!(device = %self.device.display(), "reader already stopped");
            }
        }
    }

    /// Size of the device in bytes, as of the start or the last
    /// [`refresh_size`](Self::refresh_size).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Re-reads the device size (after a resize, e.g. `losetup -c`): later
    /// ranges may reach the new end, and the old short last chunk is read
    /// whole. After a shrink, chunks past the new end fail loudly.
    pub fn refresh_size(&self) -> Result<u64, ReaderError> {
        let size = super::device_size(&self.file).map_err(|source| ReaderError::Size {
            device: self.device.clone(),
            source,
        })?;
        let old = self.size.swap(size, Ordering::AcqRel);
        if old != size {
            tracing::info!(device = %self.device.display(), old, new = size, "device size changed");
        }
        Ok(size)
    }

    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Whether reads bypass the page cache.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Closes the input and waits for the reader's threads; call it after
    /// the events have ended (or been dropped), else it waits for them.
    pub fn join(self) {
        self.close();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            if t.join().is_err() {
                tracing::error!(device = %self.device.display(), "a reader thread panicked");
            }
        }
    }

    fn stopped(&self) -> ReaderError {
        ReaderError::Stopped {
            device: self.device.clone(),
        }
    }
}

/// `range` widened outwards to multiples of `grain`, the end clipped to
/// `size`; an empty range stays empty.
fn widen(range: Range<u64>, grain: u64, size: u64) -> Range<u64> {
    if range.is_empty() {
        return range;
    }
    let start = range.start / grain * grain;
    let end = range.end.div_ceil(grain).saturating_mul(grain).min(size);
    start..end.max(start)
}

impl Drop for ReadHandle {
    fn drop(&mut self) {
        self.close();
    }
}

/// The reader's output, in order. Ends (`None`) after the last range of a
/// closed reader, or after [`ReaderEvent::Fatal`].
#[derive(Debug)]
pub struct ReaderEvents {
    rx: tokio::sync::mpsc::Receiver<ReaderEvent>,
}

impl ReaderEvents {
    pub async fn next(&mut self) -> Option<ReaderEvent> {
        self.rx.recv().await
    }

    /// Blocking variant, for threads outside an async runtime (tokio panics
    /// when it is called from an async task).
    pub fn blocking_next(&mut self) -> Option<ReaderEvent> {
        self.rx.blocking_recv()
    }
}

/// Opens the device at `path` and starts a reader on it.
pub fn spawn(
    path: &Path,
    config: &ReaderConfig,
) -> Result<(ReadHandle, ReaderEvents), ReaderError> {
    spawn_with(path, config, Faults::default())
}

/// Production readers inject nothing: this no-op stands in for the test-only
/// fault injection of [`faults`], and compiles away.
#[cfg(not(test))]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Faults {}

#[cfg(not(test))]
impl Faults {
    #[inline(always)]
    fn apply(&mut self, _dev_offset: u64, result: io::Result<usize>) -> io::Result<usize> {
        result
    }
}

mod order;
use order::{sequencer, worker};

#[cfg(test)]
mod faults;
#[cfg(test)]
use faults::Faults;

pub(crate) fn spawn_with(
    path: &Path,
    config: &ReaderConfig,
    faults: Faults,
) -> Result<(ReadHandle, ReaderEvents), ReaderError> {
    validate(config)?;
    let (file, size, direct) = open_device(path, config.direct)?;
    let device = path.to_owned();
    let size = Arc::new(AtomicU64::new(size));
    let handle_file = file.try_clone().map_err(|source| ReaderError::Open {
        device: device.clone(),
        source,
    })?;
    let (ctl_tx, ctl_rx) = mpsc::channel::<ControlBox>();
    let home_tx = ctl_tx.clone();
    let home = Arc::new(
        move |l: Lease| match home_tx.send(ControlBox(Control::Free(l))) {
            Ok(()) => Ok(()),
            Err(SendError(ControlBox(Control::Free(l)))) => Err(l),
            Err(_) => Ok(()),
        },
    );
    let pool_len = config.queue_depth as usize + 2 * config.workers + 2;
    let ring_err = |source: io::Error| ReaderError::Ring {
        device: device.clone(),
        source,
    };
    let leases =
        BufferPool::leases(pool_len, config.chunk_size as usize, home).map_err(ring_err)?;
    let ring = UringReader::<Tag>::new(file, config.queue_depth, &leases).map_err(ring_err)?;

    let (out_tx, out_rx) = tokio::sync::mpsc::channel(config.output_capacity);
    let (work_tx, work_rx) = mpsc::sync_channel::<Work>(pool_len);
    let work_rx = Arc::new(Mutex::new(work_rx));
    let (seq_tx, seq_rx) = mpsc::channel::<ToSequencer>();
    let cancelled = Arc::new(AtomicBool::new(false));

    let mut threads = Vec::new();
    let spawn_err = ReaderError::Thread;
    for i in 0..config.workers {
        let mut encoder = Encoder::new(config.zstd_level, config.hash_only).map_err(|source| {
            ReaderError::Config(format!("zstd level {:?}: {source}", config.zstd_level))
        })?;
        let rx = Arc::clone(&work_rx);
        let tx = seq_tx.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("bf-hash-{i}"))
                .spawn(move || worker(&rx, &tx, &mut encoder))
                .map_err(spawn_err)?,
        );
    }
    {
        let cancelled = Arc::clone(&cancelled);
        threads.push(
            std::thread::Builder::new()
                .name("bf-sequencer".into())
                .spawn(move || sequencer(seq_rx, out_tx, &cancelled))
                .map_err(spawn_err)?,
        );
    }
    let state = UringLoop {
        ring,
        ctl: ctl_rx,
        work: work_tx,
        seq: seq_tx,
        free: leases,
        pending: VecDeque::new(),
        retry: VecDeque::new(),
        next_seq: 0,
        closed: false,
        queue_depth: config.queue_depth as usize,
        chunk_size: u64::from(config.chunk_size),
        size: Arc::clone(&size),
        direct,
        device: device.clone(),
        cancelled,
        faults,
    };
    threads.push(
        std::thread::Builder::new()
            .name("bf-uring".into())
            .spawn(move || state.run())
            .map_err(spawn_err)?,
    );
    tracing::debug!(device = %device.display(), size = size.load(Ordering::Relaxed), direct,
        "reader started");
    Ok((
        ReadHandle {
            ctl: ctl_tx,
            device,
            file: handle_file,
            size,
            chunk_size: u64::from(config.chunk_size),
            direct,
            next_id: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            threads: Mutex::new(threads),
        },
        ReaderEvents { rx: out_rx },
    ))
}

fn validate(c: &ReaderConfig) -> Result<(), ReaderError> {
    let bad = |m: String| Err(ReaderError::Config(m));
    if !c.chunk_size.is_power_of_two()
        || (c.chunk_size as usize) < ALIGN
        || c.chunk_size > MAX_CHUNK_LEN
    {
        return bad(format!(
            "chunk size {} must be a power of two between {ALIGN} and {MAX_CHUNK_LEN}",
            c.chunk_size
        ));
    }
    if c.queue_depth == 0 || c.queue_depth > 4096 {
        return bad(format!(
            "queue depth {} must be between 1 and 4096",
            c.queue_depth
        ));
    }
    if c.workers == 0 || c.workers > 64 {
        return bad(format!("workers {} must be between 1 and 64", c.workers));
    }
    if c.output_capacity == 0 {
        return bad("output capacity must be at least 1".into());
    }
    Ok(())
}

struct PendingRange {
    id: RangeId,
    next: u64,
    end: u64,
    /// Chunks end at the range end rather than at the next grid boundary.
    fine: bool,
}

struct UringLoop {
    ring: UringReader<Tag>,
    ctl: Receiver<ControlBox>,
    work: mpsc::SyncSender<Work>,
    seq: Sender<ToSequencer>,
    free: Vec<Lease>,
    pending: VecDeque<PendingRange>,
    /// Reads handed back by a failed push or to be continued after a short
    /// read; they go before any new read.
    retry: VecDeque<ReadOp<Tag>>,
    next_seq: u64,
    closed: bool,
    queue_depth: usize,
    chunk_size: u64,
    size: Arc<AtomicU64>,
    direct: bool,
    device: PathBuf,
    cancelled: Arc<AtomicBool>,
    faults: Faults,
}

impl UringLoop {
    fn run(mut self) {
        let span = tracing::debug_span!("reader", device = %self.device.display());
        let _enter = span.enter();
        if let Err(e) = self.run_inner() {
            tracing::error!(error = %e, "reader stopped");
            // The sequencer is the only consumer; if it is gone, nobody listens.
            if self.seq.send(ToSequencer::Fatal(e)).is_err() {
                tracing::debug!("sequencer gone before a fatal error");
            }
        }
        // Dropping `self.ring` waits for every read still in flight.
    }

    fn run_inner(&mut self) -> Result<(), ReaderError> {
        let mut completions = Vec::new();
        loop {
            loop {
                match self.ctl.try_recv() {
                    Ok(ControlBox(c)) => self.control(c),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.closed = true;
                        break;
                    }
                }
            }
            if self.cancelled.load(Ordering::Acquire) {
                self.closed = true;
                self.pending.clear();
                self.retry.clear();
            }
            self.issue()?;
            if self.ring.in_flight() > 0 {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    // The completion queue is full: reaping below makes room.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {}
                    Err(source) => {
                        return Err(ReaderError::Ring {
                            device: self.device.clone(),
                            source,
                        });
                    }
                }
                self.ring.reap(&mut completions);
                for c in completions.drain(..) {
                    self.complete(c)?;
                }
                continue;
            }
            if !self.retry.is_empty() {
                // Nothing in flight, yet a read could not be queued: the ring
                // refuses it for good. Report rather than spin.
                return Err(ReaderError::Ring {
                    device: self.device.clone(),
                    source: io::Error::other("submission queue refuses reads with none in flight"),
                });
            }
            if self.closed && self.pending.is_empty() {
                return Ok(());
            }
            // Idle, or every buffer is downstream: wait for a range or a buffer.
            match self.ctl.recv() {
                Ok(ControlBox(c)) => self.control(c),
                Err(_) => self.closed = true,
            }
        }
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Range {
                id,
                start,
                end,
                fine,
            } => {
                if !self.closed {
                    self.pending.push_back(PendingRange {
                        id,
                        next: start,
                        end,
                        fine,
                    });
                }
            }
            Control::Free(lease) => self.free.push(lease),
            Control::Close => self.closed = true,
        }
    }

    /// Queues reads while there is room on the ring and a free buffer.
    fn issue(&mut self) -> Result<(), ReaderError> {
        while self.ring.in_flight() < self.queue_depth {
            let op = if let Some(op) = self.retry.pop_front() {
                op
            } else if let Some(front) = self.pending.front_mut() {
                if front.next >= front.end {
                    let range = front.id;
                    self.pending.pop_front();
                    let seq = self.take_seq();
                    self.to_sequencer(seq, Done::EmptyRange { range })?;
                    continue;
                }
                let Some(lease) = self.free.pop() else { break };
                let offset = front.next;
                // Every chunk ends at the next grid boundary (whole-chunk
                // ranges start on the grid), so no chunk straddles two leaves.
                let grid_end = (offset / self.chunk_size)
                    .saturating_add(1)
                    .saturating_mul(self.chunk_size);
                let piece_end = if front.fine {
                    grid_end.min(front.end)
                } else {
                    grid_end
                };
                let size = self.size.load(Ordering::Acquire);
                // The size may have changed since the range was submitted:
                // a grown device gives the old short last chunk in full.
                let chunk_end = piece_end.min(size);
                let last = piece_end >= front.end;
                let range = front.id;
                front.next = piece_end;
                if last {
                    self.pending.pop_front();
                }
                let seq = self.take_seq();
                if chunk_end <= offset {
                    self.free.push(lease);
                    let error = ReaderError::UnexpectedEof {
                        device: self.device.clone(),
                        offset,
                        size,
                    };
                    let done = Done::Failed {
                        range,
                        last,
                        offset,
                        error,
                    };
                    self.to_sequencer(seq, done)?;
                    continue;
                }
                ReadOp {
                    lease,
                    dev_offset: offset,
                    filled: 0,
                    want: (chunk_end - offset) as usize,
                    tag: Tag {
                        seq,
                        range,
                        last,
                        attempts: 0,
                    },
                }
            } else {
                break;
            };
            match self.ring.push(op) {
                Ok(()) => {}
                Err((PushError::QueueFull, op)) => {
                    // Handed back, not lost: it goes first once there is room.
                    self.retry.push_front(op);
                    break;
                }
                Err((PushError::Invalid, op)) => {
                    let offset = op.dev_offset + op.filled as u64;
                    self.fail(
                        op,
                        ReaderError::Read {
                            device: self.device.clone(),
                            offset,
                            source: io::Error::new(
                                io::ErrorKind::InvalidInput,
                                "read does not fit its buffer",
                            ),
                        },
                    )?;
                }
            }
        }
        Ok(())
    }

    fn complete(&mut self, c: Completion<Tag>) -> Result<(), ReaderError> {
        let Completion { mut op, result } = c;
        let result = self.faults.apply(op.dev_offset, result);
        let at = op.dev_offset + op.filled as u64;
        match result {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {
                op.tag.attempts += 1;
                if op.tag.attempts >= MAX_ATTEMPTS {
                    let error = self.read_error(at, e);
                    return self.fail(op, error);
                }
                self.retry.push_back(op);
                Ok(())
            }
            Err(e) => {
                let error = self.read_error(at, e);
                self.fail(op, error)
            }
            Ok(0) => {
                let error = ReaderError::UnexpectedEof {
                    device: self.device.clone(),
                    offset: at,
                    size: self.size.load(Ordering::Acquire),
                };
                self.fail(op, error)
            }
            Ok(n) => {
                op.filled += n;
                if op.filled >= op.want {
                    tracing::trace!(offset = op.dev_offset, len = op.want, "chunk read");
                    let work = Work {
                        seq: op.tag.seq,
                        range: op.tag.range,
                        last: op.tag.last,
                        offset: op.dev_offset,
                        len: op.want,
                        lease: op.lease,
                    };
                    return self.work.send(work).map_err(|_| self.stopped());
                }
                // Short read: continue where it stopped; O_DIRECT needs the
                // continuation aligned, so re-read the partial block.
                op.tag.attempts += 1;
                if op.tag.attempts >= MAX_ATTEMPTS {
                    let error = self.read_error(at, io::Error::other("repeated short reads"));
                    return self.fail(op, error);
                }
                if self.direct {
                    op.filled = op.filled / ALIGN * ALIGN;
                }
                self.retry.push_back(op);
                Ok(())
            }
        }
    }

    fn read_error(&self, offset: u64, source: io::Error) -> ReaderError {
        ReaderError::Read {
            device: self.device.clone(),
            offset,
            source,
        }
    }

    fn fail(&mut self, op: ReadOp<Tag>, error: ReaderError) -> Result<(), ReaderError> {
        tracing::warn!(offset = op.dev_offset, error = %error, "chunk read failed");
        let ReadOp {
            lease,
            dev_offset,
            tag,
            ..
        } = op;
        self.free.push(lease);
        self.to_sequencer(
            tag.seq,
            Done::Failed {
                range: tag.range,
                last: tag.last,
                offset: dev_offset,
                error,
            },
        )
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn to_sequencer(&self, seq: u64, done: Done) -> Result<(), ReaderError> {
        self.seq
            .send(ToSequencer::Item(seq, done))
            .map_err(|_| self.stopped())
    }

    fn stopped(&self) -> ReaderError {
        ReaderError::Stopped {
            device: self.device.clone(),
        }
    }
}
