//! Comparing two copies' records, and resolving a split brain by the user's
//! choice.

use std::fmt;

use super::{CopyRole, GenerationEntry, GenerationError, GenerationId, GenerationRecord};
use crate::ids::{DiskId, Seq};

impl GenerationRecord {
    /// What may happen between this copy (ours) and `theirs`.
    pub fn compare(&self, theirs: &GenerationRecord) -> Comparison {
        if self.disk != theirs.disk {
            return Comparison::Unrelated(Unrelated::DifferentDisk {
                ours: self.disk,
                theirs: theirs.disk,
            });
        }
        if self.current.id == theirs.current.id {
            return same_generation(self, theirs);
        }
        let ours_left = self.history.iter().find(|e| e.id == theirs.current.id);
        let theirs_left = theirs.history.iter().find(|e| e.id == self.current.id);
        match (ours_left, theirs_left) {
            // Each claims to have moved on from the other: records that
            // contradict each other prove nothing.
            (Some(_), Some(_)) => {
                return Comparison::SplitBrain {
                    common: None,
                    ours: self.current.id,
                    theirs: theirs.current.id,
                };
            }
            (Some(left), None) => return moved_on(self, theirs, *left),
            (None, Some(left)) => return moved_on(theirs, self, *left).mirror(),
            (None, None) => {}
        }
        // Both moved on: the newest generation both went through is where
        // they forked (chosen the same way from either side).
        let fork = self
            .history
            .iter()
            .filter_map(|o| {
                let t = theirs.history.iter().find(|t| t.id == o.id)?;
                Some(GenerationEntry {
                    id: o.id,
                    number: o.number.max(t.number),
                    seq: o.seq.min(t.seq),
                })
            })
            .max_by_key(|e| (e.number, e.seq, e.id));
        match fork {
            Some(common) => Comparison::SplitBrain {
                common: Some(common),
                ours: self.current.id,
                theirs: theirs.current.id,
            },
            None => Comparison::Unrelated(Unrelated::NoCommonGeneration),
        }
    }
}

/// Both records are in the same current generation.
fn same_generation(ours: &GenerationRecord, theirs: &GenerationRecord) -> Comparison {
    let common = GenerationEntry {
        id: ours.current.id,
        number: ours.current.number.max(theirs.current.number),
        seq: ours.current.seq.min(theirs.current.seq),
    };
    match (ours.role, theirs.role) {
        // Two writable copies of one generation (a copy duplicated with its
        // record): each may hold writes the other lacks, from an unknown point.
        (CopyRole::Source, CopyRole::Source) => Comparison::SplitBrain {
            common: None,
            ours: ours.current.id,
            theirs: theirs.current.id,
        },
        (CopyRole::Seed, CopyRole::Seed) => Comparison::InSync {
            current: ours.current.id,
        },
        (CopyRole::Seed, _) => Comparison::Behind {
            common,
            mode: SyncMode::ChecksumCompare,
        },
        (_, CopyRole::Seed) => Comparison::Ahead {
            common,
            mode: SyncMode::ChecksumCompare,
        },
        _ => Comparison::InSync {
            current: ours.current.id,
        },
    }
}

/// `ahead` left `behind`'s current generation when it held it through
/// `left.seq`, and went on in newer generations.
fn moved_on(
    ahead: &GenerationRecord,
    behind: &GenerationRecord,
    left: GenerationEntry,
) -> Comparison {
    let b = behind.current;
    if behind.role == CopyRole::Source || b.seq > left.seq {
        return Comparison::SplitBrain {
            common: Some(GenerationEntry {
                seq: b.seq.min(left.seq),
                ..left
            }),
            ours: ahead.current.id,
            theirs: b.id,
        };
    }
    Comparison::Ahead {
        common: b,
        mode: if behind.role == CopyRole::Seed {
            SyncMode::ChecksumCompare
        } else {
            SyncMode::Delta
        },
    }
}

/// How the copy behind is brought up to the copy ahead.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum SyncMode {
    /// Send what the copy ahead wrote after the common point.
    Delta,
    /// The copy behind may differ anywhere: compare chunk hashes and send the
    /// chunks that differ.
    ChecksumCompare,
}

/// Why two records share nothing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Unrelated {
    DifferentDisk {
        ours: DiskId,
        theirs: DiskId,
    },
    /// Same disk, but no generation in common (never related, or the common
    /// point is older than either history keeps).
    NoCommonGeneration,
}

/// The outcome of [`GenerationRecord::compare`], from our side.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Comparison {
    /// Same generation: the replication stream continues by sequence number.
    InSync { current: GenerationId },
    /// We are the source of the delta: we hold everything they hold of
    /// `common` (the generation and the sequence both hold), and more.
    Ahead {
        common: GenerationEntry,
        mode: SyncMode,
    },
    /// They are the source of the delta from `common`.
    Behind {
        common: GenerationEntry,
        mode: SyncMode,
    },
    /// Both changed since `common` (`None`: both wrote in one generation from
    /// an unknown point): refuse to sync until the user names the copy whose
    /// changes are discarded. `ours` and `theirs` are the current generations.
    SplitBrain {
        common: Option<GenerationEntry>,
        ours: GenerationId,
        theirs: GenerationId,
    },
    /// Nothing in common: a full copy, only when the user asks for it.
    Unrelated(Unrelated),
}

