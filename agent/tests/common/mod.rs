//! Helpers of the root tests: block devices the test creates itself and
//! removes on drop (even when the test panics), and the root check.
#![allow(dead_code)] // each test file uses a part

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Root tests run only as root. Without root: fail under CI (CI runs as root,
/// so a skip there would hide a broken setup), skip elsewhere.
pub fn require_root(test: &str) -> bool {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if root {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test} needs root and CI is set: run the tests as root");
    }
    eprintln!("skipping {test}: needs root (loop devices, eBPF)");
    false
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

/// A file-backed loop device, detached on drop.
pub struct LoopDev {
    pub path: PathBuf,
    pub size: u64,
    backing: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopDev {
    /// A zero-filled (sparse) loop device of `size` bytes; `direct_io` makes the
    /// loop driver bypass the page cache of the backing file.
    pub fn new(size: u64, direct_io: bool) -> LoopDev {
        let dir = tempfile::Builder::new()
            .prefix("bf-loop")
            .tempdir()
            .expect("tempdir");
        let backing = dir.path().join("disk.img");
        File::create(&backing)
            .and_then(|f| f.set_len(size))
            .expect("create backing file");
        let mut args = vec!["-f", "--show"];
        if direct_io {
            args.push("--direct-io=on");
        }
        let b = backing.to_str().expect("utf-8 temp path");
        args.push(b);
        let path = PathBuf::from(run("losetup", &args).trim());
        LoopDev {
            path,
            size,
            backing,
            _dir: dir,
        }
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("utf-8 device path")
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// /sys/block/<name>
    pub fn sysfs(&self) -> PathBuf {
        Path::new("/sys/block").join(self.path.file_name().expect("device name"))
    }

    /// Creates partition `n` with `addpart` (the kernel here parses no tables).
    pub fn add_partition(&self, n: u32, start_sector: u64, sectors: u64) -> Partition<'_> {
        run(
            "addpart",
            &[
                self.path_str(),
                &n.to_string(),
                &start_sector.to_string(),
                &sectors.to_string(),
            ],
        );
        let path = PathBuf::from(format!("{}p{n}", self.path_str()));
        // devtmpfs creates the node when the kernel announces the partition.
        assert!(
            path.exists(),
            "{} did not appear after addpart",
            path.display()
        );
        Partition {
            disk: self,
            n,
            path,
        }
    }

    /// Reads the whole device, bypassing the page cache of the block device.
    pub fn read_all(&self) -> Vec<u8> {
        let f = open_direct(&self.path, false);
        let mut out = vec![0u8; self.size as usize];
        let mut buf = Box::new(Block([0; BLOCK]));
        for (i, chunk) in out.chunks_mut(BLOCK).enumerate() {
            f.read_exact_at(&mut buf.0, (i * BLOCK) as u64)
                .expect("read device");
            chunk.copy_from_slice(&buf.0[..chunk.len()]);
        }
        out
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let out = Command::new("losetup").arg("-d").arg(&self.path).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "losetup -d {} failed: {}",
                self.path.display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cannot run losetup -d {}: {e}", self.path.display()),
        }
    }
}

/// A partition made with `addpart`, deleted on drop.
pub struct Partition<'a> {
    disk: &'a LoopDev,
    n: u32,
    pub path: PathBuf,
}

impl Drop for Partition<'_> {
    fn drop(&mut self) {
        let _ = Command::new("delpart")
            .arg(&self.disk.path)
            .arg(self.n.to_string())
            .status();
    }
}

pub const BLOCK: usize = 4096;

/// A block-aligned buffer, as O_DIRECT needs.
#[repr(C, align(4096))]
pub struct Block(pub [u8; BLOCK]);

pub fn open_direct(path: &Path, write: bool) -> File {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {} with O_DIRECT: {e}", path.display()))
}

/// `dd` with O_DIRECT: writes `count` blocks of `bs` bytes of random data at block `seek`.
pub fn dd_write(dev: &str, bs: u64, seek: u64, count: u64, extra: &[&str]) {
    let mut args = vec![
        "if=/dev/urandom".to_string(),
        format!("of={dev}"),
        format!("bs={bs}"),
        format!("seek={seek}"),
        format!("count={count}"),
        "oflag=direct".into(),
        "conv=notrunc".into(),
        "status=none".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("dd", &args);
}

/// A zram device made with hot_add (None when zram is not available), removed on drop.
pub struct Zram {
    pub id: u32,
    pub path: PathBuf,
}

impl Zram {
    pub fn new(size: &str) -> Option<Zram> {
        let id: u32 = std::fs::read_to_string("/sys/class/zram-control/hot_add")
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let z = Zram {
            id,
            path: PathBuf::from(format!("/dev/zram{id}")),
        };
        std::fs::write(format!("/sys/block/zram{id}/disksize"), size).expect("set zram disksize");
        Some(z)
    }
}

impl Drop for Zram {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("/sys/block/zram{}/reset", self.id), "1");
        let _ = std::fs::write("/sys/class/zram-control/hot_remove", self.id.to_string());
    }
}
