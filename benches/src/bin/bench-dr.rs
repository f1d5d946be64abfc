//! `bench-dr`: time from the request to a writable disk for a test failover
//! of a 4 GiB replica on an XFS store (`cargo xtask bench dr` builds it in
//! release mode and runs it as root in a scratch directory).
//!
//! Makes an XFS file system on a loop device over a sparse file in the
//! scratch directory, a store with a vmfs (flat) replica, writes `--written-mib`
//! before a first point and `--later-mib` between it and a second, then times
//! test failovers of the latest point (the clone alone, near O(1)) and of the
//! older one (the clone plus the undo of the later point): printed, never
//! asserted. Then it times a failover to the latest point (the same copy,
//! plus the promotion). Last, a DR cycle on two sites over a raw disk of
//! `--cycle-mib` with scattered 4 KiB writes on both sides
//! ([`blockferry_benches::dr::raw_cycle`]): the bytes reprotect sent over the
//! 64 KiB chunks that differed, and what a planned failback lost. The last
//! line is `test_failover_s=... failover_s=... reprotect_bytes_ratio=...
//! failback_loss_bytes=...`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use blockferry_benches::dr::raw_cycle;
use blockferry_proto::{Barrier, Consistency, DiskId, Generation, Seq};
use blockferry_target::batch::{ApplyBatch, raw_chunk};
use blockferry_target::failover::{
    CopyMethod, FailoverRequest, PointChoice, TestFailoverRequest, cleanup, failover, test_failover,
};
use blockferry_target::{DiskStore, StoreOptions};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Scratch directory (holds a sparse file system image).
    #[arg(long)]
    dir: PathBuf,
    /// Size of the replica in MiB.
    #[arg(long, default_value_t = 4096)]
    disk_mib: u64,
    /// Data written before the older point, MiB.
    #[arg(long, default_value_t = 256)]
    written_mib: u64,
    /// Data written between the two points, MiB.
    #[arg(long, default_value_t = 64)]
    later_mib: u64,
    /// Size of the raw disk of the two-site cycle (reprotect, failback), MiB.
    #[arg(long, default_value_t = 512)]
    cycle_mib: u64,
}

const DISK: &str = "bench-disk";
const CHUNK: u64 = 256 << 10;

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The XFS mount, unmounted and its loop device detached on drop.
struct XfsMount {
    dev: String,
    mnt: PathBuf,
    mounted: bool,
}

impl XfsMount {
    fn new(dir: &Path, bytes: u64) -> Result<XfsMount> {
        let img = dir.join("xfs.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(bytes))
            .with_context(|| format!("cannot create {}", img.display()))?;
        let img_s = img.to_str().context("utf-8 scratch path")?;
        let dev = run("losetup", &["--find", "--show", img_s])?
            .trim()
            .to_string();
        let mut m = XfsMount {
            dev,
            mnt: dir.join("mnt"),
            mounted: false,
        };
        run("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", &m.dev])?;
        std::fs::create_dir_all(&m.mnt)?;
        run(
            "mount",
            &["-t", "xfs", &m.dev, m.mnt.to_str().context("utf-8")?],
        )?;
        m.mounted = true;
        Ok(m)
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        if self.mounted
            && let Err(e) = run("umount", &[self.mnt.to_str().unwrap_or_default()])
        {
            eprintln!("{e:#}");
        }
        if let Err(e) = run("losetup", &["-d", &self.dev]) {
            eprintln!("{e:#}");
        }
    }
}

/// Writes `mib` MiB of distinct data in 1 MiB batches spread over the disk.
fn write(s: &mut DiskStore, seq: &mut u64, mib: u64, disk: u64, salt: u64) -> Result<()> {
    let stride = (disk / (mib << 20)).max(1) << 20;
    for i in 0..mib {
        *seq += 1;
        let base = (i * stride) % disk;
        let chunks = (0..(1 << 20) / CHUNK)
            .map(|k| {
                let mut data = vec![0u8; CHUNK as usize];
                let seed = blake3::hash(&[salt, i, k].map(u64::to_le_bytes).concat());
                for (j, b) in data.iter_mut().enumerate() {
                    *b = seed.as_bytes()[j % 32] ^ (j / 32) as u8;
                }
                raw_chunk(base + k * CHUNK, data)
            })
            .collect();
        s.apply(&ApplyBatch {
            disk: DISK.into(),
            generation: 1,
            seq: *seq,
            chunks,
        })?;
    }
    Ok(())
}

fn barrier(s: &mut DiskStore, seq: &mut u64) -> Result<u64> {
    *seq += 1;
    let b = Barrier {
        disk: DiskId::default(),
        generation: Generation(1),
        seq: Seq(*seq),
        consistency: Consistency::CrashConsistent,
        timestamp_ns: 0,
    };
    s.barrier(&b, 1)?.map(|p| p.id).context("no point made")
}

