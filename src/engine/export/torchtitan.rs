//! torchtitan command-line overrides of a registered recipe.
//!
//! torchtitan [`super::TORCHTITAN_VERSION`] has no job file: `--module M --config F`
//! names a recipe function of `torchtitan/models/M/config_registry.py`, and
//! `--section.key value` options override its fields (`torchtitan/config/manager.py`,
//! parsed by tyro). Names and checks are those of `torchtitan/config/configs.py`
//! (`TrainingConfig`, `ParallelismConfig`) and `torchtitan/trainer.py`
//! (`Trainer.Config.__post_init__`, the batch checks of `Trainer.__init__`):
//!
//! - the model is the recipe's (its dimensions are not options), so only models with a
//!   recipe are exported;
//! - ZeRO-2 is FSDP2 with `--parallelism.fsdp_reshard_after_forward never`, ZeRO-3 with
//!   `always`, no sharding is replication (`data_parallel_replicate_degree`); FSDP2 has
//!   no optimizer-only sharding (ZeRO-1);
//! - the pipeline cut, interleaved or not, is `--parallelism.module_fqns_per_model_part`
//!   (one comma-separated list of module names per virtual stage); a pipeline needs
//!   `--training.disable_cuda_graphs` (`_validate_cuda_graphs`);
//! - with a pipeline, `training.local_batch_size` is the micro-batches of one step
//!   (`pipeline_parallel_microbatch_size` each); without, it is one micro-batch and
//!   `global_batch_size` sets the accumulation;
//! - recomputation is the `activation-checkpoint:none|selective|full` subcommand, last
//!   on the line (tyro reads the options after it as the subcommand's).

use super::words::{self, Options};
use super::{exact_div, Export, ExportError, ExportPlan, ParseError, ParsedConfig, StageLayers};
use crate::engine::memory::Precision;
use crate::engine::Engine;
use crate::passes::{Recompute, Schedule};

const E: Engine = Engine::Torchtitan;

/// apar zoo models with a torchtitan recipe: (zoo name, `--module`, `--config`, layers,
/// hidden size, the recipe trains its linear layers in float8), from
/// `torchtitan/models/llama3/__init__.py` and `config_registry.py`.
const RECIPES: &[(&str, &str, &str, u32, u64, bool)] = &[
    ("llama3-8b", "llama3", "llama3_8b", 32, 4096, false),
    ("llama3-70b", "llama3", "llama3_70b", 80, 8192, false),
    // `llama3_405b` puts a `Float8LinearConverter` into its model spec, which the
    // command line cannot change (`model_spec` is suppressed from tyro).
    ("llama3-405b", "llama3", "llama3_405b", 126, 16384, true),
];

fn schedule_name(s: Schedule) -> &'static str {
    match s {
        Schedule::Gpipe => "GPipe",
        Schedule::OneFOneB => "1F1B",
        Schedule::Interleaved(_) => "Interleaved1F1B",
    }
}

/// The module names of each virtual stage (`tok_embeddings`, `layers.i`, `norm`,
/// `lm_head`: the llama3 model's, `torchtitan/models/llama3`).
fn module_fqns(stages: &[StageLayers]) -> Vec<String> {
    let mut next = 0u32;
    stages
        .iter()
        .map(|s| {
            let mut names = Vec::new();
            if s.embedding {
                names.push("tok_embeddings".to_string());
            }
            for i in next..next + s.layers {
                names.push(format!("layers.{i}"));
            }
            next += s.layers;
            if s.head {
                names.push("norm".into());
                names.push("lm_head".into());
            }
            names.join(",")
        })
        .collect()
}

fn o(k: &str, v: impl ToString) -> Vec<String> {
    vec![format!("--{k}"), v.to_string()]
}

/// The model's recipe, when torchtitan has one that trains its linears in float8 when
/// `fp8` and in bf16 otherwise.
pub(super) fn recipe(
    m: &crate::models::ModelConfig,
    fp8: bool,
) -> Result<&'static (&'static str, &'static str, &'static str, u32, u64, bool), ExportError> {
    let recipe = RECIPES
        .iter()
        .find(|r| r.0 == m.name && r.3 == m.layers && r.4 == m.hidden)
        .ok_or_else(|| ExportError::NoRecipe {
            engine: E,
            model: m.name.clone(),
            known: RECIPES.iter().map(|r| r.0).collect::<Vec<_>>().join(", "),
        })?;
    if fp8 && !recipe.5 {
        return Err(ExportError::unsupported(
            E,
            "fp8 compute",
            format!(
                "the {} recipe trains bf16 linears; float8 is a Float8LinearConverter in a recipe's model spec (quantization=[...], torchtitan/components/quantization/float8.md), which no command-line option sets",
                recipe.2
            ),
        ));
    }
    if !fp8 && recipe.5 {
        return Err(ExportError::unsupported(
            E,
            "bf16 training",
            format!(
                "the {} recipe converts the linear layers to float8 (torchao) in its model spec, which no command-line option changes",
                recipe.2
            ),
        ));
    }
    Ok(recipe)
}

