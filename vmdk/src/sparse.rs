//! The hosted sparse extent (`KDMV`, version 1): header codec and layout
//! arithmetic, no I/O.
//!
//! A sparse extent is a 512-byte header, an optional embedded descriptor,
//! two copies of the grain directory (GD) and of the grain tables (GT) it
//! points to, then 64 KiB grains. A GT entry (GTE) is the sector offset of a
//! grain in the file; 0 means "not allocated here" (read the parent, or
//! zeros) and 1 means "zeroed grain" (reads as zeros, hides the parent) when
//! the header has [`FLAG_ZERO_GRAIN`].
//!
//! [`Layout::new`] places the metadata the way qemu and VMware do: header,
//! descriptor, redundant GD, redundant GTs, primary GD, primary GTs, then the
//! first grain aligned to a grain boundary. All GTs are preallocated, so a
//! grain write never has to allocate metadata.

use thiserror::Error;

/// Bytes per sector: the unit of every offset and size in the format.
pub const SECTOR: u64 = 512;
/// `KDMV` read as a little-endian u32.
pub const MAGIC: u32 = 0x564d_444b;
/// Bytes of the sparse extent header.
pub const HEADER_LEN: usize = 512;
/// Bit 0: the newline-detection characters are valid.
pub const FLAG_VALID_NEWLINE: u32 = 1 << 0;
/// Bit 1: the redundant grain directory and tables are kept.
pub const FLAG_REDUNDANT_GT: u32 = 1 << 1;
/// Bit 2: a GTE of 1 means a zeroed grain.
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Bit 16: grains are deflate-compressed (streamOptimized).
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Bit 17: the file has stream markers (streamOptimized).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// `gdOffset` value meaning "the GD is in the footer" (streamOptimized).
pub const GD_AT_END: u64 = u64::MAX;
/// GTE: grain not allocated in this extent.
pub const GTE_UNALLOCATED: u32 = 0;
/// GTE: grain reads as zeros (needs [`FLAG_ZERO_GRAIN`]).
pub const GTE_ZERO: u32 = 1;

/// The grain size blockferry writes: 128 sectors = 64 KiB.
pub const DEFAULT_GRAIN_SECTORS: u64 = 128;
/// Grain table entries per table blockferry writes.
pub const DEFAULT_GTES_PER_GT: u32 = 512;
/// Sectors reserved for an embedded descriptor (what qemu reserves).
pub const DEFAULT_DESCRIPTOR_SECTORS: u64 = 20;

/// Largest grain accepted on read (qemu's bound: 128 MiB / 512).
const MAX_GRAIN_SECTORS: u64 = 1 << 18;
/// Largest GT accepted on read; VMware writes 512.
const MAX_GTES_PER_GT: u32 = 1 << 16;
/// Largest capacity accepted: 64 TiB in sectors (VMware's limit is 62 TiB).
pub const MAX_CAPACITY_SECTORS: u64 = 1 << 37;

/// What is wrong with a sparse header.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HeaderError {
    #[error("sparse header is {0} bytes, needs 512")]
    Short(usize),
    #[error("bad magic {0:#010x}, not a hosted sparse extent (KDMV)")]
    BadMagic(u32),
    #[error("unsupported sparse extent version {0}")]
    UnsupportedVersion(u32),
    #[error("grain size {0} sectors is not a power of two between 1 and 262144")]
    BadGrainSize(u64),
    #[error("{0} grain table entries per table is out of range 1..=65536")]
    BadGtesPerGt(u32),
    #[error("capacity {0} sectors exceeds the 64 TiB limit")]
    CapacityTooLarge(u64),
    #[error("{field} {value} sectors is past any plausible file size")]
    BadOffset { field: &'static str, value: u64 },
    #[error("newline check characters are damaged: the file went through a text-mode transfer")]
    NewlineMangled,
}

