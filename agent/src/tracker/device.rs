//! Protected devices: from a path to what the kernel programs see (the whole
//! disk's dev_t in the kernel's encoding, and the partition's sector range on
//! that disk), read from sysfs.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::TrackerError;

/// A dev_t in the kernel's internal encoding, `major << 20 | minor`
/// (`MINORBITS` = 20). User space (`stat`, glibc) encodes dev_t differently;
/// convert with [`KernelDev::from_user`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelDev(pub u32);

impl KernelDev {
    const MINOR_BITS: u32 = 20;

    pub fn new(major: u32, minor: u32) -> KernelDev {
        KernelDev((major << Self::MINOR_BITS) | (minor & ((1 << Self::MINOR_BITS) - 1)))
    }

    pub fn major(self) -> u32 {
        self.0 >> Self::MINOR_BITS
    }

    pub fn minor(self) -> u32 {
        self.0 & ((1 << Self::MINOR_BITS) - 1)
    }

    /// From the user-space dev_t of `stat(2)` (glibc's 64-bit encoding).
    pub fn from_user(dev: u64) -> KernelDev {
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        KernelDev::new(major as u32, minor as u32)
    }
}

impl std::fmt::Display for KernelDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major(), self.minor())
    }
}

/// What the tracker needs to know about one protected block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The path the user gave (reported back in events).
    pub path: PathBuf,
    /// The device itself (the partition, or the disk).
    pub dev: KernelDev,
    /// The whole disk the kernel programs see.
    pub disk: KernelDev,
    /// First sector of the device on the whole disk (0 for a whole disk).
    pub start_sector: u64,
    /// Size in 512-byte sectors.
    pub sectors: u64,
}

impl DeviceInfo {
    pub fn size_bytes(&self) -> u64 {
        self.sectors.saturating_mul(512)
    }

    pub fn is_partition(&self) -> bool {
        self.dev != self.disk
    }

    /// The sector range on the whole disk, `[start, end)`.
    pub fn sector_range(&self) -> std::ops::Range<u64> {
        self.start_sector..self.start_sector.saturating_add(self.sectors)
    }

    /// Resolves a block device path through sysfs.
    pub fn resolve(path: &Path) -> Result<DeviceInfo, TrackerError> {
        let meta = std::fs::metadata(path).map_err(|source| TrackerError::Device {
            path: path.to_owned(),
            what: "cannot stat it".into(),
            source: Some(source),
        })?;
        if !meta.file_type().is_block_device() {
            return Err(TrackerError::Device {
                path: path.to_owned(),
                what: "is not a block device; give a disk such as /dev/vdb or a partition such as /dev/vdb1".into(),
                source: None,
            });
        }
        let dev = KernelDev::from_user(meta.rdev());
        Self::from_sysfs(path, dev, Path::new("/sys/dev/block"))
    }

    /// Reads `<sysfs>/<major>:<minor>/{partition,start,size}` and the parent disk's `dev`.
    pub fn from_sysfs(
        path: &Path,
        dev: KernelDev,
        sysfs: &Path,
    ) -> Result<DeviceInfo, TrackerError> {
        let dir = sysfs.join(format!("{}:{}", dev.major(), dev.minor()));
        let dir = std::fs::canonicalize(&dir).map_err(|source| TrackerError::Device {
            path: path.to_owned(),
            what: format!("cannot find {} in sysfs (is /sys mounted?)", dir.display()),
            source: Some(source),
        })?;
        let read_u64 = |file: PathBuf| -> Result<u64, TrackerError> {
            let text = std::fs::read_to_string(&file).map_err(|source| TrackerError::Device {
                path: path.to_owned(),
                what: format!("cannot read {}", file.display()),
                source: Some(source),
            })?;
            text.trim().parse().map_err(|_| TrackerError::Device {
                path: path.to_owned(),
                what: format!("{} holds {:?}, not a number", file.display(), text.trim()),
                source: None,
            })
        };
        let sectors = read_u64(dir.join("size"))?;
        if !dir.join("partition").exists() {
            return Ok(DeviceInfo {
                path: path.to_owned(),
                dev,
                disk: dev,
                start_sector: 0,
                sectors,
            });
        }
        let start_sector = read_u64(dir.join("start"))?;
        let parent = dir.parent().unwrap_or(&dir).join("dev");
        let text = std::fs::read_to_string(&parent).map_err(|source| TrackerError::Device {
            path: path.to_owned(),
            what: format!("cannot read the whole disk's {}", parent.display()),
            source: Some(source),
        })?;
        let disk = text
            .trim()
            .split_once(':')
            .and_then(|(ma, mi)| Some(KernelDev::new(ma.parse().ok()?, mi.parse().ok()?)))
            .ok_or_else(|| TrackerError::Device {
                path: path.to_owned(),
                what: format!(
                    "{} holds {:?}, not major:minor",
                    parent.display(),
                    text.trim()
                ),
                source: None,
            })?;
        Ok(DeviceInfo {
            path: path.to_owned(),
            dev,
            disk,
            start_sector,
            sectors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_encoding_of_user_dev_t() {
        // makedev(7, 3) in glibc is 0x703; the kernel says 7 << 20 | 3.
        assert_eq!(KernelDev::from_user(0x703), KernelDev((7 << 20) | 3));
        // A large minor (259:1048575 style, nvme partitions) spreads over both halves.
        let user = ((259u64 & 0xfff) << 8) | (300_000u64 & 0xff) | ((300_000u64 & !0xff) << 12);
        let k = KernelDev::from_user(user);
        assert_eq!((k.major(), k.minor()), (259, 300_000));
        assert_eq!(k.to_string(), "259:300000");
    }

    #[test]
    fn partition_from_fake_sysfs() {
        let root = tempfile::tempdir().unwrap();
        let disk = root.path().join("block/loop3");
        let part = disk.join("loop3p1");
        std::fs::create_dir_all(&part).unwrap();
        std::fs::write(disk.join("dev"), "7:3\n").unwrap();
        std::fs::write(disk.join("size"), "8192\n").unwrap();
        std::fs::write(part.join("dev"), "259:0\n").unwrap();
        std::fs::write(part.join("size"), "4096\n").unwrap();
        std::fs::write(part.join("start"), "2048\n").unwrap();
        std::fs::write(part.join("partition"), "1\n").unwrap();
        let links = root.path().join("dev-block");
        std::fs::create_dir_all(&links).unwrap();
        std::os::unix::fs::symlink(&part, links.join("259:0")).unwrap();
        std::os::unix::fs::symlink(&disk, links.join("7:3")).unwrap();

        let p = DeviceInfo::from_sysfs(Path::new("/dev/loop3p1"), KernelDev::new(259, 0), &links)
            .unwrap();
        assert_eq!(p.disk, KernelDev::new(7, 3));
        assert_eq!(p.sector_range(), 2048..6144);
        assert!(p.is_partition());
        let d =
            DeviceInfo::from_sysfs(Path::new("/dev/loop3"), KernelDev::new(7, 3), &links).unwrap();
        assert_eq!(
            (d.disk, d.start_sector, d.size_bytes()),
            (KernelDev::new(7, 3), 0, 8192 * 512)
        );
    }
}
