//! The library owns the flow: the CLI's JSON is the library's `Plan`, errors are typed
//! and name their cause, runners-up and the closest out-of-memory candidate are the
//! true ones, and warnings reach the plan.

use apar::cluster::Cluster;
use apar::engine::Engine;
use apar::ir::{Block, DType, Dim, GraphBuilder, Op, Phase, TensorType};
use apar::models::hf::IgnoredKind;
use apar::models::zoo;
use apar::search::SearchOptions;
use apar::{EmptySpace, ModelSpec, PlanError, PlanOptions, Session, Warning};
use std::process::Command;

mod common;
use common::apar;

fn options(seq: u64, batch: u64, f: impl FnOnce(&mut SearchOptions)) -> PlanOptions {
    let mut o = PlanOptions::new(seq, batch);
    f(&mut o.search);
    o
}

#[test]
fn plan_json_is_the_library_plan() {
    let (code, out, err) = apar(&[
        "plan",
        "--model",
        "tiny-llama",
        "--cluster",
        "dgx-a100-40g:2",
        "--global-batch",
        "32",
        "--seq",
        "256",
        "--json",
        "--no-timings",
    ]);
    assert_eq!(code, 0, "{err}");
    let cluster = Cluster::resolve("dgx-a100-40g:2").unwrap();
    let plan = Session::for_spec(
        &ModelSpec::parse("tiny-llama"),
        &cluster,
        &PlanOptions::new(256, 32),
    )
    .unwrap()
    .plan()
    .unwrap()
    .without_timings();
    assert_eq!(out.trim_end(), serde_json::to_string(&plan).unwrap());
    // The document round-trips into the same plan.
    let back: apar::Plan = serde_json::from_str(&out).unwrap();
    assert_eq!(back, plan);
}

