//! Expert parallelism: experts folded over the ranks of each pipeline stage as
//! Megatron-Core does (`etp × ep × edp = tp × cp × dp`). Dispatch and combine conserve
//! tokens whatever the degrees, a top-k MoE layer does `k` experts' worth of FLOPs per
//! token plus its router on every rank, and a rank holds `1/(ep·etp)` of the expert
//! parameters. A Mixtral plan on two DGX H100 nodes picks expert parallelism when it is
//! cheaper than tensor-splitting the experts, and the runners-up show why.

use apar::cluster::Cluster;
use apar::ir::{Env, Graph, Op, Phase};
use apar::lower::compile::{Compiler, ModelSource};
use apar::models::{zoo, ModelConfig};
use apar::passes::expert::{expert_param_names, is_token_exchange};
use apar::passes::{Config, Recompute};
use apar::PlanOptions;
use proptest::prelude::*;

fn model(name: &str, layers: u32) -> ModelConfig {
    let mut cfg = zoo::lookup(name).unwrap();
    cfg.layers = layers;
    cfg
}

fn compiler(cfg: &ModelConfig, seq: u64, cluster: &str) -> Compiler {
    let cluster = Cluster::resolve(cluster).unwrap();
    Compiler::new(ModelSource::Config(cfg.clone()), cluster, seq, 64, 0.8).unwrap()
}

fn config(dp: u32, tp: u32, ep: u32, etp: u32) -> Config {
    Config {
        ep,
        etp,
        sp: tp > 1,
        recompute: Recompute::None,
        ..Config::new(dp, tp, 1, 1, 64 / dp)
    }
}

/// The per-device training graph of `c`.
fn program(comp: &Compiler, c: &Config) -> Graph {
    comp.device_program(c).unwrap().graph
}

/// Forward ops of `g` matching `pick`, with their input and result element counts at
/// `env`.
fn forward_ops(g: &Graph, env: Env, pick: impl Fn(&Op) -> bool) -> Vec<(Vec<u64>, Vec<u64>)> {
    g.ops()
        .filter(|&o| g.node(o).phase == Phase::Fwd && pick(g.op(o)))
        .map(|o| {
            let n = |ts: Vec<&apar::ir::TensorType>| -> Vec<u64> {
                ts.iter().map(|t| t.shape.numel_at(env).unwrap()).collect()
            };
            (n(g.input_types(o)), n(g.result_types(o)))
        })
        .collect()
}

