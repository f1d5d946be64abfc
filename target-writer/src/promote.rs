//! `blockferry-target promote`: the promote step of a failover. The replica
//! of a disk becomes the writable source in a new generation
//! ([`DiskStore::promote`]); from then on every frame of its former source is
//! refused as `StaleGeneration`, and that refusal travels through the relay
//! to the agent, which stops shipping the disk and reports it `fenced`.
//!
//! The promotion needs the store's lock. While `serve` holds it, the command
//! refuses with advice (stop the service, promote, start it again): frames
//! keep arriving until the promotion is durable, and a promotion between two
//! applies of the running service is not offered yet.

use std::path::Path;

use serde::Serialize;

use crate::error::{Result, TargetError};
use crate::store::generation::random_id;
use crate::store::{DiskStore, StoreOptions};

/// What a promotion did, as `promote --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Promoted {
    pub disk: String,
    /// The role the copy now has (`source`).
    pub role: String,
    /// The new wire generation: frames of older ones are refused.
    pub generation: u64,
    /// The new generation's id (32 hex digits).
    pub generation_id: String,
    /// The last sequence the replica held: the data the new generation starts from.
    pub seq: u64,
    /// The lineage, newest first (`g.. at #n <- g.. to #m`).
    pub lineage: String,
}

/// Promotes the replica of `disk` in the store at `root`.
pub fn promote(root: &Path, disk: &str) -> Result<Promoted> {
    let mut s = DiskStore::open(root, disk, StoreOptions::default())?;
    if s.is_promoted() {
        return Err(TargetError::AlreadyPromoted {
            disk: disk.to_string(),
            lineage: s.generation_record().lineage().to_string(),
        });
    }
    let r = s.promote(random_id())?;
    s.close()?;
    let cur = r.current();
    Ok(Promoted {
        disk: disk.to_string(),
        role: r.role().to_string(),
        generation: cur.number.0,
        generation_id: format!("{:#}", cur.id).trim_start_matches('g').to_string(),
        seq: cur.seq.0,
        lineage: r.lineage().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promote_reports_the_new_generation_and_refuses_a_second_time() {
        let dir = tempfile::tempdir().unwrap();
        DiskStore::create(dir.path(), "d1", 1 << 20, 1, StoreOptions::default())
            .unwrap()
            .close()
            .unwrap();
        let p = promote(dir.path(), "d1").unwrap();
        assert_eq!((p.role.as_str(), p.generation), ("source", 1));
        assert_eq!(p.generation_id.len(), 32);
        let e = promote(dir.path(), "d1").unwrap_err();
        assert!(matches!(e, TargetError::AlreadyPromoted { .. }), "{e}");
    }

    #[test]
    fn promote_while_the_store_is_held_is_refused_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let held =
            DiskStore::create(dir.path(), "d1", 1 << 20, 1, StoreOptions::default()).unwrap();
        let e = promote(dir.path(), "d1").unwrap_err();
        assert!(matches!(e, TargetError::Locked { .. }), "{e}");
        assert!(!held.is_promoted());
    }
}
