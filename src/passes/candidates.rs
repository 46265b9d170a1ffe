//! Enumeration of parallel configurations.
//!
//! For `N` devices (`g` per node) and global batch `B`: every `tp` dividing `g`, every
//! `pp` dividing `N/tp` with `pp · v ≤ blocks`, `dp = N/(tp·pp)`, every micro-batch
//! size `b` dividing `B/dp` (`m = B/(dp·b)`, at most
//! [`MAX_PIPELINE_UNITS`]` / pp`), sequence parallelism on/off when
//! `tp > 1`, recomputation none/selective/full (and, for an engine that takes them,
//! its selective module sets, [`Engine::recompute_module_sets`]), ZeRO 0–3 (only 0 when `dp = 1`) with
//! or without sharding the low-precision copy for stages 0 and 1 (stage 2 with it is
//! stage 3, which implies it), and schedule GPipe,
//! 1F1B or interleaved 1F1B with `v ≥ 2` chunks (needs `pp ≥ 2` and `pp | m`); with
//! one stage the schedules coincide and only 1F1B is listed. Users pin or bound any
//! dimension through [`Constraints`]. Context parallelism `cp` splits the devices
//! left after tensor parallelism before the pipeline (`N = dp·cp·tp·pp`); see
//! [`CP_MIN_SEQ`] for when degrees above 1 are listed. [`enumerate_for`] keeps the configurations an
//! engine can run ([`Engine::allows`]): its schedules, ZeRO stages, virtual-stage
//! counts that place whole layers, and so on.

use super::{Config, Recompute, RecomputeModules, Schedule};
use crate::engine::rules::BlockLayout;
use crate::engine::Engine;
use crate::lower::compile::MAX_PIPELINE_UNITS;
use serde::{Deserialize, Serialize};

/// Pins and bounds on the candidate space (all optional).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Constraints {
    /// Tensor-parallel degree.
    pub tp: Option<u32>,
    /// Pipeline stages.
    pub pp: Option<u32>,
    /// Data-parallel degree.
    pub dp: Option<u32>,
    /// Context-parallel degree (pinned: listed at any sequence length it divides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cp: Option<u32>,
    /// Largest context-parallel degree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cp: Option<u32>,
    /// Expert-parallel degree (mixture-of-experts models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ep: Option<u32>,
    /// Largest expert-parallel degree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ep: Option<u32>,
    /// Expert-tensor-parallel degree (1 or the candidate's `tp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etp: Option<u32>,
    /// Largest number of pipeline stages.
    pub max_stages: Option<u32>,
    /// Largest tensor-parallel degree.
    pub max_tp: Option<u32>,
    /// Micro-batch size.
    pub micro_batch: Option<u32>,
    /// Sequence parallelism.
    pub sp: Option<bool>,
    /// Recomputation policy.
    pub recompute: Option<Recompute>,
    /// Recompute only the first `k` layers of each stage (applies to the candidates
    /// that recompute; with the policy pinned to none, every candidate carries `k` and
    /// the compiler rejects it, naming the conflict).
    pub recompute_layers: Option<u32>,
    /// Megatron-LM's `--recompute-modules` for selective recomputation (implies the
    /// selective policy when the policy is not pinned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recompute_modules: Option<RecomputeModules>,
    /// ZeRO stage.
    pub zero: Option<u8>,
    /// Low-precision parameter sharding.
    pub low_prec_shard: Option<bool>,
    /// Schedule.
    pub schedule: Option<Schedule>,
    /// Largest number of interleaved chunks per device.
    pub max_chunks: Option<u32>,
}

impl Constraints {
    /// Every pin or bound that is set: its option name, its value, and the
    /// constraints with only it set.
    pub fn pins(&self) -> Vec<(&'static str, String, Constraints)> {
        let none = Constraints::default();
        let mut out = Vec::new();
        macro_rules! pin {
            ($field:ident, $name:literal) => {
                if let Some(v) = &self.$field {
                    out.push((
                        $name,
                        v.to_string(),
                        Constraints {
                            $field: Some(*v),
                            ..none.clone()
                        },
                    ));
                }
            };
        }
        pin!(tp, "tp");
        pin!(pp, "pp");
        pin!(dp, "dp");
        pin!(cp, "cp");
        pin!(max_cp, "max-cp");
        pin!(ep, "ep");
        pin!(max_ep, "max-ep");
        pin!(etp, "etp");
        pin!(max_stages, "max-stages");
        pin!(max_tp, "max-tp");
        pin!(micro_batch, "micro-batch");
        pin!(sp, "sp");
        pin!(recompute, "recompute");
        pin!(recompute_layers, "recompute-layers");
        pin!(recompute_modules, "recompute-modules");
        pin!(zero, "zero");
        pin!(low_prec_shard, "low-prec-shard");
        pin!(schedule, "schedule");
        pin!(max_chunks, "max-chunks");
        out
    }
}

