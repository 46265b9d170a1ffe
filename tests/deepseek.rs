//! Multi-head latent attention (MLA) and the DeepSeek-V2/V3 family: parameters and
//! FLOPs from the papers' formulas, counts against Hugging Face's, tensor-parallel
//! sharding (checked by the reference interpreter), and the Megatron-LM export.
//!
//! Sources: DeepSeek-AI, *DeepSeek-V2: A Strong, Economical, and Efficient
//! Mixture-of-Experts Language Model* (2024), section 2.1 (equations 9–19: the MLA
//! projections `W^DKV`, `W^UK`, `W^UV`, `W^KR`, `W^DQ`, `W^UQ`, `W^QR`, `W^O`);
//! DeepSeek-AI, *DeepSeek-V3 Technical Report* (Liu et al. 2024), section 4.2 (the V3
//! hyper-parameters: `n_h` 128 heads of `d_h` 128, `d_c` 512, `d'_c` 1536, `d^R_h` 64;
//! 671B total parameters, 37B activated per token); Hugging Face's counts come from
//! `scripts/count_hf_params.py` (`tests/data/hf_param_counts.json`).

use std::path::PathBuf;

use apar::engine::export::{export, parse, ExportPlan, ParsedConfig};
use apar::engine::Engine;
use apar::ir::{verify, Block, Env, Graph, Op};
use apar::models::{build_forward, hf, zoo, Attention, Mla, ModelConfig, ModelError, Position};
use apar::passes::{Config, Recompute, Schedule};
use apar::shard::{interp, shard_model, Layout, ModelCost, ShardOptions, Sharder};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf")
        .join(name)
}

fn hf_counts(kind: &str) -> std::collections::BTreeMap<String, u64> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf_param_counts.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    serde_json::from_value(doc[kind].clone()).unwrap()
}

/// Elements of the parameters of `g` whose name starts with `prefix`.
fn params_named(g: &Graph, prefix: &str) -> u64 {
    let env = Env::new(1, 1);
    g.ops()
        .filter_map(|o| match g.op(o) {
            Op::Param { name } if name.starts_with(prefix) => {
                Some(g.ty(g.node(o).results[0]).shape.numel_at(env).unwrap())
            }
            _ => None,
        })
        .sum()
}

/// DeepSeek-V3's attention parameters per layer from the paper's matrices (V2 section
/// 2.1, V3 section 4.2 sizes), equal to the built graph's: `W^DQ [d'_c, d]`, its
/// RMSNorm `d'_c`, `W^UQ [d_h n_h, d'_c]`, `W^QR [d^R_h n_h, d'_c]`, `W^DKV [d_c, d]`,
/// `W^KR [d^R_h, d]`, the latent's RMSNorm `d_c`, `W^UK`, `W^UV [d_h n_h, d_c]`,
/// `W^O [d, d_h n_h]`.
#[test]
fn mla_parameters_are_the_papers_matrices() {
    let (d, n_h, d_h, d_c, d_q, d_r) = (7168u64, 128u64, 128u64, 512u64, 1536u64, 64u64);
    let paper = d_q * d + d_q + d_h * n_h * d_q + d_r * n_h * d_q // queries
        + d_c * d + d_r * d + d_c // W^DKV, W^KR, latent norm
        + 2 * d_h * n_h * d_c // W^UK, W^UV
        + d * d_h * n_h; // W^O
    let mut cfg = zoo::lookup("deepseek-v3").unwrap();
    cfg.layers = 1;
    let g = build_forward(&cfg).unwrap();
    verify(&g).unwrap();
    assert_eq!(params_named(&g, "layers.0.attn."), paper);
    // 187,107,328 per layer (by hand: 11,010,048 + 1,536 + 25,165,824 + 12,582,912 +
    // 3,670,016 + 458,752 + 512 + 16,777,216 + 117,440,512), 2.5× fewer than
    // multi-head attention's 4·d·d_h·n_h = 469,762,048.
    assert_eq!(paper, 187_107_328);
}

