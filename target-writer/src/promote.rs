//! `blockferry-target promote`: the promote step of a failover. The replica
//! of a disk becomes the writable source in a new generation
//! ([`DiskStore::promote`]); from then on every frame of its former source is
//! refused as `StaleGeneration`, and that refusal travels through the relay
//! to the agent, which stops shipping the disk and reports it `fenced`.
//! A failover ([`crate::failover::real`]) promotes at a chosen point
//! instead ([`DiskStore::promote_at`]) and makes its writable disk.
//!
//! The promotion needs the store's lock. While `serve` holds it, the command
//! asks the service through its control socket, and
//! [`crate::serve::TargetSink::promote_blocking`] promotes the disk between
//! two applies.

use blockferry_proto::GenerationRecord;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TargetError};
use crate::store::generation::random_id;
use crate::store::{DiskStore, StoreOptions};

/// What a promotion did, as `promote --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    let p = promote_store(&mut s)?;
    s.close()?;
    Ok(p)
}

/// Promotes an open store (a new random generation id); a promoted one is
/// refused with [`TargetError::AlreadyPromoted`].
pub fn promote_store(s: &mut DiskStore) -> Result<Promoted> {
    if s.is_promoted() {
        return Err(TargetError::AlreadyPromoted {
            disk: s.disk().to_string(),
            lineage: s.generation_record().lineage().to_string(),
        });
    }
    let r = s.promote(random_id())?;
    Ok(report(s.disk(), &r))
}

pub(crate) fn report(disk: &str, r: &GenerationRecord) -> Promoted {
    let cur = r.current();
    Promoted {
        disk: disk.to_string(),
        role: r.role().to_string(),
        generation: cur.number.0,
        generation_id: format!("{:#}", cur.id).trim_start_matches('g').to_string(),
        seq: cur.seq.0,
        lineage: r.lineage().to_string(),
    }
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
    fn a_served_disk_is_promoted_by_the_service_that_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let name = "01234567-89ab-cdef-0011-223344556677";
        DiskStore::create(dir.path(), name, 1 << 20, 1, StoreOptions::default())
            .unwrap()
            .close()
            .unwrap();
        let cfg = crate::serve::ServeConfig::parse(
            &format!(
                "listen = \"127.0.0.1:0\"\nstore = {:?}\nca = \"ca\"\ncert = \"c\"\nkey = \"k\"\n",
                dir.path()
            ),
            dir.path(),
        )
        .unwrap();
        let sink = crate::serve::TargetSink::new(cfg);
        let p = sink.promote_blocking(name).unwrap();
        assert_eq!((p.role.as_str(), p.generation), ("source", 1));
        // The service holds the store: the command line is refused.
        assert!(matches!(
            promote(dir.path(), name),
            Err(TargetError::Locked { .. })
        ));
        drop(sink);
        let s = DiskStore::open(dir.path(), name, StoreOptions::default()).unwrap();
        assert!(s.is_promoted(), "the promotion is durable");
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
