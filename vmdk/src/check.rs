//! The structural checker: what `qemu-img check` does not verify for VMDK.
//!
//! For each sparse extent: the primary and redundant grain tables hold the
//! same entries; every table and grain lies inside the file; no grain
//! overlaps another grain or any metadata (header, descriptor, directories,
//! tables); zeroed-grain entries only with the flag that gives them meaning.
//! For each flat extent: the file has exactly the size the descriptor says.
//! For a delta: the parent opens and its CID equals `parentCID`.
//!
//! The checker reads the raw structures itself rather than going through
//! [`crate::VmdkImage::open`], so it can describe damage that would make an
//! open fail. Paths in the descriptor are confined as for an open
//! ([`crate::OpenOptions`]): a file outside the descriptor's directory is
//! reported, not followed, unless [`check_with`] allows it.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use blockferry_durable::parent_dir;

use crate::VmdkError;
use crate::descriptor::{ExtentKind, MAX_DESCRIPTOR_LEN};
use crate::image::read_descriptor;
use crate::image::{OpenMode, OpenOptions, VmdkImage, confined};
use crate::sparse::{self, GTE_UNALLOCATED, GTE_ZERO, HEADER_LEN, SECTOR, SparseHeader};

/// Problems listed before the checker stops collecting (it still counts).
const MAX_PROBLEMS: usize = 1000;

/// One structural problem. Sectors are 512-byte units of the named file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// An extent file is missing or unreadable, or its header is bad.
    BadExtent { file: PathBuf, error: String },
    /// The sparse header holds fewer sectors than the descriptor's extent line.
    CapacityMismatch {
        file: PathBuf,
        header: u64,
        descriptor: u64,
    },
    /// A grain directory or table lies (partly) outside the file.
    MetadataPastEof {
        file: PathBuf,
        what: String,
        sector: u64,
        file_len: u64,
    },
    /// One directory has a table for an index where the other has none.
    DirectoriesDiffer { file: PathBuf, gd_index: u64 },
    /// Primary and redundant grain table entries differ.
    TablesDiffer {
        file: PathBuf,
        grain: u64,
        primary: u32,
        redundant: u32,
    },
    /// A grain starts or ends past the end of the file.
    GrainPastEof {
        file: PathBuf,
        grain: u64,
        sector: u64,
        file_len: u64,
    },
    /// A grain overlaps header, descriptor, a directory or a table.
    GrainOverlapsMetadata {
        file: PathBuf,
        grain: u64,
        sector: u64,
        what: String,
    },
    /// Two grains share sectors.
    GrainOverlap {
        file: PathBuf,
        grain: u64,
        other: u64,
        sector: u64,
    },
    /// Two metadata structures share sectors.
    MetadataOverlap {
        file: PathBuf,
        what: String,
        other: String,
    },
    /// A GTE of 1 without the zeroed-grain flag: other readers take it as data at sector 1.
    ZeroGrainWithoutFlag { file: PathBuf, grain: u64 },
    /// A flat extent's file size differs from the descriptor.
    FlatSizeMismatch {
        file: PathBuf,
        expected: u64,
        actual: u64,
    },
    /// The parent named by `parentFileNameHint` cannot be opened or has another CID.
    BadParent { error: String },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::BadExtent { file, error } => {
                write!(f, "{}: extent unusable: {error}", file.display())
            }
            Problem::CapacityMismatch {
                file,
                header,
                descriptor,
            } => write!(
                f,
                "{}: sparse header holds {header} sectors, descriptor says {descriptor}",
                file.display()
            ),
            Problem::MetadataPastEof {
                file,
                what,
                sector,
                file_len,
            } => write!(
                f,
                "{}: {what} at sector {sector} runs past the end of the file ({file_len} bytes)",
                file.display()
            ),
            Problem::DirectoriesDiffer { file, gd_index } => write!(
                f,
                "{}: grain directory entry {gd_index} is set in one directory and empty in the other",
                file.display()
            ),
            Problem::TablesDiffer {
                file,
                grain,
                primary,
                redundant,
            } => write!(
                f,
                "{}: grain {grain}: primary table says sector {primary}, redundant table says {redundant}",
                file.display()
            ),
            Problem::GrainPastEof {
                file,
                grain,
                sector,
                file_len,
            } => write!(
                f,
                "{}: grain {grain} at sector {sector} is past the end of the file ({file_len} bytes)",
                file.display()
            ),
            Problem::GrainOverlapsMetadata {
                file,
                grain,
                sector,
                what,
            } => write!(
                f,
                "{}: grain {grain} at sector {sector} overlaps the {what}",
                file.display()
            ),
            Problem::GrainOverlap {
                file,
                grain,
                other,
                sector,
            } => write!(
                f,
                "{}: grains {other} and {grain} share sectors from sector {sector}",
                file.display()
            ),
            Problem::MetadataOverlap { file, what, other } => {
                write!(f, "{}: the {other} overlaps the {what}", file.display())
            }
            Problem::ZeroGrainWithoutFlag { file, grain } => write!(
                f,
                "{}: grain {grain} is marked zeroed but the header lacks the zeroed-grain flag",
                file.display()
            ),
            Problem::FlatSizeMismatch {
                file,
                expected,
                actual,
            } => write!(
                f,
                "{}: flat extent is {actual} bytes, descriptor says {expected}",
                file.display()
            ),
            Problem::BadParent { error } => write!(f, "parent unusable: {error}"),
        }
    }
}

