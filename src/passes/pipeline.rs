//! Pipeline cut: which of the engine's layer placements a configuration uses.
//!
//! The engine lists the cuts it can express (`Engine::cuts`); each is scored by its
//! slowest virtual stage and by its exact peak memory (the peak the simulation will
//! report, see `lower::peak`). [`select`] takes the fastest cut whose peak fits the
//! budget; when none fits, the cut with the smallest peak.
//!
//! **More memory never hurts.** For a fixed configuration the scores do not depend on
//! the budget, so with budgets `a ≤ b`:
//!
//! * a fit stays a fit: the cuts that fit `a` also fit `b`, so `b` finds one;
//! * the peak never falls as the budget grows: when nothing fits `a`, its cut has the
//!   smallest peak of all; when something fits, `b`'s choice either fits `a` too (then
//!   both budgets pick the least (time, peak, index) of sets that contain both choices,
//!   which is one cut) or has a peak above `a`, hence above `a`'s choice. So a smaller
//!   device never reports a larger peak (and never an out-of-memory) for a cut that a
//!   larger device would run within the smaller one's memory.

use serde::{Deserialize, Serialize};

/// A virtual pipeline stage: a contiguous range of blocks (indices into the block list).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSpan {
    /// First block index.
    pub first: usize,
    /// Last block index (inclusive).
    pub last: usize,
}

/// What a candidate cut costs: the time of its slowest virtual stage (forward and
/// backward of one micro-batch) and the largest peak memory of its devices.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CutScore {
    /// Seconds of the slowest virtual stage.
    pub time_s: f64,
    /// Peak bytes of the fullest device.
    pub peak_bytes: u64,
}

/// The index of the cut to use for a device budget of `budget` bytes: among the cuts
/// whose peak is at most `budget`, the fastest (ties: smaller peak, then earlier);
/// when none fits, the smallest peak (ties: faster, then earlier). `None` only for
/// no cuts. Monotone in `budget` as the module documentation shows.
pub fn select(scores: &[CutScore], budget: u64) -> Option<usize> {
    let fits = |s: &CutScore| s.peak_bytes <= budget;
    let by_time = |a: &(usize, &CutScore), b: &(usize, &CutScore)| {
        a.1.time_s
            .total_cmp(&b.1.time_s)
            .then(a.1.peak_bytes.cmp(&b.1.peak_bytes))
            .then(a.0.cmp(&b.0))
    };
    let by_peak = |a: &(usize, &CutScore), b: &(usize, &CutScore)| {
        a.1.peak_bytes
            .cmp(&b.1.peak_bytes)
            .then(a.1.time_s.total_cmp(&b.1.time_s))
            .then(a.0.cmp(&b.0))
    };
    scores
        .iter()
        .enumerate()
        .filter(|(_, s)| fits(s))
        .min_by(by_time)
        .or_else(|| scores.iter().enumerate().min_by(by_peak))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn score(time_s: f64, peak_bytes: u64) -> CutScore {
        CutScore { time_s, peak_bytes }
    }

    #[test]
    fn fastest_fitting_else_smallest_peak() {
        let s = [
            score(1.0, 90),
            score(2.0, 70),
            score(3.0, 60),
            score(2.0, 65),
        ];
        assert_eq!(select(&s, 100), Some(0));
        assert_eq!(select(&s, 80), Some(3));
        assert_eq!(select(&s, 62), Some(2));
        assert_eq!(select(&s, 10), Some(2));
        assert_eq!(select(&[], 10), None);
    }

    proptest! {
        /// More budget never turns a fit into a miss and never lowers the peak.
        #[test]
        fn select_is_monotone_in_the_budget(
            cuts in prop::collection::vec((0u32..20, 0u64..50), 1..12),
            a in 0u64..60,
            extra in 0u64..60,
        ) {
            let s: Vec<CutScore> = cuts.iter().map(|&(t, p)| score(f64::from(t), p)).collect();
            let b = a + extra;
            let (ia, ib) = (select(&s, a).unwrap(), select(&s, b).unwrap());
            let (pa, pb) = (s[ia].peak_bytes, s[ib].peak_bytes);
            prop_assert!(pa <= pb);
            if pa <= a {
                prop_assert!(pb <= b);
            }
            // When nothing fits, the choice has the smallest peak of all.
            if pa > a {
                prop_assert!(s.iter().all(|x| x.peak_bytes >= pa));
            }
        }
    }
}