pub(super) fn export(p: &ExportPlan) -> Result<Export, ExportError> {
    let c = &p.config;
    let m = p.model.as_ref().ok_or_else(|| ExportError::NoModelConfig {
        engine: E,
        model: "(graph)".into(),
    })?;
    let fp8 = p.precision.compute == Precision::Fp8;
    let recipe = recipe(m, fp8)?;
    if c.zero == 1 {
        return Err(ExportError::unsupported(
            E,
            "ZeRO-1",
            "FSDP2 shards gradients with the optimizer states (fsdp_reshard_after_forward never is ZeRO-2); no option shards the optimizer states alone",
        ));
    }
    if c.low_prec_shard && c.zero < 3 {
        return Err(ExportError::unsupported(
            E,
            format!("sharded low-precision parameters with ZeRO-{}", c.zero),
            "FSDP2 keeps parameters sharded between forward and backward only with fsdp_reshard_after_forward always (ZeRO-3)",
        ));
    }
    if c.recompute != Recompute::None && c.recompute_layers.is_some() {
        return Err(ExportError::unsupported(
            E,
            "recomputation of some layers per stage only",
            "the activation-checkpoint policies apply to every transformer block",
        ));
    }
    if c.pp == 1 && c.schedule.chunks() > 1 {
        return Err(ExportError::unsupported(
            E,
            "interleaved schedule without a pipeline",
            "Interleaved1F1B needs --parallelism.pipeline_parallel_degree > 1",
        ));
    }
    let mut a = vec![
        vec!["--module".to_string(), recipe.1.to_string()],
        vec!["--config".to_string(), recipe.2.to_string()],
    ];
    let mut notes = vec![format!(
        "launch on dp {} x {}tp {} x pp {} = {} ranks (torchrun --nproc-per-node ... -m torchtitan.train)",
        c.dp,
        if c.cp > 1 {
            format!("cp {} x ", c.cp)
        } else {
            String::new()
        },
        c.tp,
        c.pp,
        c.devices()
    )];
    if fp8 {
        notes.push(format!(
            "fp8: the {} recipe's Float8LinearConverter (torchao rowwise, lm_head in bf16) converts the linears; no option switches it",
            recipe.2
        ));
    }
    let local = if c.pp > 1 {
        u64::from(c.micro_batch) * u64::from(c.num_micro_batches)
    } else {
        u64::from(c.micro_batch)
    };
    a.push(o("training.local_batch_size", local));
    a.push(o("training.global_batch_size", p.global_batch));
    a.push(o("training.seq_len", p.seq));
    let param = match p.precision.compute {
        // torchao's float8 linears run on bf16 FSDP parameters.
        Precision::Bf16 | Precision::Fp8 => "bfloat16",
        Precision::Fp32 => "float32",
        Precision::Fp16 => {
            return Err(ExportError::unsupported(
                E,
                format!("{} compute", p.precision.compute),
                "training.mixed_precision_param takes bfloat16 or float32",
            ))
        }
    };
    a.push(o("training.mixed_precision_param", param));
    if c.cp > 1 && c.zero < 2 {
        return Err(ExportError::unsupported(
            E,
            format!("context parallel {} with ZeRO-{}", c.cp, c.zero),
            "parallelize_llama applies FSDP over the dp_shard × cp mesh whenever context parallelism is on",
        ));
    }
    let (replicate, shard) = if c.zero >= 2 { (1, c.dp) } else { (c.dp, 1) };
    a.push(o("parallelism.data_parallel_replicate_degree", replicate));
    a.push(o("parallelism.data_parallel_shard_degree", shard));
    if c.zero >= 2 {
        let policy = if c.zero == 2 { "never" } else { "always" };
        a.push(o("parallelism.fsdp_reshard_after_forward", policy));
    }
    a.push(o("parallelism.tensor_parallel_degree", c.tp));
    a.push(vec![if c.sp && c.tp > 1 {
        "--parallelism.enable_sequence_parallel".to_string()
    } else {
        "--parallelism.no_enable_sequence_parallel".to_string()
    }]);
    a.push(o("parallelism.pipeline_parallel_degree", c.pp));
    if c.cp > 1 {
        // PyTorch's `context_parallel` over SDPA, load-balanced on causal masks.
        a.push(o("parallelism.context_parallel_degree", c.cp));
    }
    if c.ep > 1 {
        // `E/ep` experts per rank, the sparse region efsdp × ep over the dense
        // region's ranks (`ParallelismConfig.expert_parallel_degree`).
        a.push(o("parallelism.expert_parallel_degree", c.ep));
    }
    if c.pp > 1 {
        a.push(o(
            "parallelism.pipeline_parallel_schedule",
            schedule_name(c.schedule),
        ));
        a.push(o(
            "parallelism.pipeline_parallel_microbatch_size",
            c.micro_batch,
        ));
        let mut parts = vec!["--parallelism.module_fqns_per_model_part".to_string()];
        parts.extend(module_fqns(&p.stages));
        a.push(parts);
        a.push(vec!["--training.disable_cuda_graphs".to_string()]);
    }
    a.push(vec![match c.recompute {
        Recompute::None => "activation-checkpoint:none",
        Recompute::Selective => "activation-checkpoint:selective",
        Recompute::Full => "activation-checkpoint:full",
    }
    .to_string()]);
    if c.recompute == Recompute::Selective {
        notes.push("torchtitan's selective checkpointing is per operator (it saves matmul and communication outputs except every second matmul), not the attention core apar planned: its memory differs".into());
    }
    Ok(Export {
        engine: E,
        text: words::lines(&a),
        env: Vec::new(),
        notes,
    })
}