/// Result of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// The file checked.
    pub path: PathBuf,
    /// Its `createType`.
    pub create_type: String,
    /// Virtual size in bytes.
    pub capacity: u64,
    /// Extent lines in the descriptor.
    pub extents: usize,
    /// Data grains referenced by the primary tables.
    pub grains: u64,
    /// At most 1000 problems; `problem_count` counts all.
    pub problems: Vec<Problem>,
    /// Problems found in all, also those past the first 1000.
    pub problem_count: u64,
}

impl CheckReport {
    /// True when no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problem_count == 0
    }

    fn push(&mut self, p: Problem) {
        self.problem_count += 1;
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(p);
        }
    }
}

/// Check the VMDK at `path` (descriptor or monolithic sparse file). An
/// error means the top file could not be read or parsed at all; anything
/// else wrong is a [`Problem`] in the report. Extent and parent paths that
/// are absolute or leave the descriptor's directory are reported as
/// problems and not followed.
pub fn check(path: &Path) -> Result<CheckReport, VmdkError> {
    check_with(path, false)
}

/// [`check`], following extent and parent paths outside the descriptor's
/// directory when `allow_external_paths` (for images whose origin is trusted).
pub fn check_with(path: &Path, allow_external_paths: bool) -> Result<CheckReport, VmdkError> {
    let opts = OpenOptions::new(OpenMode::ReadOnly).allow_external_paths(allow_external_paths);
    let file = File::open(path).map_err(VmdkError::io("open", path, 0))?;
    let len = file
        .metadata()
        .map_err(VmdkError::io("stat", path, 0))?
        .len();
    let mut head = vec![0u8; HEADER_LEN.min(len as usize)];
    file.read_exact_at(&mut head, 0)
        .map_err(VmdkError::io("read", path, 0))?;
    let d = if head.starts_with(b"KDMV") {
        let h = SparseHeader::parse(&head).map_err(|source| VmdkError::Header {
            path: path.to_owned(),
            source,
        })?;
        let off = h.descriptor_offset * SECTOR;
        let n = (h.descriptor_size * SECTOR)
            .min(MAX_DESCRIPTOR_LEN as u64)
            .min(len.saturating_sub(off));
        read_descriptor(&file, path, off, n, "read embedded descriptor of")?
    } else {
        if len > MAX_DESCRIPTOR_LEN as u64 {
            return Err(VmdkError::Invalid {
                path: path.to_owned(),
                what: "not a VMDK: no KDMV magic and too big for a descriptor".into(),
            });
        }
        read_descriptor(&file, path, 0, len, "read")?
    };
    let mut report = CheckReport {
        path: path.to_owned(),
        create_type: d.create_type.to_string(),
        capacity: d.capacity_sectors().saturating_mul(SECTOR),
        extents: d.extents.len(),
        grains: 0,
        problems: Vec::new(),
        problem_count: 0,
    };
    let dir = parent_dir(path);
    for e in &d.extents {
        let Some(name) = &e.file else { continue };
        let p = match confined(path, &dir, name, "extent", opts) {
            Ok(p) => p,
            Err(err) => {
                report.push(Problem::BadExtent {
                    file: PathBuf::from(name),
                    error: err.to_string(),
                });
                continue;
            }
        };
        match e.kind {
            ExtentKind::Flat | ExtentKind::Vmfs => match std::fs::metadata(&p) {
                Err(err) => report.push(Problem::BadExtent {
                    file: p,
                    error: err.to_string(),
                }),
                Ok(m) => {
                    let expected = (e.offset + e.sectors) * SECTOR;
                    let actual = m.len();
                    let wrong = if e.offset == 0 {
                        actual != expected
                    } else {
                        actual < expected
                    };
                    if wrong {
                        report.push(Problem::FlatSizeMismatch {
                            file: p,
                            expected,
                            actual,
                        });
                    }
                }
            },
            ExtentKind::Sparse => check_sparse(&p, e.sectors, &mut report),
            _ => {}
        }
    }
    if d.has_parent() {
        let hint = d.parent_file_name_hint.as_deref().unwrap_or_default();
        let parent = confined(path, &dir, hint, "parentFileNameHint", opts)
            .and_then(|p| VmdkImage::open_with(&p, opts));
        if let Err(e) = parent {
            report.push(Problem::BadParent {
                error: error_chain(&e),
            });
        } else if let Err(e) = VmdkImage::open_with(path, opts) {
            // Opening the child checks parentCID against the parent's CID.
            if matches!(e, VmdkError::ParentCidMismatch { .. }) {
                report.push(Problem::BadParent {
                    error: error_chain(&e),
                });
            }
        }
    }
    Ok(report)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A region of a sparse file, for the overlap sweep.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Region {
    Header,
    Descriptor,
    Gd,
    Rgd,
    Gt(u64),
    Rgt(u64),
    Grain(u64),
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Region::Header => f.write_str("header"),
            Region::Descriptor => f.write_str("embedded descriptor"),
            Region::Gd => f.write_str("grain directory"),
            Region::Rgd => f.write_str("redundant grain directory"),
            Region::Gt(i) => write!(f, "grain table {i}"),
            Region::Rgt(i) => write!(f, "redundant grain table {i}"),
            Region::Grain(g) => write!(f, "grain {g}"),
        }
    }
}

