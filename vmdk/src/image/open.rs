//! Opening an image: the top file (a descriptor, or a sparse file with an
//! embedded one), each extent it names, and the parent chain. Every path a
//! descriptor names is confined to the descriptor's directory unless the
//! caller allows otherwise ([`OpenOptions`]).

use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use blockferry_durable::parent_dir;
use tracing::debug;

use super::chain::MAX_CHAIN_DEPTH;
use super::extent::SparseExtent;
use super::file::{corrupt, file_len, open_file, read_descriptor};
use super::{ExtentData, OpenExtent, OpenMode, OpenOptions, VmdkImage};
use crate::VmdkError;
use crate::descriptor::{CreateType, ExtentKind, MAX_DESCRIPTOR_LEN};
use crate::sparse::{HEADER_LEN, SECTOR, SparseHeader};

impl VmdkImage {
    /// Opens a descriptor file or a monolithic sparse file, and its parent
    /// chain, with the paths in descriptors confined to their directory
    /// (see [`OpenOptions`]).
    pub fn open(path: &Path, mode: OpenMode) -> Result<VmdkImage, VmdkError> {
        Self::open_with(path, OpenOptions::new(mode))
    }

    /// Like [`VmdkImage::open`], with the path policy of `opts`.
    pub fn open_with(path: &Path, opts: OpenOptions) -> Result<VmdkImage, VmdkError> {
        Self::open_depth(path, opts, 0)
    }

    pub(super) fn open_depth(
        path: &Path,
        opts: OpenOptions,
        depth: usize,
    ) -> Result<VmdkImage, VmdkError> {
        let mode = opts.mode;
        if depth > MAX_CHAIN_DEPTH {
            return Err(VmdkError::Invalid {
                path: path.to_owned(),
                what: format!("parent chain is deeper than {MAX_CHAIN_DEPTH} (a loop?)"),
            });
        }
        let file = open_file(path, mode)?;
        let len = file_len(&file, path)?;
        let mut head = vec![0u8; HEADER_LEN.min(len as usize)];
        file.read_exact_at(&mut head, 0)
            .map_err(VmdkError::io("read", path, 0))?;
        let dir = parent_dir(path);
        let (descriptor, embedded, first) = if head.starts_with(b"KDMV") {
            let header = SparseHeader::parse(&head).map_err(|source| VmdkError::Header {
                path: path.to_owned(),
                source,
            })?;
            if header.descriptor_offset == 0 || header.descriptor_size == 0 {
                return Err(VmdkError::Invalid {
                    path: path.to_owned(),
                    what: "is a sparse extent without a descriptor; open the descriptor file that names it".into(),
                });
            }
            let off = header.descriptor_offset * SECTOR;
            let n = (header.descriptor_size * SECTOR).min(MAX_DESCRIPTOR_LEN as u64);
            if off.saturating_add(n) > len {
                return Err(corrupt(
                    path,
                    off,
                    "embedded descriptor runs past the end of the file",
                ));
            }
            let d = read_descriptor(&file, path, off, n, "read embedded descriptor of")?;
            let ext = SparseExtent::open(file, path, header, mode)?;
            (d, true, Some(ext))
        } else if head.starts_with(b"COWD") {
            return Err(VmdkError::Unsupported {
                path: path.to_owned(),
                what: "ESX sparse (COWD) extent".into(),
            });
        } else {
            if len > MAX_DESCRIPTOR_LEN as u64 {
                return Err(VmdkError::Invalid {
                    path: path.to_owned(),
                    what: format!(
                        "not a VMDK: no KDMV magic and {len} bytes is too big for a descriptor"
                    ),
                });
            }
            let d = read_descriptor(&file, path, 0, len, "read")?;
            (d, false, None)
        };
        match &descriptor.create_type {
            CreateType::Vmfs
            | CreateType::MonolithicFlat
            | CreateType::MonolithicSparse
            | CreateType::TwoGbMaxExtentFlat
            | CreateType::TwoGbMaxExtentSparse => {}
            CreateType::StreamOptimized if mode == OpenMode::ReadOnly => {}
            CreateType::StreamOptimized => {
                return Err(VmdkError::Unsupported {
                    path: path.to_owned(),
                    what: "writing createType streamOptimized (compressed grains)".into(),
                });
            }
            other => {
                return Err(VmdkError::Unsupported {
                    path: path.to_owned(),
                    what: format!("createType {other}"),
                });
            }
        }
        let mut first = first;
        let mut extents = Vec::with_capacity(descriptor.extents.len());
        let mut start = 0u64;
        for (i, e) in descriptor.extents.iter().enumerate() {
            let len = e.sectors * SECTOR;
            let data = match e.kind {
                ExtentKind::Zero => ExtentData::Zero,
                ExtentKind::Flat | ExtentKind::Vmfs => {
                    let p = extent_path(path, &dir, e.file.as_deref(), opts)?;
                    let f = open_file(&p, mode)?;
                    let flen = file_len(&f, &p)?;
                    let base = e.offset * SECTOR;
                    if base.saturating_add(len) > flen {
                        return Err(VmdkError::Invalid {
                            path: p,
                            what: format!(
                                "flat extent is {flen} bytes but the descriptor needs {} (wrong size?)",
                                base.saturating_add(len)
                            ),
                        });
                    }
                    ExtentData::Flat {
                        file: f,
                        path: p,
                        base,
                    }
                }
                ExtentKind::Sparse => {
                    let ext = match first.take() {
                        Some(ext) if i == 0 => ext,
                        _ => {
                            let p = extent_path(path, &dir, e.file.as_deref(), opts)?;
                            let f = open_file(&p, mode)?;
                            let mut h = [0u8; HEADER_LEN];
                            f.read_exact_at(&mut h, 0).map_err(VmdkError::io(
                                "read sparse header of",
                                &p,
                                0,
                            ))?;
                            let header =
                                SparseHeader::parse(&h).map_err(|source| VmdkError::Header {
                                    path: p.clone(),
                                    source,
                                })?;
                            SparseExtent::open(f, &p, header, mode)?
                        }
                    };
                    if ext.header.capacity < e.sectors {
                        return Err(corrupt(
                            &ext.path,
                            12,
                            format!(
                                "sparse extent holds {} sectors but the descriptor says {}",
                                ext.header.capacity, e.sectors
                            ),
                        ));
                    }
                    ExtentData::Sparse(Box::new(ext))
                }
                other => {
                    return Err(VmdkError::Unsupported {
                        path: path.to_owned(),
                        what: format!("extent type {}", other.as_str()),
                    });
                }
            };
            extents.push(OpenExtent {
                start,
                len,
                access: e.access,
                data,
            });
            start = start.checked_add(len).ok_or_else(|| VmdkError::Invalid {
                path: path.to_owned(),
                what: "extents add up to more than 2^64 bytes".into(),
            })?;
        }
        let parent = Self::open_parent(path, &dir, &descriptor, opts, depth)?;
        debug!(path = %path.display(), create_type = %descriptor.create_type, size = start, "opened vmdk");
        Ok(VmdkImage {
            path: path.to_owned(),
            descriptor,
            embedded,
            extents,
            parent,
            mode,
            size: start,
        })
    }
}

