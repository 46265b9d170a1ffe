//! Model frontends against published numbers.
//!
//! Every parameter count is taken twice, from [`ModelConfig::param_count`] and by
//! summing the `param` tensors of the built forward graph, and compared with a number
//! that does not come from this crate: a published exact count, or the Megatron-LM
//! paper's Eq. (2) evaluated here. The Hugging Face loader is checked against the zoo
//! and on malformed files.

use std::path::PathBuf;

use apar::ir::{verify, Block, Env, Graph, Op};
use apar::models::{
    build_forward, hf, zoo, Attention, Mlp, ModelConfig, ModelError, NormLayout, Position, QkNorm,
};

/// Sum of the element counts of the graph's `param` tensors.
fn graph_params(g: &Graph) -> u64 {
    let env = Env::new(1, 1);
    g.ops()
        .filter(|&o| matches!(g.op(o), Op::Param { .. }))
        .map(|o| {
            g.ty(g.node(o).results[0])
                .shape
                .numel_at(env)
                .expect("parameter shapes are literal")
        })
        .sum()
}

/// Asserts both counts of `cfg` equal `expected` and that the graph verifies.
fn assert_params(cfg: &ModelConfig, expected: u64) {
    assert_eq!(cfg.param_count(), expected, "{}: param_count()", cfg.name);
    let g = build_forward(cfg).unwrap_or_else(|e| panic!("{}: {e}", cfg.name));
    verify(&g).unwrap_or_else(|e| panic!("{}: {e:?}", cfg.name));
    assert_eq!(graph_params(&g), expected, "{}: graph params", cfg.name);
}

