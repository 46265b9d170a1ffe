//! Training-graph derivation checked against published formulas.

use apar::ir::{verify, Block, Env, OpKind};
use apar::models::{build_forward, zoo};
use apar::train::memory::{model_state_bytes, param_count, saved_activation_bytes};
use apar::train::{training_graph, TrainOptions};

/// GPT-3 175B in Megatron form (Korthikanti et al. 2022, Table 3): 96 layers, h 12288,
/// 96 heads, vocabulary 51200, decomposed attention with dropout.
fn gpt3_training_graph() -> apar::ir::Graph {
    let cfg = zoo::lookup("gpt3-175b").unwrap();
    training_graph(&build_forward(&cfg).unwrap(), &TrainOptions::default()).unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b
}

/// Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
/// Models", Eq. 1: activations per layer without parallelism = s·b·h·(34 + 5·a·s/h)
/// bytes (16-bit activations, 1-byte dropout masks).
#[test]
fn gpt3_activation_bytes_per_layer_match_korthikanti_eq1() {
    let g = gpt3_training_graph();
    let (s, b, h, a) = (2048.0, 1.0, 12288.0, 96.0);
    let expected = s * b * h * (34.0 + 5.0 * a * s / h);
    let saved = saved_activation_bytes(&g, Env::new(1, 2048)).unwrap();
    for layer in [0, 47, 95] {
        let got = saved[&Block::Layer(layer)] as f64;
        assert!(
            rel(got, expected) < 0.01,
            "layer {layer}: {got} vs {expected}"
        );
    }
}

/// Rajbhandari et al. 2020 (ZeRO), Sec. 3.1: mixed-precision Adam keeps 2Ψ + 2Ψ + KΨ
/// bytes with K = 12.
#[test]
fn model_states_are_sixteen_bytes_per_parameter() {
    for name in ["tiny-gpt", "tiny-llama", "gpt2"] {
        let cfg = zoo::lookup(name).unwrap();
        let g = training_graph(&build_forward(&cfg).unwrap(), &TrainOptions::default()).unwrap();
        verify(&g).unwrap();
        let psi = param_count(&g).unwrap();
        assert_eq!(psi, cfg.param_count());
        let m = model_state_bytes(&g, Env::new(1, 128)).unwrap();
        assert_eq!(m.low_prec_params, 2 * psi, "{name}");
        assert_eq!(m.grads, 2 * psi, "{name}");
        assert_eq!(m.params_fp32 + m.optimizer, 12 * psi, "{name}");
    }
}

/// Narayanan et al. 2021 (Megatron-LM, SC'21) Eq. 3 without the recomputation pass:
/// a forward and backward pass of b sequences costs 72·b·s·l·h²·(1 + s/(6h) + V/(12lh)).
#[test]
fn gpt3_flops_match_megatron_eq3() {
    let g = gpt3_training_graph();
    let (b, s, l, h, v) = (1.0, 2048.0, 96.0, 12288.0, 51200.0);
    let expected = 72.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (12.0 * l * h));
    let got = g.total_flops(Env::new(1, 2048)).unwrap() as f64;
    assert!(rel(got, expected) < 0.02, "{got:e} vs {expected:e}");
}

#[test]
fn derivative_rules_read_exactly_what_the_op_table_says_they_save() {
    let mut seen = std::collections::BTreeSet::new();
    // A small gpt-oss: attention sinks, clamped SwiGLU, per-expert biases.
    let mut oss = zoo::lookup("gpt-oss-20b").unwrap();
    (oss.layers, oss.hidden, oss.heads, oss.kv_heads) = (2, 64, 4, 2);
    (oss.head_dim, oss.vocab) = (16, 256);
    oss.position = apar::models::Position::Rotary {
        dims: 16,
        theta: 1e4,
    };
    if let Some(m) = oss.moe.as_deref_mut() {
        (m.experts, m.expert_ffn) = (4, 32);
    }
    for cfg in [
        zoo::lookup("tiny-gpt").unwrap(),
        zoo::lookup("tiny-llama").unwrap(),
        oss,
    ] {
        let mut cfg = cfg;
        let sinks = cfg.attn_sinks;
        for attention in [
            apar::models::Attention::Eager,
            apar::models::Attention::Flash,
        ] {
            if sinks && attention == apar::models::Attention::Eager {
                continue; // sinks are an input of the fused ops only
            }
            cfg.attention = attention;
            let fwd = build_forward(&cfg).unwrap();
            let (_, report) =
                apar::train::derive_with_report(&fwd, &TrainOptions::default()).unwrap();
            for (op, read) in report {
                let info = fwd.op(op).info();
                // A saved input an op may lack (sdpa's mask, an attention op's sinks)
                // applies when the input is there (`ir-spec` §7).
                let inputs = fwd.node(op).inputs.len();
                let declared: std::collections::BTreeSet<_> = info
                    .saves
                    .iter()
                    .copied()
                    .filter(|s| !matches!(s, apar::ir::Saved::Input(i) if *i >= inputs))
                    .collect();
                // In these models every float tensor depends on a parameter, so each
                // rule computes every input gradient and reads all it declares.
                assert_eq!(read, declared, "{}", info.name);
                seen.insert(fwd.op(op).kind());
            }
        }
    }
    for k in [
        OpKind::MatMul,
        OpKind::Softmax,
        OpKind::Dropout,
        OpKind::LayerNorm,
        OpKind::RmsNorm,
        OpKind::FlashAttention,
        OpKind::CrossEntropy,
        OpKind::Gelu,
        OpKind::Silu,
        OpKind::Embedding,
        OpKind::Clamp,
        OpKind::GroupedBiasAdd,
    ] {
        assert!(seen.contains(&k), "{k:?} not exercised");
    }
}
