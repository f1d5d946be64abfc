//! `cargo xtask ci`: everything CI checks, in the order a failure is cheapest to see.

use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{self, is_root, run, workspace_root};

pub fn run_ci() -> Result<()> {
    util::ensure_packages()?;
    let in_ci = std::env::var_os("CI").is_some();
    if is_root() {
        util::ensure_kernel_prereqs()?;
        util::ensure_loop_support()?;
    } else if in_ci {
        bail!("CI runs the kernel tests and needs root: run `cargo xtask ci` as root");
    } else {
        eprintln!("not root: tests that need the kernel (eBPF, loop devices) will be skipped");
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
