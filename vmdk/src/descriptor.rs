//! The VMDK text descriptor: parsing and generation, no I/O.
//!
//! A descriptor has three parts: a header (`version`, `CID`, `parentCID`,
//! `createType`, `parentFileNameHint`, ...), extent lines
//! (`RW 2097152 VMFS "disk-flat.vmdk"`), and the disk database (`ddb.*`).
//! Keys this module does not know are kept in order so that a parse and a
//! render round-trip what VMware or qemu wrote.
//!
//! Field order on output matters to qemu: it finds the CID with a plain
//! substring search for `CID`, so `CID=` must come before `parentCID=`.

use std::fmt;

use thiserror::Error;

/// `parentCID` of a disk with no parent.
pub const CID_NO_PARENT: u32 = 0xffff_ffff;

/// Descriptors larger than this are not descriptors (qemu refuses more than
/// a few MiB too); the bound keeps a mistaken `open` of a data file cheap.
pub const MAX_DESCRIPTOR_LEN: usize = 1 << 20;

/// What is wrong with a descriptor. `line` is 1-based.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DescriptorError {
    #[error("descriptor is {len} bytes, more than the {max} a descriptor may have")]
    TooLong { len: usize, max: usize },
    #[error("descriptor is not UTF-8 text (byte {offset})")]
    NotText { offset: usize },
    #[error("descriptor has no `{0}` line")]
    Missing(&'static str),
    #[error("descriptor line {line}: `{key}` has invalid value `{value}`")]
    BadValue {
        line: usize,
        key: String,
        value: String,
    },
    #[error("descriptor line {line}: bad extent line: {reason}")]
    BadExtent { line: usize, reason: &'static str },
    #[error("descriptor line {line}: not `key = value`, an extent line or a comment")]
    BadLine { line: usize },
    #[error("descriptor has no extent lines")]
    NoExtents,
}

/// The `createType` of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CreateType {
    /// ESXi: descriptor plus one raw `-flat.vmdk` extent (`VMFS` extent line).
    Vmfs,
    /// Hosted: descriptor plus one raw `-flat.vmdk` extent (`FLAT` line).
    MonolithicFlat,
    /// Hosted: one sparse file with the descriptor embedded.
    MonolithicSparse,
    /// Hosted: descriptor plus sparse extents of at most 2 GiB each.
    TwoGbMaxExtentSparse,
    /// Hosted: descriptor plus flat extents of at most 2 GiB each.
    TwoGbMaxExtentFlat,
    /// Compressed grains with markers, for streaming (OVF).
    StreamOptimized,
    /// ESXi snapshot delta (`VMFSSPARSE` extent).
    VmfsSparse,
    /// Anything else, kept verbatim.
    Other(String),
}

impl CreateType {
    pub fn as_str(&self) -> &str {
        match self {
            CreateType::Vmfs => "vmfs",
            CreateType::MonolithicFlat => "monolithicFlat",
            CreateType::MonolithicSparse => "monolithicSparse",
            CreateType::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            CreateType::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            CreateType::StreamOptimized => "streamOptimized",
            CreateType::VmfsSparse => "vmfsSparse",
            CreateType::Other(s) => s,
        }
    }

    fn from_value(s: &str) -> CreateType {
        // VMware matches case-insensitively; so do we.
        match s.to_ascii_lowercase().as_str() {
            "vmfs" => CreateType::Vmfs,
            "monolithicflat" => CreateType::MonolithicFlat,
            "monolithicsparse" => CreateType::MonolithicSparse,
            "twogbmaxextentsparse" => CreateType::TwoGbMaxExtentSparse,
            "twogbmaxextentflat" => CreateType::TwoGbMaxExtentFlat,
            "streamoptimized" => CreateType::StreamOptimized,
            "vmfssparse" => CreateType::VmfsSparse,
            _ => CreateType::Other(s.to_owned()),
        }
    }
}

impl fmt::Display for CreateType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Access mode of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Rw,
    RdOnly,
    NoAccess,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Rw => "RW",
            Access::RdOnly => "RDONLY",
            Access::NoAccess => "NOACCESS",
        }
    }
}

