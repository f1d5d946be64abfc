//! `cargo xtask ci`: everything CI checks, in the order a failure is cheapest to see.

use std::process::Command;

use anyhow::{Result, bail};

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

fn step(name: &str) {
    eprintln!("==> {name}");
}
