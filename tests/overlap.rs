//! Overlap of data-parallel communication with compute (`apar::engine::overlap`,
//! `apar::lower::overlap`): the rules on small constructed cases, applied the same way
//! to every ZeRO stage, and ZeRO-3 that is not free.
//!
//! The constructed cases use round numbers of seconds so that the expected step times
//! follow from the rules by hand (written out next to each assertion).

use apar::cluster::Cluster;
use apar::cost::CostModel;
use apar::engine::overlap::{Bucket, Overlap, ParamGather};
use apar::engine::Engine;
use apar::ir::Block;
use apar::lower::compile::{Compiler, ModelSource};
use apar::lower::profile::{BlockProfile, Blocks};
use apar::lower::{simulate, SharedLinks, SimInput, StageSpan};
use apar::passes::Config;

/// `n` layers, each with forward `f` and backward `2f` seconds; `set` fills in the
/// data-parallel part.
fn layers(n: u32, f: f64, set: impl Fn(&mut BlockProfile)) -> Blocks {
    Blocks::from_vec(
        (0..n)
            .map(|i| {
                let mut p = BlockProfile {
                    block: Some(Block::Layer(i)),
                    fwd_s: f,
                    bwd_s: 2.0 * f,
                    param_elems: 1,
                    ..BlockProfile::default()
                };
                set(&mut p);
                p
            })
            .collect(),
    )
}

/// `dp` ranks, micro-batch 1, `m` micro-batches, one stage, nothing else on.
fn config(dp: u32, m: u32) -> Config {
    Config {
        dp,
        tp: 1,
        pp: 1,
        cp: 1,
        ep: 1,
        etp: 1,
        micro_batch: 1,
        num_micro_batches: m,
        sp: false,
        recompute: apar::passes::Recompute::None,
        recompute_layers: None,
        recompute_modules: None,
        zero: 0,
        low_prec_shard: false,
        schedule: apar::passes::Schedule::OneFOneB,
    }
}

fn per_block(overlap: Overlap) -> Overlap {
    Overlap {
        grad_bucket: Bucket::Block,
        bucket_first_chunk_only: false,
        pipelined_bucket: None,
        ..overlap
    }
}

/// Step time of one pipeline stage (dp 8, ZeRO `zero`) over `m` micro-batches.
fn step(blocks: &Blocks, zero: u8, m: u32, overlap: Overlap, links: SharedLinks) -> f64 {
    let mut config: Config = config(8, m);
    config.zero = zero;
    let mut cost = CostModel::new(Cluster::resolve("dgx-a100-80g:1").unwrap());
    // The rules alone: compute keeps its speed beside a collective (the slowdown has
    // its own test in `lower::overlap`).
    cost.eff.overlap_slowdown = 0.0;
    let stages = [StageSpan {
        first: 0,
        last: blocks.len() - 1,
    }];
    simulate(
        blocks,
        &SimInput {
            config: &config,
            stages: &stages,
            cost: &cost,
            pp_cross_node: false,
            detail: true,
            overlap,
            links,
        },
    )
    .step_time_s
        - clip_all_reduce(&cost, zero)
}

/// The gradient-norm all-reduce of one fp32 scalar every step ends with (priced in
/// `cost::overhead`; the synthetic blocks hold no gradients to read): over the 8
/// data-parallel ranks when ZeRO shards the optimizer, over nobody otherwise.
fn clip_all_reduce(cost: &CostModel, zero: u8) -> f64 {
    let group = if zero >= 1 {
        apar::cost::Group {
            size: 8,
            per_node: 8,
        }
    } else {
        apar::cost::Group::SINGLE
    };
    cost.grad_clip_time(0.0, group)
}

fn close(got: f64, want: f64) {
    assert!((got - want).abs() < 1e-9, "{got} vs {want}");
}

/// With the same reduction traffic per block, ZeRO-1's once-per-step reduction and
/// ZeRO-2's per-micro-batch reduce-scatter expose the same part: the last bucket.
#[test]
fn zero_1_and_zero_2_reductions_are_priced_by_the_same_rule() {
    let o = per_block(Engine::Torchtitan.overlap(8));
    // 4 layers of 1 s forward, 2 s backward; 0.5 s of reduction each.
    let zero1 = layers(4, 1.0, |p| p.dp_grad_s = 0.5);
    let zero2 = layers(4, 1.0, |p| p.dp_reduce_s = 0.5);
    let plain = layers(4, 1.0, |_| {});
    let base = step(&plain, 0, 1, o, SharedLinks::default());
    close(base, 12.0);
    // Each bucket's reduction (0.5 s) hides behind the next block's backward (2 s);
    // the last one is exposed.
    close(step(&zero1, 1, 1, o, SharedLinks::default()), 12.5);
    close(step(&zero2, 2, 1, o, SharedLinks::default()), 12.5);
    // One bucket for the whole chunk: all of it after the last backward.
    let chunk = Overlap {
        grad_bucket: Bucket::Chunk,
        ..o
    };
    close(step(&zero1, 1, 1, chunk, SharedLinks::default()), 14.0);
    close(step(&zero2, 2, 1, chunk, SharedLinks::default()), 14.0);
}

