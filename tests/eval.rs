//! End-to-end evaluation of single configurations (issue: cluster, cost, passes,
//! lowering). Reference numbers come from the cited papers, not from apar's output.

use apar::cluster::Cluster;
use apar::engine::Engine;
use apar::lower::compile::{Compiler, ModelSource, DEFAULT_MEMORY_RATIO};
use apar::lower::schedule::Pass;
use apar::lower::StageSpan;
use apar::models::zoo;
use apar::passes::{Config, Recompute, Schedule};
use apar::report::trace;

fn config(dp: u32, tp: u32, pp: u32, b: u32, m: u32, zero: u8) -> Config {
    Config {
        dp,
        tp,
        pp,
        cp: 1,
        ep: 1,
        etp: 1,
        micro_batch: b,
        num_micro_batches: m,
        sp: false,
        recompute: Recompute::None,
        zero,
        low_prec_shard: false,
        schedule: Schedule::OneFOneB,
        recompute_layers: None,
        recompute_modules: None,
    }
}

fn compiler(model: &str, cluster: &str, seq: u64, batch: u64) -> Compiler {
    let cfg = zoo::lookup(model).unwrap();
    let cluster = Cluster::resolve(cluster).unwrap();
    Compiler::new(
        ModelSource::Config(cfg),
        cluster,
        seq,
        batch,
        DEFAULT_MEMORY_RATIO,
    )
    .unwrap()
}

/// The reference platform's documented scenario: Llama-2-13B, global batch 64, seq
/// 1024, 32 MI250 GCDs. Plain data parallelism runs out of memory; the configuration
/// the platform selected (2 stages, 4 micro-batches of 1, parameters distributed, no
/// recomputation) fits. The platform keeps bf16 gradients, as DeepSpeed's ZeRO does
/// (Megatron-LM's fp32 main gradients would not fit).
#[test]
fn reference_scenario() {
    let c = compiler("llama2-13b", "moai-4xlarge", 1024, 64).with_engine(Engine::DeepSpeed);
    let plain = c.evaluate(&config(32, 1, 1, 2, 1, 0)).unwrap();
    assert!(!plain.fits, "plain DP peak {}", plain.peak_bytes);
    let chosen = c.evaluate(&config(16, 1, 2, 1, 4, 1)).unwrap();
    assert!(
        chosen.fits,
        "chosen peak {} > {}",
        chosen.peak_bytes, chosen.budget_bytes
    );
}

/// Rajbhandari et al. 2020 (ZeRO), Table 1: model states per device with Ψ parameters
/// and N = 64 data-parallel ranks are 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N and 16Ψ/N bytes for
/// stages 1, 2, 3; without ZeRO (16Ψ = 120 GB for 7.5B) the model does not fit 80 GB.
/// The table counts bf16 gradients: DeepSpeed's engine. "Fits" means fits the 80 GB
/// (memory ratio 1.0), runtime overhead included.
#[test]
fn zero_table_on_megatron_7_5b() {
    let c = Compiler::new(
        ModelSource::Config(zoo::lookup("megatron-7.5b").unwrap()),
        Cluster::resolve("dgx-a100-80g:8").unwrap(),
        2048,
        64,
        1.0,
    )
    .unwrap()
    .with_engine(Engine::DeepSpeed);
    let psi = zoo::lookup("megatron-7.5b").unwrap().param_count() as f64;
    let n = 64.0;
    for (zero, expected) in [
        (1u8, 4.0 * psi + 12.0 * psi / n),
        (2, 2.0 * psi + 14.0 * psi / n),
        (3, 16.0 * psi / n),
    ] {
        let e = c.evaluate(&config(64, 1, 1, 1, 1, zero)).unwrap();
        let m = &e.sim.memory[0];
        let got = (m.params + m.grads + m.optimizer) as f64;
        assert!(
            (got - expected).abs() / expected < 0.01,
            "zero {zero}: {got:e} vs {expected:e}"
        );
        assert!(e.fits, "zero {zero}");
    }
    let e = c.evaluate(&config(64, 1, 1, 1, 1, 0)).unwrap();
    assert!(!e.fits);
}

