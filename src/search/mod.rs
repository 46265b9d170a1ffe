//! Search over configurations: out-of-memory suggestions (each one compiled and
//! checked), and (in `plan`) the whole candidate space.

use crate::lower::compile::{CompileError, Compiler, Evaluation};
use crate::lower::StageSpan;
use crate::passes::candidates::{enumerate_for, Constraints};
use crate::passes::{Config, Recompute};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

/// A concrete change and what it would give.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Suggestion {
    /// What to change, in words.
    pub change: String,
    /// The configuration after the change (when it is a configuration change).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<Config>,
    /// The device count after the change (when the cluster changes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<u64>,
    /// The global batch after the change (when the batch changes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_batch: Option<u64>,
    /// Peak bytes after the change.
    pub peak_bytes: u64,
    /// Step time after the change, seconds.
    pub step_time_s: f64,
}

/// Single changes to `c` that an out-of-memory user could make, in a fixed order.
fn neighbours(c: &Config) -> Vec<(String, Config)> {
    let mut out = Vec::new();
    for zero in (c.zero + 1)..=3 {
        out.push((
            format!("ZeRO stage {zero} (--zero {zero})"),
            Config { zero, ..*c },
        ));
    }
    if !c.shards_low_prec() && c.grad_ranks() > 1 {
        out.push((
            "shard the low-precision parameters (--low-prec-shard)".into(),
            Config {
                low_prec_shard: true,
                ..*c
            },
        ));
    }
    for r in [Recompute::Selective, Recompute::Full] {
        if r > c.recompute {
            out.push((
                format!("{r} recomputation (--recompute {r})"),
                Config { recompute: r, ..*c },
            ));
        }
    }
    if c.micro_batch % 2 == 0 {
        out.push((
            format!(
                "micro-batch {} × {} micro-batches (--micro-batch {})",
                c.micro_batch / 2,
                c.num_micro_batches * 2,
                c.micro_batch / 2
            ),
            Config {
                micro_batch: c.micro_batch / 2,
                num_micro_batches: c.num_micro_batches * 2,
                ..*c
            },
        ));
    }
    if c.dp % 2 == 0 {
        out.push((
            format!(
                "{} pipeline stages, dp {} (--pp {} --dp {})",
                c.pp * 2,
                c.dp / 2,
                c.pp * 2,
                c.dp / 2
            ),
            Config {
                pp: c.pp * 2,
                dp: c.dp / 2,
                num_micro_batches: c.num_micro_batches * 2,
                ..*c
            },
        ));
        out.push((
            format!(
                "tensor parallel {}, dp {} (--tp {} --dp {})",
                c.tp * 2,
                c.dp / 2,
                c.tp * 2,
                c.dp / 2
            ),
            Config {
                tp: c.tp * 2,
                dp: c.dp / 2,
                num_micro_batches: c.num_micro_batches * 2,
                // Experts split by the tensor-parallel degree keep following it.
                etp: if c.etp > 1 && c.etp == c.tp {
                    c.tp * 2
                } else {
                    c.etp
                },
                ..*c
            },
        ));
    }
    // Mixture-of-experts models: experts spread over twice the ranks, each holding
    // half as many (the compiler drops it for a dense model, or where the experts or
    // the ranks do not divide).
    let ep = c.ep.saturating_mul(2);
    out.push((
        format!("expert parallel {ep} (--ep {ep})"),
        Config { ep, ..*c },
    ));
    if c.dp % 2 == 0 {
        // Long sequences: activations shrink by the context-parallel degree while the
        // model states stay (the compiler drops it where the sequence does not split
        // into 2·cp chunks).
        let cp = c.cp * 2;
        out.push((
            format!(
                "context parallel {cp}, dp {} (--cp {cp} --dp {})",
                c.dp / 2,
                c.dp / 2
            ),
            Config {
                cp,
                dp: c.dp / 2,
                num_micro_batches: c.num_micro_batches * 2,
                ..*c
            },
        ));
    }
    if c.tp > 1 && !c.sp {
        out.push((
            "sequence parallelism (--sp)".into(),
            Config { sp: true, ..*c },
        ));
    }
    out
}