/// ZeRO-3 is not free: when a layer's gather takes longer than its compute, the
/// gathers set the pace of the pass, and only the first one is exposed when they are
/// shorter.
#[test]
fn zero_3_gathers_longer_than_compute_slow_the_step() {
    let o = per_block(Engine::Torchtitan.overlap(8));
    let plain = step(&layers(4, 1.0, |_| {}), 0, 1, o, SharedLinks::default());
    close(plain, 12.0);
    // Gathers of 0.5 s before each forward and backward, hidden behind the block
    // before: only the first of each pass shows (12 + 0.5 + 0.5).
    let short = layers(4, 1.0, |p| {
        p.dp_fwd_s = 0.5;
        p.dp_bwd_s = 0.5;
    });
    close(step(&short, 3, 1, o, SharedLinks::default()), 13.0);
    // Gathers of 3 s: forward 4·3 + 1 (the last block after the last gather),
    // backward 4·3 + 2.
    let long = layers(4, 1.0, |p| {
        p.dp_fwd_s = 3.0;
        p.dp_bwd_s = 3.0;
    });
    close(step(&long, 3, 1, o, SharedLinks::default()), 13.0 + 14.0);
    // Without prefetch, every gather waits for the block before it.
    let no_prefetch = Overlap {
        prefetch: false,
        ..o
    };
    close(
        step(&short, 3, 1, no_prefetch, SharedLinks::default()),
        12.0 + 8.0 * 0.5,
    );
}

/// A data-parallel collective overlapped with a block whose tensor-parallel
/// collectives use the same link waits for them: the overlapped span is at least the
/// sum on that link, and compute is not slowed.
#[test]
fn shared_links_add_the_other_traffic() {
    let o = per_block(Engine::Torchtitan.overlap(8));
    // Backward 2 s of which 1.5 s tensor-parallel collectives; 1 s reduction.
    let blocks = layers(3, 1.0, |p| {
        p.tp_comm_s = 1.5;
        p.tp_fwd_s = 0.0;
        p.dp_grad_s = 1.0;
    });
    let apart = step(&blocks, 1, 1, o, SharedLinks::default());
    // 9 s of compute, the last reduction exposed.
    close(apart, 10.0);
    let shared = SharedLinks {
        tp: true,
        pp: false,
    };
    // Reductions of layers 2 and 1 each take 1 + 1.5 s on the link: layer 2's runs
    // from 5 to 7.5, layer 1's from 7.5 to 10, layer 0's (exposed, nothing to share
    // with) from 10 to 11.
    close(step(&blocks, 1, 1, o, shared), 11.0);
}

/// DeepSpeed ZeRO-1/2 all-gather the updated parameters after the step; Megatron-LM
/// (`--overlap-param-gather`) and FSDP2 during the next forward, where only the first
/// gather shows.
#[test]
fn post_optimizer_gather_after_the_step_or_in_the_next_forward() {
    let blocks = layers(4, 1.0, |p| {
        p.dp_grad_s = 0.5;
        p.dp_param_s = 0.25;
    });
    let next = per_block(Engine::Megatron.overlap(8));
    assert_eq!(next.param_gather, ParamGather::NextForward);
    let after = per_block(Engine::DeepSpeed.overlap(8));
    assert_eq!(after.param_gather, ParamGather::AfterStep);
    // 12 s compute + the last bucket 0.5 s + the first gather 0.25 s.
    close(step(&blocks, 1, 1, next, SharedLinks::default()), 12.75);
    // + all four gathers.
    close(step(&blocks, 1, 1, after, SharedLinks::default()), 13.5);
}

/// On a real model across nodes, ZeRO-3's forward gathers all run on the
/// communication stream: the step takes at least their sum, and the exposed
/// data-parallel time is reported.
#[test]
fn zero_3_step_is_at_least_its_gathers() {
    let m = apar::models::zoo::lookup("megatron-1.7b").unwrap();
    let cluster = Cluster::resolve("dgx-a100-80g:2").unwrap();
    let c = Compiler::new(ModelSource::Config(m), cluster, 2048, 16, 1.0)
        .unwrap()
        .with_engine(Engine::Torchtitan);
    let mut cfg: Config = config(16, 1);
    cfg.zero = 3;
    let e = c.evaluate(&cfg).unwrap();
    let p = c.profiles(&cfg);
    let blocks = &p.as_ref().as_ref().unwrap().blocks;
    let gathers: f64 = blocks.iter().map(|b| b.dp_fwd_s + b.dp_bwd_s).sum();
    let compute: f64 = blocks.iter().map(|b| b.fwd_s + b.bwd_s).sum();
    assert!(gathers > 0.0);
    assert!(e.step_time_s >= gathers.max(compute), "{e:?}");
    assert!(e.sim.breakdown.dp_comm_s > 0.0);
}

