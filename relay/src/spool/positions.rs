//! The `positions` file: per disk the last `(generation, seq)` the target
//! acked and the disk's size, one line each (`DISK GEN SEQ SIZE`, or
//! `DISK - - SIZE` for a disk with nothing acked yet).

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use blockferry_proto::{DiskId, Generation, Seq};

use super::{Position, SpoolError};

pub(super) const POSITIONS: &str = "positions";
pub(super) const FORGOTTEN: &str = "forgotten";

pub(super) type Positions = (HashMap<DiskId, Position>, HashMap<DiskId, u64>);

pub(super) fn read_positions(path: &Path) -> Result<Positions, SpoolError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((HashMap::new(), HashMap::new()));
        }
        Err(source) => {
            return Err(SpoolError::Io {
                action: "read",
                path: path.to_path_buf(),
                offset: 0,
                source,
            });
        }
    };
    let bad = |line: usize| SpoolError::BadPositions {
        path: path.to_path_buf(),
        detail: format!("line {line}"),
    };
    let mut out = HashMap::new();
    let mut sizes = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let mut it = line.split_whitespace();
        let disk: DiskId = it
            .next()
            .and_then(|d| d.parse().ok())
            .ok_or_else(|| bad(i + 1))?;
        let g = it.next().ok_or_else(|| bad(i + 1))?;
        let s = it.next().ok_or_else(|| bad(i + 1))?;
        if g != "-" {
            let g: u64 = g.parse().map_err(|_| bad(i + 1))?;
            let s: u64 = s.parse().map_err(|_| bad(i + 1))?;
            out.insert(disk, (Generation(g), Seq(s)));
        }
        if let Some(size) = it.next() {
            sizes.insert(disk, size.parse().map_err(|_| bad(i + 1))?);
        }
    }
    Ok((out, sizes))
}
/// The text of the positions file: acked disks first, then disks known only
/// by their size, each group in disk order.
pub(super) fn render(acked: &HashMap<DiskId, Position>, sizes: &HashMap<DiskId, u64>) -> String {
    let mut text = String::new();
    let mut disks: Vec<_> = acked.iter().collect();
    disks.sort_unstable_by_key(|(d, _)| **d);
    for (disk, (g, s)) in disks {
        let size = sizes.get(disk).copied().unwrap_or(0);
        text.push_str(&format!("{disk} {} {} {size}\n", g.0, s.0));
    }
    let mut unacked: Vec<_> = sizes
        .iter()
        .filter(|(d, _)| !acked.contains_key(d))
        .collect();
    unacked.sort_unstable_by_key(|(d, _)| **d);
    for (disk, size) in unacked {
        text.push_str(&format!("{disk} - - {size}\n"));
    }
    text
}

/// The `forgotten` file: `DISK GEN SEQ` per line, every record of DISK at or
/// below that position is dead. A missing file forgets nothing.
pub(super) fn read_forgotten(path: &Path) -> Result<HashMap<DiskId, Position>, SpoolError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(source) => {
            return Err(SpoolError::Io {
                action: "read",
                path: path.to_path_buf(),
                offset: 0,
                source,
            });
        }
    };
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let mut it = line.split_whitespace();
        let parsed = (|| {
            let disk: DiskId = it.next()?.parse().ok()?;
            let g: u64 = it.next()?.parse().ok()?;
            let s: u64 = it.next()?.parse().ok()?;
            Some((disk, (Generation(g), Seq(s))))
        })();
        let (disk, pos) = parsed.ok_or_else(|| SpoolError::BadPositions {
            path: path.to_path_buf(),
            detail: format!("line {}", i + 1),
        })?;
        out.insert(disk, pos);
    }
    Ok(out)
}

pub(super) fn render_forgotten(forgotten: &HashMap<DiskId, Position>) -> String {
    let mut disks: Vec<_> = forgotten.iter().collect();
    disks.sort_unstable_by_key(|(d, _)| **d);
    disks
        .into_iter()
        .map(|(disk, (g, s))| format!("{disk} {} {}\n", g.0, s.0))
        .collect()
}