/// Narayanan et al. 2021 (SC'21), Sec. 2.2: with p stages GPipe keeps all m
/// micro-batches' activations in flight while 1F1B keeps at most p; interleaving
/// shrinks the bubble by the number of chunks.
#[test]
fn schedules_behave_as_theory_says() {
    // pp 4, 8 micro-batches per pipeline (dp 2 × 8 × 1 = 16 sequences).
    // torchtitan runs all three schedules (Megatron-LM has no GPipe); its
    // data-parallel layouts have no ZeRO-1, so ZeRO-0.
    let c = compiler("megatron-1.7b", "dgx-a100-80g:1", 2048, 16).with_engine(Engine::Torchtitan);
    let run = |schedule| {
        c.evaluate(&Config {
            schedule,
            ..config(2, 1, 4, 1, 8, 0)
        })
        .unwrap()
    };
    let inter = run(Schedule::Interleaved(2));
    // GPipe and 1F1B on one cut, the even split of the 24 layers (6 per stage; the
    // cut apar picks depends on the schedule's memory).
    let even: Vec<StageSpan> = [(0, 6), (7, 12), (13, 18), (19, 25)]
        .into_iter()
        .map(|(first, last)| StageSpan { first, last })
        .collect();
    let on_even = |schedule| {
        c.evaluate_cut(
            &Config {
                schedule,
                ..config(2, 1, 4, 1, 8, 0)
            },
            even.clone(),
            true,
        )
        .unwrap()
    };
    let (gpipe, f1b1) = (on_even(Schedule::Gpipe), on_even(Schedule::OneFOneB));
    // GPipe holds all 8 micro-batches on stage 0, 1F1B holds pp = 4: ratio 2.
    let ratio = gpipe.sim.memory[0].activations as f64 / f1b1.sim.memory[0].activations as f64;
    assert!((ratio - 2.0).abs() < 0.05, "activation ratio {ratio}");
    // Both have the same bubble, (p - 1) / m of the ideal time.
    assert!((gpipe.step_time_s - f1b1.step_time_s).abs() / f1b1.step_time_s < 0.05);
    // Interleaving divides the bubble by the number of chunks: on the even split into
    // 8 chunks of 3 layers (the bubble of the cut apar picks also holds the wait
    // of unequal stages).
    assert!(inter.step_time_s < f1b1.step_time_s);
    let chunks: Vec<StageSpan> = [
        (0, 3),
        (4, 6),
        (7, 9),
        (10, 12),
        (13, 15),
        (16, 18),
        (19, 21),
        (22, 25),
    ]
    .into_iter()
    .map(|(first, last)| StageSpan { first, last })
    .collect();
    let inter_even = c
        .evaluate_cut(
            &Config {
                schedule: Schedule::Interleaved(2),
                ..config(2, 1, 4, 1, 8, 0)
            },
            chunks,
            true,
        )
        .unwrap();
    assert!(inter_even.sim.breakdown.bubble_s < f1b1.sim.breakdown.bubble_s);
}

#[test]
fn trace_has_one_track_per_stage_and_svg_renders() {
    let c = compiler("megatron-1.7b", "dgx-a100-80g:1", 2048, 16);
    let e = c.evaluate(&config(2, 1, 4, 1, 8, 1)).unwrap();
    let t = trace::chrome_trace(&e.sim.trace(), e.config.pp);
    let text = serde_json::to_string(&t).unwrap();
    let back: serde_json::Value = serde_json::from_str(&text).unwrap();
    let events = back["traceEvents"].as_array().unwrap();
    let names: Vec<&str> = events
        .iter()
        .filter(|e| e["name"] == "process_name")
        .map(|e| e["args"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["stage 0", "stage 1", "stage 2", "stage 3"]);
    let work = events
        .iter()
        .filter(|e| e["ph"] == "X" && (e["cat"] == "F" || e["cat"] == "B"))
        .count();
    assert_eq!(work, 4 * 8 * 2, "one F and one B per micro-batch per stage");
    // Every unit is split into its blocks: megatron-1.7b has 24 layers, an embedding
    // and a head, each run forward and backward for each of the 8 micro-batches.
    let blocks = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["cat"] == "block")
        .count();
    assert_eq!(blocks, 26 * 8 * 2);
    assert!(events
        .iter()
        .any(|e| e["ph"] == "C" && e["name"] == "memory (bytes)"));
    assert!(e.sim.events.iter().all(|x| x.end >= x.start));
    assert_eq!(
        e.sim.events.iter().filter(|x| x.pass == Pass::B).count(),
        32
    );
    let svg = trace::memory_svg(
        &e.sim.trace(),
        &apar::report::EvalJson::new(&e).memory,
        e.step_time_s,
    );
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    // Three role bands per stage, with axes and a legend.
    assert_eq!(svg.matches("<polygon").count(), 4 * 3);
    assert_eq!(svg.matches("time (s)").count(), 4);
    for role in ["model states", "activations", "temporary", "budget"] {
        assert!(svg.contains(role), "{role}");
    }
}