fn read_entries(file: &File, sector: u64, count: u64) -> std::io::Result<Vec<u32>> {
    let mut b = vec![0u8; (count * 4) as usize];
    file.read_exact_at(&mut b, sector * SECTOR)?;
    Ok(sparse::decode_entries(&b))
}

fn check_sparse(p: &Path, sectors: u64, report: &mut CheckReport) {
    let bad = |error: String| Problem::BadExtent {
        file: p.to_owned(),
        error,
    };
    let file = match File::open(p) {
        Ok(f) => f,
        Err(e) => return report.push(bad(e.to_string())),
    };
    let file_len = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return report.push(bad(e.to_string())),
    };
    let mut hb = [0u8; HEADER_LEN];
    if let Err(e) = file.read_exact_at(&mut hb, 0) {
        return report.push(bad(e.to_string()));
    }
    let h = match SparseHeader::parse(&hb) {
        Ok(h) => h,
        Err(e) => return report.push(bad(e.to_string())),
    };
    let h = if h.gd_offset == sparse::GD_AT_END {
        let mut fb = [0u8; HEADER_LEN];
        let footer = file_len
            .checked_sub(sparse::FOOTER_FROM_END)
            .ok_or_else(|| "too short for a footer".to_owned())
            .and_then(|off| file.read_exact_at(&mut fb, off).map_err(|e| e.to_string()))
            .and_then(|()| SparseHeader::parse(&fb).map_err(|e| e.to_string()));
        match footer {
            Ok(f) if f.gd_offset != sparse::GD_AT_END => f,
            Ok(_) => return report.push(bad("footer has no grain directory offset".into())),
            Err(e) => return report.push(bad(format!("footer: {e}"))),
        }
    } else {
        h
    };
    if h.capacity < sectors {
        report.push(Problem::CapacityMismatch {
            file: p.to_owned(),
            header: h.capacity,
            descriptor: sectors,
        });
    }
    let file_sectors = file_len.div_ceil(SECTOR);
    let n_gd = h.num_gd_entries();
    let gd_sectors = h.gd_sectors();
    let gt_sectors = h.gt_sectors();
    let mut regions: Vec<(u64, u64, Region)> = vec![(0, 1, Region::Header)];
    if h.descriptor_size > 0 {
        regions.push((
            h.descriptor_offset,
            h.descriptor_offset + h.descriptor_size,
            Region::Descriptor,
        ));
    }
    let past_eof = |what: String, sector: u64, report: &mut CheckReport| {
        report.push(Problem::MetadataPastEof {
            file: p.to_owned(),
            what,
            sector,
            file_len,
        })
    };
    let read_dir = |sector: u64,
                    region: Region,
                    report: &mut CheckReport,
                    regions: &mut Vec<(u64, u64, Region)>| {
        if sector.saturating_add(gd_sectors) > file_sectors {
            past_eof(region.to_string(), sector, report);
            return None;
        }
        regions.push((sector, sector + gd_sectors, region));
        match read_entries(&file, sector, n_gd) {
            Ok(v) => Some(v),
            Err(e) => {
                report.push(bad(e.to_string()));
                None
            }
        }
    };
    let Some(gd) = read_dir(h.gd_offset, Region::Gd, report, &mut regions) else {
        return;
    };
    let rgd = if h.has_redundant() {
        read_dir(h.rgd_offset, Region::Rgd, report, &mut regions)
    } else {
        None
    };
    let per = u64::from(h.num_gtes_per_gt);
    let mut grains: Vec<(u64, u64)> = Vec::new();
    let load_gt = |sector: u32,
                   region: Region,
                   report: &mut CheckReport,
                   regions: &mut Vec<(u64, u64, Region)>| {
        let s = u64::from(sector);
        if s == 0 {
            return None;
        }
        if s + gt_sectors > file_sectors {
            report.push(Problem::MetadataPastEof {
                file: p.to_owned(),
                what: region.to_string(),
                sector: s,
                file_len,
            });
            return None;
        }
        regions.push((s, s + gt_sectors, region));
        read_entries(&file, s, per).ok()
    };
    for i in 0..n_gd {
        let Some(&gs) = gd.get(i as usize) else { break };
        let gt = load_gt(gs, Region::Gt(i), report, &mut regions);
        let rgt = match &rgd {
            Some(r) => {
                let rs = r.get(i as usize).copied().unwrap_or(0);
                if (rs == 0) != (gs == 0) {
                    report.push(Problem::DirectoriesDiffer {
                        file: p.to_owned(),
                        gd_index: i,
                    });
                }
                load_gt(rs, Region::Rgt(i), report, &mut regions)
            }
            None => None,
        };
        let Some(gt) = gt else { continue };
        for (j, &e) in gt.iter().enumerate() {
            let grain = i * per + j as u64;
            if grain >= h.num_grains() {
                break;
            }
            if let Some(r) = &rgt
                && r[j] != e
            {
                report.push(Problem::TablesDiffer {
                    file: p.to_owned(),
                    grain,
                    primary: e,
                    redundant: r[j],
                });
            }
            match e {
                GTE_UNALLOCATED => {}
                GTE_ZERO => {
                    if !h.has_zero_grain() {
                        report.push(Problem::ZeroGrainWithoutFlag {
                            file: p.to_owned(),
                            grain,
                        });
                    }
                }
                s => grains.push((grain, u64::from(s))),
            }
        }
    }
    report.grains += grains.len() as u64;
    // A qemu-written last grain may stop at the end of its data: tolerate a
    // short tail on the grain that ends the file, nothing else.
    let last_start = grains.iter().map(|g| g.1).max().unwrap_or(0);
    for &(grain, s) in &grains {
        // A compressed grain's length is in its marker; count its first sector.
        let end = if h.is_compressed() {
            s + 1
        } else {
            s + h.grain_size
        };
        if s >= file_sectors || (end > file_sectors && s != last_start) {
            report.push(Problem::GrainPastEof {
                file: p.to_owned(),
                grain,
                sector: s,
                file_len,
            });
        }
        regions.push((s, end, Region::Grain(grain)));
    }
    // Sweep by start: each region must start at or after the furthest end so far.
    regions.sort_by_key(|r| (r.0, r.1));
    let mut furthest: Option<(u64, Region)> = None;
    for &(start, end, region) in &regions {
        if let Some((fend, freg)) = furthest
            && start < fend
        {
            let problem = match (freg, region) {
                (Region::Grain(a), Region::Grain(b)) => Problem::GrainOverlap {
                    file: p.to_owned(),
                    grain: b,
                    other: a,
                    sector: start,
                },
                (Region::Grain(g), m) | (m, Region::Grain(g)) => Problem::GrainOverlapsMetadata {
                    file: p.to_owned(),
                    grain: g,
                    sector: start,
                    what: m.to_string(),
                },
                (a, b) => Problem::MetadataOverlap {
                    file: p.to_owned(),
                    what: a.to_string(),
                    other: b.to_string(),
                },
            };
            report.push(problem);
        }
        if furthest.is_none_or(|(fend, _)| end > fend) {
            furthest = Some((end, region));
        }
    }
}