/// Compiles every single change of `c` and returns those that fit, fastest first.
pub fn suggestions(compiler: &Compiler, c: &Config) -> Vec<Suggestion> {
    let mut fits: Vec<Suggestion> = neighbours(c)
        .into_iter()
        .filter_map(|(change, cfg)| {
            let e = compiler.evaluate(&cfg).ok()?;
            e.fits.then_some(Suggestion {
                change,
                config: Some(cfg),
                devices: None,
                global_batch: None,
                peak_bytes: e.peak_bytes,
                step_time_s: e.step_time_s,
            })
        })
        .collect();
    fits.sort_by(|a, b| a.step_time_s.total_cmp(&b.step_time_s));
    fits
}

/// Candidates simulated per round of [`plan_with`] (a fixed number, so that pruning
/// does not depend on the thread count).
pub const SIMULATION_ROUND: usize = 256;

/// Options of [`plan_with`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SearchOptions {
    /// Pins and bounds.
    pub constraints: Constraints,
    /// Turn every shortcut off (compile every candidate fully).
    pub exhaustive: bool,
    /// How many runners-up to keep.
    pub runners_up: usize,
}

/// What happened to one candidate.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Compiled and fits.
    Fits {
        /// Step time, seconds.
        step_time_s: f64,
        /// Peak bytes.
        peak_bytes: u64,
    },
    /// Compiled; the worst stage exceeds the budget.
    OutOfMemory {
        /// Peak bytes.
        peak_bytes: u64,
    },
    /// Skipped: a lower bound on its model states alone exceeds the budget.
    Skipped {
        /// The bound, bytes.
        lower_bound_bytes: u64,
    },
    /// Not simulated: its step-time lower bound exceeds a fitting plan's step time.
    Slower {
        /// The bound, seconds.
        lower_bound_s: f64,
    },
    /// Could not be compiled (e.g. a split the model does not allow).
    Rejected {
        /// Why (serialized as its message).
        #[serde(serialize_with = "as_message")]
        reason: CompileError,
    },
}

impl Outcome {
    /// The outcome of a simulated candidate.
    fn of(r: Result<Evaluation, CompileError>) -> Outcome {
        match r {
            Ok(e) if e.fits => Outcome::Fits {
                step_time_s: e.step_time_s,
                peak_bytes: e.peak_bytes,
            },
            Ok(e) => Outcome::OutOfMemory {
                peak_bytes: e.peak_bytes,
            },
            Err(reason) => Outcome::Rejected { reason },
        }
    }
}

fn as_message<S: serde::Serializer>(e: &CompileError, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(e)
}

/// One candidate and its outcome.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CandidateOutcome {
    /// The configuration.
    pub config: Config,
    /// What happened.
    pub outcome: Outcome,
}

/// Counts and timings of a search (`search` in the JSON contract).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SearchStats {
    /// Candidates enumerated.
    pub candidates: usize,
    /// Candidates that fit.
    pub feasible: usize,
    /// Candidates not simulated because their step-time bound exceeds a fitting plan's.
    #[serde(default)]
    pub pruned: usize,
    /// Wall time of the parallel compile phase, milliseconds.
    pub compile_ms: f64,
    /// Wall time of the selection phase, milliseconds.
    pub cost_ms: f64,
}

/// The result of a search.
#[derive(Clone, Debug)]
pub struct SearchResult {
    /// The fastest fitting configuration, if any.
    pub best: Option<Evaluation>,
    /// The next fastest fitting configurations.
    pub runners_up: Vec<Evaluation>,
    /// The compiled candidate with the smallest peak-to-budget ratio (for OOM reports).
    pub closest: Option<Evaluation>,
    /// Every candidate's outcome, in enumeration order.
    pub outcomes: Vec<CandidateOutcome>,
    /// Counts and timings.
    pub stats: SearchStats,
}

/// Order of "simpler" configurations, used to break step-time ties deterministically.
fn simplicity(c: &Config) -> impl Ord {
    (
        c.tp,
        c.pp,
        c.schedule.chunks(),
        c.zero,
        c.low_prec_shard,
        c.recompute,
        c.recompute_modules,
        c.sp,
        std::cmp::Reverse(c.micro_batch),
        c.schedule,
        c.cp,
    )
}

