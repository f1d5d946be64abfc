//! Which recovery points to keep, and when a scheduled point is due. Pure
//! functions of the point list and an explicit `now` (milliseconds since the
//! Unix epoch), so every rule is tested without clocks or files.
//!
//! The default mirrors what operators of the peers expect: every point of the
//! last hour, then one per 10 minutes up to 24 hours, one per day up to 7 days.
//! Buckets are aligned to absolute time (not to `now`), so the point kept for a
//! bucket does not change as time passes; within a bucket the best label wins,
//! then the oldest point. The newest point is always kept.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use blockferry_proto::Consistency;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    /// Keep one point per this many seconds ...
    pub every_secs: u64,
    /// ... for points up to this age.
    pub up_to_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Every point younger than this is kept.
    pub keep_all_secs: u64,
    /// Thinning tiers, by increasing age.
    pub tiers: Vec<Tier>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            keep_all_secs: 3600,
            tiers: vec![
                Tier {
                    every_secs: 600,
                    up_to_secs: 24 * 3600,
                },
                Tier {
                    every_secs: 24 * 3600,
                    up_to_secs: 7 * 24 * 3600,
                },
            ],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointStamp {
    pub id: u64,
    pub time_ms: u64,
    pub label: Consistency,
}

/// The ids of the points to keep at `now_ms`.
pub fn retain(points: &[PointStamp], policy: &RetentionPolicy, now_ms: u64) -> BTreeSet<u64> {
    let mut keep = BTreeSet::new();
    if let Some(newest) = points.iter().max_by_key(|p| (p.time_ms, p.id)) {
        keep.insert(newest.id);
    }
    // (tier, bucket) -> best point so far
    let mut best: std::collections::BTreeMap<(usize, u64), PointStamp> = Default::default();
    for p in points {
        let age_secs = now_ms.saturating_sub(p.time_ms) / 1000;
        if age_secs <= policy.keep_all_secs {
            keep.insert(p.id);
            continue;
        }
        let Some((ti, tier)) = policy
            .tiers
            .iter()
            .enumerate()
            .find(|(_, t)| age_secs <= t.up_to_secs)
        else {
            continue;
        };
        let bucket = p.time_ms / 1000 / tier.every_secs.max(1);
        let better = |a: &PointStamp, b: &PointStamp| {
            (
                a.label,
                std::cmp::Reverse(a.time_ms),
                std::cmp::Reverse(a.id),
            ) > (
                b.label,
                std::cmp::Reverse(b.time_ms),
                std::cmp::Reverse(b.id),
            )
        };
        best.entry((ti, bucket))
            .and_modify(|cur| {
                if better(p, cur) {
                    *cur = *p;
                }
            })
            .or_insert(*p);
    }
    keep.extend(best.values().map(|p| p.id));
    keep
}

/// Whether a scheduled point is due: none yet, or the last is `every_secs` old.
pub fn scheduled_point_due(last_point_ms: Option<u64>, every_secs: u64, now_ms: u64) -> bool {
    if every_secs == 0 {
        return false;
    }
    match last_point_ms {
        None => true,
        Some(t) => now_ms.saturating_sub(t) >= every_secs * 1000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;
    const HOUR: u64 = 60 * MIN;
    const DAY: u64 = 24 * HOUR;

    fn pts(times: &[u64]) -> Vec<PointStamp> {
        times
            .iter()
            .enumerate()
            .map(|(i, &t)| PointStamp {
                id: i as u64,
                time_ms: t,
                label: Consistency::CrashConsistent,
            })
            .collect()
    }

    #[test]
    fn keeps_every_point_of_the_last_hour() {
        let now = 30 * DAY;
        let p = pts(&(0..60).map(|m| now - m * MIN).collect::<Vec<_>>());
        assert_eq!(retain(&p, &RetentionPolicy::default(), now).len(), 60);
    }

    #[test]
    fn thins_to_one_per_ten_minutes_up_to_a_day() {
        let now = 30 * DAY;
        // One point per minute from 2 h ago to 1 h 1 min ago: 60 points over 6 buckets.
        let times: Vec<u64> = (61..121).map(|m| now - m * MIN).collect();
        let kept = retain(&pts(&times), &RetentionPolicy::default(), now);
        // The newest is always kept, plus one per 10-minute bucket.
        let buckets: BTreeSet<u64> = times.iter().map(|t| t / 1000 / 600).collect();
        assert_eq!(kept.len(), buckets.len() + 1);
        for b in buckets {
            let in_bucket = times.iter().filter(|t| *t / 1000 / 600 == b).count();
            let kept_in_bucket = kept
                .iter()
                .filter(|id| times[**id as usize] / 1000 / 600 == b)
                .count();
            assert!(kept_in_bucket >= 1 && kept_in_bucket <= in_bucket);
        }
    }

    #[test]
    fn keeps_one_a_day_up_to_a_week_and_nothing_older() {
        let now = 30 * DAY;
        let times: Vec<u64> = (0..10 * 24).map(|h| now - 25 * HOUR - h * HOUR).collect();
        let kept = retain(&pts(&times), &RetentionPolicy::default(), now);
        for id in &kept {
            let age = now - times[*id as usize];
            assert!(age <= 7 * DAY || *id == 0, "point aged {age} ms kept");
        }
        let days: BTreeSet<u64> = kept.iter().map(|id| times[*id as usize] / DAY).collect();
        // One per calendar day bucket, except the always-kept newest.
        assert!(kept.len() <= days.len() + 1);
        assert!(days.len() >= 6);
    }

    #[test]
    fn prefers_the_better_label_within_a_bucket() {
        let now = 30 * DAY;
        let base = (now - 3 * HOUR) / 600_000 * 600_000;
        let mut p = pts(&[base + MIN, base + 2 * MIN, base + 3 * MIN, now]);
        p[1].label = Consistency::AppConsistent;
        let kept = retain(&p, &RetentionPolicy::default(), now);
        assert_eq!(kept, BTreeSet::from([1, 3]));
    }

    #[test]
    fn the_decision_for_a_bucket_is_stable_as_time_passes() {
        let start = 30 * DAY;
        let times: Vec<u64> = (0..300).map(|m| start + m * MIN).collect();
        let policy = RetentionPolicy::default();
        let mut prev: Option<BTreeSet<u64>> = None;
        for step in 0..48 {
            let now = start + 300 * MIN + step * 30 * MIN;
            let kept = retain(&pts(&times), &policy, now);
            if let Some(prev) = &prev {
                // A point dropped once is never wanted again.
                assert!(kept.is_subset(prev), "at step {step}");
            }
            prev = Some(kept);
        }
    }

    #[test]
    fn schedule_is_due_after_the_interval() {
        assert!(scheduled_point_due(None, 60, 0));
        assert!(!scheduled_point_due(Some(1000), 60, 60_999));
        assert!(scheduled_point_due(Some(1000), 60, 61_000));
        assert!(!scheduled_point_due(None, 0, 5));
    }
}
