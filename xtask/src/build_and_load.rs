//! `cargo xtask build-and-load`: build the kernel programs and the agent, then let the
//! agent load and attach them on this kernel, report what it found, and detach.

use std::process::Command;

use anyhow::{Context, Result};

use crate::util::{self, workspace_root};

pub fn run() -> Result<()> {
    util::ensure_packages()?;
    util::ensure_kernel_prereqs()?;
    let root = workspace_root();
    util::run(Command::new(env!("CARGO")).current_dir(&root).args([
        "build",
        "--locked",
        "-p",
        "blockferry-agent",
        "--bin",
        "blockferry-agent",
    ]))
    .context("building the kernel programs and the agent failed")?;
    let agent = util::target_dir().join("debug").join("blockferry-agent");
    util::run(Command::new(&agent).arg("probe"))
        .context("the agent could not load and attach the tracker programs")
}
