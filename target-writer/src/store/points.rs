//! Recovery points: barriers and scheduled points, retention and removal
//! (merging undo segments), pins that hold points still while an export
//! reads them, and the label text of the state file.

use std::fs::File;
use std::sync::Mutex;

use blockferry_proto::extent::ExtentSet;
use blockferry_proto::{Barrier, Consistency};
use tracing::{debug, info};

use crate::crashsafe::read_exact_at;
use crate::error::{Result, TargetError};
use crate::retention::{PointStamp, RetentionPolicy, retain};
use crate::segment;

use super::*;

/// The text of a recovery point's label, as the state file and the CLI show it.
pub fn label_name(label: Consistency) -> &'static str {
    match label {
        Consistency::NotConsistent => "not-consistent",
        Consistency::CrashConsistent => "crash-consistent",
        Consistency::AppConsistent => "app-consistent",
    }
}

/// The label named `text` by [`label_name`].
pub fn parse_label(text: &str) -> Option<Consistency> {
    [
        Consistency::NotConsistent,
        Consistency::CrashConsistent,
        Consistency::AppConsistent,
    ]
    .into_iter()
    .find(|&c| label_name(c) == text)
}

/// Serde of a point's label as its text, so state files keep their format.
pub(super) mod label_text {
    use blockferry_proto::Consistency;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(label: &Consistency, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(super::label_name(*label))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Consistency, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_label(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown label {text:?}")))
    }
}

impl DiskStore {
    /// Handles a barrier from the agent: a recovery point of the disk after
    /// every batch before the barrier's own sequence number, which it
    /// consumes. A replayed barrier changes nothing and returns its point
    /// (`None` if retention removed it since).
    ///
    /// The caller routes the barrier to the store of its disk (by its
    /// `disk` id); the store checks its place in the sequence. A barrier's
    /// time of 0 means "use the target's clock".
    pub fn barrier(&mut self, b: &Barrier, now_ms: u64) -> Result<Option<PointMeta>> {
        self.check_usable()?;
        let (generation, seq) = (b.generation.0, b.seq.0);
        let held = (self.state.generation, self.state.applied_seq);
        if !next_in_sequence(&self.state.disk, held, (generation, seq))? {
            return Ok(self
                .state
                .points
                .iter()
                .rev()
                .find(|p| p.generation == generation && p.marker_seq == seq)
                .cloned());
        }
        let time_ms = match b.timestamp_ns / 1_000_000 {
            0 => now_ms,
            t => t,
        };
        let p = self.new_point(b.consistency, time_ms, Some((generation, seq)))?;
        if self.record.role() == blockferry_proto::CopyRole::Seed {
            self.settle_record()?;
        }
        Ok(Some(p))
    }

    /// Creates a recovery point of the disk as it is now (the scheduler uses
    /// `NotConsistent`: nothing proves the write order at an arbitrary moment).
    pub fn create_point(&mut self, label: Consistency, now_ms: u64) -> Result<PointMeta> {
        self.new_point(label, now_ms, None)
    }

    /// Creates a point at the current data boundary; `marker` is the
    /// (generation, seq) of the barrier that asked for it, committed with it.
    pub(super) fn new_point(
        &mut self,
        label: Consistency,
        now_ms: u64,
        marker: Option<(u64, u64)>,
    ) -> Result<PointMeta> {
        self.check_usable()?;
        self.guarded(|s| {
            s.checkpoint_inner()?;
            let f = s.opts.faults.clone();
            let id = s.state.next_point_id;
            let name = format!("point-{id:08}-{}.undo", s.state.next_file_no);
            let path = s.dir.join(&name);
            let seg = segment::create(&f, &path, id, s.state.size)?;
            f.sync_dir(&s.dir)?;
            let p = PointMeta {
                id,
                time_ms: now_ms,
                label,
                generation: marker.map_or(s.state.generation, |m| m.0),
                seq: s.state.applied_seq,
                marker_seq: marker.map_or(s.state.applied_seq, |m| m.1),
                segment: name,
                segment_len: segment::HEADER_LEN,
                size: Some(s.state.size),
                // The agent sends barriers only for a complete replica; a
                // scheduled point knows only what the last barrier proved.
                incomplete: marker.is_none() && !s.state.complete,
            };
            let mut st = s.state.clone();
            if let Some((generation, seq)) = marker {
                // The barrier's sequence number becomes durable with the point.
                st.generation = generation;
                st.applied_seq = seq;
                st.complete = true;
            }
            st.next_point_id += 1;
            st.next_file_no += 1;
            st.points.push(p.clone());
            s.write_state(&st)?;
            s.state = st;
            s.open_seg = Some(seg);
            s.cover = ExtentSet::new();
            info!(disk = %s.state.disk, point = id, seq = p.seq, label = label_name(label), "recovery point");
            Ok(p)
        })
    }

