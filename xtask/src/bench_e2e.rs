//! `cargo xtask bench e2e`: the product end to end, each figure against a
//! baseline measured in the same run, on a 4 GiB loop device this task creates
//! and removes (also on error and Ctrl-C).
//!
//! 1. **Initial sync** of the disk filled by fio with half-compressible data,
//!    agent → relay → target over QUIC on loopback (agent start until caught
//!    up), vs `qemu-img convert -O vmdk` of the device. `sync_ratio` = ours /
//!    qemu-img's time; target ≤ 1.0.
//! 2. **Delta resync** after 1 % of the 64 KiB blocks changed at random while
//!    the agent was down (SIGKILL, O_DIRECT writes, restart: the unclean stop
//!    makes it compare by checksum), vs `rsync --inplace --no-whole-file` of the
//!    backing file onto a copy taken before the change. Ratios of time and of
//!    bytes on the wire (ours: `bytes_sent + resync_hash_bytes` of the restarted
//!    agent; rsync: sent + received).
//! 3. **RPO** under 60 s of fio 4 KiB random writes at 20 MB/s: the agent's
//!    status `rpo_ms` sampled every 100 ms; p50 and p99. Target p99 ≤ 1 s.
//!
//! For each phase the CPU share of agent, relay and target and of the whole
//! machine is printed, to show what bounds a figure that misses its target.
//! Last line: every ratio, `sync_ratio=… resync_time_ratio=… …`.
//!
//! `BLOCKFERRY_BENCH_SMOKE=1` runs the same steps on 256 MiB for 10 s: a check
//! that the task works, whose figures mean nothing.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use blockferry_benches::site::{Binaries, ProtectedDisk, Site, SiteOptions, new_disk_id};

use crate::scratch::Scratch;
use crate::util::{self, output, run as run_cmd};

const GIB: u64 = 1 << 30;
const BLOCK: u64 = 64 << 10;
const RPO_SAMPLE: Duration = Duration::from_millis(100);

/// Size of the run: the benchmark's, or with `BLOCKFERRY_BENCH_SMOKE` set a
/// small one that only checks the task works (its figures mean nothing).
#[derive(Clone, Copy)]
struct Scale {
    disk_bytes: u64,
    rpo_runtime_s: u64,
}

impl Scale {
    fn get() -> Scale {
        if std::env::var_os("BLOCKFERRY_BENCH_SMOKE").is_some() {
            Scale {
                disk_bytes: 256 << 20,
                rpo_runtime_s: 10,
            }
        } else {
            Scale {
                disk_bytes: 4 * GIB,
                rpo_runtime_s: 60,
            }
        }
    }

    /// 1 % of the disk's 64 KiB blocks.
    fn changed_blocks(self) -> u64 {
        self.disk_bytes / BLOCK / 100
    }
}

pub fn run() -> Result<()> {
    if !util::is_root() {
        bail!(
            "the e2e benchmark needs root (loop devices, eBPF): run `sudo -E cargo xtask bench e2e`"
        );
    }
    util::ensure_packages()?;
    util::ensure_kernel_prereqs()?;
    util::ensure_loop_support()?;
    let bins = util::build_release_binaries()?;
    let scale = Scale::get();
    let mut s = Scratch::new()?;
    let dir = s.dir("blockferry-bench-e2e")?;
    let backing = dir.join("source-disk.img");
    let dev = s.loop_device(&backing, scale.disk_bytes, true)?;
    eprintln!("source disk {dev} ({} MiB)", scale.disk_bytes >> 20);

    eprintln!("filling it with half-compressible data (fio)");
    fio(
        &dev,
        &[
            "--name=fill",
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            "--buffer_compress_percentage=50",
            "--refill_buffers",
        ],
    )?;
    s.check()?;

    let site_dir = dir.join("site");
    std::fs::create_dir(&site_dir)?;
    let disk = ProtectedDisk {
        id: new_disk_id()?,
        device: dev.clone().into(),
    };
    let opts = SiteOptions {
        quiet: true,
        ..SiteOptions::default()
    };
    let mut site = Site::start(Binaries::in_dir(&bins), &site_dir, vec![disk.clone()], opts)?;
    let result = phases(&mut s, &mut site, &disk, &dir, &backing, scale);
    if result.is_err() {
        print_log_tails(&site);
    }
    // The site's processes stop before the scratch detaches the device.
    drop(site);
    let figures = result?;
    println!("{figures}");
    Ok(())
}

