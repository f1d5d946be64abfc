//! `cargo xtask bench dr`: the disaster-recovery figures. Today the time
//! from the request to a writable disk for a test failover of a 4 GiB
//! replica on an XFS store (a reflink clone), printed, never asserted; the
//! last line is `test_failover_s=...`.
//!
//! Builds the release `bench-dr` harness (crate `blockferry-benches`) and
//! runs it as root in a scratch directory under the target dir, removed
//! after: the harness makes its own XFS on a loop device there.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util;

pub fn run() -> Result<()> {
    if !util::is_root() {
        bail!("bench dr makes an XFS file system on a loop device: run it as root");
    }
    util::ensure_packages()?;
    util::ensure_loop_support()?;
    util::run(
        Command::new(env!("CARGO"))
            .current_dir(util::workspace_root())
            .args(["build", "--release", "--locked", "-p", "blockferry-benches"])
            .args(["--bin", "bench-dr"]),
    )?;
    let bins = util::target_dir().join("release");
    let scratch = util::target_dir().join("bench-dr");
    // A leftover of an interrupted run is only scratch data.
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)
            .with_context(|| format!("cannot clear {}", scratch.display()))?;
    }
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let result = util::run(
        Command::new(bins.join("bench-dr"))
            .arg("--dir")
            .arg(&scratch)
            .env("RUST_LOG", "warn"),
    );
    let cleanup = std::fs::remove_dir_all(&scratch)
        .with_context(|| format!("cannot remove {}", scratch.display()));
    result.and(cleanup)
}
