//! Engine exports: snapshots of real plans per engine, the round trip through each
//! engine's parser (property test on generated valid configurations), the refusals
//! the engines' sources call for, and (ignored) the matrix that
//! `scripts/check_exports/` feeds to the engines' own parsers.

use apar::cluster::Cluster;
use apar::engine::export::{export, parse, Export, ExportError, ExportPlan, ParsedConfig};
use apar::engine::memory::{Precision, PrecisionOptions};
use apar::engine::Engine;
use apar::models::{zoo, ModelConfig};
use apar::passes::{Config, Recompute, Schedule};
use apar::report::EvalJson;
use apar::{plan_model, PlanOptions, Session};
use proptest::prelude::*;
use serde_json::json;

#[allow(clippy::too_many_arguments)]
fn config(
    dp: u32,
    tp: u32,
    pp: u32,
    b: u32,
    m: u32,
    sp: bool,
    recompute: Recompute,
    recompute_layers: Option<u32>,
    zero: u8,
    schedule: Schedule,
) -> Config {
    Config {
        dp,
        tp,
        pp,
        cp: 1,
        ep: 1,
        etp: 1,
        micro_batch: b,
        num_micro_batches: m,
        sp,
        recompute,
        recompute_layers,
        recompute_modules: None,
        zero,
        low_prec_shard: false,
        schedule,
    }
}

/// No recomputation (`None` is `Option`'s in these tables).
const OFF: Recompute = Recompute::None;

/// What a snapshot holds: the environment, the notes, then the text (or the refusal).
fn render(r: &Result<Export, ExportError>) -> String {
    match r {
        Ok(e) => {
            let mut s = String::new();
            s.push_str(&format!("env: {}\n", e.env_prefix()));
            for n in &e.notes {
                s.push_str(&format!("note: {n}\n"));
            }
            s.push_str("---\n");
            s.push_str(&e.text);
            s
        }
        Err(e) => format!("refused: {e}\n"),
    }
}

/// Asserts the round trip on an accepted export and returns it.
fn check_round_trip(engine: Engine, plan: &ExportPlan, r: &Result<Export, ExportError>) {
    if let Ok(e) = r {
        let back = parse(engine, &e.text, plan.config.devices());
        assert_eq!(back, Ok(ParsedConfig::of(plan)), "{engine}:\n{}", e.text);
    }
}

/// Plans chosen by the search for a few zoo jobs, for every engine: each exports for
/// the engine it was planned for.
#[test]
fn searched_plans() {
    let jobs = [
        ("llama2-7b", "dgx-a100-80g:1", 16, 2048),
        ("llama3-8b", "dgx-h100:4", 256, 8192),
        ("llama3-70b", "dgx-h100:8", 256, 4096),
        ("gpt3-175b", "dgx-a100-80g:16", 512, 2048),
    ];
    for (model, cluster, gb, seq) in jobs {
        let cfg = zoo::lookup(model).unwrap();
        let c = Cluster::resolve(cluster).unwrap();
        for engine in Engine::ALL {
            // Planned for the engine: its export is never refused.
            let mut options = PlanOptions::new(seq, gb);
            options.engine = engine;
            let plan = match plan_model(&cfg, &c, &options) {
                Ok(p) => p.without_timings(),
                Err(e) => {
                    let name = format!("searched-{model}-{}-{engine}", cluster.replace(':', "x"));
                    insta::assert_snapshot!(name, format!("no plan: {e}\n"));
                    continue;
                }
            };
            let r = plan.export(engine);
            // Only a model the engine has no recipe for is refused (torchtitan).
            if apar::engine::export::model_supported(engine, &cfg, plan.precision.compute).is_ok() {
                assert!(
                    r.is_ok(),
                    "{engine} refuses its own plan {}: {r:?}",
                    plan.config
                );
            }
            let blocks: Vec<[usize; 2]> = plan.stages.iter().map(|s| s.blocks).collect();
            let ep = ExportPlan::new(
                plan.config,
                plan.model_config.clone(),
                plan.seq,
                plan.global_batch,
                &blocks,
            );
            check_round_trip(engine, &ep, &r);
            let name = format!("searched-{model}-{}-{engine}", cluster.replace(':', "x"));
            insta::assert_snapshot!(name, format!("plan: {}\n{}", plan.config, render(&r)));
        }
    }
}