fn zoo_model(name: &str) -> ModelConfig {
    zoo::lookup(name).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------
// Published exact counts.
//
// Each number is the checkpoint's published exact count of trainable parameters (what
// transformers' `num_parameters()` gives for the Hugging Face model; GPT-2's leaves out
// the causal-mask buffers its weight file also stores). Each was verified by deriving
// it from the checkpoint's config.json fields, shown in the comment: per layer,
// attention h·(a+2k)·d + a·d·h, MLP 3·h·f (SwiGLU) or 2·h·f plus biases (GeLU), norms;
// plus embeddings, the final norm, and an untied output matrix.
// ---------------------------------------------------------------------------------

#[test]
fn published_exact_counts() {
    let cases: &[(&str, u64)] = &[
        // meta-llama/Llama-2-7b-hf: l 32, h 4096, f 11008, V 32000, untied.
        // 32·(4·4096² + 3·4096·11008 + 2·4096) + 2·32000·4096 + 4096
        ("llama2-7b", 6_738_415_616),
        // meta-llama/Llama-2-13b-hf: l 40, h 5120, f 13824, V 32000.
        // 40·(4·5120² + 3·5120·13824 + 2·5120) + 2·32000·5120 + 5120
        ("llama2-13b", 13_015_864_320),
        // meta-llama/Llama-2-70b-hf: l 80, h 8192, 64 heads, 8 kv heads (d 128), f 28672.
        // 80·(2·8192² + 2·8192·1024 + 3·8192·28672 + 2·8192) + 2·32000·8192 + 8192
        ("llama2-70b", 68_976_648_192),
        // meta-llama/Meta-Llama-3-8B: l 32, h 4096, 8 kv heads, f 14336, V 128256.
        // 32·(2·4096² + 2·4096·1024 + 3·4096·14336 + 2·4096) + 2·128256·4096 + 4096
        ("llama3-8b", 8_030_261_248),
        // meta-llama/Meta-Llama-3-70B: as Llama-2-70B with V 128256.
        // 80·(2·8192² + 2·8192·1024 + 3·8192·28672 + 2·8192) + 2·128256·8192 + 8192
        ("llama3-70b", 70_553_706_496),
        // meta-llama/Llama-3.1-405B: l 126, h 16384, 128 heads, 8 kv, f 53248.
        // 126·(2·16384² + 2·16384·1024 + 3·16384·53248 + 2·16384) + 2·128256·16384 + 16384
        ("llama3-405b", 405_853_388_800),
        // mistralai/Mistral-7B-v0.1: l 32, h 4096, 8 kv heads, f 14336, V 32000.
        // 32·(2·4096² + 2·4096·1024 + 3·4096·14336 + 2·4096) + 2·32000·4096 + 4096
        ("mistral-7b", 7_241_732_096),
        // Qwen/Qwen2-7B: l 28, h 3584, 28 heads, 4 kv (d 128), f 18944, V 152064,
        // q/k/v biases (3584 + 2·512).
        // 28·(2·3584² + 2·3584·512 + 4608 + 3·3584·18944 + 2·3584) + 2·152064·3584 + 3584
        ("qwen2-7b", 7_615_616_512),
        // openai-community/gpt2: l 12, h 768, V 50257, 1024 positions, tied.
        // 12·(12·768² + 13·768) + 50257·768 + 1024·768 + 2·768
        ("gpt2", 124_439_808),
        // gpt2-medium: l 24, h 1024.  24·(12·1024² + 13·1024) + (50257 + 1024 + 2)·1024
        ("gpt2-medium", 354_823_168),
        // gpt2-large: l 36, h 1280.  36·(12·1280² + 13·1280) + (50257 + 1024 + 2)·1280
        ("gpt2-large", 774_030_080),
        // gpt2-xl: l 48, h 1600.  48·(12·1600² + 13·1600) + (50257 + 1024 + 2)·1600
        ("gpt2-xl", 1_557_611_200),
    ];
    for &(name, expected) in cases {
        assert_params(&zoo_model(name), expected);
    }
}

#[test]
fn llama_family_details_match_their_configs() {
    // (name, heads, kv heads, rope theta, rms eps, qkv bias, tied)
    let cases: &[(&str, u64, u64, f64, f64, bool)] = &[
        ("llama2-7b", 32, 32, 10_000.0, 1e-5, false),
        ("llama2-13b", 40, 40, 10_000.0, 1e-5, false),
        ("llama2-70b", 64, 8, 10_000.0, 1e-5, false),
        ("llama3-8b", 32, 8, 500_000.0, 1e-5, false),
        ("llama3-70b", 64, 8, 500_000.0, 1e-5, false),
        ("llama3-405b", 128, 8, 500_000.0, 1e-5, false),
        ("mistral-7b", 32, 8, 10_000.0, 1e-5, false),
        ("qwen2-7b", 28, 4, 1_000_000.0, 1e-6, true),
    ];
    for &(name, heads, kv, theta, eps, qkv_bias) in cases {
        let cfg = zoo_model(name);
        assert_eq!(
            (cfg.heads, cfg.kv_heads, cfg.head_dim),
            (heads, kv, 128),
            "{name}"
        );
        assert_eq!(
            cfg.position,
            Position::Rotary { dims: 128, theta },
            "{name}"
        );
        assert_eq!(cfg.norm_eps, eps, "{name}");
        assert_eq!(cfg.qkv_bias, qkv_bias, "{name}");
        assert!(
            !cfg.out_bias && !cfg.mlp_bias && !cfg.tied_embeddings,
            "{name}"
        );
        assert_eq!(cfg.dropout, 0.0, "{name}");
        assert_eq!(cfg.attention, Attention::Flash, "{name}");
    }
}

// ---------------------------------------------------------------------------------
// Megatron-LM family: Narayanan et al. (SC'21) Eq. (2),
//   P = 12·l·h²·(1 + 13/(12h) + (V + s)/(12·l·h)),
// which counts the layers (12h² + 13h each), the token and position embeddings
// (V + s)·h, and leaves out the final layernorm (2h), which the model has.
// ---------------------------------------------------------------------------------

/// Megatron vocabulary and sequence length (Narayanan et al. 2021).
const MEGATRON_V: u64 = 51_200;
const MEGATRON_S: u64 = 2_048;

/// Eq. (2) as printed, in floating point.
fn eq2(l: u64, h: u64) -> f64 {
    let (l, h) = (l as f64, h as f64);
    let (v, s) = (MEGATRON_V as f64, MEGATRON_S as f64);
    12.0 * l * h * h * (1.0 + 13.0 / (12.0 * h) + (v + s) / (12.0 * l * h))
}

/// Eq. (2) multiplied out, in integers: 12lh² + 13lh + (V + s)h.
fn eq2_exact(l: u64, h: u64) -> u64 {
    12 * l * h * h + 13 * l * h + (MEGATRON_V + MEGATRON_S) * h
}

fn check_megatron(name: &str, l: u64, h: u64, a: u64) -> u64 {
    let cfg = zoo_model(name);
    assert_eq!(
        (u64::from(cfg.layers), cfg.hidden, cfg.heads),
        (l, h, a),
        "{name}"
    );
    assert_eq!((cfg.vocab, cfg.ffn), (MEGATRON_V, 4 * h), "{name}");
    assert_eq!(
        cfg.position,
        Position::Learned {
            max_positions: MEGATRON_S
        },
        "{name}"
    );
    assert!(
        cfg.tied_embeddings && cfg.qkv_bias && cfg.mlp_bias,
        "{name}"
    );
    assert_eq!(
        (cfg.dropout, cfg.attention),
        (0.1, Attention::Eager),
        "{name}"
    );
    let p = eq2_exact(l, h);
    let printed = eq2(l, h);
    assert!(
        (printed - p as f64).abs() <= 1e-9 * printed,
        "{name}: Eq. (2) {printed} vs multiplied out {p}"
    );
    assert_params(&cfg, p + 2 * h);
    p
}

#[test]
fn megatron_sc21_table1_follows_eq2_and_rounds_to_the_table() {
    // (name, layers, hidden, heads, parameters in the table in tenths of a billion)
    let table: &[(&str, u64, u64, u64, u64)] = &[
        ("megatron-1.7b", 24, 2304, 24, 17),
        ("megatron-3.6b", 30, 3072, 32, 36),
        ("megatron-7.5b", 36, 4096, 32, 75),
        ("megatron-18.4b", 40, 6144, 48, 184),
        ("megatron-39.1b", 48, 8192, 64, 391),
        ("megatron-76.1b", 60, 10240, 80, 761),
        ("megatron-145.6b", 80, 12288, 96, 1456),
        ("megatron-310.1b", 96, 16384, 128, 3101),
        ("megatron-529.6b", 105, 20480, 128, 5296),
        ("megatron-1t", 128, 25600, 160, 10080),
    ];
    for &(name, l, h, a, tenths) in table {
        let p = check_megatron(name, l, h, a);
        // The table prints Eq. (2) rounded to 0.1 B; with the final layernorm (2h,
        // at most 51,200 here) the rounding is the same.
        const TENTH_B: u64 = 100_000_000;
        assert_eq!((p + TENTH_B / 2) / TENTH_B, tenths, "{name}: {p}");
        assert_eq!((p + 2 * h + TENTH_B / 2) / TENTH_B, tenths, "{name}");
        // So Eq. (2) is within 0.05 B of the table, some barely: 18.4 B is 18.4497 B,
        // 76.1 B is 76.0507 B, 1.7 B is 1.6522 B.
        let off_b = (p as f64 - tenths as f64 * TENTH_B as f64).abs() / 1e9;
        assert!(off_b <= 0.05, "{name}: {off_b} B off");
    }
}

#[test]
fn korthikanti_table3_models_round_to_their_names() {
    // (name, layers, hidden, heads, billions as named in Table 3)
    let table: &[(&str, u64, u64, u64, u64)] = &[
        ("megatron-22b", 48, 6144, 64, 22),
        ("gpt3-175b", 96, 12288, 96, 175),
        ("mt-nlg-530b", 105, 20480, 128, 530),
    ];
    for &(name, l, h, a, billions) in table {
        let p = check_megatron(name, l, h, a);
        const B: u64 = 1_000_000_000;
        assert_eq!((p + B / 2) / B, billions, "{name}: {p}");
    }
    // The same Eq. (2) puts Table 3's 1T model at 1,008.0 B (SC'21 Table 1).
    assert_eq!(eq2_exact(128, 25600) / 100_000_000, 10080);
}

// ---------------------------------------------------------------------------------
// Zoo housekeeping and the attention override.
// ---------------------------------------------------------------------------------

#[test]
fn zoo_names_are_unique_and_entries_cite_a_source() {
    let mut names: Vec<&str> = zoo::ZOO.iter().map(|e| e.name).collect();
    let total = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), total, "duplicate zoo names");
    for e in zoo::ZOO {
        let cfg = (e.config)();
        assert_eq!(cfg.name, e.name);
        cfg.validate().unwrap_or_else(|err| panic!("{err}"));
        if !e.name.starts_with("tiny-") {
            assert!(
                e.about.contains("et al.") && e.about.contains(char::is_numeric),
                "{}: about should cite its source: {}",
                e.name,
                e.about
            );
        }
    }
    assert!(matches!(zoo::lookup("gpt5"), Err(ModelError::Unknown(n)) if n == "gpt5"));
}

fn attention_ops(g: &Graph) -> (usize, usize) {
    let softmax = g
        .ops()
        .filter(|&o| matches!(g.op(o), Op::Softmax { .. }))
        .count();
    let flash = g
        .ops()
        .filter(|&o| matches!(g.op(o), Op::FlashAttention { .. }))
        .count();
    (softmax, flash)
}

