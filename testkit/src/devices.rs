//! Block devices and file systems a root-only test creates itself and removes on
//! drop, even when the test panics: loop devices, partitions, zram, tmpfs.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::privileged::run;

/// A loop device over a file, detached on drop.
#[derive(Debug)]
pub struct LoopDev {
    pub path: PathBuf,
    pub size: u64,
    backing: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl LoopDev {
    /// A zero-filled (sparse) loop device of `size` bytes over a file of its own;
    /// `direct_io` makes the loop driver bypass the page cache of the backing file.
    pub fn new(size: u64, direct_io: bool) -> LoopDev {
        let dir = tempfile::Builder::new()
            .prefix("bf-loop")
            .tempdir()
            .expect("tempdir");
        let backing = dir.path().join("disk.img");
        File::create(&backing)
            .and_then(|f| f.set_len(size))
            .expect("create backing file");
        let mut dev = LoopDev::attach(&backing, direct_io);
        dev._dir = Some(dir);
        dev
    }

    /// A loop device over the existing file `backing` (which the caller keeps).
    pub fn attach(backing: &Path, direct_io: bool) -> LoopDev {
        let size = std::fs::metadata(backing)
            .unwrap_or_else(|e| panic!("cannot stat {}: {e}", backing.display()))
            .len();
        let mut args = vec!["-f", "--show"];
        if direct_io {
            args.push("--direct-io=on");
        }
        args.push(backing.to_str().expect("utf-8 backing path"));
        let path = PathBuf::from(run("losetup", &args).trim());
        LoopDev {
            path,
            size,
            backing: backing.to_owned(),
            _dir: None,
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
#[derive(Debug)]
pub struct Partition<'a> {
    disk: &'a LoopDev,
    n: u32,
    pub path: PathBuf,
}

impl Drop for Partition<'_> {
    fn drop(&mut self) {
        match Command::new("delpart")
            .arg(&self.disk.path)
            .arg(self.n.to_string())
            .status()
        {
            Ok(s) if s.success() => {}
            other => eprintln!("delpart {} {}: {other:?}", self.disk.path.display(), self.n),
        }
    }
}

pub const BLOCK: usize = 4096;

/// A block-aligned buffer, as O_DIRECT needs.
#[derive(Debug)]
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
#[derive(Debug)]
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
        if let Err(e) = std::fs::write(format!("/sys/block/zram{}/reset", self.id), "1") {
            eprintln!("cannot reset zram{}: {e}", self.id);
        }
        if let Err(e) = std::fs::write("/sys/class/zram-control/hot_remove", self.id.to_string()) {
            eprintln!("cannot remove zram{}: {e}", self.id);
        }
    }
}

/// A mount made by the test, unmounted on drop (also on panic).
#[derive(Debug)]
pub struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    /// Runs `mount ARGS... DIR` (e.g. `["-t", "ext4", "/dev/loop0"]`).
    pub fn new(args: &[&str], dir: &Path) -> Mounted {
        let mut all = args.to_vec();
        all.push(dir.to_str().expect("utf-8 mount point"));
        run("mount", &all);
        Mounted {
            dir: dir.to_owned(),
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        match Command::new("umount").arg(&self.dir).status() {
            Ok(st) if st.success() => {}
            other => eprintln!("umount {}: {other:?}", self.dir.display()),
        }
    }
}

/// A tmpfs of `bytes` mounted on a fresh temp dir for this test; unmounted on
/// drop (also on panic).
#[derive(Debug)]
pub struct Tmpfs {
    // Declared first: unmounted before the mount point is removed.
    mount: Mounted,
    _holder: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(bytes: u64) -> Tmpfs {
        let holder = tempfile::tempdir().expect("temp dir");
        let dir = holder.path().join("fs");
        std::fs::create_dir(&dir).expect("create the mount point");
        let size = format!("size={bytes}");
        let mount = Mounted::new(&["-t", "tmpfs", "-o", &size, "blockferry-test"], &dir);
        Tmpfs {
            mount,
            _holder: holder,
        }
    }

    /// The root of the mounted file system.
    pub fn path(&self) -> &Path {
        self.mount.path()
    }
}
