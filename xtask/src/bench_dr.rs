//! `cargo xtask bench dr`: the disaster-recovery figures. Today the time
//! from the request to a writable disk for a test failover of a 4 GiB
//! replica on an XFS store (a reflink clone), printed, never asserted; the
//! last line is `test_failover_s=...`.
//!
//! Builds the release `bench-dr` harness (crate `blockferry-benches`) and
//! runs it as root in a scratch directory under the target dir, removed
//! after: the harness makes its own XFS on a loop device there.

use anyhow::{Result, bail};

use crate::util;

pub fn run() -> Result<()> {
    if !util::is_root() {
        bail!("bench dr makes an XFS file system on a loop device: run it as root");
    }
    util::ensure_packages()?;
    util::ensure_loop_support()?;
    util::run_bench_harness("bench-dr")
}
