//! `cargo xtask bench dr`: the disaster-recovery figures, printed, never
//! asserted: the time from the request to a writable disk for a test
//! failover and a failover of a 4 GiB replica on an XFS store (a reflink
//! clone), then a DR cycle on two sites over a raw disk: the bytes reprotect
//! moves over what differs, and what a planned failback loses. The last line
//! is `test_failover_s=... failover_s=... reprotect_bytes_ratio=...
//! failback_loss_bytes=...`.
//!
//! Builds the release binaries and the `bench-dr` harness (crate
//! `blockferry-benches`) and runs it as root in a scratch directory under the
//! target dir, removed after: the harness makes its own XFS on a loop device
//! there, and its two sites in network namespaces.

use anyhow::{Result, bail};

use crate::util;

pub fn run() -> Result<()> {
    if !util::is_root() {
        bail!("bench dr makes an XFS file system on a loop device: run it as root");
    }
    util::ensure_packages()?;
    util::ensure_loop_support()?;
    // The cycle runs the product's binaries, found beside the harness.
    util::build_release_binaries()?;
    util::run_bench_harness("bench-dr")
}