/// Pinned configurations of real models (the cut is apar's), one per shape an export
/// takes: interleaving, uneven cuts, FSDP, recomputation of some layers.
#[test]
fn evaluated_plans() {
    use Recompute::{Full, Selective};
    use Schedule::*;
    let cases: Vec<(&str, &str, &str, u64, Config)> = vec![
        (
            "tp8-pp2-interleaved-selective",
            "megatron-22b",
            "dgx-a100-80g:4",
            2048,
            config(2, 8, 2, 1, 16, true, Selective, None, 1, Interleaved(2)),
        ),
        (
            "tp8-pp4-full-block",
            "llama3-70b",
            "dgx-h100:8",
            4096,
            config(2, 8, 4, 1, 16, true, Full, Some(2), 1, OneFOneB),
        ),
        (
            "dp8-zero3-full",
            "llama3-8b",
            "dgx-h100:1",
            4096,
            config(8, 1, 1, 1, 4, false, Full, None, 3, OneFOneB),
        ),
        (
            "tp4-dp2-zero2",
            "llama3-8b",
            "dgx-h100:1",
            4096,
            config(2, 4, 1, 2, 8, true, OFF, None, 2, OneFOneB),
        ),
        (
            "pp2-full-zero0",
            "llama2-13b",
            "dgx-a100-80g:1",
            2048,
            config(4, 1, 2, 2, 4, false, Full, None, 0, OneFOneB),
        ),
        (
            "tp4-zero3-full",
            "llama3-8b",
            "dgx-h100:1",
            4096,
            config(2, 4, 1, 1, 8, false, Full, None, 3, OneFOneB),
        ),
        (
            "dp32-zero3-full",
            "llama3-70b",
            "dgx-h100:4",
            4096,
            config(32, 1, 1, 1, 2, false, Full, None, 3, OneFOneB),
        ),
        (
            "dp8-zero2-b4",
            "mistral-7b",
            "dgx-a100-80g:1",
            4096,
            config(8, 1, 1, 4, 2, false, OFF, None, 2, OneFOneB),
        ),
        (
            "pp2-interleaved2-full",
            "llama3-8b",
            "dgx-h100:1",
            4096,
            config(4, 1, 2, 1, 8, false, Full, None, 0, Interleaved(2)),
        ),
        (
            "tp8-pp4-zero2",
            "llama3-70b",
            "dgx-h100:8",
            4096,
            config(2, 8, 4, 1, 8, true, OFF, None, 2, OneFOneB),
        ),
        (
            "pp8-gpipe",
            "gpt3-175b",
            "dgx-a100-80g:16",
            2048,
            config(2, 8, 8, 1, 32, true, Full, None, 0, Gpipe),
        ),
        (
            // Megatron-LM's `--recompute-modules mlp` (flash attention: `core_attn`
            // would recompute nothing).
            "tp8-pp4-interleaved-mlp",
            "llama3-70b",
            "dgx-h100:8",
            4096,
            Config {
                recompute_modules: "mlp".parse().ok(),
                ..config(2, 8, 4, 1, 16, true, Selective, None, 1, Interleaved(2))
            },
        ),
    ];
    for (name, model, cluster, seq, c) in cases {
        let cfg = zoo::lookup(model).unwrap();
        let cl = Cluster::resolve(cluster).unwrap();
        // The cut of the first engine that runs the configuration (GPipe: torchtitan).
        let e = Engine::ALL
            .into_iter()
            .find_map(|engine| {
                let mut opts = PlanOptions::new(seq, c.global_batch());
                opts.engine = engine;
                Session::for_config(&cfg, &cl, &opts)
                    .ok()?
                    .simulate(&c)
                    .ok()
            })
            .unwrap_or_else(|| panic!("no engine runs {c}"));
        let blocks: Vec<[usize; 2]> = EvalJson::new(&e).stages.iter().map(|s| s.blocks).collect();
        let ep = ExportPlan::new(c, Some(cfg), seq, c.global_batch(), &blocks);
        for engine in Engine::ALL {
            let r = export(engine, &ep);
            check_round_trip(engine, &ep, &r);
            insta::assert_snapshot!(
                format!("evaluated-{name}-{model}-{engine}"),
                format!("plan: {c}\n{}", render(&r))
            );
        }
    }
}

/// The Megatron-LM cut forms: `--decoder-first/last-pipeline-num-layers` when only the
/// end ranks differ (their layers split evenly over their chunks), the layout otherwise.
#[test]
fn megatron_spells_uneven_cuts() {
    let m = zoo::lookup("llama3-8b").unwrap();
    let c = config(
        1,
        1,
        4,
        1,
        8,
        false,
        Recompute::None,
        None,
        0,
        Schedule::OneFOneB,
    );
    let first_last = ExportPlan::with_layers(c, Some(m.clone()), 4096, &[7, 9, 9, 7]);
    let text = export(Engine::Megatron, &first_last).unwrap().text;
    assert!(
        text.contains("--decoder-first-pipeline-num-layers 7"),
        "{text}"
    );
    assert!(
        text.contains("--decoder-last-pipeline-num-layers 7"),
        "{text}"
    );
    assert!(!text.contains("layout"), "{text}");

    let ragged = ExportPlan::with_layers(c, Some(m.clone()), 4096, &[7, 10, 8, 7]);
    let text = export(Engine::Megatron, &ragged).unwrap().text;
    assert!(
        text.contains("--pipeline-model-parallel-layout 'Et*7|t*10|t*8|t*7L'"),
        "{text}"
    );

    // Interleaved: rank 0 holds stages 0 and 2, rank 1 stages 1 and 3.
    let c2 = config(
        1,
        1,
        2,
        1,
        8,
        false,
        Recompute::None,
        None,
        0,
        Schedule::Interleaved(2),
    );
    let chunks = ExportPlan::with_layers(c2, Some(m), 4096, &[6, 10, 6, 10]);
    let text = export(Engine::Megatron, &chunks).unwrap().text;
    assert!(
        text.contains("--num-virtual-stages-per-pipeline-rank 2"),
        "{text}"
    );
    assert!(
        text.contains("--decoder-first-pipeline-num-layers 12"),
        "{text}"
    );
    assert!(
        text.contains("--decoder-last-pipeline-num-layers 20"),
        "{text}"
    );
}

/// No export has a comment line: the shell-word exports paste after a command.
#[test]
fn shell_exports_have_no_comment_lines() {
    let m = zoo::lookup("llama3-8b").unwrap();
    let c = config(
        2,
        4,
        1,
        1,
        8,
        true,
        Recompute::Full,
        None,
        3,
        Schedule::OneFOneB,
    );
    let p = ExportPlan::with_layers(c, Some(m), 4096, &[32]);
    for engine in [Engine::Megatron, Engine::Torchtitan] {
        let e = export(engine, &p).unwrap();
        assert!(
            e.text
                .lines()
                .all(|l| l.starts_with("--") || l.starts_with("activation-checkpoint:")),
            "{}",
            e.text
        );
        assert!(
            e.text.lines().rev().skip(1).all(|l| l.ends_with(" \\")),
            "{}",
            e.text
        );
    }
}

