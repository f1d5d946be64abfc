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
/// **The sequence invariant**, stated here once and checked by every receiver
/// (relay receiver, relay spool, target store) through [`seq_order`]: one
/// sequence space per disk, across generations. The first frame is 1, each
/// next frame is exactly one more whatever its generation, and generations
/// never decrease along the sequence. A new generation therefore does not
/// restart the count: it continues it. So a receiver detects gaps, duplicates
/// and stale senders by comparing a frame's `(generation, seq)` with the last
/// one it made durable. `Seq(0)` means "nothing yet".
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

/// Where a sequenced frame stands against the last `(generation, seq)` a
/// receiver holds: the one check of the sequence invariant (see [`Seq`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SeqOrder {
    /// The frame that comes next: apply it.
    Next,
    /// Already held (a replay after a lost ack): harmless, acknowledge again.
    Duplicate,
    /// Frames are missing before this one.
    Gap { expected: Seq },
    /// The frame belongs to a generation older than the one held: its sender
    /// was superseded (fenced) and must not write here.
    StaleGeneration { current: Generation },
    /// A newer generation reuses a sequence number already held: the sender
    /// restarted its count, which the invariant forbids; applying or ignoring
    /// it would both lose writes.
    Reused { held: Seq },
}

/// Classifies `got` against `held`, the last `(generation, seq)` made durable.
pub fn seq_order(held: (Generation, Seq), got: (Generation, Seq)) -> SeqOrder {
    let ((held_gen, held_seq), (generation, seq)) = (held, got);
    if generation < held_gen {
        return SeqOrder::StaleGeneration { current: held_gen };
    }
    if seq <= held_seq {
        return if generation == held_gen {
            SeqOrder::Duplicate
        } else {
            SeqOrder::Reused { held: held_seq }
        };
    }
    let expected = held_seq.next();
    if seq == expected {
        SeqOrder::Next
    } else {
        SeqOrder::Gap { expected }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_order_continues_one_count_across_generations() {
        let held = (Generation(1), Seq(10));
        assert_eq!(seq_order(held, (Generation(1), Seq(11))), SeqOrder::Next);
        assert_eq!(seq_order(held, (Generation(2), Seq(11))), SeqOrder::Next);
        assert_eq!(
            seq_order(held, (Generation(1), Seq(10))),
            SeqOrder::Duplicate
        );
        assert_eq!(
            seq_order(held, (Generation(1), Seq(3))),
            SeqOrder::Duplicate
        );
        assert_eq!(
            seq_order(held, (Generation(2), Seq(1))),
            SeqOrder::Reused { held: Seq(10) }
        );
        assert_eq!(
            seq_order(held, (Generation(1), Seq(13))),
            SeqOrder::Gap { expected: Seq(11) }
        );
        assert_eq!(
            seq_order(held, (Generation(0), Seq(11))),
            SeqOrder::StaleGeneration {
                current: Generation(1)
            }
        );
    }

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
