//! Bad input never crashes, hangs or lies (issue 8, item 6): every case answers quickly
//! with exit 2 and a message that names the problem.

use apar::cluster::Cluster;
use apar::lower::compile::{CompileError, Compiler, ModelSource, MAX_PIPELINE_UNITS};
use apar::passes::candidates::{enumerate, Constraints};
use apar::passes::{Config, Recompute, Schedule};
use std::time::{Duration, Instant};

mod common;
use common::apar;

/// Asserts exit 2, no panic, and a message containing every needle.
fn refused(args: &[&str], needles: &[&str]) {
    let (code, out, err) = apar(args);
    assert_eq!(code, 2, "{args:?}: {out}{err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: `{n}` not in {err}");
    }
}

fn dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("apar-robust-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(name: &str, text: &str) -> String {
    let p = dir().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

const TINY: [&str; 6] = [
    "--model",
    "tiny-gpt",
    "--cluster",
    "dgx-a100-80g:1",
    "--seq",
    "128",
];

// ---- 1. huge and prime global batches, huge micro-batch counts ----

#[test]
fn huge_or_prime_global_batches_answer_at_once() {
    for gb in ["18446744073709551615", "2305843009213693951"] {
        let mut args = vec!["plan", "--global-batch", gb];
        args.extend(TINY);
        refused(&args, &["tokens per step"]);
    }
}

#[test]
fn candidate_enumeration_is_bounded_on_any_batch() {
    // Trial division to √n would take minutes (or never end: `i * i` overflows).
    for gb in [u64::MAX, 2_305_843_009_213_693_951, (1 << 40) - 1] {
        let start = Instant::now();
        let all = enumerate(8, 8, gb, 1024, 10, &Constraints::default());
        assert!(start.elapsed() < Duration::from_secs(10), "{gb}");
        for c in &all {
            assert_eq!(c.global_batch(), gb);
            assert!(u64::from(c.pp) * u64::from(c.num_micro_batches) <= MAX_PIPELINE_UNITS);
        }
    }
    // The bound keeps the small splits: 2^40 - 1 = 3 · 5² · 11 · 17 · 31 · 41 · 61681.
    let some = enumerate(1, 1, (1 << 40) - 1, 1024, 10, &Constraints::default());
    assert!(some.iter().any(|c| c.num_micro_batches == 3 * 25 * 11 * 17));
}

#[test]
fn a_huge_micro_batch_count_is_refused_not_simulated() {
    // dp 8, micro-batch 1: 2^24 micro-batches per replica, 16× the limit (the
    // simulation would have asked for gigabytes).
    let gb = (8u64 << 24).to_string();
    let mut args = vec!["eval", "--global-batch", &gb, "--dp", "8"];
    args.extend(TINY);
    refused(&args, &["16777216", "simulation limit", "1048576"]);
}

// ---- 2. physically absurd cluster numbers ----

/// An edit of a JSON document.
type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;

fn cluster_json(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let c = Cluster::resolve("dgx-a100-80g:1").unwrap();
    let mut v = serde_json::to_value(&c).unwrap();
    edit(&mut v);
    serde_json::to_string_pretty(&v).unwrap()
}

#[test]
fn absurd_cluster_numbers_are_refused_naming_the_field() {
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "flops",
            Box::new(|v| v["device"]["peak_bf16_flops"] = 1e-300.into()),
            "device.peak_bf16_flops",
        ),
        (
            "latency",
            Box::new(|v| v["inter_node"]["latency_s"] = 1e300.into()),
            "inter_node.latency_s",
        ),
        (
            "bandwidth",
            Box::new(|v| v["intra_node"]["bandwidth"] = 0.0.into()),
            "intra_node.bandwidth",
        ),
        (
            "membw",
            Box::new(|v| v["device"]["memory_bandwidth"] = 1e300.into()),
            "device.memory_bandwidth",
        ),
        (
            "nodes",
            Box::new(|v| v["nodes"] = 4_000_000_000u64.into()),
            "nodes",
        ),
        (
            "unknown",
            Box::new(|v| v["devices_per_nodes"] = 8.into()),
            "devices_per_nodes",
        ),
        // fp32 above the bf16 tensor rate (A100: 19.5 of 312 TFLOP/s, its data sheet).
        (
            "fp32-above-bf16",
            Box::new(|v| v["device"]["peak_fp32_flops"] = 1e17.into()),
            "device.peak_fp32_flops",
        ),
        // FP8 tensor cores below the bf16 rate (H100: 1979 vs 989 TFLOP/s dense).
        (
            "fp8-below-bf16",
            Box::new(|v| v["device"]["peak_fp8_flops"] = 1e12.into()),
            "device.peak_fp8_flops",
        ),
    ];
    for (name, edit, field) in cases {
        let file = write(&format!("cluster-{name}.json"), &cluster_json(edit));
        refused(
            &[
                "eval",
                "--model",
                "tiny-gpt",
                "--cluster",
                &file,
                "--global-batch",
                "8",
                "--seq",
                "128",
                "--dp",
                "8",
            ],
            &[field],
        );
    }
}

