//! blockferry agent: tracks changed extents of protected disks in the kernel,
//! reads them and ships them to the relay.

pub mod reader;
pub mod resync;
pub mod tracker;
