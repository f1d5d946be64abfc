//! `cargo xtask bench transport`: 2 GiB of batches agent → relay → sink over
//! QUIC on loopback (release build, relay spool fsynced on the disk under the
//! target dir, chunks verified at relay and sink) against iperf3 TCP on
//! loopback measured in the same run. Prints both rates and their ratio;
//! target: ratio >= 0.5.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::util;

/// Bytes of chunk data the QUIC path carries.
const QUIC_BYTES: u64 = 2 << 30;
/// The harness binary of the benches crate.
const BENCH_BIN: &str = "blockferry-bench-transport";
/// Seconds of the iperf3 baseline.
const IPERF_SECONDS: u32 = 5;

/// iperf3 server, killed on drop.
struct IperfServer(Child);

impl Drop for IperfServer {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
}

fn iperf3_tcp_mb_per_sec() -> Result<f64> {
    // A free port from the kernel; iperf3 takes it over right after.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("cannot find a free port for iperf3")?
        .port();
    let mut child = Command::new("iperf3")
        .args([
            "-s",
            "-1",
            "--forceflush",
            "-B",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start iperf3 -s (install iperf3)")?;
    let stdout = child.stdout.take().context("iperf3 stdout")?;
    let server = IperfServer(child);
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("Server listening") => break,
            Some(Ok(_)) => {}
            _ => bail!("iperf3 -s exited before listening"),
        }
    }
    let json = util::output(Command::new("iperf3").args([
        "-c",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-t",
        &IPERF_SECONDS.to_string(),
        "-J",
    ]))?;
    drop(server);
    let v: serde_json::Value = serde_json::from_str(&json).context("iperf3 -J output")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 output lacks end.sum_received.bits_per_second")?;
    Ok(bps / 8.0 / 1e6)
}

pub fn run() -> Result<()> {
    if !util::have("iperf3") {
        util::ensure_packages()?;
    }
    // The harness lives in the benches crate, not in the relay it measures.
    util::run(
        Command::new(env!("CARGO"))
            .current_dir(util::workspace_root())
            .args(["build", "--release", "--locked", "-p", "blockferry-benches"])
            .args(["--bin", BENCH_BIN]),
    )?;
    let bins = util::target_dir().join("release");
    let scratch = util::target_dir().join("bench-transport");
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)
            .with_context(|| format!("cannot clear {}", scratch.display()))?;
    }
    let tcp = iperf3_tcp_mb_per_sec()?;
    println!("iperf3 tcp loopback: {tcp:.0} MB/s");
    let out = util::output(
        Command::new(bins.join(BENCH_BIN))
            .args(["--bytes", &QUIC_BYTES.to_string(), "--dir"])
            .arg(&scratch)
            .env("RUST_LOG", "warn"),
    );
    let cleanup = std::fs::remove_dir_all(&scratch)
        .with_context(|| format!("cannot remove {}", scratch.display()));
    let out = out?;
    cleanup?;
    print!("{out}");
    let quic: f64 = out
        .split_whitespace()
        .rev()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .context("the transport bench printed no rate")?;
    println!(
        "quic_mb_s={quic:.0} tcp_mb_s={tcp:.0} ratio={:.2} (target >= 0.5)",
        quic / tcp
    );
    Ok(())
}
