//! `cargo xtask fuzz [--seconds N]`: builds every cargo-fuzz target of `fuzz/` with
//! libFuzzer's coverage instrumentation on the stable toolchain, and runs each for
//! a while. A crash fails the task and leaves its input under `fuzz/artifacts/`.

use std::process::Command;

use anyhow::{Context, Result};

use crate::util::{run, workspace_root};

/// The coverage flags `cargo fuzz` passes, usable without a nightly toolchain.
const SANCOV: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

pub fn run_fuzz(seconds: u64) -> Result<()> {
    let fuzz = workspace_root().join("fuzz");
    let target_dir = crate::util::target_dir().join("fuzz");
    // With an explicit --target, RUSTFLAGS reach the fuzzed code but not build
    // scripts and proc macros, which must not be instrumented.
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    run(Command::new(env!("CARGO"))
        .current_dir(&fuzz)
        .args([
            "build",
            "--release",
            "--locked",
            "--bins",
            "--target",
            &triple,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", SANCOV))
    .context("building the fuzz targets failed")?;
    let bins = target_dir.join(&triple).join("release");
    let targets = std::fs::read_dir(fuzz.join("fuzz_targets"))
        .context("fuzz/fuzz_targets is missing")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect::<Vec<_>>();
    let artifacts = fuzz.join("artifacts");
    for t in &targets {
        let corpus = fuzz.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(artifacts.join(t))?;
        eprintln!("fuzzing {t} for {seconds} s");
        run(Command::new(bins.join(t))
            .arg(&corpus)
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.join(t).display()))
            .arg("-print_final_stats=1"))
        .with_context(|| format!("fuzz target {t} found a crash: see fuzz/artifacts/{t}"))?;
    }
    Ok(())
}