/// FLOPs of an MLA layer's forward, from first principles: every projection is a GEMM of
/// `2·T·in·out` FLOPs; the attention core is `2·s²·a·(d_qk + d_v)` over the whole
/// rectangle (apar's convention for causal ops; the time model runs half). The fused
/// attention op takes one head dim, so values are zero-padded to `d_qk` and its `P·V`
/// counts `d_qk` channels: `4·s²·a·d_qk`, (2·192)/(192+128) = 1.2× the exact core for
/// DeepSeek's dims. Eager attention counts the exact core.
#[test]
fn mla_flops_from_first_principles() {
    let mut cfg = zoo::lookup("deepseek-v2-lite").unwrap();
    cfg.layers = 1;
    let m = cfg.mla.as_deref().unwrap().clone();
    let (h, a) = (cfg.hidden, cfg.heads);
    let (dn, dr, dv, r) = (
        m.qk_nope_head_dim,
        m.qk_rope_head_dim,
        m.v_head_dim,
        m.kv_lora_rank,
    );
    let dqk = dn + dr;
    assert_eq!(m.q_lora_rank, None, "V2-Lite projects queries directly");
    let (b, s) = (2u64, 1024u64);
    let t = b * s;
    let projections = 2 * t * (h * a * dqk + h * (r + dr) + r * a * (dn + dv) + a * dv * h);
    for (attention, core) in [
        (Attention::Flash, 2 * b * s * s * a * dqk * 2),
        (Attention::Eager, 2 * b * s * s * a * (dqk + dv)),
    ] {
        let g = build_forward(&zoo::with_attention(cfg.clone(), attention)).unwrap();
        let env = Env::new(b, s);
        let mut proj = 0;
        let mut attn = 0;
        for o in g.ops() {
            if g.node(o).block != Block::Layer(0) {
                continue;
            }
            let c = g
                .op(o)
                .cost(&g.input_types(o), &g.result_types(o), env)
                .unwrap();
            match g.op(o) {
                Op::MatMul { .. } => {
                    let w = g.node(o).inputs[1];
                    let named = |p: &str| match g.op(g.tensor(w).producer) {
                        Op::Param { name } => name.contains(p),
                        _ => false,
                    };
                    if named(".attn.") {
                        proj += c.flops;
                    } else if !named(".mlp.") {
                        attn += c.flops; // QKᵀ and P·V
                    }
                }
                Op::FlashAttention { .. } => attn += c.flops,
                _ => {}
            }
        }
        assert_eq!(proj, projections, "{attention:?}");
        assert_eq!(attn, core, "{attention:?}");
    }
}

#[test]
fn attention_head_dims_of_mla_and_ordinary_attention() {
    let v3 = zoo::lookup("deepseek-v3").unwrap();
    assert_eq!(v3.attention_head_dims(), (192, 128));
    let llama = zoo::lookup("llama3-8b").unwrap();
    assert_eq!(llama.attention_head_dims(), (128, 128));
}

