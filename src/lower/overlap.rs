//! One pass of one model chunk with its data-parallel collectives: a compute stream
//! that runs the blocks in order, and a communication stream on which the gathers and
//! bucketed reductions run one after another, by the engine's rules
//! ([`crate::engine::overlap`]).
//!
//! - A block starts when the block before it is done and its parameter gather has
//!   arrived. With prefetching, the next block's gather is issued when a block starts
//!   (so it overlaps that block's compute and the first gather is exposed); without,
//!   when the block ends.
//! - A block's reduction joins the open bucket when its compute ends; a full bucket
//!   (and the last one, at the end of the pass) is reduced on the communication stream
//!   from then on. The pass ends when both streams are done: the last bucket is
//!   exposed.
//! - **Link contention.** When the data-parallel group shares a link with the
//!   tensor-parallel group (both inside one node), the tensor-parallel collectives of a
//!   block use that link while a data-parallel collective overlapping the block waits
//!   for it: the collective takes longer by the block's tensor-parallel time (charged
//!   once per block), so the overlapped span is at least the sum of the two on that
//!   link. A pipeline send on the inter-node link the
//!   data-parallel group also crosses keeps the stream busy at the pass start
//!   ([`Rules::busy_s`]).
//! - **Compute contention.** While the communication stream is busy, compute runs at
//!   `1 − slowdown` of its speed ([`Rules::slowdown`]): the collective's kernels hold
//!   streaming multiprocessors the compute kernels cannot use. A block's compute is
//!   stretched over the part of it that overlaps collectives issued before or as it
//!   starts (its prefetched gather, earlier reductions).

use crate::engine::overlap::Bucket;

/// One block's work in a pass, in the order the pass runs its blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Work {
    /// Compute time (tensor-parallel collectives and recomputation included).
    pub compute_s: f64,
    /// Of which collectives on a link the data-parallel group shares (0 if none).
    pub link_s: f64,
    /// Data-parallel gather of the block's parameters, needed before its compute.
    pub gather_s: f64,
    /// Data-parallel reduction of the block's gradients, ready after its compute.
    pub reduce_s: f64,
    /// Parameter elements whose gradients the reduction carries (what fills a bucket).
    pub elems: u64,
}

/// How a pass overlaps its collectives.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rules {
    /// Gradient bucket.
    pub bucket: Bucket,
    /// Whether the next block's gather is issued when a block starts.
    pub prefetch: bool,
    /// Time the communication stream is busy from the pass start (an earlier
    /// collective, or a pipeline send on the same link).
    pub busy_s: f64,
    /// Fraction of compute speed lost while a collective runs beside it
    /// ([`crate::cost::Calibration::overlap_slowdown`]), in `[0, 1)`.
    pub slowdown: f64,
}

/// How long `compute_s` of work takes from `start` when the communication stream is
/// busy until `busy_until`, at `1 − slowdown` speed meanwhile.
fn stretched(compute_s: f64, start: f64, busy_until: f64, slowdown: f64) -> f64 {
    let rate = 1.0 - slowdown.clamp(0.0, 0.99);
    let window = (busy_until - start).max(0.0);
    if compute_s <= rate * window {
        compute_s / rate
    } else {
        window + (compute_s - rate * window)
    }
}

/// When one block ran, relative to the pass start.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Slot {
    /// Compute start.
    pub start_s: f64,
    /// Compute end.
    pub end_s: f64,
    /// The block's gather (start, end); empty when it has none.
    pub gather: (f64, f64),
    /// The reduction of the bucket this block closed (start, end); empty when none.
    pub reduce: (f64, f64),
}

/// A pass's timeline.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Timeline {
    /// Per block, in pass order.
    pub slots: Vec<Slot>,
    /// When the compute stream is done.
    pub compute_end_s: f64,
    /// When the communication stream is done.
    pub comm_end_s: f64,
}

impl Timeline {
    /// When the pass is done: both streams.
    pub fn end_s(&self) -> f64 {
        self.compute_end_s.max(self.comm_end_s)
    }
}

