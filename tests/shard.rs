//! Tensor and sequence parallelism found by the e-graph, checked against Megatron-LM's
//! published layouts, Korthikanti et al.'s activation formulas, FLOP conservation and
//! the reference interpreter.

use apar::ir::{text, verify, Block, Env, Graph, Op, OpKind, Phase};
use apar::models::{build_forward, zoo, Attention, ModelConfig, Position};
use apar::shard::{
    interp, shard_model, Layout, ModelCost, ShardError, ShardOptions, ShardedModel, Sharder, Stop,
};
use apar::train::TrainOptions;

fn forward(cfg: &ModelConfig) -> Graph {
    build_forward(cfg).expect("zoo models build")
}

fn shard(cfg: &ModelConfig, tp: u32, sp: bool) -> (Graph, ShardedModel) {
    let fwd = forward(cfg);
    let m = shard_model(&fwd, &ShardOptions::new(tp, sp)).expect("shards");
    (fwd, m)
}

fn count(m: &ShardedModel, block: Block, name: &str) -> usize {
    m.collectives(block).get(name).copied().unwrap_or(0)
}

fn with_layers(name: &str, layers: u32) -> ModelConfig {
    let mut cfg = zoo::lookup(name).expect("in the zoo");
    cfg.layers = layers;
    cfg
}

/// Megatron-LM (Shoeybi et al. 2019, Sec. 3 and Fig. 4): one all-reduce after the
/// attention block and one after the MLP in forward. With sequence parallelism
/// (Korthikanti et al. 2022, Sec. 4.2.2, Fig. 5) each becomes a reduce-scatter, and an
/// all-gather feeds each column-parallel block.
#[test]
fn transformer_layers_get_megatrons_collectives() {
    for (name, attention) in [
        ("gpt3-175b", None),
        ("llama2-70b", None),
        ("llama3-405b", None),
    ] {
        let mut cfg = with_layers(name, 3);
        if let Some(a) = attention {
            cfg.attention = a;
        }
        let (_, m) = shard(&cfg, 8, false);
        let b = Block::Layer(1);
        assert_eq!(
            count(&m, b, "all_reduce"),
            2,
            "{name}: {:?}",
            m.collectives(b)
        );
        assert_eq!(
            count(&m, b, "all_gather") + count(&m, b, "reduce_scatter"),
            0
        );
        let (_, m) = shard(&cfg, 8, true);
        assert_eq!(
            count(&m, b, "all_reduce"),
            0,
            "{name} sp: {:?}",
            m.collectives(b)
        );
        assert_eq!(count(&m, b, "reduce_scatter"), 2, "{name} sp");
        assert_eq!(count(&m, b, "all_gather"), 2, "{name} sp");
    }
    // GPT-NeoX-style parallel residual (no dropout): both branches share one reduction.
    let mut cfg = with_layers("gpt3-175b", 3);
    cfg.parallel_residual = true;
    cfg.dropout = 0.0;
    for sp in [false, true] {
        let (_, m) = shard(&cfg, 8, sp);
        let b = Block::Layer(1);
        let reduce = if sp { "reduce_scatter" } else { "all_reduce" };
        assert_eq!(count(&m, b, reduce), 1, "sp {sp}: {:?}", m.collectives(b));
    }
}

/// The calibrated cost model plugs in through the same trait and finds the same
/// layouts on a DGX A100 node.
#[test]
fn the_calibrated_cost_model_finds_the_same_layouts() {
    use apar::cost::{CostModel, Group};
    let cluster = apar::cluster::Cluster::resolve("dgx-a100-80g:1").expect("preset");
    let model = CostModel::new(cluster);
    let cost = apar::shard::ModelCost {
        model: &model,
        group: Group {
            size: 8,
            per_node: 8,
        },
        min_split_dim: None,
    };
    let fwd = forward(&with_layers("gpt3-175b", 3));
    for sp in [false, true] {
        let m = Sharder::with_cost(ShardOptions::new(8, sp), &cost)
            .shard_model(&fwd)
            .expect("shards");
        let b = Block::Layer(1);
        let reduce = if sp { "reduce_scatter" } else { "all_reduce" };
        assert_eq!(count(&m, b, reduce), 2, "sp {sp}: {:?}", m.collectives(b));
    }
}

