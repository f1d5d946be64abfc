//! `ExtentSet`: a set of byte ranges kept coalesced (no two ranges overlap or
//! touch). The tracker's dirty map, the reader's work queue and resync all use
//! it; it does no I/O and never panics on any input.

use std::collections::BTreeMap;
use std::ops::Range;

/// A set of byte offsets stored as disjoint, non-adjacent half-open ranges.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ExtentSet {
    /// start -> end (exclusive); invariant: ranges are non-empty, disjoint and
    /// separated by at least one byte, so the representation is canonical.
    ranges: BTreeMap<u64, u64>,
    total: u64,
}

impl std::fmt::Debug for ExtentSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl ExtentSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Total number of bytes covered.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Number of disjoint ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
        self.total = 0;
    }

    /// The ranges in ascending order, coalesced.
    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.ranges.iter().map(|(&s, &e)| s..e)
    }

    /// Adds `r`, merging with every range it overlaps or touches. Empty ranges are ignored.
    pub fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // The range starting at or before `start` may overlap or touch it.
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back()
            && e >= start
        {
            if e >= end {
                return; // already covered
            }
            start = s;
            end = end.max(e);
            self.ranges.remove(&s);
            self.total -= e - s;
        }
        // Swallow every range starting inside [start, end] (touching counts).
        while let Some((&s, &e)) = self.ranges.range(start..=end).next() {
            self.ranges.remove(&s);
            self.total -= e - s;
            end = end.max(e);
        }
        self.ranges.insert(start, end);
        self.total += end - start;
    }

    /// Removes `r`, splitting ranges that straddle its ends.
    pub fn remove(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        if let Some((&s, &e)) = self.ranges.range(..r.start).next_back()
            && e > r.start
        {
            // A range starting before r overlaps it: keep its head (and tail).
            self.ranges.insert(s, r.start);
            self.total -= e - r.start;
            if e > r.end {
                self.ranges.insert(r.end, e);
                self.total += e - r.end;
                return;
            }
        }
        while let Some((&s, &e)) = self.ranges.range(r.start..r.end).next() {
            self.ranges.remove(&s);
            self.total -= e - s;
            if e > r.end {
                self.ranges.insert(r.end, e);
                self.total += e - r.end;
                break;
            }
        }
    }

    /// Whether every byte of `r` is in the set (an empty range is contained).
    pub fn contains(&self, r: Range<u64>) -> bool {
        if r.start >= r.end {
            return true;
        }
        self.ranges
            .range(..=r.start)
            .next_back()
            .is_some_and(|(_, &e)| e >= r.end)
    }

    /// Whether any byte of `r` is in the set.
    pub fn overlaps(&self, r: Range<u64>) -> bool {
        if r.start >= r.end {
            return false;
        }
        if let Some((_, &e)) = self.ranges.range(..=r.start).next_back()
            && e > r.start
        {
            return true;
        }
        self.ranges.range(r.start..r.end).next().is_some()
    }

    /// The parts of `r` not in the set, in ascending order (what a point's
    /// undo has not saved yet, which source supplies a range first).
    pub fn uncovered(&self, r: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        if r.start >= r.end {
            return out;
        }
        let mut pos = r.start;
        if let Some((_, &e)) = self.ranges.range(..=r.start).next_back()
            && e > pos
        {
            pos = e;
        }
        for (&s, &e) in self.ranges.range(r.start..r.end) {
            if s > pos {
                out.push(pos..s);
            }
            pos = pos.max(e);
            if pos >= r.end {
                break;
            }
        }
        if pos < r.end {
            out.push(pos..r.end);
        }
        out
    }

    /// Adds every range of `other`.
    pub fn extend_from(&mut self, other: &ExtentSet) {
        for r in other.iter() {
            self.insert(r);
        }
    }

    /// Removes and returns the lowest ranges holding at most `max_bytes` bytes,
    /// splitting the last one if needed. Returns nothing when `max_bytes` is 0.
    pub fn take(&mut self, max_bytes: u64) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut budget = max_bytes;
        while budget > 0 {
            let Some((s, e)) = self.ranges.pop_first() else {
                break;
            };
            let len = e - s;
            if len <= budget {
                budget -= len;
                self.total -= len;
                out.push(s..e);
            } else {
                self.ranges.insert(s + budget, e);
                self.total -= budget;
                out.push(s..s + budget);
                budget = 0;
            }
        }
        out
    }

    /// Like [`take`](Self::take), but every returned range is aligned out to
    /// `align` bytes (a power of two) and clipped to `limit`, so a reader can use
    /// direct I/O; the widened bytes are removed from the set as well.
    pub fn take_aligned(&mut self, max_bytes: u64, align: u64, limit: u64) -> Vec<Range<u64>> {
        let align = align.max(1);
        let mut out: Vec<Range<u64>> = Vec::new();
        for r in self.take(max_bytes) {
            let start = r.start - r.start % align;
            let end = r
                .end
                .checked_next_multiple_of(align)
                .unwrap_or(u64::MAX)
                .min(limit.max(r.end));
            self.remove(start..end);
            match out.last_mut() {
                Some(last) if last.end >= start => last.end = last.end.max(end),
                _ => out.push(start..end),
            }
        }
        out
    }
}