/// The divisors of `n` in increasing order, by trial division up to `√n` (without
/// overflow: `i ≤ n / i`). Only called on device counts, which a valid cluster bounds.
fn divisors(n: u64) -> Vec<u64> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut i = 1;
    while i <= n / i {
        if n % i == 0 {
            small.push(i);
            if i * i != n {
                large.push(n / i);
            }
        }
        i += 1;
    }
    small.extend(large.into_iter().rev());
    small
}

/// The ways to split `per_replica` sequences into `m` micro-batches of `b` with both
/// fitting `u32` and `m ≤ max_m`, by increasing `b`. Costs `O(min(per_replica, max_m))`
/// whatever the size or factorization of `per_replica` (trial division to its square
/// root would take minutes on a 64-bit prime).
fn micro_batchings(per_replica: u64, max_m: u64) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = (1..=per_replica.min(max_m))
        .filter(|m| per_replica % m == 0)
        .filter_map(|m| Some((u32::try_from(per_replica / m).ok()?, u32::try_from(m).ok()?)))
        .collect();
    out.sort_unstable();
    out
}

/// Default bound on interleaved chunks per device.
pub const DEFAULT_MAX_CHUNKS: u32 = 8;

/// Shortest sequence at which the search lists context-parallel degrees above 1 by
/// itself (a pinned `cp` is listed at any length it divides). Llama 3 trained its
/// 8,192-token stage without context parallelism and turned it on (CP 16) for the
/// 131,072-token stage (Dubey et al. 2024, Table 4); listing it from 16,384 tokens up
/// keeps the space of ordinary jobs (every job up to 8K, the reference scenario at
/// 1,024) and its search time as they were: at 8,192 tokens CP multiplied the
/// candidates of a 16,384-GPU job 50-fold.
pub const CP_MIN_SEQ: u64 = 16_384;

/// The context-parallel degrees listed for `seq` on `per_tp` devices (those left after
/// tensor parallelism): 1, and every divisor `cp > 1` of `per_tp` with `seq` divisible
/// by `2·cp` (the load-balanced causal chunking splits the sequence into `2·cp` equal
/// chunks, Megatron-LM's `get_batch_on_this_cp_rank`), from [`CP_MIN_SEQ`] tokens up
/// unless `k` pins the degree.
fn cp_degrees(per_tp: u64, seq: u64, k: &Constraints) -> Vec<u32> {
    divisors(per_tp)
        .into_iter()
        .filter_map(|c| u32::try_from(c).ok())
        .filter(|&c| k.cp.is_none_or(|p| p == c) && k.max_cp.is_none_or(|m| c <= m))
        .filter(|&c| {
            c == 1 || (seq % (2 * u64::from(c)) == 0 && (k.cp.is_some() || seq >= CP_MIN_SEQ))
        })
        .collect()
}