/// `apar shard --model gpt3-175b --tp 8 --block 1` on the full model: the block as
/// printed parses back and verifies (what `apar check` does), with and without sp.
#[test]
fn printed_blocks_pass_check() {
    let cfg = zoo::lookup("gpt3-175b").expect("zoo");
    let fwd = forward(&cfg);
    for sp in [false, true] {
        let m = shard_model(&fwd, &ShardOptions::new(8, sp)).expect("shards");
        let block = m.block_graph(Block::Layer(1)).expect("block 1");
        let printed = text::print(&block);
        let parsed = text::parse(&printed).expect("parses");
        verify(&parsed).expect("verifies");
        let ar = parsed
            .ops()
            .filter(|&o| parsed.op(o).kind() == OpKind::AllReduce)
            .count();
        assert_eq!(ar, if sp { 0 } else { 2 });
        // The column-parallel QKV weight holds 3h/t columns per device.
        let qkv = parsed.find_source("layers.1.attn.qkv.weight").expect("qkv");
        let ty = parsed.ty(parsed.node(qkv).results[0]);
        assert_eq!(ty.to_string(), "bf16[12288,4608]");
        // `--train`: the block of the per-device training graph.
        let train = m
            .training_block(Block::Layer(1), &TrainOptions::default())
            .expect("training block");
        let parsed = text::parse(&text::print(&train)).expect("parses");
        verify(&parsed).expect("verifies");
        assert!(parsed.ops().any(|o| parsed.node(o).phase == Phase::Opt));
    }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b
}

/// Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
/// Models": activations per layer with tensor parallelism, Eq. 2,
/// `sbh(10 + 24/t + 5as/(ht))`, and with sequence parallelism too, Eq. 4,
/// `sbh(34/t + 5as/(ht))` bytes (16-bit activations, 1-byte dropout masks).
#[test]
fn gpt3_activations_per_device_match_korthikanti_eq2_and_eq4() {
    let cfg = zoo::lookup("gpt3-175b").expect("zoo");
    let fwd = forward(&cfg);
    let (s, b, h, a, t) = (2048.0, 1.0, 12288.0, 96.0, 8.0);
    let env = Env::new(1, 2048);
    for sp in [false, true] {
        let stats = apar::shard::per_device_stats(
            &fwd,
            &ShardOptions::new(8, sp),
            &TrainOptions::default(),
            env,
        )
        .expect("stats");
        let expected = if sp {
            s * b * h * (34.0 / t + 5.0 * a * s / (h * t))
        } else {
            s * b * h * (10.0 + 24.0 / t + 5.0 * a * s / (h * t))
        };
        let got = stats.activation_bytes_per_layer as f64;
        assert!(rel(got, expected) < 0.01, "sp {sp}: {got} vs {expected}");
        assert_eq!(stats.layers, 96);
    }
}

/// Every zoo model shards at tp 2, 4, 8 with and without sp; the runs saturate, the
/// per-device graph verifies and its training graph derives.
#[test]
fn every_zoo_model_shards_at_tp_2_4_8() {
    for entry in zoo::ZOO {
        let cfg = with_layers(entry.name, 2);
        let fwd = forward(&cfg);
        for tp in [2, 4, 8] {
            for sp in [false, true] {
                let m = shard_model(&fwd, &ShardOptions::new(tp, sp))
                    .unwrap_or_else(|e| panic!("{} tp {tp} sp {sp}: {e}", entry.name));
                for run in &m.templates {
                    assert_eq!(run.report.stop, Stop::Saturated, "{} tp {tp}", entry.name);
                }
                if tp == 8 {
                    m.training_graph(&TrainOptions::default())
                        .unwrap_or_else(|e| panic!("{} tp {tp} sp {sp}: {e}", entry.name));
                }
            }
        }
    }
}

