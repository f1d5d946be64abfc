//! Loopback throughput of agent → relay → sink over QUIC, for
//! `cargo xtask bench transport`. Prints one line ending in `<rate> MB/s`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

/// Loopback throughput harness for `cargo xtask bench transport`.
#[derive(Parser)]
struct Args {
    /// Scratch directory (spool and PKI) on the disk to measure.
    #[arg(long)]
    dir: PathBuf,
    /// Bytes of chunk data to send.
    #[arg(long, default_value_t = 2 << 30)]
    bytes: u64,
    /// Bytes of chunk data per batch frame.
    #[arg(long, default_value_t = 1 << 20)]
    batch: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let r = rt.block_on(blockferry_benches::relay_transport::run(
        &args.dir, args.bytes, args.batch,
    ))?;
    println!(
        "quic agent->relay->sink: {} bytes in {:.2} s = {:.0} MB/s",
        r.bytes,
        r.elapsed.as_secs_f64(),
        r.mb_per_sec()
    );
    Ok(())
}