#[test]
fn deepseek_counts_equal_hugging_faces() {
    let total = hf_counts("total_params");
    let active = hf_counts("active_params");
    for file in [
        "deepseek-v3.json",
        "deepseek-v2.json",
        "deepseek-v2-lite.json",
    ] {
        let cfg = hf::load(&fixture(file)).unwrap();
        assert_eq!(cfg.param_count(), total[file], "{file}: total");
        assert_eq!(cfg.active_param_count(), active[file], "{file}: active");
        let g = build_forward(&cfg).unwrap();
        assert_eq!(
            params_named(&g, ""),
            total[file],
            "{file}: the graph's parameters"
        );
    }
    // The V3 report's headline: 671B total, 37B activated (Hugging Face's model has no
    // multi-token-prediction module; the report's 671B excludes it too).
    let v3 = zoo::lookup("deepseek-v3").unwrap();
    assert_eq!(v3.param_count() / 1_000_000_000, 671);
    assert_eq!(v3.active_param_count() / 1_000_000_000, 37);
    let m = v3.moe.as_deref().unwrap();
    assert_eq!((m.experts, m.topk, m.first_dense), (256, 8, 3));
    assert!(m.expert_bias);
    let g = m.group_limit.unwrap();
    assert_eq!((g.groups, g.topk_groups), (8, 4));
    // DeepSeek-V2's headline (paper, abstract): 236B total, 21B activated; V2-Lite
    // (model card): 15.7B total. (Its 2.4B activated does not state a convention:
    // Hugging Face's way gives 2.66B, 2.45B without the input embedding.)
    let round = |n: u64, unit: u64| (n + unit / 2) / unit;
    let v2 = hf::load(&fixture("deepseek-v2.json")).unwrap();
    assert_eq!(round(v2.param_count(), 1_000_000_000), 236);
    assert_eq!(round(v2.active_param_count(), 1_000_000_000), 21);
    let lite = zoo::lookup("deepseek-v2-lite").unwrap();
    assert_eq!(round(lite.param_count(), 100_000_000), 157);
    // V2-Lite: no query latent, 64 experts, top 6, 2 shared, layer 0 dense.
    let lite = zoo::lookup("deepseek-v2-lite").unwrap();
    let m = lite.moe.as_deref().unwrap();
    assert_eq!(
        (m.experts, m.topk, m.shared_ffn, m.first_dense),
        (64, 6, 2 * 1408, 1)
    );
    assert!(m.group_limit.is_none() && !m.expert_bias);
}

