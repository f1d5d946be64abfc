//! Opening after a crash: the open segment cut back to its committed length,
//! the journal of the current epoch replayed, files no state refers to removed.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::path::Path;

use tracing::{debug, info};

use crate::error::{Result, TargetError};
use crate::segment;
use crate::wal;

use super::*;

/// Writes zeros up to the checkpoint size (plus room for one large batch),
/// so that journal appends overwrite allocated blocks and each fdatasync is
/// a data flush, not a file-system journal commit for a growing file.
pub(super) fn preallocate_journal(wal: &File, path: &Path, checkpoint_bytes: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let want = checkpoint_bytes.saturating_add(4 << 20).min(1 << 30);
    let have = wal
        .metadata()
        .map_err(|e| TargetError::io(path, None, e))?
        .len();
    if have >= want {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut off = have;
    while off < want {
        let n = ((want - off) as usize).min(zeros.len());
        wal.write_all_at(&zeros[..n], off)
            .map_err(|e| TargetError::io(path, Some(off), e))?;
        off += n as u64;
    }
    Ok(())
}

impl DiskStore {
    pub(super) fn recover(&mut self) -> Result<()> {
        let f = self.opts.faults.clone();
        // Cut the open segment back to what the last checkpoint committed.
        if let Some(p) = self.state.points.last() {
            let path = self.dir.join(&p.segment);
            let seg = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| TargetError::io(&path, None, e))?;
            seg.set_len(p.segment_len)
                .map_err(|e| TargetError::io(&path, Some(p.segment_len), e))?;
            f.sync_data(&seg, &path)?;
            let idx = segment::scan(&path, p.segment_len, self.state.size)?;
            for e in &idx.entries {
                self.cover.insert(e.offset..e.offset + e.len);
            }
            self.open_seg = Some(seg);
        }
        let buf =
            std::fs::read(&self.wal_path).map_err(|e| TargetError::io(&self.wal_path, None, e))?;
        let (records, used) = wal::decode_all(&buf, self.state.wal_epoch);
        for rec in &records {
            for c in &rec.redo {
                let data = c.plain().ok_or_else(|| {
                    TargetError::corrupt(
                        &self.wal_path,
                        None,
                        format!(
                            "chunk at disk offset {} of batch {} does not decode",
                            c.offset, rec.seq
                        ),
                    )
                })?;
                self.replica.write_at(&f, &data, c.offset)?;
            }
            for c in &rec.undo {
                self.cover.insert(c.offset..c.end());
                self.journal_undo.push((rec.seq, c.clone()));
            }
            self.state.generation = rec.generation;
            self.state.applied_seq = rec.seq;
        }
        self.wal_pos = used as u64;
        if !records.is_empty() {
            info!(disk = %self.state.disk, batches = records.len(), applied_seq = self.state.applied_seq, "replayed journal");
        }
        self.remove_strays()?;
        if records.is_empty() {
            let cid = self.cid();
            self.replica.set_cid(&f, cid, true)?;
        } else {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Deletes files a crash left behind: temp files and segments that no
    /// committed state refers to.
    pub(super) fn remove_strays(&self) -> Result<()> {
        let live: BTreeSet<&str> = self
            .state
            .points
            .iter()
            .map(|p| p.segment.as_str())
            .collect();
        let rd = std::fs::read_dir(&self.dir).map_err(|e| TargetError::io(&self.dir, None, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| TargetError::io(&self.dir, None, e))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            let stray = name.ends_with(".tmp") || (name.ends_with(".undo") && !live.contains(name));
            if stray {
                debug!(file = name, "removing leftover file");
                let p = ent.path();
                std::fs::remove_file(&p).map_err(|e| TargetError::io(&p, None, e))?;
            }
        }
        Ok(())
    }
}
