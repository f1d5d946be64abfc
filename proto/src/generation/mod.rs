//! Data generations of a disk's copies (after DRBD's data generation ids): who
//! may overwrite whom, and from which point.
//!
//! Every copy of a disk — the source device at the agent, each replica at a
//! target, an original disk taken back as a seed — durably carries a
//! [`GenerationRecord`]: the disk id, the copy's [`CopyRole`], its current
//! generation and a bounded history of the generations it went through, newest
//! first. A generation is a random [`GenerationId`], never a counter, because
//! two sites can promote their copies independently and must not pick the same
//! name. Each entry also carries the wire [`Generation`] number (one more than
//! its parent's, so frames keep their ordered `u64`) and the last sequence
//! number the copy held of it: the one per-disk sequence space of [`Seq`]
//! continues across generations, so `(generation, seq)` names a point of the
//! data exactly.
//!
//! A new generation starts when a copy is promoted ([`GenerationRecord::promote`],
//! failover) and when a source is detached from its replica unplanned
//! ([`GenerationRecord::detach`], for example when it learns it was fenced).
//! [`GenerationRecord::compare`] of two records says what may happen between
//! the copies: continue the stream ([`Comparison::InSync`]), send a delta from
//! a common point ([`Comparison::Ahead`] / [`Comparison::Behind`]), refuse
//! because both changed since their common point ([`Comparison::SplitBrain`],
//! never resolved automatically), or nothing in common
//! ([`Comparison::Unrelated`], a full copy only when the user asks). After a
//! split brain the user names the copy whose changes are discarded
//! ([`resolve_split_brain`]); that copy becomes a [`CopyRole::Seed`] rolled back to
//! the common point, so only the chunks whose hashes differ travel.
//!
//! A source is writable: whatever it holds beyond its last sequence number is
//! unknown to its record, so a source that is compared against a copy which
//! moved on from the source's generation has changed since the common point.
//! A planned failover therefore [`demote`](GenerationRecord::demote)s the
//! source once its final sync is durable: it then holds exactly its generation
//! through its last sequence, and the promoted copy is merely ahead of it.
//!
//! # How the rest plugs in
//!
//! Nothing outside this module uses it yet; this is what the next steps do.
//!
//! - **Agent device record.** The agent keeps one record per protected device
//!   beside its state file (written with `blockferry_durable::replace_file`),
//!   as a [`CopyRole::Source`], and moves its sequence on with
//!   [`GenerationRecord::set_seq`] whenever it persists its state. The wire
//!   generation of its frames becomes `record.current().number`; where the
//!   agent bumps its wire generation today (resync, resize), it starts a data
//!   generation instead ([`GenerationRecord::detach`]), which a replica simply
//!   follows.
//! - **Target replica record.** The target keeps one record per replica next to
//!   its store state, as a [`CopyRole::Replica`], with the durable sequence as
//!   `seq`. It follows the source ([`GenerationRecord::follow`]) when it makes
//!   the first frame of a newer generation durable. Taking an existing disk
//!   whose content its record cannot prove makes it a [`CopyRole::Seed`]
//!   ([`GenerationRecord::into_seed`]); a seed is synced by checksum compare.
//!   A test-failover clone is no copy in this sense: it is thrown away and
//!   never carries the replica's record.
//! - **Hello exchange.** The sender's hello carries its encoded record
//!   ([`GenerationRecord::encode`]; a frame-format change), and the receiver
//!   answers only after [`GenerationRecord::compare`]: in sync or behind the
//!   sender → resume, or take the delta or checksum compare ([`SyncMode`]);
//!   ahead of the sender → fence it; split brain → refuse with the
//!   [`SplitBrainReport`] text; unrelated → refuse unless a full copy was
//!   asked for. The relay forwards the record to the target and answers with
//!   the target's verdict.
//! - **Fencing of an older generation.** A promoted copy's wire number is one
//!   more than that of the copy it replaced, so the receivers' existing
//!   [`crate::seq_order`] check refuses the old source's frames as
//!   `StaleGeneration`. The wire number is not an identity (two sites that
//!   promote independently reach the same number): the hello comparison is
//!   what keeps split-brain copies apart. The agent that is refused keeps
//!   tracking, stops shipping, reports `fenced`, and calls
//!   [`GenerationRecord::detach`] so that what it writes from then on belongs
//!   to a generation of its own and a later comparison reports the split
//!   brain instead of losing those writes.
//! - **The DR cycle** (`DESIGN.md`, "The DR cycle"): failover =
//!   [`GenerationRecord::promote_at`] the chosen point on the replica; planned
//!   failover = `set_seq` to the final sequence and
//!   [`GenerationRecord::demote`] on the source, then `promote` at that
//!   point; reprotect = compare, [`resolve_split_brain`] if the user named a
//!   copy, sync the old source as a replica or seed, then `follow`; failback
//!   and re-enable are the same steps in the other direction.
//!   `proto/tests/generation.rs` runs the whole cycle as records on two copies.

