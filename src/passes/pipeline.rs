//! Pipeline cut: contiguous stages of blocks, balanced on block times subject to a
//! per-stage memory limit.
//!
//! Minimizing the slowest stage over contiguous partitions is solved exactly by a
//! binary search on the stage-time bound with a greedy feasibility check: each stage,
//! in order, takes the longest run of blocks that stays under the bound and under its
//! memory limit. Both limits are monotone in the run, so the greedy prefix is the
//! longest any feasible partition can reach (an exchange argument), and the search
//! finds the smallest bound to within floating-point resolution. Embedding and head
//! blocks are ordinary blocks with their own (different) costs.

use serde::{Deserialize, Serialize};

/// A virtual pipeline stage: a contiguous range of blocks (indices into the block list).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSpan {
    /// First block index.
    pub first: usize,
    /// Last block index (inclusive).
    pub last: usize,
}

/// Most bisection steps of the search for the smallest slowest-stage time.
const BISECTION_STEPS: u32 = 60;

/// The search stops when the bound is known to this relative precision (far below
/// the cost model's own accuracy).
const RELATIVE_RESOLUTION: f64 = 1e-6;

/// Cuts `times.len()` blocks into `parts` contiguous stages minimizing the largest
/// stage time, where `fits(stage, first, last)` says whether blocks `first..=last` fit
/// in stage `stage`'s memory. Returns `None` when no cut satisfies `fits` (or there
/// are fewer blocks than parts).
pub fn cut(
    times: &[f64],
    parts: usize,
    fits: impl Fn(usize, usize, usize) -> bool,
) -> Option<Vec<StageSpan>> {
    let n = times.len();
    if parts == 0 || parts > n {
        return None;
    }
    let mut prefix = vec![0.0; n + 1];
    for (i, t) in times.iter().enumerate() {
        prefix[i + 1] = prefix[i] + t;
    }
    let sum = |a: usize, b: usize| prefix[b + 1] - prefix[a];
    let greedy = |bound: f64| -> Option<Vec<StageSpan>> {
        let mut spans = Vec::with_capacity(parts);
        let mut first = 0;
        for stage in 0..parts {
            let left_after = parts - stage - 1;
            if first >= n {
                return None;
            }
            let ok = |last: usize| sum(first, last) <= bound && fits(stage, first, last);
            if !ok(first) {
                return None;
            }
            // The longest feasible run, leaving one block for each later stage; `ok`
            // is monotone in `last`, so binary search.
            let (mut good, mut bad) = (first, n - left_after);
            while bad - good > 1 {
                let mid = good + (bad - good) / 2;
                if ok(mid) {
                    good = mid;
                } else {
                    bad = mid;
                }
            }
            let last = good;
            if stage == parts - 1 && last != n - 1 {
                return None;
            }
            spans.push(StageSpan { first, last });
            first = last + 1;
        }
        Some(spans)
    };
    if parts == 1 {
        return fits(0, 0, n - 1).then(|| {
            vec![StageSpan {
                first: 0,
                last: n - 1,
            }]
        });
    }
    let max_block = times.iter().copied().fold(0.0, f64::max);
    let (mut lo, mut hi) = (max_block.max(prefix[n] / parts as f64), prefix[n]);
    let mut best = greedy(hi)?;
    if let Some(b) = greedy(lo) {
        return Some(b);
    }
    for _ in 0..BISECTION_STEPS {
        if hi - lo <= RELATIVE_RESOLUTION * hi {
            break;
        }
        let mid = 0.5 * (lo + hi);
        match greedy(mid) {
            Some(b) => {
                best = b;
                hi = mid;
            }
            None => lo = mid,
        }
    }
    Some(best)
}

/// Prefix sums and range maxima over per-block values given as runs of equal values,
/// for range queries in `O(log runs)` time and `O(runs · log runs)` memory (a
/// template-compiled model has four runs whatever its layer count).
#[derive(Clone, Debug)]
pub struct RangeStats {
    /// First block of each run.
    starts: Vec<usize>,
    /// Summed value of one block of each run.
    each: Vec<u64>,
    /// `prefix[r]`: sum over the runs before `r` (saturating).
    prefix: Vec<u64>,
    /// `max[k][r]` is the maximum of `2^k` runs starting at run `r`.
    max: Vec<Vec<u64>>,
}

impl RangeStats {
    /// Builds from per-block values given as (summed, maximized) pairs.
    pub fn new(values: impl IntoIterator<Item = (u64, u64)>) -> RangeStats {
        RangeStats::from_runs(values.into_iter().map(|(s, m)| (1, s, m)))
    }