#[test]
fn non_finite_cluster_numbers_are_refused() {
    // JSON cannot spell them; an embedder can.
    for x in [f64::NAN, f64::INFINITY, -1.0, 0.0] {
        let mut c = Cluster::resolve("dgx-a100-80g:1").unwrap();
        c.device.peak_fp32_flops = x;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("device.peak_fp32_flops"), "{x}: {e}");
        let mut c = Cluster::resolve("dgx-a100-80g:1").unwrap();
        c.inter_node.bandwidth = x;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("inter_node.bandwidth"), "{x}: {e}");
        let mut c = Cluster::resolve("dgx-a100-80g:1").unwrap();
        c.intra_node.latency_s = if x == 0.0 { f64::NEG_INFINITY } else { x };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("intra_node.latency_s"), "{x}: {e}");
    }
    // Every preset is inside the ranges.
    for spec in ["dgx-a100-80g:1", "dgx-h100:4", "moai-4xlarge"] {
        Cluster::resolve(spec).unwrap().validate().unwrap();
    }
}

#[test]
fn saved_plans_hold_only_finite_numbers() {
    let file = dir().join("plan.json");
    let mut args = vec![
        "plan",
        "--global-batch",
        "8",
        "--save",
        file.to_str().unwrap(),
    ];
    args.extend(TINY);
    let (code, out, err) = apar(&args);
    assert_eq!(code, 0, "{out}{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    // serde_json writes non-finite floats as null: only absent options may be null.
    fn nulls(v: &serde_json::Value, key: &str, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Null => out.push(key.to_string()),
            serde_json::Value::Array(a) => a.iter().for_each(|x| nulls(x, key, out)),
            serde_json::Value::Object(m) => m.iter().for_each(|(k, x)| nulls(x, k, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    nulls(&serde_json::from_str(&text).unwrap(), "", &mut found);
    // Options that may be absent: the cluster's usable memory, recompute layers, the
    // model's overrides (`layers`, `attention`), a compute op's collective `group`, the
    // gradient and optimizer dtypes (engine defaults), a fixed runtime overhead, the
    // block of a communication event that serves no single block, the FP8 peak of a
    // device without FP8 tensor cores, a calibration file (the device's built-in
    // table when absent), and the model's optional score scale, soft-capping,
    // sliding window, experts (and their capacity factor), latent attention and rotary
    // scaling.
    let absent = [
        "block",
        "usable_memory_bytes",
        "recompute_layers",
        "layers",
        "attention",
        "group",
        "grad",
        "optimizer",
        "fixed_bytes",
        "peak_fp8_flops",
        "calibration",
        "attn_scale",
        "attn_softcap",
        "final_softcap",
        "sliding_window",
        "moe",
        "mla",
        "capacity_factor",
        "rope_scaling",
    ];
    found.retain(|k| !absent.contains(&k.as_str()));
    assert!(found.is_empty(), "null (non-finite?) at {found:?}");
    let mut words = out.split(|c: char| !c.is_alphanumeric());
    assert!(!words.any(|w| w == "NaN" || w == "inf"), "{out}");
}

// ---- 3. tensor parallelism against heads; recompute-layers ----

const GPT2: [&str; 8] = [
    "--model",
    "gpt2",
    "--cluster",
    "dgx-a100-80g:1",
    "--global-batch",
    "8",
    "--seq",
    "128",
];

#[test]
fn tp_not_dividing_the_heads_is_refused() {
    // gpt2 has 12 heads; tp 8 divides the node but not the heads.
    let mut args = vec!["eval", "--dp", "1", "--tp", "8"];
    args.extend(GPT2);
    refused(&args, &["tp 8", "12 attention heads"]);
    let mut args = vec!["plan", "--tp", "8"];
    args.extend(GPT2);
    refused(&args, &["12 attention heads"]);
    // Plans without a pin never pick such a tp.
    let mut args = vec!["plan", "--json"];
    args.extend(GPT2);
    let (code, out, err) = apar(&args);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tp = v["config"]["tp"].as_u64().unwrap();
    assert_eq!(12 % tp, 0, "{out}");
}

#[test]
fn tp_check_is_typed() {
    let cfg = apar::models::zoo::lookup("gpt2").unwrap();
    let c = Compiler::new(
        ModelSource::Config(cfg),
        Cluster::resolve("dgx-a100-80g:1").unwrap(),
        128,
        8,
        0.8,
    )
    .unwrap();
    let config = apar::passes::Config::new(1, 8, 1, 1, 8);
    match c.check(&config) {
        Err(CompileError::TpNotDividingHeads {
            tp: 8, count: 12, ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn recompute_layers_is_checked() {
    let base = ["eval", "--dp", "8"];
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &["--recompute", "full", "--recompute-layers", "0"],
            &["recompute-layers must be at least 1"],
        ),
        (
            &["--recompute", "none", "--recompute-layers", "1"],
            &["recompute-layers 1", "policy"],
        ),
        // tiny-gpt has 2 layers, on one stage.
        (
            &["--recompute", "full", "--recompute-layers", "3"],
            &["recompute-layers 3", "2 layers"],
        ),
    ];
    for (extra, needles) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(TINY);
        args.extend(["--global-batch", "8"]);
        args.extend(extra);
        refused(&args, needles);
    }
    let mut args = vec![
        "plan",
        "--global-batch",
        "8",
        "--recompute",
        "none",
        "--recompute-layers",
        "1",
    ];
    args.extend(TINY);
    refused(&args, &["policy"]);
}

// ---- 4. sequence longer than learned positions ----

#[test]
fn a_sequence_beyond_learned_positions_is_refused() {
    refused(
        &[
            "eval",
            "--model",
            "gpt2",
            "--cluster",
            "dgx-a100-80g:1",
            "--global-batch",
            "8",
            "--seq",
            "2048",
            "--dp",
            "8",
        ],
        &["2048", "1024 positions"],
    );
    refused(
        &[
            "plan",
            "--model",
            "gpt2",
            "--cluster",
            "dgx-a100-80g:1",
            "--global-batch",
            "8",
            "--seq",
            "1025",
        ],
        &["1025", "1024 positions"],
    );
}

// ---- 5. strict parsing ----

#[test]
fn hf_config_with_a_duplicate_key_is_refused() {
    let text = r#"{"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12,
        "n_positions": 1024, "vocab_size": 50257, "n_head": 16}"#;
    let e = apar::models::hf::from_json_str("dup.json", text).unwrap_err();
    assert!(e.to_string().contains("duplicate key `n_head`"), "{e}");
    // Nested objects too.
    let nested = r#"{"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12,
        "n_positions": 1024, "vocab_size": 50257, "rope_scaling": {"a": 1, "a": 2}}"#;
    let e = apar::models::hf::from_json_str("dup.json", nested).unwrap_err();
    assert!(e.to_string().contains("duplicate key `a`"), "{e}");
    let file = write("config.json", text);
    refused(
        &["stats", "--model", &file, "--seq", "128"],
        &["duplicate key"],
    );
}

#[test]
fn ir_json_with_an_unknown_field_is_refused() {
    let (code, json, err) = apar(&["ir", "--model", "tiny-gpt", "--layers", "1", "--json"]);
    assert_eq!(code, 0, "{err}");
    // The clean document loads.
    let good = write("good.json", &json);
    let (code, _, err) = apar(&["check", &good]);
    assert_eq!(code, 0, "{err}");
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("top", Box::new(|v| v["extra"] = 1.into()), "extra"),
        (
            "op",
            Box::new(|v| v["ops"][0]["colour"] = 1.into()),
            "colour",
        ),
        (
            "attr",
            Box::new(|v| v["ops"][0]["op"]["bogus_attr"] = 1.into()),
            "bogus_attr",
        ),
        (
            "type",
            Box::new(|v| v["ops"][0]["results"][0]["type"]["units"] = "m".into()),
            "units",
        ),
    ];
    for (name, edit, needle) in cases {
        let mut bad = v.clone();
        edit(&mut bad);
        assert_ne!(bad, v, "{name}: the edit changed nothing");
        let file = write(&format!("bad-{name}.json"), &bad.to_string());
        refused(&["check", &file], &[needle]);
    }
    v["ops"][0]["op"]["op"] = "no_such_op".into();
    let file = write("bad-opname.json", &v.to_string());
    refused(&["check", &file], &["no_such_op"]);
}

#[test]
fn hf_gpt2_sequence_beyond_n_positions_is_refused() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/hf/gpt2.json");
    refused(
        &[
            "eval",
            "--model",
            file,
            "--cluster",
            "dgx-a100-80g:1",
            "--global-batch",
            "8",
            "--seq",
            "4096",
            "--dp",
            "8",
        ],
        &["4096", "1024 positions"],
    );
    // At the limit it plans.
    let (code, _, err) = apar(&[
        "eval",
        "--model",
        file,
        "--cluster",
        "dgx-a100-80g:1",
        "--global-batch",
        "8",
        "--seq",
        "1024",
        "--dp",
        "8",
    ]);
    assert_eq!(code, 0, "{err}");
}

// ---- 6. layer count ----

/// A template-compiled model keeps one profile per distinct block, not one per layer:
/// memory of the profiles does not grow with the layer count.
#[test]
fn profiles_of_the_deepest_model_are_run_length_encoded() {
    let mut cfg = apar::models::zoo::lookup("llama2-7b").unwrap();
    cfg.layers = apar::models::MAX_LAYERS;
    let c = Compiler::new(
        ModelSource::Config(cfg),
        Cluster::resolve("dgx-h100:1").unwrap(),
        1024,
        8,
        0.8,
    )
    .unwrap();
    let config = Config {
        dp: 1,
        tp: 8,
        pp: 1,
        cp: 1,
        ep: 1,
        etp: 1,
        micro_batch: 1,
        num_micro_batches: 8,
        sp: false,
        recompute: Recompute::Full,
        recompute_layers: None,
        recompute_modules: None,
        zero: 0,
        low_prec_shard: false,
        schedule: Schedule::OneFOneB,
    };
    let p = c.profiles(&config);
    let blocks = &p.as_ref().as_ref().unwrap().blocks;
    assert_eq!(blocks.len(), apar::models::MAX_LAYERS as usize + 2);
    // Embedding, layers 0..L-2, the last layer, the head.
    assert_eq!(blocks.runs().count(), 4);
    // Each block still reads back with its own tag.
    use apar::ir::Block;
    assert_eq!(blocks.get(0).block, Some(Block::Embed));
    assert_eq!(blocks.get(1000).block, Some(Block::Layer(999)));
    assert_eq!(
        blocks.block(blocks.len() - 2),
        Some(Block::Layer(apar::models::MAX_LAYERS - 1))
    );
    assert_eq!(blocks.get(blocks.len() - 1).block, Some(Block::Head));
    // Partial recomputation composes by runs too (pp 8: about 8,192 layers a stage).
    let partial = Config {
        pp: 8,
        tp: 1,
        recompute_layers: Some(100),
        ..config
    };
    let e = c.evaluate_with(&partial, false).unwrap();
    assert_eq!(e.blocks, blocks.len());
}

/// Partial recomputation composed by runs (template) equals the block-by-block
/// composition of the whole graph.
#[test]
fn partial_recomputation_agrees_between_graph_and_template() {
    let mut cfg = apar::models::zoo::lookup("tiny-gpt").unwrap();
    cfg.layers = 7;
    let graph = apar::models::build_forward(&cfg).unwrap();
    let cluster = Cluster::resolve("dgx-a100-80g:1").unwrap();
    let template = Compiler::new(ModelSource::Config(cfg), cluster.clone(), 128, 16, 0.8).unwrap();
    let whole = Compiler::new(ModelSource::Graph(graph), cluster, 128, 16, 0.8).unwrap();
    // (Megatron-LM, the only engine with `--recompute-num-layers`, cannot place 7
    // layers on 8 stages, so 4 stages are the most here.)
    for (pp, k) in [(2, 1), (2, 3), (4, 1), (4, 2)] {
        let config = Config {
            dp: 8 / pp,
            tp: 1,
            pp,
            cp: 1,
            ep: 1,
            etp: 1,
            micro_batch: 1,
            num_micro_batches: 16 / (8 / pp),
            sp: false,
            recompute: Recompute::Full,
            recompute_layers: Some(k),
            recompute_modules: None,
            zero: 0,
            low_prec_shard: false,
            schedule: Schedule::OneFOneB,
        };
        let a = template.evaluate(&config).unwrap();
        let b = whole.evaluate(&config).unwrap();
        assert_eq!(a.stages, b.stages, "pp {pp} k {k}");
        assert_eq!(a.peak_bytes, b.peak_bytes, "pp {pp} k {k}");
        let (ta, tb) = (a.step_time_s, b.step_time_s);
        assert!((ta - tb).abs() <= 1e-9 * tb, "pp {pp} k {k}: {ta} vs {tb}");
    }
}

/// A hand-edited saved plan whose allocator fragmentation is not a share in `[0, 0.9]`
/// is refused naming the field, not silently clamped; flags beside `--plan` are refused,
/// not ignored.
#[test]
fn a_saved_plan_with_an_absurd_runtime_or_other_flags_is_refused() {
    let saved = dir().join("runtime.json");
    let (code, _, err) = apar(&[
        "plan",
        "--model",
        "tiny-gpt",
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
    let mut plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    // A re-cost takes the plan's own job: a flag beside it would be ignored.
    let path = saved.to_str().unwrap();
    refused(
        &["eval", "--plan", path, "--engine", "hf"],
        &["cannot be used with", "--engine"],
    );
    refused(
        &["eval", "--plan", path, "--tp", "2"],
        &["cannot be used with"],
    );
    let original = plan.clone();
    for bad in [-0.9, 0.99] {
        plan["runtime"]["allocator_fragmentation"] = bad.into();
        let path = write("runtime-bad.json", &plan.to_string());
        refused(
            &["eval", "--plan", &path],
            &["allocator_fragmentation", "0 to 0.9"],
        );
    }
    // Byte counts beyond any device (10^6 GiB) are refused, not printed as a peak.
    let mut plan = original.clone();
    plan["runtime"]["context_bytes"] = 1_000_000_000_000_000_000u64.into();
    let path = write("runtime-huge.json", &plan.to_string());
    refused(&["eval", "--plan", &path], &["context_bytes", "10^6 GiB"]);
    // A hand-edited plan with a misspelt key is refused with the key, rather than
    // re-costed as if the edit had not been made.
    for (at, key) in [
        ("config", "dpp"),
        ("", "memory_ration"),
        ("runtime", "fixed_byte"),
    ] {
        let mut plan = original.clone();
        let target = if at.is_empty() {
            &mut plan
        } else {
            &mut plan[at]
        };
        target[key] = 4.into();
        let path = write("typo.json", &plan.to_string());
        refused(&["eval", "--plan", &path], &["unknown field", key]);
    }
}