fn moe_models() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["mixtral-8x7b", "qwen3-30b-a3b"])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, ..ProptestConfig::default() })]

    /// Each rank dispatches `k` rows per local token, the all-to-all returns as many as
    /// it sends (balanced routing), so the `ep` ranks together hold `k` rows per token
    /// of the group; the expert-tensor gather multiplies the rows by `etp` and its
    /// reduce-scatter divides them back; the combine returns one row per local token.
    #[test]
    fn dispatch_and_combine_conserve_tokens(
        name in moe_models(),
        tp in prop::sample::select(vec![1u32, 2]),
        ep in prop::sample::select(vec![1u32, 2, 4, 8]),
        split_experts in any::<bool>(),
        b in 1u64..=2,
    ) {
        let cfg = model(name, 2);
        let moe = cfg.moe.clone().unwrap();
        let etp = if split_experts { tp } else { 1 };
        let dp = 8 / tp;
        prop_assume!(u64::from(ep) <= moe.experts && (tp * dp) % (ep * etp) == 0);
        let seq = 1024;
        let comp = compiler(&cfg, seq, "dgx-h100:1");
        let g = program(&comp, &config(dp, tp, ep, etp));
        let env = Env::new(b, seq);
        let h = cfg.hidden;
        let k = moe.topk;
        let local_tokens = b * seq / u64::from(tp);
        for (ins, outs) in forward_ops(&g, env, |o| matches!(o, Op::MoeDispatch { .. })) {
            prop_assert_eq!(ins[0], local_tokens * h, "dispatch reads the local tokens");
            prop_assert_eq!(outs[0], k * local_tokens * h, "k rows per token");
        }
        let exchanges = forward_ops(&g, env, is_token_exchange);
        prop_assert_eq!(exchanges.len(), if ep > 1 { 4 } else { 0 }, "two exchanges per MoE layer");
        for (ins, outs) in exchanges {
            prop_assert_eq!(ins[0], outs[0]);
            prop_assert_eq!(outs[0], k * local_tokens * h);
        }
        for (ins, outs) in forward_ops(&g, env, |o| matches!(o, Op::MoeCombine { .. })) {
            prop_assert_eq!(ins[0], k * local_tokens * h, "the combine reads this rank's rows");
            prop_assert_eq!(outs[0], local_tokens * h, "one row per local token");
        }
    }

    /// Per rank, the forward expert GEMMs do `k` experts' SwiGLU for each of the rank's
    /// tokens (`3 · 2·h·f · k` FLOPs per token) and the router `2·h·E` per token,
    /// whatever `ep` and `etp`: summed over a stage's `tp·dp` ranks, a top-k layer's
    /// FLOPs over the batch.
    #[test]
    fn moe_flops_are_k_experts_and_the_router_whatever_ep(
        name in moe_models(),
        tp in prop::sample::select(vec![1u32, 2]),
        ep in prop::sample::select(vec![1u32, 2, 4, 8]),
        split_experts in any::<bool>(),
    ) {
        let cfg = model(name, 2);
        let moe = cfg.moe.clone().unwrap();
        let etp = if split_experts { tp } else { 1 };
        let dp = 8 / tp;
        prop_assume!(u64::from(ep) <= moe.experts && (tp * dp) % (ep * etp) == 0);
        let seq = 1024;
        let comp = compiler(&cfg, seq, "dgx-h100:1");
        let g = program(&comp, &config(dp, tp, ep, etp));
        let env = Env::new(1, seq);
        let tokens = seq / u64::from(tp);
        let (h, f, e, k) = (cfg.hidden, moe.expert_ffn, moe.experts, moe.topk);
        let flops = |pick: &dyn Fn(&Op) -> bool| -> u64 {
            g.ops()
                .filter(|&o| g.node(o).phase == Phase::Fwd && pick(g.op(o)))
                .map(|o| g.op_cost(o, env).unwrap().flops)
                .sum()
        };
        // The template compiles two MoE layers.
        let experts = flops(&|o| matches!(o, Op::GroupedMatMul { .. }));
        prop_assert_eq!(experts, 2 * tokens * k * 3 * 2 * h * f);
        let routers: u64 = g
            .ops()
            .filter(|&o| g.node(o).phase == Phase::Fwd && matches!(g.op(o), Op::MatMul { .. }))
            .filter(|&o| {
                let r = g.result_types(o)[0];
                r.shape.last().and_then(|d| d.as_lit()) == Some(e)
            })
            .map(|o| g.op_cost(o, env).unwrap().flops)
            .sum();
        prop_assert_eq!(routers, 2 * tokens * 2 * h * e);
    }

    /// A rank holds `1/(ep·etp)` of every MoE layer's expert weights.
    #[test]
    fn expert_params_per_rank_are_total_over_ep_etp(
        name in moe_models(),
        tp in prop::sample::select(vec![1u32, 2, 4]),
        ep in prop::sample::select(vec![1u32, 2, 4, 8]),
        split_experts in any::<bool>(),
    ) {
        let cfg = model(name, 2);
        let moe = cfg.moe.clone().unwrap();
        let etp = if split_experts { tp } else { 1 };
        let dp = 8 / tp;
        prop_assume!(u64::from(ep) <= moe.experts && (tp * dp) % (ep * etp) == 0);
        let comp = compiler(&cfg, 1024, "dgx-h100:1");
        let g = program(&comp, &config(dp, tp, ep, etp));
        let names = expert_param_names(&g);
        prop_assert_eq!(names.len(), 6, "gate, up and down of two layers");
        let held: u64 = g
            .ops()
            .filter(|&o| matches!(g.op(o), Op::Param { name } if names.contains(name)))
            .map(|o| g.ty(g.node(o).results[0]).shape.numel_at(Env::new(1, 1)).unwrap())
            .sum();
        let total = 2 * 3 * moe.experts * cfg.hidden * moe.expert_ffn;
        prop_assert_eq!(held * u64::from(ep * etp), total);
    }
}