mod codec;
mod compare;

use std::fmt;

use crate::ids::{DiskId, Generation, Seq};

pub use codec::DecodeGenerationError;
pub use compare::{
    Comparison, Resolution, Side, SplitBrainReport, SyncMode, Unrelated, resolve_split_brain,
};

/// How many earlier generations a record keeps. A common point older than this
/// is forgotten and the copies compare as [`Comparison::Unrelated`].
pub const MAX_HISTORY: usize = 16;

/// Random identity of one data generation (128 bits: independent promotions
/// at two sites never collide).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GenerationId(pub [u8; 16]);

impl GenerationId {
    /// Length of the id in an encoded record.
    pub const LEN: usize = 16;

    /// Wraps 16 bytes from a random source. Sans-IO: the caller draws them.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        GenerationId(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The first generation of `disk`, the same at every copy: a source's
    /// first record and a new replica's both start in it, so a replica made
    /// by the stream shares its source's lineage without the ids travelling.
    /// Only forks (promotion, an unplanned detach) draw random ids.
    pub fn root(disk: DiskId) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"blockferry root generation");
        h.update(disk.as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&h.finalize().as_bytes()[..16]);
        GenerationId(b)
    }
}

impl fmt::Display for GenerationId {
    /// `g` and the first 8 hex digits, enough to tell generations apart in a
    /// message; the alternate form (`{:#}`) prints all 32 digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = if f.alternate() { 16 } else { 4 };
        f.write_str("g")?;
        for b in &self.0[..n] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for GenerationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GenerationId({self:#})")
    }
}

/// One generation as a copy holds it: its id, its wire number, and the last
/// sequence number of the disk's stream the copy holds (for the current
/// generation) or held when it left it (for a history entry).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct GenerationEntry {
    pub id: GenerationId,
    pub number: Generation,
    pub seq: Seq,
}

impl fmt::Display for GenerationEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.id, self.seq)
    }
}

/// What a copy is to the disk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum CopyRole {
    /// The writable copy the workload runs on (the agent's device, or a
    /// promoted replica). It may hold writes beyond its record's sequence.
    Source,
    /// Written only by the replication stream: it holds its current
    /// generation exactly through its sequence.
    Replica,
    /// An existing disk taken as a replica whose content its record does not
    /// prove (an original disk after a split brain, a disk of unknown
    /// history): the first sync compares checksums.
    Seed,
}

impl CopyRole {
    fn to_wire(self) -> u8 {
        match self {
            CopyRole::Source => 1,
            CopyRole::Replica => 2,
            CopyRole::Seed => 3,
        }
    }

    fn from_wire(b: u8) -> Option<Self> {
        Some(match b {
            1 => CopyRole::Source,
            2 => CopyRole::Replica,
            3 => CopyRole::Seed,
            _ => return None,
        })
    }
}

impl fmt::Display for CopyRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CopyRole::Source => "source",
            CopyRole::Replica => "replica",
            CopyRole::Seed => "seed",
        })
    }
}

/// A generation operation that would break the record's invariants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerationError {
    #[error(
        "generation history holds {len} entries, more than {MAX_HISTORY}: the record was not written by this version"
    )]
    HistoryTooLong { len: usize },
    #[error(
        "generation {id:#} appears twice in the record: draw generation ids from a random source"
    )]
    DuplicateId { id: GenerationId },
    #[error(
        "generation {id} has number {number} after a newer one numbered {newer}: numbers must fall towards older generations"
    )]
    NumberOrder {
        id: GenerationId,
        number: Generation,
        newer: Generation,
    },
    #[error(
        "generation {id} holds through {seq}, past the newer generation's {newer}: the sequence continues across generations and never goes back"
    )]
    SeqOrder {
        id: GenerationId,
        seq: Seq,
        newer: Seq,
    },
    #[error("generation number {0} cannot grow any further: re-create the replica")]
    NumberExhausted(Generation),
    #[error("the copy holds up to {held}: it has no point {point} to fail over to")]
    PointAhead { held: Seq, point: Seq },
    #[error("the copy holds {held} and cannot go back to {got}")]
    SeqBehind { held: Seq, got: Seq },
    #[error("the copy is a {role}, but only a source can be {op}")]
    NotSource { role: CopyRole, op: &'static str },
    #[error("the copy is already the source: a second promotion would fork it from itself")]
    AlreadySource,
    #[error("record of disk {theirs} given for disk {ours}: compare records of the same disk")]
    WrongDisk { ours: DiskId, theirs: DiskId },
    #[error(
        "the copy that would keep its changes is a seed, whose content its record does not prove: discard the changes of the seed instead"
    )]
    SeedSurvivor,
    #[error("the copies are not in split brain ({0}): there are no changes to discard")]
    NotSplitBrain(Comparison),
}

