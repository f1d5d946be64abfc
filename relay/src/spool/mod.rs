//! The relay's durable spool: encoded frames of every disk, appended to segment
//! files and fsynced before the agent is acked; released (and their segments
//! deleted) only after the target acked them durable.
//!
//! On-disk layout in the spool directory:
//!
//! ```text
//! seg-0000000000000001.log   records, appended; a new segment past `segment_bytes`
//! positions                  per disk: the last (generation, seq) the target acked
//! forgotten                  per disk forgotten: everything at or below (generation, seq) is dead
//! lock                       held (flock) while the spool is open: one process at a time
//! ```
//!
//! A record is `magic u32 | payload len u32 | disk 16 | generation u64 | seq u64 |
//! check 16 | payload`, big endian, where `check` is blake3 over everything else.
//! A torn or corrupt tail (a crash during append, a full disk) is cut off on open:
//! it was never acked, so the agent still holds it and sends it again.
//!
//! `positions` is rewritten (temp file, fsync, rename, directory fsync) before
//! any segment is deleted, so after a restart the relay still knows how far each
//! disk got even when nothing of it is left in the spool.
//!
//! `forgotten` holds what [`Spool::forget`] dropped: after a failover the disk's
//! stream runs in a new lineage with a new count, and the frames spooled from the
//! fenced source (an older generation) are never to be delivered. They may sit in
//! segments shared with other disks, so instead of rewriting segments the spool
//! remembers the newest dead position and skips everything at or below it on open.
//!
//! This module does blocking file I/O; the async shell calls it from a blocking
//! thread.

mod positions;
mod record;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use blockferry_durable::DurableError;
use blockferry_proto::{DiskId, Generation, RelayRestore, Seq, SeqOrder, seq_order};
use bytes::Bytes;

use positions::{FORGOTTEN, POSITIONS, read_positions};

const LOCK: &str = "lock";

/// What [`Spool::forget`] dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    /// Frames that were waiting for the target.
    pub frames: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// The newest position the spool knew of the disk; `None` for a disk it
    /// never held.
    pub through: Option<Position>,
}
use record::{MAX_RECORD_PAYLOAD, RECORD_HEADER_LEN, encode_record, parse_record};

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {action} {path} at offset {offset}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("spool record of {len} bytes exceeds the limit of {MAX_RECORD_PAYLOAD}")]
    TooLarge { len: usize },
    #[error(
        "spool positions file {path} is corrupt: {detail}; move it away to rebuild from the target"
    )]
    BadPositions { path: PathBuf, detail: String },
    #[error(
        "spool {path} is in use by another process (a running `blockferry-relay serve`?): stop it first"
    )]
    Busy { path: PathBuf },
    #[error(
        "spool refused frame {seq} ({generation}) of disk {disk}: {order:?} after what it holds; the receiving loop let it through, which is a bug to report"
    )]
    OutOfOrder {
        disk: DiskId,
        generation: Generation,
        seq: Seq,
        order: SeqOrder,
    },
}

impl From<DurableError> for SpoolError {
    fn from(e: DurableError) -> Self {
        SpoolError::Io {
            action: e.op,
            path: e.path,
            offset: 0,
            source: e.source,
        }
    }
}

impl SpoolError {
    /// Whether the error is a full file system (the shell retries, never drops).
    pub fn is_no_space(&self) -> bool {
        match self {
            SpoolError::Io { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }
}

/// (generation, seq): the order of frames of one disk.
pub type Position = (Generation, Seq);

/// One frame to spool.
#[derive(Debug, Clone)]
pub struct Entry {
    pub disk: DiskId,
    pub generation: Generation,
    pub seq: Seq,
    /// The encoded frame, as it goes to the target.
    pub frame: Bytes,
}

/// Where a spooled frame lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef {
    pub disk: DiskId,
    pub generation: Generation,
    pub seq: Seq,
    segment: u64,
    /// Offset of the payload in the segment.
    offset: u64,
    pub len: u32,
}

impl RecordRef {
    pub fn position(&self) -> Position {
        (self.generation, self.seq)
    }
}

#[derive(Debug)]
struct Segment {
    file: File,
    path: PathBuf,
    len: u64,
    live: usize,
}

/// Tunables of the spool.
#[derive(Debug, Clone, Copy)]
pub struct SpoolOptions {
    /// A new segment starts once the current one is this large.
    pub segment_bytes: u64,
    /// fsync after each append (off only in tests of other things and benches
    /// that measure without it; the relay always runs with it on).
    pub fsync: bool,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            segment_bytes: 64 << 20,
            fsync: true,
        }
    }
}