/// Expert states are reduced and ZeRO-sharded over the expert-data-parallel ranks: the
/// optimizer states of a rank are the same with `ep` experts' shards over `edp` ranks
/// as with all experts over all ranks (`12 Ψ_e / (ep · edp) = 12 Ψ_e / (tp · dp)` with
/// `etp = 1`), while its low-precision expert weights shrink by `ep`.
#[test]
fn zero_shards_expert_states_over_edp() {
    let cfg = model("mixtral-8x7b", 2);
    let comp = compiler(&cfg, 1024, "dgx-h100:1");
    let states = |ep: u32| {
        let c = Config {
            zero: 1,
            ..config(8, 1, ep, 1)
        };
        let p = comp.profiles(&c);
        let set = p.as_ref().as_ref().unwrap();
        let l = set.blocks.get(1);
        (l.states.optimizer, l.states.low_prec_params)
    };
    let (opt1, lowp1) = states(1);
    let (opt4, lowp4) = states(4);
    let rel = |a: u64, b: u64| (a as f64 - b as f64).abs() / b as f64;
    assert!(rel(opt4, opt1) < 0.01, "optimizer {opt4} vs {opt1}");
    assert!(
        lowp4 < lowp1 / 3,
        "low-precision weights {lowp4} vs {lowp1}"
    );
}

/// Mixtral-8x7B on 2 × DGX H100 (Megatron-LM, global batch 64 × 4,096 tokens): the plan
/// splits the experts over expert-parallel ranks, and the runners-up hold the fastest
/// plan that tensor-splits them instead, slower, with the physics visible in its
/// breakdown: no all-to-all, more tensor-parallel communication (the experts' gathers
/// and reduce-scatters), and, at the same expert split, more of it than the all-to-all
/// it replaces.
#[test]
fn mixtral_on_two_dgx_h100_picks_expert_parallelism() {
    let cfg = zoo::lookup("mixtral-8x7b").unwrap();
    let cluster = Cluster::resolve("dgx-h100:2").unwrap();
    let plan = apar::plan_model(&cfg, &cluster, &PlanOptions::new(4096, 64)).unwrap();
    let best = &plan.config;
    assert!(best.ep > 1, "chose {best}");
    assert!(plan.breakdown.ep_comm_s > 0.0);
    let tp_experts = plan
        .runners_up
        .iter()
        .find(|r| r.config.ep == 1 && r.config.etp > 1 && r.config.etp == r.config.tp)
        .expect("a runner-up tensor-splits the experts");
    assert!(tp_experts.step_time_s > plan.step_time_s);
    assert_eq!(tp_experts.breakdown.ep_comm_s, 0.0);
    assert!(tp_experts.breakdown.tp_comm_s > plan.breakdown.tp_comm_s);

    // The same stage layout with the experts' split moved from EP to TP (equal expert
    // parameters per rank when `ep·etp` is kept): the TP collectives it adds cost more
    // than the all-to-all it removes.
    if best.tp > 1 && best.ep % best.tp == 0 && best.etp == 1 {
        let session =
            apar::Session::for_config(&cfg, &cluster, &PlanOptions::new(4096, 64)).unwrap();
        let moved = Config {
            ep: best.ep / best.tp,
            etp: best.tp,
            ..*best
        };
        let m = session.compiler().evaluate(&moved).unwrap();
        let won = session.compiler().evaluate(best).unwrap();
        assert_eq!(m.sim.memory[0].params, won.sim.memory[0].params);
        let (mb, wb) = (&m.sim.breakdown, &won.sim.breakdown);
        let added_tp = mb.tp_comm_s - wb.tp_comm_s;
        let removed_ep = wb.ep_comm_s - mb.ep_comm_s;
        assert!(added_tp > removed_ep, "TP +{added_tp} vs EP -{removed_ep}");
        assert!(m.step_time_s > plan.step_time_s);
    }
}