pub(super) fn parse(text: &str, devices: u64) -> Result<ParsedConfig, ParseError> {
    let mut w = Options::parse(text)?;
    // The recomputation subcommand is a bare word; the options are the rest.
    let full = w.take("activation-checkpoint:full");
    let selective = w.take("activation-checkpoint:selective");
    let none = w.take("activation-checkpoint:none");
    let config = w.value("--config")?.unwrap_or_default();
    let fp8 = RECIPES.iter().any(|r| r.2 == config && r.5);
    let replicate: u32 = w.req("--parallelism.data_parallel_replicate_degree")?;
    let shard: u32 = w.req("--parallelism.data_parallel_shard_degree")?;
    let tp: u32 = w.req("--parallelism.tensor_parallel_degree")?;
    let pp: u32 = w.req("--parallelism.pipeline_parallel_degree")?;
    let cp: u32 = w.num("--parallelism.context_parallel_degree")?.unwrap_or(1);
    let ep: u32 = w.num("--parallelism.expert_parallel_degree")?.unwrap_or(1);
    let dp = replicate
        .checked_mul(shard)
        .ok_or_else(|| ParseError::Inconsistent("data-parallel degree overflows".into()))?;
    if u128::from(dp) * u128::from(cp) * u128::from(tp) * u128::from(pp) != u128::from(devices) {
        return Err(ParseError::Inconsistent(format!(
            "degrees {replicate} × {shard} × {cp} × {tp} × {pp} do not make {devices} ranks"
        )));
    }
    let local: u64 = w.req("--training.local_batch_size")?;
    let global: u64 = w.req("--training.global_batch_size")?;
    let (micro_batch, num_micro_batches) = if pp > 1 {
        let b: u32 = w.req("--parallelism.pipeline_parallel_microbatch_size")?;
        let accumulation = exact_div(global, local.saturating_mul(u64::from(dp)), "accumulation")?;
        if accumulation != 1 {
            return Err(ParseError::Inconsistent(
                "with a pipeline, one step is one local batch".into(),
            ));
        }
        (
            b,
            exact_div(local, u64::from(b), "local batch over micro-batch")?,
        )
    } else {
        let b = u32::try_from(local).map_err(|_| ParseError::Inconsistent("local batch".into()))?;
        (
            b,
            exact_div(global, local.saturating_mul(u64::from(dp)), "accumulation")?,
        )
    };
    let zero = match w.value("--parallelism.fsdp_reshard_after_forward")? {
        Some("never") => 2,
        Some("always") => 3,
        None if shard > 1 => 3,
        None => 0,
        Some(other) => {
            return Err(ParseError::BadValue {
                option: "--parallelism.fsdp_reshard_after_forward".into(),
                value: other.into(),
            })
        }
    };
    let recompute = if full {
        Recompute::Full
    } else if selective {
        Recompute::Selective
    } else if none {
        Recompute::None
    } else {
        return Err(ParseError::Missing("activation-checkpoint:…".into()));
    };
    let (schedule, stages) = if pp > 1 {
        let parts = w
            .values("--parallelism.module_fqns_per_model_part")
            .ok_or_else(|| {
                ParseError::Missing("--parallelism.module_fqns_per_model_part".into())
            })?;
        let stages: Vec<StageLayers> = parts
            .iter()
            .map(|part| {
                let names: Vec<&str> = part.split(',').collect();
                StageLayers {
                    embedding: names.contains(&"tok_embeddings"),
                    layers: names.iter().filter(|n| n.starts_with("layers.")).count() as u32,
                    head: names.contains(&"lm_head"),
                }
            })
            .collect();
        let chunks = exact_div(stages.len() as u64, u64::from(pp), "model parts over pp")?;
        let schedule = match w.value("--parallelism.pipeline_parallel_schedule")? {
            Some("GPipe") => Schedule::Gpipe,
            Some("1F1B") | None => Schedule::OneFOneB,
            Some("Interleaved1F1B") => Schedule::Interleaved(chunks),
            Some(other) => {
                return Err(ParseError::BadValue {
                    option: "--parallelism.pipeline_parallel_schedule".into(),
                    value: other.into(),
                })
            }
        };
        (Some(schedule), stages)
    } else {
        (None, Vec::new())
    };
    Ok(ParsedConfig {
        dp,
        tp,
        pp,
        cp,
        ep,
        etp: 1,
        micro_batch,
        num_micro_batches,
        sp: tp > 1 && w.has("--parallelism.enable_sequence_parallel"),
        recompute,
        recompute_layers: None,
        recompute_modules: None,
        zero,
        low_prec_shard: zero >= 3,
        schedule,
        stages,
        fp8,
        moe: None,
        mla: None,
    })
}
