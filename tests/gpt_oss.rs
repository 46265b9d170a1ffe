//! gpt-oss (OpenAI 2025; Hugging Face `modeling_gpt_oss.py`): parameter counts against
//! Hugging Face's, one layer's FLOPs from first principles, tensor parallelism checked
//! by the reference interpreter, the expert layout of its biases, and a plan.

use apar::engine::export::{export, parse, ExportError, ExportPlan, ParsedConfig};
use apar::engine::Engine;
use apar::ir::{json, text, verify, Block, Env, Graph, Op, OpClass};
use apar::models::{build_forward, hf, zoo, ModelConfig};
use apar::passes::expert::{self, ExpertLayout};
use apar::passes::{Config, Recompute, Schedule};
use apar::shard::{interp, shard_model, Layout, ModelCost, ShardOptions, Sharder};
use apar::train::{training_graph, TrainOptions};
use std::collections::BTreeMap;
use std::path::PathBuf;

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(rel)
}

/// `tests/data/hf_param_counts.json` (`scripts/count_hf_params.py`: the model built
/// by Hugging Face Transformers on the meta device; active = total less `(E − k)/E` of
/// the parameters named `.experts.`).
fn hf_counts(kind: &str) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(data("hf_param_counts.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(doc[kind].clone()).unwrap()
}

fn params_of(g: &Graph) -> u64 {
    let env = Env::new(1, 1);
    g.ops()
        .filter(|&o| matches!(g.op(o), Op::Param { .. }))
        .map(|o| g.ty(g.node(o).results[0]).shape.numel_at(env).unwrap())
        .sum()
}

#[test]
fn counts_equal_hugging_faces_and_the_zoo_is_the_config() {
    let (total, active) = (hf_counts("total_params"), hf_counts("active_params"));
    for (file, name) in [
        ("gpt-oss-20b.json", "gpt-oss-20b"),
        ("gpt-oss-120b.json", "gpt-oss-120b"),
    ] {
        let cfg = hf::load(&data(&format!("hf/{file}"))).unwrap();
        assert_eq!(cfg.param_count(), total[file], "{file}: total");
        assert_eq!(cfg.active_param_count(), active[file], "{file}: active");
        // The built graph holds exactly those parameters.
        assert_eq!(
            params_of(&build_forward(&cfg).unwrap()),
            total[file],
            "{file}"
        );
        let z = zoo::lookup(name).unwrap();
        assert_eq!(z.param_count(), total[file], "{name}");
        assert_eq!(z.active_param_count(), active[file], "{name}");
    }
}

/// What the config says, as `modeling_gpt_oss.py` reads it: sliding layers (window 128)
/// alternate with full ones starting with a sliding one, sinks and biases everywhere
/// but the head, 4 of 32 experts, untied head.
#[test]
fn the_config_reads_as_hugging_face_builds_it() {
    let cfg = zoo::lookup("gpt-oss-20b").unwrap();
    assert_eq!(cfg.layer_window(0), Some(128));
    assert_eq!(cfg.layer_window(1), None);
    assert_eq!(cfg.layer_window(22), Some(128));
    assert_eq!(cfg.layer_window(23), None);
    assert!(cfg.attn_sinks && cfg.qkv_bias && cfg.out_bias && !cfg.tied_embeddings);
    assert_eq!((cfg.heads, cfg.kv_heads, cfg.head_dim), (64, 8, 64));
    let m = cfg.moe.as_deref().unwrap();
    assert_eq!((m.experts, m.topk, m.expert_ffn), (32, 4, 2880));
    assert!(m.router_bias && m.expert_linear_bias && !m.pre_softmax);
    let c = m.clamped_swiglu.unwrap();
    assert_eq!((c.alpha, c.limit), (1.702, 7.0));
    // The 120b: 36 layers of 128 experts.
    let big = zoo::lookup("gpt-oss-120b").unwrap();
    assert_eq!((big.layers, big.moe.as_deref().unwrap().experts), (36, 128));
}

/// `Σ_{i<s} min(i+1, w)`, query by query: the keys a causal window-`w` query sees.
fn band(s: u64, w: u64) -> u64 {
    (0..s).map(|i| (i + 1).min(w)).sum()
}

/// One gpt-oss-20b layer's forward FLOPs at 4,096 tokens, from first principles:
///
/// * projections `2·T·h·(a·d)` (q), `2·T·h·(kv·d)` (k, v), `2·T·(a·d)·h` (o);
/// * router `2·T·h·E`; experts: each token's 4 experts, three `h×f` GEMMs, `6·k·T·h·f`
///   (E = 32 experts hold 32× the weights; only 4 run per token);
/// * the attention core, `QKᵀ` and `PV` at `2·a·d` per visible query/key pair each;
///   apar counts causal attention over the whole rectangle (`ir-spec` §7: `s·t`, the
///   time model runs half), so a full layer is `4·a·d·s²` and a sliding layer
///   `4·a·d·2·Σ min(i+1, 128)`;
/// * the sinks add work per query row and head only, `O(a·s)`, not `O(s²)`.
#[test]
fn one_layer_flops_from_first_principles() {
    let mut cfg = zoo::lookup("gpt-oss-20b").unwrap();
    cfg.layers = 2; // layer 0 sliding, layer 1 full
    let g = build_forward(&cfg).unwrap();
    let s = 4096u64;
    let env = Env::new(1, s);
    let (h, a, kv, d) = (2880u64, 64u64, 8u64, 64u64);
    let (e, k, f) = (32u64, 4u64, 2880u64);
    let gemms = 2 * s * h * (a * d) + 2 * 2 * s * h * (kv * d) + 2 * s * (a * d) * h;
    let router = 2 * s * h * e;
    let experts = 6 * k * s * h * f;
    for (layer, pairs) in [(0, 2 * band(s, 128)), (1, s * s)] {
        let (mut matmul, mut core) = (0u64, 0u64);
        let mut rows = 0;
        for o in g.ops().filter(|&o| g.node(o).block == Block::Layer(layer)) {
            let node = g.node(o);
            let ins: Vec<_> = node.inputs.iter().map(|&t| g.ty(t)).collect();
            let outs: Vec<_> = node.results.iter().map(|&t| g.ty(t)).collect();
            let flops = g.op(o).cost(&ins, &outs, env).unwrap().flops;
            match g.op(o).info().class {
                OpClass::MatMul => matmul += flops,
                OpClass::Attention => core += flops,
                _ => {}
            }
            if let Op::MoeDispatch { .. } = g.op(o) {
                rows = outs[0].shape.dims()[0].eval_ceil(env).unwrap();
            }
        }
        assert_eq!(rows, k * s, "layer {layer}: k rows per token");
        assert_eq!(matmul, gemms + router + experts, "layer {layer}");
        let dense_core = 4 * a * d * pairs;
        assert!(core > dense_core, "layer {layer}: the sinks add work");
        assert!(
            core - dense_core <= 4 * a * s,
            "layer {layer}: sinks are O(a·s): {}",
            core - dense_core
        );
    }
    // The window: a sliding layer's core is 2·(128·129/2 + 3968·128)/4096² of a full one.
    assert_eq!(2 * band(s, 128), 128 * 129 + 2 * (s - 128) * 128);
}

/// A tiny gpt-oss: the 20b's structure (sinks, biases, alternating window, 4 of 8
/// experts with biases and the clamped SwiGLU) at sizes the interpreter runs.
fn tiny() -> ModelConfig {
    let mut cfg = zoo::lookup("gpt-oss-20b").unwrap();
    cfg.name = "tiny-gpt-oss".into();
    cfg.layers = 2;
    cfg.hidden = 64;
    cfg.heads = 4;
    cfg.kv_heads = 2;
    cfg.head_dim = 16;
    cfg.ffn = 32;
    cfg.vocab = 256;
    cfg.sliding_window = Some(4);
    cfg.position = apar::models::Position::Rotary {
        dims: 16,
        theta: 150_000.0,
    };
    if let Some(m) = cfg.moe.as_deref_mut() {
        m.experts = 8;
        m.expert_ffn = 32;
    }
    cfg
}

/// The interpreter does not run routing (`interp`: values decide the routes), so the
/// tensor-parallel check runs gpt-oss's attention half — sinks split with the heads,
/// biases, the alternating window, GQA — with a dense SwiGLU in place of the experts
/// (whose layout the expert pass sets; see the next test). Loss and every gradient,
/// the sinks' included, agree with the unsharded step.
#[test]
fn tensor_parallel_attention_with_sinks_agrees_with_the_interpreter() {
    let mut cfg = tiny();
    cfg.moe = None;
    let fwd = build_forward(&cfg).unwrap();
    let mut cluster = apar::cluster::Cluster::resolve("dgx-a100-80g:1").unwrap();
    // Compute-bound, so that tiny shapes shard as large ones do.
    cluster.device.peak_bf16_flops = 1e9;
    cluster.device.peak_fp32_flops = 1e9;
    cluster.device.memory_bandwidth = 1e9;
    cluster.intra_node.bandwidth = 1e12;
    cluster.intra_node.latency_s = 1e-6;
    let model = apar::cost::CostModel::new(cluster);
    let env = Env::new(2, 8);
    for tp in [2, 4] {
        for sp in [false, true] {
            let cost = ModelCost::tensor_parallel(&model, tp);
            let opts = ShardOptions {
                env,
                ..ShardOptions::new(tp, sp)
            };
            let m = Sharder::with_cost(opts, &cost).shard_model(&fwd).unwrap();
            let c = interp::compare(&fwd, &m, env, 11).unwrap();
            let label = format!("tp {tp} sp {sp}: {c:?}");
            assert!(c.params > 0 && c.loss_error < 1e-4, "{label}");
            assert!(c.grad_error < 1e-4 && c.replica_error < 1e-4, "{label}");
            for layer in 0..2 {
                let sinks = m
                    .graph
                    .find_source(&format!("layers.{layer}.attn.sinks"))
                    .unwrap();
                let t = m.graph.node(sinks).results[0];
                assert_eq!(m.layouts[t.index()].layout, Layout::split(0), "{label}");
            }
        }
    }
}

/// With experts: the sharded step verifies and derives; expert parallelism gives each
/// rank `E/ep` experts' biases (and `f/etp` channels of the gate/up biases); a bias
/// after the row-split down GEMM is refused with expert tensor parallelism (its
/// partial sums would each add it; Megatron-LM allows MoE biases at etp 1 only).
#[test]
fn expert_biases_follow_the_expert_weights() {
    let cfg = tiny();
    let fwd = build_forward(&cfg).unwrap();
    let m = shard_model(&fwd, &ShardOptions::new(2, true)).unwrap();
    verify(&m.graph).unwrap();
    let g = expert::apply(
        &m.graph,
        ExpertLayout {
            tp: 2,
            ep: 2,
            etp: 1,
        },
    )
    .unwrap();
    verify(&g).unwrap();
    let shape = |g: &Graph, name: &str| {
        let o = g.find_source(name).unwrap();
        g.ty(g.node(o).results[0]).shape.to_string()
    };
    assert_eq!(shape(&g, "layers.0.mlp.experts.gate.bias"), "[4,32]");
    assert_eq!(shape(&g, "layers.0.mlp.experts.down.bias"), "[4,64]");
    assert_eq!(shape(&g, "layers.0.mlp.experts.down.weight"), "[4,32,64]");
    let names = expert::expert_param_names(&g);
    assert!(names.contains("layers.1.mlp.experts.up.bias"), "{names:?}");
    let train = training_graph(&g, &TrainOptions::default()).unwrap();
    verify(&train).unwrap();
    let err = expert::apply(
        &m.graph,
        ExpertLayout {
            tp: 2,
            ep: 1,
            etp: 2,
        },
    )
    .unwrap_err();
    assert!(err.reason.contains("etp"), "{err}");
}

/// The printer/parser law and JSON on a graph with the new ops and attributes
/// (`flash_attention … sinks=true`, `clamp` with a negative bound, `grouped_bias_add`
/// and their gradients).
#[test]
fn text_and_json_round_trip_the_training_graph() {
    let fwd = build_forward(&tiny()).unwrap();
    let g = training_graph(&fwd, &TrainOptions::default()).unwrap();
    verify(&g).unwrap();
    let names: Vec<&str> = g.ops().map(|o| g.op(o).name()).collect();
    for op in [
        "clamp",
        "clamp_grad",
        "grouped_bias_add",
        "grouped_bias_add_grad",
        "flash_attention_grad",
    ] {
        assert!(names.contains(&op), "{op}");
    }
    let printed = text::print(&g);
    assert!(printed.contains("sinks=true"), "sinks printed");
    assert!(printed.contains("min=-7.0"), "the up clamp's lower bound");
    assert_eq!(text::parse(&printed).unwrap(), g);
    assert_eq!(json::from_json(&json::to_json(&g)).unwrap(), g);
}

/// `apar plan --model gpt-oss-20b --cluster dgx-h100:1` finds a plan (one DGX H100,
/// 8 GPUs).
#[test]
fn a_plan_on_one_dgx_h100() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_apar"))
        .args(["plan", "--model", "gpt-oss-20b", "--cluster", "dgx-h100:1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("configuration: dp"), "{stdout}");
    assert!(stdout.contains("step time"), "{stdout}");
}

/// Megatron-LM `d98e8a6` has gpt-oss's options (`examples/gptoss/02_train.sh`): the
/// export writes them and reads the plan back; MoE biases need expert tensor
/// parallelism 1 there, and the other engines refuse the experts with a typed reason.
#[test]
fn megatron_writes_gpt_oss_and_the_others_refuse() {
    let cfg = zoo::lookup("gpt-oss-20b").unwrap();
    let config = |etp: u32| Config {
        dp: 2,
        tp: 4,
        pp: 1,
        cp: 1,
        ep: 2,
        etp,
        micro_batch: 1,
        num_micro_batches: 4,
        sp: true,
        recompute: Recompute::None,
        recompute_layers: None,
        recompute_modules: None,
        zero: 1,
        low_prec_shard: false,
        schedule: Schedule::OneFOneB,
    };
    let plan = ExportPlan::with_layers(config(1), Some(cfg.clone()), 4096, &[24]);
    let e = export(Engine::Megatron, &plan).unwrap();
    for option in [
        "--softmax-type learnable",
        "--window-size 127,0",
        "--window-attn-skip-freq 2",
        "--quick-geglu",
        "--glu-linear-offset 1",
        "--activation-func-clamp-value 7",
        "--num-experts 32",
        "--moe-router-topk 4",
        "--attention-backend fused",
        "--expert-model-parallel-size 2",
    ] {
        assert!(e.text.contains(option), "{option}:\n{}", e.text);
    }
    // Biases everywhere (Megatron-LM's default `--add-bias-linear`), no plain SwiGLU.
    assert!(!e.text.contains("--disable-bias-linear") && !e.text.contains("--swiglu"));
    let back = parse(Engine::Megatron, &e.text, plan.config.devices()).unwrap();
    assert_eq!(back, ParsedConfig::of(&plan));
    let plan = ExportPlan::with_layers(config(4), Some(cfg), 4096, &[24]);
    match export(Engine::Megatron, &plan) {
        Err(ExportError::Unsupported { missing, .. }) => {
            assert!(
                missing.contains("expert-tensor-parallel-size 1"),
                "{missing}"
            )
        }
        other => panic!("{other:?}"),
    }
    for engine in [Engine::DeepSpeed, Engine::Torchtitan, Engine::Hf] {
        match export(engine, &plan) {
            Err(ExportError::MixtureOfExperts { .. }) => {}
            other => panic!("{engine}: {other:?}"),
        }
    }
}

/// The `hf` engine runs Hugging Face's modeling code, whose gpt-oss attention is eager
/// or a kernels-hub flash kernel (`_supports_sdpa = False`): apar refuses to price it
/// as anything else, with a typed reason.
#[test]
fn the_hf_engine_is_refused_with_its_reason() {
    let cfg = zoo::lookup("gpt-oss-20b").unwrap();
    let cluster = apar::cluster::Cluster::resolve("dgx-h100:1").unwrap();
    let mut options = apar::PlanOptions::new(1024, 64);
    options.engine = Engine::Hf;
    match apar::plan_model(&cfg, &cluster, &options) {
        Err(apar::PlanError::Model(apar::models::ModelError::Invalid { field, .. })) => {
            assert_eq!(field, "attn_sinks")
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}
