//! The sans-IO heart of the tracker: turns kernel events into per-device dirty
//! extents, coalesced notices and resync signals. No I/O, no kernel: every rule
//! of "no lost write" on the user-space side is tested here in memory.

use std::collections::BTreeMap;
use std::ops::Range;

use blockferry_proto::extent::ExtentSet;

use super::abi::{MAX_RANGES, Op, Phase, RawEvent};
use super::{DeviceInfo, KernelDev};

/// Handle of a protected device inside one tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u32);

/// What the tracker tells its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Bytes `offset..offset+len` of the device were submitted for writing
    /// (coalesced with neighbours of the same op between two barriers).
    Extent {
        device: DeviceId,
        offset: u64,
        len: u64,
        op: Op,
    },
    /// An ordering barrier (PREFLUSH / flush) was submitted to the device.
    Flush { device: DeviceId },
    /// Tracking was lost (ring buffer full: `dropped` events in total so far):
    /// the whole device has been marked dirty and must be resynchronised.
    Resync { device: DeviceId, dropped: u64 },
}

#[derive(Debug)]
struct DevState {
    info: DeviceInfo,
    /// Every range written (submitted or completed) and not yet taken.
    dirty: ExtentSet,
    /// Bytes submitted minus bytes completed: a hint that completions are pending.
    in_flight: u64,
    drops_seen: u64,
    needs_resync: bool,
}

/// Per-device dirty maps fed by [`RawEvent`]s.
#[derive(Debug, Default)]
pub struct TrackerCore {
    devices: BTreeMap<DeviceId, DevState>,
    next_id: u32,
    /// Submissions of the current batch not yet emitted, per device and op.
    pending: BTreeMap<(DeviceId, Op), ExtentSet>,
    /// Events that matched no protected device (late events after unprotect).
    pub unmatched: u64,
}