/// The 512-byte sparse extent header (`SparseExtentHeader`), all offsets in
/// sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SparseHeader {
    /// Header format version, 1 to 3 (this crate writes 1).
    pub version: u32,
    /// Feature flags: redundant tables, zeroed grains, compression, markers.
    pub flags: u32,
    /// Sectors of virtual disk this extent holds.
    pub capacity: u64,
    /// Sectors per grain (128 = 64 KiB).
    pub grain_size: u64,
    /// Sector of the embedded descriptor; 0 without one.
    pub descriptor_offset: u64,
    /// Sectors reserved for the embedded descriptor.
    pub descriptor_size: u64,
    /// Entries per grain table (512).
    pub num_gtes_per_gt: u32,
    /// Sector of the redundant grain directory.
    pub rgd_offset: u64,
    /// Sector of the grain directory ([`GD_AT_END`]: only in the footer).
    pub gd_offset: u64,
    /// Sectors of metadata before the first grain.
    pub overhead: u64,
    /// The writer did not close the extent cleanly (read and written back as found).
    pub unclean_shutdown: bool,
    /// 0: none, 1: deflate (streamOptimized).
    pub compress_algorithm: u16,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl SparseHeader {
    /// Decode and validate a header. Only the first 512 bytes are looked at.
    pub fn parse(b: &[u8]) -> Result<SparseHeader, HeaderError> {
        if b.len() < HEADER_LEN {
            return Err(HeaderError::Short(b.len()));
        }
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return Err(HeaderError::BadMagic(magic));
        }
        let h = SparseHeader {
            version: u32_at(b, 4),
            flags: u32_at(b, 8),
            capacity: u64_at(b, 12),
            grain_size: u64_at(b, 20),
            descriptor_offset: u64_at(b, 28),
            descriptor_size: u64_at(b, 36),
            num_gtes_per_gt: u32_at(b, 44),
            rgd_offset: u64_at(b, 48),
            gd_offset: u64_at(b, 56),
            overhead: u64_at(b, 64),
            unclean_shutdown: b[72] != 0,
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        };
        if !(1..=3).contains(&h.version) {
            return Err(HeaderError::UnsupportedVersion(h.version));
        }
        if h.flags & FLAG_VALID_NEWLINE != 0 && b[73..77] != *b"\n \r\n" {
            return Err(HeaderError::NewlineMangled);
        }
        if h.grain_size == 0 || !h.grain_size.is_power_of_two() || h.grain_size > MAX_GRAIN_SECTORS
        {
            return Err(HeaderError::BadGrainSize(h.grain_size));
        }
        if h.num_gtes_per_gt == 0 || h.num_gtes_per_gt > MAX_GTES_PER_GT {
            return Err(HeaderError::BadGtesPerGt(h.num_gtes_per_gt));
        }
        if h.capacity > MAX_CAPACITY_SECTORS {
            return Err(HeaderError::CapacityTooLarge(h.capacity));
        }
        // Offsets are sectors; anything whose byte offset overflows is junk.
        for (field, value) in [
            ("descriptorOffset", h.descriptor_offset),
            ("descriptorSize", h.descriptor_size),
            ("rgdOffset", h.rgd_offset),
            ("overHead", h.overhead),
        ] {
            if value > MAX_CAPACITY_SECTORS {
                return Err(HeaderError::BadOffset { field, value });
            }
        }
        if h.gd_offset != GD_AT_END && h.gd_offset > MAX_CAPACITY_SECTORS {
            return Err(HeaderError::BadOffset {
                field: "gdOffset",
                value: h.gd_offset,
            });
        }
        Ok(h)
    }

    /// Encode into the 512-byte on-disk form.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.grain_size.to_le_bytes());
        b[28..36].copy_from_slice(&self.descriptor_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.num_gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        b[72] = u8::from(self.unclean_shutdown);
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_size * SECTOR
    }

    /// Number of grains covering the capacity.
    pub fn num_grains(&self) -> u64 {
        self.capacity.div_ceil(self.grain_size)
    }

    /// Number of grain directory entries (= grain tables).
    pub fn num_gd_entries(&self) -> u64 {
        self.num_grains().div_ceil(u64::from(self.num_gtes_per_gt))
    }

    /// Size of one grain table in sectors (tables are sector-aligned).
    pub fn gt_sectors(&self) -> u64 {
        (u64::from(self.num_gtes_per_gt) * 4).div_ceil(SECTOR)
    }

    /// Size of one grain directory in sectors.
    pub fn gd_sectors(&self) -> u64 {
        (self.num_gd_entries() * 4).div_ceil(SECTOR)
    }

    /// True when a redundant directory and tables are kept.
    pub fn has_redundant(&self) -> bool {
        self.flags & FLAG_REDUNDANT_GT != 0 && self.rgd_offset != 0
    }

    /// True when grains are deflate-compressed behind markers.
    pub fn is_compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    /// True when a table entry of 1 means a zeroed grain.
    pub fn has_zero_grain(&self) -> bool {
        self.flags & FLAG_ZERO_GRAIN != 0
    }

    /// (GD index, GT index) of the grain holding virtual byte `offset`.
    pub fn locate(&self, offset: u64) -> (usize, usize) {
        let grain = offset / self.grain_bytes();
        let per = u64::from(self.num_gtes_per_gt);
        ((grain / per) as usize, (grain % per) as usize)
    }
}

