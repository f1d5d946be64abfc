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

use anyhow::Result;

use crate::util;

pub fn run() -> Result<()> {
    util::ensure_packages()?;
    util::run_bench_harness("bench-target")
}