/// Seconds from the request to a writable disk, then cleaned up.
fn time_test_failover(
    root: &Path,
    store: &Mutex<DiskStore>,
    point: u64,
    out: &Path,
) -> Result<f64> {
    let req = TestFailoverRequest {
        disk: DISK.into(),
        point: PointChoice::Id(point),
        out: out.to_path_buf(),
        attach: true,
        force: false,
    };
    let t = Instant::now();
    let rec = test_failover(store, &req, 1, &AtomicBool::new(false))?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "point {point}: {} in {secs:.3} s, attached at {}",
        match rec.method {
            Some(CopyMethod::Reflink) => "reflink clone",
            Some(CopyMethod::Export) => "export (no reflink here)",
            None => "unknown",
        },
        rec.loop_device
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    cleanup(root, DISK, 2)?;
    Ok(secs)
}

/// Seconds from the request to a writable disk for a failover to the latest
/// point (the copy, the loop device, the promotion); the loop device is
/// detached afterwards.
fn time_failover(store: &Mutex<DiskStore>, out: &Path) -> Result<f64> {
    let req = FailoverRequest {
        disk: DISK.into(),
        point: PointChoice::Latest,
        out: out.to_path_buf(),
        attach: true,
        force: false,
        planned: false,
        discard_writes: false,
    };
    let t = Instant::now();
    let rec = failover(store, &req, 3, &AtomicBool::new(false))?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "failover to point {}: {} in {secs:.3} s, generation {} promoted",
        rec.point,
        match rec.method {
            Some(CopyMethod::Reflink) => "reflink clone",
            Some(CopyMethod::Export) => "export (no reflink here)",
            None => "unknown",
        },
        rec.summary().generation.unwrap_or_default(),
    );
    if let Some(dev) = &rec.loop_device {
        run("losetup", &["-d", dev.to_str().unwrap_or_default()])?;
    }
    Ok(secs)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let disk = a.disk_mib << 20;
    let fs = XfsMount::new(&a.dir, disk + (disk / 2) + (2 << 30))?;
    let root = fs.mnt.join("store");
    let t = Instant::now();
    let mut s = DiskStore::create(&root, DISK, disk, 1, StoreOptions::default())?;
    let mut seq = 0;
    write(&mut s, &mut seq, a.written_mib, disk, 1)?;
    let older = barrier(&mut s, &mut seq)?;
    write(&mut s, &mut seq, a.later_mib, disk, 2)?;
    let latest = barrier(&mut s, &mut seq)?;
    println!(
        "replica of {} MiB on XFS, {} MiB then {} MiB written in {:.1} s",
        a.disk_mib,
        a.written_mib,
        a.later_mib,
        t.elapsed().as_secs_f64()
    );
    let store = Mutex::new(s);
    let out = fs.mnt.join("test-failover");
    let older_s = time_test_failover(&root, &store, older, &out)?;
    let latest_s = time_test_failover(&root, &store, latest, &out)?;
    let failover_s = time_failover(&store, &fs.mnt.join("failover"))?;
    store
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .close()?;
    println!(
        "test_failover_older_point_s={older_s:.3} ({} MiB of undo)",
        a.later_mib
    );
    drop(fs);

    // The cycle on two sites: reprotect's bytes, failback's loss.
    // The product's binaries are built beside this harness.
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let bins = blockferry_benches::site::Binaries::in_dir(
        exe.parent()
            .context("an executable outside any directory")?,
    );
    let cycle_dir = a.dir.join("cycle");
    std::fs::create_dir_all(&cycle_dir)?;
    let c = raw_cycle(&bins, &cycle_dir, a.cycle_mib << 20)?;
    let d = c.reprotect_differing;
    let ratio = c.reprotect_sent as f64 / d.chunk_bytes().max(1) as f64;
    println!(
        "reprotect of a {} MiB disk: {} chunks of 64 KiB ({} 4 KiB blocks) differed; the agent sent {} bytes ({ratio:.3} of the differing chunks, {:.2} of the differing 4 KiB blocks), hashes {} bytes, the veth carried {} bytes in all",
        a.cycle_mib,
        d.chunks,
        d.blocks,
        c.reprotect_sent,
        c.reprotect_sent as f64 / d.block_bytes().max(1) as f64,
        c.reprotect_hash_bytes,
        c.reprotect_wire,
    );
    println!(
        "planned failback: handoff to writable original disk in {:.2} s, {} bytes of the recovery copy missing",
        c.failback_s, c.failback_loss_bytes
    );
    println!(
        "test_failover_s={latest_s:.3} failover_s={failover_s:.3} reprotect_bytes_ratio={ratio:.3} failback_loss_bytes={}",
        c.failback_loss_bytes
    );
    Ok(())
}