/// Megatron-LM without `--overlap-grad-reduce` reduces every gradient after the
/// step's last backward, and without `--overlap-param-gather` gathers the updated
/// parameters after the step (`finalize_model_grads`, `DistributedOptimizer.step`):
/// the whole of both is exposed. The FSDP engines have no such switch.
#[test]
fn megatron_without_overlap_exposes_every_reduction() {
    use apar::engine::overlap::CommOverlap;
    let off = CommOverlap {
        grad_reduce: false,
        param_gather: false,
        tp_comm: true,
    };
    let on = Engine::Megatron.overlap_with(8, CommOverlap::default());
    assert_eq!(on, Engine::Megatron.overlap(8));
    let o = Engine::Megatron.overlap_with(8, off);
    assert_eq!(o.grad_bucket, Bucket::Step);
    assert_eq!(o.param_gather, ParamGather::AfterStep);
    // 4 layers of 1 s forward, 2 s backward; 0.5 s of reduction each, 2 micro-batches:
    // 2 × 12 s of compute, then 4 × 0.5 s of reduction.
    let zero1 = layers(4, 1.0, |p| p.dp_grad_s = 0.5);
    close(step(&zero1, 1, 2, o, SharedLinks::default()), 26.0);
    // With buckets, only the last block's 0.5 s is exposed.
    let bucketed = per_block(on);
    close(step(&zero1, 1, 2, bucketed, SharedLinks::default()), 24.5);
    // The switches are Megatron-LM's: other engines refuse them, and the gather
    // overlap needs the reduction overlap (Megatron-LM asserts it).
    assert!(off.check(Engine::Megatron).is_ok());
    assert!(off.check(Engine::Torchtitan).is_err());
    assert!(off.check(Engine::DeepSpeed).is_err());
    let gather_only = CommOverlap {
        grad_reduce: false,
        param_gather: true,
        tp_comm: true,
    };
    assert!(gather_only.check(Engine::Megatron).is_err());
}

/// DeepSpeed's stage 3 gathers parameter by parameter (one coalesced all-gather per
/// submodule fetch, up to `stage3_prefetch_bucket_size` = 5·10⁷ elements,
/// `deepspeed/runtime/zero/partitioned_param_coordinator.py`), FSDP2 one unit at a
/// time: the same bytes, but DeepSpeed pays one collective latency per gather. A
/// Megatron GPT 1.7B layer's weights (qkv 15.9M, projection 5.3M, fc1 and fc2 21.2M
/// elements) coalesce into two gathers, 42.5M then 21.2M; its biases and norms (below
/// the 10⁵-element `stage3_param_persistence_threshold`) into a third.
#[test]
fn deepspeed_zero_3_gathers_pay_a_latency_per_parameter_bucket() {
    use apar::cost::{Collective, Group};
    let m = apar::models::zoo::lookup("megatron-1.7b").unwrap();
    let cluster = Cluster::resolve("dgx-a100-80g:32").unwrap();
    let mut cfg: Config = config(256, 1);
    cfg.zero = 3;
    let gathers = |engine: Engine| {
        let c = Compiler::new(
            ModelSource::Config(m.clone()),
            cluster.clone(),
            2048,
            256,
            1.0,
        )
        .unwrap()
        .with_engine(engine);
        let p = c.profiles(&cfg);
        let blocks = &p.as_ref().as_ref().unwrap().blocks;
        let layer = blocks
            .iter()
            .find(|b| b.block == Some(Block::Layer(3)))
            .map(|b| (b.dp_fwd_s, b.dp_bwd_s))
            .unwrap();
        layer
    };
    let (ds_f, ds_b) = gathers(Engine::DeepSpeed);
    let (tt_f, tt_b) = gathers(Engine::Torchtitan);
    // One ring all-gather's latency over 256 ranks, 8 per node.
    let lat = CostModel::new(cluster.clone())
        .ring_cost(
            Collective::AllGather,
            1.0,
            Group {
                size: 256,
                per_node: 8,
            },
        )
        .latency_s;
    assert!(lat > 1e-3, "{lat}");
    for (ds, tt) in [(ds_f, tt_f), (ds_b, tt_b)] {
        assert!(tt > 0.0);
        assert!(
            (ds - tt - 2.0 * lat).abs() < 1e-9,
            "{ds} vs {tt} + 2 × {lat}"
        );
    }
}