/// A copy's durable generation record. Its fields are private so that every
/// record, including every decoded one, keeps the invariants: at most
/// [`MAX_HISTORY`] entries, no id twice, numbers strictly falling and sequence
/// numbers never rising from the current generation towards older ones.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct GenerationRecord {
    disk: DiskId,
    role: CopyRole,
    current: GenerationEntry,
    /// Newest first.
    history: Vec<GenerationEntry>,
}

impl GenerationRecord {
    /// A copy with no history: a newly protected disk (number 1, sequence
    /// [`Seq::ZERO`] as a rule), or an existing stream adopted with its
    /// current wire generation and sequence.
    pub fn new(disk: DiskId, role: CopyRole, current: GenerationEntry) -> Self {
        GenerationRecord {
            disk,
            role,
            current,
            history: Vec::new(),
        }
    }

    /// Builds a record from its parts, checking the invariants.
    pub fn from_parts(
        disk: DiskId,
        role: CopyRole,
        current: GenerationEntry,
        history: Vec<GenerationEntry>,
    ) -> Result<Self, GenerationError> {
        let r = GenerationRecord {
            disk,
            role,
            current,
            history,
        };
        r.validate()?;
        Ok(r)
    }

    pub fn disk(&self) -> DiskId {
        self.disk
    }

    pub fn role(&self) -> CopyRole {
        self.role
    }

    pub fn current(&self) -> GenerationEntry {
        self.current
    }

    /// Earlier generations, newest first.
    pub fn history(&self) -> &[GenerationEntry] {
        &self.history
    }

    /// The copy now holds its current generation through `seq`.
    pub fn set_seq(&mut self, seq: Seq) -> Result<(), GenerationError> {
        if seq < self.current.seq {
            return Err(GenerationError::SeqBehind {
                held: self.current.seq,
                got: seq,
            });
        }
        self.current.seq = seq;
        Ok(())
    }

    /// The stream of the current generation restarted under a newer wire
    /// number (a checksum resync, a resize): the data generation is the same,
    /// so the id stays and only its number grows. A smaller number is refused.
    pub fn renumber(&mut self, number: Generation) -> Result<(), GenerationError> {
        if number < self.current.number {
            return Err(GenerationError::NumberOrder {
                id: self.current.id,
                number,
                newer: self.current.number,
            });
        }
        self.current.number = number;
        Ok(())
    }

    /// Failover to everything this replica (or seed) holds: it becomes the
    /// writable source in a new generation `id`.
    pub fn promote(&mut self, id: GenerationId) -> Result<(), GenerationError> {
        self.promote_at(self.current.seq, id)
    }

    /// Failover to the recovery point at `point`: the copy goes back to the
    /// generation that held that point, and becomes the writable source in a
    /// new generation `id` that continues from it. What it held after `point`
    /// is no longer part of its lineage.
    pub fn promote_at(&mut self, point: Seq, id: GenerationId) -> Result<(), GenerationError> {
        if self.role == CopyRole::Source {
            return Err(GenerationError::AlreadySource);
        }
        if point > self.current.seq {
            return Err(GenerationError::PointAhead {
                held: self.current.seq,
                point,
            });
        }
        if self.current.id == id || self.history.iter().any(|e| e.id == id) {
            return Err(GenerationError::DuplicateId { id });
        }
        let mut next = self.clone();
        // A history entry left its generation at its `seq`: a point before
        // that lies in that generation (or an older one).
        while next.history.first().is_some_and(|h| point < h.seq) {
            next.current = next.history.remove(0);
        }
        next.current.seq = point;
        next.start_generation(id)?;
        next.role = CopyRole::Source;
        *self = next;
        Ok(())
    }