impl Comparison {
    /// The same comparison seen from the other side.
    #[must_use]
    pub fn mirror(self) -> Self {
        match self {
            Comparison::Ahead { common, mode } => Comparison::Behind { common, mode },
            Comparison::Behind { common, mode } => Comparison::Ahead { common, mode },
            Comparison::SplitBrain {
                common,
                ours,
                theirs,
            } => Comparison::SplitBrain {
                common,
                ours: theirs,
                theirs: ours,
            },
            Comparison::Unrelated(Unrelated::DifferentDisk { ours, theirs }) => {
                Comparison::Unrelated(Unrelated::DifferentDisk {
                    ours: theirs,
                    theirs: ours,
                })
            }
            other => other,
        }
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = |m: &SyncMode| match m {
            SyncMode::Delta => "delta",
            SyncMode::ChecksumCompare => "checksum compare",
        };
        match self {
            Comparison::InSync { current } => write!(f, "in sync at {current}"),
            Comparison::Ahead { common, mode: m } => {
                write!(f, "ahead of the peer since {common} ({})", mode(m))
            }
            Comparison::Behind { common, mode: m } => {
                write!(f, "behind the peer since {common} ({})", mode(m))
            }
            Comparison::SplitBrain {
                common: Some(c),
                ours,
                theirs,
            } => write!(f, "split brain since {c}: ours {ours}, theirs {theirs}"),
            Comparison::SplitBrain {
                common: None,
                ours,
                theirs,
            } => write!(
                f,
                "split brain from an unknown point: ours {ours}, theirs {theirs}"
            ),
            Comparison::Unrelated(Unrelated::DifferentDisk { ours, theirs }) => {
                write!(f, "unrelated: disk {ours} against disk {theirs}")
            }
            Comparison::Unrelated(Unrelated::NoCommonGeneration) => {
                f.write_str("unrelated: no generation in common")
            }
        }
    }
}

/// One of the two copies of a comparison.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Side {
    Ours,
    Theirs,
}

/// The outcome of [`resolve_split_brain`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Resolution {
    /// The copy whose changes survive: the source of the sync.
    pub source: Side,
    /// The new record of the copy whose changes are discarded: a seed rolled
    /// back to the common point (or to the start of the shared generation),
    /// so comparing it with the source gives a checksum-compare delta.
    pub discarded: GenerationRecord,
}

/// Resolves a split brain between `ours` and `theirs` by discarding the
/// changes of the copy the user named. Refuses when there is no split brain,
/// and when the copy that would survive is a seed.
pub fn resolve_split_brain(
    ours: &GenerationRecord,
    theirs: &GenerationRecord,
    discard: Side,
) -> Result<Resolution, GenerationError> {
    let (survivor, source) = match discard {
        Side::Ours => (theirs, Side::Theirs),
        Side::Theirs => (ours, Side::Ours),
    };
    if survivor.role == CopyRole::Seed {
        return Err(GenerationError::SeedSurvivor);
    }
    let common = match ours.compare(theirs) {
        Comparison::SplitBrain { common, .. } => common,
        other => return Err(GenerationError::NotSplitBrain(other)),
    };
    let discarded = match common {
        Some(c) => {
            // Roll back onto the survivor's lineage at the common point.
            let history = match survivor.current.id == c.id {
                true => survivor.history.clone(),
                false => survivor
                    .history
                    .iter()
                    .skip_while(|e| e.id != c.id)
                    .skip(1)
                    .copied()
                    .collect(),
            };
            let number = survivor.entry(c.id).map_or(c.number, |e| e.number);
            GenerationRecord::from_parts(
                survivor.disk,
                CopyRole::Seed,
                GenerationEntry { number, ..c },
                history,
            )?
        }
        None => {
            let start = survivor.history.first().map_or(Seq::ZERO, |e| e.seq);
            GenerationRecord::from_parts(
                survivor.disk,
                CopyRole::Seed,
                GenerationEntry {
                    seq: start,
                    ..survivor.current
                },
                survivor.history.clone(),
            )?
        }
    };
    Ok(Resolution { source, discarded })
}

/// The message a user reads when two copies are in split brain, naming each
/// copy as the `--discard-changes-of` option takes it (a site, a host).
#[derive(Clone, Copy, Debug)]
pub struct SplitBrainReport<'a> {
    pub ours_name: &'a str,
    pub ours: &'a GenerationRecord,
    pub theirs_name: &'a str,
    pub theirs: &'a GenerationRecord,
}

impl fmt::Display for SplitBrainReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = match self.ours.compare(self.theirs) {
            Comparison::SplitBrain {
                common: Some(c), ..
            } => format!("since {c}"),
            _ => "from an unknown point".to_owned(),
        };
        write!(
            f,
            "disk {} is in split brain: both copies changed {since}; {}: {}; {}: {}; \
             nothing was synced: discard the changes of one with --discard-changes-of {} \
             or --discard-changes-of {}",
            self.ours.disk,
            self.ours_name,
            self.ours.lineage(),
            self.theirs_name,
            self.theirs.lineage(),
            self.ours_name,
            self.theirs_name,
        )
    }
}