fn phases(
    s: &mut Scratch,
    site: &mut Site,
    disk: &ProtectedDisk,
    dir: &Path,
    backing: &Path,
    scale: Scale,
) -> Result<String> {
    let dev = disk.device.to_str().context("device path is not UTF-8")?;
    let mb = scale.disk_bytes as f64 / 1e6;
    let changed = scale.changed_blocks();
    let runtime = scale.rpo_runtime_s;

    // --- 1. initial sync -------------------------------------------------
    let vmdk = dir.join("qemu-convert.vmdk");
    let t = Instant::now();
    run_cmd(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vmdk", dev])
            .arg(&vmdk),
    )?;
    let qemu_s = t.elapsed().as_secs_f64();
    // qemu-img convert does not flush its output (cache mode `unsafe`); the
    // flush is timed apart, and the ratio is taken against the faster figure.
    let t = Instant::now();
    run_cmd(Command::new("sync").arg("-f").arg(&vmdk))?;
    let qemu_flush_s = t.elapsed().as_secs_f64();
    std::fs::remove_file(&vmdk).with_context(|| format!("cannot remove {}", vmdk.display()))?;
    s.check()?;

    eprintln!("initial sync through agent -> relay -> target");
    let t = Instant::now();
    site.start_agent()?;
    let cpu = CpuMeter::start(site);
    caught_up(s, site, Duration::from_secs(1800))?;
    let sync_s = t.elapsed().as_secs_f64();
    let sync_cpu = cpu.finish(site);
    let sync_ratio = sync_s / qemu_s;
    println!(
        "initial sync: {:.1} s, {:.0} MB/s; qemu-img convert -O vmdk: {qemu_s:.1} s, {:.0} MB/s (+{qemu_flush_s:.1} s to flush its output)",
        sync_s,
        mb / sync_s,
        mb / qemu_s
    );
    println!("  cpu during the sync: {sync_cpu}");
    println!("sync_ratio={sync_ratio:.2}");
    site.compare(disk)?;
    s.check()?;

    // --- 2. delta resync -------------------------------------------------
    site.kill_agent()?;
    let copy = dir.join("rsync-copy.img");
    run_cmd(Command::new("cp").arg(backing).arg(&copy))?;
    run_cmd(&mut Command::new("sync"))?;
    eprintln!("changing {changed} random 64 KiB blocks with the agent down");
    fio(
        dev,
        &[
            "--name=change",
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=16",
            &format!("--io_size={}", changed * BLOCK),
            "--randseed=20261122",
            "--buffer_compress_percentage=50",
            "--refill_buffers",
        ],
    )?;
    s.check()?;

    eprintln!("restarting the agent: checksum resync");
    let t = Instant::now();
    site.start_agent()?;
    let cpu = CpuMeter::start(site);
    let st = caught_up(s, site, Duration::from_secs(1200))?;
    let resync_s = t.elapsed().as_secs_f64();
    let resync_cpu = cpu.finish(site);
    let sent = st["disks"][0]["bytes_sent"].as_u64().unwrap_or(0);
    let hash = st["disks"][0]["resync_hash_bytes"].as_u64().unwrap_or(0);
    let ours_bytes = sent + hash;
    site.compare(disk)?;
    s.check()?;

    let t = Instant::now();
    let stats = output(
        Command::new("rsync")
            // --ignore-times: the copy's mtime says nothing about its
            // content, and rsync must not skip the file on size and mtime.
            .args(["--inplace", "--no-whole-file", "--ignore-times", "--stats"])
            .arg(backing)
            .arg(&copy),
    )?;
    let rsync_s = t.elapsed().as_secs_f64();
    std::fs::remove_file(&copy).with_context(|| format!("cannot remove {}", copy.display()))?;
    let rsync_bytes =
        rsync_stat(&stats, "Total bytes sent:")? + rsync_stat(&stats, "Total bytes received:")?;
    let resync_time_ratio = resync_s / rsync_s;
    let resync_bytes_ratio = ours_bytes as f64 / rsync_bytes as f64;
    println!(
        "delta resync of {changed} changed 64 KiB blocks: {resync_s:.1} s, {ours_bytes} bytes on the wire ({sent} data + {hash} hashes); rsync --inplace --no-whole-file: {rsync_s:.1} s, {rsync_bytes} bytes"
    );
    println!("  cpu during the resync: {resync_cpu}");
    println!("resync_time_ratio={resync_time_ratio:.2} resync_bytes_ratio={resync_bytes_ratio:.2}");
    s.check()?;

    // --- 3. RPO under a steady write load -------------------------------
    eprintln!("RPO under {runtime} s of 4 KiB random writes at 20 MB/s");
    let mut fio_cmd = fio_command(
        dev,
        &[
            "--name=rpo",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--rate=20m",
            "--time_based",
            &format!("--runtime={runtime}"),
            "--randseed=4242",
            "--buffer_compress_percentage=50",
            "--refill_buffers",
        ],
    );
    fio_cmd.stdout(Stdio::null());
    let cpu = CpuMeter::start(site);
    s.spawn("fio-rpo", &mut fio_cmd)?;
    let mut samples = Vec::new();
    let mut snapshots = std::collections::BTreeSet::new();
    let mut next = Instant::now();
    let fio_status = loop {
        s.check()?;
        if let Some(status) = s.exited("fio-rpo") {
            break status;
        }
        if let Some(status) = site.agent_exited() {
            bail!("the agent exited with {status} under load");
        }
        if let Ok(st) = site.agent_status() {
            samples.push(st["disks"][0]["rpo_ms"].as_u64().unwrap_or(0));
            snapshots.insert(st["updated_ms"].as_u64().unwrap_or(0));
        }
        // Sampling at a fixed period, not synchronisation.
        next += RPO_SAMPLE;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    };
    let rpo_cpu = cpu.finish(site);
    if !fio_status.success() {
        bail!("fio under the RPO load failed with {fio_status}");
    }
    if samples.is_empty() {
        bail!("no status sample of the agent during the RPO run");
    }
    samples.sort_unstable();
    let p50 = percentile(&samples, 50.0) as f64 / 1000.0;
    let p99 = percentile(&samples, 99.0) as f64 / 1000.0;
    let max = samples.last().copied().unwrap_or(0) as f64 / 1000.0;
    println!(
        "RPO under 20 MB/s of 4 KiB random writes for {runtime} s: p50 {p50:.2} s, p99 {p99:.2} s, max {max:.2} s ({} samples of {} status snapshots)",
        samples.len(),
        snapshots.len()
    );
    println!("  cpu during the load: {rpo_cpu}");
    println!("rpo_p50_s={p50:.2} rpo_p99_s={p99:.2}");
    caught_up(s, site, Duration::from_secs(600))?;
    site.compare(disk)?;
    println!("replica identical to the source after every phase (qemu-img compare)");

    Ok(format!(
        "sync_ratio={sync_ratio:.2} resync_time_ratio={resync_time_ratio:.2} resync_bytes_ratio={resync_bytes_ratio:.2} rpo_p50_s={p50:.2} rpo_p99_s={p99:.2}"
    ))
}

