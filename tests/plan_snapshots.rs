//! Snapshots of the plans apar chooses for a matrix of zoo models and clusters (JSON
//! without wall-clock timings), and the check that `--exhaustive` (no shortcut)
//! chooses the same plan on every scenario.

use apar::cluster::Cluster;
use apar::models::zoo;
use apar::search::SearchOptions;
use apar::{plan_model, PlanOptions};
use serde_json::json;

/// (model, cluster, global batch, sequence length)
const SCENARIOS: &[(&str, &str, u64, u64)] = &[
    ("gpt2", "dgx-a100-80g:1", 32, 1024),
    ("megatron-1.7b", "dgx-a100-80g:1", 32, 2048),
    ("llama2-7b", "dgx-a100-80g:1", 16, 2048),
    ("megatron-7.5b", "dgx-a100-80g:4", 64, 2048),
    ("megatron-22b", "dgx-a100-80g:4", 128, 2048),
    ("llama2-13b", "dgx-a100-80g:4", 64, 4096),
    ("mistral-7b", "dgx-a100-80g:4", 128, 4096),
    ("megatron-39.1b", "dgx-a100-80g:16", 256, 2048),
    ("llama2-70b", "dgx-a100-80g:16", 128, 4096),
    ("gpt3-175b", "dgx-a100-80g:128", 1536, 2048),
    ("megatron-145.6b", "dgx-a100-80g:128", 1024, 2048),
    ("llama3-8b", "dgx-h100:1", 32, 8192),
    ("qwen2-7b", "dgx-h100:1", 32, 4096),
    ("llama3-70b", "dgx-h100:64", 512, 8192),
    ("llama2-70b", "dgx-h100:64", 1024, 4096),
    ("llama3-405b", "dgx-h100:2048", 2048, 8192),
    ("gpt2-xl", "moai-xlarge", 64, 1024),
    ("llama2-7b", "moai-xlarge", 32, 2048),
    ("llama2-13b", "moai-2xlarge", 64, 1024),
    ("llama2-13b", "moai-4xlarge", 64, 1024),
    ("llama2-70b", "moai-4xlarge", 64, 2048),
    ("llama2-70b", "moai-8xlarge", 128, 4096),
];

fn summary(p: &apar::Plan) -> serde_json::Value {
    let e = p.summary();
    json!({
        "config": p.config,
        "step_time_s": format!("{:.4e}", e.step_time_s),
        "mfu": format!("{:.3}", e.mfu),
        "hfu": format!("{:.3}", e.hfu),
        "budget_bytes": e.memory.budget_bytes,
        "peak_bytes": e.memory.per_stage.iter().map(|m| m.peak_bytes).collect::<Vec<_>>(),
        "stages": e.stages.iter().map(|s| s.blocks).collect::<Vec<_>>(),
        "candidates": p.search.map(|s| s.candidates),
    })
}

#[test]
fn chosen_plans() {
    for &(model, cluster, batch, seq) in SCENARIOS {
        let cfg = zoo::lookup(model).unwrap();
        let c = Cluster::resolve(cluster).unwrap();
        let opts = PlanOptions::new(seq, batch);
        let p = plan_model(&cfg, &c, &opts).unwrap_or_else(|e| panic!("{model} on {cluster}: {e}"));
        assert_eq!(p.config.devices(), c.devices());
        assert_eq!(p.config.global_batch(), batch);
        assert!(p.memory.peak_bytes <= p.memory.budget_bytes);
        let name = format!("{model}-{}-b{batch}-s{seq}", cluster.replace(':', "x"));
        insta::assert_json_snapshot!(name, summary(&p));

        let exhaustive = PlanOptions {
            search: SearchOptions {
                exhaustive: true,
                ..opts.search.clone()
            },
            ..opts
        };
        let q = plan_model(&cfg, &c, &exhaustive).unwrap();
        assert_eq!(
            p.config, q.config,
            "{model} on {cluster}: --exhaustive chose differently"
        );
    }
}