/// Type of an extent line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Raw data in a hosted flat file.
    Flat,
    /// Raw data in an ESXi flat file (read exactly like `Flat`).
    Vmfs,
    /// Hosted sparse extent (`KDMV` header).
    Sparse,
    /// Reads as zeros, has no file.
    Zero,
    /// ESXi snapshot delta (`COWD`); not supported for data.
    VmfsSparse,
    /// ESXi raw device mappings; not supported for data.
    VmfsRdm,
    VmfsRaw,
    /// ESXi space-efficient sparse; not supported for data.
    SeSparse,
}

impl ExtentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExtentKind::Flat => "FLAT",
            ExtentKind::Vmfs => "VMFS",
            ExtentKind::Sparse => "SPARSE",
            ExtentKind::Zero => "ZERO",
            ExtentKind::VmfsSparse => "VMFSSPARSE",
            ExtentKind::VmfsRdm => "VMFSRDM",
            ExtentKind::VmfsRaw => "VMFSRAW",
            ExtentKind::SeSparse => "SESPARSE",
        }
    }

    fn parse(s: &str) -> Option<ExtentKind> {
        Some(match s {
            "FLAT" => ExtentKind::Flat,
            "VMFS" => ExtentKind::Vmfs,
            "SPARSE" => ExtentKind::Sparse,
            "ZERO" => ExtentKind::Zero,
            "VMFSSPARSE" => ExtentKind::VmfsSparse,
            "VMFSRDM" => ExtentKind::VmfsRdm,
            "VMFSRAW" => ExtentKind::VmfsRaw,
            "SESPARSE" => ExtentKind::SeSparse,
            _ => return None,
        })
    }
}

/// One extent line: `RW 2048 FLAT "disk-flat.vmdk" 0`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Extent {
    /// `RW`, `RDONLY` or `NOACCESS`.
    pub access: Access,
    /// Size of the extent in 512-byte sectors.
    pub sectors: u64,
    /// `FLAT`, `SPARSE`, `ZERO`, `VMFS`, ...
    pub kind: ExtentKind,
    /// File name relative to the descriptor's directory; `None` for `ZERO`.
    pub file: Option<String>,
    /// Start of the data in the file in sectors (FLAT only; 0 otherwise).
    pub offset: u64,
}

/// `ddb.adapterType`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AdapterType {
    Ide,
    BusLogic,
    LsiLogic,
    LegacyEsx,
    Pvscsi,
    Other(String),
}

impl AdapterType {
    pub fn as_str(&self) -> &str {
        match self {
            AdapterType::Ide => "ide",
            AdapterType::BusLogic => "buslogic",
            AdapterType::LsiLogic => "lsilogic",
            AdapterType::LegacyEsx => "legacyESX",
            AdapterType::Pvscsi => "pvscsi",
            AdapterType::Other(s) => s,
        }
    }

    pub fn parse(s: &str) -> AdapterType {
        match s {
            "ide" => AdapterType::Ide,
            "buslogic" => AdapterType::BusLogic,
            "lsilogic" => AdapterType::LsiLogic,
            "legacyESX" => AdapterType::LegacyEsx,
            "pvscsi" => AdapterType::Pvscsi,
            other => AdapterType::Other(other.to_owned()),
        }
    }
}

/// Legacy CHS geometry (`ddb.geometry.*`); VMware still requires it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// `ddb.geometry.cylinders`.
    pub cylinders: u64,
    /// `ddb.geometry.heads`.
    pub heads: u32,
    /// `ddb.geometry.sectors` (per track).
    pub sectors: u32,
}

impl Geometry {
    /// The geometry VMware and qemu derive for a disk of `sectors` sectors on
    /// this adapter: IDE uses 16 heads, SCSI adapters 255; cylinders are
    /// clamped to what the BIOS interface can express.
    pub fn for_capacity(sectors: u64, adapter: &AdapterType) -> Geometry {
        let (heads, max_cyl) = match adapter {
            AdapterType::Ide => (16u32, 16383u64),
            _ => (255u32, 65535u64),
        };
        let cylinders = (sectors / (u64::from(heads) * 63)).clamp(1, max_cyl);
        Geometry {
            cylinders,
            heads,
            sectors: 63,
        }
    }
}

