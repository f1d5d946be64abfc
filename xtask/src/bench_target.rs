//! `cargo xtask bench target`: the target writer's apply and export speed,
//! each against a baseline measured in the same run.
//!
//! Builds the release `bench-target` harness (crate `blockferry-benches`) and
//! runs it in a scratch directory under the target dir (removed after):
//! apply of sequential 1 MiB and random 4 KiB batches vs plain
//! `pwrite`+`fdatasync` of the same data at the same offsets (with and
//! without an open recovery point, which adds undo capture), and export of a
//! 2 GiB point as a sparse VMDK vs `qemu-img convert -O vmdk` of the same
//! bytes. Targets: apply >= 0.8 of the baseline's throughput, export <= 1.0
//! of qemu-img's time. Ratios are medians over rounds.

use std::process::Command;

use anyhow::{Context, Result};

use crate::util;

pub fn run() -> Result<()> {
    util::ensure_packages()?;
    util::run(
        Command::new(env!("CARGO"))
            .current_dir(util::workspace_root())
            .args(["build", "--release", "--locked", "-p", "blockferry-benches"])
            .args(["--bin", "bench-target"]),
    )?;
    let bins = util::target_dir().join("release");
    let scratch = util::target_dir().join("bench-target");
    // A leftover of an interrupted run is only scratch data.
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)
            .with_context(|| format!("cannot clear {}", scratch.display()))?;
    }
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let result = util::run(
        Command::new(bins.join("bench-target"))
            .arg("--dir")
            .arg(&scratch)
            .env("RUST_LOG", "warn"),
    );
    let cleanup = std::fs::remove_dir_all(&scratch)
        .with_context(|| format!("cannot remove {}", scratch.display()));
    result.and(cleanup)
}