/// The expert layout kind of `c`: (experts split over expert-parallel ranks, experts
/// tensor-split). Every dense configuration is `(false, false)`.
fn expert_kind(c: &Config) -> (bool, bool) {
    (c.ep > 1, c.etp > 1)
}

/// A lower bound on a configuration's per-device peak: the average model-state bytes
/// per device of its tensor × pipeline grid (replication only adds), with ZeRO's
/// per-parameter bytes (16, 4 + 12/N, 2 + 14/N, 16/N; 2/N instead of 2 for sharded
/// low-precision copies). Of the `params`, `expert_params` (routed experts) are split
/// over `ep · etp × pp` ranks and sharded over the expert-data-parallel ones instead.
pub fn state_lower_bound(params: u64, expert_params: u64, c: &Config) -> u64 {
    let per_param = |n: u32| {
        let n = f64::from(n.max(1));
        let lowp = if c.shards_low_prec() { 2.0 / n } else { 2.0 };
        match c.zero {
            0 => lowp + 14.0,
            1 => lowp + 2.0 + 12.0 / n,
            _ => lowp + 14.0 / n,
        }
    };
    let expert = expert_params.min(params);
    let dense =
        (params - expert) as f64 * per_param(c.grad_ranks()) / (f64::from(c.tp) * f64::from(c.pp));
    let experts = expert as f64 * per_param(c.expert_dp())
        / (f64::from(c.ep.max(1)) * f64::from(c.etp.max(1)) * f64::from(c.pp));
    (dense + experts) as u64
}

/// Compiles every candidate in parallel, drops those that do not fit and selects the
/// fastest (ties: the simpler configuration). The result does not depend on the
/// number of threads.
pub fn plan_with(compiler: &Compiler, opts: &SearchOptions) -> SearchResult {
    plan_with_progress(compiler, opts, &|_, _| {})
}

