//! The kernel ABI of the tracker: constants generated from `ebpf/tracker.h` and
//! the decoder of ring-buffer records. Decoding never panics: a short record is
//! `None`, an unknown op is `None` (and counted by the caller).

#![allow(dead_code)] // not every constant of the header is used on this side

mod generated {
    include!(concat!(env!("OUT_DIR"), "/tracker_abi.rs"));
}
pub use generated::*;

use super::KernelDev;

/// The operation of a tracked bio or request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Write,
    WriteZeroes,
    Discard,
    SecureErase,
    /// An ordering barrier (PREFLUSH with no data, or a flush request); no range.
    Flush,
}

impl Op {
    pub fn from_code(code: u8) -> Option<Op> {
        match u64::from(code) {
            OP_WRITE => Some(Op::Write),
            OP_WRITE_ZEROES => Some(Op::WriteZeroes),
            OP_DISCARD => Some(Op::Discard),
            OP_SECURE_ERASE => Some(Op::SecureErase),
            OP_FLUSH => Some(Op::Flush),
            _ => None,
        }
    }

    /// The name used in the `track --json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::WriteZeroes => "write_zeroes",
            Op::Discard => "discard",
            Op::SecureErase => "secure_erase",
            Op::Flush => "flush",
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where in the life of an I/O the event was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Submit,
    Complete,
}

/// One ring-buffer record, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent {
    /// Whole disk, kernel encoding.
    pub disk: KernelDev,
    /// Absolute 512-byte sector on the whole disk.
    pub sector: u64,
    pub bytes: u32,
    pub op: Op,
    pub phase: Phase,
    pub preflush: bool,
    pub fua: bool,
}

fn field<const N: usize>(rec: &[u8], off: u64) -> Option<[u8; N]> {
    let off = usize::try_from(off).ok()?;
    rec.get(off..off.checked_add(N)?)?.try_into().ok()
}

impl RawEvent {
    /// Decodes a record laid out as `struct bf_event`.
    pub fn decode(rec: &[u8]) -> Option<RawEvent> {
        if (rec.len() as u64) < EVENT_BYTES {
            return None;
        }
        let sector = u64::from_ne_bytes(field(rec, EV_OFF_SECTOR)?);
        let bytes = u32::from_ne_bytes(field(rec, EV_OFF_BYTES)?);
        let dev = u32::from_ne_bytes(field(rec, EV_OFF_DEV)?);
        let [op] = field::<1>(rec, EV_OFF_OP)?;
        let [phase] = field::<1>(rec, EV_OFF_PHASE)?;
        let flags = u64::from(u16::from_ne_bytes(field(rec, EV_OFF_FLAGS)?));
        let phase = match u64::from(phase) {
            PHASE_SUBMIT => Phase::Submit,
            PHASE_COMPLETE => Phase::Complete,
            _ => return None,
        };
        Some(RawEvent {
            disk: KernelDev(dev),
            sector,
            bytes,
            op: Op::from_code(op)?,
            phase,
            preflush: flags & FLAG_PREFLUSH != 0,
            fua: flags & FLAG_FUA != 0,
        })
    }

    /// Encodes the record as the kernel would (for tests and fakes).
    pub fn encode(&self) -> Vec<u8> {
        let mut rec = vec![0u8; EVENT_BYTES as usize];
        let mut put = |off: u64, b: &[u8]| {
            let off = off as usize;
            rec[off..off + b.len()].copy_from_slice(b);
        };
        put(EV_OFF_SECTOR, &self.sector.to_ne_bytes());
        put(EV_OFF_BYTES, &self.bytes.to_ne_bytes());
        put(EV_OFF_DEV, &self.disk.0.to_ne_bytes());
        let op = match self.op {
            Op::Write => OP_WRITE,
            Op::WriteZeroes => OP_WRITE_ZEROES,
            Op::Discard => OP_DISCARD,
            Op::SecureErase => OP_SECURE_ERASE,
            Op::Flush => OP_FLUSH,
        };
        put(EV_OFF_OP, &[op as u8]);
        let phase = match self.phase {
            Phase::Submit => PHASE_SUBMIT,
            Phase::Complete => PHASE_COMPLETE,
        };
        put(EV_OFF_PHASE, &[phase as u8]);
        let mut flags = 0u16;
        if self.preflush {
            flags |= FLAG_PREFLUSH as u16;
        }
        if self.fua {
            flags |= FLAG_FUA as u16;
        }
        put(EV_OFF_FLAGS, &flags.to_ne_bytes());
        rec
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip() {
        let ev = RawEvent {
            disk: KernelDev::new(7, 3),
            sector: 2056,
            bytes: 4096,
            op: Op::WriteZeroes,
            phase: Phase::Complete,
            preflush: false,
            fua: true,
        };
        assert_eq!(RawEvent::decode(&ev.encode()), Some(ev));
    }

    proptest! {
        /// Any byte string decodes to a record or to None, never a panic.
        #[test]
        fn decode_never_panics(rec in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = RawEvent::decode(&rec);
        }
    }
}