/// The file an extent line names, confined like every descriptor path.
fn extent_path(
    descriptor: &Path,
    dir: &Path,
    name: Option<&str>,
    opts: OpenOptions,
) -> Result<PathBuf, VmdkError> {
    let name = name.ok_or_else(|| VmdkError::Invalid {
        path: descriptor.to_owned(),
        what: "an extent line names no file".into(),
    })?;
    confined(descriptor, dir, name, "extent", opts)
}

/// `dir` joined with `name`, a path read from the descriptor at
/// `descriptor`; refused when `name` is absolute or climbs out of `dir`
/// (`..` past its start), unless `opts` allows external paths. The test is
/// on the text: a symlink inside the directory is followed like any file.
pub(crate) fn confined(
    descriptor: &Path,
    dir: &Path,
    name: &str,
    what: &'static str,
    opts: OpenOptions,
) -> Result<PathBuf, VmdkError> {
    if !opts.allow_external_paths && !stays_inside(Path::new(name)) {
        return Err(VmdkError::PathOutsideDirectory {
            path: descriptor.to_owned(),
            what,
            named: name.to_owned(),
        });
    }
    Ok(dir.join(name))
}

/// True when the relative path `p` never leaves the directory it starts in.
fn stays_inside(p: &Path) -> bool {
    let mut depth = 0usize;
    for c in p.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_stay_in_the_directory_are_inside() {
        for p in [
            "a.vmdk",
            "./a-flat.vmdk",
            "sub/a.vmdk",
            "sub/../a.vmdk",
            "a b.vmdk",
        ] {
            assert!(stays_inside(Path::new(p)), "{p}");
        }
    }

    #[test]
    fn absolute_paths_and_climbing_out_are_outside() {
        for p in ["/etc/passwd", "../a.vmdk", "sub/../../a.vmdk", "./..", ".."] {
            assert!(!stays_inside(Path::new(p)), "{p}");
        }
    }

    #[test]
    fn confined_refuses_by_default_and_joins_when_allowed() {
        let d = Path::new("d/disk.vmdk");
        let refused = confined(
            d,
            Path::new("d"),
            "../x",
            "extent",
            OpenMode::ReadOnly.into(),
        );
        assert!(matches!(
            refused,
            Err(VmdkError::PathOutsideDirectory { what: "extent", .. })
        ));
        let allowed = OpenOptions::new(OpenMode::ReadOnly).allow_external_paths(true);
        assert_eq!(
            confined(d, Path::new("d"), "../x", "extent", allowed).unwrap(),
            Path::new("d/../x")
        );
    }
}
