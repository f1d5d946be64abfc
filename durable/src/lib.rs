//! The one definition of "durable" in blockferry, and the one zero-block test.
//!
//! Durable means fsynced. A file that must appear whole or not at all is
//! written to a temp file beside it, fsynced, renamed over the old one, and
//! then the directory is fsynced so the rename itself survives a crash. A new
//! directory is only there after a crash once its parent was fsynced too.
//! Every component uses these helpers rather than its own copy, so the dance
//! is written (and reviewed) once.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// An I/O step of a durable operation that failed, with the path it was on.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}", path.display())]
pub struct DurableError {
    /// What was being done: `create`, `write`, `fsync`, `rename to`, …
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl DurableError {
    fn at(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DurableError {
        let path = path.to_owned();
        move |source| DurableError { op, path, source }
    }
}

/// fsyncs a directory, which makes the creation, rename or removal of its
/// entries durable.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(DurableError::at("fsync directory", dir))
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Sets the process's file mode creation mask and returns the previous one.
/// The services call it with `0o077` before creating anything: they hold
/// replicated disk data (spool, replicas, journals, exports) that no other
/// local user may read, and a mask covers every file and directory created
/// afterwards, by whichever module creates it, which per-call modes cannot
/// promise. It is process-wide: call it from a service's start, not from a
/// library routine that shares the process with others.
pub fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask(2) takes a plain integer, cannot fail and touches no
    // memory of ours; it only swaps the process's creation mask.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    old as u32
}

/// Makes `dir`, which may have been created before the services kept their
/// files private, accessible to its owner only (0700).
pub fn make_private_dir(dir: &Path) -> Result<(), DurableError> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(DurableError::at("restrict the permissions of", dir))
}

/// Creates `dir` and any missing ancestors, fsyncing the parent of each
/// directory it created, so the whole path survives a crash. An existing
/// directory is left as it is.
pub fn create_dir_all(dir: &Path) -> Result<(), DurableError> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = parent_dir(dir);
    if dir.parent().is_some_and(|p| !p.as_os_str().is_empty()) {
        create_dir_all(&parent)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        // Raced with another creator: the directory is what we wanted.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(DurableError::at("create directory", dir)(e)),
    }
    sync_dir(&parent)
}

/// Replaces `path` with `bytes` so that a crash leaves the old content or the
/// new, never a mix or an empty file: temp file beside it, fsync, rename,
/// fsync of the directory. `mode` (e.g. `0o600` for a key) is set on the temp
/// file before any byte is written, whatever the umask.
pub fn replace_file(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<(), DurableError> {
    let tmp = temp_path(path);
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if let Some(m) = mode {
        opts.mode(m);
    }
    let written = (|| {
        let mut f = opts.open(&tmp).map_err(DurableError::at("create", &tmp))?;
        if let Some(m) = mode {
            // open()'s mode is masked by the umask and ignored for an existing file.
            f.set_permissions(std::fs::Permissions::from_mode(m))
                .map_err(DurableError::at("set permissions of", &tmp))?;
        }
        f.write_all(bytes)
            .map_err(DurableError::at("write", &tmp))?;
        f.sync_all().map_err(DurableError::at("fsync", &tmp))
    })();
    if let Err(e) = written {
        // A half-written temp file is never renamed, so it is harmless; do not leave it.
        let _ignored = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(DurableError::at("rename to", path))?;
    sync_dir(&parent_dir(path))
}

/// `.NAME.PID-N.tmp` beside `path`: hidden, never mistaken for the file
/// itself, and unique to this writer, so two writers of the same file (a
/// command beside the service, two threads) never write into one temp file;
/// the last rename wins whole.
pub fn temp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    parent_dir(path).join(format!(".{name}.{}-{n}.tmp", std::process::id()))
}

/// True when every byte is zero. Checks a block at a time: OR-folding a fixed
/// block vectorises, and a non-zero block ends the test early.
pub fn is_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_file_leaves_new_content_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        replace_file(&p, b"old", None).unwrap();
        replace_file(&p, b"new", None).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn replace_file_sets_the_mode_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, b"x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        replace_file(&p, b"secret", Some(0o600)).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn replace_file_in_a_missing_directory_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing").join("f");
        let e = replace_file(&p, b"x", None).unwrap_err();
        assert_eq!(e.op, "create");
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn temp_paths_of_one_file_differ_between_writers() {
        let p = Path::new("/store/d/state.json");
        let (a, b) = (temp_path(p), temp_path(p));
        assert_ne!(a, b);
        assert_eq!(a.parent(), p.parent());
        let name = a.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with(".state.json.") && name.ends_with(".tmp"),
            "{name}"
        );
    }

    #[test]
    fn create_dir_all_creates_every_missing_level_and_accepts_existing() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a").join("b").join("c");
        create_dir_all(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_all(&deep).unwrap();
    }

    #[test]
    fn is_zero_sees_a_single_set_byte_anywhere() {
        let mut v = vec![0u8; 65536 + 17];
        assert!(is_zero(&v));
        assert!(is_zero(&[]));
        for at in [0, 4095, 4096, 65535, 65536 + 16] {
            v[at] = 1;
            assert!(!is_zero(&v), "byte {at}");
            v[at] = 0;
        }
    }
}
