//! Helpers shared by the xtask commands: running programs, installing the Debian
//! packages a task needs, and the kernel prerequisites (root, BTF, tracefs).
#![allow(dead_code)] // used by the tasks as they land

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs `cmd`, failing with its command line when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Runs `cmd` and returns its standard output as text.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The Debian packages blockferry's build, tests, demo and benchmarks use, with a
/// program (or file) that tells whether each is installed.
pub const PACKAGES: &[(&str, &str)] = &[
    ("clang", "/usr/bin/clang"),
    ("llvm", "/usr/bin/llvm-strip"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("libbpf-dev", "/usr/include/bpf/bpf_helpers.h"),
    ("libelf-dev", "/usr/include/libelf.h"),
    ("zlib1g-dev", "/usr/include/zlib.h"),
    ("pkg-config", "/usr/bin/pkg-config"),
    ("fio", "/usr/bin/fio"),
    ("e2fsprogs", "/sbin/mkfs.ext4"),
    ("xfsprogs", "/sbin/mkfs.xfs"),
    ("util-linux", "/sbin/losetup"),
    ("iperf3", "/usr/bin/iperf3"),
    ("rsync", "/usr/bin/rsync"),
    ("qemu-utils", "/usr/bin/qemu-img"),
    ("iproute2", "/sbin/ip"),
    // The SQLite workload of the DR cycle test.
    ("sqlite3", "/usr/bin/sqlite3"),
];

/// Installs the packages of [`PACKAGES`] that are missing (needs root and apt).
pub fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, probe)| !Path::new(probe).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {}; install them with `sudo apt-get install {}` or run this task as root",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("apt-get install failed; check the network and the apt sources")
}

/// Makes sure the kernel side can run: root, BTF, and a mounted tracefs.
pub fn ensure_kernel_prereqs() -> Result<()> {
    if !is_root() {
        bail!("loading eBPF programs needs root (CAP_BPF and CAP_PERFMON): run this task as root");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "/sys/kernel/btf/vmlinux is missing: this kernel was built without CONFIG_DEBUG_INFO_BTF, which CO-RE needs; use a kernel with BTF (every major distribution ships one since 2020)"
        );
    }
    if !Path::new("/sys/kernel/tracing/events").exists() {
        run(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))
            .context("tracefs is not mounted and mounting it at /sys/kernel/tracing failed")?;
    }
    Ok(())
}

/// Builds the workspace binaries in release mode and returns the directory that holds them.
pub fn build_release_binaries() -> Result<PathBuf> {
    let root = workspace_root();
    run(Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["build", "--release", "--locked", "--bins"])
        .args([
            "-p",
            "blockferry-agent",
            "-p",
            "blockferry-relay",
            "-p",
            "blockferry-target",
        ]))?;
    Ok(target_dir().join("release"))
}

/// Cargo's target directory of this workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Loop devices need the loop driver; `losetup -f` creates nodes through loop-control.
pub fn ensure_loop_support() -> Result<()> {
    if !Path::new("/dev/loop-control").exists() {
        run(Command::new("modprobe").arg("loop")).context(
            "/dev/loop-control is missing and `modprobe loop` failed; the tests need loop devices",
        )?;
    }
    Ok(())
}

/// Builds the release harness `bin` of `blockferry-benches` and runs it with
/// `--dir` a fresh scratch directory under the target dir, removed after
/// (a leftover of an interrupted run is only scratch data).
pub fn run_bench_harness(bin: &str) -> Result<()> {
    run(Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(["build", "--release", "--locked", "-p", "blockferry-benches"])
        .args(["--bin", bin]))?;
    let scratch = target_dir().join(bin);
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)
            .with_context(|| format!("cannot clear {}", scratch.display()))?;
    }
    std::fs::create_dir_all(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let result = run(Command::new(target_dir().join("release").join(bin))
        .arg("--dir")
        .arg(&scratch)
        .env("RUST_LOG", "warn"));
    let cleanup = std::fs::remove_dir_all(&scratch)
        .with_context(|| format!("cannot remove {}", scratch.display()));
    result.and(cleanup)
}
