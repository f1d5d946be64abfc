//! `cargo xtask ci`: everything CI checks, in the order a failure is cheapest to see.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{self, is_root, run, workspace_root};

/// Ignored tests that are not root-only tests, left out of the root-only step:
/// benchmarks (they belong in release builds and never assert) and helpers that
/// a test runs in a child process.
const IGNORED_NOT_ROOT_TESTS: &[&str] = &[
    // target-writer/tests/vmdk_export_bench.rs
    "export_vs_qemu_img_convert",
    // agent/tests/tracker_pin.rs, run by tracking_outlives_the_process_that_pinned_it
    "pin_child_protects_and_exits",
];

pub fn run_ci() -> Result<()> {
    util::ensure_packages()?;
    let in_ci = std::env::var_os("CI").is_some();
    if is_root() {
        util::ensure_kernel_prereqs()?;
        util::ensure_loop_support()?;
    } else if in_ci {
        bail!("CI runs the kernel tests and needs root: run `cargo xtask ci` as root");
    } else {
        eprintln!(
            "not root: tests that need the kernel (eBPF, loop devices, mounts) are ignored, not run"
        );
    }
    let root = workspace_root();
    let cargo = || {
        let mut c = Command::new(env!("CARGO"));
        c.current_dir(&root);
        c
    };
    step("format");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    step("lints");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("tests");
    run(cargo().args(["test", "--workspace", "--locked"]))?;
    // After the tests: they built the binaries the units start.
    step("systemd units");
    check_units(&root)?;
    if is_root() {
        // Root-only tests are `#[ignore = "needs root: ..."]`, so that without
        // root they show as ignored instead of passing: run them explicitly here.
        step("root-only tests");
        let mut args = vec![
            "test",
            "--workspace",
            "--locked",
            "--",
            "--ignored",
            "--exact",
        ];
        for name in IGNORED_NOT_ROOT_TESTS {
            args.extend(["--skip", name]);
        }
        run(cargo().args(args))?;
        // The agent the tests just built: load, attach, report, detach.
        step("build-and-load");
        let agent = crate::util::target_dir()
            .join("debug")
            .join("blockferry-agent");
        run(Command::new(agent).arg("probe"))?;
    }
    step("fuzz (every decoder, briefly)");
    crate::fuzz::run_fuzz(20)?;
    step("done: all checks passed");
    Ok(())
}

/// The units of dist/systemd and the highest `systemd-analyze security`
/// exposure each may have (0-100, ten times the printed score): a unit that
/// loses hardening fails CI instead of drifting.
const UNITS: &[(&str, u32)] = &[
    ("blockferry-agent.service", 30),
    ("blockferry-relay.service", 20),
    ("blockferry-target.service", 20),
];

/// `systemd-analyze verify` on every unit (any complaint fails, unknown keys
/// included, which verify only warns about), then the exposure scores.
/// The units name /usr/bin, where packages install; verify checks that the
/// binary exists, so a copy pointing at the binaries just built is verified.
pub fn check_units(root: &Path) -> Result<()> {
    if !util::have("systemd-analyze") {
        eprintln!("systemd-analyze not found: units not verified (apt-get install systemd)");
        return Ok(());
    }
    let bin_dir = util::target_dir().join("debug");
    let dir = util::target_dir().join("systemd-verify");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot empty {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut copies = Vec::new();
    for (unit, _) in UNITS {
        let src = root.join("dist/systemd").join(unit);
        let text = std::fs::read_to_string(&src)
            .with_context(|| format!("cannot read {}", src.display()))?;
        let text = text.replace(
            "/usr/bin/blockferry-",
            &format!("{}/blockferry-", bin_dir.display()),
        );
        let copy = dir.join(unit);
        std::fs::write(&copy, text).with_context(|| format!("cannot write {}", copy.display()))?;
        copies.push(copy);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&copies)
        .output()
        .context("cannot run systemd-analyze verify")?;
    let complaints = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !complaints.trim().is_empty() {
        bail!(
            "systemd-analyze verify rejects dist/systemd (with the binaries of {}):\n{complaints}",
            bin_dir.display()
        );
    }
    for ((unit, threshold), copy) in UNITS.iter().zip(&copies) {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--threshold={threshold}"))
            .arg(copy)
            .output()
            .context("cannot run systemd-analyze security")?;
        let report = String::from_utf8_lossy(&out.stdout);
        let overall = report
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or("no overall exposure level reported for this unit");
        eprintln!("{}", overall.trim_start_matches(['→', ' ']));
        if !out.status.success() {
            bail!(
                "{unit}: exposure above {}.{} (systemd-analyze security --offline=yes dist/systemd/{unit} lists what is open)",
                threshold / 10,
                threshold % 10
            );
        }
    }
    Ok(())
}

fn step(name: &str) {
    eprintln!("==> {name}");
}
