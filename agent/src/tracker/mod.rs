//! The change tracker: which byte ranges of the protected devices were written.
//!
//! Kernel programs (`ebpf/tracker.bpf.c`) see every bio at submission and every
//! write at completion and push both into a ring buffer; [`Tracker`] drains it
//! into per-device dirty sets ([`ExtentSet`]) and a stream of coalesced
//! [`Notice`]s. The reader takes ranges with [`Tracker::take_dirty`]: a range
//! read while a write to it was still in flight comes back dirty when the write
//! completes, so nothing written is lost (DESIGN invariant 1). Lost events
//! (ring buffer full) become [`Notice::Resync`] and a wholly dirty device.
//!
//! The kernel sits behind [`EventSource`] (`sys::BpfSource` for real,
//! [`MemorySource`] in memory), so the logic in `core` runs without root.
//!
//! Protect before the initial read: writes submitted before `protect` returns
//! are not seen, the initial full read covers them.
//!
//! [`Tracker::load`] ties the programs to this process (the `track`
//! diagnostic, tests); [`Tracker::load_persistent`] pins them in bpffs so the
//! kernel keeps tracking while no agent runs, and the next process resumes
//! the same ring buffer (`pin`, [`Continuity`], [`Tracker::continuous`]).
//!
//! The kernel wakes the agent only when its ring buffer fills up, and
//! [`Tracker::next`] drains it every 10 ms (`BF_POLL_MS`) otherwise: the dirty
//! sets lag the kernel by up to that. Code that must account for every write
//! made so far (a final drain, a test, a status snapshot after writes) calls
//! [`Tracker::poll_now`] first.

pub mod abi;
mod core;
mod device;
mod pin;
mod report;
mod ring;
mod sys;

use std::collections::{HashMap as StdHashMap, HashSet, VecDeque};
use std::future::Future;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub use abi::{Op, Phase, RawEvent};
pub use blockferry_proto::extent::ExtentSet;
pub use core::{DeviceId, Notice, TrackerCore};
pub use device::{DeviceInfo, KernelDev};
pub use pin::{Continuity, DEFAULT_PIN_DIR};
pub use report::{ProbeReport, notice_json, notice_text, probe};
pub use sys::{BpfSource, Hook, check_prerequisites};

/// Errors of the tracker. Messages say what to do where a person can act.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("{}: {what}", path.display())]
    Device {
        path: PathBuf,
        what: String,
        source: Option<std::io::Error>,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Privilege(String),
    #[error("{what}")]
    Kernel {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("device {0:?} is not protected by this tracker")]
    UnknownDevice(DeviceId),
}

/// A disk and the sector ranges the kernel reports of it.
pub type DiskFilter = (KernelDev, Vec<Range<u64>>);

/// Where kernel events come from: the seam between the tracker logic and the kernel.
pub trait EventSource {
    /// Sets the sector ranges (absolute, on the whole disk) of `disk` that the
    /// kernel reports; empty stops reporting the disk.
    fn set_filter(&mut self, disk: KernelDev, sectors: &[Range<u64>]) -> Result<(), TrackerError>;
    /// Events lost for `disk` so far (never decreases).
    fn drop_count(&self, disk: KernelDev) -> Result<u64, TrackerError>;
    /// The drop count an earlier consumer of the same (pinned) kernel state
    /// already accounted for; drops above it are news. A source that does not
    /// outlive its process has no earlier consumer: the current count.
    fn drop_baseline(&mut self, disk: KernelDev) -> Result<u64, TrackerError> {
        self.drop_count(disk)
    }
    /// Records that drops up to `total` were reported, for the next consumer.
    fn acknowledge_drops(&mut self, disk: KernelDev, total: u64) -> Result<(), TrackerError> {
        let _ = (disk, total);
        Ok(())
    }
    /// The filters in force now (set by this or an earlier consumer).
    fn filters(&self) -> Result<Vec<DiskFilter>, TrackerError> {
        Ok(Vec::new())
    }
    /// Waits until events may be available.
    fn readable(&mut self) -> impl Future<Output = Result<(), TrackerError>> + Send;
    /// Moves every available event into `out`, without waiting.
    fn drain(&mut self, out: &mut Vec<RawEvent>) -> Result<(), TrackerError>;
    /// The device's current geometry, to notice a resize (`None`: unknown).
    fn geometry(&self, info: &DeviceInfo) -> Option<DeviceInfo> {
        let _ = info;
        None
    }
}

