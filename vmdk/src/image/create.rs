//! Creating disks: a descriptor with a raw flat extent (vmfs,
//! monolithicFlat), or one monolithicSparse file whose metadata is laid out
//! and written before its header, so a half-created file is not a disk.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;

use blockferry_durable::parent_dir;

use super::file::file_len;
use super::{CreateOptions, DiskKind, OpenMode, OpenOptions, VmdkImage};
use crate::descriptor::{Access, CreateType, Descriptor, Extent, ExtentKind};
use crate::sparse::{self, DEFAULT_DESCRIPTOR_SECTORS, Layout, SECTOR};
use crate::{VmdkError, new_cid, new_uuid};

impl VmdkImage {
    /// Create a new disk at `path` (the descriptor, or the single sparse file).
    /// Flat kinds also create `NAME-flat.vmdk` next to it, full size and
    /// thin on the file system. Existing files are refused. The image
    /// returned is open read-write; every path its descriptor names came
    /// from this call, so a parent hint outside the directory is followed.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<VmdkImage, VmdkError> {
        if opts.size == 0 || !opts.size.is_multiple_of(SECTOR) {
            return Err(VmdkError::Invalid {
                path: path.to_owned(),
                what: format!("disk size {} is not a positive multiple of 512", opts.size),
            });
        }
        let sectors = opts.size / SECTOR;
        let cid = opts.cid.unwrap_or_else(new_cid);
        let uuid = opts.uuid.unwrap_or_else(new_uuid);
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| VmdkError::Invalid {
                path: path.to_owned(),
                what: "file name is not UTF-8".into(),
            })?;
        if opts.parent.is_some() && opts.kind != DiskKind::MonolithicSparse {
            return Err(VmdkError::Invalid {
                path: path.to_owned(),
                what: "only a monolithicSparse disk can have a parent".into(),
            });
        }
        let new_file = |p: &Path| {
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(p)
                .map_err(VmdkError::io("create", p, 0))
        };
        match opts.kind {
            DiskKind::Vmfs | DiskKind::MonolithicFlat => {
                let stem = name.strip_suffix(".vmdk").unwrap_or(name);
                let flat_name = format!("{stem}-flat.vmdk");
                let flat_path = parent_dir(path).join(&flat_name);
                let (ct, kind) = match opts.kind {
                    DiskKind::Vmfs => (CreateType::Vmfs, ExtentKind::Vmfs),
                    _ => (CreateType::MonolithicFlat, ExtentKind::Flat),
                };
                let mut d = Descriptor::new(
                    ct,
                    vec![Extent {
                        access: Access::Rw,
                        sectors,
                        kind,
                        file: Some(flat_name),
                        offset: 0,
                    }],
                    cid,
                );
                d.set_disk_database(&opts.adapter, opts.hw_version, uuid, true);
                if path.symlink_metadata().is_ok() {
                    return Err(VmdkError::io("create", path, 0)(std::io::Error::from(
                        std::io::ErrorKind::AlreadyExists,
                    )));
                }
                let f = new_file(&flat_path)?;
                f.set_len(opts.size).map_err(VmdkError::io(
                    "set length of",
                    &flat_path,
                    opts.size,
                ))?;
                f.sync_all()
                    .map_err(VmdkError::io("fsync", &flat_path, 0))?;
                drop(f);
                // The descriptor is created last: its presence means the disk is complete.
                blockferry_durable::replace_file(path, d.render().as_bytes(), None)?;
            }
            DiskKind::MonolithicSparse => {
                let mut d = Descriptor::new(
                    CreateType::MonolithicSparse,
                    vec![Extent {
                        access: Access::Rw,
                        sectors,
                        kind: ExtentKind::Sparse,
                        file: Some(name.to_owned()),
                        offset: 0,
                    }],
                    cid,
                );
                if let Some(p) = &opts.parent {
                    d.parent_cid = p.cid;
                    d.parent_file_name_hint = Some(p.file_name_hint.clone());
                }
                d.set_disk_database(&opts.adapter, opts.hw_version, uuid, true);
                let layout = sparse_layout_for(path, sectors, &d)?;
                let f = new_file(path)?;
                write_new_sparse(&f, path, &layout, &d, None)?;
            }
        }
        blockferry_durable::sync_dir(&parent_dir(path))?;
        Self::open_with(
            path,
            OpenOptions::new(OpenMode::ReadWrite).allow_external_paths(true),
        )
    }
}
/// Lay out a new, empty sparse extent in `file`: zero-filled metadata area
/// (sparse on the file system), tables, directories, descriptor, and the
/// header last so a half-created file is not a valid extent. `gts`, when
/// given, are the grain table entries to store (one per grain), used by
/// export which writes the grains first.
pub(crate) fn write_new_sparse(
    file: &File,
    path: &Path,
    layout: &Layout,
    d: &Descriptor,
    gts: Option<&[u32]>,
) -> Result<(), VmdkError> {
    let text = d.render();
    let h = layout.header;
    let desc_sectors = h.descriptor_size;
    if text.len() as u64 >= desc_sectors * SECTOR {
        return Err(VmdkError::Invalid {
            path: path.to_owned(),
            what: "descriptor does not fit the sectors reserved for it".into(),
        });
    }
    let cur = file_len(file, path)?;
    if cur < h.overhead * SECTOR {
        file.set_len(h.overhead * SECTOR).map_err(VmdkError::io(
            "set length of",
            path,
            h.overhead * SECTOR,
        ))?;
    }
    // The metadata after the descriptor is contiguous: rgd, rgts, gd, gts.
    let meta_start = h.rgd_offset;
    let meta_end = layout.gt_offset + h.num_gd_entries() * h.gt_sectors();
    let mut meta = vec![0u8; ((meta_end - meta_start) * SECTOR) as usize];
    let put_dir = |meta: &mut [u8], at: u64, first_gt: u64| {
        let dir = layout.directory(first_gt);
        let o = ((at - meta_start) * SECTOR) as usize;
        sparse::encode_entries(&dir, &mut meta[o..o + dir.len() * 4]);
    };
    put_dir(&mut meta, h.rgd_offset, layout.rgt_offset);
    put_dir(&mut meta, h.gd_offset, layout.gt_offset);
    if let Some(gts) = gts {
        for first in [layout.rgt_offset, layout.gt_offset] {
            // GTs are contiguous and sector-aligned with 512 entries each, so
            // the entry array maps directly onto them.
            let o = ((first - meta_start) * SECTOR) as usize;
            sparse::encode_entries(gts, &mut meta[o..o + gts.len() * 4]);
        }
    }
    file.write_all_at(&meta, meta_start * SECTOR)
        .map_err(VmdkError::io(
            "write grain directories of",
            path,
            meta_start * SECTOR,
        ))?;
    let mut desc = vec![0u8; (desc_sectors * SECTOR) as usize];
    desc[..text.len()].copy_from_slice(text.as_bytes());
    file.write_all_at(&desc, SECTOR)
        .map_err(VmdkError::io("write descriptor of", path, SECTOR))?;
    file.sync_data()
        .map_err(VmdkError::io("fdatasync", path, 0))?;
    file.write_all_at(&h.encode(), 0)
        .map_err(VmdkError::io("write header of", path, 0))?;
    file.sync_all().map_err(VmdkError::io("fsync", path, 0))
}

/// Layout of a new monolithic sparse file of `sectors` holding descriptor `d`.
pub(crate) fn sparse_layout_for(
    path: &Path,
    sectors: u64,
    d: &Descriptor,
) -> Result<Layout, VmdkError> {
    // Room for the descriptor to grow (CID, parent hint) without moving data.
    let desc_sectors = (d.render().len() as u64 + 1024)
        .div_ceil(SECTOR)
        .max(DEFAULT_DESCRIPTOR_SECTORS);
    let layout = Layout::new(sectors, desc_sectors).map_err(|source| VmdkError::Header {
        path: path.to_owned(),
        source,
    })?;
    // Grain table entries are 32-bit sector numbers: every grain must start
    // below 2 TiB in the file.
    if layout.header.overhead.saturating_add(sectors) > 1 << 32 {
        return Err(VmdkError::Invalid {
            path: path.to_owned(),
            what: format!(
                "a sparse VMDK holds at most 2 TiB, this disk is {} bytes; use a flat (vmfs) disk",
                sectors * SECTOR
            ),
        });
    }
    Ok(layout)
}