/// GPT-2's 12 heads, vocabulary 50,257 and hidden 768 do not divide by 5: the split
/// falls back to what divides (nothing but the symbolic sequence, with sp), never a
/// panic; tp 0 is an error.
#[test]
fn impossible_splits_fall_back_to_replicated() {
    let cfg = with_layers("gpt2", 2);
    let fwd = forward(&cfg);
    for sp in [false, true] {
        let m = shard_model(&fwd, &ShardOptions::new(5, sp)).expect("a valid fallback");
        verify(&m.graph).expect("verifies");
        m.training_graph(&TrainOptions::default()).expect("trains");
        let q = m
            .graph
            .find_source("layers.0.attn.qkv.weight")
            .expect("qkv");
        let t = m.graph.node(q).results[0];
        assert_eq!(m.layouts[t.index()].layout, Layout::Replicated);
        if !sp {
            assert!(m.collectives(Block::Layer(0)).is_empty());
        }
    }
    assert!(matches!(
        shard_model(&fwd, &ShardOptions::new(0, false)),
        Err(ShardError::ZeroTp)
    ));
    // GPT-2's vocabulary (50,257) is odd: at tp 2 the layers split, embedding and loss
    // stay whole.
    let m = shard_model(&fwd, &ShardOptions::new(2, false)).expect("shards");
    assert_eq!(count(&m, Block::Layer(0), "all_reduce"), 2);
    assert!(m.collectives(Block::Head).is_empty());
}

/// Structurally identical layers share one run; the result is deterministic.
#[test]
fn layers_share_a_template_and_runs_are_deterministic() {
    let cfg = with_layers("llama3-405b", 4);
    let fwd = forward(&cfg);
    let a = shard_model(&fwd, &ShardOptions::new(8, true)).expect("shards");
    let b = shard_model(&fwd, &ShardOptions::new(8, true)).expect("shards");
    assert_eq!(a.templates.len(), 3, "embed, layer, head");
    assert!(a.blocks.iter().filter(|b| b.cached).count() == 3);
    assert_eq!(text::print(&a.graph), text::print(&b.graph));
    assert_eq!(a.templates, b.templates);
}

/// Summed over the devices, the sharded forward does exactly the unsharded work, plus
/// the work it deliberately duplicates (an op without a split operand runs whole on
/// every device: norms and residuals without sp, sums of partial results) and the ops
/// it introduces; parameters are conserved too.
#[test]
fn flops_and_parameters_are_conserved() {
    let env = Env::new(1, 2048);
    let mut neox = with_layers("gpt3-175b", 2);
    neox.name = "neox-like".into();
    neox.parallel_residual = true;
    neox.dropout = 0.0;
    for cfg in [
        with_layers("gpt3-175b", 2),
        with_layers("llama2-70b", 2),
        neox,
    ] {
        let fwd = forward(&cfg);
        let want = fwd.total_flops(env).expect("flops");
        for tp in [2u64, 8] {
            for sp in [false, true] {
                let label = format!("{} tp {tp} sp {sp}", cfg.name);
                let m = shard_model(&fwd, &ShardOptions::new(tp as u32, sp)).expect("shards");
                let g = &m.graph;
                let (mut logical, mut duplicated, mut introduced) = (0u64, 0u64, 0u64);
                for id in g.ops() {
                    let f = g.op_cost(id, env).expect("cost").flops;
                    // Work is split only where data is: on a split operand.
                    let whole = !g
                        .node(id)
                        .inputs
                        .iter()
                        .any(|t| matches!(m.layouts[t.index()].layout, Layout::Sharded { .. }));
                    if m.origins[id.index()].is_none() {
                        introduced += f * tp;
                    } else if whole {
                        logical += f;
                        duplicated += f * (tp - 1);
                    } else {
                        logical += f * tp;
                    }
                }
                assert_eq!(logical, want, "{label}");
                let total = g.total_flops(env).expect("flops") * tp;
                assert_eq!(total, want + duplicated + introduced, "{label}");
                // Duplicated work is the replicated norms, residuals and biases: small.
                assert!(duplicated * 10 < want, "{label}: {duplicated} of {want}");
                // A split parameter is held once in total, a replicated one tp times.
                let mut params = 0u64;
                for id in g.ops() {
                    if let Op::Param { .. } = g.op(id) {
                        let t = g.node(id).results[0];
                        let n = g.ty(t).shape.numel_at(env).expect("size");
                        let split = m.layouts[t.index()].layout != Layout::Replicated;
                        params += if split { n * tp } else { n };
                    }
                }
                assert_eq!(params, cfg.param_count(), "{label}");
            }
        }
    }
}