/// [`plan_with`], calling `progress(done, total)` as candidates are screened and
/// simulated (from worker threads; for progress bars, it does not change results).
pub fn plan_with_progress(
    compiler: &Compiler,
    opts: &SearchOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> SearchResult {
    let candidates = enumerate_for(
        compiler.engine,
        compiler.block_layout(),
        compiler.cluster.devices(),
        compiler.cluster.devices_per_node,
        compiler.global_batch,
        compiler.seq,
        &opts.constraints,
    );
    let params = compiler.param_count();
    let expert_params = compiler.expert_param_count();
    let t0 = Instant::now();
    // 1. Cheap screening, in parallel: the model-state memory bound and the step-time
    //    lower bound of every candidate.
    // The bound assumes fp32 master weights and moments (every engine's default);
    // narrower optimizer states get no shortcut.
    let fp32_optimizer = compiler.states().master == crate::ir::DType::F32;
    let bounds: Vec<u64> = candidates
        .iter()
        .map(|c| {
            if fp32_optimizer {
                state_lower_bound(params, expert_params, c)
            } else {
                0
            }
        })
        .collect();
    let skipped = |i: usize| !opts.exhaustive && bounds[i] > compiler.tensor_budget(&candidates[i]);
    let to_compile: Vec<Config> = (0..candidates.len())
        .filter(|&i| !skipped(i))
        .map(|i| candidates[i])
        .collect();
    compiler.warm(&to_compile);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let total = 2 * candidates.len();
    let tick = || {
        progress(
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
            total,
        )
    };
    let screened: Vec<Result<(f64, Vec<StageSpan>), Outcome>> = candidates
        .par_iter()
        .enumerate()
        .map(|(i, c)| {
            tick();
            let r = if skipped(i) {
                Err(Outcome::Skipped {
                    lower_bound_bytes: bounds[i],
                })
            } else {
                compiler
                    .lower_bound(c)
                    .map_err(|reason| Outcome::Rejected { reason })
            };
            if r.is_err() {
                // No simulation step will follow.
                tick();
            }
            r
        })
        .collect();
    // 2. Simulation in order of the time bound, in fixed-size rounds so that the result
    //    does not depend on the thread count: a candidate whose bound exceeds the best
    //    step time found in earlier rounds cannot win and is not simulated.
    let mut order: Vec<usize> = (0..candidates.len())
        .filter(|&i| screened[i].is_ok())
        .collect();
    let bound_of = |i: usize| screened[i].as_ref().map_or(f64::INFINITY, |b| b.0);
    order.sort_by(|&a, &b| {
        bound_of(a)
            .total_cmp(&bound_of(b))
            .then_with(|| simplicity(&candidates[a]).cmp(&simplicity(&candidates[b])))
    });
    let mut outcome: Vec<Option<Outcome>> =
        screened.iter().map(|r| r.as_ref().err().cloned()).collect();
    // A candidate is pruned only when its bound exceeds the step time of the
    // (1 + runners_up)-th fastest fitting plan found so far, so that the reported
    // runners-up are the true ones, not the survivors of the shortcut.
    let keep = 1 + opts.runners_up;
    let mut fastest: Vec<f64> = Vec::with_capacity(keep + 1);
    let mut best_time = f64::INFINITY;
    // Mixture-of-experts models: the fastest plan of every expert layout kind is
    // reported too (why expert parallelism won or lost), so a candidate is spared
    // while its kind has no faster fitting plan. One kind for a dense model.
    let mut kind_best: BTreeMap<(bool, bool), f64> = BTreeMap::new();
    for round in order.chunks(SIMULATION_ROUND) {
        let results: Vec<(usize, Outcome)> = round
            .par_iter()
            .map(|&i| {
                tick();
                let c = &candidates[i];
                // Without runners-up no kind's fastest plan is reported: the overall
                // best decides alone.
                let kind_time = if opts.runners_up == 0 {
                    f64::NEG_INFINITY
                } else {
                    kind_best
                        .get(&expert_kind(c))
                        .copied()
                        .unwrap_or(f64::INFINITY)
                };
                let o = if !opts.exhaustive && bound_of(i) > best_time && bound_of(i) > kind_time {
                    Outcome::Slower {
                        lower_bound_s: bound_of(i),
                    }
                } else {
                    let stages = screened[i]
                        .as_ref()
                        .map(|b| b.1.clone())
                        .unwrap_or_default();
                    Outcome::of(compiler.evaluate_cut(c, stages, false))
                };
                (i, o)
            })
            .collect();
        for (i, o) in results {
            if let Outcome::Fits { step_time_s, .. } = o {
                let k = kind_best
                    .entry(expert_kind(&candidates[i]))
                    .or_insert(f64::INFINITY);
                *k = k.min(step_time_s);
                let at = fastest.partition_point(|&t| t <= step_time_s);
                fastest.insert(at, step_time_s);
                fastest.truncate(keep);
                if fastest.len() == keep {
                    best_time = fastest[keep - 1];
                }
            }
            outcome[i] = Some(o);
        }
    }
    // Nothing fits: the closest candidate must be the true one. A candidate skipped by
    // the model-state bound may still have a smaller peak than every compiled one (its
    // peak is only known to be at least its bound), so those whose bound does not
    // exceed the smallest peak found are compiled too, in fixed rounds in bound order.
    if fastest.is_empty() && !opts.exhaustive {
        let mut smallest = outcome
            .iter()
            .filter_map(|o| match o {
                Some(Outcome::OutOfMemory { peak_bytes }) => Some(*peak_bytes),
                _ => None,
            })
            .min()
            .unwrap_or(u64::MAX);
        let mut skipped_order: Vec<usize> = (0..candidates.len()).filter(|&i| skipped(i)).collect();
        skipped_order.sort_by_key(|&i| (bounds[i], simplicity(&candidates[i])));
        for round in skipped_order.chunks(SIMULATION_ROUND) {
            if bounds[round[0]] > smallest {
                break;
            }
            let results: Vec<(usize, Outcome)> = round
                .par_iter()
                .filter(|&&i| bounds[i] <= smallest)
                .map(|&i| {
                    let c = &candidates[i];
                    let o = Outcome::of(
                        compiler
                            .lower_bound(c)
                            .and_then(|(_, stages)| compiler.evaluate_cut(c, stages, false)),
                    );
                    (i, o)
                })
                .collect();
            for (i, o) in results {
                if let Outcome::OutOfMemory { peak_bytes } = o {
                    smallest = smallest.min(peak_bytes);
                }
                outcome[i] = Some(o);
            }
        }
    }
    let outcomes: Vec<CandidateOutcome> = candidates
        .iter()
        .zip(outcome)
        .map(|(c, o)| CandidateOutcome {
            config: *c,
            // Screening gives every candidate an outcome or a bound, and every
            // bounded one is simulated or pruned.
            outcome: o.expect("every candidate has an outcome"),
        })
        .collect();
    let compile_ms = t0.elapsed().as_secs_f64() * 1e3;

    let t1 = Instant::now();
    let mut fitting: Vec<(f64, &Config)> = Vec::new();
    let mut closest: Option<(u64, &Config)> = None;
    let mut smallest_bound: Option<(u64, &Config)> = None;
    for o in &outcomes {
        let c = &o.config;
        match o.outcome {
            Outcome::Fits {
                step_time_s,
                peak_bytes,
            } => {
                fitting.push((step_time_s, c));
                if closest.is_none_or(|b| peak_bytes < b.0) {
                    closest = Some((peak_bytes, c));
                }
            }
            Outcome::OutOfMemory { peak_bytes } => {
                if closest.is_none_or(|b| peak_bytes < b.0) {
                    closest = Some((peak_bytes, c));
                }
            }
            Outcome::Skipped { lower_bound_bytes } => {
                // Among equal bounds, the one with the least activation memory.
                let key = |b: u64, c: &Config| {
                    (
                        b,
                        c.micro_batch,
                        std::cmp::Reverse(c.recompute),
                        simplicity(c),
                    )
                };
                if smallest_bound.is_none_or(|(b, s)| key(lower_bound_bytes, c) < key(b, s)) {
                    smallest_bound = Some((lower_bound_bytes, c));
                }
            }
            Outcome::Rejected { .. } | Outcome::Slower { .. } => {}
        }
    }
    fitting.sort_by(|a, b| {
        a.0.total_cmp(&b.0)
            .then_with(|| simplicity(a.1).cmp(&simplicity(b.1)))
    });
    // Re-run the few reported plans with their events and memory timelines.
    let detailed = |c: &Config| compiler.evaluate(c).ok();
    let best = fitting.first().and_then(|(_, c)| detailed(c));
    // The next fastest, then (for a mixture-of-experts model) the fastest of each other
    // expert layout kind that is not among them, in step-time order.
    let mut reported: Vec<&(f64, &Config)> = fitting.iter().skip(1).take(opts.runners_up).collect();
    if opts.runners_up > 0 {
        if let Some((_, best_c)) = fitting.first() {
            let mut kinds: BTreeSet<(bool, bool)> = reported
                .iter()
                .map(|(_, c)| expert_kind(c))
                .chain([expert_kind(best_c)])
                .collect();
            for f in fitting.iter().skip(1 + opts.runners_up) {
                if kinds.insert(expert_kind(f.1)) {
                    reported.push(f);
                }
            }
        }
    }
    let runners_up = reported
        .into_iter()
        .filter_map(|(_, c)| detailed(c))
        .collect();
    // When every candidate was skipped by the bound, the one with the smallest bound is
    // compiled so that an out-of-memory report describes a real configuration.
    let closest = closest.or(smallest_bound).and_then(|(_, c)| detailed(c));
    let cost_ms = t1.elapsed().as_secs_f64() * 1e3;
    SearchResult {
        best,
        runners_up,
        closest,
        stats: SearchStats {
            candidates: candidates.len(),
            feasible: fitting.len(),
            pruned: outcomes
                .iter()
                .filter(|o| matches!(o.outcome, Outcome::Slower { .. }))
                .count(),
            compile_ms,
            cost_ms,
        },
        outcomes,
    }
}

/// Largest number of extra node counts tried one by one before doubling.
const NODE_STEPS: u32 = 16;
/// Largest cluster tried, in nodes.
const MAX_NODES: u32 = 1 << 16;

/// Suggestions for a search where nothing fits, each found by running the search
/// again with the change and therefore known to fit: the smallest cluster (same node
/// type) that fits the global batch, the largest global batch that fits this cluster,
/// each pin or bound of `opts` that, lifted, lets a plan fit, and single changes to
/// the closest candidate.
pub fn plan_suggestions(
    compiler: &Compiler,
    opts: &SearchOptions,
    closest: Option<&Config>,
) -> Vec<Suggestion> {
    let quiet = SearchOptions {
        runners_up: 0,
        ..opts.clone()
    };
    let retry = |cluster: &crate::cluster::Cluster, batch: u64, o: &SearchOptions| {
        let c = compiler.with_job(cluster.clone(), batch).ok()?;
        plan_with(&c, o).best
    };
    let found = |change: String, e: Evaluation, devices, batch| Suggestion {
        change,
        config: Some(e.config),
        devices,
        global_batch: batch,
        peak_bytes: e.peak_bytes,
        step_time_s: e.step_time_s,
    };
    let mut out = Vec::new();

    // Smallest cluster: one more node at a time, then doubling.
    let base = &compiler.cluster;
    let mut nodes: Vec<u32> = (base.nodes + 1..=base.nodes + NODE_STEPS).collect();
    let mut n = base
        .nodes
        .saturating_mul(2)
        .max(base.nodes + NODE_STEPS + 1);
    while n <= MAX_NODES {
        nodes.push(n);
        n = n.saturating_mul(2);
    }
    for n in nodes {
        let mut cluster = base.clone();
        cluster.nodes = n;
        if let Some(e) = retry(&cluster, compiler.global_batch, &quiet) {
            let devices = cluster.devices();
            out.push(found(
                format!(
                    "{devices} devices ({n} nodes of {}) fit global batch {}",
                    base.devices_per_node, compiler.global_batch
                ),
                e,
                Some(devices),
                None,
            ));
            break;
        }
    }

    // Largest global batch: halve until one fits, then binary search up to the last miss.
    let mut miss = compiler.global_batch;
    let mut hit = None;
    let mut b = compiler.global_batch / 2;
    while b >= 1 {
        if let Some(e) = retry(base, b, &quiet) {
            hit = Some((b, e));
            break;
        }
        miss = b;
        b /= 2;
    }
    if let Some((mut lo, mut best)) = hit {
        let mut hi = miss;
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            match retry(base, mid, &quiet) {
                Some(e) => {
                    lo = mid;
                    best = e;
                }
                None => hi = mid,
            }
        }
        out.push(found(
            format!("global batch {lo} fits this cluster"),
            best,
            None,
            Some(lo),
        ));
    }

    // Lifting one pin or bound at a time.
    let k = &opts.constraints;
    let lifts: Vec<(&str, Constraints)> = vec![
        (
            "tp",
            Constraints {
                tp: None,
                ..k.clone()
            },
        ),
        (
            "pp",
            Constraints {
                pp: None,
                ..k.clone()
            },
        ),
        (
            "dp",
            Constraints {
                dp: None,
                ..k.clone()
            },
        ),
        (
            "max-stages",
            Constraints {
                max_stages: None,
                ..k.clone()
            },
        ),
        (
            "max-tp",
            Constraints {
                max_tp: None,
                ..k.clone()
            },
        ),
        (
            "micro-batch",
            Constraints {
                micro_batch: None,
                ..k.clone()
            },
        ),
        (
            "sp",
            Constraints {
                sp: None,
                ..k.clone()
            },
        ),
        (
            "recompute",
            Constraints {
                recompute: None,
                ..k.clone()
            },
        ),
        (
            "recompute-layers",
            Constraints {
                recompute_layers: None,
                ..k.clone()
            },
        ),
        (
            "recompute-modules",
            Constraints {
                recompute_modules: None,
                ..k.clone()
            },
        ),
        (
            "zero",
            Constraints {
                zero: None,
                ..k.clone()
            },
        ),
        (
            "low-prec-shard",
            Constraints {
                low_prec_shard: None,
                ..k.clone()
            },
        ),
        (
            "schedule",
            Constraints {
                schedule: None,
                ..k.clone()
            },
        ),
    ];
    for (name, lifted) in lifts {
        if &lifted == k {
            continue;
        }
        let o = SearchOptions {
            constraints: lifted,
            ..quiet.clone()
        };
        if let Some(e) = plan_with(compiler, &o).best {
            out.push(found(format!("drop --{name}"), e, None, None));
        }
    }

    if let Some(c) = closest {
        out.extend(suggestions(compiler, c));
    }
    out
}
