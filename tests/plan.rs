//! Properties of `apar::plan` on random small graphs and clusters.

use apar::cluster::{Cluster, DeviceSpec, Link};
use apar::engine::Engine;
use apar::ir::{gen, Env, Phase};
use apar::lower::compile::{Compiler, ModelSource};
use apar::lower::schedule::Pass;
use apar::models::{build_forward_with, zoo, Attention, AttnImpl, HfArch, ModelCode};
use apar::search::{plan_with, SearchOptions};
use apar::train::{training_graph, TrainOptions};
use apar::{plan, plan_model, PlanError, PlanOptions};
use proptest::prelude::*;

fn cluster(per_node: u32, nodes: u32, memory_bytes: u64) -> Cluster {
    let mut c = Cluster::resolve("dgx-a100-80g:1").unwrap();
    c.name = format!("test:{per_node}x{nodes}");
    c.devices_per_node = per_node;
    c.nodes = nodes;
    c.device = DeviceSpec {
        memory_bytes,
        ..c.device.clone()
    };
    c.intra_node = Link {
        latency_s: 1e-6,
        ..c.intra_node.clone()
    };
    c
}

fn small_graph(seed: u64) -> apar::ir::Graph {
    let mut rng = gen::SplitMix64::new(seed);
    let opts = gen::GenOptions {
        max_layers: 3,
        max_units: 2,
        training: false,
        communication: false,
        arbitrary_floats: false,
    };
    gen::generate(&mut rng, &opts)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// A plan fits, uses every device, keeps the batch identity, runs each stage's
    /// passes after the stage they receive from, and conserves FLOPs.
    #[test]
    fn plans_are_consistent(seed in any::<u64>(), per_node in prop::sample::select(vec![1u32, 2, 4]),
                            nodes in 1u32..=2, batch_log in 0u32..=3, seq_log in 4u32..=6,
                            mem_log in 16u32..=30) {
        let g = small_graph(seed);
        let c = cluster(per_node, nodes, 1u64 << mem_log);
        let (batch, seq) = (1u64 << batch_log, 1u64 << seq_log);
        let compiler = Compiler::new(ModelSource::Graph(g.clone()), c.clone(), seq, batch, 0.8).unwrap();
        let r = plan_with(&compiler, &SearchOptions::default());
        match &r.best {
            None => {
                let any_fit = r.outcomes.iter().any(|o| matches!(o.outcome, apar::search::Outcome::Fits { .. }));
                prop_assert!(!any_fit);
            }
            Some(e) => {
                let cfg = e.config;
                prop_assert!(e.peak_bytes <= e.budget_bytes);
                prop_assert_eq!(cfg.devices(), c.devices());
                prop_assert_eq!(cfg.global_batch(), batch);
                let nvs = e.stages.len();
                for x in &e.sim.events {
                    let k = (x.chunk * cfg.pp + x.stage) as usize;
                    let pred = match x.pass {
                        Pass::F if k > 0 => Some((Pass::F, k - 1)),
                        Pass::B if k + 1 < nvs => Some((Pass::B, k + 1)),
                        _ => None,
                    };
                    if let Some((pass, kk)) = pred {
                        let sender = e.sim.events.iter().find(|y| y.pass == pass && y.micro_batch == x.micro_batch
                            && (y.chunk * cfg.pp + y.stage) as usize == kk);
                        prop_assert!(sender.is_some_and(|y| y.end <= x.start), "receive before send");
                    }
                }
                if cfg.tp == 1 {
                    let train = training_graph(&g, &TrainOptions::default()).unwrap();
                    let env = Env::new(u64::from(cfg.micro_batch), seq);
                    // Executed FLOPs: causal attention at its executed share.
                    let per_mb: f64 = train.ops()
                        .filter(|&o| train.node(o).phase != Phase::Opt)
                        .map(|o| {
                            let op = &train.node(o).op;
                            train.op_cost(o, env).unwrap().flops as f64
                                * apar::cost::executed_share(op)
                        })
                        .sum();
                    let total: f64 = e.sim.flops_per_device.iter().sum();
                    let want = per_mb * f64::from(cfg.num_micro_batches);
                    prop_assert!((total - want).abs() <= 1e-9 * want, "{total} vs {want}");
                }
            }
        }
    }
}

/// Same plan, byte for byte, with one thread and with two.
#[test]
fn plans_do_not_depend_on_the_thread_count() {
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let model = zoo::lookup("tiny-llama").unwrap();
            let c = Cluster::resolve("dgx-a100-40g:2").unwrap();
            let p = plan_model(&model, &c, &PlanOptions::new(256, 32)).unwrap();
            serde_json::to_string(&p.without_timings()).unwrap()
        })
    };
    assert_eq!(run(1), run(2));
}