/// The backward pass has the conjugate collectives: per layer with sp, the two forward
/// all-gathers reduce-scatter, the two reduce-scatters all-gather, the two saved
/// all-gather results are gathered again, and every `tp_copy` all-reduces.
#[test]
fn training_graphs_use_the_conjugate_collectives() {
    let cfg = with_layers("gpt3-175b", 2);
    let (_, m) = shard(&cfg, 8, true);
    let g = m.training_graph(&TrainOptions::default()).expect("derives");
    verify(&g).expect("verifies");
    let bwd = |name: &str| {
        g.ops()
            .filter(|&o| {
                let n = g.node(o);
                n.block == Block::Layer(1) && n.phase == Phase::Bwd && n.op.name() == name
            })
            .count()
    };
    let copies = count(&m, Block::Layer(1), "tp_copy");
    assert_eq!(bwd("reduce_scatter"), 2);
    assert_eq!(bwd("all_gather"), 2 + 2);
    assert_eq!(bwd("all_reduce"), copies);
}

/// A compute-bound cost model: with tiny shapes a real device's link latency would keep
/// everything replicated; a slow device on a fast link makes the tiny models shard like
/// the large ones.
fn compute_bound() -> apar::cost::CostModel {
    let mut cluster = apar::cluster::Cluster::resolve("dgx-a100-80g:1").expect("preset");
    cluster.device.peak_bf16_flops = 1e9;
    cluster.device.peak_fp32_flops = 1e9;
    cluster.device.memory_bandwidth = 1e9;
    cluster.intra_node.bandwidth = 1e12;
    cluster.intra_node.latency_s = 1e-6;
    apar::cost::CostModel::new(cluster)
}

/// Runs the interpreter on the unsharded and sharded training steps of `cfg`.
fn equivalent(cfg: &ModelConfig, tp: u32, sp: bool) -> ShardedModel {
    let fwd = forward(cfg);
    let model = compute_bound();
    let cost = ModelCost::tensor_parallel(&model, tp);
    let env = Env::new(2, 8);
    let opts = ShardOptions {
        env,
        ..ShardOptions::new(tp, sp)
    };
    let m = Sharder::with_cost(opts, &cost)
        .shard_model(&fwd)
        .expect("shards");
    let c = interp::compare(&fwd, &m, env, 11).expect("runs");
    let label = format!("{} tp {tp} sp {sp}: {c:?}", cfg.name);
    assert!(c.params > 0, "{label}");
    assert!(c.loss_error < 1e-4, "{label}");
    assert!(c.grad_error < 1e-4, "{label}");
    assert!(c.replica_error < 1e-4, "{label}");
    m
}

fn each_degree(cfg: &ModelConfig, check: impl Fn(&ShardedModel, u32, bool)) {
    for tp in [2, 4] {
        for sp in [false, true] {
            check(&equivalent(cfg, tp, sp), tp, sp);
        }
    }
}

