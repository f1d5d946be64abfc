//! blockferry relay (process server): receives batches from agents, spools them
//! durably, and forwards them to the target.
//!
//! Agents → [`service`] (receiving loop, registry check) → [`spool`] (fsync,
//! then ack) → one forwarder per disk → target; the target's acks release the
//! spool. [`gate`] bounds the spool, [`bucket`] the bandwidth to the target.

pub mod bucket;
pub mod config;
pub mod gate;
pub mod metrics;
pub mod service;
pub mod spool;

pub use config::Config;
pub use service::{RelayError, RelayHandle, start};
