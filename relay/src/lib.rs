//! blockferry relay (process server): receives batches from agents, spools them
//! durably, and forwards them to the target.

pub mod bucket;
pub mod config;
pub mod metrics;
pub mod spool;