    /// Builds from runs of (blocks, summed value of each, maximized value).
    pub fn from_runs(runs: impl IntoIterator<Item = (usize, u64, u64)>) -> RangeStats {
        let mut starts = Vec::new();
        let mut each = Vec::new();
        let mut prefix = vec![0u64];
        let mut maxes = Vec::new();
        let mut next = 0usize;
        for (len, s, m) in runs.into_iter().filter(|r| r.0 > 0) {
            starts.push(next);
            next += len;
            each.push(s);
            let total = s.saturating_mul(len as u64);
            prefix.push(prefix[prefix.len() - 1].saturating_add(total));
            maxes.push(m);
        }
        let n = maxes.len();
        let mut max = vec![maxes];
        let mut width = 1;
        while 2 * width <= n {
            let prev = max.last().expect("level 0 exists");
            let next = (0..n + 1 - 2 * width)
                .map(|i| prev[i].max(prev[i + width]))
                .collect();
            max.push(next);
            width *= 2;
        }
        RangeStats {
            starts,
            each,
            prefix,
            max,
        }
    }

    fn run_of(&self, i: usize) -> usize {
        self.starts.partition_point(|&s| s <= i).saturating_sub(1)
    }

    /// Sum of the summed values over blocks `first..=last`.
    pub fn sum(&self, first: usize, last: usize) -> u64 {
        let (a, b) = (self.run_of(first), self.run_of(last));
        let part = |r: usize, n: usize| self.each[r].saturating_mul(n as u64);
        if a == b {
            return part(a, last + 1 - first);
        }
        part(a, self.starts[a + 1] - first)
            .saturating_add(self.prefix[b] - self.prefix[a + 1])
            .saturating_add(part(b, last + 1 - self.starts[b]))
    }

    /// Maximum of the maximized values over blocks `first..=last`.
    pub fn max(&self, first: usize, last: usize) -> u64 {
        let (a, b) = (self.run_of(first), self.run_of(last));
        let len = b + 1 - a;
        let k = usize::BITS as usize - 1 - len.leading_zeros() as usize;
        let w = 1 << k;
        self.max[k][a].max(self.max[k][b + 1 - w])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_time(times: &[f64], spans: &[StageSpan]) -> f64 {
        spans
            .iter()
            .map(|s| times[s.first..=s.last].iter().sum::<f64>())
            .fold(0.0, f64::max)
    }

    #[test]
    fn cut_is_optimal_against_brute_force() {
        let times = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0];
        for parts in 1..=times.len() {
            let spans = cut(&times, parts, |_, _, _| true).unwrap();
            assert_eq!(spans.len(), parts);
            // Brute force over all cut positions.
            let n = times.len();
            let mut best = f64::INFINITY;
            for mask in 0u32..(1 << (n - 1)) {
                if mask.count_ones() as usize != parts - 1 {
                    continue;
                }
                let mut cur = 0.0f64;
                let mut worst = 0.0f64;
                for (i, t) in times.iter().enumerate() {
                    cur += t;
                    if i == n - 1 || mask & (1 << i) != 0 {
                        worst = worst.max(cur);
                        cur = 0.0;
                    }
                }
                best = best.min(worst);
            }
            assert!(
                (max_time(&times, &spans) - best).abs() < 1e-9,
                "parts {parts}"
            );
        }
    }

    #[test]
    fn range_stats_match_direct_computation() {
        let v: Vec<(u64, u64)> = (0..13u64).map(|i| (i * 3 % 7, (i * 5) % 11)).collect();
        let r = RangeStats::new(v.iter().copied());
        for a in 0..v.len() {
            for b in a..v.len() {
                assert_eq!(r.sum(a, b), v[a..=b].iter().map(|x| x.0).sum::<u64>());
                assert_eq!(r.max(a, b), v[a..=b].iter().map(|x| x.1).max().unwrap());
            }
        }
    }

    #[test]
    fn run_range_stats_match_the_expanded_values() {
        let runs = [
            (1usize, 5u64, 9u64),
            (7, 2, 3),
            (1, 4, 4),
            (3, 1, 12),
            (1, 6, 1),
        ];
        let r = RangeStats::from_runs(runs);
        let v: Vec<(u64, u64)> = runs
            .iter()
            .flat_map(|&(n, s, m)| std::iter::repeat_n((s, m), n))
            .collect();
        for a in 0..v.len() {
            for b in a..v.len() {
                assert_eq!(r.sum(a, b), v[a..=b].iter().map(|x| x.0).sum::<u64>());
                assert_eq!(r.max(a, b), v[a..=b].iter().map(|x| x.1).max().unwrap());
            }
        }
    }

    #[test]
    fn memory_limits_move_the_cut() {
        let times = [1.0; 6];
        // Stage 0 may hold at most two blocks.
        let spans = cut(&times, 2, |s, a, b| s != 0 || b - a < 2).unwrap();
        assert_eq!(spans[0], StageSpan { first: 0, last: 1 });
        assert!(cut(&times, 2, |_, a, b| b - a < 2).is_none());
        assert!(cut(&times, 7, |_, _, _| true).is_none());
    }
}