impl FromIterator<Range<u64>> for ExtentSet {
    fn from_iter<I: IntoIterator<Item = Range<u64>>>(iter: I) -> Self {
        let mut set = ExtentSet::new();
        for r in iter {
            set.insert(r);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UNIVERSE: u64 = 256;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Remove(u64, u64),
        Take(u64),
        TakeAligned(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..UNIVERSE, 0..UNIVERSE);
        prop_oneof![
            3 => range.clone().prop_map(|(a, b)| Op::Insert(a.min(b), a.max(b))),
            2 => range.prop_map(|(a, b)| Op::Remove(a.min(b), a.max(b))),
            1 => (0..64u64).prop_map(Op::Take),
            1 => (0..64u64, 0..4u32).prop_map(|(n, a)| Op::TakeAligned(n, 1 << a)),
        ]
    }

    fn model_ranges(bits: &[bool]) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for (i, &b) in bits.iter().enumerate() {
            let i = i as u64;
            if b {
                match out.last_mut() {
                    Some(last) if last.end == i => last.end = i + 1,
                    _ => out.push(i..i + 1),
                }
            }
        }
        out
    }

    proptest! {
        /// Every operation leaves the set equal to a bitmap model, coalesced.
        #[test]
        fn matches_bitmap_model(ops in proptest::collection::vec(op(), 0..60)) {
            let mut set = ExtentSet::new();
            let mut bits = vec![false; UNIVERSE as usize];
            for op in ops {
                match op {
                    Op::Insert(a, b) => {
                        set.insert(a..b);
                        bits[a as usize..b as usize].iter_mut().for_each(|x| *x = true);
                    }
                    Op::Remove(a, b) => {
                        set.remove(a..b);
                        bits[a as usize..b as usize].iter_mut().for_each(|x| *x = false);
                    }
                    Op::Take(n) => {
                        let before = model_ranges(&bits);
                        let got = set.take(n);
                        let taken: u64 = got.iter().map(|r| r.end - r.start).sum();
                        let avail: u64 = before.iter().map(|r| r.end - r.start).sum();
                        prop_assert_eq!(taken, n.min(avail));
                        // Taken bytes are the lowest ones that were set.
                        let mut want = n;
                        let mut expect = Vec::new();
                        for r in before {
                            if want == 0 { break; }
                            let len = (r.end - r.start).min(want);
                            expect.push(r.start..r.start + len);
                            want -= len;
                        }
                        prop_assert_eq!(&got, &expect);
                        for r in got {
                            bits[r.start as usize..r.end as usize].iter_mut().for_each(|x| *x = false);
                        }
                    }
                    Op::TakeAligned(n, align) => {
                        let before = bits.clone();
                        let got = set.take_aligned(n, align, UNIVERSE);
                        for r in &got {
                            prop_assert!(r.start % align == 0);
                            prop_assert!(r.end % align == 0 || r.end == UNIVERSE);
                            bits[r.start as usize..r.end as usize].iter_mut().for_each(|x| *x = false);
                        }
                        // Nothing set before is lost unless it was returned.
                        for (i, was) in before.iter().enumerate() {
                            let i = i as u64;
                            let returned = got.iter().any(|r| r.contains(&i));
                            prop_assert!(!*was || returned || bits[i as usize]);
                        }
                    }
                }
                let expect = model_ranges(&bits);
                prop_assert_eq!(set.iter().collect::<Vec<_>>(), expect.clone());
                prop_assert_eq!(set.len(), expect.len());
                prop_assert_eq!(set.total_bytes(), bits.iter().filter(|&&b| b).count() as u64);
            }
        }

        /// `contains` and `overlaps` agree with the bitmap model.
        #[test]
        fn queries_match_model(
            ins in proptest::collection::vec((0..UNIVERSE, 0..UNIVERSE), 0..10),
            q in (0..UNIVERSE, 0..UNIVERSE),
        ) {
            let mut bits = vec![false; UNIVERSE as usize];
            let set: ExtentSet = ins
                .iter()
                .map(|&(a, b)| {
                    let (a, b) = (a.min(b), a.max(b));
                    bits[a as usize..b as usize].iter_mut().for_each(|x| *x = true);
                    a..b
                })
                .collect();
            let (a, b) = (q.0.min(q.1), q.0.max(q.1));
            let slice = &bits[a as usize..b as usize];
            prop_assert_eq!(set.contains(a..b), slice.iter().all(|&x| x));
            prop_assert_eq!(set.overlaps(a..b), slice.iter().any(|&x| x));
        }

        /// `uncovered` returns exactly the model's clear bits of the range, coalesced.
        #[test]
        fn uncovered_matches_model(
            ins in proptest::collection::vec((0..UNIVERSE, 0..UNIVERSE), 0..10),
            q in (0..UNIVERSE, 0..UNIVERSE),
        ) {
            let mut bits = vec![false; UNIVERSE as usize];
            let set: ExtentSet = ins
                .iter()
                .map(|&(a, b)| {
                    let (a, b) = (a.min(b), a.max(b));
                    bits[a as usize..b as usize].iter_mut().for_each(|x| *x = true);
                    a..b
                })
                .collect();
            let (a, b) = (q.0.min(q.1), q.0.max(q.1));
            let mut want: Vec<Range<u64>> = Vec::new();
            for i in a..b {
                if !bits[i as usize] {
                    match want.last_mut() {
                        Some(last) if last.end == i => last.end = i + 1,
                        _ => want.push(i..i + 1),
                    }
                }
            }
            prop_assert_eq!(set.uncovered(a..b), want);
        }
    }

    #[test]
    fn extremes_do_not_overflow() {
        let mut set = ExtentSet::new();
        set.insert(u64::MAX - 10..u64::MAX);
        set.insert(0..10);
        assert_eq!(set.total_bytes(), 20);
        let got = set.take_aligned(100, 4096, u64::MAX);
        assert_eq!(got, vec![0..4096, u64::MAX - 4095..u64::MAX]);
        assert!(set.is_empty());
    }
}