    /// Unplanned detach: this source goes on in a new generation `id`, so what
    /// it writes from now on is told apart from what its replica may hold.
    pub fn detach(&mut self, id: GenerationId) -> Result<(), GenerationError> {
        if self.role != CopyRole::Source {
            return Err(GenerationError::NotSource {
                role: self.role,
                op: "detached",
            });
        }
        self.start_generation(id)
    }

    /// Planned failover, once the final sync is durable at the replica and the
    /// workload is stopped: this source holds exactly its current generation
    /// through its sequence, and becomes a replica.
    pub fn demote(&mut self) -> Result<(), GenerationError> {
        if self.role != CopyRole::Source {
            return Err(GenerationError::NotSource {
                role: self.role,
                op: "demoted",
            });
        }
        self.role = CopyRole::Replica;
        Ok(())
    }

    /// This copy is taken as a seed: its content is no longer proven by its
    /// record, so its first sync compares checksums.
    #[must_use]
    pub fn into_seed(mut self) -> Self {
        self.role = CopyRole::Seed;
        self
    }

    /// This replica or seed now holds `source`'s current generation through
    /// `held` (the sync that [`compare`](Self::compare) allowed has reached
    /// it): it adopts the source's lineage and becomes a replica.
    pub fn follow(&mut self, source: &GenerationRecord, held: Seq) -> Result<(), GenerationError> {
        if self.disk != source.disk {
            return Err(GenerationError::WrongDisk {
                ours: self.disk,
                theirs: source.disk,
            });
        }
        if self.role == CopyRole::Source {
            // A source never takes another copy's writes: it is demoted or its
            // changes are discarded first.
            return Err(GenerationError::AlreadySource);
        }
        let next = GenerationRecord {
            disk: self.disk,
            role: CopyRole::Replica,
            current: GenerationEntry {
                seq: held,
                ..source.current
            },
            history: source.history.clone(),
        };
        next.validate()?;
        *self = next;
        Ok(())
    }

    fn start_generation(&mut self, id: GenerationId) -> Result<(), GenerationError> {
        if self.current.id == id || self.history.iter().any(|e| e.id == id) {
            return Err(GenerationError::DuplicateId { id });
        }
        let number = self
            .current
            .number
            .0
            .checked_add(1)
            .ok_or(GenerationError::NumberExhausted(self.current.number))?;
        self.history.insert(0, self.current);
        self.history.truncate(MAX_HISTORY);
        self.current = GenerationEntry {
            id,
            number: Generation(number),
            seq: self.current.seq,
        };
        Ok(())
    }

    fn validate(&self) -> Result<(), GenerationError> {
        if self.history.len() > MAX_HISTORY {
            return Err(GenerationError::HistoryTooLong {
                len: self.history.len(),
            });
        }
        let mut newer = self.current;
        for (i, e) in self.history.iter().enumerate() {
            if e.id == self.current.id || self.history[..i].iter().any(|o| o.id == e.id) {
                return Err(GenerationError::DuplicateId { id: e.id });
            }
            if e.number >= newer.number {
                return Err(GenerationError::NumberOrder {
                    id: e.id,
                    number: e.number,
                    newer: newer.number,
                });
            }
            if e.seq > newer.seq {
                return Err(GenerationError::SeqOrder {
                    id: e.id,
                    seq: e.seq,
                    newer: newer.seq,
                });
            }
            newer = *e;
        }
        Ok(())
    }

    /// The entry of generation `id` in this record: current or history.
    fn entry(&self, id: GenerationId) -> Option<GenerationEntry> {
        std::iter::once(&self.current)
            .chain(&self.history)
            .find(|e| e.id == id)
            .copied()
    }

    /// The lineage for a message (see [`Lineage`]).
    pub fn lineage(&self) -> Lineage<'_> {
        Lineage(self)
    }
}

/// A record's lineage as the user reads it, newest first: the current
/// generation and the sequence it holds, then each earlier generation and the
/// sequence at which the copy left it (`g.. at #n <- g.. to #m <- ...`).
#[derive(Clone, Copy, Debug)]
pub struct Lineage<'a>(&'a GenerationRecord);

impl fmt::Display for Lineage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        write!(f, "{}", r.current)?;
        for e in &r.history {
            write!(f, " <- {} to {}", e.id, e.seq)?;
        }
        Ok(())
    }
}