#[test]
fn a_saved_plan_records_its_model_and_recosts() {
    let dir = std::env::temp_dir().join(format!("apar-flow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let saved = dir.join("plan.json");
    let (code, _, err) = apar(&[
        "plan",
        "--model",
        "tiny-gpt",
        "--layers",
        "3",
        "--attention",
        "eager",
        "--cluster",
        "dgx-a100-80g:1",
        "--global-batch",
        "16",
        "--seq",
        "128",
        "--save",
        saved.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let plan = Session::read_plan(&saved).unwrap();
    assert_eq!(plan.model.layers, Some(3));
    assert_eq!(plan.model.attention, Some(apar::models::Attention::Eager));
    assert_eq!(plan.model_config.as_ref().unwrap().layers, 3);
    let again = Session::recost(&plan).unwrap();
    assert_eq!(again.step_time_s, plan.step_time_s);
    // A plan whose model file is gone names the file.
    let mut moved = plan.clone();
    moved.model = ModelSpec::parse(dir.join("gone/config.json").to_str().unwrap());
    let err = Session::recost(&moved).unwrap_err();
    assert!(matches!(err, PlanError::Model(_)), "{err:?}");
    assert!(err.to_string().contains("gone"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_empty_space_names_its_cause() {
    let model = zoo::lookup("tiny-gpt").unwrap();
    let node = Cluster::resolve("dgx-a100-80g:1").unwrap();
    // tp must divide the node's 8 devices.
    let e = Session::for_config(
        &model,
        &node,
        &options(128, 16, |s| s.constraints.tp = Some(3)),
    )
    .unwrap()
    .plan()
    .unwrap_err();
    match &e {
        PlanError::EmptySpace(EmptySpace::Pin { pin, value, .. }) => {
            assert_eq!((*pin, value.as_str()), ("tp", "3"));
        }
        other => panic!("{other:?}"),
    }
    // tp 8 and pp 4 each exist on 8 devices, but not together: torchtitan and
    // Megatron-LM (`--pipeline-model-parallel-layout`: the embedding alone, a layer, a
    // layer, the loss alone) both place tiny-gpt's 2 layers on 4 stages, so the pair is
    // what empties the space.
    let mut both = options(128, 16, |s| {
        s.constraints.tp = Some(8);
        s.constraints.pp = Some(4);
    });
    for engine in [Engine::Torchtitan, Engine::Megatron] {
        both.engine = engine;
        let e = Session::for_config(&model, &node, &both)
            .unwrap()
            .plan()
            .unwrap_err();
        assert!(
            matches!(&e, PlanError::EmptySpace(EmptySpace::Pins { pins }) if pins == &["tp", "pp"]),
            "{engine}: {e:?}"
        );
    }
    // Hugging Face + FSDP has no pipeline parallelism: pp 4 alone empties its space,
    // and the error says so.
    both.engine = Engine::Hf;
    both.search.constraints.tp = None;
    let e = Session::for_config(&model, &node, &both)
        .unwrap()
        .plan()
        .unwrap_err();
    assert!(
        matches!(
            &e,
            PlanError::EmptySpace(EmptySpace::Engine {
                engine: Engine::Hf,
                pins,
                ..
            }) if pins == &[("pp", "4".to_string())]
        ),
        "{e:?}"
    );
    // Without pins: 64 devices, at most 8-way tp and 4 stages (tiny-gpt has 4 blocks),
    // so dp ≥ 2, and no even dp divides a global batch of 3.
    let big = Cluster::resolve("dgx-a100-80g:8").unwrap();
    let e = Session::for_config(&model, &big, &PlanOptions::new(128, 3))
        .unwrap()
        .plan()
        .unwrap_err();
    assert!(
        matches!(
            e,
            PlanError::EmptySpace(EmptySpace::NoLayout { devices: 64, .. })
        ),
        "{e:?}"
    );
}

#[test]
fn a_graph_without_a_loss_is_refused_with_the_reason() {
    let mut b = GraphBuilder::new("no-loss");
    b.set_phase(Phase::Fwd);
    b.set_block(Block::Embed);
    let x = b.input(
        "x",
        TensorType::new(DType::Bf16, [Dim::batch(), Dim::seq(), Dim::lit(64)]),
    );
    let w = b.param(
        "w",
        TensorType::new(DType::Bf16, [Dim::lit(64), Dim::lit(64)]),
    );
    b.add1(
        Op::MatMul {
            ta: false,
            tb: false,
        },
        &[x, w],
    )
    .unwrap();
    let g = b.finish();
    let cluster = Cluster::resolve("dgx-a100-80g:1").unwrap();
    let e = apar::plan(&g, &cluster, &PlanOptions::new(64, 8)).unwrap_err();
    match &e {
        PlanError::NothingCompiled {
            count, candidates, ..
        } => assert_eq!(count, candidates),
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("loss"), "{e}");
}

/// The step-time shortcut must not change the runners-up, and the memory shortcut
/// must not change the closest out-of-memory candidate.
#[test]
fn runners_up_and_closest_are_the_true_ones() {
    let model = zoo::lookup("llama2-13b").unwrap();
    let cluster = Cluster::resolve("moai-4xlarge").unwrap();
    let run = |exhaustive| {
        Session::for_config(
            &model,
            &cluster,
            &options(1024, 64, |s| s.exhaustive = exhaustive),
        )
        .unwrap()
        .plan()
        .unwrap()
    };
    let (fast, full) = (run(false), run(true));
    assert!(
        fast.search.unwrap().pruned > 0,
        "the shortcut pruned nothing"
    );
    assert_eq!(fast.config, full.config);
    let configs = |p: &apar::Plan| p.runners_up.iter().map(|r| r.config).collect::<Vec<_>>();
    assert_eq!(configs(&fast), configs(&full));

    // Nothing fits in 24 GiB per device; the closest candidate is the same either way.
    let mut small = Cluster::resolve("dgx-a100-80g:1").unwrap();
    small.device.memory_bytes = 24 << 30;
    small.usable_memory_bytes = None;
    let oom = |exhaustive| match Session::for_config(
        &model,
        &small,
        &options(4096, 64, |s| s.exhaustive = exhaustive),
    )
    .unwrap()
    .plan()
    {
        Err(PlanError::OutOfMemory(r)) => r,
        other => panic!("{other:?}"),
    };
    let (fast, full) = (oom(false), oom(true));
    assert_eq!(fast.requested_bytes, full.requested_bytes);
    assert_eq!(fast.config, full.config);
}

/// Megatron-LM pads GPT-2's 50,257-token vocabulary to a multiple of 128 · tp and
/// splits the padded embedding and output layer over the tensor-parallel ranks
/// (`_vocab_size_with_padding`): at tp 4, 50,688 rows, 12,672 per rank; no block stays
/// whole. The other engines build the model's own 50,257 rows.
#[test]
fn megatron_plans_its_padded_vocabulary_split() {
    let gpt2 = zoo::lookup("gpt2-large").unwrap();
    let cluster = Cluster::resolve("dgx-a100-80g:1").unwrap();
    let session = |engine| {
        let mut o = options(1024, 64, |s| {
            s.constraints.tp = Some(4);
            s.constraints.dp = Some(2);
        });
        o.engine = engine;
        Session::for_config(&gpt2, &cluster, &o).unwrap()
    };
    let plan = session(Engine::Megatron).plan().unwrap();
    assert!(
        plan.warnings.contains(&Warning::VocabPadded {
            vocab: 50257,
            padded: 50688
        }),
        "{:?}",
        plan.warnings
    );
    assert!(
        !plan
            .warnings
            .iter()
            .any(|w| matches!(w, Warning::BlockReplicated { .. })),
        "{:?}",
        plan.warnings
    );
    let rows = |plan: &apar::Plan| {
        plan.tensors
            .iter()
            .find(|t| {
                t.kind == apar::TensorKind::Param
                    && t.global_shape.contains(&1280)
                    && t.global_shape.iter().any(|&d| d > 50000)
            })
            .map(|t| (t.global_shape.clone(), t.local_shape.clone()))
            .unwrap()
    };
    let (global, local) = rows(&plan);
    assert!(
        global.contains(&50688) && local.contains(&12672),
        "{global:?} {local:?}"
    );
    // At tp 1 too the plan's tensors are the padded rows its memory holds.
    let tp1 = Session::for_config(
        &gpt2,
        &cluster,
        &options(1024, 64, |s| s.constraints.tp = Some(1)),
    )
    .unwrap()
    .plan()
    .unwrap();
    let (global, local) = rows(&tp1);
    assert!(
        global.contains(&50304) && local.contains(&50304),
        "{global:?} {local:?}"
    );
    let titan = session(Engine::Torchtitan).plan().unwrap();
    let (global, _) = rows(&titan);
    assert!(global.contains(&50257), "{global:?}");
}

#[test]
fn warnings_reach_the_plan() {
    // GPT-2's 50,257-token vocabulary is padded by Megatron-LM to 50,304 rows (a
    // multiple of 128), the padded size quoted by Megatron-LM's and nanoGPT's GPT-2
    // recipes.
    let gpt2 = zoo::lookup("gpt2").unwrap();
    let cluster = Cluster::resolve("dgx-a100-80g:1").unwrap();
    let plan = Session::for_config(
        &gpt2,
        &cluster,
        &options(1024, 32, |s| s.constraints.tp = Some(1)),
    )
    .unwrap()
    .plan()
    .unwrap();
    assert!(
        plan.warnings.contains(&Warning::VocabPadded {
            vocab: 50257,
            padded: 50304
        }),
        "{:?}",
        plan.warnings
    );
    // A graph whose ops all sit in one block cannot be cut into pipeline stages.
    let mut b = GraphBuilder::new("one-block");
    b.set_phase(Phase::Fwd);
    b.set_block(Block::Embed);
    let ids = b.input(
        "ids",
        TensorType::new(DType::I64, [Dim::batch(), Dim::seq()]),
    );
    let table = b.param(
        "table",
        TensorType::new(DType::Bf16, [Dim::lit(128), Dim::lit(64)]),
    );
    let x = b.add1(Op::Embedding, &[table, ids]).unwrap();
    let out = b.param(
        "out",
        TensorType::new(DType::Bf16, [Dim::lit(64), Dim::lit(128)]),
    );
    let logits = b
        .add1(
            Op::MatMul {
                ta: false,
                tb: false,
            },
            &[x, out],
        )
        .unwrap();
    b.add1(Op::CrossEntropy, &[logits, ids]).unwrap();
    let g = b.finish();
    let session = Session::for_graph(&g, &cluster, &PlanOptions::new(64, 8)).unwrap();
    assert!(session
        .warnings()
        .contains(&Warning::FewBlocks { blocks: 1 }));
    let plan = session.plan().unwrap();
    assert_eq!(plan.config.pp, 1);
    assert!(plan.warnings.contains(&Warning::FewBlocks { blocks: 1 }));
    // The CLI prints them.
    let (code, out, _) = apar(&[
        "plan",
        "--model",
        "gpt2",
        "--cluster",
        "dgx-a100-80g:1",
        "--global-batch",
        "32",
        "--seq",
        "1024",
        "--tp",
        "1",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("warning: Megatron-LM pads the vocabulary from 50257 to 50304"),
        "{out}"
    );
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    let bin = env!("CARGO_BIN_EXE_apar");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{bin}' ir --model llama2-7b --train | head -c 10 >/dev/null"
        ))
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    if std::path::Path::new("/dev/full").exists() {
        let out = Command::new(bin)
            .args(["models"])
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot write the output"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// Plans `config.json` text (written to a temporary file) at `seq` on one DGX A100 and
/// returns the session's model warnings.
fn config_warnings(name: &str, text: &str, seq: u64) -> Vec<Warning> {
    let dir = std::env::temp_dir().join(format!("apar-flow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, text).unwrap();
    let spec = ModelSpec::parse(path.to_str().unwrap());
    let cluster = Cluster::resolve("dgx-a100-80g:1").unwrap();
    Session::for_spec(&spec, &cluster, &PlanOptions::new(seq, 8))
        .unwrap()
        .warnings()
        .to_vec()
}

#[test]
fn ignored_config_keys_and_positions_are_reported() {
    // Mistral-7B-v0.1's config.json (Hugging Face hub): a 4,096-token sliding window
    // and 32,768 positions.
    let mistral = include_str!("data/hf/mistral-7b.json");
    let window = Warning::SlidingWindowIgnored {
        window: 4096,
        seq: 8192,
    };
    assert!(config_warnings("mistral", mistral, 8192).contains(&window));
    // Within the window nothing is lost.
    assert!(config_warnings("mistral", mistral, 4096).is_empty());
    // Qwen2-7B ships `sliding_window` with `use_sliding_window: false`: off.
    let qwen = include_str!("data/hf/qwen2-7b.json");
    assert!(config_warnings("qwen2", qwen, 8192).is_empty());
    // Llama-2-7B was trained for 4,096 positions (its config.json); rotary positions
    // run beyond them, with a warning.
    let llama = include_str!("data/hf/llama-2-7b.json");
    assert_eq!(
        config_warnings("llama", llama, 8192),
        vec![Warning::SequenceBeyondTrained {
            seq: 8192,
            trained_positions: 4096
        }]
    );
    // Expert keys on a dense architecture, and a key nobody reads.
    let mut v: serde_json::Value = serde_json::from_str(llama).unwrap();
    v["router_aux_loss_coef"] = 0.02.into();
    v["num_experts_per_tok"] = 2.into();
    v["attn_logit_softcapping"] = 50.0.into();
    let w = config_warnings("llama-moe", &v.to_string(), 2048);
    assert_eq!(
        w,
        vec![
            Warning::ConfigKeysIgnored {
                kind: IgnoredKind::MoeOnDense,
                keys: vec!["num_experts_per_tok".into(), "router_aux_loss_coef".into()],
            },
            Warning::ConfigKeysIgnored {
                kind: IgnoredKind::Unknown,
                keys: vec!["attn_logit_softcapping".into()],
            },
        ]
    );
}

#[test]
fn sharding_is_priced_at_the_jobs_sequence() {
    // The tensor-parallel split is chosen by its price at the job's sequence length, so
    // the priced cost of a layer grows with the sequence (a fixed pricing binding
    // would price both jobs the same).
    use apar::lower::compile::{Compiler, ModelSource};
    let cluster = Cluster::resolve("dgx-a100-80g:1").unwrap();
    let price = |seq: u64| {
        let c = Compiler::new(
            ModelSource::Config(zoo::lookup("tiny-llama").unwrap()),
            cluster.clone(),
            seq,
            8,
            1.0,
        )
        .unwrap();
        let config = apar::passes::Config::new(4, 2, 1, 1, 2);
        let program = c.device_program(&config).unwrap();
        let sharded = program.sharded.expect("tp 2 shards");
        sharded.templates[0].report.cost_ps
    };
    let (short, long) = (price(128), price(1024));
    assert!(long > short, "{short} ps at 128 tokens, {long} ps at 1024");
}

/// The `hf` engine compiles Hugging Face Transformers' model code: the architecture
/// from the config.json's `model_type` or from the layout, and a layout that does not
/// say which code runs it is refused with what to give instead.
#[test]
fn the_hf_engine_runs_transformers_code() {
    use apar::engine::Engine;
    use apar::models::{AttnImpl, HfArch, ModelCode};
    let cluster = Cluster::resolve("dgx-a100-80g:1").unwrap();
    let mut options = PlanOptions::new(1024, 16);
    options.engine = Engine::Hf;
    let llama =
        Session::for_config(&zoo::lookup("llama2-7b").unwrap(), &cluster, &options).unwrap();
    assert_eq!(
        llama.compiler().model_code,
        ModelCode::Transformers {
            arch: HfArch::Llama,
            attn: AttnImpl::Sdpa
        }
    );
    // GPT-NeoX-20B's config.json names its code; the same configuration without the
    // file does not (LayerNorm with rotary positions is NeoX's layout and Falcon's).
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/hf/gpt-neox-20b.json"
    );
    let neox = Session::for_spec(&ModelSpec::parse(path), &cluster, &options).unwrap();
    assert!(matches!(
        neox.compiler().model_code,
        ModelCode::Transformers {
            arch: HfArch::GptNeox,
            ..
        }
    ));
    let cfg = neox.model_config().unwrap().clone();
    assert!(matches!(
        Session::for_config(&cfg, &cluster, &options),
        Err(PlanError::NoHfArchitecture(_))
    ));
    // BLOOM's config.json names code apar does not model: the refusal says so.
    let bloom = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/hf/bloom-560m.json");
    match Session::for_spec(&ModelSpec::parse(bloom), &cluster, &options) {
        Err(e @ PlanError::HfCodeNotModelled { .. }) => {
            assert!(e.to_string().contains("`bloom` model code"), "{e}");
        }
        other => panic!("expected HfCodeNotModelled, got {:?}", other.err()),
    }
    // Layouts close to Llama's whose own code differs (OLMo 2's post-norms and
    // query/key norms, Qwen3's per-head norms, Phi-3's fused projections) are refused by
    // their model_type, not priced as Llama's code; without the file, a configuration
    // with such features infers no architecture.
    for (file, model_type) in [
        ("olmo-2-1124-7b.json", "olmo2"),
        ("qwen3-8b.json", "qwen3"),
        ("phi-3-mini-4k.json", "phi3"),
    ] {
        let p = format!("{}/tests/data/hf/{file}", env!("CARGO_MANIFEST_DIR"));
        match Session::for_spec(&ModelSpec::parse(&p), &cluster, &options) {
            Err(e @ PlanError::HfCodeNotModelled { .. }) => {
                assert!(e.to_string().contains(&format!("`{model_type}`")), "{e}");
            }
            other => panic!("{file}: expected HfCodeNotModelled, got {:?}", other.err()),
        }
    }
    let qwen3 = apar::models::hf::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/hf/qwen3-8b.json"
    )))
    .unwrap();
    assert!(matches!(
        Session::for_config(&qwen3, &cluster, &options),
        Err(PlanError::NoHfArchitecture(_))
    ));
    // Other engines run the fused kernels.
    options.engine = Engine::Megatron;
    let fused = Session::for_spec(&ModelSpec::parse(path), &cluster, &options).unwrap();
    assert_eq!(fused.compiler().model_code, ModelCode::Fused);
}

/// A block is reported as not split at tp > 1 only when no parameter it reads is split:
/// a head tied to the embedding reads the embedding's vocabulary-split weight (its own
/// parameters are only the final norm's), so Megatron's GPT 1.7B head is split at tp 8;
/// GPT-2's 50,257-token vocabulary divides by no tp, so under an engine that builds it
/// unpadded (torchtitan) its embedding and head stay whole and both are reported, while
/// Megatron-LM pads it to 50,688 rows and splits them.
#[test]
fn a_tied_head_reading_a_split_embedding_is_not_reported_whole() {
    let cluster = Cluster::resolve("dgx-a100-80g:1").unwrap();
    let replicated = |model: &str, tp: u32, engine: Engine| -> Vec<String> {
        let m = zoo::lookup(model).unwrap();
        let mut o = options(1024, 8, |_| {});
        o.engine = engine;
        let session = Session::for_config(&m, &cluster, &o).unwrap();
        let config = apar::passes::Config::new(8 / tp, tp, 1, 1, tp);
        let plan = session.evaluate(&config).unwrap();
        plan.warnings
            .iter()
            .filter_map(|w| match w {
                Warning::BlockReplicated { block, .. } => Some(block.clone()),
                _ => None,
            })
            .collect()
    };
    assert!(zoo::lookup("megatron-1.7b").unwrap().tied_embeddings);
    assert_eq!(
        replicated("megatron-1.7b", 8, Engine::Megatron),
        Vec::<String>::new()
    );
    assert_eq!(
        replicated("gpt2", 4, Engine::Torchtitan),
        vec!["embed", "head"]
    );
    assert_eq!(
        replicated("gpt2", 4, Engine::Megatron),
        Vec::<String>::new()
    );
}