/// Where each piece of a new sparse extent goes, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub header: SparseHeader,
    /// First sector of the redundant GTs (right after the redundant GD).
    pub rgt_offset: u64,
    /// First sector of the primary GTs (right after the primary GD).
    pub gt_offset: u64,
}

impl Layout {
    /// Layout of a new extent of `capacity` sectors with 64 KiB grains and
    /// `descriptor_sectors` reserved for an embedded descriptor (0 for an
    /// extent of a descriptor file).
    pub fn new(capacity: u64, descriptor_sectors: u64) -> Result<Layout, HeaderError> {
        if capacity > MAX_CAPACITY_SECTORS {
            return Err(HeaderError::CapacityTooLarge(capacity));
        }
        let mut h = SparseHeader {
            version: 1,
            flags: FLAG_VALID_NEWLINE | FLAG_REDUNDANT_GT | FLAG_ZERO_GRAIN,
            capacity,
            grain_size: DEFAULT_GRAIN_SECTORS,
            descriptor_offset: if descriptor_sectors > 0 { 1 } else { 0 },
            descriptor_size: descriptor_sectors,
            num_gtes_per_gt: DEFAULT_GTES_PER_GT,
            rgd_offset: 0,
            gd_offset: 0,
            overhead: 0,
            unclean_shutdown: false,
            compress_algorithm: 0,
        };
        let gd = h.gd_sectors();
        let gts = h.num_gd_entries() * h.gt_sectors();
        h.rgd_offset = 1 + descriptor_sectors;
        let rgt_offset = h.rgd_offset + gd;
        h.gd_offset = rgt_offset + gts;
        let gt_offset = h.gd_offset + gd;
        h.overhead = (gt_offset + gts).next_multiple_of(h.grain_size);
        Ok(Layout {
            header: h,
            rgt_offset,
            gt_offset,
        })
    }

    /// Grain directory contents pointing at GTs laid out from `first_gt`.
    pub fn directory(&self, first_gt: u64) -> Vec<u32> {
        let gt = self.header.gt_sectors();
        (0..self.header.num_gd_entries())
            .map(|i| (first_gt + i * gt) as u32)
            .collect()
    }
}

/// streamOptimized: the footer copy of the header sits this many bytes
/// before the end of the file (then comes the end-of-stream marker).
pub const FOOTER_FROM_END: u64 = 1024;
/// streamOptimized: bytes of the marker before compressed grain data
/// (`lba: u64`, `size: u32`).
pub const GRAIN_MARKER_LEN: usize = 12;

/// What is wrong with a compressed grain.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum GrainError {
    #[error("grain marker is {0} bytes, needs 12")]
    ShortMarker(usize),
    #[error("compressed grain of {size} bytes is larger than the {max} a grain may take")]
    TooLarge { size: u32, max: u64 },
    #[error("compressed grain does not inflate: {0}")]
    Inflate(String),
    #[error("compressed grain inflates to more than the {0} bytes of a grain")]
    Overflow(u64),
}

/// Decode a streamOptimized grain marker: (virtual sector, compressed size).
/// The size is bounded by what a grain could deflate to.
pub fn parse_grain_marker(b: &[u8], grain_bytes: u64) -> Result<(u64, u32), GrainError> {
    if b.len() < GRAIN_MARKER_LEN {
        return Err(GrainError::ShortMarker(b.len()));
    }
    let lba = u64_at(b, 0);
    let size = u32_at(b, 8);
    // Deflate never grows data by more than a small fraction.
    let max = grain_bytes + grain_bytes / 8 + 1024;
    if u64::from(size) > max {
        return Err(GrainError::TooLarge { size, max });
    }
    Ok((lba, size))
}

