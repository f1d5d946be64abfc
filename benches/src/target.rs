//! Measurements behind `cargo xtask bench target` (run through the
//! `bench-target` binary of this crate, built in release mode). Each figure
//! is paired with a baseline measured in the same run on the same machine:
//! plain `pwrite` + `fdatasync` of the same data at the same offsets for
//! apply, `qemu-img convert -O vmdk` of the same data for export.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockferry_proto::Consistency;

use blockferry_target::batch::{ApplyBatch, raw_chunk, zstd_chunk};
use blockferry_target::error::{Result, TargetError};
use blockferry_target::export::{ExportFormat, export_point};
use blockferry_target::store::{DiskStore, StoreOptions};

/// How the data of a benchmark is laid out on the disk.
#[derive(Debug, Clone, Copy)]
pub enum Pattern {
    /// Consecutive batches of `batch` bytes from offset 0, 64 KiB chunks.
    Sequential { batch: u64 },
    /// Batches of `per_batch` chunks of `chunk` bytes at random aligned offsets.
    Random { chunk: u64, per_batch: usize },
}

/// What one apply measurement writes, and into what.
#[derive(Debug, Clone, Copy)]
pub struct ApplyCase {
    pub pattern: Pattern,
    /// Bytes of data in all.
    pub total: u64,
    /// A recovery point is open, so undo is captured.
    pub with_point: bool,
    /// Chunks zstd-encoded (as the agent sends them) at this level.
    pub zstd_level: Option<i32>,
    /// A thin (monolithicSparse) replica instead of vmfs + flat.
    pub thin: bool,
    /// The whole disk holds other data first (written before the clock
    /// starts, in both runs), so an open point's undo reads and saves real
    /// data instead of never-written zeros.
    pub overwrite: bool,
}

/// One apply measurement: store vs the raw baseline, same data.
#[derive(Debug, Clone, Copy)]
pub struct ApplyFigure {
    pub bytes: u64,
    pub store: Duration,
    pub raw: Duration,
}

/// Deterministic, half-compressible data (like the agent's fio load).
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for (i, w) in buf.chunks_mut(8).enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Every other 4 KiB block repeats a byte: zstd halves it.
        let v = if (i / 512) % 2 == 0 {
            x
        } else {
            seed.wrapping_add(i as u64 / 512)
        };
        let b = v.to_le_bytes();
        w.copy_from_slice(&b[..w.len()]);
    }
}

fn batches(pattern: Pattern, disk_size: u64, total: u64, seed: u64) -> Vec<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut rnd = seed | 1;
    let mut next = || {
        rnd ^= rnd << 13;
        rnd ^= rnd >> 7;
        rnd ^= rnd << 17;
        rnd
    };
    let mut done = 0;
    let mut i = 0u64;
    while done < total {
        let mut writes = Vec::new();
        match pattern {
            Pattern::Sequential { batch } => {
                let base = (done % disk_size) / batch * batch;
                for k in 0..batch / 65536 {
                    let mut data = vec![0u8; 65536];
                    fill(&mut data, seed + i * 64 + k);
                    writes.push((base + k * 65536, data));
                }
                done += batch;
            }
            Pattern::Random { chunk, per_batch } => {
                for k in 0..per_batch {
                    let off = next() % (disk_size / chunk) * chunk;
                    let mut data = vec![0u8; chunk as usize];
                    fill(&mut data, seed + i * 1024 + k as u64);
                    writes.push((off, data));
                    done += chunk;
                }
            }
        }
        out.push(writes);
        i += 1;
    }
    out
}