/// Planning the built graph and planning the configuration (one-layer template)
/// choose the same configuration with the same step time.
///
/// Not for Megatron-LM and DeepSpeed here: their rules (layer placement, no
/// GPipe, no TP with pipelining) leave as fastest a tp 8 configuration that splits
/// tiny models' 4 attention heads, which only the configuration knows to refuse (an IR
/// graph carries no head count).
#[test]
fn graph_and_template_plans_agree() {
    for engine in [Engine::Torchtitan, Engine::Hf] {
        for name in ["tiny-gpt", "tiny-llama"] {
            graph_and_template_agree(name, engine);
        }
    }
}

fn graph_and_template_agree(name: &str, engine: Engine) {
    {
        let model = zoo::lookup(name).unwrap();
        // The graph is built as the engine's model code runs it: Hugging Face's
        // modules for the hf engine, torchtitan's eager Llama for a Llama layout under
        // torchtitan, the fused kernels otherwise.
        let llama = HfArch::infer(&model) == Some(HfArch::Llama);
        let code = match engine {
            Engine::Torchtitan if llama => ModelCode::Torchtitan,
            Engine::Hf => ModelCode::Transformers {
                arch: HfArch::infer(&model).unwrap(),
                attn: match model.attention {
                    Attention::Flash => AttnImpl::Sdpa,
                    Attention::Eager => AttnImpl::Eager,
                },
            },
            _ => ModelCode::Fused,
        };
        let graph = build_forward_with(&model, code).unwrap();
        let c = Cluster::resolve("dgx-a100-80g:1").unwrap();
        let mut opts = PlanOptions::new(128, 16);
        opts.engine = engine;
        let a = plan(&graph, &c, &opts).unwrap();
        let b = plan_model(&model, &c, &opts).unwrap();
        assert_eq!(a.config, b.config, "{name} {engine}");
        let (ta, tb) = (a.step_time_s, b.step_time_s);
        assert!((ta - tb).abs() <= 1e-9 * tb, "{name}: {ta} vs {tb}");
        assert_eq!(a.memory.peak_bytes, b.memory.peak_bytes, "{name}");
    }
}

#[test]
fn nothing_fits_is_a_typed_error() {
    let model = zoo::lookup("llama2-7b").unwrap();
    let c = cluster(1, 1, 1 << 30);
    match plan_model(&model, &c, &PlanOptions::new(1024, 1)) {
        Err(PlanError::OutOfMemory(r)) => {
            assert!(r.requested_bytes > r.available_bytes);
            assert_eq!(r.error, "out_of_memory");
        }
        other => panic!("expected out of memory, got {other:?}"),
    }
}

/// A plan survives JSON and the binary codec, and re-costing the saved configuration
/// gives the same step time.
#[test]
fn plans_serialize_and_recost() {
    let model = zoo::lookup("tiny-gpt").unwrap();
    let c = Cluster::resolve("dgx-a100-80g:1").unwrap();
    let p = plan_model(&model, &c, &PlanOptions::new(128, 16)).unwrap();
    let json = serde_json::to_string(&p).unwrap();
    let back: apar::Plan = serde_json::from_str(&json).unwrap();
    assert_eq!(back, p);
    let bytes = apar::ir::codec::encode(*b"PLAN", &p).unwrap();
    let back: apar::Plan = apar::ir::codec::decode(*b"PLAN", &bytes).unwrap();
    assert_eq!(back, p);
    assert!(apar::ir::codec::decode::<apar::Plan>(*b"APIR", &bytes).is_err());
    let compiler = Compiler::new(
        ModelSource::Config(model),
        back.cluster,
        back.seq,
        back.global_batch,
        back.memory_ratio,
    )
    .unwrap();
    let e = compiler.evaluate(&back.config).unwrap();
    assert_eq!(e.step_time_s, p.step_time_s);
}

/// A configuration with Megatron-LM's selective module set survives the binary codec
/// (the set is written as a list of known length).
#[test]
fn recompute_modules_survive_the_binary_codec() {
    use apar::passes::Config;
    let c = Config {
        recompute: apar::passes::Recompute::Selective,
        recompute_modules: Some("mlp".parse().unwrap()),
        ..Config::new(1, 1, 1, 1, 1)
    };
    let bytes = apar::ir::codec::encode(*b"PLAN", &c).unwrap();
    let back: Config = apar::ir::codec::decode(*b"PLAN", &bytes).unwrap();
    assert_eq!(back, c);
}