/// A parsed descriptor. `entries` keeps every `key = value` line (header and
/// `ddb.*`) in file order; the typed fields are views of the known keys and
/// are written back by [`Descriptor::render`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// The descriptor format `version` (this crate writes 1).
    pub version: u32,
    /// `CID`: content id, changed when the disk's content changes.
    pub cid: u32,
    /// `parentCID`: the CID of the parent a delta was taken from;
    /// [`CID_NO_PARENT`] without a parent.
    pub parent_cid: u32,
    /// `createType`: how the disk is laid out in files.
    pub create_type: CreateType,
    /// `parentFileNameHint`: the parent's path, relative to this
    /// descriptor's directory (or absolute, which opening refuses by default).
    pub parent_file_name_hint: Option<String>,
    /// The extent lines, in order: the disk is their concatenation.
    pub extents: Vec<Extent>,
    /// Header keys other than the typed ones (`encoding`, `isNativeSnapshot`...), in order.
    pub header_extra: Vec<(String, String)>,
    /// `ddb.*` entries in order, keys with the `ddb.` prefix.
    pub ddb: Vec<(String, String)>,
}

fn bad_value(line: usize, key: &str, value: &str) -> DescriptorError {
    DescriptorError::BadValue {
        line,
        key: key.to_owned(),
        value: value.to_owned(),
    }
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

fn parse_hex_u32(line: usize, key: &str, v: &str) -> Result<u32, DescriptorError> {
    let t = unquote(v);
    if t.is_empty() || t.len() > 8 {
        return Err(bad_value(line, key, v));
    }
    u32::from_str_radix(t, 16).map_err(|_| bad_value(line, key, v))
}

/// Split an extent line into tokens, honouring one level of double quotes.
fn extent_tokens(s: &str) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        if let Some(stripped) = rest.strip_prefix('"') {
            let end = stripped.find('"')?;
            out.push(&stripped[..end]);
            rest = stripped[end + 1..].trim_start();
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            out.push(&rest[..end]);
            rest = rest[end..].trim_start();
        }
    }
    Some(out)
}

fn parse_extent(line: usize, s: &str) -> Result<Extent, DescriptorError> {
    let bad = |reason| DescriptorError::BadExtent { line, reason };
    let toks = extent_tokens(s).ok_or(bad("unterminated quote"))?;
    let access = match toks.first().copied() {
        Some("RW") => Access::Rw,
        Some("RDONLY") => Access::RdOnly,
        Some("NOACCESS") => Access::NoAccess,
        _ => return Err(bad("access must be RW, RDONLY or NOACCESS")),
    };
    let sectors: u64 = toks
        .get(1)
        .and_then(|t| t.parse().ok())
        .ok_or(bad("size in sectors is not a number"))?;
    let kind = toks
        .get(2)
        .and_then(|t| ExtentKind::parse(t))
        .ok_or(bad("unknown extent type"))?;
    let file = toks.get(3).map(|s| (*s).to_owned());
    if file.as_deref().is_some_and(|f| f.contains('"')) {
        // It could not be written back inside quotes.
        return Err(bad("file name contains a double quote"));
    }
    if kind != ExtentKind::Zero && file.as_deref().is_none_or(str::is_empty) {
        return Err(bad("extent has no file name"));
    }
    let offset: u64 = match toks.get(4) {
        Some(t) => t.parse().map_err(|_| bad("offset is not a number"))?,
        None => 0,
    };
    if toks.len() > 5 {
        return Err(bad("trailing fields"));
    }
    if sectors.checked_mul(512).is_none() || offset.checked_mul(512).is_none() {
        return Err(bad("size or offset overflows"));
    }
    Ok(Extent {
        access,
        sectors,
        kind,
        file,
        offset,
    })
}

fn is_extent_line(s: &str) -> bool {
    ["RW ", "RDONLY ", "NOACCESS "]
        .iter()
        .any(|p| s.starts_with(p))
}

