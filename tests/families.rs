//! Today's model families through the planner: what their utilisation counts, and
//! exports that refuse what they cannot write instead of dropping it.

use apar::cluster::Cluster;
use apar::engine::Engine;
use apar::models::{hf, zoo};
use apar::passes::Config;
use apar::{PlanOptions, Session};
use std::path::Path;

/// A token meets `k` of the `E` routed experts, so MFU counts active parameters: the
/// model FLOPs of a Qwen3-30B-A3B step (3.3B of 30.5B parameters active) are under
/// the FLOPs the devices execute (HFU), and both are fractions of the peak.
#[test]
fn moe_utilisation_counts_active_parameters() {
    let model = zoo::lookup("qwen3-30b-a3b").unwrap();
    let cluster = Cluster::resolve("dgx-h100:4").unwrap();
    let mut opts = PlanOptions::new(4096, 64);
    opts.memory_ratio = 1.0;
    let session = Session::for_config(&model, &cluster, &opts).unwrap();
    let mut c = Config::new(32, 1, 1, 1, 2);
    c.recompute = apar::passes::Recompute::Full;
    c.zero = 3;
    let plan = session.evaluate(&c).unwrap();
    assert!(
        plan.mfu > 0.0 && plan.mfu < plan.hfu && plan.hfu < 1.0,
        "MFU {} HFU {}",
        plan.mfu,
        plan.hfu
    );
}

/// Megatron-LM's GPT model has no sandwich norms, GeGLU or soft-capping: a Gemma 2
/// plan's export is refused naming what is missing, and the plan says so up front;
/// per-head query/key norms are `--qk-layernorm`, whole-projection ones are not.
#[test]
fn megatron_refuses_what_its_export_cannot_write() {
    let cfg = hf::load(Path::new("tests/data/hf/gemma-2-9b.json")).unwrap();
    let err = apar::engine::export::model_supported(
        Engine::Megatron,
        &cfg,
        apar::engine::memory::Precision::Bf16,
    )
    .unwrap_err();
    assert!(err.to_string().contains("norm placement"), "{err}");
    // OLMo 2 normalizes the whole query/key projections; `--qk-layernorm` is per head.
    let olmo2 = hf::load(Path::new("tests/data/hf/olmo-2-1124-7b.json")).unwrap();
    let err = apar::engine::export::model_supported(
        Engine::Megatron,
        &olmo2,
        apar::engine::memory::Precision::Bf16,
    )
    .unwrap_err();
    assert!(err.to_string().contains("whole projection"), "{err}");
    let llama = zoo::lookup("llama3-8b").unwrap();
    assert!(apar::engine::export::model_supported(
        Engine::Megatron,
        &llama,
        apar::engine::memory::Precision::Bf16
    )
    .is_ok());
}

/// A saved plan is re-costed from its `model` entry; an edited `model_config` would
/// be ignored, so it is refused.
#[test]
fn an_edited_model_config_is_refused() {
    let model = zoo::lookup("llama3-8b").unwrap();
    let cluster = Cluster::resolve("dgx-h100:1").unwrap();
    let opts = PlanOptions::new(4096, 16);
    let plan = Session::for_config(&model, &cluster, &opts)
        .unwrap()
        .plan()
        .unwrap();
    assert!(Session::recost(&plan).is_ok());
    let mut edited = plan.clone();
    edited.model_config.as_mut().unwrap().sliding_window = Some(4096);
    let err = Session::recost(&edited).unwrap_err();
    assert!(err.to_string().contains("model_config"), "{err}");
}

/// transformers 5 saves Qwen-MoE's expert count as `num_local_experts`
/// (`Qwen3MoeConfig.attribute_map` maps `num_experts` to it): either spelling reads the
/// same model, and two that disagree are refused.
#[test]
fn qwen_moe_reads_either_expert_count_spelling() {
    let text = std::fs::read_to_string("tests/data/hf/qwen3-30b-a3b.json").unwrap();
    let original = hf::from_json_str("qwen3-30b-a3b", &text).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let experts = v["num_experts"].clone();
    let o = v.as_object_mut().unwrap();
    o.remove("num_experts");
    o.insert("num_local_experts".into(), experts.clone());
    let renamed = hf::from_json_str("qwen3-30b-a3b", &v.to_string()).unwrap();
    assert_eq!(renamed.param_count(), original.param_count());
    let o = v.as_object_mut().unwrap();
    o.insert(
        "num_experts".into(),
        serde_json::json!(experts.as_u64().unwrap() + 1),
    );
    assert!(hf::from_json_str("qwen3-30b-a3b", &v.to_string()).is_err());
}

/// `layer_types` must list every layer (transformers refuses another length), and
/// Gemma 3's `sliding_window_pattern` must be at least 1 (Hugging Face divides by it).
#[test]
fn layer_patterns_that_do_not_fit_the_model_are_refused() {
    let text = std::fs::read_to_string("tests/data/hf/gpt-oss-20b.json").unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(hf::from_json_str("gpt-oss-20b", &v.to_string()).is_ok());
    v["layer_types"] = serde_json::json!(["sliding_attention", "full_attention"]);
    let e = hf::from_json_str("gpt-oss-20b", &v.to_string()).unwrap_err();
    assert!(e.to_string().contains("layer_types"), "{e}");

    let gemma3 = serde_json::json!({
        "model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "intermediate_size": 2048, "vocab_size": 1024, "sliding_window": 512,
        "sliding_window_pattern": 0
    });
    let e = hf::from_json_str("gemma3", &gemma3.to_string()).unwrap_err();
    assert!(e.to_string().contains("sliding_window_pattern"), "{e}");
}
