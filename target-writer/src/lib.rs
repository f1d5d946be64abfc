//! blockferry target writer (master target): applies verified batches to VMDK
//! replicas and keeps the journal of recovery points.
//!
//! Where a block goes: [`batch`] verifies it, [`store::DiskStore::apply`]
//! journals ([`wal`]) and writes it to the [`replica`], saving what it
//! overwrites into the open recovery point's undo [`segment`]; [`retention`]
//! decides which points stay; [`export`] writes any point out as a disk, and
//! [`failover`] makes a writable disk of one (a reflink clone where the file
//! system shares extents): a test copy, or the failover that promotes the
//! replica at the point. [`reprotect`] takes an existing disk as the replica
//! (a seed) and fails such a store over in place.

pub mod batch;
pub mod control;
pub mod crashsafe;
pub mod error;
pub mod export;
pub mod failover;
pub mod feed;
pub mod promote;
pub mod replica;
pub mod reprotect;
pub mod retention;
pub mod segment;
pub mod serve;
pub mod store;
mod sys;
pub mod wal;

/// The VMDK format, a crate of its own; re-exported so `crate::vmdk::...` paths stay.
pub use blockferry_vmdk as vmdk;

pub use batch::ApplyBatch;
pub use blockferry_proto::{Barrier, Chunk, Consistency, Encoding};
pub use error::TargetError;
pub use store::{ApplyOutcome, DiskStore, PointMeta, StoreOptions};
