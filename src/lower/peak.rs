//! Peak memory of a pipeline cut without simulating time.
//!
//! A device's memory in [`super::simulate`] changes only at its own steps, in its own
//! order: a forward of chunk `c` runs on top of the saved activations of every
//! in-flight micro-batch and then keeps its own; a backward first releases its own and
//! runs on top of the rest. So a device's peak is
//!
//! ```text
//! states + max( optimizer transient,
//!               max over steps: Σ_c in_flight_c · saved_c + transient of the step )
//! ```
//!
//! where `in_flight_c` counts the micro-batches of chunk `c` held at that step. The
//! counts depend only on the schedule, `pp` and `m` ([`InFlight`], computed once);
//! the per-chunk bytes only on the cut ([`ChunkSummary`]). [`device_peaks`] combines
//! them, giving exactly the peaks the simulation reports for the same cut, so a cut
//! can be chosen on the memory the plan will report.

use super::profile::{BlockProfile, Blocks};
use super::schedule::{DeviceOrder, Pass};
use crate::passes::Schedule;

/// One step's memory situation: the pass, its chunk, and how many micro-batches of
/// each chunk are held while it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pattern {
    pass: Pass,
    chunk: u32,
    counts: Vec<u32>,
}

/// The in-flight patterns of every device of a schedule, keeping only those not
/// dominated by another of the same pass and chunk (bytes are non-negative, so a
/// dominated pattern never sets the peak).
#[derive(Clone, Debug)]
pub struct InFlight {
    devices: Vec<Vec<Pattern>>,
}

impl InFlight {
    /// Walks each device's order of `schedule` with `pp` devices and `m` micro-batches
    /// (`O(pp · m · v)` time, once per schedule shape).
    pub fn new(schedule: Schedule, pp: u32, m: u32) -> InFlight {
        let pp = pp.max(1);
        let v = schedule.chunks() as usize;
        let devices = (0..pp)
            .map(|s| {
                let order = DeviceOrder::new(schedule, s, pp, m.max(1));
                let mut counts = vec![0u32; v];
                let mut kept: Vec<Pattern> = Vec::new();
                for p in 0..order.len() {
                    let step = order.step(p);
                    let c = step.chunk as usize;
                    if step.pass == Pass::B {
                        counts[c] = counts[c].saturating_sub(1);
                    }
                    // `big` holds at least as much of every chunk as `small`.
                    let covers =
                        |big: &[u32], small: &[u32]| small.iter().zip(big).all(|(s, b)| s <= b);
                    let same = |q: &Pattern| q.pass == step.pass && q.chunk == step.chunk;
                    if !kept.iter().any(|q| same(q) && covers(&q.counts, &counts)) {
                        kept.retain(|q| !(same(q) && covers(&counts, &q.counts)));
                        kept.push(Pattern {
                            pass: step.pass,
                            chunk: step.chunk,
                            counts: counts.clone(),
                        });
                    }
                    if step.pass == Pass::F {
                        counts[c] += 1;
                    }
                }
                kept
            })
            .collect();
        InFlight { devices }
    }
}

/// What a virtual stage (model chunk) holds and costs, for one micro-batch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ChunkSummary {
    /// Forward plus backward compute seconds.
    pub time_s: f64,
    /// Saved activation bytes kept from its forward to its backward.
    pub saved: u64,
    /// Peak bytes during its forward above the in-flight activations.
    pub fwd_peak: u64,
    /// Peak bytes during its backward above the in-flight activations.
    pub bwd_peak: u64,
    /// Persistent (model-state) bytes.
    pub states: u64,
    /// Peak transient bytes of its optimizer step.
    pub opt_extra: u64,
}

impl ChunkSummary {
    /// Appends `n` copies of block `b` (in model order), as
    /// [`super::simulate`] accumulates a stage block by block.
    pub fn push(&mut self, b: &BlockProfile, n: usize) {
        if n == 0 {
            return;
        }
        let n64 = n as u64;
        let held_before_last = self.saved.saturating_add(b.saved.saturating_mul(n64 - 1));
        self.fwd_peak = self
            .fwd_peak
            .max(held_before_last.saturating_add(b.fwd_extra));
        self.bwd_peak = self
            .bwd_peak
            .max(held_before_last.saturating_add(b.bwd_extra));
        self.saved = self.saved.saturating_add(b.saved.saturating_mul(n64));
        self.time_s += n as f64 * (b.fwd_s + b.bwd_s);
        self.states = self
            .states
            .saturating_add(b.states.total().saturating_mul(n64));
        self.opt_extra = self.opt_extra.max(b.opt_extra);
    }

    /// Appends blocks `first..=last` of `blocks`, run by run (`O(runs)`), with the
    /// copies of parameters they borrow from blocks outside the range
    /// ([`super::profile::Borrowed`]).
    pub fn push_range(&mut self, blocks: &Blocks, first: usize, last: usize) {
        if first > last {
            return;
        }
        let mut start = 0usize;
        for (n, b) in blocks.runs() {
            let end = start + n; // exclusive
            if end > first && start <= last {
                let lo = start.max(first);
                let hi = (end - 1).min(last);
                self.push(b, hi + 1 - lo);
                if let Some(copy) = b.borrowed {
                    let owner = blocks.index_of(copy.owner);
                    if !owner.is_some_and(|o| (first..=last).contains(&o)) {
                        let n64 = (hi + 1 - lo) as u64;
                        self.states = self
                            .states
                            .saturating_add(copy.states.total().saturating_mul(n64));
                    }
                }
            }
            if end > last {
                break;
            }
            start = end;
        }
    }
}