#[test]
fn with_attention_switches_the_attention_form_only() {
    for (name, layers) in [("tiny-gpt", 2), ("tiny-llama", 2), ("llama2-7b", 32)] {
        let base = zoo_model(name);
        let eager = zoo::with_attention(base.clone(), Attention::Eager);
        let flash = zoo::with_attention(base.clone(), Attention::Flash);
        let ge = build_forward(&eager).unwrap_or_else(|e| panic!("{e}"));
        let gf = build_forward(&flash).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(attention_ops(&ge), (layers, 0), "{name} eager");
        assert_eq!(attention_ops(&gf), (0, layers), "{name} flash");
        assert_eq!(graph_params(&ge), base.param_count());
        assert_eq!(graph_params(&gf), base.param_count());
        let mut back = eager.clone();
        back.attention = base.attention;
        assert_eq!(back, base);
    }
}

// ---------------------------------------------------------------------------------
// Hugging Face loader.
// ---------------------------------------------------------------------------------

fn fixture(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/hf")
        .join(file)
}

fn load(file: &str) -> ModelConfig {
    hf::load(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn load_err(file: &str) -> ModelError {
    match hf::load(&fixture(file)) {
        Ok(cfg) => panic!("{file} loaded: {cfg:?}"),
        Err(e) => e,
    }
}

#[test]
fn hf_configs_load_as_the_zoo_entries() {
    for (file, zoo_name) in [
        ("llama-2-7b.json", "llama2-7b"),
        ("llama-3.1-8b.json", "llama3-8b"),
        ("mistral-7b.json", "mistral-7b"),
        ("qwen2-7b.json", "qwen2-7b"),
        ("gpt2.json", "gpt2"),
        ("gemma-2-9b.json", "gemma2-9b"),
        ("gemma-2-27b.json", "gemma2-27b"),
        ("bloom-176b.json", "bloom-176b"),
    ] {
        let mut cfg = load(file);
        assert!(cfg.name.ends_with(file), "{}", cfg.name);
        if file == "llama-3.1-8b.json" {
            // Llama 3.1 is Llama 3 with its context stretched by rotary scaling
            // (the file's rope_scaling: llama3, factor 8, low 1, high 4, 8192).
            let r = cfg.rope_scaling.take().expect("Llama 3.1's rope_scaling");
            assert_eq!(
                (
                    r.rope_type.as_str(),
                    r.factor,
                    r.low_freq_factor,
                    r.high_freq_factor
                ),
                ("llama3", 8.0, Some(1.0), Some(4.0))
            );
            assert_eq!(r.original_max_position_embeddings, Some(8192));
        }
        let expected = zoo_model(zoo_name);
        cfg.name = expected.name.clone();
        assert_eq!(cfg, expected, "{file}");
    }
    // The count, once more, through the graph of the loaded file.
    assert_params(&load("llama-2-7b.json"), 6_738_415_616);
}

#[test]
fn gpt_neox_loads_with_partial_rotary_and_parallel_residual() {
    // EleutherAI/pythia-1.4b: 1,414,647,808 parameters (Biderman et al. 2023, Pythia
    // model table; HF card). l 24, h 2048, f 8192, V 50304, untied, LayerNorm, biases:
    // 24·(12·2048² + 13·2048) + 2·50304·2048 + 2·2048.
    let pythia = load("pythia-1.4b.json");
    assert_eq!(
        pythia.position,
        Position::Rotary {
            dims: 32, // rotary_pct 0.25 · head dim 128
            theta: 10_000.0
        }
    );
    assert!(pythia.parallel_residual && !pythia.tied_embeddings);
    assert!(pythia.qkv_bias && pythia.out_bias && pythia.mlp_bias);
    assert_eq!((pythia.dropout, pythia.attention), (0.0, Attention::Flash));
    assert_params(&pythia, 1_414_647_808);

    // EleutherAI/gpt-neox-20b: 20,554,567,680 parameters (HF model card; Black et al.
    // 2022). l 44, h 6144, f 24576, V 50432: 44·(12·6144² + 13·6144) + 2·50432·6144 + 2·6144.
    let neox = load("gpt-neox-20b.json");
    assert_eq!(
        neox.position,
        Position::Rotary {
            dims: 24, // 0.25 · 96
            theta: 10_000.0
        }
    );
    assert_params(&neox, 20_554_567_680);
}

#[test]
fn gpt_neox_sequential_residual() {
    // togethercomputer/RedPajama-INCITE-Base-3B-v1 ("2.8B" on its card) sets
    // use_parallel_residual false and rotary_pct 1.0. l 32, h 2560, f 10240, V 50432:
    // 32·(12·2560² + 13·2560) + 2·50432·2560 + 2·2560 = 2,775,864,320.
    let cfg = load("redpajama-incite-3b.json");
    assert!(!cfg.parallel_residual);
    assert_eq!(
        cfg.position,
        Position::Rotary {
            dims: 80,
            theta: 10_000.0
        }
    );
    assert_params(&cfg, 2_775_864_320);
    // The same file with the flag flipped builds the other residual wiring: the
    // second layernorm reads the layer input instead of the attention residual.
    let text =
        std::fs::read_to_string(fixture("redpajama-incite-3b.json")).expect("fixture is readable");
    let flipped = text.replace(
        "\"use_parallel_residual\": false",
        "\"use_parallel_residual\": true",
    );
    let parallel = hf::from_json_str("flipped", &flipped).unwrap_or_else(|e| panic!("{e}"));
    assert!(parallel.parallel_residual);
    assert_eq!(parallel.param_count(), cfg.param_count());
}

#[test]
fn falcon_loads_with_two_layernorms_and_with_one_shared_layernorm() {
    // tiiuae/falcon-40b: new_decoder_architecture, 128 heads, 8 kv heads (d 64),
    // ffn 4h, no linear biases, LayerNorms ln_attn and ln_mlp, tied embeddings.
    // 60·(2·8192² + 2·8192·512 + 2·8192·32768 + 4·8192) + 65024·8192 + 2·8192.
    let cfg = load("falcon-40b.json");
    assert_eq!((cfg.heads, cfg.kv_heads, cfg.head_dim), (128, 8, 64));
    assert!(cfg.parallel_residual && cfg.tied_embeddings);
    assert!(!cfg.qkv_bias && !cfg.out_bias && !cfg.mlp_bias);
    assert_eq!(cfg.norm_layout, NormLayout::Pre);
    assert_params(&cfg, 41_303_293_952);

    // tiiuae/falcon-7b: `parallel_attn`, old decoder: one `input_layernorm` read by
    // attention and MLP; multi-query (1 kv head of 64 channels), 71 heads.
    // 32·(4544·(71+2)·64 + 4544² + 2·4544·18176 + 2·4544) + 65024·4544 + 2·4544.
    let cfg = load("falcon-7b.json");
    assert_eq!((cfg.heads, cfg.kv_heads, cfg.head_dim), (71, 1, 64));
    assert!(cfg.parallel_residual);
    assert_eq!(cfg.norm_layout, NormLayout::Shared);
    assert_params(&cfg, 6_921_720_704);
    let g = build_forward(&cfg).unwrap();
    let norms = g
        .ops()
        .filter(|&o| matches!(g.op(o), Op::LayerNorm { .. }))
        .count();
    assert_eq!(norms, 32 + 1, "one layernorm per layer and the final one");
}

/// `tests/data/hf_param_counts.json`: what Hugging Face Transformers builds for each
/// committed config (`scripts/count_hf_params.py`, meta device).
fn hf_param_counts() -> std::collections::BTreeMap<String, u64> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf_param_counts.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(doc["total_params"].clone()).unwrap()
}

#[test]
fn every_loadable_config_counts_what_hugging_face_builds() {
    let counts = hf_param_counts();
    // Every family the loader reads has a committed config and a count.
    for file in [
        "gemma-7b.json",
        "gemma-2-9b.json",
        "gemma-2-27b.json",
        "gemma-3-4b-text.json",
        "phi-3-mini-4k.json",
        "qwen3-8b.json",
        "olmo-2-1124-7b.json",
        "starcoder2-7b.json",
        "falcon-7b.json",
        "falcon-40b.json",
        "llama-2-7b.json",
        "qwen2-7b.json",
        "gpt2.json",
        "pythia-1.4b.json",
        "mixtral-8x7b.json",
        "mixtral-8x22b.json",
        "qwen1.5-moe-a2.7b.json",
        "qwen3-30b-a3b.json",
        "qwen3-235b-a22b.json",
        "deepseek-v2-lite.json",
        "deepseek-v2.json",
        "deepseek-v3.json",
        "gpt-oss-20b.json",
        "gpt-oss-120b.json",
        "bloom-176b.json",
        "bloom-560m.json",
    ] {
        assert!(
            counts.contains_key(file),
            "{file} has no Hugging Face count"
        );
    }
    let mut checked = 0;
    for (file, &expected) in &counts {
        let Ok(cfg) = hf::load(&fixture(file)) else {
            continue; // refused (MoE, a missing field): other tests say why
        };
        assert_params(&cfg, expected);
        checked += 1;
    }
    assert!(checked >= 27, "{checked} configs checked");
}

/// `active_params` of `tests/data/hf_param_counts.json`: the total less `(E - k)/E` of
/// the routed experts, counted on Hugging Face's model (`scripts/count_hf_params.py`).
#[test]
fn every_loadable_config_counts_hugging_faces_active_parameters() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf_param_counts.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let active: std::collections::BTreeMap<String, u64> =
        serde_json::from_value(doc["active_params"].clone()).unwrap();
    let mut moe = 0;
    for (file, &expected) in &active {
        let Ok(cfg) = hf::load(&fixture(file)) else {
            continue;
        };
        assert_eq!(cfg.active_param_count(), expected, "{file}: active");
        moe += usize::from(cfg.moe.is_some());
    }
    assert!(moe >= 7, "{moe} mixture-of-experts configs checked");
    // The published headline sizes: Mixtral-8x7B 46.7B total, 12.9B active.
    let m = load("mixtral-8x7b.json");
    assert_eq!(
        (m.param_count(), m.active_param_count()),
        (46_702_792_704, 12_879_925_248)
    );
}