/// An in-memory event source for tests of code built on the tracker.
#[derive(Debug, Default)]
pub struct MemorySource {
    /// Events `drain` hands out next.
    pub queue: VecDeque<RawEvent>,
    /// Drop counters per disk.
    pub drops: std::collections::HashMap<KernelDev, u64>,
    /// Current geometry per device (`DeviceInfo::dev`), for resize tests.
    pub geometry: std::collections::HashMap<KernelDev, DeviceInfo>,
    /// The filters last set, per disk.
    pub filters: std::collections::HashMap<KernelDev, Vec<Range<u64>>>,
    /// Drops acknowledged per disk (what a pinned `bf_seen` holds).
    pub acknowledged: std::collections::HashMap<KernelDev, u64>,
}

impl EventSource for MemorySource {
    fn set_filter(&mut self, disk: KernelDev, sectors: &[Range<u64>]) -> Result<(), TrackerError> {
        if sectors.is_empty() {
            self.filters.remove(&disk);
        } else {
            self.filters.insert(disk, sectors.to_vec());
        }
        Ok(())
    }

    fn drop_count(&self, disk: KernelDev) -> Result<u64, TrackerError> {
        Ok(self.drops.get(&disk).copied().unwrap_or(0))
    }

    fn drop_baseline(&mut self, disk: KernelDev) -> Result<u64, TrackerError> {
        Ok(self.acknowledged.get(&disk).copied().unwrap_or(0))
    }

    fn acknowledge_drops(&mut self, disk: KernelDev, total: u64) -> Result<(), TrackerError> {
        self.acknowledged.insert(disk, total);
        Ok(())
    }

    fn filters(&self) -> Result<Vec<DiskFilter>, TrackerError> {
        Ok(self.filters.iter().map(|(d, r)| (*d, r.clone())).collect())
    }