    /// Records durably that the replica is incomplete again (a resync began):
    /// scheduled points are labelled incomplete until the next barrier.
    pub fn mark_incomplete(&mut self) -> Result<()> {
        self.check_usable()?;
        if !self.state.complete {
            return Ok(());
        }
        self.guarded(|s| {
            let mut st = s.state.clone();
            st.complete = false;
            s.write_state(&st)?;
            s.state = st;
            info!(disk = %s.state.disk, "replica incomplete until the resync ends");
            Ok(())
        })
    }

    /// Point `id`, refused if it is incomplete and `force` is not given; the
    /// error names the newest point that is not incomplete.
    pub fn usable_point(&self, id: u64, force: bool) -> Result<&PointMeta> {
        let p = self
            .state
            .points
            .iter()
            .find(|p| p.id == id)
            .ok_or_else(|| TargetError::NoSuchPoint {
                disk: self.state.disk.clone(),
                point: id,
            })?;
        if p.incomplete && !force {
            return Err(TargetError::IncompletePoint {
                disk: self.state.disk.clone(),
                point: id,
                latest_complete: self
                    .state
                    .points
                    .iter()
                    .rev()
                    .find(|p| !p.incomplete)
                    .map(|p| p.id),
            });
        }
        Ok(p)
    }

    /// Drops the points the policy does not keep; returns their ids.
    pub fn apply_retention(&mut self, policy: &RetentionPolicy, now_ms: u64) -> Result<Vec<u64>> {
        self.check_usable()?;
        if self.pins > 0 {
            // Removing a point rewrites segments an export is reading; the
            // next point after the export catches up.
            debug!(disk = %self.state.disk, "retention deferred while a point is exported");
            return Ok(Vec::new());
        }
        let stamps: Vec<PointStamp> = self
            .state
            .points
            .iter()
            .map(|p| PointStamp {
                id: p.id,
                time_ms: p.time_ms,
                label: p.label,
            })
            .collect();
        let mut keep = retain(&stamps, policy, now_ms);
        // A running test failover holds its point (a durable pin).
        keep.extend(crate::failover::pinned_points(&self.dir)?);
        let drop: Vec<u64> = stamps
            .iter()
            .map(|p| p.id)
            .filter(|id| !keep.contains(id))
            .collect();
        for id in &drop {
            self.remove_point(*id)?;
        }
        Ok(drop)
    }

    /// Removes one point. The newest point cannot be removed (its segment is
    /// the one being written).
    pub fn remove_point(&mut self, id: u64) -> Result<()> {
        self.check_usable()?;
        if self.pins > 0 {
            return Err(TargetError::Unsupported {
                what: "removing a recovery point while a point of the disk is exported".into(),
                hint: "try again once the export has finished".into(),
            });
        }
        let Some(i) = self.state.points.iter().position(|p| p.id == id) else {
            return Err(TargetError::NoSuchPoint {
                disk: self.state.disk.clone(),
                point: id,
            });
        };
        if i + 1 == self.state.points.len() {
            return Err(TargetError::Unsupported {
                what: "removing the newest recovery point".into(),
                hint: "it is removed once a newer point exists".into(),
            });
        }
        self.guarded(|s| {
            let f = s.opts.faults.clone();
            let mut st = s.state.clone();
            let gone = st.points.remove(i);
            let mut obsolete = vec![gone.segment.clone()];
            if i > 0 {
                // The previous point needs the old contents `gone` saved for
                // blocks it has not saved itself: merge, older data first.
                let prev = st.points[i - 1].clone();
                let name = format!("point-{:08}-{}.undo", prev.id, st.next_file_no);
                st.next_file_no += 1;
                let len = s.merge_segments(&prev, &gone, &name)?;
                f.sync_dir(&s.dir)?;
                obsolete.push(prev.segment.clone());
                st.points[i - 1].segment = name;
                st.points[i - 1].segment_len = len;
            }
            s.write_state(&st)?;
            s.state = st;
            for name in obsolete {
                let p = s.dir.join(name);
                std::fs::remove_file(&p).map_err(|e| TargetError::io(&p, None, e))?;
            }
            f.sync_dir(&s.dir)?;
            info!(disk = %s.state.disk, point = id, "recovery point removed");
            Ok(())
        })
    }

