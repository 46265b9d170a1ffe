//! Issue 9: what each engine can run, and the pipeline cut never makes memory worse.
//!
//! Engine facts cite the engine's source (see `src/engine/rules.rs` for versions);
//! memory facts are properties of the cut selection, not numbers from apar's output.

use apar::cluster::Cluster;
use apar::engine::rules::{BlockLayout, Unsupported};
use apar::engine::Engine;
use apar::lower::compile::{Compiler, ModelSource};
use apar::lower::StageSpan;
use apar::models::zoo;
use apar::passes::candidates::{enumerate_for, Constraints};
use apar::passes::{Config, Recompute, Schedule};
use apar::{plan_model, PlanError, PlanOptions};
use proptest::prelude::*;

fn compiler(model: &str, cluster: Cluster, seq: u64, batch: u64, ratio: f64) -> Compiler {
    Compiler::new(
        ModelSource::Config(zoo::lookup(model).unwrap()),
        cluster,
        seq,
        batch,
        ratio,
    )
    .unwrap()
}

/// `cluster` with devices of `gb` × 10^9 bytes.
fn with_memory(spec: &str, gb: u64) -> Cluster {
    let mut c = Cluster::resolve(spec).unwrap();
    c.device.memory_bytes = gb * 1_000_000_000;
    c.usable_memory_bytes = None;
    c
}

/// Llama-3-70B on 4 × DGX H100: tp 4, pp 4, dp 2, SP, micro-batch 1, global batch 32,
/// seq 4096, ZeRO-1, interleaved with 10 virtual stages (2 layers each, Megatron-LM's
/// even split), memory ratio 1.0. The same configuration on devices with more memory
/// never reports a lower peak, and a fit never turns into an out-of-memory.
#[test]
fn llama3_70b_interleaved_more_memory_never_lowers_the_peak() {
    let cfg = Config {
        dp: 2,
        tp: 4,
        pp: 4,
        cp: 1,
        ep: 1,
        etp: 1,
        micro_batch: 1,
        num_micro_batches: 16,
        sp: true,
        recompute: Recompute::None,
        recompute_layers: None,
        recompute_modules: None,
        zero: 1,
        low_prec_shard: false,
        schedule: Schedule::Interleaved(10),
    };
    let run = |gb| {
        compiler("llama3-70b", with_memory("dgx-h100:4", gb), 4096, 32, 1.0)
            .evaluate(&cfg)
            .unwrap()
    };
    let evals: Vec<_> = [64, 72, 80, 88, 96, 112, 141]
        .map(run)
        .into_iter()
        .collect();
    for w in evals.windows(2) {
        let (small, large) = (&w[0], &w[1]);
        assert!(
            small.peak_bytes <= large.peak_bytes,
            "{} GB budget: peak {} > {} at {} GB",
            small.budget_bytes,
            small.peak_bytes,
            large.peak_bytes,
            large.budget_bytes
        );
        if small.fits {
            assert!(large.fits);
        }
    }
    // The report: out of memory on 80 GB but a fit with a lower peak on 96 GB.
    // Whatever the verdicts, the 80 GB report's peak is at most the 96 GB one.
    let (at80, at96) = (&evals[2], &evals[4]);
    assert!(at80.peak_bytes <= at96.peak_bytes);
    // The largest device fits it (H200-sized: 141 GB).
    assert!(evals[6].fits);
    // A cut that 96 GB runs within 80 GB is available to 80 GB as well.
    if at96.peak_bytes <= at80.budget_bytes {
        assert!(at80.fits);
    }
    // Every cut is one Megatron-LM can express: whole layers, equal per rank chunk.
    let layout = compiler("llama3-70b", with_memory("dgx-h100:4", 80), 4096, 32, 1.0)
        .block_layout()
        .clone();
    for e in &evals {
        assert!(Engine::Megatron.cuts(&cfg, &layout).contains(&e.stages));
    }
}

/// Megatron-LM: 20 layers per rank do not split into 7 virtual stages
/// (`get_num_layers_to_build`), but `--pipeline-model-parallel-layout` places 80 layers
/// on 28 virtual stages, so `plan` lists 7 for Llama-3-70B on 4 stages; 21 virtual
/// stages per rank (84, more than the 80 layers plus the embedding and loss stages)
/// are refused with the engine's reason.
#[test]
fn megatron_places_seven_virtual_stages_by_layout_and_refuses_too_many() {
    let c = compiler(
        "llama3-70b",
        Cluster::resolve("dgx-h100:4").unwrap(),
        4096,
        32,
        1.0,
    );
    let cfg = Config {
        dp: 2,
        tp: 4,
        pp: 4,
        cp: 1,
        ep: 1,
        etp: 1,
        micro_batch: 1,
        num_micro_batches: 16,
        sp: true,
        recompute: Recompute::None,
        recompute_layers: None,
        recompute_modules: None,
        zero: 1,
        low_prec_shard: false,
        schedule: Schedule::Interleaved(7),
    };
    assert_eq!(c.check(&cfg), Ok(()));
    let too_many = Config {
        schedule: Schedule::Interleaved(21),
        ..cfg
    };
    assert!(c.check(&too_many).is_err());
    assert!(matches!(
        Engine::Megatron.allows(&too_many, c.block_layout()),
        Err(Unsupported::LayerSplit {
            engine: Engine::Megatron,
            chunks: 21,
            ..
        })
    ));
    let k = Constraints {
        max_chunks: Some(10),
        ..Constraints::default()
    };
    let all = enumerate_for(Engine::Megatron, c.block_layout(), 32, 8, 32, 1024, &k);
    for v in [7, 10] {
        assert!(all.contains(&Config {
            schedule: Schedule::Interleaved(v),
            ..cfg
        }));
    }
    // torchtitan places any modules per stage (`module_fqns_per_model_part`); with
    // ZeRO-0, as FSDP2 has no optimizer-only sharding.
    let titan = compiler(
        "llama3-70b",
        Cluster::resolve("dgx-h100:4").unwrap(),
        4096,
        32,
        1.0,
    )
    .with_engine(Engine::Torchtitan);
    assert_eq!(titan.check(&Config { zero: 0, ..cfg }), Ok(()));
}