/// Applies `total` bytes in `pattern` through a fresh store (with an open
/// recovery point when `with_point`, so undo is captured; chunks zstd-encoded
/// as the agent sends them when `zstd_level` is set; a thin replica when
/// `thin`) and through plain
/// pwrite+fdatasync to a preallocated file, timing only the apply calls.
pub fn apply_vs_raw(
    dir: &Path,
    disk_size: u64,
    case: &ApplyCase,
    seed: u64,
) -> Result<ApplyFigure> {
    let ApplyCase {
        pattern,
        total,
        with_point,
        zstd_level,
        thin,
        overwrite,
    } = *case;
    let work = batches(pattern, disk_size, total, seed);
    // The whole disk, in 8 MiB batches.
    let before = if overwrite {
        batches(
            Pattern::Sequential { batch: 8 << 20 },
            disk_size,
            disk_size,
            seed ^ 0x5eed_0f01,
        )
    } else {
        Vec::new()
    };
    let bytes: u64 = work.iter().flatten().map(|(_, d)| d.len() as u64).sum();

    // Baseline first: a preallocated raw file, one fdatasync per batch.
    let raw_path = dir.join("baseline.raw");
    let raw = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&raw_path)
        .map_err(|e| TargetError::io(&raw_path, None, e))?;
    fallocate(&raw, disk_size).map_err(|e| TargetError::io(&raw_path, None, e))?;
    for (off, data) in before.iter().flatten() {
        raw.write_all_at(data, *off)
            .map_err(|e| TargetError::io(&raw_path, Some(*off), e))?;
    }
    raw.sync_all()
        .map_err(|e| TargetError::io(&raw_path, None, e))?;
    let mut raw_time = Duration::ZERO;
    for w in &work {
        let t = Instant::now();
        for (off, data) in w {
            raw.write_all_at(data, *off)
                .map_err(|e| TargetError::io(&raw_path, Some(*off), e))?;
        }
        raw.sync_data()
            .map_err(|e| TargetError::io(&raw_path, None, e))?;
        raw_time += t.elapsed();
    }
    drop(raw);
    std::fs::remove_file(&raw_path).map_err(|e| TargetError::io(&raw_path, None, e))?;

    let root = dir.join("store");
    let disk = format!("bench-{seed}");
    let opts = StoreOptions {
        thin,
        ..StoreOptions::default()
    };
    let mut s = DiskStore::create(&root, &disk, disk_size, 1, opts)?;
    let first_seq = before.len() as u64 + 1;
    for (i, w) in before.iter().enumerate() {
        let chunks = w
            .iter()
            .map(|(off, d)| raw_chunk(*off, d.clone()))
            .collect();
        s.apply(&ApplyBatch {
            disk: disk.clone(),
            generation: 1,
            seq: i as u64 + 1,
            chunks,
        })?;
    }
    s.checkpoint()?;
    if with_point {
        s.create_point(Consistency::CrashConsistent, 1)?;
    }
    let mut store_time = Duration::ZERO;
    for (i, w) in work.iter().enumerate() {
        // Building and hashing the chunks is the agent's work, not the target's.
        let chunks = w
            .iter()
            .map(|(off, d)| match zstd_level {
                Some(level) => zstd_chunk(*off, d, level),
                None => Ok(raw_chunk(*off, d.clone())),
            })
            .collect::<std::io::Result<Vec<blockferry_proto::Chunk>>>()
            .map_err(|e| TargetError::io("zstd", None, e))?;
        let b = ApplyBatch {
            disk: disk.clone(),
            generation: 1,
            seq: first_seq + i as u64,
            chunks,
        };
        let t = Instant::now();
        s.apply(&b)?;
        store_time += t.elapsed();
    }
    // The final checkpoint is part of the cost: the data is not in place until then.
    let t = Instant::now();
    s.close()?;
    store_time += t.elapsed();
    let d = root.join(&disk);
    std::fs::remove_dir_all(&d).map_err(|e| TargetError::io(&d, None, e))?;
    Ok(ApplyFigure {
        bytes,
        store: store_time,
        raw: raw_time,
    })
}

/// One export measurement: our sparse export of a point vs qemu-img
/// converting the same bytes (the replica's flat extent, read-only) to VMDK.
#[derive(Debug, Clone, Copy)]
pub struct ExportFigure {
    pub size: u64,
    pub ours: Duration,
    pub qemu: Duration,
}

/// Fills a disk of `size` bytes with half-compressible data, takes a point,
/// then times `export --format vmdk-sparse` against `qemu-img convert -O vmdk`.
pub fn export_vs_qemu(dir: &Path, size: u64, rounds: usize) -> Result<Vec<ExportFigure>> {
    let root = dir.join("store");
    let disk = "bench-export";
    let mut s = DiskStore::create(&root, disk, size, 1, StoreOptions::default())?;
    let step = 8u64 << 20;
    let mut seq = 0;
    let mut off = 0;
    while off < size {
        let mut chunks = Vec::new();
        for k in 0..step / 65536 {
            let mut data = vec![0u8; 65536];
            fill(&mut data, off / 65536 + k);
            chunks.push(raw_chunk(off + k * 65536, data));
        }
        seq += 1;
        s.apply(&ApplyBatch {
            disk: disk.into(),
            generation: 1,
            seq,
            chunks,
        })?;
        off += step;
    }
    let p = s.create_point(Consistency::CrashConsistent, 2)?;
    s.checkpoint()?;
    let flat = root.join(disk).join("replica-flat.vmdk");
    let mut figures = Vec::new();
    for r in 0..rounds {
        let q_out = dir.join("qemu.vmdk");
        let t = Instant::now();
        let st = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vmdk"])
            .arg(&flat)
            .arg(&q_out)
            .status()
            .map_err(|e| TargetError::io("qemu-img", None, e))?;
        let qemu = t.elapsed();
        if !st.success() {
            return Err(TargetError::Unsupported {
                what: format!("qemu-img convert ({st})"),
                hint: "install qemu-utils".into(),
            });
        }
        std::fs::remove_file(&q_out).map_err(|e| TargetError::io(&q_out, None, e))?;
        let o_out = dir.join("ours.vmdk");
        let t = Instant::now();
        export_point(
            &mut s,
            p.id,
            ExportFormat::VmdkSparse,
            &o_out,
            None,
            &mut |_, _| {},
        )?;
        let ours = t.elapsed();
        std::fs::remove_file(&o_out).map_err(|e| TargetError::io(&o_out, None, e))?;
        eprintln!("export round {r}: ours {ours:?}, qemu-img {qemu:?}");
        figures.push(ExportFigure { size, ours, qemu });
    }
    drop(s);
    let d = root.join(disk);
    std::fs::remove_dir_all(&d).map_err(|e| TargetError::io(&d, None, e))?;
    Ok(figures)
}

/// Allocates `[0, len)` of `file`, as the target's flat extent is, so the
/// baseline writes into allocated blocks too.
fn fallocate(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len =
        libc::off_t::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: the fd is owned by `file`, open for the duration of the call;
    // posix_fallocate takes no pointers.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}