/// The spool of one relay.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    opts: SpoolOptions,
    segments: BTreeMap<u64, Segment>,
    records: HashMap<DiskId, VecDeque<RecordRef>>,
    /// The last position of each disk the target acked (persisted).
    acked: HashMap<DiskId, Position>,
    /// Size of each disk as its agent announced it (persisted).
    sizes: HashMap<DiskId, u64>,
    /// Disks forgotten: every record at or below the position is dead (persisted).
    forgotten: HashMap<DiskId, Position>,
    /// Payload bytes of unreleased records.
    live_bytes: u64,
    /// Held (flock) while open.
    _lock: File,
    /// An append failed for lack of space: start a fresh segment as soon as
    /// the active one is fully released, so its space can be given back.
    starved: bool,
}

impl Spool {
    /// Opens (or creates) the spool in `dir` and rebuilds its index, cutting
    /// off a torn tail.
    pub fn open(dir: &Path, opts: SpoolOptions) -> Result<Self, SpoolError> {
        let io = |action, path: &Path, source| SpoolError::Io {
            action,
            path: path.to_path_buf(),
            offset: 0,
            source,
        };
        blockferry_durable::create_dir_all(dir)?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io("open", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Busy {
                    path: dir.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io("lock", &lock_path, e)),
        }
        let (acked, sizes) = read_positions(&dir.join(POSITIONS))?;
        let forgotten = positions::read_forgotten(&dir.join(FORGOTTEN))?;
        let mut ids = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| io("list", dir, e))? {
            let entry = entry.map_err(|e| io("list", dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name
                .strip_prefix("seg-")
                .and_then(|s| s.strip_suffix(".log"))
                .and_then(|s| u64::from_str_radix(s, 16).ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            opts,
            segments: BTreeMap::new(),
            records: HashMap::new(),
            acked,
            sizes,
            forgotten,
            live_bytes: 0,
            _lock: lock,
            starved: false,
        };
        for id in ids {
            spool.load_segment(id)?;
        }
        if spool.segments.is_empty() {
            spool.new_segment(1)?;
        }
        Ok(spool)
    }

    fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("seg-{id:016x}.log"))
    }

    fn load_segment(&mut self, id: u64) -> Result<(), SpoolError> {
        let path = self.segment_path(id);
        let io = |action, offset, source| SpoolError::Io {
            action,
            path: path.clone(),
            offset,
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io("open", 0, e))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(|e| io("read", 0, e))?;
        let mut pos = 0usize;
        let mut live = 0usize;
        while let Some((rec, next)) = parse_record(&data, pos) {
            let rec = RecordRef { segment: id, ..rec };
            pos = next;
            let acked = self.acked.get(&rec.disk).copied();
            let dead = self.forgotten.get(&rec.disk).copied();
            if acked.is_some_and(|a| rec.position() <= a)
                || dead.is_some_and(|d| rec.position() <= d)
            {
                continue;
            }
            self.live_bytes += u64::from(rec.len);
            live += 1;
            self.records.entry(rec.disk).or_default().push_back(rec);
        }
        if pos < data.len() {
            tracing::warn!(
                path = %path.display(),
                offset = pos,
                cut = data.len() - pos,
                "cutting a torn or corrupt spool tail (never acked, the agent resends it)"
            );
            file.set_len(pos as u64)
                .map_err(|e| io("truncate", pos as u64, e))?;
            file.sync_all().map_err(|e| io("fsync", pos as u64, e))?;
        }
        self.segments.insert(
            id,
            Segment {
                file,
                path: path.clone(),
                len: pos as u64,
                live,
            },
        );
        Ok(())
    }

