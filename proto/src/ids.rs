//! Identities that travel in every frame: the disk, its generation and the
//! per-disk sequence number.

use std::fmt;
use std::str::FromStr;

/// Stable identity of a protected disk.
///
/// It is never derived from a device path: after a failover the replica becomes
/// the source on another host, under another path, and must keep the same id so
/// that reprotect and failback find the history that belongs to it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DiskId(pub [u8; 16]);

impl DiskId {
    /// Length of the id on the wire.
    pub const LEN: usize = 16;

    /// Wraps 16 raw bytes (for example from a random source or a stored config).
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        DiskId(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for DiskId {
    /// UUID-like: `8-4-4-4-12` lowercase hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DiskId({self})")
    }
}

/// Error parsing a [`DiskId`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid disk id {input:?}: expected 32 hex digits, optionally grouped 8-4-4-4-12 with dashes"
)]
pub struct ParseDiskIdError {
    input: String,
}

impl FromStr for DiskId {
    type Err = ParseDiskIdError;

    /// Accepts the `Display` form, and the same digits without dashes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseDiskIdError {
            input: s.chars().take(64).collect(),
        };
        let digits: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
        if digits.len() != 32 {
            return Err(err());
        }
        let dashed = s.len() != 32;
        if dashed {
            let groups: Vec<usize> = s.split('-').map(str::len).collect();
            if groups != [8, 4, 4, 4, 12] {
                return Err(err());
            }
        }
        let mut out = [0u8; 16];
        for (i, pair) in digits.chunks_exact(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(err)?;
            let lo = hex_val(pair[1]).ok_or_else(err)?;
            out[i] = (hi << 4) | lo;
        }
        Ok(DiskId(out))
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Generation of a disk's replication stream.
///
/// It grows whenever the source's history is no longer a continuation of what
/// the receiver holds (resync after lost tracking, disk resize, role swap).
/// Frames of an older generation than the receiver's are stale and refused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Debug)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// Per-disk sequence number of batches and barriers.
///
/// One sequence space per disk, across generations: the first frame is 1, each
/// next frame is exactly one more, so a receiver detects gaps and duplicates
/// by comparing with the last sequence it made durable. `Seq(0)` means
/// "nothing yet".
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Debug)]
pub struct Seq(pub u64);

impl Seq {
    /// "Nothing yet": the durable sequence of a receiver that has applied nothing.
    pub const ZERO: Seq = Seq(0);

    /// The sequence number that follows this one.
    #[must_use]
    pub const fn next(self) -> Seq {
        Seq(self.0.saturating_add(1))
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_id_display_is_uuid_like_and_parses_back() {
        let id = DiskId([
            0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55,
            0x66, 0x77,
        ]);
        let s = id.to_string();
        assert_eq!(s, "01234567-89ab-cdef-0011-223344556677");
        assert_eq!(s.parse::<DiskId>(), Ok(id));
        assert_eq!("0123456789ABCDEF0011223344556677".parse::<DiskId>(), Ok(id));
    }

    #[test]
    fn disk_id_rejects_malformed_text() {
        for bad in [
            "",
            "0123",
            "01234567-89ab-cdef-0011-22334455667g",
            "0123456789ab-cdef-0011-2233-44556677",
            "01234567-89ab-cdef-0011-2233445566778",
        ] {
            assert!(bad.parse::<DiskId>().is_err(), "{bad:?} parsed");
        }
    }
}
