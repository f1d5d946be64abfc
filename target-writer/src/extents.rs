//! Byte-range sets: which parts of the disk a journal segment already covers.
//! Undo capture asks "which parts of this write are not yet saved?", export
//! asks "which source supplies this range first?"; both are `uncovered`.

use std::collections::BTreeMap;

/// A set of disjoint, non-adjacent half-open ranges `[start, end)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtentSet {
    // start -> end; invariant: ranges are disjoint and never touch.
    map: BTreeMap<u64, u64>,
}

impl ExtentSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total number of bytes covered.
    pub fn len_bytes(&self) -> u64 {
        self.map.iter().map(|(s, e)| e - s).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(s, e)| (*s, *e))
    }

    /// Adds `[start, end)`, merging with neighbours it overlaps or touches.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // The range starting at or before `s` may reach into ours.
        if let Some((&ps, &pe)) = self.map.range(..=s).next_back()
            && pe >= s
        {
            s = ps;
            e = e.max(pe);
        }
        let absorbed: Vec<u64> = self.map.range(s..=e).map(|(k, _)| *k).collect();
        for k in absorbed {
            if let Some(ke) = self.map.remove(&k) {
                e = e.max(ke);
            }
        }
        self.map.insert(s, e);
    }

    /// The parts of `[start, end)` not in the set, in order.
    pub fn uncovered(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if start >= end {
            return out;
        }
        let mut pos = start;
        if let Some((_, &pe)) = self.map.range(..=start).next_back()
            && pe > pos
        {
            pos = pe;
        }
        for (&s, &e) in self.map.range(start..end) {
            if s > pos {
                out.push((pos, s.min(end)));
            }
            pos = pos.max(e);
            if pos >= end {
                break;
            }
        }
        if pos < end {
            out.push((pos, end));
        }
        out
    }

    pub fn contains_range(&self, start: u64, end: u64) -> bool {
        self.uncovered(start, end).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model_uncovered(bits: &[bool], s: u64, e: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for i in s..e {
            if !bits[i as usize] {
                match out.last_mut() {
                    Some(last) if last.1 == i => last.1 = i + 1,
                    _ => out.push((i, i + 1)),
                }
            }
        }
        out
    }

    proptest! {
        #[test]
        fn uncovered_matches_a_bitmap_model(
            ranges in proptest::collection::vec((0u64..200, 0u64..40), 0..30),
            q in (0u64..200, 0u64..60),
        ) {
            let mut set = ExtentSet::new();
            let mut bits = vec![false; 300];
            for (s, l) in ranges {
                set.insert(s, s + l);
                for i in s..s + l { bits[i as usize] = true; }
            }
            let (qs, ql) = q;
            prop_assert_eq!(set.uncovered(qs, qs + ql), model_uncovered(&bits, qs, qs + ql));
            prop_assert_eq!(set.len_bytes(), bits.iter().filter(|b| **b).count() as u64);
            // Ranges stay disjoint and non-adjacent.
            let v: Vec<_> = set.iter().collect();
            for w in v.windows(2) { prop_assert!(w[0].1 < w[1].0); }
        }
    }
}