#[test]
fn experts_relabelled_dense_are_refused() {
    let text = std::fs::read_to_string(fixture("mixtral-8x7b.json")).unwrap();
    for arch in ["llama", "mistral"] {
        let relabelled = text.replace("\"mixtral\"", &format!("\"{arch}\""));
        match hf::from_json_str("relabelled.json", &relabelled) {
            Err(ModelError::ExpertsOnDense { arch: a, keys, .. }) => {
                assert_eq!(a, arch);
                assert_eq!(keys, ["num_local_experts"]);
            }
            other => panic!("{arch}: {other:?}"),
        }
    }
}

#[test]
fn gemma2_layout_from_its_config() {
    // google/gemma-2-9b: 4 norms a layer, scores scaled by query_pre_attn_scalar^-½
    // (256), soft-capping 50 (attention) and 30 (logits), 4096-token window on even
    // layers, √h embedding scale, tied head.
    let cfg = load("gemma-2-9b.json");
    assert_eq!(cfg.norm_layout, NormLayout::Sandwich);
    assert_eq!(cfg.mlp, Mlp::GeGlu);
    assert_eq!(cfg.attn_scale, Some(1.0 / 16.0));
    assert_eq!(
        (cfg.attn_softcap, cfg.final_softcap),
        (Some(50.0), Some(30.0))
    );
    assert!(cfg.embed_scale && cfg.tied_embeddings);
    assert_eq!(cfg.head_dim, 256);
    assert_eq!(
        (cfg.layer_window(0), cfg.layer_window(1)),
        (Some(4096), None)
    );
    let (_, notes) = hf::load_with_notes(&fixture("gemma-2-9b.json")).unwrap();
    assert_eq!(
        notes.sliding_window, None,
        "the window is modeled, not noted"
    );
    assert!(notes.ignored.is_empty(), "{:?}", notes.ignored);

    // google/gemma-3-4b-pt's text model: per-head q/k norms, one global layer in six,
    // a 1024-token window.
    let g3 = load("gemma-3-4b-text.json");
    assert_eq!(g3.qk_norm, QkNorm::PerHead);
    assert_eq!((g3.attn_softcap, g3.final_softcap), (None, None));
    let local: Vec<bool> = (0..12).map(|i| g3.layer_window(i).is_some()).collect();
    assert_eq!(local.iter().filter(|&&l| !l).count(), 2);
    assert!(!local[5] && !local[11]);
    assert_eq!(g3.layer_window(0), Some(1024));

    // OLMo 2: post-norms, q/k norms over the whole projections.
    let olmo = load("olmo-2-1124-7b.json");
    assert_eq!(
        (olmo.norm_layout, olmo.qk_norm),
        (NormLayout::Post, QkNorm::Full)
    );
    // Qwen3: q/k norms per head; StarCoder2 and Phi-3: every layer windowed.
    assert_eq!(load("qwen3-8b.json").qk_norm, QkNorm::PerHead);
    let sc = load("starcoder2-7b.json");
    assert_eq!((sc.sliding_window, sc.global_every), (Some(4096), 0));
    assert!(sc.qkv_bias && sc.mlp_bias && sc.norm == apar::models::Norm::LayerNorm);
    assert_eq!(load("phi-3-mini-4k.json").sliding_window, Some(2047));
}

