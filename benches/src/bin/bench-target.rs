//! `bench-target`: the target writer's apply and export figures, each
//! against a baseline measured in the same run (`cargo xtask bench target`
//! builds it in release mode and runs it in a scratch directory).

use anyhow::{Context, Result};
use blockferry_benches::target::{ApplyCase, Pattern, apply_vs_raw, export_vs_qemu};
use clap::Parser;

/// Apply and export measurements against their baselines.
#[derive(Parser)]
struct Args {
    /// Scratch directory (a few GiB free).
    #[arg(long)]
    dir: std::path::PathBuf,
    /// Size of the exported disk in MiB.
    #[arg(long, default_value_t = 2048)]
    export_mib: u64,
    /// Rounds per figure (the median ratio is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Only the figures whose name contains this text (for profiling).
    #[arg(long)]
    only: Option<String>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    bench(
        &a.dir,
        a.export_mib << 20,
        a.rounds.max(1),
        a.only.as_deref(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mbps(bytes: u64, d: std::time::Duration) -> f64 {
    bytes as f64 / d.as_secs_f64().max(1e-9) / 1e6
}

/// Prints each figure with its baseline and their ratio, then a JSON summary.
fn bench(dir: &std::path::Path, export_size: u64, rounds: usize, only: Option<&str>) -> Result<()> {
    let wanted = |name: &str| only.is_none_or(|o| name.contains(o));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let disk = 1u64 << 30;
    let seq = Pattern::Sequential { batch: 1 << 20 };
    let rnd = Pattern::Random {
        chunk: 4096,
        per_batch: 64,
    };
    // (name, pattern, bytes, recovery point open, zstd level of the chunks,
    // thin replica, overwriting data written before)
    let cases = [
        (
            "sequential 1 MiB batches, raw chunks",
            seq,
            512u64 << 20,
            false,
            None,
            false,
            false,
        ),
        (
            "sequential 1 MiB batches, zstd chunks",
            seq,
            512 << 20,
            false,
            Some(1),
            false,
            false,
        ),
        (
            "sequential 1 MiB batches, zstd chunks, point open",
            seq,
            512 << 20,
            true,
            Some(1),
            false,
            false,
        ),
        (
            "random 4 KiB x 64 per batch, raw chunks",
            rnd,
            64 << 20,
            false,
            None,
            false,
            false,
        ),
        (
            "random 4 KiB x 64 per batch, zstd chunks",
            rnd,
            64 << 20,
            false,
            Some(1),
            false,
            false,
        ),
        (
            "random 4 KiB x 64 per batch, zstd chunks, point open",
            rnd,
            64 << 20,
            true,
            Some(1),
            false,
            false,
        ),
        (
            "sequential 1 MiB batches, raw chunks, thin replica",
            seq,
            512 << 20,
            false,
            None,
            true,
            false,
        ),
        (
            "random 4 KiB x 64 per batch, raw chunks, thin replica",
            rnd,
            64 << 20,
            false,
            None,
            true,
            false,
        ),
        (
            "sequential 1 MiB batches, zstd chunks, point open, overwriting data",
            seq,
            512 << 20,
            true,
            Some(1),
            false,
            true,
        ),
        (
            "random 4 KiB x 64 per batch, zstd chunks, point open, overwriting data",
            rnd,
            64 << 20,
            true,
            Some(1),
            false,
            true,
        ),
    ];
    let mut summary = Vec::new();
    for (name, pattern, total, with_point, level, thin, overwrite) in cases {
        if !wanted(name) {
            continue;
        }
        let mut ratios = Vec::new();
        let mut ours = Vec::new();
        let mut raws = Vec::new();
        for r in 0..rounds {
            let case = ApplyCase {
                pattern,
                total,
                with_point,
                zstd_level: level,
                thin,
                overwrite,
            };
            let f = apply_vs_raw(dir, disk, &case, 1 + r as u64)?;
            ours.push(mbps(f.bytes, f.store));
            raws.push(mbps(f.bytes, f.raw));
            ratios.push(f.raw.as_secs_f64() / f.store.as_secs_f64().max(1e-9));
        }
        let (o, r, q) = (median(ours), median(raws), median(ratios));
        println!(
            "apply {name}: store {o:.0} MB/s, pwrite+fdatasync {r:.0} MB/s, ratio {q:.2} (target >= 0.8)"
        );
        summary.push(serde_json::json!({"figure": format!("apply {name}"), "store_mb_s": o, "raw_mb_s": r, "ratio": q}));
    }
    if !wanted("export vmdk-sparse") {
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    let figs = export_vs_qemu(dir, export_size, rounds)?;
    let ratio = median(
        figs.iter()
            .map(|f| f.ours.as_secs_f64() / f.qemu.as_secs_f64().max(1e-9))
            .collect(),
    );
    let ours = median(figs.iter().map(|f| f.ours.as_secs_f64()).collect());
    let qemu = median(figs.iter().map(|f| f.qemu.as_secs_f64()).collect());
    println!(
        "export {} MiB point as vmdk-sparse: {ours:.2} s, qemu-img convert -O vmdk {qemu:.2} s, time ratio {ratio:.2} (target <= 1.0)",
        export_size >> 20
    );
    summary.push(serde_json::json!({"figure": "export vmdk-sparse", "ours_s": ours, "qemu_s": qemu, "ratio": ratio}));
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
