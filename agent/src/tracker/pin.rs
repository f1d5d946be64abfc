//! Tracking that outlives the agent process: the maps and the attachment links
//! are pinned in bpffs, so the kernel keeps recording writes of protected
//! disks while no agent runs (a restart, an upgrade, a crash), and the next
//! process drains the ring buffer from where the last one stopped.
//!
//! Pins live in memory only: a reboot removes them, and with them the claim of
//! continuity. The `bf_build` map stamps the set with the object that made it;
//! an unfinished or foreign set is removed and replaced (tracking restarts, the
//! devices need a resync). The only `unsafe` here is `statfs` and `mount`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::abi;
use super::sys::BpfSource;
use super::{Tracker, TrackerError};

/// Where the agent pins its tracker by default.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/blockferry";

/// Where bpffs is mounted when it is not (the systemd and iproute2 convention).
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// `BPF_FS_MAGIC` of `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The maps pinned, by their names in the object (also the pin file names).
pub(super) const MAPS: [&str; 5] = [
    abi::MAP_EVENTS,
    abi::MAP_PROTECTED,
    abi::MAP_DROPS,
    abi::MAP_SEEN,
    abi::MAP_BUILD,
];

/// Every program that may have an attachment link pinned.
const PROGRAMS: [&str; 3] = ["bf_bio_queue", "bf_rq_complete", "bf_bio_complete"];

pub(super) fn link_name(program: &str) -> String {
    format!("link_{program}")
}

/// Whether tracking went on without a gap while no agent process ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Continuity {
    /// The pins of an earlier process were found with their hooks attached:
    /// the kernel kept tracking, and its unread events are drained now.
    Resumed,
    /// No pins: the first start since boot (a reboot removes them) or since
    /// `untrack --all`. What was written before is unknown.
    Fresh,
    /// Pins were found but unusable (another build, an unfinished set, a hook
    /// detached); they were removed and the programs loaded anew.
    Replaced { reason: String },
}

impl Continuity {
    /// True only for [`Continuity::Resumed`]; anything else needs a resync of
    /// every device (per device, see [`Tracker::continuous`]).
    pub fn is_continuous(&self) -> bool {
        matches!(self, Continuity::Resumed)
    }
}

/// An identity of the embedded object: pins made by another build may have
/// other layouts or other programs.
fn build_id() -> u64 {
    // FNV-1a: stable across processes (std's hashers are seeded per process).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in BpfSource::object() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // 0 means "not stamped yet".
    h | 1
}

fn io_err(what: String, source: std::io::Error) -> TrackerError {
    TrackerError::Io { what, source }
}

fn c_path(path: &Path) -> Result<CString, TrackerError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| TrackerError::Device {
        path: path.to_owned(),
        what: "path contains a NUL byte".into(),
        source: None,
    })
}