/// Waits for the agent to catch up, in short slices so that Ctrl-C is seen.
fn caught_up(s: &Scratch, site: &mut Site, limit: Duration) -> Result<serde_json::Value> {
    let deadline = Instant::now() + limit;
    loop {
        s.check()?;
        match site.wait_caught_up(Duration::from_secs(10)) {
            Ok(st) => return Ok(st),
            Err(e) if site.agent_exited().is_some() || Instant::now() > deadline => return Err(e),
            Err(_) => {}
        }
    }
}

fn fio_command(dev: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--filename={dev}"))
        .args(["--direct=1", "--ioengine=io_uring", "--output-format=terse"])
        .args(args);
    cmd
}

fn fio(dev: &str, args: &[&str]) -> Result<()> {
    output(&mut fio_command(dev, args)).map(|_| ())
}

/// A number from rsync's `--stats` (`Total bytes sent: 1,234`).
fn rsync_stat(stats: &str, key: &str) -> Result<u64> {
    let line = stats
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .with_context(|| format!("no `{key}` in rsync's statistics:\n{stats}"))?;
    let digits: String = line.chars().filter(char::is_ascii_digit).collect();
    digits
        .parse()
        .with_context(|| format!("bad number after `{key}` in rsync's statistics"))
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CPU time of the site's processes and of the machine over one phase.
struct CpuMeter {
    at: Instant,
    procs: Vec<(&'static str, u32, u64)>,
    machine: Option<(u64, u64)>,
}

impl CpuMeter {
    fn start(site: &Site) -> CpuMeter {
        CpuMeter {
            at: Instant::now(),
            procs: site
                .pids()
                .into_iter()
                .filter_map(|(n, pid)| proc_ticks(pid).map(|t| (n, pid, t)))
                .collect(),
            machine: machine_ticks(),
        }
    }

    /// "agent 180% relay 40% target 60% machine 95% of 2 cores".
    fn finish(self, site: &Site) -> String {
        let wall = self.at.elapsed().as_secs_f64().max(1e-3);
        let hz = clock_ticks_per_second();
        let alive = site.pids();
        let mut parts = Vec::new();
        for (name, pid, t0) in self.procs {
            if !alive.iter().any(|&(_, p)| p == pid) {
                continue;
            }
            if let Some(t1) = proc_ticks(pid) {
                let pct = (t1.saturating_sub(t0)) as f64 / hz / wall * 100.0;
                parts.push(format!("{name} {pct:.0}%"));
            }
        }
        if let (Some((busy0, all0)), Some((busy1, all1))) = (self.machine, machine_ticks()) {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let pct = busy1.saturating_sub(busy0) as f64
                / (all1.saturating_sub(all0)).max(1) as f64
                * 100.0;
            parts.push(format!("machine {pct:.0}% busy of {cores} cores"));
        }
        parts.join(", ")
    }
}

/// utime + stime of a process, in clock ticks.
fn proc_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields are counted after its `)`.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after `)`.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Busy and total ticks of all cores, from /proc/stat.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let all: u64 = v.iter().take(8).sum();
    // idle and iowait are not busy.
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((all - idle, all))
}

fn clock_ticks_per_second() -> f64 {
    output(Command::new("getconf").arg("CLK_TCK"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn print_log_tails(site: &Site) {
    for name in ["agent", "relay", "target"] {
        let p = site.dir.join(format!("{name}.log"));
        if let Ok(text) = std::fs::read_to_string(&p) {
            eprintln!("--- {name}.log (last lines) ---");
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines[lines.len().saturating_sub(20)..] {
                eprintln!("{l}");
            }
        }
    }
}