    async fn readable(&mut self) -> Result<(), TrackerError> {
        if self.queue.is_empty() {
            // Nothing will ever arrive: behave like a quiet kernel.
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    fn drain(&mut self, out: &mut Vec<RawEvent>) -> Result<(), TrackerError> {
        out.extend(self.queue.drain(..));
        Ok(())
    }

    fn geometry(&self, info: &DeviceInfo) -> Option<DeviceInfo> {
        self.geometry.get(&info.dev).cloned()
    }
}

/// The tracker: protected devices, their dirty sets, and the event stream.
#[derive(Debug)]
pub struct Tracker<S: EventSource = BpfSource> {
    source: S,
    core: TrackerCore,
    buf: Vec<RawEvent>,
    events_seen: u64,
    last_geometry_check: std::time::Instant,
    /// Resumed from kernel state an earlier process left (pins).
    resumed: bool,
    /// Sector ranges the kernel filtered for an earlier process and this one
    /// has not yet claimed (protect) or released (unprotect, `forget_inherited`):
    /// kept in the filter so no write falls into a gap between processes.
    inherited: StdHashMap<KernelDev, ExtentSet>,
    /// Devices whose whole range was tracked by the kernel before this process.
    carried: HashSet<DeviceId>,
    /// Drop counts acknowledged to the source, per disk.
    acked: StdHashMap<KernelDev, u64>,
}

/// How often `poll_now` looks for resized devices.
const GEOMETRY_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

impl Tracker<BpfSource> {
    /// Loads and attaches the kernel programs (needs root).
    pub fn load() -> Result<Self, TrackerError> {
        Ok(Tracker::with_source(BpfSource::load()?))
    }

    /// Loads with a ring buffer of `bytes` (power of two, at least a page).
    pub fn load_with_ring_bytes(bytes: u32) -> Result<Self, TrackerError> {
        Ok(Tracker::with_source(BpfSource::load_with_ring_bytes(
            bytes,
        )?))
    }
}

impl<S: EventSource> Tracker<S> {
    pub fn with_source(source: S) -> Self {
        Tracker {
            source,
            core: TrackerCore::new(),
            buf: Vec::with_capacity(4096),
            events_seen: 0,
            last_geometry_check: std::time::Instant::now(),
            resumed: false,
            inherited: StdHashMap::new(),
            carried: HashSet::new(),
            acked: StdHashMap::new(),
        }
    }

    /// A tracker continuing where an earlier consumer of `source` stopped: the
    /// kernel state (filters, drop accounting, unread events) outlived it.
    /// Protect every device before the first poll: events of devices not
    /// protected yet are discarded.
    pub fn resume(source: S) -> Result<Self, TrackerError> {
        let mut inherited = StdHashMap::new();
        for (disk, ranges) in source.filters()? {
            let set: ExtentSet = ranges.into_iter().collect();
            inherited.insert(disk, set);
        }
        let mut t = Tracker::with_source(source);
        t.resumed = true;
        t.inherited = inherited;
        Ok(t)
    }

    /// Whether the kernel tracked this device without a gap since an earlier
    /// process protected it: resumed from pins, its whole current range was in
    /// the inherited filter, and no drop was seen since. Call after protecting
    /// every device and one [`poll_now`](Self::poll_now) (which reports drops
    /// made while no agent ran). `false`: resync the device.
    pub fn continuous(&self, id: DeviceId) -> bool {
        self.carried.contains(&id) && !self.core.needs_resync(id)
    }

    /// Whether this tracker resumed kernel state left by an earlier process.
    pub fn is_resumed(&self) -> bool {
        self.resumed
    }

    /// Stops filtering what an earlier process protected and this one did not
    /// (call once every configured device is protected).
    pub fn forget_inherited(&mut self) -> Result<(), TrackerError> {
        let disks: Vec<KernelDev> = self.inherited.drain().map(|(d, _)| d).collect();
        for disk in disks {
            let filter = self.filter_for(disk);
            self.source.set_filter(disk, &filter)?;
        }
        Ok(())
    }

    /// The kernel filter of `disk`: this process's devices plus what it inherited.
    fn filter_for(&self, disk: KernelDev) -> Vec<Range<u64>> {
        let mut set: ExtentSet = self.core.filter_for(disk).into_iter().collect();
        if let Some(old) = self.inherited.get(&disk) {
            set.extend_from(old);
        }
        if set.len() > abi::MAX_RANGES as usize {
            return std::iter::once(0..u64::MAX).collect();
        }
        set.iter().collect()
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// Starts tracking a block device given by path (a whole disk or a partition).
    pub fn protect(&mut self, path: impl AsRef<Path>) -> Result<DeviceId, TrackerError> {
        self.protect_device(DeviceInfo::resolve(path.as_ref())?)
    }

    /// Starts tracking a device already resolved.
    pub fn protect_device(&mut self, info: DeviceInfo) -> Result<DeviceId, TrackerError> {
        let disk = info.disk;
        let path = info.path.clone();
        let range = info.sector_range();
        let carried = self.resumed
            && self
                .inherited
                .get(&disk)
                .is_some_and(|s| s.contains(range.clone()));
        // A carried device's drops since the last acknowledgement happened
        // while no agent ran: they are news, reported by the next poll.
        let drops_before = if carried {
            self.source.drop_baseline(disk)?
        } else {
            let n = self.source.drop_count(disk)?;
            // Recorded before the filter lets events through, so the next
            // process knows which drops this one never reported.
            self.source.acknowledge_drops(disk, n)?;
            self.acked.insert(disk, n);
            n
        };
        let id = self.core.add(info);
        // Old drops of this disk (another device of it protected earlier) are not news.
        self.core.handle_drops(disk, drops_before, &mut Vec::new());
        self.core.clear_resync(id);
        if let Some(dirty) = self.core.dirty(id)
            && !dirty.is_empty()
        {
            self.core.take_dirty(id, u64::MAX);
        }
        if let Err(e) = self.source.set_filter(disk, &self.filter_for(disk)) {
            self.core.remove(id);
            return Err(e);
        }
        if carried {
            self.carried.insert(id);
        }
        tracing::info!(device = %path.display(), %disk, carried, "protecting");
        Ok(id)
    }

    /// Stops tracking a device; its dirty set is returned, not lost.
    pub fn unprotect(&mut self, id: DeviceId) -> Result<ExtentSet, TrackerError> {
        let dirty = self
            .core
            .dirty(id)
            .cloned()
            .ok_or(TrackerError::UnknownDevice(id))?;
        let info = self
            .core
            .remove(id)
            .ok_or(TrackerError::UnknownDevice(id))?;
        self.carried.remove(&id);
        if let Some(old) = self.inherited.get_mut(&info.disk) {
            old.remove(info.sector_range());
            if old.is_empty() {
                self.inherited.remove(&info.disk);
            }
        }
        self.source
            .set_filter(info.disk, &self.filter_for(info.disk))?;
        tracing::info!(device = %info.path.display(), "unprotected");
        Ok(dirty)
    }

    pub fn device(&self, id: DeviceId) -> Option<&DeviceInfo> {
        self.core.info(id)
    }

    pub fn devices(&self) -> impl Iterator<Item = (DeviceId, &DeviceInfo)> + '_ {
        self.core
            .ids()
            .filter_map(|id| Some((id, self.core.info(id)?)))
    }

    /// Processes every event available now, without waiting.
    pub fn poll_now(&mut self) -> Result<Vec<Notice>, TrackerError> {
        let mut out = Vec::new();
        self.buf.clear();
        self.source.drain(&mut self.buf)?;
        self.events_seen += self.buf.len() as u64;
        for ev in &self.buf {
            self.core.handle_event(ev, &mut out);
        }
        self.core.end_batch(&mut out);
        let mut disks: Vec<KernelDev> = self.devices().map(|(_, i)| i.disk).collect();
        disks.dedup();
        for disk in disks {
            let n = self.source.drop_count(disk)?;
            self.core.handle_drops(disk, n, &mut out);
            if self.acked.get(&disk) != Some(&n) {
                self.source.acknowledge_drops(disk, n)?;
                self.acked.insert(disk, n);
            }
        }
        if self.last_geometry_check.elapsed() >= GEOMETRY_CHECK {
            out.extend(self.check_geometry()?);
        }
        Ok(out)
    }

    /// Looks for devices whose size (or partition start) changed: each becomes
    /// a resync of the whole device at its new size. `poll_now` does this once
    /// a second.
    pub fn check_geometry(&mut self) -> Result<Vec<Notice>, TrackerError> {
        self.last_geometry_check = std::time::Instant::now();
        let mut out = Vec::new();
        let ids: Vec<DeviceId> = self.core.ids().collect();
        for id in ids {
            let Some(now) = self
                .core
                .info(id)
                .and_then(|info| self.source.geometry(info))
            else {
                continue;
            };
            let old_disk = self.core.info(id).map(|i| i.disk);
            if self.core.handle_geometry(id, &now, &mut out) {
                if let Some(old) = old_disk.filter(|d| *d != now.disk) {
                    let filter = self.filter_for(old);
                    self.source.set_filter(old, &filter)?;
                }
                let filter = self.filter_for(now.disk);
                self.source.set_filter(now.disk, &filter)?;
            }
        }
        Ok(out)
    }

    /// Waits for events and processes them. Returns after any batch, even one
    /// that only re-dirtied ranges (completions): the caller should then look
    /// at [`take_dirty`](Self::take_dirty) again.
    pub async fn next(&mut self) -> Result<Vec<Notice>, TrackerError> {
        loop {
            self.source.readable().await?;
            let before = self.events_seen;
            let notices = self.poll_now()?;
            if !notices.is_empty() || self.events_seen != before {
                return Ok(notices);
            }
        }
    }

    /// The tracker as a stream of notices (errors end it).
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Notice, TrackerError>> {
        futures::stream::unfold((self, VecDeque::new()), |(mut t, mut q)| async move {
            loop {
                if let Some(n) = q.pop_front() {
                    return Some((Ok(n), (t, q)));
                }
                match t.next().await {
                    Ok(ns) => q.extend(ns),
                    Err(e) => return Some((Err(e), (t, q))),
                }
            }
        })
    }

    /// The dirty set of a device.
    pub fn dirty(&self, id: DeviceId) -> Option<&ExtentSet> {
        self.core.dirty(id)
    }

    /// Removes and returns up to `max_bytes` of the lowest dirty ranges.
    pub fn take_dirty(&mut self, id: DeviceId, max_bytes: u64) -> Vec<Range<u64>> {
        self.core.take_dirty(id, max_bytes)
    }

    /// Puts a range back (for example after a failed read).
    pub fn mark_dirty(&mut self, id: DeviceId, range: Range<u64>) {
        self.core.mark_dirty(id, range)
    }

    /// Bytes submitted to the device whose completion has not been seen (a hint).
    pub fn in_flight_bytes(&self, id: DeviceId) -> u64 {
        self.core.in_flight_bytes(id)
    }

    /// Whether tracking of the device was lost (until [`clear_resync`](Self::clear_resync)).
    pub fn needs_resync(&self, id: DeviceId) -> bool {
        self.core.needs_resync(id)
    }

    pub fn clear_resync(&mut self, id: DeviceId) {
        self.core.clear_resync(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn disk() -> DeviceInfo {
        let d = KernelDev::new(7, 3);
        DeviceInfo {
            path: "/dev/loop3".into(),
            dev: d,
            disk: d,
            start_sector: 0,
            sectors: 2048,
        }
    }

    fn write(sector: u64, bytes: u32, phase: Phase) -> RawEvent {
        RawEvent {
            disk: KernelDev::new(7, 3),
            sector,
            bytes,
            op: Op::Write,
            phase,
            preflush: false,
            fua: false,
        }
    }

    #[tokio::test]
    async fn stream_yields_coalesced_extents_and_resync() {
        let mut t = Tracker::with_source(MemorySource::default());
        let id = t.protect_device(disk()).unwrap();
        assert_eq!(t.source().filters[&KernelDev::new(7, 3)], vec![0..2048]);
        t.source_mut()
            .queue
            .extend([write(0, 4096, Phase::Submit), write(8, 4096, Phase::Submit)]);
        t.source_mut().drops.insert(KernelDev::new(7, 3), 2);
        let mut s = Box::pin(t.into_stream());
        assert_eq!(
            s.next().await.unwrap().unwrap(),
            Notice::Extent {
                device: id,
                offset: 0,
                len: 8192,
                op: Op::Write
            }
        );
        assert_eq!(
            s.next().await.unwrap().unwrap(),
            Notice::Resync {
                device: id,
                dropped: 2
            }
        );
    }

    #[test]
    fn a_grown_device_is_signalled_and_refiltered() {
        let mut t = Tracker::with_source(MemorySource::default());
        let id = t.protect_device(disk()).unwrap();
        let mut bigger = disk();
        bigger.sectors = 4096;
        t.source_mut().geometry.insert(KernelDev::new(7, 3), bigger);
        assert_eq!(
            t.check_geometry().unwrap(),
            vec![Notice::Resync {
                device: id,
                dropped: 0
            }]
        );
        assert_eq!(t.source().filters[&KernelDev::new(7, 3)], vec![0..4096]);
        assert_eq!(t.device(id).unwrap().sectors, 4096);
        // Grown in place: only the added range is dirty, no resync.
        assert!(!t.needs_resync(id));
    }

    #[test]
    fn drops_before_protect_are_not_a_resync() {
        let mut src = MemorySource::default();
        src.drops.insert(KernelDev::new(7, 3), 5);
        let mut t = Tracker::with_source(src);
        let id = t.protect_device(disk()).unwrap();
        assert!(t.poll_now().unwrap().is_empty());
        assert!(!t.needs_resync(id));
        assert!(t.dirty(id).unwrap().is_empty());
    }

    fn partition(n: u32, start: u64, sectors: u64) -> DeviceInfo {
        DeviceInfo {
            path: format!("/dev/loop3p{n}").into(),
            dev: KernelDev::new(7, 3 + n),
            disk: KernelDev::new(7, 3),
            start_sector: start,
            sectors,
        }
    }

    /// Kernel state an earlier process left: both partitions filtered.
    fn inherited_source() -> MemorySource {
        let mut src = MemorySource::default();
        src.filters
            .insert(KernelDev::new(7, 3), vec![100..200, 300..400]);
        src.acknowledged.insert(KernelDev::new(7, 3), 3);
        src.drops.insert(KernelDev::new(7, 3), 3);
        src
    }

    #[test]
    fn resuming_keeps_inherited_filters_until_released() {
        let mut t = Tracker::resume(inherited_source()).unwrap();
        let p1 = t.protect_device(partition(1, 100, 100)).unwrap();
        // The second partition, not protected yet, stays in the filter: no gap.
        assert_eq!(
            t.source().filters[&KernelDev::new(7, 3)],
            vec![100..200, 300..400]
        );
        t.poll_now().unwrap();
        assert!(t.continuous(p1));
        t.forget_inherited().unwrap();
        assert_eq!(t.source().filters[&KernelDev::new(7, 3)], vec![100..200]);
        t.unprotect(p1).unwrap();
        assert!(t.source().filters.is_empty());
    }

    #[test]
    fn unprotect_releases_the_inherited_range_too() {
        let mut t = Tracker::resume(inherited_source()).unwrap();
        let p2 = t.protect_device(partition(2, 300, 100)).unwrap();
        t.unprotect(p2).unwrap();
        assert_eq!(t.source().filters[&KernelDev::new(7, 3)], vec![100..200]);
    }

    #[test]
    fn a_device_outside_the_inherited_filter_is_not_continuous() {
        let mut t = Tracker::resume(inherited_source()).unwrap();
        // Grown while no agent ran: its new end was never filtered.
        let p1 = t.protect_device(partition(1, 100, 150)).unwrap();
        t.poll_now().unwrap();
        assert!(!t.continuous(p1));
        // A fresh tracker vouches for nothing.
        let mut f = Tracker::with_source(MemorySource::default());
        let id = f.protect_device(disk()).unwrap();
        f.poll_now().unwrap();
        assert!(!f.continuous(id));
    }

    #[test]
    fn drops_while_no_agent_ran_are_reported_once() {
        let mut src = inherited_source();
        src.drops.insert(KernelDev::new(7, 3), 5);
        let mut t = Tracker::resume(src).unwrap();
        let p1 = t.protect_device(partition(1, 100, 100)).unwrap();
        assert_eq!(
            t.poll_now().unwrap(),
            vec![Notice::Resync {
                device: p1,
                dropped: 5
            }]
        );
        assert!(!t.continuous(p1));
        assert_eq!(t.source().acknowledged[&KernelDev::new(7, 3)], 5);
        // The next process starts from the acknowledged count.
        let src = std::mem::take(t.source_mut());
        let mut next = Tracker::resume(src).unwrap();
        let p1 = next.protect_device(partition(1, 100, 100)).unwrap();
        assert!(next.poll_now().unwrap().is_empty());
        assert!(next.continuous(p1));
    }

    #[test]
    fn unprotect_returns_the_dirty_set_and_clears_the_filter() {
        let mut t = Tracker::with_source(MemorySource::default());
        let id = t.protect_device(disk()).unwrap();
        t.source_mut()
            .queue
            .push_back(write(8, 512, Phase::Complete));
        t.poll_now().unwrap();
        let dirty = t.unprotect(id).unwrap();
        assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![4096..4608]);
        assert!(t.source().filters.is_empty());
    }
}