/// The file system type of the file system holding `path`.
fn fs_type(path: &Path) -> Result<i64, TrackerError> {
    let c = c_path(path)?;
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path that outlives the call, and `buf`
    // is a writable statfs the kernel fills; it is read only on success.
    let rc = unsafe { libc::statfs(c.as_ptr(), buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(io_err(
            format!("statfs {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: statfs returned 0, so it initialised `buf`.
    let st = unsafe { buf.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    Ok(st.f_type as i64)
}

fn mount_bpffs(at: &Path) -> Result<(), TrackerError> {
    let target = c_path(at)?;
    let fstype = c"bpf";
    let data = c"mode=0700";
    // SAFETY: all pointers are NUL-terminated strings that outlive the call;
    // mount(2) only reads them.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io_err(
            format!(
                "mounting bpffs at {} (do it by hand: mount -t bpf bpf {})",
                at.display(),
                at.display()
            ),
            std::io::Error::last_os_error(),
        ));
    }
    tracing::info!(at = %at.display(), "mounted bpffs");
    Ok(())
}

/// Makes sure `dir` exists on a bpf file system, mounting bpffs at
/// /sys/fs/bpf when `dir` is under it and nothing is mounted there yet.
fn ensure_bpffs(dir: &Path) -> Result<(), TrackerError> {
    let mut probe: PathBuf = dir.to_owned();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if fs_type(&probe)? != BPF_FS_MAGIC {
        if dir.starts_with(BPFFS_ROOT) && fs_type(Path::new(BPFFS_ROOT))? != BPF_FS_MAGIC {
            mount_bpffs(Path::new(BPFFS_ROOT))?;
        } else {
            return Err(TrackerError::Device {
                path: dir.to_owned(),
                what: format!(
                    "not on a bpf file system: pin the tracker under {BPFFS_ROOT} \
                     (or mount bpffs above this directory)"
                ),
                source: None,
            });
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| io_err(format!("creating the pin directory {}", dir.display()), e))
}

/// Whether anything of ours is pinned in `dir`.
fn any_pin(dir: &Path) -> bool {
    MAPS.iter()
        .map(|m| dir.join(m))
        .chain(PROGRAMS.iter().map(|p| dir.join(link_name(p))))
        .any(|p| p.exists())
}

/// Locks the pin directory (flock, released when the process dies): two
/// agents sharing one pinned tracker would release each other's filters.
fn lock_dir(dir: &Path) -> Result<std::fs::File, TrackerError> {
    let f = std::fs::File::open(dir)
        .map_err(|e| io_err(format!("opening the pin directory {}", dir.display()), e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(TrackerError::Device {
            path: dir.to_owned(),
            what: "another blockferry agent is using this pinned tracker: stop it first \
                   (or give this one its own pin directory)"
                .into(),
            source: None,
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err(
            format!("locking the pin directory {}", dir.display()),
            e,
        )),
    }
}

/// Removes the pins under `dir` and the directory, unless an agent uses them.
fn remove_pins(dir: &Path) -> Result<bool, TrackerError> {
    if !dir.exists() {
        return Ok(false);
    }
    let _lock = lock_dir(dir)?;
    let removed = remove_pin_files(dir)?;
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(io_err(
                format!(
                    "removing the pin directory {} (files other than blockferry's are in it?)",
                    dir.display()
                ),
                e,
            ));
        }
    }
    Ok(removed)
}

/// Removes the pins under `dir`: the programs detach and the maps are freed
/// once no process holds them. Missing pins are fine. The directory stays (its
/// lock is held by the caller).
fn remove_pin_files(dir: &Path) -> Result<bool, TrackerError> {
    let mut removed = false;
    // Links first: a write after that is not recorded, so stopping the
    // recording comes before freeing what it records into.
    let names = PROGRAMS
        .iter()
        .map(|p| link_name(p))
        .chain(MAPS.iter().map(|m| m.to_string()));
    for name in names {
        let path = dir.join(&name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing the pin {}", path.display()), e)),
        }
    }
    Ok(removed)
}

impl Tracker<BpfSource> {
    /// Loads the tracker so that it keeps tracking across agent restarts: the
    /// first time, loads, attaches and pins under `pin_dir` (on bpffs, mounted
    /// at /sys/fs/bpf if needed); when pins are present, opens them without
    /// loading or attaching anything, and resumes reading the ring buffer
    /// where the previous process stopped. Protect every device before the
    /// first poll, then call [`forget_inherited`](Tracker::forget_inherited).
    pub fn load_persistent(pin_dir: &Path) -> Result<(Self, Continuity), TrackerError> {
        Self::load_persistent_with_ring_bytes(pin_dir, abi::RINGBUF_BYTES as u32)
    }

    /// Like [`load_persistent`](Self::load_persistent); `bytes` sizes the ring
    /// buffer when it is created (pins keep the size they were made with).
    pub fn load_persistent_with_ring_bytes(
        pin_dir: &Path,
        bytes: u32,
    ) -> Result<(Self, Continuity), TrackerError> {
        super::sys::check_prerequisites()?;
        ensure_bpffs(pin_dir)?;
        let lock = lock_dir(pin_dir)?;
        let build = build_id();
        let continuity = if any_pin(pin_dir) {
            match BpfSource::open_pinned(pin_dir, build) {
                Ok(mut source) => {
                    source.hold_lock(lock);
                    tracing::info!(pins = %pin_dir.display(), "resumed the pinned tracker");
                    return Ok((Tracker::resume(source)?, Continuity::Resumed));
                }
                Err(reason) => {
                    tracing::warn!(
                        pins = %pin_dir.display(),
                        %reason,
                        "pinned tracker unusable: replacing it; every protected device needs a resync"
                    );
                    remove_pin_files(pin_dir)?;
                    Continuity::Replaced { reason }
                }
            }
        } else {
            Continuity::Fresh
        };
        match BpfSource::load_pinned(bytes, pin_dir, build) {
            Ok(mut source) => {
                source.hold_lock(lock);
                tracing::info!(pins = %pin_dir.display(), "loaded and pinned the tracker");
                Ok((Tracker::with_source(source), continuity))
            }
            Err(e) => {
                // Half a set would be mistaken for an interrupted start next
                // time anyway; leave nothing attached behind.
                if let Err(rm) = remove_pin_files(pin_dir) {
                    tracing::warn!(error = %rm, "cannot remove the partial pins");
                }
                Err(e)
            }
        }
    }

    /// Removes the pinned tracker under `pin_dir` (uninstall, `untrack
    /// --all`): tracking stops for every device. Refused while an agent uses
    /// it. Returns whether anything was pinned.
    pub fn remove_pins(pin_dir: &Path) -> Result<bool, TrackerError> {
        remove_pins(pin_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_id_is_stable_and_never_zero() {
        assert_eq!(build_id(), build_id());
        assert_ne!(build_id(), 0);
    }

    #[test]
    fn continuity_is_only_resumed() {
        assert!(Continuity::Resumed.is_continuous());
        assert!(!Continuity::Fresh.is_continuous());
        assert!(!Continuity::Replaced { reason: "x".into() }.is_continuous());
    }
}