/// Runs one pass (see the module doc).
pub fn run(work: &[Work], rules: &Rules) -> Timeline {
    let n = work.len();
    let mut slots = vec![Slot::default(); n];
    let mut charged = vec![false; n];
    let mut comm = rules.busy_s.max(0.0);
    let mut compute = 0.0f64;
    // A collective issued at `at` on the stream; `over` is the block whose compute it
    // may overlap (its link time is charged once).
    let mut issue = |comm: &mut f64, at: f64, dur: f64, over: Option<(usize, f64)>| {
        let start = comm.max(at);
        let mut end = start + dur;
        if let Some((j, block_end)) = over {
            if start < block_end && !charged[j] && work[j].link_s > 0.0 {
                charged[j] = true;
                end += work[j].link_s;
            }
        }
        *comm = end;
        (start, end)
    };
    if let Some(w) = work.first() {
        if w.gather_s > 0.0 {
            slots[0].gather = issue(&mut comm, 0.0, w.gather_s, None);
        }
    }
    let (mut bucket_s, mut bucket_elems) = (0.0f64, 0u64);
    for i in 0..n {
        let start = compute.max(slots[i].gather.1);
        let next_gather = work.get(i + 1).map_or(0.0, |w| w.gather_s);
        if rules.prefetch && next_gather > 0.0 {
            let unslowed = start + work[i].compute_s;
            slots[i + 1].gather = issue(&mut comm, start, next_gather, Some((i, unslowed)));
        }
        let end = start + stretched(work[i].compute_s, start, comm, rules.slowdown);
        slots[i].start_s = start;
        slots[i].end_s = end;
        compute = end;
        bucket_s += work[i].reduce_s;
        bucket_elems += work[i].elems;
        let full = match rules.bucket {
            Bucket::Block => true,
            Bucket::Elements(e) => bucket_elems >= e,
            Bucket::Chunk | Bucket::Step => false,
        };
        if (full || i + 1 == n) && bucket_s > 0.0 {
            // It overlaps the next block's compute, which starts now at the earliest.
            let over = (i + 1 < n).then(|| (i + 1, f64::INFINITY));
            slots[i].reduce = issue(&mut comm, end, bucket_s, over);
        }
        if full || i + 1 == n {
            bucket_s = 0.0;
            bucket_elems = 0;
        }
        if !rules.prefetch && next_gather > 0.0 {
            slots[i + 1].gather = issue(&mut comm, end, next_gather, None);
        }
    }
    Timeline {
        slots,
        compute_end_s: compute,
        comm_end_s: comm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(compute_s: f64, gather_s: f64, reduce_s: f64) -> Work {
        Work {
            compute_s,
            gather_s,
            reduce_s,
            elems: 1,
            ..Work::default()
        }
    }

    const PREFETCH: Rules = Rules {
        bucket: Bucket::Block,
        prefetch: true,
        busy_s: 0.0,
        slowdown: 0.0,
    };

    #[test]
    fn the_first_gather_is_exposed_and_the_next_ones_hide() {
        // Gathers of 1 behind blocks of 2: only the first one shows.
        let t = run(&[w(2.0, 1.0, 0.0); 3], &PREFETCH);
        assert_eq!(t.end_s(), 1.0 + 6.0);
        // Gathers longer than the compute set the pace: 1 + 3 + 3 + 3 - ... the last
        // block computes after the third gather.
        let t = run(&[w(1.0, 3.0, 0.0); 3], &PREFETCH);
        assert_eq!(t.end_s(), 9.0 + 1.0);
        // Without prefetch each gather waits for the block before it.
        let t = run(
            &[w(2.0, 1.0, 0.0); 3],
            &Rules {
                prefetch: false,
                ..PREFETCH
            },
        );
        assert_eq!(t.end_s(), 9.0);
    }

    #[test]
    fn the_last_bucket_is_exposed() {
        // Per-block buckets: each reduction hides behind the next block but the last.
        let t = run(&[w(2.0, 0.0, 1.0); 3], &PREFETCH);
        assert_eq!(t.end_s(), 6.0 + 1.0);
        // One bucket for the chunk: all of it after the last block.
        let t = run(
            &[w(2.0, 0.0, 1.0); 3],
            &Rules {
                bucket: Bucket::Chunk,
                ..PREFETCH
            },
        );
        assert_eq!(t.end_s(), 6.0 + 3.0);
        // Buckets of two blocks' elements: the first closes after block 1.
        let t = run(
            &[w(2.0, 0.0, 1.0); 3],
            &Rules {
                bucket: Bucket::Elements(2),
                ..PREFETCH
            },
        );
        assert_eq!(t.slots[1].reduce, (4.0, 6.0));
        assert_eq!(t.end_s(), 6.0 + 1.0);
    }

    #[test]
    fn a_shared_link_adds_the_tensor_parallel_time_once_per_block() {
        let mut blocks = [w(2.0, 0.0, 1.0); 3];
        for b in &mut blocks {
            b.link_s = 1.5;
        }
        // Block 0's reduction overlaps block 1 (1 + 1.5 ≤ 2: hidden), block 1's
        // overlaps block 2, the last one is exposed without contention.
        let t = run(&blocks, &PREFETCH);
        assert_eq!(t.slots[0].reduce, (2.0, 4.5));
        assert_eq!(t.slots[1].reduce, (4.5, 7.0));
        assert_eq!(t.end_s(), 8.0);
    }

    #[test]
    fn overlapped_compute_slows_by_the_collectives_share() {
        // A block of 2 beside a prefetched gather of 1 at quarter speed loss: the first
        // unit of time does 0.75 of work, the remaining 1.25 runs at full speed.
        let rules = Rules {
            slowdown: 0.25,
            ..PREFETCH
        };
        let t = run(&[w(2.0, 0.0, 0.0), w(2.0, 1.0, 0.0)], &rules);
        assert_eq!(t.slots[0].end_s, 1.0 + 1.25);
        // Work shorter than the collective runs slowed all the way: 0.5 / 0.75.
        assert!((stretched(0.5, 0.0, 1.0, 0.25) - 0.5 / 0.75).abs() < 1e-12);
        // No collective, no slowdown.
        assert_eq!(stretched(2.0, 3.0, 1.0, 0.25), 2.0);
    }
}
