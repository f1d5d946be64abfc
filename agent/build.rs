//! Builds the kernel programs of `ebpf/` for the tracker:
//! 1. `vmlinux.h` from the running kernel's BTF (`bpftool btf dump`), into OUT_DIR,
//!    never committed: CO-RE relocates field offsets and enum values at load time,
//!    so the header only has to name the types;
//! 2. `tracker.bpf.o` with clang, embedded by `src/tracker/sys.rs`;
//! 3. `tracker_abi.rs`: the `#define BF_*` constants of `ebpf/tracker.h` as Rust
//!    constants, so the event layout and map names are written down once.
//!
//! Steps 1 and 2 need clang and bpftool and run only with the `bpf` feature (on
//! by default); step 3 reads a header and always runs, so the pure logic builds
//! and tests without the kernel toolchain.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, exit};

fn main() {
    if let Err(msg) = build() {
        eprintln!("error: {msg}");
        exit(1);
    }
}

fn find_tool(name: &str, env_var: &str) -> Option<PathBuf> {
    println!("cargo::rerun-if-env-changed={env_var}");
    if let Some(p) = env::var_os(env_var) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = env::var_os("PATH").unwrap_or_default();
    // bpftool lives in /usr/sbin, which is not on every user's PATH.
    env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn build() -> Result<(), String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let ebpf = manifest.join("../ebpf");
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let source = ebpf.join("tracker.bpf.c");
    let header = ebpf.join("tracker.h");
    // The directory too: a new header included by the programs must rebuild them.
    println!("cargo::rerun-if-changed={}", ebpf.display());
    println!("cargo::rerun-if-changed={}", source.display());
    println!("cargo::rerun-if-changed={}", header.display());
    println!("cargo::rerun-if-env-changed=BLOCKFERRY_BTF");

    write_abi(&header, &out.join("tracker_abi.rs"))?;
    if env::var_os("CARGO_FEATURE_BPF").is_none() {
        return Ok(());
    }

    let btf = env::var_os("BLOCKFERRY_BTF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/sys/kernel/btf/vmlinux"));
    if !btf.exists() {
        return Err(format!(
            "{} is missing: the kernel programs are compiled against the kernel's BTF; \
             use a kernel built with CONFIG_DEBUG_INFO_BTF=y (all major distributions since 2020) \
             or point BLOCKFERRY_BTF at a vmlinux BTF file",
            btf.display()
        ));
    }
    let bpftool = find_tool("bpftool", "BPFTOOL").ok_or(
        "bpftool not found: install the Debian package `bpftool` (apt-get install bpftool) \
         or set BPFTOOL to its path",
    )?;
    let clang = find_tool("clang", "CLANG").ok_or(
        "clang not found: install the Debian package `clang` (apt-get install clang) \
         or set CLANG to its path",
    )?;
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        return Err(
            "/usr/include/bpf/bpf_helpers.h not found: install the Debian package \
                    `libbpf-dev` (apt-get install libbpf-dev)"
                .into(),
        );
    }

    let vmlinux = out.join("vmlinux.h");
    let dump = Command::new(&bpftool)
        .args(["btf", "dump", "file"])
        .arg(&btf)
        .args(["format", "c"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bpftool.display()))?;
    if !dump.status.success() {
        return Err(format!(
            "`bpftool btf dump file {} format c` failed: {}",
            btf.display(),
            String::from_utf8_lossy(&dump.stderr).trim()
        ));
    }
    fs::write(&vmlinux, &dump.stdout)
        .map_err(|e| format!("cannot write {}: {e}", vmlinux.display()))?;

    let object = out.join("tracker.bpf.o");
    let cc = Command::new(&clang)
        .args([
            "-g",
            "-O2",
            "-target",
            "bpf",
            "-D__TARGET_ARCH_x86",
            "-Wall",
        ])
        .arg("-I")
        .arg(&out)
        .arg("-I")
        .arg(&ebpf)
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&object)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", clang.display()))?;
    if !cc.status.success() {
        return Err(format!(
            "clang failed to compile {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&cc.stderr)
        ));
    }
    Ok(())
}

/// Turns `#define BF_NAME value` lines into `pub const NAME: T = value;`
/// (strings become `&str`, numbers `u64`).
fn write_abi(header: &Path, dest: &Path) -> Result<(), String> {
    let text =
        fs::read_to_string(header).map_err(|e| format!("cannot read {}: {e}", header.display()))?;
    let mut rs = String::from("// Generated by agent/build.rs from ebpf/tracker.h. Do not edit.\n");
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix("#define BF_") else {
            continue;
        };
        let mut parts = rest.splitn(2, char::is_whitespace);
        let name = parts.next().unwrap_or_default();
        let value = parts.next().unwrap_or_default();
        let value = value.split("/*").next().unwrap_or_default().trim();
        if let Some(s) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            rs.push_str(&format!("pub const {name}: &str = {s:?};\n"));
        } else {
            let n = match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => value.parse::<u64>(),
            }
            .map_err(|_| {
                format!(
                    "{}: cannot parse `#define BF_{name} {value}`",
                    header.display()
                )
            })?;
            rs.push_str(&format!("pub const {name}: u64 = {n};\n"));
        }
    }
    fs::write(dest, rs).map_err(|e| format!("cannot write {}: {e}", dest.display()))
}