/// The trace shows the collectives a configuration runs: tensor-parallel collectives
/// inside each block, ZeRO-3's gathers and reduce-scatters per micro-batch, and each
/// block's gradient reduction; a single-stage plot shows memory by role over the step.
#[test]
fn trace_shows_collectives_and_memory_by_role() {
    let c = compiler("megatron-1.7b", "dgx-a100-80g:1", 2048, 16);
    let cats = |cfg: Config| -> Vec<String> {
        let e = c.evaluate(&cfg).unwrap();
        let t = trace::chrome_trace(&e.sim.trace(), e.config.pp);
        t["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["cat"].as_str().map(str::to_string))
            .collect()
    };
    let tp = cats(config(4, 2, 1, 1, 4, 1));
    assert!(tp.iter().any(|c| c == "tp"));
    assert!(tp.iter().any(|c| c == "grad-reduce"));
    assert!(
        !tp.iter().any(|c| c == "dp"),
        "ZeRO-1 reduces once per step"
    );
    let zero3 = cats(config(8, 1, 1, 1, 2, 3));
    assert!(zero3.iter().any(|c| c == "dp"));
    assert!(!zero3.iter().any(|c| c == "tp"));

    let e = c.evaluate(&config(8, 1, 1, 1, 2, 1)).unwrap();
    let trace = e.sim.trace();
    assert_eq!(trace.timeline.len(), 1);
    // Activations rise during the forwards and are freed by the backwards; the
    // optimizer step holds only temporary buffers above the model states.
    assert!(trace.timeline[0].iter().any(|m| m.activations > 0));
    assert!(trace.timeline[0]
        .iter()
        .any(|m| m.temporary > 0 && m.activations == 0));
    let last = trace.timeline[0].last().unwrap();
    assert_eq!((last.activations, last.temporary), (0, 0));
    let svg = trace::memory_svg(
        &trace,
        &apar::report::EvalJson::new(&e).memory,
        e.step_time_s,
    );
    assert_eq!(svg.matches("<polygon").count(), 3);
}

#[test]
fn invalid_configurations_are_rejected() {
    let c = compiler("tiny-gpt", "dgx-a100-80g:1", 128, 16);
    let bad = [
        config(3, 1, 2, 1, 1, 0), // degrees do not multiply to 8 devices
        config(8, 1, 1, 1, 1, 0), // 8 × 1 × 1 ≠ 16 sequences
        config(1, 1, 8, 2, 8, 0), // 8 stages > 4 blocks
        config(8, 1, 1, 2, 1, 4), // no ZeRO-4
        config(4, 3, 1, 1, 4, 0), // tp 3 does not divide the node (and 12 ≠ 8)
    ];
    for cfg in bad {
        assert!(c.evaluate(&cfg).is_err(), "{cfg}");
    }
}

/// Recomputing only some layers per stage lands between no and full recomputation in
/// both memory and time (Korthikanti et al. 2022, Sec. 5: recomputing fewer layers
/// trades memory for speed).
#[test]
fn partial_recomputation_is_between_none_and_full() {
    let c = compiler("megatron-1.7b", "dgx-a100-80g:1", 2048, 16);
    let run = |recompute, recompute_layers| {
        c.evaluate(&Config {
            recompute,
            recompute_layers,
            ..config(2, 1, 4, 1, 8, 1)
        })
        .unwrap()
    };
    let none = run(Recompute::None, None);
    let full = run(Recompute::Full, None);
    let some = run(Recompute::Full, Some(2));
    assert!(full.peak_bytes < some.peak_bytes && some.peak_bytes < none.peak_bytes);
    assert!(none.step_time_s < some.step_time_s && some.step_time_s < full.step_time_s);
    // On the same cut, recomputing as many layers as its largest stage has is full
    // recomputation (with that many, the cut apar picks may differ: it may leave a
    // layer of a larger stage unrecomputed).
    // Blocks are the embedding (0), the layers (1..=L) and the head (L + 1).
    let l = c.layers() as usize;
    let most = full
        .stages
        .iter()
        .map(|s| s.last.min(l) + 1 - s.first.max(1))
        .max()
        .unwrap();
    let layers = u32::try_from(most).unwrap();
    let all = c
        .evaluate_cut(
            &Config {
                recompute: Recompute::Full,
                recompute_layers: Some(layers),
                ..config(2, 1, 4, 1, 8, 1)
            },
            full.stages.clone(),
            false,
        )
        .unwrap();
    assert_eq!(all.peak_bytes, full.peak_bytes);
    // More is an error, not a silent full recomputation.
    let more = c.evaluate(&Config {
        recompute: Recompute::Full,
        recompute_layers: Some(1000),
        ..config(2, 1, 4, 1, 8, 1)
    });
    assert!(
        matches!(
            more,
            Err(apar::lower::compile::CompileError::RecomputeLayersTooMany { k: 1000, .. })
        ),
        "{more:?}"
    );
}
