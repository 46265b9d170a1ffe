//! Megatron-LM's `--recompute-granularity selective --recompute-modules …`: which
//! engines take module sets and which sets, the candidates the search sees, the JSON
//! form of a configuration, the command line, and the Llama-3-405B configuration of the
//! Llama 3 paper, which fits only with full recomputation unless the MLP is
//! recomputed.

use apar::cluster::Cluster;
use apar::engine::rules::{BlockLayout, Unsupported};
use apar::engine::Engine;
use apar::lower::compile::{CompileError, Compiler, ModelSource};
use apar::models::zoo;
use apar::passes::candidates::{enumerate_for, Constraints};
use apar::passes::{Config, Recompute, RecomputeModules, Schedule};

mod common;
use common::apar;

fn set(s: &str) -> RecomputeModules {
    s.parse().unwrap()
}

fn selective(modules: Option<&str>) -> Config {
    Config {
        recompute: Recompute::Selective,
        recompute_modules: modules.map(set),
        ..Config::new(2, 1, 1, 1, 4)
    }
}

/// Megatron-LM takes `mlp` and `core_attn,mlp`; it refuses `layernorm` (fused into
/// Transformer Engine's linear layers on dense models), the MoE/MLA modules, and module
/// sets without selective recomputation; the other engines refuse any set.
#[test]
fn engines_and_module_sets() {
    let model = BlockLayout::transformer(8);
    for ok in ["mlp", "core_attn,mlp", "core_attn"] {
        assert_eq!(
            Engine::Megatron.allows(&selective(Some(ok)), &model),
            Ok(())
        );
    }
    for (bad, needle) in [
        ("layernorm", "IdentityOp"),
        ("core_attn,layernorm,mlp", "IdentityOp"),
        ("moe", "mixture-of-experts"),
        ("mla_up_proj", "multi-latent-attention"),
    ] {
        match Engine::Megatron.allows(&selective(Some(bad)), &model) {
            Err(e @ Unsupported::RecomputeModules { .. }) => {
                assert!(e.to_string().contains(needle), "{e}")
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    let full = Config {
        recompute: Recompute::Full,
        ..selective(Some("mlp"))
    };
    assert!(matches!(
        Engine::Megatron.allows(&full, &model),
        Err(Unsupported::RecomputeModules { .. })
    ));
    for engine in [Engine::DeepSpeed, Engine::Torchtitan, Engine::Hf] {
        let refusals = engine.refusals(&selective(Some("mlp")), &model);
        assert!(
            refusals
                .iter()
                .any(|e| matches!(e, Unsupported::RecomputeModules { .. })),
            "{engine}: {refusals:?}"
        );
    }
}

/// Beside each selective candidate, Megatron-LM's search sees `mlp` and
/// `core_attn,mlp`; a pinned set narrows it to that set (`core_attn`, the default, is
/// spelled as none); other engines see none.
#[test]
fn candidates_carry_module_sets() {
    let model = BlockLayout::transformer(8);
    let k = Constraints {
        tp: Some(1),
        pp: Some(1),
        zero: Some(0),
        low_prec_shard: Some(false),
        micro_batch: Some(1),
        ..Constraints::default()
    };
    let sets = |engine, k: &Constraints| -> Vec<(Recompute, Option<String>)> {
        enumerate_for(engine, &model, 8, 8, 64, 1024, k)
            .iter()
            .map(|c| (c.recompute, c.recompute_modules.map(|m| m.to_string())))
            .collect()
    };
    assert_eq!(
        sets(Engine::Megatron, &k),
        vec![
            (Recompute::None, None),
            (Recompute::Selective, None),
            (Recompute::Selective, Some("mlp".into())),
            (Recompute::Selective, Some("core_attn,mlp".into())),
            (Recompute::Full, None),
        ]
    );
    let pinned = |m: &str| Constraints {
        recompute_modules: Some(set(m)),
        ..k.clone()
    };
    assert_eq!(
        sets(Engine::Megatron, &pinned("mlp")),
        vec![(Recompute::Selective, Some("mlp".into()))]
    );
    assert_eq!(
        sets(Engine::Megatron, &pinned("core_attn")),
        vec![(Recompute::Selective, None)]
    );
    assert!(sets(Engine::Torchtitan, &k)
        .iter()
        .all(|(_, m)| m.is_none()));
    assert!(sets(Engine::Torchtitan, &pinned("mlp")).is_empty());
}

/// A configuration without a module set prints as before (no `recompute_modules`
/// field) and one written before the field existed reads back; a set is a list of
/// Megatron-LM's names.
#[test]
fn config_json_is_stable() {
    let c = selective(None);
    let json = serde_json::to_string(&c).unwrap();
    assert!(!json.contains("recompute_modules"), "{json}");
    let old = json.clone();
    assert_eq!(serde_json::from_str::<Config>(&old).unwrap(), c);
    let m = selective(Some("mlp,core_attn"));
    let json = serde_json::to_string(&m).unwrap();
    assert!(
        json.contains(r#""recompute_modules":["core_attn","mlp"]"#),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), m);
    assert!(m
        .to_string()
        .contains("recompute selective [core_attn,mlp]"));
}

const TINY: [&str; 10] = [
    "eval",
    "--model",
    "tiny-gpt",
    "--cluster",
    "dgx-a100-80g:1",
    "--seq",
    "128",
    "--global-batch",
    "8",
    "--dp",
];

/// `--recompute-modules` on the command line: validated names, refused combinations,
/// and the set in the printed configuration.
#[test]
fn command_line() {
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = TINY.to_vec();
        args.push("8");
        args.extend(extra);
        apar(&args)
    };
    let (code, out, err) = run(&["--recompute-modules", "core_attn,mlp"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("recompute selective [core_attn,mlp]"), "{out}");
    // Megatron-LM's default set is the plain selective policy.
    let (code, out, _) = run(&["--recompute-modules", "core_attn"]);
    assert_eq!(code, 0);
    assert!(out.contains("recompute selective zero"), "{out}");
    for (extra, needle) in [
        (
            &["--recompute-modules", "mlp,attn"][..],
            "unknown recompute module `attn`",
        ),
        (&["--recompute-modules", "mlp,mlp"][..], "given twice"),
        (
            &["--recompute", "full", "--recompute-modules", "mlp"][..],
            "needs --recompute selective",
        ),
        (
            &["--recompute-modules", "layernorm"][..],
            "layernorm recomputes nothing",
        ),
        (
            &["--engine", "torchtitan", "--recompute-modules", "mlp"][..],
            "torchtitan cannot recompute the modules mlp",
        ),
    ] {
        let (code, out, err) = run(extra);
        assert_eq!(code, 2, "{extra:?}: {out}{err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
}

/// The Llama 3 paper's Llama-3-405B run (Dubey et al. 2024, Table 4: 8,192 H100, TP 8,
/// PP 16, DP 64, sequence 8192, global batch 2048 sequences; ~430 TFLOP/s per GPU
/// measured), as Megatron-LM would run it with micro-batch 1, sequence parallelism and
/// the distributed optimizer on 80 GB: without recomputation it does not fit; with
/// `--recompute-modules mlp` it fits, and runs faster than with full recomputation.
/// (Flash attention: `core_attn` recomputes nothing, so `core_attn,mlp` is refused.)
#[test]
fn llama3_405b_fits_with_the_mlp_recomputed() {
    let compiler = Compiler::new(
        ModelSource::Config(zoo::lookup("llama3-405b").unwrap()),
        Cluster::resolve("dgx-h100:1024").unwrap(),
        8192,
        2048,
        1.0,
    )
    .unwrap()
    .with_engine(Engine::Megatron);
    let c = |recompute, modules: Option<&str>, schedule| Config {
        sp: true,
        zero: 1,
        recompute,
        recompute_modules: modules.map(set),
        schedule,
        ..Config::new(64, 8, 16, 1, 32)
    };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    for schedule in [Schedule::OneFOneB, Schedule::Interleaved(2)] {
        let none = compiler
            .evaluate(&c(Recompute::None, None, schedule))
            .unwrap();
        assert!(!none.fits, "{schedule}: {:.1} GiB", gib(none.peak_bytes));
        let full = compiler
            .evaluate(&c(Recompute::Full, None, schedule))
            .unwrap();
        let mlp = compiler
            .evaluate(&c(Recompute::Selective, Some("mlp"), schedule))
            .unwrap();
        assert!(full.fits && mlp.fits, "{schedule}");
        assert!(mlp.peak_bytes > full.peak_bytes);
        assert!(
            mlp.step_time_s < full.step_time_s,
            "{schedule}: mlp {} s, full {} s",
            mlp.step_time_s,
            full.step_time_s
        );
        eprintln!(
            "{schedule}: full {:.2} s {:.1} TFLOP/s peak {:.1} GiB; mlp {:.2} s {:.1} TFLOP/s peak {:.1} GiB; none peak {:.1} GiB",
            full.step_time_s,
            full.tflops_per_device,
            gib(full.peak_bytes),
            mlp.step_time_s,
            mlp.tflops_per_device,
            gib(mlp.peak_bytes),
            gib(none.peak_bytes),
        );
    }
    match compiler.evaluate(&c(
        Recompute::Selective,
        Some("core_attn,mlp"),
        Schedule::OneFOneB,
    )) {
        Err(CompileError::ModulesRecomputeNothing(idle)) => {
            assert_eq!(idle, RecomputeModules::core_attn())
        }
        other => panic!("{:?}", other.map(|e| e.step_time_s)),
    }
}
