//! blockferry agent: tracks changed extents of protected disks in the kernel,
//! reads them and ships them to the relay.

pub mod config;
pub mod handoff;
pub mod phase;
pub mod reader;
pub mod reprotect;
pub mod resync;
pub mod rpo;
pub mod service;
pub mod state;
pub mod status;
pub mod tracker;