/// Every configuration allowed by `k` for a job of `global_batch` sequences of `seq`
/// tokens, in a fixed order (the same on every run).
pub fn enumerate(
    devices: u64,
    devices_per_node: u32,
    global_batch: u64,
    seq: u64,
    blocks: usize,
    k: &Constraints,
) -> Vec<Config> {
    let mut out = Vec::new();
    let ok = |pin: Option<u32>, v: u32| pin.is_none_or(|p| p == v);
    let max_chunks = k.max_chunks.unwrap_or(DEFAULT_MAX_CHUNKS).max(1);
    for tp in divisors(u64::from(devices_per_node)) {
        let tp = tp as u32;
        if !ok(k.tp, tp) || k.max_tp.is_some_and(|m| tp > m) || devices % u64::from(tp) != 0 {
            continue;
        }
        for cp in cp_degrees(devices / u64::from(tp), seq, k) {
            let per_tp_cp = devices / u64::from(tp) / u64::from(cp);
            for pp in divisors(per_tp_cp) {
                let Ok(pp) = u32::try_from(pp) else { continue };
                if !ok(k.pp, pp) || k.max_stages.is_some_and(|m| pp > m) || pp as usize > blocks {
                    continue;
                }
                let Ok(dp) = u32::try_from(per_tp_cp / u64::from(pp)) else {
                    continue;
                };
                if !ok(k.dp, dp) || global_batch % u64::from(dp) != 0 {
                    continue;
                }
                // More micro-batches than the simulation accepts would only be rejected.
                let max_m = MAX_PIPELINE_UNITS / u64::from(pp);
                for (b, m) in micro_batchings(global_batch / u64::from(dp), max_m) {
                    if !ok(k.micro_batch, b) {
                        continue;
                    }
                    let mut schedules = vec![Schedule::OneFOneB];
                    if pp > 1 {
                        schedules.insert(0, Schedule::Gpipe);
                        if m % pp == 0 {
                            for v in 2..=max_chunks {
                                if (pp * v) as usize <= blocks {
                                    schedules.push(Schedule::Interleaved(v));
                                }
                            }
                        }
                    }
                    for schedule in schedules {
                        if k.schedule.is_some_and(|s| s != schedule) {
                            continue;
                        }
                        for sp in [false, true] {
                            if (sp && tp == 1) || k.sp.is_some_and(|s| s != sp) {
                                continue;
                            }
                            for recompute in
                                [Recompute::None, Recompute::Selective, Recompute::Full]
                            {
                                if k.recompute.is_some_and(|r| r != recompute) {
                                    continue;
                                }
                                // A layer count asks for recomputation: without a pinned
                                // policy, the candidates that recompute nothing are not
                                // what was asked.
                                if k.recompute_layers.is_some()
                                    && k.recompute.is_none()
                                    && recompute == Recompute::None
                                {
                                    continue;
                                }
                                // A module set asks for selective recomputation.
                                if k.recompute_modules.is_some()
                                    && k.recompute.is_none()
                                    && recompute != Recompute::Selective
                                {
                                    continue;
                                }
                                let zeros: &[u8] = if dp == 1 { &[0] } else { &[0, 1, 2, 3] };
                                for &zero in zeros {
                                    if k.zero.is_some_and(|z| z != zero) {
                                        continue;
                                    }
                                    // ZeRO-2 with a sharded low-precision copy is ZeRO-3.
                                    let lps: &[bool] = if dp == 1 || zero >= 2 {
                                        &[false]
                                    } else {
                                        &[false, true]
                                    };
                                    for &low_prec_shard in lps {
                                        if k.low_prec_shard.is_some_and(|l| l != low_prec_shard) {
                                            continue;
                                        }
                                        out.push(Config {
                                            dp,
                                            tp,
                                            pp,
                                            cp,
                                            ep: 1,
                                            etp: 1,
                                            micro_batch: b,
                                            num_micro_batches: m,
                                            sp,
                                            recompute,
                                            // With the policy pinned to none, the count is
                                            // kept so that the compiler names the conflict.
                                            recompute_layers: k.recompute_layers,
                                            recompute_modules: k.recompute_modules,
                                            zero,
                                            low_prec_shard,
                                            schedule,
                                        });
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// The expert layouts of each configuration for a model with `experts` routed experts
/// per MoE layer (0: dense), in order: every expert-tensor degree `etp ∈ {1, tp}` and
/// every expert-parallel degree `ep` that is a power of two (or, when `k` pins it, the
/// pinned degree, whatever it is) dividing `experts` with
/// `ep · etp` dividing `tp · cp · dp` (Megatron-Core folds the experts over the same
/// ranks, `etp × ep × edp = tp × cp × dp`), within `k`'s pins and bounds. A dense model
/// keeps `ep = etp = 1` (and has no configuration when `k` pins either above 1 or
/// bounds `ep` below 1).
pub fn with_experts(configs: Vec<Config>, experts: u64, k: &Constraints) -> Vec<Config> {
    let mut out = Vec::with_capacity(configs.len());
    for c in configs {
        expert_layouts(c, experts, k, |e| out.push(e));
    }
    out
}

/// Calls `f` with each expert layout of `c`, in [`with_experts`]' order.
fn expert_layouts(c: Config, experts: u64, k: &Constraints, mut f: impl FnMut(Config)) {
    if experts == 0 {
        let pinned = k.ep.is_some_and(|e| e != 1)
            || k.etp.is_some_and(|e| e != 1)
            || k.max_ep.is_some_and(|m| m < 1);
        if !pinned {
            f(c);
        }
        return;
    }
    let ranks = u64::from(c.tp) * u64::from(c.cp) * u64::from(c.dp);
    let etps: &[u32] = if c.tp > 1 { &[1, c.tp] } else { &[1] };
    for &etp in etps {
        if k.etp.is_some_and(|e| e != etp) {
            continue;
        }
        let fits = |ep: u32| {
            ep > 0
                && experts % u64::from(ep) == 0
                && ranks % (u64::from(ep) * u64::from(etp)) == 0
                && k.max_ep.is_none_or(|m| ep <= m)
        };
        if let Some(ep) = k.ep {
            // A pinned degree is taken as given, as `eval` takes it.
            if fits(ep) {
                f(Config { ep, etp, ..c });
            }
            continue;
        }
        let mut ep = 1u32;
        while u64::from(ep) <= experts {
            if fits(ep) {
                f(Config { ep, etp, ..c });
            }
            let Some(next) = ep.checked_mul(2) else { break };
            ep = next;
        }
    }
}

/// [`enumerate`] for a model whose pipeline sees `model`, keeping only the
/// configurations `engine` can run ([`Engine::allows`]), in the same order.
pub fn enumerate_for(
    engine: Engine,
    model: &BlockLayout,
    devices: u64,
    devices_per_node: u32,
    global_batch: u64,
    seq: u64,
    k: &Constraints,
) -> Vec<Config> {
    let default = engine.default_recompute_modules();
    let sets = engine.recompute_module_sets();
    // One configuration at a time through the expert layouts, the module sets and the
    // engine's rules (the space before the rules is many times what they keep).
    let mut out = Vec::new();
    let mut keep = |c: Config| {
        if engine.allows(&c, model).is_ok() {
            out.push(c);
        }
    };
    for base in enumerate(
        devices,
        devices_per_node,
        global_batch,
        seq,
        model.blocks,
        k,
    ) {
        expert_layouts(base, model.experts, k, |mut c| {
            if k.recompute_modules.is_some() {
                // A pinned module set that is the engine's default is spelled `None`.
                if c.recompute_modules == default && default.is_some() {
                    c.recompute_modules = None;
                }
                keep(c);
            } else {
                // The engine's other module sets beside each selective candidate.
                keep(c);
                if c.recompute == Recompute::Selective {
                    for &m in &sets {
                        keep(Config {
                            recompute_modules: Some(m),
                            ..c
                        });
                    }
                }
            }
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_candidate_uses_every_device_and_the_whole_batch() {
        let all = enumerate(32, 8, 64, 1024, 42, &Constraints::default());
        assert!(!all.is_empty());
        for c in &all {
            assert_eq!(c.devices(), 32);
            assert_eq!(c.global_batch(), 64);
            assert!(8 % c.tp == 0);
            assert!(!(c.sp && c.tp == 1));
        }
        let pinned = enumerate(
            32,
            8,
            64,
            1024,
            42,
            &Constraints {
                pp: Some(2),
                tp: Some(1),
                ..Constraints::default()
            },
        );
        assert!(pinned.iter().all(|c| c.pp == 2 && c.tp == 1 && c.dp == 16));
        assert!(pinned.len() < all.len());
    }

    /// The search offers powers of two for `ep`, but a pinned degree is taken as given
    /// (as `eval` takes it): 6 experts over 6 ranks with `ep` 3 or 6 pinned.
    #[test]
    fn a_pinned_expert_degree_need_not_be_a_power_of_two() {
        let c = Config::new(6, 1, 1, 1, 1);
        let eps = |k: &Constraints| {
            let mut v: Vec<u32> = with_experts(vec![c], 6, k).iter().map(|x| x.ep).collect();
            v.sort_unstable();
            v
        };
        assert_eq!(eps(&Constraints::default()), vec![1, 2]);
        for pin in [3, 6] {
            let k = Constraints {
                ep: Some(pin),
                ..Constraints::default()
            };
            assert_eq!(eps(&k), vec![pin]);
        }
        // A pin the experts or ranks do not allow gives nothing.
        let k = Constraints {
            ep: Some(4),
            ..Constraints::default()
        };
        assert!(eps(&k).is_empty());
    }

    /// 80 layers on 4 pipeline ranks: Megatron-LM's `--pipeline-model-parallel-layout`
    /// and torchtitan's `module_fqns_per_model_part` place any contiguous cut, so every
    /// virtual-stage count up to the limit is listed for both (7: 28 virtual stages of
    /// 3 layers with 1 on the first and last); DeepSpeed has no model chunks; HF no
    /// pipeline.
    #[test]
    fn virtual_stage_counts_follow_the_engine() {
        let model = BlockLayout::transformer(80);
        let k = Constraints {
            pp: Some(4),
            max_chunks: Some(10),
            ..Constraints::default()
        };
        let chunks = |engine| {
            enumerate_for(engine, &model, 32, 8, 32, 1024, &k)
                .iter()
                .map(|c| c.schedule.chunks())
                .collect::<std::collections::BTreeSet<u32>>()
                .into_iter()
                .collect::<Vec<u32>>()
        };
        assert_eq!(chunks(Engine::Megatron), (1..=10).collect::<Vec<_>>());
        assert_eq!(chunks(Engine::Torchtitan), (1..=10).collect::<Vec<_>>());
        assert_eq!(chunks(Engine::DeepSpeed), vec![1]);
        assert!(enumerate_for(Engine::Hf, &model, 32, 8, 32, 1024, &k).is_empty());
    }
}