impl Descriptor {
    /// Parse descriptor bytes. Trailing NULs (an embedded descriptor is
    /// NUL-padded to its sector count) are ignored.
    pub fn parse_bytes(bytes: &[u8]) -> Result<Descriptor, DescriptorError> {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        let bytes = &bytes[..end];
        if bytes.len() > MAX_DESCRIPTOR_LEN {
            return Err(DescriptorError::TooLong {
                len: bytes.len(),
                max: MAX_DESCRIPTOR_LEN,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| DescriptorError::NotText {
            offset: e.valid_up_to(),
        })?;
        Descriptor::parse(text)
    }

    /// Parse descriptor text.
    pub fn parse(text: &str) -> Result<Descriptor, DescriptorError> {
        if text.len() > MAX_DESCRIPTOR_LEN {
            return Err(DescriptorError::TooLong {
                len: text.len(),
                max: MAX_DESCRIPTOR_LEN,
            });
        }
        let mut version = None;
        let mut cid = None;
        let mut parent_cid = None;
        let mut create_type = None;
        let mut parent_file_name_hint = None;
        let mut extents = Vec::new();
        let mut header_extra = Vec::new();
        let mut ddb = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let s = raw.trim();
            if s.is_empty() || s.starts_with('#') {
                continue;
            }
            if is_extent_line(s) {
                extents.push(parse_extent(line, s)?);
                continue;
            }
            let Some((k, v)) = s.split_once('=') else {
                return Err(DescriptorError::BadLine { line });
            };
            let key = k.trim();
            let value = v.trim();
            if key.is_empty() {
                return Err(DescriptorError::BadLine { line });
            }
            match key {
                "version" => {
                    version = Some(
                        unquote(value)
                            .parse::<u32>()
                            .map_err(|_| bad_value(line, key, value))?,
                    )
                }
                "CID" => cid = Some(parse_hex_u32(line, key, value)?),
                "parentCID" => parent_cid = Some(parse_hex_u32(line, key, value)?),
                "createType" => create_type = Some(CreateType::from_value(unquote(value))),
                "parentFileNameHint" => parent_file_name_hint = Some(unquote(value).to_owned()),
                _ if key.starts_with("ddb.") => {
                    ddb.push((key.to_owned(), unquote(value).to_owned()))
                }
                _ => header_extra.push((key.to_owned(), unquote(value).to_owned())),
            }
        }
        let create_type = create_type.ok_or(DescriptorError::Missing("createType"))?;
        if extents.is_empty() {
            return Err(DescriptorError::NoExtents);
        }
        Ok(Descriptor {
            version: version.unwrap_or(1),
            cid: cid.ok_or(DescriptorError::Missing("CID"))?,
            parent_cid: parent_cid.unwrap_or(CID_NO_PARENT),
            create_type,
            parent_file_name_hint,
            extents,
            header_extra,
            ddb,
        })
    }

    /// A new descriptor with the usual header and disk database.
    pub fn new(create_type: CreateType, extents: Vec<Extent>, cid: u32) -> Descriptor {
        Descriptor {
            version: 1,
            cid,
            parent_cid: CID_NO_PARENT,
            create_type,
            parent_file_name_hint: None,
            extents,
            header_extra: vec![("encoding".to_owned(), "UTF-8".to_owned())],
            ddb: Vec::new(),
        }
    }

    /// Total size of all extents in sectors (saturating; parse bounds each).
    pub fn capacity_sectors(&self) -> u64 {
        self.extents
            .iter()
            .fold(0u64, |acc, e| acc.saturating_add(e.sectors))
    }

    /// True when `parentCID` names a parent.
    pub fn has_parent(&self) -> bool {
        self.parent_cid != CID_NO_PARENT
    }

    /// Value of a `ddb.*` key (full key, e.g. `ddb.uuid`).
    pub fn ddb_get(&self, key: &str) -> Option<&str> {
        self.ddb
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Set a `ddb.*` key, keeping its position if present.
    pub fn ddb_set(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        match self.ddb.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = value,
            None => self.ddb.push((key.to_owned(), value)),
        }
    }

    /// `ddb.adapterType`.
    pub fn adapter_type(&self) -> Option<AdapterType> {
        self.ddb_get("ddb.adapterType").map(AdapterType::parse)
    }

    /// `ddb.geometry.*`, when all three parse.
    pub fn geometry(&self) -> Option<Geometry> {
        Some(Geometry {
            cylinders: self.ddb_get("ddb.geometry.cylinders")?.parse().ok()?,
            heads: self.ddb_get("ddb.geometry.heads")?.parse().ok()?,
            sectors: self.ddb_get("ddb.geometry.sectors")?.parse().ok()?,
        })
    }

    /// `ddb.virtualHWVersion`.
    pub fn virtual_hw_version(&self) -> Option<u32> {
        self.ddb_get("ddb.virtualHWVersion")?.parse().ok()
    }

    /// `ddb.thinProvisioned`.
    pub fn thin_provisioned(&self) -> Option<bool> {
        self.ddb_get("ddb.thinProvisioned").map(|v| v == "1")
    }

    /// `ddb.uuid`: 16 hex bytes, `"60 00 c2 9b ... 8f-4c 9a ..."`.
    pub fn uuid(&self) -> Option<[u8; 16]> {
        let v = self.ddb_get("ddb.uuid")?;
        let mut out = [0u8; 16];
        let mut n = 0;
        for tok in v.split([' ', '-']).filter(|t| !t.is_empty()) {
            *out.get_mut(n)? = u8::from_str_radix(tok, 16).ok()?;
            n += 1;
        }
        (n == 16).then_some(out)
    }

    /// Set the disk database fields VMware expects on a new disk.
    pub fn set_disk_database(
        &mut self,
        adapter: &AdapterType,
        hw_version: u32,
        uuid: [u8; 16],
        thin: bool,
    ) {
        let geo = Geometry::for_capacity(self.capacity_sectors(), adapter);
        self.ddb_set("ddb.adapterType", adapter.as_str());
        self.ddb_set("ddb.geometry.cylinders", geo.cylinders.to_string());
        self.ddb_set("ddb.geometry.heads", geo.heads.to_string());
        self.ddb_set("ddb.geometry.sectors", geo.sectors.to_string());
        self.ddb_set("ddb.thinProvisioned", if thin { "1" } else { "0" });
        self.ddb_set("ddb.uuid", format_uuid(&uuid));
        self.ddb_set("ddb.virtualHWVersion", hw_version.to_string());
        self.set_cid(self.cid);
    }

    /// Set the CID and keep `ddb.longContentID` in step: VMware takes the CID
    /// as the last 8 hex digits of the long content id.
    pub fn set_cid(&mut self, cid: u32) {
        self.cid = cid;
        let prefix = self
            .ddb_get("ddb.longContentID")
            .filter(|v| v.len() == 32 && v.is_char_boundary(24))
            .map(|v| v[..24].to_owned())
            .unwrap_or_else(|| "0".repeat(24));
        self.ddb_set("ddb.longContentID", format!("{prefix}{cid:08x}"));
    }

    /// Render the descriptor as VMware writes it.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(1024);
        s.push_str("# Disk DescriptorFile\n");
        s.push_str(&format!("version={}\n", self.version));
        for (k, v) in &self.header_extra {
            s.push_str(&format!("{k}=\"{v}\"\n"));
        }
        // CID before parentCID: qemu finds the CID by substring search.
        s.push_str(&format!("CID={:08x}\n", self.cid));
        s.push_str(&format!("parentCID={:08x}\n", self.parent_cid));
        s.push_str(&format!("createType=\"{}\"\n", self.create_type));
        if let Some(h) = &self.parent_file_name_hint {
            s.push_str(&format!("parentFileNameHint=\"{h}\"\n"));
        }
        s.push_str("\n# Extent description\n");
        for e in &self.extents {
            s.push_str(&format!(
                "{} {} {}",
                e.access.as_str(),
                e.sectors,
                e.kind.as_str()
            ));
            if let Some(f) = &e.file {
                s.push_str(&format!(" \"{f}\""));
                if e.kind == ExtentKind::Flat {
                    s.push_str(&format!(" {}", e.offset));
                }
            }
            s.push('\n');
        }
        s.push_str("\n# The Disk Data Base\n#DDB\n\n");
        for (k, v) in &self.ddb {
            s.push_str(&format!("{k} = \"{v}\"\n"));
        }
        s
    }
}

