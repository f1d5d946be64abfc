//! Sans-IO core of blockferry: the wire format, extent sets and the replication
//! state machines shared by agent, relay and target. Nothing here does I/O.

pub mod extent;