impl TrackerCore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts tracking a device. Returns its id and the sector ranges the kernel
    /// filter of its disk must now hold.
    pub fn add(&mut self, info: DeviceInfo) -> DeviceId {
        let id = DeviceId(self.next_id);
        self.next_id += 1;
        self.devices.insert(
            id,
            DevState {
                info,
                dirty: ExtentSet::new(),
                in_flight: 0,
                drops_seen: 0,
                needs_resync: false,
            },
        );
        id
    }

    pub fn remove(&mut self, id: DeviceId) -> Option<DeviceInfo> {
        self.pending.retain(|(d, _), _| *d != id);
        self.devices.remove(&id).map(|s| s.info)
    }

    pub fn info(&self, id: DeviceId) -> Option<&DeviceInfo> {
        self.devices.get(&id).map(|s| &s.info)
    }

    pub fn ids(&self) -> impl Iterator<Item = DeviceId> + '_ {
        self.devices.keys().copied()
    }

    /// The kernel filter for `disk`: the sector ranges of every protected device on
    /// it, merged, at most `MAX_RANGES` (beyond that the disk is filtered whole,
    /// which over-reports but never loses a write).
    pub fn filter_for(&self, disk: KernelDev) -> Vec<Range<u64>> {
        let set: ExtentSet = self
            .devices
            .values()
            .filter(|s| s.info.disk == disk)
            .map(|s| s.info.sector_range())
            .collect();
        if set.len() > MAX_RANGES as usize {
            return std::iter::once(0..u64::MAX).collect();
        }
        set.iter().collect()
    }

    /// Feeds one kernel event.
    pub fn handle_event(&mut self, ev: &RawEvent, out: &mut Vec<Notice>) {
        let ev_start = ev.sector;
        let ev_end = ev.sector.saturating_add(u64::from(ev.bytes).div_ceil(512));
        let mut matched = false;
        for (&id, st) in self.devices.iter_mut() {
            if st.info.disk != ev.disk {
                continue;
            }
            let r = st.info.sector_range();
            if ev.op == Op::Flush {
                matched = true;
                // A barrier orders everything submitted before it: emit those first.
                for op in [Op::Write, Op::WriteZeroes, Op::Discard, Op::SecureErase] {
                    if let Some(set) = self.pending.remove(&(id, op)) {
                        emit(id, op, &set, out);
                    }
                }
                out.push(Notice::Flush { device: id });
                continue;
            }
            let (s, e) = (ev_start.max(r.start), ev_end.min(r.end));
            if s >= e {
                continue;
            }
            matched = true;
            let base = r.start;
            // Byte range inside the device; an event shorter than its last sector
            // (never seen, bios are sector multiples) still covers the sector.
            let off = (s - base) * 512;
            let end = ((e - base) * 512).min(st.info.size_bytes());
            let range = off..end;
            st.dirty.insert(range.clone());
            let len = end - off;
            match ev.phase {
                Phase::Submit => {
                    st.in_flight = st.in_flight.saturating_add(len);
                    self.pending.entry((id, ev.op)).or_default().insert(range);
                }
                Phase::Complete => st.in_flight = st.in_flight.saturating_sub(len),
            }
        }
        if !matched {
            self.unmatched += 1;
        }
    }

    /// Emits the coalesced submissions of the batch.
    pub fn end_batch(&mut self, out: &mut Vec<Notice>) {
        for ((id, op), set) in std::mem::take(&mut self.pending) {
            emit(id, op, &set, out);
        }
    }

    /// Feeds the kernel's drop counter of `disk` (total failed reserves). Any
    /// increase loses tracking of unknown ranges: mark every device of the disk
    /// wholly dirty and say so.
    pub fn handle_drops(&mut self, disk: KernelDev, total: u64, out: &mut Vec<Notice>) {
        for (&id, st) in self.devices.iter_mut() {
            if st.info.disk != disk || total <= st.drops_seen {
                continue;
            }
            tracing::error!(
                device = %st.info.path.display(),
                dropped = total - st.drops_seen,
                "ring buffer overflow lost change events: the whole device is marked for resync"
            );
            st.drops_seen = total;
            st.needs_resync = true;
            st.dirty.insert(0..st.info.size_bytes());
            out.push(Notice::Resync {
                device: id,
                dropped: total,
            });
        }
    }

    /// Feeds the device's current geometry. A grow in place marks the added
    /// range dirty. Any other change (a shrink, a partition moved)
    /// invalidates what was tracked for the old geometry: the device is marked
    /// wholly dirty at its new size and a resync is signalled. Returns whether
    /// it changed (the caller then updates the kernel filter).
    pub fn handle_geometry(
        &mut self,
        id: DeviceId,
        now: &DeviceInfo,
        out: &mut Vec<Notice>,
    ) -> bool {
        let Some(st) = self.devices.get_mut(&id) else {
            return false;
        };
        if (st.info.disk, st.info.start_sector, st.info.sectors)
            == (now.disk, now.start_sector, now.sectors)
        {
            return false;
        }
        let grown = (st.info.disk, st.info.start_sector) == (now.disk, now.start_sector)
            && now.sectors > st.info.sectors;
        let old_bytes = st.info.size_bytes();
        st.info.disk = now.disk;
        st.info.start_sector = now.start_sector;
        st.info.sectors = now.sectors;
        if grown {
            // The old range was filtered all along; only the new one may hold
            // writes the kernel filter did not cover yet.
            tracing::warn!(
                device = %st.info.path.display(),
                old_bytes,
                new_bytes = st.info.size_bytes(),
                "device grew: the added range is marked dirty"
            );
            st.dirty.insert(old_bytes..st.info.size_bytes());
        } else {
            tracing::error!(
                device = %st.info.path.display(),
                old_bytes,
                new_bytes = st.info.size_bytes(),
                "device geometry changed: the whole device is marked for resync"
            );
            st.needs_resync = true;
            st.dirty.clear();
            st.dirty.insert(0..st.info.size_bytes());
        }
        out.push(Notice::Resync {
            device: id,
            dropped: st.drops_seen,
        });
        true
    }

    /// The dirty set of a device (everything written and not yet taken).
    pub fn dirty(&self, id: DeviceId) -> Option<&ExtentSet> {
        self.devices.get(&id).map(|s| &s.dirty)
    }

    /// Removes and returns up to `max_bytes` of dirty ranges. A range returned
    /// here comes back if a write to it completes later.
    pub fn take_dirty(&mut self, id: DeviceId, max_bytes: u64) -> Vec<Range<u64>> {
        self.devices
            .get_mut(&id)
            .map(|s| s.dirty.take(max_bytes))
            .unwrap_or_default()
    }

    /// Marks a range dirty again (for example, a read of it failed).
    pub fn mark_dirty(&mut self, id: DeviceId, range: Range<u64>) {
        if let Some(s) = self.devices.get_mut(&id) {
            s.dirty.insert(range);
        }
    }

    /// Bytes submitted whose completion has not been seen yet (a hint: requests
    /// split and merge, so it is approximate, but 0 only when nothing is known
    /// to be in flight).
    pub fn in_flight_bytes(&self, id: DeviceId) -> u64 {
        self.devices.get(&id).map_or(0, |s| s.in_flight)
    }

    /// Whether tracking was lost since the last [`clear_resync`](Self::clear_resync).
    pub fn needs_resync(&self, id: DeviceId) -> bool {
        self.devices.get(&id).is_some_and(|s| s.needs_resync)
    }

    pub fn clear_resync(&mut self, id: DeviceId) {
        if let Some(s) = self.devices.get_mut(&id) {
            s.needs_resync = false;
        }
    }
}