    fn new_segment(&mut self, id: u64) -> Result<(), SpoolError> {
        let path = self.segment_path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| SpoolError::Io {
                action: "create",
                path: path.clone(),
                offset: 0,
                source,
            })?;
        blockferry_durable::sync_dir(&self.dir)?;
        self.segments.insert(
            id,
            Segment {
                file,
                path,
                len: 0,
                live: 0,
            },
        );
        Ok(())
    }

    /// Appends `entries` in order and makes them durable with one fsync. On any
    /// error nothing of this call counts: the partial tail is cut off again.
    ///
    /// Each frame must be the next of its disk under the sequence invariant
    /// (one count per disk across generations, see [`Seq`]), checked with
    /// [`seq_order`] against the newest position held: the receiver already
    /// refused anything else, so a frame out of order here is refused before
    /// it reaches the disk rather than spooled behind a gap.
    pub fn append(&mut self, entries: &[Entry]) -> Result<Vec<RecordRef>, SpoolError> {
        let mut held: HashMap<DiskId, Position> = HashMap::new();
        for e in entries {
            if e.frame.len() > MAX_RECORD_PAYLOAD {
                return Err(SpoolError::TooLarge { len: e.frame.len() });
            }
            let last = held
                .get(&e.disk)
                .copied()
                .or_else(|| self.durable_position(e.disk))
                .unwrap_or((Generation(0), Seq::ZERO));
            match seq_order(last, (e.generation, e.seq)) {
                SeqOrder::Next => {
                    held.insert(e.disk, (e.generation, e.seq));
                }
                order => {
                    return Err(SpoolError::OutOfOrder {
                        disk: e.disk,
                        generation: e.generation,
                        seq: e.seq,
                        order,
                    });
                }
            }
        }
        if self.starved {
            // The file system was full. If the target acknowledged every
            // record of the active segment before that failed append, no
            // release will come to start it over: do it here, or the spool
            // would stay full of dead records forever.
            self.delete_empty_segments()?;
        }
        let rotate = self
            .segments
            .last_key_value()
            .map(|(id, s)| (s.len >= self.opts.segment_bytes).then_some(*id + 1))
            .unwrap_or(Some(1));
        if let Some(id) = rotate {
            self.new_segment(id)?;
        }
        let (&id, seg) = self
            .segments
            .last_key_value()
            .ok_or_else(|| SpoolError::Io {
                action: "find the active segment in",
                path: self.dir.clone(),
                offset: 0,
                source: std::io::Error::other("no segment"),
            })?;
        let start = seg.len;
        let mut buf = Vec::with_capacity(
            entries
                .iter()
                .map(|e| RECORD_HEADER_LEN + e.frame.len())
                .sum(),
        );
        let mut refs = Vec::with_capacity(entries.len());
        for e in entries {
            let offset = start + (buf.len() + RECORD_HEADER_LEN) as u64;
            encode_record(&mut buf, e);
            refs.push(RecordRef {
                disk: e.disk,
                generation: e.generation,
                seq: e.seq,
                segment: id,
                offset,
                len: e.frame.len() as u32,
            });
        }
        let result: Result<(), SpoolError> = (|| {
            seg.file
                .write_all_at(&buf, start)
                .map_err(|source| SpoolError::Io {
                    action: "write",
                    path: seg.path.clone(),
                    offset: start,
                    source,
                })?;
            if self.opts.fsync {
                seg.file.sync_data().map_err(|source| SpoolError::Io {
                    action: "fsync",
                    path: seg.path.clone(),
                    offset: start,
                    source,
                })?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Cut what may have landed so the next append starts at a record
            // boundary; if even that fails, open() cuts it by checksum.
            if let Err(t) = seg.file.set_len(start) {
                tracing::error!(path = %seg.path.display(), offset = start, error = %t, "cannot cut a failed spool append");
            }
            if e.is_no_space() {
                self.starved = true;
            }
            return Err(e);
        }
        let seg = self.segments.get_mut(&id).ok_or_else(|| SpoolError::Io {
            action: "find segment",
            path: self.dir.clone(),
            offset: start,
            source: std::io::Error::other("segment vanished"),
        })?;
        seg.len = start + buf.len() as u64;
        seg.live += refs.len();
        for r in &refs {
            self.live_bytes += u64::from(r.len);
            self.records.entry(r.disk).or_default().push_back(*r);
        }
        Ok(refs)
    }

    /// Reads a spooled frame back.
    pub fn read(&self, r: &RecordRef) -> Result<Bytes, SpoolError> {
        let seg = self
            .segments
            .get(&r.segment)
            .ok_or_else(|| SpoolError::Io {
                action: "read released record from",
                path: self.segment_path(r.segment),
                offset: r.offset,
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })?;
        let mut buf = vec![0u8; r.len as usize];
        seg.file
            .read_exact_at(&mut buf, r.offset)
            .map_err(|source| SpoolError::Io {
                action: "read",
                path: seg.path.clone(),
                offset: r.offset,
                source,
            })?;
        Ok(Bytes::from(buf))
    }

    /// Up to `max` unreleased records of `disk` with a sequence after `after`, in order.
    pub fn pending(&self, disk: DiskId, after: Seq, max: usize) -> Vec<RecordRef> {
        let Some(q) = self.records.get(&disk) else {
            return Vec::new();
        };
        let start = q.partition_point(|r| r.seq <= after);
        q.range(start..).take(max).copied().collect()
    }

    /// Disks with unreleased records or a known position.
    pub fn disks(&self) -> Vec<DiskId> {
        let mut d: Vec<DiskId> = self
            .records
            .keys()
            .chain(self.acked.keys())
            .chain(self.sizes.keys())
            .copied()
            .collect();
        d.sort_unstable();
        d.dedup();
        d
    }

    /// The newest position of `disk` the relay holds durably (spooled or
    /// already acked by the target).
    pub fn durable_position(&self, disk: DiskId) -> Option<Position> {
        let spooled = self
            .records
            .get(&disk)
            .and_then(|q| q.back())
            .map(RecordRef::position);
        spooled.max(self.acked.get(&disk).copied())
    }

    /// What the relay (re)starts `disk` from: its acked position and the
    /// frames still spooled, as [`RelayRestore::from_spool`] reads them.
    /// `generation` is the one of a disk the spool knows nothing about.
    pub fn restore(&self, disk: DiskId, generation: Generation) -> RelayRestore {
        let spooled = self
            .records
            .get(&disk)
            .and_then(|q| Some((q.front()?.position(), q.back()?.position())));
        RelayRestore::from_spool(
            disk,
            self.disk_size(disk).unwrap_or(0),
            self.acked_position(disk),
            spooled,
            generation,
        )
    }

    /// Whether the spool holds anything of `disk`: spooled frames, or an
    /// acked position past zero (a release of nothing records zero).
    pub fn holds(&self, disk: DiskId) -> bool {
        self.records.get(&disk).is_some_and(|q| !q.is_empty())
            || self.acked.get(&disk).is_some_and(|a| a.1 > Seq::ZERO)
    }

    /// Takes `position` as what the target acked of a disk the spool holds
    /// nothing of (learnt from the target's hello reply), persisted at once,
    /// so the stream continues after it. A disk the spool knows is left as it is.
    pub fn adopt_position(&mut self, disk: DiskId, position: Position) -> Result<(), SpoolError> {
        if self.holds(disk) {
            return Ok(());
        }
        self.acked.insert(disk, position);
        self.write_positions()
    }

    /// Records the size of `disk` (persisted at once when new or changed).
    pub fn register_disk(&mut self, disk: DiskId, size: u64) -> Result<(), SpoolError> {
        if self.sizes.get(&disk) == Some(&size) {
            return Ok(());
        }
        self.sizes.insert(disk, size);
        self.write_positions()
    }

    /// The size of `disk` as last announced by its agent.
    pub fn disk_size(&self, disk: DiskId) -> Option<u64> {
        self.sizes.get(&disk).copied()
    }

    /// The last position of `disk` the target acked.
    pub fn acked_position(&self, disk: DiskId) -> Option<Position> {
        self.acked.get(&disk).copied()
    }

    /// Payload bytes waiting for the target.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Number of frames of `disk` waiting for the target.
    pub fn pending_count(&self, disk: DiskId) -> usize {
        self.records.get(&disk).map_or(0, VecDeque::len)
    }

    /// The target acked `disk` up to `upto`: forget those records, persist the
    /// position, and delete segments that hold nothing live. Returns the
    /// payload bytes released.
    /// One sequence space runs across generations (the invariant `append`
    /// checks with [`seq_order`]), so `through` alone decides.
    pub fn release(&mut self, disk: DiskId, through: Seq) -> Result<u64, SpoolError> {
        let mut freed = 0u64;
        let mut emptied = false;
        let mut upto = self
            .acked
            .get(&disk)
            .copied()
            .unwrap_or((Generation(0), Seq::ZERO));
        if let Some(q) = self.records.get_mut(&disk) {
            while q.front().is_some_and(|r| r.seq <= through) {
                let Some(r) = q.pop_front() else { break };
                freed += u64::from(r.len);
                upto = upto.max(r.position());
                if let Some(seg) = self.segments.get_mut(&r.segment) {
                    seg.live = seg.live.saturating_sub(1);
                    emptied |= seg.live == 0;
                }
            }
        }
        self.live_bytes = self.live_bytes.saturating_sub(freed);
        let prev = self.acked.get(&disk).copied();
        if prev.is_none_or(|p| upto > p) {
            self.acked.insert(disk, upto);
        }
        if emptied {
            // Persist first: a deleted segment must never be the only record
            // of how far a disk got.
            self.write_positions()?;
            self.delete_empty_segments()?;
        }
        Ok(freed)
    }

    /// Persists the acked positions now (also done before deleting segments).
    pub fn write_positions(&self) -> Result<(), SpoolError> {
        let text = positions::render(&self.acked, &self.sizes);
        blockferry_durable::replace_file(&self.dir.join(POSITIONS), text.as_bytes(), None)?;
        Ok(())
    }

    fn delete_empty_segments(&mut self) -> Result<(), SpoolError> {
        let active = self.segments.last_key_value().map(|(id, _)| *id);
        let dead: Vec<u64> = self
            .segments
            .iter()
            .filter(|(id, s)| s.live == 0 && Some(**id) != active)
            .map(|(id, _)| *id)
            .collect();
        if dead.is_empty() {
            // The active segment alone holds nothing live: start over in it
            // rather than growing it forever.
            if let Some((_, seg)) = self.segments.last_key_value()
                && seg.live == 0
                && seg.len > 0
                && (seg.len >= self.opts.segment_bytes || self.starved)
            {
                self.starved = false;
                let next = active.unwrap_or(0) + 1;
                self.new_segment(next)?;
                return self.delete_empty_segments();
            }
            return Ok(());
        }
        for id in dead {
            if let Some(seg) = self.segments.remove(&id) {
                fs::remove_file(&seg.path).map_err(|source| SpoolError::Io {
                    action: "delete",
                    path: seg.path.clone(),
                    offset: 0,
                    source,
                })?;
            }
        }
        blockferry_durable::sync_dir(&self.dir)?;
        Ok(())
    }

    /// Drops everything the spool holds of `disk` — frames not yet delivered,
    /// the acked position and the size — so that the disk starts afresh: after
    /// a failover, the stream of the promoted copy runs in a new lineage with
    /// a new count, and the frames of the fenced source must never reach the
    /// new replica. Durable when it returns: the dead position is written
    /// before anything is dropped, so a crash leaves the disk forgotten or
    /// untouched, never half.
    pub fn forget(&mut self, disk: DiskId) -> Result<Forgotten, SpoolError> {
        let records = self.records.remove(&disk).unwrap_or_default();
        let newest = records
            .back()
            .map(RecordRef::position)
            .max(self.acked.get(&disk).copied())
            .max(self.forgotten.get(&disk).copied());
        let out = Forgotten {
            frames: records.len() as u64,
            bytes: records.iter().map(|r| u64::from(r.len)).sum(),
            through: newest,
        };
        if let Some(dead) = newest {
            self.forgotten.insert(disk, dead);
            let text = positions::render_forgotten(&self.forgotten);
            blockferry_durable::replace_file(&self.dir.join(FORGOTTEN), text.as_bytes(), None)?;
        }
        for r in &records {
            if let Some(seg) = self.segments.get_mut(&r.segment) {
                seg.live = seg.live.saturating_sub(1);
            }
        }
        self.live_bytes = self.live_bytes.saturating_sub(out.bytes);
        self.acked.remove(&disk);
        self.sizes.remove(&disk);
        self.write_positions()?;
        self.delete_empty_segments()?;
        Ok(out)
    }

    /// Bytes of segment files on disk.
    pub fn file_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.len).sum()
    }
}
