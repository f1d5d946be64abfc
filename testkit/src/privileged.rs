//! The root check of the root-only tests, and running a command.

use std::process::Command;

/// Whether this process runs with effective uid 0 (/proc/self is owned by it).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The first line of a root-only test (one marked `#[ignore = "needs root: ..."]`):
/// panics with advice when the test was run explicitly without root, so it fails
/// with the reason instead of somewhere deep in losetup or the BPF loader.
pub fn require_root(test: &str) {
    assert!(
        is_root(),
        "{test} needs root (loop devices, mounts, eBPF): run it as root, or without --ignored"
    );
}

/// Runs a command, panicking with its output if it fails; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