fn emit(device: DeviceId, op: Op, set: &ExtentSet, out: &mut Vec<Notice>) {
    for r in set.iter() {
        out.push(Notice::Extent {
            device,
            offset: r.start,
            len: r.end - r.start,
            op,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn disk(sectors: u64) -> DeviceInfo {
        let d = KernelDev::new(7, 3);
        DeviceInfo {
            path: PathBuf::from("/dev/loop3"),
            dev: d,
            disk: d,
            start_sector: 0,
            sectors,
        }
    }

    fn part(start: u64, sectors: u64) -> DeviceInfo {
        DeviceInfo {
            path: PathBuf::from("/dev/loop3p1"),
            dev: KernelDev::new(259, 0),
            disk: KernelDev::new(7, 3),
            start_sector: start,
            sectors,
        }
    }

    fn ev(sector: u64, bytes: u32, op: Op, phase: Phase) -> RawEvent {
        RawEvent {
            disk: KernelDev::new(7, 3),
            sector,
            bytes,
            op,
            phase,
            preflush: false,
            fua: false,
        }
    }

    #[test]
    fn submissions_coalesce_within_a_batch() {
        let mut c = TrackerCore::new();
        let id = c.add(disk(1 << 20));
        let mut out = Vec::new();
        c.handle_event(&ev(8, 4096, Op::Write, Phase::Submit), &mut out);
        c.handle_event(&ev(16, 4096, Op::Write, Phase::Submit), &mut out);
        c.handle_event(&ev(100, 512, Op::Discard, Phase::Submit), &mut out);
        c.end_batch(&mut out);
        assert_eq!(
            out,
            vec![
                Notice::Extent {
                    device: id,
                    offset: 4096,
                    len: 8192,
                    op: Op::Write
                },
                Notice::Extent {
                    device: id,
                    offset: 51200,
                    len: 512,
                    op: Op::Discard
                },
            ]
        );
    }

    #[test]
    fn a_flush_emits_what_came_before_it_first() {
        let mut c = TrackerCore::new();
        let id = c.add(disk(1 << 20));
        let mut out = Vec::new();
        c.handle_event(&ev(0, 4096, Op::Write, Phase::Submit), &mut out);
        c.handle_event(&ev(0, 0, Op::Flush, Phase::Submit), &mut out);
        c.handle_event(&ev(8, 4096, Op::Write, Phase::Submit), &mut out);
        c.end_batch(&mut out);
        assert_eq!(
            out,
            vec![
                Notice::Extent {
                    device: id,
                    offset: 0,
                    len: 4096,
                    op: Op::Write
                },
                Notice::Flush { device: id },
                Notice::Extent {
                    device: id,
                    offset: 4096,
                    len: 4096,
                    op: Op::Write
                },
            ]
        );
    }

    /// The reader takes a range while its write is in flight; the completion
    /// must make it dirty again, or the replica keeps the old data.
    #[test]
    fn completion_after_take_marks_dirty_again() {
        let mut c = TrackerCore::new();
        let id = c.add(disk(1 << 20));
        let mut out = Vec::new();
        c.handle_event(&ev(8, 4096, Op::Write, Phase::Submit), &mut out);
        assert_eq!(c.in_flight_bytes(id), 4096);
        assert_eq!(c.take_dirty(id, u64::MAX), vec![4096..8192]);
        assert!(c.dirty(id).unwrap().is_empty());
        c.handle_event(&ev(8, 4096, Op::Write, Phase::Complete), &mut out);
        assert_eq!(c.take_dirty(id, u64::MAX), vec![4096..8192]);
        assert_eq!(c.in_flight_bytes(id), 0);
    }

    #[test]
    fn partition_events_are_clipped_and_relative() {
        let mut c = TrackerCore::new();
        let id = c.add(part(2048, 4096));
        assert_eq!(c.filter_for(KernelDev::new(7, 3)), vec![2048..6144]);
        let mut out = Vec::new();
        // Straddles the partition start: only the part inside counts.
        c.handle_event(&ev(2040, 8192, Op::Write, Phase::Submit), &mut out);
        // Entirely outside.
        c.handle_event(&ev(6144, 4096, Op::Write, Phase::Submit), &mut out);
        c.end_batch(&mut out);
        assert_eq!(
            out,
            vec![Notice::Extent {
                device: id,
                offset: 0,
                len: 4096,
                op: Op::Write
            }]
        );
        assert_eq!(c.unmatched, 1);
    }

    #[test]
    fn drops_mark_the_whole_device_once_per_increase() {
        let mut c = TrackerCore::new();
        let id = c.add(disk(2048));
        let mut out = Vec::new();
        c.handle_drops(KernelDev::new(7, 3), 0, &mut out);
        assert!(out.is_empty());
        c.handle_drops(KernelDev::new(7, 3), 3, &mut out);
        c.handle_drops(KernelDev::new(7, 3), 3, &mut out);
        assert_eq!(
            out,
            vec![Notice::Resync {
                device: id,
                dropped: 3
            }]
        );
        assert!(c.needs_resync(id));
        assert_eq!(
            c.dirty(id).unwrap().iter().collect::<Vec<_>>(),
            vec![0..2048 * 512]
        );
    }

    #[test]
    fn a_grow_marks_the_added_range_dirty_once() {
        let mut c = TrackerCore::new();
        let id = c.add(disk(2048));
        let mut out = Vec::new();
        assert!(!c.handle_geometry(id, &disk(2048), &mut out));
        assert!(c.handle_geometry(id, &disk(4096), &mut out));
        assert!(!c.handle_geometry(id, &disk(4096), &mut out));
        assert_eq!(
            out,
            vec![Notice::Resync {
                device: id,
                dropped: 0
            }]
        );
        assert_eq!(
            c.dirty(id).unwrap().iter().collect::<Vec<_>>(),
            vec![2048 * 512..4096 * 512]
        );
        assert!(!c.needs_resync(id));
        assert_eq!(c.filter_for(KernelDev::new(7, 3)), vec![0..4096]);
        // Shrinking cannot be trusted to the old dirty map: all of it.
        assert!(c.handle_geometry(id, &disk(1024), &mut out));
        assert_eq!(
            c.dirty(id).unwrap().iter().collect::<Vec<_>>(),
            vec![0..1024 * 512]
        );
        assert!(c.needs_resync(id));
    }

    #[test]
    fn too_many_ranges_filter_the_whole_disk() {
        let mut c = TrackerCore::new();
        for i in 0..=MAX_RANGES {
            c.add(part(i * 100, 10));
        }
        assert_eq!(c.filter_for(KernelDev::new(7, 3)), vec![0..u64::MAX]);
    }
}
