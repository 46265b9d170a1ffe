//! Planning benchmarks: the reference scenario, one evaluation of Llama-3.1-405B on
//! 16,384 H100s, the whole 405B search, the whole DeepSeek-V3 search (expert and
//! context parallelism included) on 2,048 H800s, and plan time as layers and devices
//! grow.

use apar::cluster::Cluster;
use apar::lower::compile::{Compiler, ModelSource, DEFAULT_MEMORY_RATIO};
use apar::models::zoo;
use apar::passes::{Config, Recompute, Schedule};
use apar::search::{plan_with, SearchOptions};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::time::Duration;

fn compiler(model: &str, cluster: &str, seq: u64, batch: u64, layers: Option<u32>) -> Compiler {
    let mut cfg = zoo::lookup(model).unwrap();
    if let Some(l) = layers {
        cfg.layers = l;
    }
    let c = Cluster::resolve(cluster).unwrap();
    Compiler::new(
        ModelSource::Config(cfg),
        c,
        seq,
        batch,
        DEFAULT_MEMORY_RATIO,
    )
    .unwrap()
}

fn search() -> SearchOptions {
    SearchOptions {
        runners_up: 3,
        ..SearchOptions::default()
    }
}

fn reference(c: &mut Criterion) {
    // Fresh compiler per iteration: nothing is cached between runs.
    c.bench_function("plan/llama2-13b/moai-4xlarge", |b| {
        b.iter(|| {
            let comp = compiler("llama2-13b", "moai-4xlarge", 1024, 64, None);
            plan_with(&comp, &search())
        })
    });
}

fn eval_405b(c: &mut Criterion) {
    let cfg = Config {
        dp: 128,
        tp: 8,
        pp: 16,
        cp: 1,
        ep: 1,
        etp: 1,
        micro_batch: 1,
        num_micro_batches: 16,
        sp: true,
        recompute: Recompute::Selective,
        zero: 1,
        low_prec_shard: false,
        schedule: Schedule::OneFOneB,
        recompute_layers: None,
        recompute_modules: None,
    };
    c.bench_function("eval/llama3-405b/dgx-h100:2048", |b| {
        b.iter(|| {
            let comp = compiler("llama3-405b", "dgx-h100:2048", 8192, 2048, None);
            comp.evaluate(&cfg)
        })
    });
}

fn plan_405b(c: &mut Criterion) {
    let mut g = c.benchmark_group("plan-405b");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("llama3-405b/dgx-h100:2048/whole-space", |b| {
        b.iter(|| {
            let comp = compiler("llama3-405b", "dgx-h100:2048", 8192, 2048, None);
            plan_with(&comp, &search())
        })
    });
    g.finish();
}

fn plan_deepseek_v3(c: &mut Criterion) {
    // Issue 11's target: DeepSeek-V3 on 2,048 H800-class GPUs over the whole space
    // (57,400 candidates), fresh compiler per iteration.
    let mut g = c.benchmark_group("plan-deepseek-v3");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("hgx-h800:256/whole-space", |b| {
        b.iter(|| {
            let comp = compiler("deepseek-v3", "hgx-h800:256", 4096, 15360, None);
            plan_with(&comp, &search())
        })
    });
    g.finish();
}

fn scaling(c: &mut Criterion) {
    let mut g = c.benchmark_group("plan-scaling");
    g.sample_size(10);
    for layers in [8u32, 32, 128] {
        for nodes in [1u32, 8, 64] {
            let id = BenchmarkId::new(format!("layers-{layers}"), format!("dgx-a100-80g:{nodes}"));
            g.bench_with_input(id, &(layers, nodes), |b, &(layers, nodes)| {
                b.iter(|| {
                    let comp = compiler(
                        "megatron-7.5b",
                        &format!("dgx-a100-80g:{nodes}"),
                        2048,
                        u64::from(nodes) * 64,
                        Some(layers),
                    );
                    plan_with(&comp, &search())
                })
            });
        }
    }
    g.finish();
}

criterion_group!(
    benches,
    reference,
    eval_405b,
    plan_405b,
    plan_deepseek_v3,
    scaling
);
criterion_main!(benches);
