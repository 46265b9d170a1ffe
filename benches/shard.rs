//! Sharding every block template of Llama-3-405B (embedding, layer, head) for
//! tp ∈ {1, 2, 4, 8} × sp on/off: 24 e-graph runs, timed together (goal: < 200 ms on
//! a 2-core machine). Before timing, prints each run's e-graph size and stop reason.
//!
//! `shard_model` on the one-layer model runs exactly the three templates of the full
//! model (every layer shares one template); the full 126-layer model is timed too, to
//! show what stitching the cached blocks adds.

use apar::models::{build_forward, zoo};
use apar::shard::{shard_model, ShardOptions};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

const DEGREES: [u32; 4] = [1, 2, 4, 8];

fn configs() -> impl Iterator<Item = ShardOptions> {
    DEGREES
        .into_iter()
        .flat_map(|tp| [false, true].map(|sp| ShardOptions::new(tp, sp)))
}

fn bench(c: &mut Criterion) {
    let mut one = zoo::lookup("llama3-405b").expect("zoo model");
    let full = build_forward(&one).expect("builds");
    one.layers = 1;
    let templates = build_forward(&one).expect("builds");

    println!("llama3-405b block templates:");
    println!("tp  sp     template  stop        iters  e-nodes  e-classes");
    for opts in configs() {
        let m = shard_model(&templates, &opts).expect("shards");
        for run in &m.templates {
            println!(
                "{:<3} {:<6} {:<9} {:<11} {:>5} {:>8} {:>10}",
                opts.tp,
                opts.sp,
                run.first_block.to_string(),
                format!("{:?}", run.report.stop),
                run.report.iterations,
                run.report.enodes,
                run.report.eclasses
            );
        }
    }

    c.bench_function("shard llama3-405b templates, tp 1-8 x sp (24 runs)", |b| {
        b.iter(|| {
            for opts in configs() {
                black_box(shard_model(black_box(&templates), &opts).expect("shards"));
            }
        })
    });
    c.bench_function("shard llama3-405b full model, tp 8 sp", |b| {
        let opts = ShardOptions::new(8, true);
        b.iter(|| black_box(shard_model(black_box(&full), &opts).expect("shards")))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = bench
}
criterion_main!(benches);