/// The largest of [`device_peaks`] (0 for no device), without collecting them: what
/// choosing a cut compares.
pub fn max_device_peak(chunks: &[ChunkSummary], pp: u32, inflight: &InFlight) -> u64 {
    let pp = pp.max(1) as usize;
    (0..pp)
        .map(|d| device_peak(chunks, pp, d, inflight))
        .max()
        .unwrap_or(0)
}

/// The peak bytes of device `d` of `pp` (see [`device_peaks`]).
fn device_peak(chunks: &[ChunkSummary], pp: usize, d: usize, inflight: &InFlight) -> u64 {
    let mine = |c: usize| chunks.get(c * pp + d);
    let v = chunks.len() / pp;
    let states = (0..v)
        .filter_map(mine)
        .fold(0u64, |s, x| s.saturating_add(x.states));
    let opt = (0..v)
        .filter_map(mine)
        .map(|x| x.opt_extra)
        .max()
        .unwrap_or(0);
    let mut top = opt;
    for p in inflight.devices.get(d).map_or(&[][..], Vec::as_slice) {
        let held = p
            .counts
            .iter()
            .enumerate()
            .filter_map(|(c, &n)| mine(c).map(|x| x.saved.saturating_mul(u64::from(n))))
            .fold(0u64, u64::saturating_add);
        let transient = mine(p.chunk as usize).map_or(0, |x| match p.pass {
            Pass::F => x.fwd_peak,
            Pass::B => x.bwd_peak,
        });
        top = top.max(held.saturating_add(transient));
    }
    states.saturating_add(top)
}

/// The peak bytes of each of the `pp` devices when virtual stage `k` (chunk `k / pp`
/// of device `k mod pp`) is `chunks[k]`, under the in-flight patterns `inflight` of
/// the same schedule shape. Equal to the peaks [`super::simulate`] reports.
pub fn device_peaks(chunks: &[ChunkSummary], pp: u32, inflight: &InFlight) -> Vec<u64> {
    let pp = pp.max(1) as usize;
    (0..pp)
        .map(|d| device_peak(chunks, pp, d, inflight))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use crate::cost::CostModel;
    use crate::lower::profile::StateBytes;
    use crate::lower::{simulate, SimInput, StageSpan};
    use crate::passes::Config;
    use proptest::prelude::*;

    fn block(saved: u64, fwd: u64, bwd: u64, states: u64, opt: u64) -> BlockProfile {
        BlockProfile {
            fwd_s: 1e-3,
            bwd_s: 2e-3,
            saved,
            fwd_extra: fwd,
            bwd_extra: bwd,
            opt_extra: opt,
            states: StateBytes {
                low_prec_params: states,
                ..StateBytes::default()
            },
            ..BlockProfile::default()
        }
    }

    proptest! {
        /// The peaks computed from in-flight patterns equal the event simulation's
        /// per-device peaks, for any blocks, schedule and cut.
        #[test]
        fn peaks_match_the_simulation(
            raw in prop::collection::vec((0u64..1000, 0u64..3000, 0u64..3000, 0u64..500, 0u64..4000), 4..24),
            pp in 1u32..5,
            v in 1u32..4,
            rounds in 1u32..4,
            gpipe in any::<bool>(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 16),
        ) {
            let v = if pp == 1 { 1 } else { v };
            let schedule = match (v, gpipe) {
                (1, true) => Schedule::Gpipe,
                (1, false) => Schedule::OneFOneB,
                (v, _) => Schedule::Interleaved(v),
            };
            let parts = (pp * v) as usize;
            prop_assume!(raw.len() >= parts);
            let m = pp * rounds;
            let profiles: Vec<BlockProfile> =
                raw.iter().map(|&(s, f, b, st, o)| block(s, f, b, st, o)).collect();
            let blocks = Blocks::from_vec(profiles);
            // A random contiguous cut: parts - 1 distinct boundaries.
            let mut bounds: Vec<usize> = cuts.iter().map(|i| 1 + i.index(raw.len() - 1)).collect();
            bounds.sort_unstable();
            bounds.dedup();
            prop_assume!(bounds.len() >= parts - 1);
            bounds.truncate(parts - 1);
            let mut spans = Vec::new();
            let mut first = 0;
            for &b in bounds.iter().chain(std::iter::once(&raw.len())) {
                spans.push(StageSpan { first, last: b - 1 });
                first = b;
            }
            let config = Config {
                schedule,
                ..Config::new(1, 1, pp, 1, m)
            };
            let cost = CostModel::new(Cluster::resolve("dgx-h100:1").unwrap());
            let sim = simulate(
                &blocks,
                &SimInput { config: &config, stages: &spans, cost: &cost, pp_cross_node: false, detail: false, overlap: crate::engine::Engine::Megatron.overlap(config.dp), links: crate::lower::SharedLinks::default() },
            );
            let chunks: Vec<ChunkSummary> = spans
                .iter()
                .map(|s| {
                    let mut x = ChunkSummary::default();
                    x.push_range(&blocks, s.first, s.last);
                    x
                })
                .collect();
            let ours = device_peaks(&chunks, pp, &InFlight::new(schedule, pp, m));
            let theirs: Vec<u64> = sim.memory.iter().map(|d| d.peak_bytes).collect();
            prop_assert_eq!(
                max_device_peak(&chunks, pp, &InFlight::new(schedule, pp, m)),
                ours.iter().copied().max().unwrap_or(0)
            );
            prop_assert_eq!(ours, theirs);
        }
    }
}
