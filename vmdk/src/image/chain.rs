//! The parent chain: a sparse delta names its parent by
//! `parentFileNameHint` and pins it by `parentCID`; grains the delta does
//! not hold read through to the parent (or read as zeros without one).

use std::path::Path;

use super::open::confined;
use super::{OpenMode, OpenOptions, VmdkImage};
use crate::descriptor::{CID_NO_PARENT, Descriptor};
use crate::{DiskRead, VmdkError};

/// Chains deeper than this are refused (it also stops a delta naming itself).
pub(super) const MAX_CHAIN_DEPTH: usize = 64;

/// A parent link of a sparse delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLink {
    /// CID of the parent at the time the delta was taken.
    pub cid: u32,
    /// `parentFileNameHint`: path of the parent, relative to the delta's directory or absolute.
    pub file_name_hint: String,
}

impl VmdkImage {
    /// Opens the parent a delta's descriptor names, read-only and with the
    /// same path policy, and checks that its CID is the delta's `parentCID`
    /// (a parent written after the delta was taken no longer matches it).
    pub(super) fn open_parent(
        path: &Path,
        dir: &Path,
        descriptor: &Descriptor,
        opts: OpenOptions,
        depth: usize,
    ) -> Result<Option<Box<VmdkImage>>, VmdkError> {
        if !descriptor.has_parent() {
            return Ok(None);
        }
        let hint =
            descriptor
                .parent_file_name_hint
                .as_deref()
                .ok_or_else(|| VmdkError::Invalid {
                    path: path.to_owned(),
                    what: "has a parentCID but no parentFileNameHint".into(),
                })?;
        let ppath = confined(path, dir, hint, "parentFileNameHint", opts)?;
        let parent_opts = OpenOptions {
            mode: OpenMode::ReadOnly,
            ..opts
        };
        let parent = Self::open_depth(&ppath, parent_opts, depth + 1)?;
        if parent.descriptor.cid != descriptor.parent_cid {
            return Err(VmdkError::ParentCidMismatch {
                path: path.to_owned(),
                parent: ppath,
                expected: descriptor.parent_cid,
                found: parent.descriptor.cid,
            });
        }
        Ok(Some(Box::new(parent)))
    }

    /// Link to a parent (sparse deltas) or unlink with `None`, persisting the descriptor.
    pub fn set_parent(&mut self, parent: Option<ParentLink>) -> Result<(), VmdkError> {
        match parent {
            Some(p) => {
                self.descriptor.parent_cid = p.cid;
                self.descriptor.parent_file_name_hint = Some(p.file_name_hint);
            }
            None => {
                self.descriptor.parent_cid = CID_NO_PARENT;
                self.descriptor.parent_file_name_hint = None;
            }
        }
        self.write_descriptor()
    }

    /// Read what lies beneath this layer (parent or zeros) for virtual bytes
    /// `[at, at + buf.len())`, clipped to `limit` and the parent's size.
    pub(super) fn read_beneath(
        &self,
        buf: &mut [u8],
        at: u64,
        limit: u64,
    ) -> Result<(), VmdkError> {
        buf.fill(0);
        let Some(parent) = &self.parent else {
            return Ok(());
        };
        let end = (at + buf.len() as u64).min(limit).min(parent.size);
        if end > at {
            parent.read_at(&mut buf[..(end - at) as usize], at)?;
        }
        Ok(())
    }
}
