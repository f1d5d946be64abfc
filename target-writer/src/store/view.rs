//! Reading the disk as it was at a recovery point: the undo of the newer
//! segments over the current replica.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;

use blockferry_proto::extent::ExtentSet;

use crate::crashsafe::read_exact_at;
use crate::error::{Result, TargetError};
use crate::segment;

use super::*;

impl DiskStore {
    /// The disk as it was at point `id`, readable at any offset.
    pub fn point_image(&mut self, id: u64) -> Result<PointImage<'_>> {
        self.checkpoint()?;
        let mut view = PointView::new(self, id)?;
        view.refresh(self)?;
        Ok(PointImage { store: self, view })
    }
}

/// Saved bytes of the point: disk range `[start, end)` is at `pos` in
/// segment `file`, or was all zero (`pos` is `None`).
#[derive(Debug, Clone, Copy)]
struct Piece {
    end: u64,
    file: usize,
    pos: Option<u64>,
}

#[derive(Debug)]
struct SegFile {
    name: String,
    path: PathBuf,
    file: File,
    /// Committed length indexed so far.
    scanned: u64,
}

/// Where each byte of the disk at one recovery point `P` is: the undo saved
/// by the oldest point `>= P` whose segment holds it, else the replica.
///
/// The view is monotone, which is what lets an export read it in steps while
/// batches are applied in between: only the newest segment grows (sealed
/// segments never change), new points add newer segments, and a byte saved
/// by a segment is never saved by an older one later. So [`PointView::refresh`]
/// only indexes what was appended since the last refresh, and a byte read from
/// the replica is one no segment held yet — one not written since `P`.
/// Two conditions are the caller's: the journalled undo of the open point is
/// in its segment (a checkpoint) before each refresh, and no point is removed
/// while the view is used ([`DiskStore::pin_points`]).
#[derive(Debug)]
pub struct PointView {
    point: PointMeta,
    files: Vec<SegFile>,
    /// Disjoint saved ranges by start; gaps read from the replica.
    pieces: BTreeMap<u64, Piece>,
    cover: ExtentSet,
}

impl PointView {
    /// An empty view of point `id` of `store`; [`PointView::refresh`] fills it.
    pub fn new(store: &DiskStore, id: u64) -> Result<Self> {
        let point = store
            .state
            .points
            .iter()
            .find(|p| p.id == id)
            .cloned()
            .ok_or_else(|| TargetError::NoSuchPoint {
                disk: store.state.disk.clone(),
                point: id,
            })?;
        Ok(PointView {
            point,
            files: Vec::new(),
            pieces: BTreeMap::new(),
            cover: ExtentSet::new(),
        })
    }

    pub fn point(&self) -> &PointMeta {
        &self.point
    }

    /// The disk size at the point.
    pub fn size(&self, store: &DiskStore) -> u64 {
        self.point.size.unwrap_or(store.state.size)
    }

    /// Indexes the undo committed since the last refresh (all of it the
    /// first time).
    pub fn refresh(&mut self, store: &DiskStore) -> Result<()> {
        let Some(i) = store
            .state
            .points
            .iter()
            .position(|p| p.id == self.point.id)
        else {
            return Err(TargetError::NoSuchPoint {
                disk: store.state.disk.clone(),
                point: self.point.id,
            });
        };
        for (k, meta) in store.state.points[i..].iter().enumerate() {
            if k == self.files.len() {
                let path = store.dir.join(&meta.segment);
                let file = File::open(&path).map_err(|e| TargetError::io(&path, None, e))?;
                self.files.push(SegFile {
                    name: meta.segment.clone(),
                    path,
                    file,
                    scanned: segment::HEADER_LEN,
                });
            }
            let sf = &mut self.files[k];
            if sf.name != meta.segment || meta.segment_len < sf.scanned {
                // Only a removed point rewrites segments, and pins keep them.
                return Err(TargetError::corrupt(
                    &sf.path,
                    None,
                    format!(
                        "undo of point {} was rewritten while point {} was read",
                        meta.id, self.point.id
                    ),
                ));
            }
            if meta.segment_len == sf.scanned {
                continue;
            }
            let idx =
                segment::scan_range(&sf.path, sf.scanned, meta.segment_len, store.state.size)?;
            sf.scanned = meta.segment_len;
            for e in idx.entries {
                for std::ops::Range { start: a, end: b } in
                    self.cover.uncovered(e.offset..e.offset + e.len)
                {
                    self.pieces.insert(
                        a,
                        Piece {
                            end: b,
                            file: k,
                            pos: e.file_pos.map(|at| at + (a - e.offset)),
                        },
                    );
                }
                self.cover.insert(e.offset..e.offset + e.len);
            }
        }
        Ok(())
    }

    /// Ranges where the point differs from the current replica (may be a
    /// superset), as of the last refresh.
    pub fn differs_from_replica(&self) -> &ExtentSet {
        &self.cover
    }

    /// Reads the point at `offset`, as of the last refresh.
    pub fn read_at(&self, store: &DiskStore, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size(store);
        let end = match offset.checked_add(buf.len() as u64) {
            Some(e) if e <= size => e,
            _ => {
                return Err(TargetError::OutOfRange {
                    disk: store.state.disk.clone(),
                    offset,
                    len: buf.len() as u64,
                    size,
                });
            }
        };
        // The piece that starts before `offset` may reach into the range.
        let first = self
            .pieces
            .range(..offset)
            .next_back()
            .filter(|(_, p)| p.end > offset)
            .map(|(s, p)| (*s, *p));
        let rest = self.pieces.range(offset..end).map(|(s, p)| (*s, *p));
        let mut at = offset;
        for (start, p) in first.into_iter().chain(rest) {
            if start > at {
                let dst = &mut buf[(at - offset) as usize..(start - offset) as usize];
                store.replica.read_at(dst, at)?;
                at = start;
            }
            let to = p.end.min(end);
            let dst = &mut buf[(at - offset) as usize..(to - offset) as usize];
            let sf = &self.files[p.file];
            match p.pos {
                Some(pos) => read_exact_at(&sf.file, &sf.path, dst, pos + (at - start))?,
                None => dst.fill(0),
            }
            at = to;
        }
        if at < end {
            store
                .replica
                .read_at(&mut buf[(at - offset) as usize..], at)?;
        }
        Ok(())
    }
}

/// A read-only view of the disk at one recovery point.
#[derive(Debug)]
pub struct PointImage<'a> {
    store: &'a DiskStore,
    view: PointView,
}

impl PointImage<'_> {
    /// The disk size at the point (smaller than the replica's when the disk
    /// grew after it).
    pub fn size(&self) -> u64 {
        self.view.size(self.store)
    }

    pub fn point(&self) -> &PointMeta {
        self.view.point()
    }

    /// Ranges where the point differs from the current replica (may be a superset).
    pub fn differs_from_replica(&self) -> &ExtentSet {
        self.view.differs_from_replica()
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.view.read_at(self.store, buf, offset)
    }
}

impl crate::vmdk::DiskRead for PointImage<'_> {
    fn size(&self) -> u64 {
        PointImage::size(self)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), crate::vmdk::VmdkError> {
        PointImage::read_at(self, buf, offset).map_err(|e| crate::vmdk::VmdkError::Source {
            offset,
            source: Box::new(e),
        })
    }
}
