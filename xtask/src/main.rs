//! Developer tasks: `cargo xtask build-and-load | demo | ci | bench <what>`.

mod bench_dr;
mod bench_e2e;
mod bench_target;
mod bench_tracker;
mod bench_transport;
mod build_and_load;
mod ci;
mod demo;
mod fuzz;
mod scratch;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "blockferry developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the kernel programs and the agent, load and attach them, report, detach.
    BuildAndLoad,
    /// The main job: replicate a loop-backed disk end to end and verify the replica.
    Demo {
        /// Only show the change tracker on a loop device.
        #[arg(long)]
        tracker_only: bool,
        /// Run the agent in network namespace site-a and relay and target in
        /// site-b, joined by a veth pair, instead of all on 127.0.0.1.
        #[arg(long, conflicts_with = "tracker_only")]
        two_sites: bool,
    },
    /// Everything CI checks: format, lints, all tests (root tests included), fuzzing.
    Ci,
    /// Verify the systemd units of dist/systemd and print their exposure
    /// scores (the `systemd units` step of ci; needs the debug binaries built).
    Units,
    /// Build the cargo-fuzz targets (stable toolchain) and run each for a while.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Benchmarks, each printing a ratio against a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// fio 4 KiB random writes with and without the tracker attached.
    Tracker,
    /// 2 GiB agent -> relay -> sink over QUIC vs iperf3 TCP on loopback.
    Transport,
    /// Target apply and export vs pwrite+fdatasync and qemu-img convert.
    Target,
    /// Initial sync, delta resync and RPO end to end.
    E2e,
    /// Disaster recovery: time to a writable disk for a test failover of a 4 GiB replica on XFS.
    Dr,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::BuildAndLoad => build_and_load::run(),
        Cmd::Demo {
            tracker_only,
            two_sites,
        } => demo::run_demo(tracker_only, two_sites),
        Cmd::Ci => ci::run_ci(),
        Cmd::Units => ci::check_units(&util::workspace_root()),
        Cmd::Fuzz { seconds } => fuzz::run_fuzz(seconds),
        Cmd::Bench { what } => match what {
            Bench::Tracker => bench_tracker::run(),
            Bench::Transport => bench_transport::run(),
            Bench::Target => bench_target::run(),
            Bench::E2e => bench_e2e::run(),
            Bench::Dr => bench_dr::run(),
        },
    }
}