#[test]
fn unsupported_model_type_is_named_with_the_supported_list() {
    let text = std::fs::read_to_string(fixture("mixtral-8x7b.json"))
        .unwrap()
        .replace("\"mixtral\"", "\"mamba\"");
    let e = hf::from_json_str("mamba.json", &text).unwrap_err();
    let msg = e.to_string();
    match e {
        ModelError::Unsupported {
            arch, supported, ..
        } => {
            assert_eq!(arch, "mamba");
            for t in [
                "llama", "mistral", "qwen2", "gpt2", "gpt_neox", "falcon", "mixtral",
            ] {
                assert!(supported.contains(t), "{supported}");
            }
        }
        e => panic!("unexpected {e}"),
    }
    assert!(
        msg.contains("mamba.json") && msg.contains("`mamba`"),
        "{msg}"
    );
}

#[test]
fn missing_field_is_named() {
    let e = load_err("llama-missing-intermediate.json");
    assert!(e.to_string().contains("`intermediate_size`"), "{e}");
    assert!(
        matches!(&e, ModelError::MissingField { field, file }
            if field == "intermediate_size" && file.ends_with("llama-missing-intermediate.json")),
        "{e:?}"
    );
    assert!(matches!(
        hf::from_json_str("x", r#"{"n_embd": 8}"#),
        Err(ModelError::MissingField { field, .. }) if field == "model_type"
    ));
}

/// A small, valid llama config to mutate.
const SMALL_LLAMA: &str = r#"{
  "model_type": "llama", "hidden_size": 64, "intermediate_size": 172,
  "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
  "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0
}"#;

fn with_field(base: &str, key: &str, value: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(base).expect("base is JSON");
    let value: serde_json::Value = serde_json::from_str(value).expect("value is JSON");
    v[key] = value;
    v.to_string()
}

fn invalid_field(text: &str) -> &'static str {
    match hf::from_json_str("t", text) {
        Err(ModelError::Invalid { field, .. }) => field,
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

#[test]
fn small_llama_matches_tiny_llama() {
    let mut cfg = hf::from_json_str("t", SMALL_LLAMA).unwrap_or_else(|e| panic!("{e}"));
    cfg.name = "tiny-llama".into();
    assert_eq!(cfg, zoo_model("tiny-llama"));
}

#[test]
fn bad_values_are_clear_errors() {
    // Each error names the file's key (sizes checked after reading name the key they
    // were read from, not apar's field).
    let cases: &[(&str, &str, &str)] = &[
        ("hidden_size", "\"4096\"", "hidden_size"),
        ("num_hidden_layers", "2.5", "num_hidden_layers"),
        ("num_hidden_layers", "-1", "num_hidden_layers"),
        ("num_hidden_layers", "8589934592", "num_hidden_layers"),
        ("num_hidden_layers", "0", "num_hidden_layers"),
        ("num_hidden_layers", "100000", "num_hidden_layers"), // > MAX_LAYERS
        ("max_position_embeddings", "0", "max_position_embeddings"),
        ("sliding_window", "0", "sliding_window"),
        ("model_type", "7", "model_type"),
        ("tie_word_embeddings", "\"no\"", "tie_word_embeddings"),
        ("rms_norm_eps", "-1e-5", "rms_norm_eps"),
        ("rope_theta", "0", "rope_theta"),
        ("num_attention_heads", "0", "num_attention_heads"),
        ("hidden_size", "66", "hidden_size"), // not a multiple of 4 heads
        ("num_key_value_heads", "3", "num_key_value_heads"),
        ("hidden_act", "\"gelu\"", "hidden_act"),
        ("partial_rotary_factor", "1.5", "partial_rotary_factor"),
        ("vocab_size", "33554432", "vocab_size"), // 2^25 > MAX_DIM
        ("head_dim", "18446744073709551615", "head_dim"),
        ("rope_parameters", "[]", "rope_parameters"),
    ];
    for &(key, value, field) in cases {
        let mut text = with_field(SMALL_LLAMA, key, value);
        if key == "rope_parameters" {
            let mut v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            if let Some(m) = v.as_object_mut() {
                m.remove("rope_theta");
            }
            text = v.to_string();
        }
        assert_eq!(invalid_field(&text), field, "{key} = {value}");
    }
    // An odd number of rotated channels: int(0.2 · 128) = 25 (gpt_neox).
    let pythia = std::fs::read_to_string(fixture("pythia-1.4b.json")).expect("fixture");
    assert_eq!(
        invalid_field(&with_field(&pythia, "rotary_pct", "0.2")),
        "rotary dims"
    );
    // The messages name the field and what was found.
    let e = hf::from_json_str(
        "f.json",
        &with_field(SMALL_LLAMA, "hidden_size", "\"4096\""),
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        e.contains("hidden_size") && e.contains("a string \"4096\""),
        "{e}"
    );
}

#[test]
fn unreadable_and_non_object_files_are_file_errors() {
    for text in ["", "{", "[1, 2]", "null", "\"llama\""] {
        assert!(
            matches!(hf::from_json_str("t", text), Err(ModelError::File { .. })),
            "{text:?}"
        );
    }
    let missing = fixture("no-such-config.json");
    assert!(matches!(hf::load(&missing), Err(ModelError::File { .. })));
}

#[test]
fn nested_rope_parameters_and_null_fields() {
    let mut v: serde_json::Value = serde_json::from_str(SMALL_LLAMA).expect("JSON");
    if let Some(m) = v.as_object_mut() {
        m.remove("rope_theta");
        m.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_theta": 500000.0}),
        );
        m.insert("head_dim".into(), serde_json::Value::Null);
    }
    let cfg = hf::from_json_str("t", &v.to_string()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.position,
        Position::Rotary {
            dims: 16,
            theta: 500_000.0
        }
    );
}

/// Where a config.json gives the rotary settings more than one way (`rope_scaling`,
/// `rope_parameters`, a top-level `rope_theta`), apar plans with the ones Transformers
/// keeps: `tests/data/hf_rope_precedence.json`, written by
/// `scripts/rope_precedence.py` (Transformers 5.24.0, `AutoConfig.from_pretrained`).
/// A `rope_parameters` replaced by a different `rope_scaling` is noted, not silent.
#[test]
fn rotary_settings_follow_transformers_precedence() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf_rope_precedence.json");
    let text = std::fs::read_to_string(path).expect("tests/data/hf_rope_precedence.json");
    let recorded: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let cases = recorded["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 5);
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let (cfg, notes) = hf::from_json_str_with_notes(name, &case["config"].to_string())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let Position::Rotary { theta, .. } = cfg.position else {
            panic!("{name}: {:?}", cfg.position);
        };
        assert_eq!(theta, case["rope_theta"].as_f64().expect("theta"), "{name}");
        match case["rope_type"].as_str().expect("rope_type") {
            "default" => assert!(cfg.rope_scaling.is_none(), "{name}"),
            kind => {
                let s = cfg
                    .rope_scaling
                    .as_ref()
                    .unwrap_or_else(|| panic!("{name}"));
                assert_eq!(s.rope_type, kind, "{name}");
                assert_eq!(Some(s.factor), case["factor"].as_f64(), "{name}");
            }
        }
        let config = &case["config"];
        let replaced = config["rope_scaling"]
            .as_object()
            .is_some_and(|m| !m.is_empty())
            && config["rope_scaling"] != config["rope_parameters"];
        let noted = notes.ignored.iter().any(|(kind, keys)| {
            *kind == hf::IgnoredKind::RopeParametersReplaced && keys == &["rope_parameters"]
        });
        assert_eq!(noted, replaced, "{name}: {:?}", notes.ignored);
    }
}