/// Expert degrees on a dense model, experts that do not split, and an expert group
/// that does not fold into the stage's ranks are refused with typed errors, never a
/// panic.
#[test]
fn bad_expert_layouts_are_refused() {
    use apar::lower::compile::CompileError;
    let dense = compiler(&model("llama3-8b", 2), 1024, "dgx-h100:1");
    assert!(matches!(
        dense.check(&config(8, 1, 2, 1)),
        Err(CompileError::ExpertsWithoutMoe { .. })
    ));
    let moe = compiler(&model("mixtral-8x7b", 2), 1024, "dgx-h100:1");
    assert!(matches!(
        moe.check(&config(1, 8, 16, 1)),
        Err(CompileError::ExpertsNotDividing { .. })
    ));
    assert!(matches!(
        moe.check(&config(2, 4, 4, 4)),
        Err(CompileError::ExpertGroupNotDividing { .. })
    ));
    assert!(matches!(
        moe.check(&config(2, 4, 1, 2)),
        Err(CompileError::ExpertTensorDegree { .. })
    ));
    assert!(moe.check(&config(2, 4, 2, 4)).is_ok());
}

/// A plan's JSON leaves `ep` and `etp` out when 1 (plans of dense models print as
/// before) and writes them otherwise; both read back.
#[test]
fn config_json_skips_unit_expert_degrees() {
    let dense = Config::new(8, 1, 1, 1, 8);
    let text = serde_json::to_string(&dense).unwrap();
    assert!(
        !text.contains("\"ep\"") && !text.contains("\"etp\""),
        "{text}"
    );
    let moe = config(4, 2, 4, 2);
    let text = serde_json::to_string(&moe).unwrap();
    assert!(
        text.contains("\"ep\":4") && text.contains("\"etp\":2"),
        "{text}"
    );
    let back: Config = serde_json::from_str(&text).unwrap();
    assert_eq!(back, moe);
}

/// Expert load imbalance slows the busiest expert-parallel rank's expert GEMMs and
/// all-to-alls, so the step time grows with it under expert parallelism and does not
/// move without it (every rank then holds every expert).
#[test]
fn imbalance_slows_expert_parallelism_only() {
    let cfg = model("mixtral-8x7b", 4);
    let cluster = Cluster::resolve("dgx-h100:1").unwrap();
    let at = |f: f64, ep: u32| {
        let comp = Compiler::new(
            ModelSource::Config(cfg.clone()),
            cluster.clone(),
            2048,
            64,
            0.8,
        )
        .unwrap()
        .with_moe_imbalance(f);
        let c = Config {
            zero: 1,
            ..config(4, 2, ep, 1)
        };
        comp.evaluate_with(&c, false).unwrap()
    };
    let (balanced, skewed) = (at(1.0, 4), at(1.5, 4));
    assert!(skewed.step_time_s > balanced.step_time_s);
    assert!(skewed.sim.breakdown.ep_comm_s > balanced.sim.breakdown.ep_comm_s);
    // FLOPs (and so MFU's numerator) count the mean rank.
    assert_eq!(skewed.sim.flops_per_device, balanced.sim.flops_per_device);
    let (a, b) = (at(1.0, 1), at(1.5, 1));
    assert_eq!(a.step_time_s, b.step_time_s);
    assert_eq!(a.sim.breakdown.ep_comm_s, 0.0);
}