/// GPT block: heads split for eager attention (dropout on the split probabilities),
/// column → row MLP, vocabulary-parallel embedding, position embedding and tied
/// vocabulary-parallel loss.
#[test]
fn interpreter_agrees_on_gpt_blocks() {
    let cfg = zoo::lookup("tiny-gpt").expect("zoo");
    each_degree(&cfg, |m, _, sp| {
        let layer = Block::Layer(0);
        if sp {
            assert_eq!(count(m, layer, "reduce_scatter"), 2);
        } else {
            assert_eq!(count(m, layer, "all_reduce"), 2);
        }
        let vocab = |name: &str| m.graph.ops().any(|o| m.graph.op(o).name() == name);
        assert!(vocab("vocab_parallel_embedding") && vocab("vocab_parallel_cross_entropy"));
    });
}

/// Llama block: SwiGLU (gate and up column-split, down row-split), RoPE, flash
/// attention with grouped-query attention — 2 kv heads, so at tp 4 every device
/// computes the K/V projections and keeps its group's head — and an untied head.
#[test]
fn interpreter_agrees_on_llama_blocks() {
    let cfg = zoo::lookup("tiny-llama").expect("zoo");
    each_degree(&cfg, |m, _, _| {
        let down = m
            .graph
            .find_source("layers.0.mlp.down.weight")
            .expect("down");
        let t = m.graph.node(down).results[0];
        assert_eq!(m.layouts[t.index()].layout, Layout::split(0));
        let gate = m
            .graph
            .find_source("layers.0.mlp.gate.weight")
            .expect("gate");
        let t = m.graph.node(gate).results[0];
        assert_eq!(m.layouts[t.index()].layout, Layout::split(1));
    });
    // Eager attention repeats the kv heads explicitly.
    let eager = zoo::with_attention(cfg, Attention::Eager);
    each_degree(&eager, |_, _, _| {});
}

/// GPT-NeoX / GPT-J block: attention and MLP branches read the same input and are
/// summed into the residual; partial rotary embedding. The two branch sums share one
/// all-reduce ("sums of partial sums stay partial").
#[test]
fn interpreter_agrees_on_parallel_residual_blocks() {
    let mut cfg = zoo::lookup("tiny-gpt").expect("zoo");
    cfg.name = "tiny-neox".into();
    cfg.parallel_residual = true;
    cfg.position = Position::Rotary {
        dims: 8,
        theta: 10000.0,
    };
    cfg.dropout = 0.0;
    cfg.tied_embeddings = false;
    each_degree(&cfg, |m, _, sp| {
        let layer = Block::Layer(0);
        let reduces = count(m, layer, "all_reduce") + count(m, layer, "reduce_scatter");
        // With sp and this compute-bound cost, summing the full-size partial results
        // costs more than the second reduce-scatter saves; gpt3-sized blocks merge
        // (`transformer_layers_get_megatrons_collectives`).
        let want = if sp { 2 } else { 1 };
        assert_eq!(reduces, want, "sp {sp}: {:?}", m.collectives(layer));
    });
    // With dropout on each branch the sums cannot merge.
    cfg.dropout = 0.1;
    each_degree(&cfg, |_, _, _| {});
}

/// The sharded GPT-3 and Llama-2-70B layers at tp 8, as `apar shard` prints them.
#[test]
fn sharded_blocks_snapshot() {
    for (name, label) in [("gpt3-175b", "gpt3_175b"), ("llama2-70b", "llama2_70b")] {
        let cfg = with_layers(name, 2);
        for sp in [false, true] {
            let (_, m) = shard(&cfg, 8, sp);
            let block = m.block_graph(Block::Layer(1)).expect("block");
            let report = serde_json::to_string_pretty(m.report(Block::Layer(1)).expect("run"))
                .expect("json");
            let sp_tag = if sp { "_sp" } else { "" };
            insta::assert_snapshot!(
                format!("{label}_tp8{sp_tag}_layer"),
                format!("{}\n// run: {report}\n", text::print(&block))
            );
        }
    }
}