/// DeepSpeed's pipeline engine asserts "ZeRO-2 and ZeRO-3 are incompatible with
/// pipeline parallelism"; pinning ZeRO-3 and 2 stages for it empties the space and
/// says why.
#[test]
fn a_pin_the_engine_cannot_run_names_the_engine() {
    let model = zoo::lookup("tiny-llama").unwrap();
    let cluster = Cluster::resolve("dgx-a100-80g:1").unwrap();
    let mut opts = PlanOptions::new(128, 16);
    opts.engine = Engine::DeepSpeed;
    opts.search.constraints.zero = Some(3);
    opts.search.constraints.pp = Some(2);
    let err = plan_model(&model, &cluster, &opts).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, PlanError::EmptySpace(_))
            && text.contains("deepspeed")
            && text.contains("ZeRO stage 3"),
        "{text}"
    );
    // Megatron-LM has no GPipe (schedules.py): the pin alone empties its space.
    opts.engine = Engine::Megatron;
    opts.search.constraints = Constraints {
        schedule: Some(Schedule::Gpipe),
        pp: Some(2),
        ..Constraints::default()
    };
    let text = plan_model(&model, &cluster, &opts).unwrap_err().to_string();
    assert!(
        text.contains("megatron") && text.contains("gpipe"),
        "{text}"
    );
}

fn small_job() -> impl Strategy<Value = (&'static str, u32, &'static str, u64, u64, Engine)> {
    (
        prop::sample::select(vec!["tiny-gpt", "tiny-llama", "gpt2"]),
        1u32..9,
        prop::sample::select(vec!["dgx-a100-80g:1", "dgx-h100:2", "dgx-a100-40g:1"]),
        prop::sample::select(vec![32u64, 64, 128]),
        prop::sample::select(vec![8u64, 16, 32, 48]),
        prop::sample::select(Engine::ALL.to_vec()),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// A plan for engine E is always runnable by E: its configuration passes
    /// `E.allows` and its cut is one of E's layer placements.
    #[test]
    fn every_plan_is_runnable_by_its_engine(job in small_job()) {
        let (name, layers, cluster, seq, batch, engine) = job;
        let mut model = zoo::lookup(name).unwrap();
        model.layers = layers;
        let cluster = Cluster::resolve(cluster).unwrap();
        let mut opts = PlanOptions::new(seq, batch);
        opts.engine = engine;
        if let Ok(p) = plan_model(&model, &cluster, &opts) {
            let layout = BlockLayout::transformer(layers as usize);
            prop_assert_eq!(p.engine, engine);
            prop_assert_eq!(engine.allows(&p.config, &layout), Ok(()));
            let spans: Vec<StageSpan> = p
                .stages
                .iter()
                .map(|s| StageSpan { first: s.blocks[0], last: s.blocks[1] })
                .collect();
            prop_assert!(engine.cuts(&p.config, &layout).contains(&spans));
        }
    }

    /// For a fixed configuration, more device memory never turns a fit into an
    /// out-of-memory and never lowers the peak (so an out-of-memory report's peak is
    /// at most what any larger device would hold).
    #[test]
    fn more_memory_never_hurts(
        job in small_job(),
        pick in any::<prop::sample::Index>(),
        gb in 1u64..80,
        more in 0u64..80,
        recompute_layers in 0u32..3,
    ) {
        let (name, layers, cluster, seq, batch, engine) = job;
        let mut model = zoo::lookup(name).unwrap();
        model.layers = layers;
        let make = |gb: u64| {
            let mut c = Cluster::resolve(cluster).unwrap();
            // A small budget so that some cuts do not fit.
            c.device.memory_bytes = gb * 1_000_000 * u64::from(layers);
            c.usable_memory_bytes = None;
            Compiler::new(ModelSource::Config(model.clone()), c, seq, batch, 1.0)
                .unwrap()
                .with_engine(engine)
        };
        let (small, large) = (make(gb), make(gb + more));
        let all = enumerate_for(
            engine,
            small.block_layout(),
            small.cluster.devices(),
            small.cluster.devices_per_node,
            batch,
            small.seq,
            &Constraints::default(),
        );
        prop_assume!(!all.is_empty());
        let mut cfg = all[pick.index(all.len())];
        // Megatron-LM's `--recompute-method block --recompute-num-layers k` (full only).
        if engine == Engine::Megatron && cfg.recompute == Recompute::Full && recompute_layers > 0 {
            cfg.recompute_layers = Some(recompute_layers);
        }
        if let (Ok(a), Ok(b)) = (small.evaluate(&cfg), large.evaluate(&cfg)) {
            prop_assert!(a.peak_bytes <= b.peak_bytes, "{} > {}", a.peak_bytes, b.peak_bytes);
            if a.fits {
                prop_assert!(b.fits);
            }
        }
    }
}