/// Inflate one zlib-wrapped grain into `out` (a full grain; a short stream
/// leaves the rest zero).
pub fn inflate_grain(data: &[u8], out: &mut [u8]) -> Result<(), GrainError> {
    let v =
        miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(data, out.len()).map_err(|e| {
            match e.status {
                miniz_oxide::inflate::TINFLStatus::HasMoreOutput => {
                    GrainError::Overflow(out.len() as u64)
                }
                s => GrainError::Inflate(format!("{s:?}")),
            }
        })?;
    out[..v.len()].copy_from_slice(&v);
    out[v.len()..].fill(0);
    Ok(())
}

/// Decode little-endian u32 entries (a GD or a GT); a trailing partial entry is ignored.
pub fn decode_entries(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Encode entries into `out`, which must hold `4 * entries.len()` bytes.
pub fn encode_entries(entries: &[u32], out: &mut [u8]) {
    for (e, c) in entries.iter().zip(out.chunks_exact_mut(4)) {
        c.copy_from_slice(&e.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let l = Layout::new(4096 * 1024, DEFAULT_DESCRIPTOR_SECTORS).unwrap();
        let b = l.header.encode();
        assert_eq!(&b[0..4], b"KDMV");
        assert_eq!(SparseHeader::parse(&b).unwrap(), l.header);
    }

    #[test]
    fn layout_matches_qemu_for_one_gib() {
        // qemu-img create -f vmdk x 1G: rgd at 21, gd at 21+1+128=150... the
        // arithmetic below is the same sum qemu does.
        let l = Layout::new(2 * 1024 * 1024, 20).unwrap();
        let h = l.header;
        assert_eq!(h.num_gd_entries(), 32);
        assert_eq!(h.gt_sectors(), 4);
        assert_eq!(h.rgd_offset, 21);
        assert_eq!(l.rgt_offset, 22);
        assert_eq!(h.gd_offset, 22 + 128);
        assert_eq!(l.gt_offset, 151);
        assert_eq!(h.overhead, 384);
        assert_eq!(l.directory(l.gt_offset)[1], 155);
    }

    #[test]
    fn rejects_bad_headers_with_reason() {
        let good = Layout::new(1 << 20, 0).unwrap().header.encode();
        assert_eq!(
            SparseHeader::parse(&good[..100]),
            Err(HeaderError::Short(100))
        );
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            SparseHeader::parse(&b),
            Err(HeaderError::BadMagic(_))
        ));
        let mut b = good;
        b[20] = 3;
        assert_eq!(SparseHeader::parse(&b), Err(HeaderError::BadGrainSize(3)));
        let mut b = good;
        b[76] = b'\r';
        assert_eq!(SparseHeader::parse(&b), Err(HeaderError::NewlineMangled));
        let mut b = good;
        b[4] = 9;
        assert_eq!(
            SparseHeader::parse(&b),
            Err(HeaderError::UnsupportedVersion(9))
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            if let Ok(h) = SparseHeader::parse(&bytes) {
                // Derived sizes of an accepted header never overflow.
                let _ = (h.num_gd_entries(), h.gd_sectors(), h.gt_sectors(), h.grain_bytes());
            }
        }

        #[test]
        fn grain_decoders_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse_grain_marker(&bytes, 65536);
            let mut out = vec![0u8; 4096];
            let _ = inflate_grain(&bytes, &mut out);
        }

        #[test]
        fn parse_never_panics_with_magic(mut bytes in proptest::collection::vec(proptest::num::u8::ANY, 512..513)) {
            bytes[0..4].copy_from_slice(b"KDMV");
            if let Ok(h) = SparseHeader::parse(&bytes) {
                let _ = (h.num_gd_entries(), h.gd_sectors(), h.gt_sectors(), h.grain_bytes());
                let _ = h.locate(h.capacity * SECTOR);
            }
        }
    }
}