    pub(super) fn merge_segments(
        &self,
        older: &PointMeta,
        newer: &PointMeta,
        name: &str,
    ) -> Result<u64> {
        let f = &self.opts.faults;
        let size = self.state.size;
        let path = self.dir.join(name);
        let out = segment::create(f, &path, older.id, size)?;
        let mut pos = segment::HEADER_LEN;
        let mut cover = ExtentSet::new();
        let mut buf = Vec::new();
        for (k, meta) in [older, newer].into_iter().enumerate() {
            let seg_path = self.dir.join(&meta.segment);
            let idx = segment::scan(&seg_path, meta.segment_len, size)?;
            let file = File::open(&seg_path).map_err(|e| TargetError::io(&seg_path, None, e))?;
            for e in idx.entries {
                let parts = if k == 0 {
                    std::iter::once(e.offset..e.offset + e.len).collect()
                } else {
                    cover.uncovered(e.offset..e.offset + e.len)
                };
                for std::ops::Range { start: a, end: b } in parts {
                    match e.file_pos {
                        Some(at) => {
                            let mut data = vec![0u8; (b - a) as usize];
                            read_exact_at(&file, &seg_path, &mut data, at + (a - e.offset))?;
                            segment::encode_record(&mut buf, e.seq, a, &data);
                        }
                        None => segment::encode_zero_record(&mut buf, e.seq, a, (b - a) as u32),
                    }
                    if buf.len() >= 4 << 20 {
                        f.write_at(&out, &path, &buf, pos)?;
                        pos += buf.len() as u64;
                        buf.clear();
                    }
                }
                if k == 0 {
                    cover.insert(e.offset..e.offset + e.len);
                }
            }
        }
        f.write_at(&out, &path, &buf, pos)?;
        pos += buf.len() as u64;
        f.sync_data(&out, &path)?;
        Ok(pos)
    }

    /// Keeps every recovery point (and its segment files) of the shared
    /// `store` as they are while the returned guard lives: a [`PointView`]
    /// read in steps between other calls relies on it. Retention is deferred
    /// meanwhile. Dropping the guard releases the pin, on every path.
    pub fn pin_points(store: &Mutex<DiskStore>) -> PointPins<'_> {
        lock(store).pins += 1;
        PointPins { store }
    }

    /// Byte ranges that may differ between points `older` and `newer`: the
    /// union of the undo saved from `older` up to `newer`. Used for deltas.
    pub fn changed_between(&mut self, older: u64, newer: u64) -> Result<ExtentSet> {
        self.checkpoint()?;
        let pos = |id: u64| self.state.points.iter().position(|p| p.id == id);
        let (Some(a), Some(b)) = (pos(older), pos(newer)) else {
            return Err(TargetError::NoSuchPoint {
                disk: self.state.disk.clone(),
                point: if pos(older).is_none() { older } else { newer },
            });
        };
        let mut set = ExtentSet::new();
        for meta in &self.state.points[a.min(b)..a.max(b)] {
            let path = self.dir.join(&meta.segment);
            for e in segment::scan(&path, meta.segment_len, self.state.size)?.entries {
                set.insert(e.offset..e.offset + e.len);
            }
        }
        Ok(set)
    }
}

/// A pin on the recovery points of a shared store (see
/// [`DiskStore::pin_points`]); released when dropped.
#[derive(Debug)]
#[must_use = "the points stay pinned only while the guard lives"]
pub struct PointPins<'a> {
    store: &'a Mutex<DiskStore>,
}

impl Drop for PointPins<'_> {
    fn drop(&mut self) {
        let mut s = lock(self.store);
        s.pins = s.pins.saturating_sub(1);
    }
}