/// Refusals the engines' sources call for, each naming the missing option.
#[test]
fn engines_refuse_what_they_cannot_run() {
    let llama = zoo::lookup("llama3-8b").unwrap();
    let refused = |engine, c: Config, model: &ModelConfig| {
        let layers =
            vec![model.layers / c.pp / c.schedule.chunks(); (c.pp * c.schedule.chunks()) as usize];
        let p = ExportPlan::with_layers(c, Some(model.clone()), 2048, &layers);
        export(engine, &p).unwrap_err()
    };
    // DeepSpeed's PipelineEngine asserts ZeRO stage < 2.
    let e = refused(
        Engine::DeepSpeed,
        config(
            2,
            1,
            4,
            1,
            8,
            false,
            Recompute::None,
            None,
            2,
            Schedule::OneFOneB,
        ),
        &llama,
    );
    assert!(
        matches!(e, ExportError::Unsupported { .. }) && e.to_string().contains("ZeRO stage < 2"),
        "{e}"
    );
    // The Trainer has no tensor or pipeline parallelism.
    let e = refused(
        Engine::Hf,
        config(
            2,
            4,
            1,
            1,
            8,
            true,
            Recompute::None,
            None,
            0,
            Schedule::OneFOneB,
        ),
        &llama,
    );
    assert!(e.to_string().contains("tensor parallel 4"), "{e}");
    // Megatron-LM has no GPipe schedule.
    let e = refused(
        Engine::Megatron,
        config(
            2,
            1,
            4,
            1,
            8,
            false,
            Recompute::None,
            None,
            0,
            Schedule::Gpipe,
        ),
        &llama,
    );
    assert!(e.to_string().contains("GPipe"), "{e}");
    // torchtitan builds models from its recipes; GPT-3 has none.
    let e = refused(
        Engine::Torchtitan,
        config(
            8,
            1,
            1,
            1,
            8,
            false,
            Recompute::None,
            None,
            0,
            Schedule::OneFOneB,
        ),
        &zoo::lookup("gpt3-175b").unwrap(),
    );
    assert!(matches!(e, ExportError::NoRecipe { .. }), "{e}");
}

/// `model` with its mixture-of-experts layers changed by `variant` (0: as it is; 1:
/// three dense layers first and a capacity factor; 2: a gated shared expert and every
/// second layer sparse; 3: sigmoid scoring and one dense layer in the middle). A dense
/// model is returned as it is.
fn moe_variant(mut model: ModelConfig, variant: u32) -> ModelConfig {
    let hidden = model.hidden;
    let layers = model.layers;
    if let Some(m) = model.moe.as_deref_mut() {
        match variant {
            1 => {
                m.first_dense = 3;
                m.capacity_factor = Some(1.25);
            }
            2 => {
                m.shared_ffn = 2 * hidden;
                m.shared_gate = true;
                m.sparse_step = 2;
            }
            3 => {
                m.scoring = apar::models::Scoring::Sigmoid;
                m.pre_softmax = false; // a softmax router's option
                m.dense_layers = vec![layers / 2];
            }
            _ => {}
        }
    }
    model
}