/// Every field of every fixture replaced by values of every JSON kind, or removed:
/// the loader returns a configuration that validates, or an error; it never panics.
#[test]
fn mutated_fixtures_never_panic() {
    let values = [
        "null",
        "\"x\"",
        "-1",
        "0",
        "1",
        "3",
        "2.5",
        "1e300",
        "18446744073709551615",
        "true",
        "[]",
        "{}",
    ];
    let dir = fixture("");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixture folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let mut loaded = 0;
    for path in files {
        let text = std::fs::read_to_string(&path).expect("fixture");
        let base: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
        let keys: Vec<String> = base
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for key in &keys {
            let mut variants = Vec::new();
            let mut removed = base.clone();
            if let Some(m) = removed.as_object_mut() {
                m.remove(key);
            }
            variants.push(removed.to_string());
            for value in values {
                variants.push(with_field(&text, key, value));
            }
            for variant in variants {
                if let Ok(cfg) = hf::from_json_str("m", &variant) {
                    cfg.validate().unwrap_or_else(|e| panic!("{e}"));
                    assert!(cfg.checked_param_count().is_some());
                    loaded += 1;
                }
            }
        }
    }
    assert!(loaded > 0);
}

/// The attention ops of a graph, by layer block: their windows and forward FLOPs.
fn attention_windows(g: &Graph, seq: u64) -> Vec<(apar::ir::Block, Option<u64>, u64)> {
    let env = Env::new(1, seq);
    g.ops()
        .filter_map(|o| match g.op(o) {
            Op::FlashAttention { window, .. } => {
                let c = g
                    .op(o)
                    .cost(&g.input_types(o), &g.result_types(o), env)
                    .unwrap();
                Some((g.node(o).block, *window, c.flops))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn sliding_windows_price_the_band_and_alternating_layers_get_their_own_templates() {
    use apar::ir::Block;
    use apar::models::{build_template, ModelCode};
    // Gemma-2-9B: layer 0 local (4096), layer 1 global, the last (41) global.
    let cfg = zoo_model("gemma2-9b");
    assert_eq!(cfg.template_layers(), vec![0, 1, 41]);
    assert_eq!(cfg.template_of(0), 0);
    assert_eq!(cfg.template_of(7), 1);
    assert_eq!(cfg.template_of(40), 0);
    assert_eq!(cfg.template_of(41), 2);
    let g = build_template(&cfg, ModelCode::Fused).unwrap();
    verify(&g).unwrap();
    let seq = 8192;
    let att = attention_windows(&g, seq);
    assert_eq!(
        att.iter().map(|a| (a.0, a.1)).collect::<Vec<_>>(),
        vec![
            (Block::Layer(0), Some(4096)),
            (Block::Layer(1), None),
            (Block::Layer(2), None)
        ]
    );
    // At 8192 tokens the local layer's band is 3/4 of the causal triangle.
    let ratio = att[0].2 as f64 / att[1].2 as f64;
    assert!((ratio - 0.75).abs() < 1e-3, "{ratio}");
    // Within the window nothing changes.
    let short = attention_windows(&g, 4096);
    assert_eq!(short[0].2, short[1].2);
    // Gemma 3: five local layers to one global; StarCoder2: every layer local.
    let g3 = load("gemma-3-4b-text.json");
    assert_eq!(g3.template_layers(), vec![0, 5, 33]);
    let sc = load("starcoder2-7b.json");
    assert_eq!(sc.template_layers(), vec![0, 31]);
    let g = build_template(&sc, ModelCode::Fused).unwrap();
    assert!(attention_windows(&g, seq).iter().all(|a| a.1 == Some(4096)));
    // A uniform model builds the two layers it always did.
    assert_eq!(zoo_model("llama2-7b").template_layers(), vec![0, 31]);
}

// ---------------------------------------------------------------------------------
// BLOOM (BigScience Workshop 2022, "BLOOM: A 176B-Parameter Open-Access Multilingual
// Language Model", arXiv 2211.05100; Hugging Face `modeling_bloom.py`).
// ---------------------------------------------------------------------------------

/// bigscience/bloom and bigscience/bloom-560m: ALiBi positions (no table, no op), a
/// LayerNorm after the embedding, a fused QKV projection, GeLU of 4h, biases on every
/// linear layer, a tied head. Per layer 12h² + 13h (QKV 3h² + 3h, dense h² + h, MLP
/// 8h² + 5h, two LayerNorms 4h); plus the V·h embedding and the embedding and final
/// LayerNorms (4h). Both totals are also Hugging Face's
/// (`tests/data/hf_param_counts.json`).
#[test]
fn bloom_loads_with_alibi_and_an_embedding_layernorm() {
    // 70·(12·14336² + 13·14336) + 250880·14336 + 4·14336
    let cfg = load("bloom-176b.json");
    assert_eq!(
        (
            cfg.layers,
            cfg.hidden,
            cfg.heads,
            cfg.kv_heads,
            cfg.head_dim
        ),
        (70, 14336, 112, 112, 128)
    );
    assert_eq!((cfg.ffn, cfg.vocab), (4 * 14336, 250880));
    assert_eq!(cfg.position, Position::Alibi);
    assert!(cfg.embed_norm && cfg.tied_embeddings);
    assert!(cfg.qkv_bias && cfg.out_bias && cfg.mlp_bias && !cfg.parallel_residual);
    assert_eq!(cfg.norm, apar::models::Norm::LayerNorm);
    assert_eq!((cfg.mlp, cfg.norm_layout), (Mlp::Gelu, NormLayout::Pre));
    assert_eq!((cfg.norm_eps, cfg.dropout), (1e-5, 0.0));
    assert_params(&cfg, 176_247_271_424);
    // 24·(12·1024² + 13·1024) + 250880·1024 + 4·1024
    let small = load("bloom-560m.json");
    assert_eq!((small.layers, small.hidden, small.heads), (24, 1024, 16));
    assert_params(&small, 559_214_592);
    // Every key of the published files is understood.
    for file in ["bloom-176b.json", "bloom-560m.json"] {
        let (_, notes) = hf::load_with_notes(&fixture(file)).unwrap();
        assert!(notes.ignored.is_empty(), "{file}: {:?}", notes.ignored);
        assert_eq!(notes.model_type.as_deref(), Some("bloom"));
    }

    // One LayerNorm per norm: the embedding's, two a layer, the final one; no rotary
    // op and no position input, under flash and eager attention alike.
    let mut two = small;
    two.layers = 2;
    for attention in [Attention::Flash, Attention::Eager] {
        let g = build_forward(&zoo::with_attention(two.clone(), attention)).unwrap();
        verify(&g).unwrap();
        let norms = |block: Block| {
            g.ops()
                .filter(|&o| g.node(o).block == block && matches!(g.op(o), Op::LayerNorm { .. }))
                .count()
        };
        assert_eq!(norms(Block::Embed), 1);
        assert_eq!((norms(Block::Layer(0)), norms(Block::Layer(1))), (2, 2));
        assert_eq!(norms(Block::Head), 1);
        assert!(!g.ops().any(|o| matches!(g.op(o), Op::Rotary { .. })));
        assert!(g.find_source("positions").is_none());
        assert!(g.find_source("embed.norm.bias").is_some());
    }
}

/// A small BLOOM file to mutate: bigscience/bloom-560m's.
fn bloom_560m() -> String {
    std::fs::read_to_string(fixture("bloom-560m.json")).unwrap()
}

#[test]
fn bloom_refuses_what_it_does_not_model_naming_the_key() {
    let base = bloom_560m();
    let cases: &[(&str, &str, &str)] = &[
        // The residual taken after each layernorm is not modeled.
        (
            "apply_residual_connection_post_layernorm",
            "true",
            "apply_residual_connection_post_layernorm",
        ),
        // Hugging Face's MLP is 4h whatever `n_inner` says.
        ("n_inner", "5000", "n_inner"),
        // Two spellings of one size that disagree (`n_embed` wins in BloomConfig).
        ("n_embed", "2048", "hidden_size"),
        ("num_attention_heads", "8", "num_attention_heads"),
        ("num_hidden_layers", "12", "num_hidden_layers"),
        ("n_head", "0", "n_head"),
        ("hidden_size", "1000", "hidden_size"), // not a multiple of 16 heads
        ("layer_norm_epsilon", "-1e-5", "layer_norm_epsilon"),
        ("tie_word_embeddings", "\"yes\"", "tie_word_embeddings"),
        ("hidden_dropout", "1.0", "dropout"),
    ];
    for &(key, value, field) in cases {
        assert_eq!(
            invalid_field(&with_field(&base, key, value)),
            field,
            "{key} = {value}"
        );
    }
    let msg = hf::from_json_str(
        "b.json",
        &with_field(&base, "apply_residual_connection_post_layernorm", "true"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("apply_residual_connection_post_layernorm") && msg.contains("b.json"),
        "{msg}"
    );
    // What agrees is accepted: n_inner = 4h, the same size spelled twice, the older
    // `n_embed` alone (bigscience/bloom's file), an untied head.
    for (key, value) in [
        ("n_inner", "4096"),
        ("n_embed", "1024"),
        ("num_hidden_layers", "24"),
        ("apply_residual_connection_post_layernorm", "false"),
    ] {
        let cfg = hf::from_json_str("b", &with_field(&base, key, value))
            .unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
        assert_eq!(cfg.param_count(), 559_214_592, "{key} = {value}");
    }
    let untied = hf::from_json_str("b", &with_field(&base, "tie_word_embeddings", "false"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_params(&untied, 559_214_592 + 250_880 * 1024);
    // A missing size names the modern key.
    let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
    if let Some(m) = v.as_object_mut() {
        m.remove("hidden_size");
    }
    assert!(matches!(
        hf::from_json_str("b", &v.to_string()),
        Err(ModelError::MissingField { field, .. }) if field == "hidden_size"
    ));
}

/// Plans and configurations saved before ALiBi and the embedding norm existed still
/// load (the new field defaults to no norm), and ALiBi round-trips as `"alibi"`.
#[test]
fn configurations_saved_before_alibi_still_load() {
    let gpt2 = zoo_model("gpt2");
    let mut v = serde_json::to_value(&gpt2).unwrap();
    if let Some(m) = v.as_object_mut() {
        assert!(m.remove("embed_norm").is_some());
    }
    let back: ModelConfig = serde_json::from_value(v).unwrap();
    assert_eq!(back, gpt2);
    let bloom = zoo_model("bloom-176b");
    let text = serde_json::to_string(&bloom).unwrap();
    assert!(text.contains(r#""position":"alibi""#), "{text}");
    assert!(text.contains(r#""embed_norm":true"#), "{text}");
    assert_eq!(serde_json::from_str::<ModelConfig>(&text).unwrap(), bloom);
}

/// BLOOM-176B's training layout (Le Scao et al. 2022, section 3.4: 384 A100-80GB, TP 4,
/// PP 12, DP 8, micro-batch 2, global batch 2048 of 2048 tokens, ZeRO-1) compiles and
/// fits in memory; Megatron-LM's export refuses ALiBi and the embedding norm up front
/// (Megatron-DeepSpeed, which trained BLOOM, has both). No time is asserted.
#[test]
fn bloom_176b_plans_at_its_training_layout() {
    use apar::cluster::Cluster;
    use apar::engine::Engine;
    use apar::passes::{Config, Recompute};
    use apar::{PlanOptions, Session};

    let model = zoo_model("bloom-176b");
    let cluster = Cluster::resolve("dgx-a100-80g:48").unwrap();
    let mut opts = PlanOptions::new(2048, 2048);
    opts.memory_ratio = 1.0;
    let session = Session::for_config(&model, &cluster, &opts).unwrap();
    let mut c = Config::new(8, 4, 12, 2, 128);
    c.recompute = Recompute::Full;
    c.zero = 1;
    let plan = session.evaluate(&c).unwrap_or_else(|e| panic!("{e}"));
    assert!(plan.step_time_s > 0.0 && plan.step_time_s.is_finite());
    assert!(plan.mfu > 0.0 && plan.mfu < plan.hfu && plan.hfu < 1.0);
    assert!(plan.memory.peak_bytes <= plan.memory.budget_bytes);
    assert_eq!(plan.stages.len(), 12);

    let err = apar::engine::export::model_supported(
        Engine::Megatron,
        &model,
        apar::engine::memory::Precision::Bf16,
    )
    .unwrap_err();
    assert!(err.to_string().contains("ALiBi"), "{err}");
    let mut no_alibi = model.clone();
    no_alibi.position = Position::Rotary {
        dims: 128,
        theta: 10000.0,
    };
    let err = apar::engine::export::model_supported(
        Engine::Megatron,
        &no_alibi,
        apar::engine::memory::Precision::Bf16,
    )
    .unwrap_err();
    assert!(err.to_string().contains("embedding"), "{err}");
    assert!(apar::engine::export::model_supported(
        Engine::DeepSpeed,
        &model,
        apar::engine::memory::Precision::Bf16
    )
    .is_ok());
}

/// A small BLOOM block through the reference interpreter: the unsharded and the
/// tensor-parallel training steps (tp 2, 4, with and without sequence parallelism)
/// give the same loss and gradients, the embedding LayerNorm included.
#[test]
fn interpreter_agrees_on_a_bloom_block() {
    use apar::shard::{interp, ModelCost, ShardOptions, Sharder};

    let mut text = bloom_560m();
    for (key, value) in [
        ("hidden_size", "64"),
        ("n_head", "4"),
        ("n_layer", "2"),
        ("vocab_size", "256"),
    ] {
        text = with_field(&text, key, value);
    }
    let cfg = hf::from_json_str("tiny-bloom", &text).unwrap_or_else(|e| panic!("{e}"));
    let fwd = build_forward(&cfg).unwrap();
    // A slow device on a fast link, so that the tiny block shards like a large one.
    let mut cluster = apar::cluster::Cluster::resolve("dgx-a100-80g:1").expect("preset");
    cluster.device.peak_bf16_flops = 1e9;
    cluster.device.peak_fp32_flops = 1e9;
    cluster.device.memory_bandwidth = 1e9;
    cluster.intra_node.bandwidth = 1e12;
    cluster.intra_node.latency_s = 1e-6;
    let model = apar::cost::CostModel::new(cluster);
    for tp in [2, 4] {
        for sp in [false, true] {
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
            let label = format!("tp {tp} sp {sp}: {c:?}");
            assert!(c.params > 0, "{label}");
            assert!(c.loss_error < 1e-4, "{label}");
            assert!(c.grad_error < 1e-4, "{label}");
            assert!(c.replica_error < 1e-4, "{label}");
            let layer = Block::Layer(0);
            let reduces = m.collectives(layer).get("all_reduce").copied().unwrap_or(0)
                + m.collectives(layer)
                    .get("reduce_scatter")
                    .copied()
                    .unwrap_or(0);
            assert_eq!(reduces, 2, "{label}: {:?}", m.collectives(layer));
        }
    }
}

/// A zoo model's trained positions are its published config's
/// `max_position_embeddings` (the committed `tests/data/hf/*.json` files), so a zoo
/// name warns beyond them as the same `config.json` does.
#[test]
fn zoo_trained_positions_follow_the_committed_configs() {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf");
    for (zoo_name, file) in [
        ("llama2-7b", "llama-2-7b.json"),
        ("mistral-7b", "mistral-7b.json"),
        ("qwen2-7b", "qwen2-7b.json"),
        ("gemma2-9b", "gemma-2-9b.json"),
        ("gemma2-27b", "gemma-2-27b.json"),
        ("mixtral-8x7b", "mixtral-8x7b.json"),
        ("mixtral-8x22b", "mixtral-8x22b.json"),
        ("qwen3-30b-a3b", "qwen3-30b-a3b.json"),
        ("qwen3-235b-a22b", "qwen3-235b-a22b.json"),
        ("deepseek-v3", "deepseek-v3.json"),
        ("deepseek-v2-lite", "deepseek-v2-lite.json"),
        ("gpt-oss-20b", "gpt-oss-20b.json"),
        ("gpt-oss-120b", "gpt-oss-120b.json"),
        // Every Llama 3.1 model is trained to the same 131,072 positions.
        ("llama3-405b", "llama-3.1-8b.json"),
    ] {
        let (_, notes) = apar::models::hf::load_with_notes(&data.join(file)).unwrap();
        assert!(notes.trained_positions.is_some(), "{file}");
        assert_eq!(
            apar::models::zoo::trained_positions(zoo_name),
            notes.trained_positions,
            "{zoo_name} against {file}"
        );
    }
    // Learned positions carry their own limit.
    assert_eq!(apar::models::zoo::trained_positions("gpt2"), None);
}

/// Phi-3's long-context configs give LongRoPE without a `factor`; Transformers takes
/// `max_position_embeddings / original_max_position_embeddings` (here 131072 / 4096).
#[test]
fn longrope_without_factor_takes_the_context_ratio() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf/phi-3-mini-4k.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["max_position_embeddings"] = 131072.into();
    v["original_max_position_embeddings"] = 4096.into();
    v["rope_scaling"] = serde_json::json!({
        "type": "longrope", "long_factor": [1.0, 2.0], "short_factor": [1.0, 1.0]
    });
    let cfg = hf::from_json_str("phi3-128k", &v.to_string()).unwrap();
    let r = cfg.rope_scaling.expect("longrope kept");
    assert_eq!((r.rope_type.as_str(), r.factor), ("longrope", 32.0));
    // Without the lengths there is nothing to take it from: still refused.
    v["original_max_position_embeddings"] = serde_json::Value::Null;
    let e = hf::from_json_str("phi3-128k", &v.to_string()).unwrap_err();
    assert!(e.to_string().contains("no `factor`"), "{e}");
}

/// Rotary-scaling values Transformers' rope validation rejects are refused by name;
/// DeepSeek's default `mscale_all_dim` of 0 is taken.
#[test]
fn rope_scaling_values_out_of_range_are_refused() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf/llama-2-7b.json");
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let load = |scaling: serde_json::Value| {
        let mut v = base.clone();
        v["rope_scaling"] = scaling;
        hf::from_json_str("scaled", &v.to_string()).and_then(|c| c.validate().map(|()| c))
    };
    for (scaling, why) in [
        (
            serde_json::json!({"rope_type": "llama3", "factor": 0.5}),
            "at least 1",
        ),
        (
            serde_json::json!({"rope_type": "llama3", "factor": 8, "low_freq_factor": -1}),
            "low_freq_factor -1",
        ),
        (
            serde_json::json!({"rope_type": "yarn", "factor": 4, "beta_fast": 0}),
            "beta_fast 0",
        ),
    ] {
        let e = load(scaling).unwrap_err().to_string();
        assert!(e.contains(why), "{e}");
    }
    let ok = load(serde_json::json!({"rope_type": "yarn", "factor": 4, "mscale_all_dim": 0}));
    assert_eq!(ok.unwrap().rope_scaling.unwrap().mscale_all_dim, Some(0.0));
}