/// gpt-oss's config is public and Hugging Face's counts are committed: apar builds it
/// (attention sinks on the fused attention ops, per-expert biases as
/// `grouped_bias_add`; `tests/gpt_oss.rs` checks the rest) with Hugging Face's counts.
#[test]
fn gpt_oss_is_built_with_hugging_faces_counts() {
    let total = hf_counts("total_params");
    let active = hf_counts("active_params");
    // The committed configs are the published ones: OpenAI's gpt-oss model card gives
    // 20.91B and 116.83B total parameters (116,829,156,672 rounds to the latter).
    assert_eq!(total["gpt-oss-20b.json"] / 10_000_000, 2091);
    assert_eq!(total["gpt-oss-120b.json"] / 10_000_000, 11682);
    for file in ["gpt-oss-20b.json", "gpt-oss-120b.json"] {
        let cfg = hf::load(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(cfg.param_count(), total[file], "{file}: total");
        assert_eq!(cfg.active_param_count(), active[file], "{file}: active");
    }
}

#[test]
fn deepseek_files_that_hugging_face_would_build_differently_are_refused() {
    let text = std::fs::read_to_string(fixture("deepseek-v3.json")).unwrap();
    for (from, to, field) in [
        (
            "\"moe_layer_freq\": 1",
            "\"moe_layer_freq\": 2",
            "moe_layer_freq",
        ),
        (
            "\"attention_bias\": false",
            "\"attention_bias\": true",
            "attention_bias",
        ),
        (
            "\"scoring_func\": \"sigmoid\"",
            "\"scoring_func\": \"softmax\"",
            "scoring_func",
        ),
        (
            "\"num_key_value_heads\": 128",
            "\"num_key_value_heads\": 8",
            "num_key_value_heads",
        ),
        ("\"n_group\": 8", "\"n_group\": 7", "moe.group_limit"),
    ] {
        assert!(text.contains(from), "{from}");
        match hf::from_json_str("v3", &text.replace(from, to)) {
            Err(ModelError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{to}: {other:?}"),
        }
    }
}

/// A small MLA model (4 heads, a query latent, different query/key and value head
/// dims) with a DeepSeek-V3-style MoE feed-forward.
fn tiny_mla(q_lora_rank: Option<u64>) -> ModelConfig {
    let mut cfg = zoo::llama("tiny-mla", 2, 64, 4, 4, 128, 256, 10_000.0);
    let m = Mla {
        q_lora_rank,
        kv_lora_rank: 16,
        qk_nope_head_dim: 8,
        qk_rope_head_dim: 4,
        v_head_dim: 6,
    };
    cfg.head_dim = 12;
    cfg.position = Position::Rotary {
        dims: 4,
        theta: 10_000.0,
    };
    cfg.mla = Some(Box::new(m));
    cfg
}

/// The sharded MLA layer computes what the unsharded one does: the reference
/// interpreter runs both training steps on random inputs and compares the loss and
/// every parameter gradient, at tp 2 and 4, with and without sequence parallelism.
#[test]
fn interpreter_agrees_on_sharded_mla_blocks() {
    for q_lora_rank in [Some(16), None] {
        for attention in [Attention::Flash, Attention::Eager] {
            let cfg = zoo::with_attention(tiny_mla(q_lora_rank), attention);
            let fwd = build_forward(&cfg).unwrap();
            for tp in [2u32, 4] {
                for sp in [false, true] {
                    let model = apar::cost::CostModel::new(
                        apar::cluster::Cluster::resolve("dgx-h100:1").unwrap(),
                    );
                    let cost = ModelCost::tensor_parallel(&model, tp);
                    let env = Env::new(2, 8);
                    let opts = ShardOptions {
                        env,
                        ..ShardOptions::new(tp, sp)
                    };
                    let m = Sharder::with_cost(opts, &cost).shard_model(&fwd).unwrap();
                    let c = interp::compare(&fwd, &m, env, 7).unwrap();
                    let label = format!("{q_lora_rank:?} {attention:?} tp {tp} sp {sp}: {c:?}");
                    assert!(c.params > 0, "{label}");
                    assert!(c.loss_error < 1e-4, "{label}");
                    assert!(c.grad_error < 1e-4, "{label}");
                    assert!(c.replica_error < 1e-4, "{label}");
                }
            }
        }
    }
}

/// The layout of each parameter of `block` in the sharded model, by name suffix.
fn param_layout(m: &apar::shard::ShardedModel, suffix: &str) -> Layout {
    let g = &m.graph;
    let found: Vec<Layout> = g
        .ops()
        .filter_map(|o| match g.op(o) {
            Op::Param { name } if name.ends_with(suffix) => {
                Some(m.layouts[g.node(o).results[0].index()].layout)
            }
            _ => None,
        })
        .collect();
    assert_eq!(found.len(), 1, "{suffix}");
    found[0]
}

/// DeepSeek-V2-Lite at tp 8 (16 heads, 2 per device): the query and `kv_b` projections
/// are split by heads (columns), the output projection by rows, the latent projection
/// `kv_a` and its norm stay replicated (Megatron-LM's `MLASelfAttention`), and the
/// forward layer has Megatron's one all-reduce after attention and one after the MLP.
#[test]
fn tp8_splits_mla_heads_and_keeps_the_latent_replicated() {
    let mut cfg = zoo::lookup("deepseek-v2-lite").unwrap();
    cfg.layers = 2;
    let fwd = build_forward(&cfg).unwrap();
    let m = shard_model(&fwd, &ShardOptions::new(8, false)).unwrap();
    verify(&m.graph).unwrap();
    assert_eq!(param_layout(&m, "layers.0.attn.q.weight"), Layout::split(1));
    assert_eq!(
        param_layout(&m, "layers.0.attn.kv_b.weight"),
        Layout::split(1)
    );
    assert_eq!(
        param_layout(&m, "layers.0.attn.out.weight"),
        Layout::split(0)
    );
    assert_eq!(
        param_layout(&m, "layers.0.attn.kv_a.weight"),
        Layout::Replicated
    );
    assert_eq!(
        param_layout(&m, "layers.0.attn.kv_a_norm.weight"),
        Layout::Replicated
    );
    let dense = m.collectives(Block::Layer(0));
    assert_eq!(dense.get("all_reduce"), Some(&2), "{dense:?}");
    // The per-device attention core runs 2 of the 16 heads.
    let heads: Vec<u64> = m
        .graph
        .ops()
        .filter(|&o| matches!(m.graph.op(o), Op::FlashAttention { .. }))
        .map(|o| {
            let q = m.graph.node(o).inputs[0];
            m.graph.ty(q).shape.0[2].as_lit().unwrap()
        })
        .collect();
    assert_eq!(heads, [2, 2]);
}

/// With sequence parallelism the latent projection `kv_a` runs on each device's
/// sequence shard and the small latent (512 channels, not `h` = 2048) is all-gathered
/// before the up-projection: Megatron-LM's sequence-parallel MLA, found by the rules.
#[test]
fn sequence_parallel_mla_gathers_the_latent() {
    let mut cfg = zoo::lookup("deepseek-v2-lite").unwrap();
    cfg.layers = 2;
    let fwd = build_forward(&cfg).unwrap();
    let m = shard_model(&fwd, &ShardOptions::new(8, true)).unwrap();
    verify(&m.graph).unwrap();
    assert_eq!(
        param_layout(&m, "layers.0.attn.kv_a.weight"),
        Layout::Replicated
    );
    let gathered: Vec<u64> = m
        .graph
        .ops()
        .filter(|&o| m.graph.node(o).block == Block::Layer(0))
        .filter(|&o| matches!(m.graph.op(o), Op::AllGather { .. }))
        .map(|o| {
            let y = m.graph.node(o).results[0];
            m.graph.ty(y).shape.0.last().unwrap().as_lit().unwrap()
        })
        .collect();
    // Before the query projection, the latent's up-projection, and the MLP.
    assert_eq!(gathered, [2048, 512, 2048], "{gathered:?}");
}

/// DeepSeek-V3 at tp 8 verifies with its heads split 16 per device. (The sharder, which
/// prices time only, also splits the `h = 7168` rows of the down-projections `q_a` and
/// `kv_a` there, with an all-reduce of their small outputs; Megatron-LM keeps them
/// replicated. The README's DeepSeek section says so.)
#[test]
fn tp8_shards_deepseek_v3_heads() {
    let mut cfg = zoo::lookup("deepseek-v3").unwrap();
    cfg.layers = 4;
    let fwd = build_forward(&cfg).unwrap();
    let m = shard_model(&fwd, &ShardOptions::new(8, true)).unwrap();
    verify(&m.graph).unwrap();
    assert_eq!(
        param_layout(&m, "layers.3.attn.q_b.weight"),
        Layout::split(1)
    );
    assert_eq!(
        param_layout(&m, "layers.3.attn.kv_b.weight"),
        Layout::split(1)
    );
    assert_eq!(
        param_layout(&m, "layers.3.attn.out.weight"),
        Layout::split(0)
    );
    for o in m.graph.ops() {
        if matches!(m.graph.op(o), Op::FlashAttention { .. }) {
            let q = m.graph.node(o).inputs[0];
            assert_eq!(m.graph.ty(q).shape.0[2].as_lit(), Some(16));
        }
    }
}

/// The Megatron-LM export carries MLA's dims and DeepSeek-V3's routing, and reads back
/// as the plan; the other engines refuse MLA.
#[test]
fn megatron_exports_mla_and_deepseek_routing() {
    let m = zoo::lookup("deepseek-v3").unwrap();
    let c = Config {
        dp: 2,
        tp: 1,
        pp: 4,
        cp: 1,
        ep: 1,
        etp: 1,
        micro_batch: 1,
        num_micro_batches: 8,
        sp: false,
        recompute: Recompute::Full,
        recompute_layers: None,
        recompute_modules: None,
        zero: 1,
        low_prec_shard: false,
        schedule: Schedule::OneFOneB,
    };
    let plan = ExportPlan::with_layers(c, Some(m.clone()), 4096, &[16, 15, 15, 15]);
    let e = export(Engine::Megatron, &plan).unwrap();
    for option in [
        "--multi-latent-attention",
        "--q-lora-rank 1536",
        "--kv-lora-rank 512",
        "--qk-head-dim 128",
        "--qk-pos-emb-head-dim 64",
        "--v-head-dim 128",
        // DeepSeek-V3's config.json YaRN (factor 40, mscale 1, mscale_all_dim 1).
        "--rope-type yarn",
        "--rotary-scaling-factor 40",
        "--mscale-all-dim 1",
        "--attention-backend fused",
        "--moe-router-score-function sigmoid",
        "--moe-router-enable-expert-bias",
        "--moe-router-topk-scaling-factor 2.5",
        "--moe-router-num-groups 8",
        "--moe-router-group-topk 4",
        "--moe-shared-expert-intermediate-size 2048",
        "--moe-layer-freq '([0]*3+[1]*58)'",
    ] {
        assert!(e.text.contains(option), "{option}:\n{}", e.text);
    }
    assert!(!e.text.contains("--kv-channels") && !e.text.contains("--rotary-percent"));
    let back = parse(Engine::Megatron, &e.text, c.devices()).unwrap();
    assert_eq!(back, ParsedConfig::of(&plan));
    // V2-Lite: no query latent, so no `--q-lora-rank`; softmax, no groups.
    let lite = zoo::lookup("deepseek-v2-lite").unwrap();
    let plan = ExportPlan::with_layers(c, Some(lite), 4096, &[7, 7, 7, 6]);
    let e = export(Engine::Megatron, &plan).unwrap();
    assert!(!e.text.contains("--q-lora-rank"), "{}", e.text);
    assert!(!e.text.contains("--moe-router-num-groups"), "{}", e.text);
    assert!(e.text.contains("--moe-router-pre-softmax"), "{}", e.text);
    assert_eq!(
        parse(Engine::Megatron, &e.text, c.devices()).unwrap(),
        ParsedConfig::of(&plan)
    );
    for engine in [Engine::DeepSpeed, Engine::Torchtitan, Engine::Hf] {
        let err = export(
            engine,
            &ExportPlan::with_layers(c, Some(m.clone()), 4096, &[16, 15, 15, 15]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("multi-latent attention"),
            "{engine}: {err}"
        );
    }
}

/// DeepSeek-V3's published training layout (Liu et al. 2024, DeepSeek-V3 technical
/// report, Sec. 3.2: 2,048 H800 GPUs, 16-way pipeline parallelism, 64-way expert
/// parallelism spanning 8 nodes, ZeRO-1 data parallelism, no tensor parallelism; Sec.
/// 4.2: sequence 4,096, batch 15,360 sequences) evaluates, fits in 80 GB with
/// recomputation, and exports for Megatron-LM with every option the layout needs,
/// which Megatron-LM's spelling reads back as the plan.
#[test]
fn deepseek_v3_published_layout_fits_and_exports() {
    use apar::cluster::Cluster;
    use apar::{ModelSpec, PlanOptions, Session};
    let mut options = PlanOptions::new(4096, 15_360);
    options.memory_ratio = 1.0;
    let session = Session::for_spec(
        &ModelSpec::parse("deepseek-v3"),
        &Cluster::resolve("hgx-h800:256").unwrap(),
        &options,
    )
    .unwrap();
    let config = Config {
        dp: 128,
        tp: 1,
        pp: 16,
        ep: 64,
        etp: 1,
        zero: 1,
        recompute: Recompute::Full,
        ..Config::new(128, 1, 16, 1, 120)
    };
    assert_eq!(config.devices(), 2048);
    let plan = session.evaluate(&config).unwrap();
    assert!(
        plan.memory.peak_bytes < 80_000_000_000,
        "peak {}",
        plan.memory.peak_bytes
    );
    let e = plan.export(Engine::Megatron).unwrap();
    for option in [
        "--pipeline-model-parallel-size 16",
        "--tensor-model-parallel-size 1",
        "--expert-model-parallel-size 64",
        "--expert-tensor-parallel-size 1",
        "--use-distributed-optimizer",
        "--num-experts 256",
        "--moe-router-topk 8",
        "--multi-latent-attention",
        "--kv-lora-rank 512",
        "--moe-router-score-function sigmoid",
        "--moe-router-enable-expert-bias",
        "--moe-router-num-groups 8",
        "--moe-router-group-topk 4",
    ] {
        assert!(e.text.contains(option), "{option} missing from\n{}", e.text);
    }
    let back = parse(Engine::Megatron, &e.text, 2048).unwrap();
    assert_eq!(
        (back.dp, back.tp, back.pp, back.ep, back.etp),
        (128, 1, 16, 64, 1)
    );
    assert_eq!(back.zero, 1);
}