/// `ddb.uuid` text form.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}", h[..8].join(" "), h[8..].join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_SPARSE: &str = "# Disk DescriptorFile\nversion=1\nCID=52a1b3c4\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n\n# Extent description\nRW 8192 SPARSE \"d.vmdk\"\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"8\"\nddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\n";

    #[test]
    fn parses_qemu_sparse_descriptor() {
        let d = Descriptor::parse(QEMU_SPARSE).unwrap();
        assert_eq!(d.cid, 0x52a1_b3c4);
        assert_eq!(d.parent_cid, CID_NO_PARENT);
        assert_eq!(d.create_type, CreateType::MonolithicSparse);
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].kind, ExtentKind::Sparse);
        assert_eq!(d.extents[0].sectors, 8192);
        assert_eq!(d.extents[0].file.as_deref(), Some("d.vmdk"));
        assert_eq!(d.adapter_type(), Some(AdapterType::Ide));
        assert_eq!(d.virtual_hw_version(), Some(4));
        assert_eq!(
            d.geometry(),
            Some(Geometry {
                cylinders: 8,
                heads: 16,
                sectors: 63
            })
        );
    }

    #[test]
    fn render_then_parse_round_trips() {
        let mut d = Descriptor::new(
            CreateType::Vmfs,
            vec![Extent {
                access: Access::Rw,
                sectors: 2_097_152,
                kind: ExtentKind::Vmfs,
                file: Some("disk-flat.vmdk".into()),
                offset: 0,
            }],
            0x1234_5678,
        );
        d.parent_cid = 0xabcd_ef01;
        d.parent_file_name_hint = Some("base.vmdk".into());
        d.set_disk_database(&AdapterType::LsiLogic, 13, [7u8; 16], true);
        let text = d.render();
        assert!(text.find("CID=").unwrap() < text.find("parentCID=").unwrap());
        let back = Descriptor::parse(&text).unwrap();
        assert_eq!(back, d);
        assert_eq!(back.uuid(), Some([7u8; 16]));
        assert_eq!(back.thin_provisioned(), Some(true));
        assert!(
            back.ddb_get("ddb.longContentID")
                .unwrap()
                .ends_with("12345678")
        );
        assert_eq!(back.geometry().unwrap().heads, 255);
    }

    #[test]
    fn flat_extent_line_with_offset_and_zero_extent() {
        let t =
            "CID=1\ncreateType=\"monolithicFlat\"\nRW 100 FLAT \"a b.vmdk\" 7\nRDONLY 50 ZERO\n";
        let d = Descriptor::parse(t).unwrap();
        assert_eq!(d.extents[0].file.as_deref(), Some("a b.vmdk"));
        assert_eq!(d.extents[0].offset, 7);
        assert_eq!(d.extents[1].kind, ExtentKind::Zero);
        assert_eq!(d.extents[1].access, Access::RdOnly);
        assert_eq!(d.capacity_sectors(), 150);
    }

    #[test]
    fn errors_name_what_is_wrong() {
        assert_eq!(
            Descriptor::parse("createType=\"vmfs\"\nRW 1 VMFS \"x\"\n"),
            Err(DescriptorError::Missing("CID"))
        );
        assert_eq!(
            Descriptor::parse("CID=zz\n"),
            Err(DescriptorError::BadValue {
                line: 1,
                key: "CID".into(),
                value: "zz".into()
            })
        );
        assert!(matches!(
            Descriptor::parse("CID=1\ncreateType=\"vmfs\"\nRW x VMFS \"a\"\n"),
            Err(DescriptorError::BadExtent { line: 3, .. })
        ));
        assert_eq!(
            Descriptor::parse("CID=1\ncreateType=\"vmfs\"\n"),
            Err(DescriptorError::NoExtents)
        );
        assert!(matches!(
            Descriptor::parse_bytes(b"\xff\xfe"),
            Err(DescriptorError::NotText { offset: 0 })
        ));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let _ = Descriptor::parse_bytes(&bytes);
        }

        #[test]
        fn parse_never_panics_on_descriptor_like_text(
            lines in proptest::collection::vec(
                proptest::string::string_regex("(RW|RDONLY|CID|ddb\\.uuid|createType|#)[ =\"0-9a-zA-Z.\\-]{0,40}").unwrap(),
                0..20)
        ) {
            let text = lines.join("\n");
            if let Ok(d) = Descriptor::parse(&text) {
                let _ = d.uuid();
                let _ = d.geometry();
                let again = Descriptor::parse(&d.render());
                proptest::prop_assert!(again.is_ok());
            }
        }
    }
}