fn arb_plan() -> impl Strategy<Value = ExportPlan> {
    (
        prop::sample::select(vec![
            "llama3-8b",
            "llama3-70b",
            "llama2-7b",
            "gpt3-175b",
            "mixtral-8x7b",
            "qwen3-30b-a3b",
            "deepseek-v3",
        ]),
        prop::sample::select(vec![1u32, 2, 4, 8]),
        prop::sample::select(vec![1u32, 2, 4, 8]),
        1u32..=8,
        prop::sample::select(vec![1u32, 2, 4]),
        1u32..=16,
        any::<bool>(),
        (
            0u8..5,
            prop::option::of(1u32..=4),
            0u8..=3,
            any::<bool>(),
            0u8..3,
            2u32..=4,
            prop::collection::vec(0u32..1000, 32),
        ),
        (
            prop::sample::select(vec![Precision::Bf16, Precision::Fp8]),
            prop::sample::select(vec![1u32, 1, 2, 4]),
        ),
    )
        .prop_map(
            |(model, tp, pp, dp, b, m, sp, (rc, k, zero, lps, sched, v, cuts), (compute, cp))| {
                let model = moe_variant(zoo::lookup(model).unwrap(), cuts[1] % 4);
                let schedule = match (pp, sched) {
                    (1, _) | (_, 1) => Schedule::OneFOneB,
                    (_, 0) => Schedule::Gpipe,
                    _ => Schedule::Interleaved(v),
                };
                // 3 and 4: selective with Megatron-LM's module sets `mlp`, `core_attn mlp`.
                let recompute = [
                    Recompute::None,
                    Recompute::Selective,
                    Recompute::Full,
                    Recompute::Selective,
                    Recompute::Selective,
                ][rc as usize];
                let recompute_modules = match rc {
                    3 => "mlp".parse().ok(),
                    4 => "core_attn,mlp".parse().ok(),
                    _ => None,
                };
                // Expert layouts for a MoE variant: ep a power of two dividing the
                // experts and the stage's ranks, etp 1 or tp.
                let (ep, etp) = match &model.moe {
                    Some(moe) => {
                        let ep = 1u32 << (cuts[2] % 4);
                        let etp = if cuts[3] % 2 == 0 { 1 } else { tp };
                        let ranks = u64::from(dp * tp * cp);
                        if moe.experts % u64::from(ep) == 0 && ranks % u64::from(ep * etp) == 0 {
                            (ep, etp)
                        } else {
                            (1, etp)
                        }
                    }
                    None => (1, 1),
                };
                let c = Config {
                    dp,
                    tp,
                    pp,
                    cp,
                    ep,
                    etp,
                    micro_batch: b,
                    num_micro_batches: m,
                    sp: sp && tp > 1,
                    recompute,
                    recompute_layers: if recompute == Recompute::None {
                        None
                    } else {
                        k
                    },
                    recompute_modules,
                    zero,
                    low_prec_shard: lps,
                    schedule,
                };
                // A valid cut: every virtual stage at least one layer, an even cut
                // when the random points say so.
                let n = (pp * schedule.chunks()) as usize;
                let layers = model.layers as usize;
                let mut counts = vec![1u32; n];
                if cuts[0] % 3 == 0 && layers % n == 0 {
                    counts = vec![(layers / n) as u32; n];
                } else {
                    for i in 0..layers - n {
                        counts[cuts[i % cuts.len()] as usize * (i + 1) % n] += 1;
                    }
                }
                ExportPlan::with_layers(c, Some(model), 2048, &counts).with_precision(
                    PrecisionOptions {
                        compute,
                        ..PrecisionOptions::default()
                    },
                )
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// `parse(export(p)) == ParsedConfig::of(p)` for every engine that accepts `p`.
    #[test]
    fn exports_round_trip(p in arb_plan()) {
        for engine in Engine::ALL {
            if let Ok(e) = export(engine, &p) {
                prop_assert_eq!(
                    parse(engine, &e.text, p.config.devices()),
                    Ok(ParsedConfig::of(&p)),
                    "{}:\n{}", engine, e.text
                );
            }
        }
    }
}

/// A real export with every number replaced by `numbers` in turn (cycling).
fn mangled(text: &str, numbers: &[u64]) -> String {
    let mut out = String::new();
    let mut k = 0;
    let mut in_number = false;
    for ch in text.chars() {
        if ch.is_ascii_digit() {
            if !in_number {
                out.push_str(&numbers[k % numbers.len()].to_string());
                k += 1;
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(ch);
        }
    }
    out
}

proptest! {
    /// Reading any text, or an export with its numbers changed, ends in a value or a
    /// `ParseError`, never a panic (overflow, division by zero, huge allocation).
    #[test]
    fn parse_never_panics(
        junk in ".{0,200}",
        numbers in prop::collection::vec(
            prop_oneof![0u64..10, Just(u64::from(u32::MAX)), Just(u64::MAX), any::<u64>()],
            1..8,
        ),
        devices in prop_oneof![0u64..1024, Just(u64::MAX)],
    ) {
        let m = zoo::lookup("llama3-8b").unwrap();
        let c = config(2, 2, 2, 1, 8, true, Recompute::Full, None, 1, Schedule::Interleaved(2));
        let p = ExportPlan::with_layers(c, Some(m), 4096, &[7, 9, 9, 7]);
        for engine in Engine::ALL {
            let _ = parse(engine, &junk, devices);
            let c0 = config(8, 1, 1, 1, 8, false, Recompute::Full, None, 3, Schedule::OneFOneB);
            let p0 = ExportPlan::with_layers(c0, Some(zoo::lookup("llama3-8b").unwrap()), 4096, &[32]);
            for plan in [&p, &p0] {
                if let Ok(e) = export(engine, plan) {
                    let _ = parse(engine, &mangled(&e.text, &numbers), devices);
                }
            }
        }
    }
}

/// Every engine accepts some plan of the generator (the round trip is not vacuous).
#[test]
fn every_engine_accepts_a_plain_plan() {
    let m = zoo::lookup("llama3-8b").unwrap();
    let c = config(
        8,
        1,
        1,
        2,
        4,
        false,
        Recompute::Full,
        None,
        3,
        Schedule::OneFOneB,
    );
    let p = ExportPlan::with_layers(c, Some(m), 4096, &[32]);
    for engine in Engine::ALL {
        let e = export(engine, &p).unwrap_or_else(|e| panic!("{engine}: {e}"));
        assert_eq!(parse(engine, &e.text, 8), Ok(ParsedConfig::of(&p)));
    }
}

/// One row of the check matrix.
struct Case {
    name: &'static str,
    model: &'static str,
    seq: u64,
    config: Config,
    /// Layers per virtual stage; `None`: apar's own cut of the configuration.
    cut: Option<Vec<u32>>,
}

fn matrix() -> Vec<Case> {
    use Recompute::{Full, Selective};
    use Schedule::*;
    let case = |name, model, seq, config, cut: Option<&[u32]>| Case {
        name,
        model,
        seq,
        config,
        cut: cut.map(<[u32]>::to_vec),
    };
    vec![
        case(
            "dp8",
            "llama3-8b",
            4096,
            config(8, 1, 1, 2, 4, false, OFF, None, 0, OneFOneB),
            None,
        ),
        case(
            "dp16-zero0",
            "llama3-8b",
            2048,
            config(16, 1, 1, 1, 4, false, OFF, None, 0, OneFOneB),
            None,
        ),
        case(
            "dp8-zero1",
            "llama2-7b",
            4096,
            config(8, 1, 1, 1, 8, false, OFF, None, 1, OneFOneB),
            None,
        ),
        case(
            "dp16-zero2-full",
            "llama3-8b",
            4096,
            config(16, 1, 1, 1, 4, false, Full, None, 2, OneFOneB),
            None,
        ),
        case(
            "dp32-zero3-full",
            "llama3-70b",
            4096,
            config(32, 1, 1, 1, 2, false, Full, None, 3, OneFOneB),
            None,
        ),
        case(
            "dp8-zero3",
            "mistral-7b",
            4096,
            config(8, 1, 1, 4, 2, false, OFF, None, 3, OneFOneB),
            None,
        ),
        case(
            "dp64-zero2",
            "llama3-8b",
            8192,
            config(64, 1, 1, 1, 2, false, OFF, None, 2, OneFOneB),
            None,
        ),
        case(
            "dp8-gpt2-full",
            "gpt2",
            1024,
            config(8, 1, 1, 8, 1, false, Full, None, 0, OneFOneB),
            None,
        ),
        case(
            "dp16-zero3-b2",
            "llama3-8b",
            2048,
            config(16, 1, 1, 2, 8, false, OFF, None, 3, OneFOneB),
            None,
        ),
        case(
            "dp8-zero0-full-b4",
            "llama2-13b",
            2048,
            config(8, 1, 1, 4, 4, false, Full, None, 0, OneFOneB),
            None,
        ),
        case(
            "dp128-zero3-full",
            "llama3-70b",
            8192,
            config(128, 1, 1, 1, 1, false, Full, None, 3, OneFOneB),
            None,
        ),
        case(
            "dp24-zero2",
            "qwen2-7b",
            4096,
            config(24, 1, 1, 2, 2, false, OFF, None, 2, OneFOneB),
            None,
        ),
        case(
            "dp8-zero2-full-m16",
            "llama3-8b",
            4096,
            config(8, 1, 1, 1, 16, false, Full, None, 2, OneFOneB),
            None,
        ),
        case(
            "tp2-sp-selective",
            "megatron-7.5b",
            2048,
            config(4, 2, 1, 1, 8, true, Selective, None, 1, OneFOneB),
            None,
        ),
        case(
            "tp4-zero1",
            "llama2-7b",
            4096,
            config(2, 4, 1, 2, 4, false, OFF, None, 1, OneFOneB),
            None,
        ),
        case(
            "tp4-zero3-full",
            "llama3-8b",
            4096,
            config(2, 4, 1, 1, 8, false, Full, None, 3, OneFOneB),
            None,
        ),
        case(
            "tp8-sp-full-zero3",
            "llama3-70b",
            4096,
            config(2, 8, 1, 1, 16, true, Full, None, 3, OneFOneB),
            None,
        ),
        case(
            "tp8-sp-zero2",
            "llama3-8b",
            8192,
            config(4, 8, 1, 1, 8, true, OFF, None, 2, OneFOneB),
            None,
        ),
        case(
            "tp2-pp2-1f1b",
            "llama3-8b",
            4096,
            config(2, 2, 2, 1, 8, true, OFF, None, 1, OneFOneB),
            None,
        ),
        case(
            "tp4-pp2-even",
            "llama2-7b",
            4096,
            config(1, 4, 2, 1, 16, false, Full, None, 0, OneFOneB),
            Some(&[16, 16]),
        ),
        case(
            "pp4-uniform",
            "llama3-8b",
            4096,
            config(2, 1, 4, 1, 8, false, OFF, None, 1, OneFOneB),
            Some(&[8, 9, 8, 7]),
        ),
        case(
            "pp4-even-zero0",
            "llama3-8b",
            4096,
            config(2, 1, 4, 2, 8, false, Full, None, 0, OneFOneB),
            Some(&[8, 8, 8, 8]),
        ),
        case(
            "tp8-pp4-full-block",
            "llama3-70b",
            4096,
            config(2, 8, 4, 1, 16, true, Full, Some(2), 1, OneFOneB),
            None,
        ),
        case(
            "tp8-pp2-interleaved2",
            "llama3-70b",
            4096,
            config(2, 8, 2, 1, 16, true, Full, None, 1, Interleaved(2)),
            None,
        ),
        case(
            "pp4-interleaved2-even",
            "llama3-8b",
            4096,
            config(2, 1, 4, 1, 8, false, OFF, None, 1, Interleaved(2)),
            Some(&[4; 8]),
        ),
        case(
            "pp2-interleaved2-firstlast",
            "llama3-8b",
            4096,
            config(4, 1, 2, 1, 8, false, Full, None, 0, Interleaved(2)),
            Some(&[6, 10, 6, 10]),
        ),
        case(
            "pp4-firstlast",
            "llama3-8b",
            4096,
            config(2, 1, 4, 1, 8, false, OFF, None, 0, OneFOneB),
            Some(&[7, 9, 9, 7]),
        ),
        case(
            "pp4-layout",
            "llama3-8b",
            4096,
            config(2, 1, 4, 1, 8, false, Selective, None, 1, OneFOneB),
            Some(&[7, 10, 8, 7]),
        ),
        case(
            "pp4-interleaved2-layout",
            "llama3-8b",
            4096,
            config(1, 2, 4, 1, 8, true, OFF, None, 0, Interleaved(2)),
            Some(&[3, 4, 5, 4, 4, 4, 4, 4]),
        ),
        // The embedding alone on the first virtual stage and the loss after two
        // layers on the last (`--account-for-embedding-in-pipeline-split` style).
        case(
            "pp4-interleaved2-embedding-alone",
            "llama3-8b",
            4096,
            config(1, 2, 4, 1, 8, true, OFF, None, 0, Interleaved(2)),
            Some(&[0, 5, 5, 5, 5, 5, 5, 2]),
        ),
        // Unequal middle stages (a balanced layout: 32 layers on 12 virtual stages).
        case(
            "pp4-interleaved3-balanced",
            "llama3-8b",
            4096,
            config(1, 2, 4, 1, 8, true, OFF, None, 0, Interleaved(3)),
            Some(&[2, 3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2]),
        ),
        case(
            "pp2-gpipe",
            "llama3-8b",
            4096,
            config(4, 1, 2, 2, 4, false, Full, None, 0, Gpipe),
            None,
        ),
        case(
            "tp8-pp8-interleaved3",
            "gpt3-175b",
            2048,
            config(2, 8, 8, 1, 32, true, Selective, None, 1, Interleaved(3)),
            None,
        ),
        case(
            "tp8-pp4-zero2-fsdp",
            "llama3-70b",
            4096,
            config(2, 8, 4, 1, 8, true, OFF, None, 2, OneFOneB),
            None,
        ),
        case(
            "tp8-pp16-405b",
            "llama3-405b",
            8192,
            config(4, 8, 16, 1, 32, true, Full, None, 1, OneFOneB),
            None,
        ),
        case(
            "tp8-pp4-405b-zero3",
            "llama3-405b",
            8192,
            config(8, 8, 4, 1, 8, true, Full, None, 3, Interleaved(2)),
            None,
        ),
        case(
            "pp2-1f1b-zero0",
            "llama2-13b",
            2048,
            config(4, 1, 2, 2, 4, false, Full, None, 0, OneFOneB),
            None,
        ),
        case(
            "tp8-pp16-405b-mlp",
            "llama3-405b",
            8192,
            Config {
                recompute_modules: "mlp".parse().ok(),
                ..config(4, 8, 16, 1, 32, true, Selective, None, 1, Interleaved(2))
            },
            None,
        ),
        // FP8 compute (name ending `-fp8`): Megatron-LM's `--fp8-format hybrid`,
        // torchtitan's float8 recipe (the 405B one has its converter).
        case(
            "tp2-sp-fp8",
            "llama3-8b",
            8192,
            config(4, 2, 1, 1, 8, true, OFF, None, 1, OneFOneB),
            None,
        ),
        case(
            "tp8-405b-fp8",
            "llama3-405b",
            8192,
            config(8, 8, 1, 1, 8, true, Full, None, 3, OneFOneB),
            None,
        ),
        // Mixture of experts (Megatron-LM only): experts replicated on every
        // data-parallel rank, sequence parallelism with tensor parallelism.
        case(
            "tp2-pp2-moe",
            "mixtral-8x7b",
            4096,
            config(2, 2, 2, 1, 8, true, Selective, None, 1, OneFOneB),
            Some(&[16, 16]),
        ),
        case(
            "tp2-moe-qwen3",
            "qwen3-30b-a3b",
            4096,
            config(4, 2, 1, 1, 8, true, Full, None, 1, OneFOneB),
            Some(&[48]),
        ),
        // Multi-latent attention and DeepSeek's routing (Megatron-LM only; branch `mla`):
        // V2-Lite without a query latent, V3 with one, sigmoid scores, groups and the
        // expert bias, first-k-dense layers.
        case(
            "tp2-mla-deepseek-v2-lite",
            "deepseek-v2-lite",
            4096,
            config(4, 2, 1, 1, 8, true, Full, None, 1, OneFOneB),
            Some(&[27]),
        ),
        case(
            "pp4-mla-deepseek-v3",
            "deepseek-v3",
            4096,
            config(2, 1, 4, 1, 8, false, Full, None, 1, OneFOneB),
            Some(&[16, 15, 15, 15]),
        ),
        // Expert parallelism (Megatron-LM): `--expert-model-parallel-size` and
        // `--expert-tensor-parallel-size`, experts folded over tp × dp.
        case(
            "ep4-tp2-pp2-moe",
            "mixtral-8x7b",
            4096,
            Config {
                ep: 4,
                ..config(2, 2, 2, 1, 8, true, Full, None, 1, OneFOneB)
            },
            Some(&[16, 16]),
        ),
        case(
            "ep2-etp2-moe-qwen3",
            "qwen3-30b-a3b",
            4096,
            Config {
                ep: 2,
                etp: 2,
                ..config(4, 2, 1, 1, 8, true, Full, None, 1, OneFOneB)
            },
            Some(&[48]),
        ),
        case(
            "ep8-moe-qwen3",
            "qwen3-30b-a3b",
            4096,
            Config {
                ep: 8,
                ..config(8, 1, 1, 1, 8, false, Full, None, 1, OneFOneB)
            },
            Some(&[48]),
        ),
        // Context parallelism: Megatron-LM's `--context-parallel-size`, torchtitan's
        // `--parallelism.context_parallel_degree` (FSDP over dp_shard × cp: ZeRO-2/3).
        case(
            "cp4-tp2-zero2",
            "llama3-8b",
            32768,
            Config {
                cp: 4,
                ..config(2, 2, 1, 1, 8, true, Full, None, 2, OneFOneB)
            },
            None,
        ),
        case(
            "cp2-tp4-pp2",
            "llama3-70b",
            16384,
            Config {
                cp: 2,
                ..config(2, 4, 2, 1, 8, true, Full, None, 1, OneFOneB)
            },
            None,
        ),
        case(
            "tp8-pp2-core-attn-mlp",
            "megatron-22b",
            2048,
            Config {
                recompute_modules: "core_attn,mlp".parse().ok(),
                ..config(2, 8, 2, 1, 16, true, Selective, None, 1, OneFOneB)
            },
            None,
        ),
    ]
}

/// Mixture-of-experts models export to Megatron-LM only (`--num-experts`, `--moe-*`,
/// experts replicated: `--expert-model-parallel-size 1`), and read back; tensor
/// parallelism needs sequence parallelism there (`MoELayer.forward`).
#[test]
fn megatron_exports_mixture_of_experts() {
    let mut m = zoo::lookup("qwen3-30b-a3b").unwrap();
    if let Some(moe) = m.moe.as_deref_mut() {
        moe.first_dense = 2;
        moe.capacity_factor = Some(1.5);
    }
    let c = config(
        4,
        2,
        2,
        1,
        8,
        true,
        Recompute::Selective,
        None,
        1,
        Schedule::OneFOneB,
    );
    let plan = ExportPlan::with_layers(c, Some(m.clone()), 4096, &[24, 24]);
    let r = export(Engine::Megatron, &plan);
    check_round_trip(Engine::Megatron, &plan, &r);
    let e = r.unwrap();
    assert!(
        e.text.contains("--moe-layer-freq '([0]*2+[1]*46)'"),
        "{}",
        e.text
    );
    insta::assert_snapshot!("moe-qwen3-30b-a3b-megatron", render(&Ok(e)));
    for engine in [Engine::DeepSpeed, Engine::Torchtitan, Engine::Hf] {
        let e = export(engine, &plan).unwrap_err();
        assert!(
            matches!(e, ExportError::MixtureOfExperts { .. }),
            "{engine}: {e}"
        );
    }
    let no_sp = ExportPlan::with_layers(Config { sp: false, ..c }, Some(m), 4096, &[24, 24]);
    let e = export(Engine::Megatron, &no_sp).unwrap_err();
    assert!(e.to_string().contains("--sequence-parallel"), "{e}");
}

/// Writes the check matrix: every case exported for every engine, as JSON lines in
/// `$APAR_EXPORTS_OUT` (read by `scripts/check_exports/check.py`).
#[test]
#[ignore = "writes the input of scripts/check_exports (run by that script)"]
fn write_check_matrix() {
    let out = std::env::var("APAR_EXPORTS_OUT").expect("APAR_EXPORTS_OUT names the output file");
    let mut lines = String::new();
    for case in matrix() {
        let c = case.config;
        let model = zoo::lookup(case.model).unwrap();
        let plan = match &case.cut {
            Some(cut) => ExportPlan::with_layers(c, Some(model.clone()), case.seq, cut),
            None => {
                let devices = c.devices();
                let per_node = 8;
                let cluster =
                    Cluster::resolve(&format!("dgx-h100:{}", devices.div_ceil(per_node))).unwrap();
                // The cut of the first engine that runs the configuration.
                let e = Engine::ALL
                    .into_iter()
                    .find_map(|engine| {
                        let mut opts = PlanOptions::new(case.seq, c.global_batch());
                        opts.engine = engine;
                        Session::for_config(&model, &cluster, &opts)
                            .ok()?
                            .simulate(&c)
                            .ok()
                    })
                    .unwrap_or_else(|| panic!("{}: no engine runs {c}", case.name));
                let blocks: Vec<[usize; 2]> =
                    EvalJson::new(&e).stages.iter().map(|s| s.blocks).collect();
                ExportPlan::new(c, Some(model.clone()), case.seq, c.global_batch(), &blocks)
            }
        };
        let plan = if case.name.ends_with("-fp8") {
            plan.with_precision(PrecisionOptions {
                compute: Precision::Fp8,
                ..PrecisionOptions::default()
            })
        } else {
            plan
        };
        for engine in Engine::ALL {
            let r = export(engine, &plan);
            check_round_trip(engine, &plan, &r);
            let row = json!({
                "case": case.name,
                "model": case.model,
                "engine": engine,
                "devices": c.devices(),
                "plan": c.to_string(),
                "layers": model.layers,
                "rope_scaling": model.rope_scaling,
                "expected": ParsedConfig::of(&plan),
                "export": r.as_ref().ok(),
                "refused": r.as_ref().err().map(ToString::to_string),
            });
            lines.push_str(&row.to_string());
            lines.push('\n');
        }
    }
    std::fs::write(&out, lines).unwrap();
}

fn apar(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_apar"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--emit`: the export alone on standard output, environment and notes on standard
/// error; a plan the engine cannot run is exit 2 with the reason.
#[test]
fn cli_emit_separates_text_from_notes() {
    let job = [
        "plan",
        "--model",
        "llama2-7b",
        "--cluster",
        "dgx-a100-80g:4",
        "--global-batch",
        "64",
        "--seq",
        "2048",
        "--tp",
        "8",
        "--emit",
    ];
    let (code, stdout, stderr) = apar(&[&job[..], &["megatron"]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("--tensor-model-parallel-size 8 \\\n"),
        "{stdout}"
    );
    assert!(
        stderr.contains("env: CUDA_DEVICE_MAX_CONNECTIONS=1") || stderr.contains("Megatron-FSDP"),
        "{stderr}"
    );
    assert!(stderr.contains("note: launch on"), "{stderr}");

    // A plan is exported for its own engine only.
    let (code, stdout, stderr) = apar(&[&job[..], &["hf"]].concat());
    assert_eq!(code, 2);
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("the plan is for megatron; plan with --engine hf"),
        "{stderr}"
    );
    // And the hf engine cannot be asked for tensor parallelism in the first place.
    let (code, stdout, stderr) = apar(&[&job[..], &["--engine", "hf"]].concat());
    assert_eq!(code, 2);
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("--tp 8") && stderr.contains("hf"),
        "{stderr}"
    );
}

/// The compute precision the plan was made at is the one each export switches on
/// (Megatron-LM `--fp16`, DeepSpeed `"fp16"`, `Trainer` `--fp16`; torchtitan's
/// `mixed_precision_param` has no float16), and a gradient or optimizer dtype other
/// than the engine's own for that precision is refused (no option writes it).
#[test]
fn exports_carry_the_precision() {
    use apar::engine::memory::{Precision, PrecisionOptions};
    use apar::ir::DType;
    let model = zoo::lookup("llama3-8b").unwrap();
    let c = Config::new(8, 1, 1, 1, 4);
    let at = |precision: PrecisionOptions| {
        ExportPlan::new(c, Some(model.clone()), 4096, c.global_batch(), &[[0, 33]])
            .with_precision(precision)
    };
    let fp16 = at(PrecisionOptions {
        compute: Precision::Fp16,
        ..PrecisionOptions::default()
    });
    let text = |engine| export(engine, &fp16).unwrap().text;
    assert!(
        text(Engine::Megatron).contains("--fp16 \\") && !text(Engine::Megatron).contains("--bf16")
    );
    let ds: serde_json::Value = serde_json::from_str(&text(Engine::DeepSpeed)).unwrap();
    assert_eq!(ds["fp16"]["enabled"], true);
    assert!(ds.get("bf16").is_none());
    assert!(text(Engine::Hf).contains("--fp16"));
    assert!(export(Engine::Torchtitan, &fp16).is_err());
    let fp32 = at(PrecisionOptions {
        compute: Precision::Fp32,
        ..PrecisionOptions::default()
    });
    let t = export(Engine::Torchtitan, &fp32).unwrap().text;
    assert!(
        t.contains("--training.mixed_precision_param float32"),
        "{t}"
    );
    let bf16_grads = at(PrecisionOptions {
        grad: Some(DType::Bf16),
        ..PrecisionOptions::default()
    });
    // Megatron-LM keeps fp32 main gradients for bf16: bf16 gradients cannot be asked
    // for; DeepSpeed's bf16 gradients are its default, so the override changes nothing.
    assert!(export(Engine::Megatron, &bf16_grads).is_err());
    assert!(export(Engine::DeepSpeed, &bf16_grads).is_ok());
}

/// FP8 plans: Megatron-LM writes Transformer Engine's options over bf16
/// (`--fp8-format hybrid` and the amax settings of Megatron-LM's own
/// `examples/llama/train_llama3_8b_h100_fp8.sh`); torchtitan exports only a recipe
/// whose model spec converts the linears to float8 (`llama3_405b`); DeepSpeed and
/// Hugging Face refuse. Every accepted export reads back as FP8.
#[test]
fn fp8_exports() {
    let fp8 = PrecisionOptions {
        compute: Precision::Fp8,
        ..PrecisionOptions::default()
    };
    let c = config(
        1,
        8,
        1,
        1,
        8,
        true,
        Recompute::None,
        None,
        0,
        Schedule::OneFOneB,
    );
    for (model, last) in [("llama3-8b", 33), ("llama3-405b", 127)] {
        let m = zoo::lookup(model).unwrap();
        let ep =
            ExportPlan::new(c, Some(m), 8192, c.global_batch(), &[[0, last]]).with_precision(fp8);
        for engine in Engine::ALL {
            let r = export(engine, &ep);
            check_round_trip(engine, &ep, &r);
            if let Ok(e) = &r {
                assert!(parse(engine, &e.text, c.devices()).unwrap().fp8);
            }
            insta::assert_snapshot!(
                format!("fp8-{model}-{engine}"),
                format!("plan: {c} fp8\n{}", render(&r))
            );
        }
    }
    let m = zoo::lookup("llama3-8b").unwrap();
    let ep = ExportPlan::new(c, Some(m), 8192, c.global_batch(), &[[0, 33]]).with_precision(fp8);
    let t = export(Engine::Megatron, &ep).unwrap().text;
    assert!(
        t.contains("--bf16 \\") && t.contains("--fp8-format hybrid"),
        "{t}"
    );
    for engine in [Engine::DeepSpeed, Engine::Hf] {
        let e = export(engine, &ep).unwrap_err().to_string();
        assert!(e.contains("fp8"), "{e}");
    }
    // A bad format is refused on parse-back.
    let bad = t.replace("--fp8-format hybrid", "--fp8-format e5m2");
    assert!(parse(Engine::Megatron, &bad, c.devices()).is_err());
}

/// Llama 3 405B's 131,072-token layout (Dubey et al. 2024, Table 4: TP 8, CP 16, PP
/// 16, DP 8 on 16,384 GPUs): Megatron-LM takes `--context-parallel-size 16
/// --cp-comm-type p2p`, torchtitan `--parallelism.context_parallel_degree 16`;
/// DeepSpeed and Hugging Face refuse it. Each accepted export reads back.
#[test]
fn context_parallel_exports() {
    let mut c = config(
        8,
        8,
        16,
        1,
        16,
        true,
        Recompute::Full,
        None,
        1,
        Schedule::OneFOneB,
    );
    c.cp = 16;
    assert_eq!(c.devices(), 16_384);
    let m = zoo::lookup("llama3-405b").unwrap();
    let per_stage = 126 / 16;
    let mut counts = vec![per_stage as u32; 16];
    for x in counts.iter_mut().take(126 % 16) {
        *x += 1;
    }
    let ep = ExportPlan::with_layers(c, Some(m), 131_072, &counts);
    for engine in Engine::ALL {
        let r = export(engine, &ep);
        check_round_trip(engine, &ep, &r);
        match engine {
            Engine::Megatron => {
                let t = &r.as_ref().unwrap().text;
                assert!(t.contains("--context-parallel-size 16"), "{t}");
                assert!(t.contains("--cp-comm-type p2p"), "{t}");
            }
            Engine::Torchtitan => {
                if let Ok(e) = &r {
                    assert!(e.text.contains("--parallelism.context_parallel_degree 16"));
                }
            }
            Engine::DeepSpeed | Engine::Hf => {
                let e = r.as_ref().unwrap_err().to_string();
                assert!(e.contains("context parallel"), "{e}");
            }
        }
        if matches!(engine, Engine::Megatron | Engine::Torchtitan) {
            insta::assert_snapshot!(
                format!("cp-llama3-405b-{engine}"),
                format!("plan: {c}\n{}", render(&r))
            );
        }
    }
}

/// A `config.json`'s rotary scaling reaches Megatron-LM's options (arguments.py at
/// `MEGATRON_COMMIT`): Llama 3.1's `llama3` scaling is `--use-rope-scaling
/// --rope-scaling-factor 8` (its low 1 / high 4 / 8192 are Megatron-LM's fixed values),
/// linear scaling by 4 is `--rotary-seq-len-interpolation-factor 4`, a kind Megatron-LM
/// has no option for is a note, and a fractional `rope_theta` is noted where the
/// integer option rounds it.
#[test]
fn megatron_exports_rotary_scaling() {
    let dir = std::env::temp_dir().join(format!("apar-rope-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("tests/data/hf/llama-3.1-8b.json").unwrap())
            .unwrap();
    let emit = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut cfg = base.clone();
        edit(&mut cfg);
        let path = dir.join(name);
        std::fs::write(&path, cfg.to_string()).unwrap();
        let (code, stdout, stderr) = apar(&[
            "plan",
            "--model",
            path.to_str().unwrap(),
            "--cluster",
            "dgx-h100:4",
            "--global-batch",
            "64",
            "--seq",
            "2048",
            "--emit",
        ]);
        assert_eq!(code, 0, "{stderr}");
        (stdout, stderr)
    };
    let (out, _) = emit("llama3.json", &|_| {});
    assert!(
        out.contains("--use-rope-scaling \\\n--rope-scaling-factor 8 \\\n"),
        "{out}"
    );
    // A parameter Megatron-LM fixes is noted where the file differs.
    let (_, err) = emit("low2.json", &|c| {
        c["rope_scaling"]["low_freq_factor"] = json!(2.0);
    });
    assert!(
        err.contains("low_freq_factor is 2; Megatron-LM's llama3 scaling fixes it at 1"),
        "{err}"
    );
    let (out, _) = emit("linear.json", &|c| {
        c["rope_scaling"] = json!({"rope_type": "linear", "factor": 4.0});
    });
    assert!(
        out.contains("--rotary-seq-len-interpolation-factor 4 \\\n"),
        "{out}"
    );
    assert!(!out.contains("use-rope-scaling"), "{out}");
    let (out, err) = emit("dynamic.json", &|c| {
        c["rope_scaling"] = json!({"rope_type": "dynamic", "factor": 2.0});
    });
    assert!(
        !out.contains("rope-scaling") && !out.contains("interpolation"),
        "{out}"
    );
    assert!(err.contains("`dynamic` rope scaling"), "{err}");
    let (out, err) = emit("theta.json", &|c| {
        c["rope_scaling"] = serde_json::Value::Null;
        c["rope_theta"] = json!(10000.7);
    });
    assert!(out.contains("--rotary-base 10001 \\\n"), "{out}");
    assert!(
        err.contains("rope_theta 10000.7 is not an integer"),
        "{err}"
    );
    // DeepSeek-V3's YaRN (factor 40, mscale 1, mscale_all_dim 1; beta 32/1 and 4096
    // original positions, MLATransformerConfig's own) is multi-latent attention's
    // `--rope-type yarn` with its options.
    let (code, out, err) = apar(&[
        "plan",
        "--model",
        "tests/data/hf/deepseek-v3.json",
        "--cluster",
        "hgx-h800:256",
        "--global-batch",
        "15360",
        "--seq",
        "4096",
        "--emit",
    ]);
    assert_eq!(code, 0, "{err}");
    for want in [
        "--rope-type yarn \\\n",
        "--rotary-scaling-factor 40 \\\n",
        "--mscale 1 \\\n",
        "--mscale-all-dim 1",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    assert!(!out.contains("--rope-type rope"), "{out}");
}
