//! What each engine is given to run a plan, and the way back.
//!
//! [`export`] turns a plan ([`ExportPlan`], made from a [`crate::Plan`] by
//! [`crate::Plan::export`]) into what the engine takes: Megatron-LM command-line
//! arguments, a DeepSpeed `ds_config` JSON, torchtitan command-line overrides of a
//! `--module`/`--config` recipe, or Hugging Face `TrainingArguments` flags. Every value
//! the plan decided is carried by a real option of the engine; what the engine needs in
//! the environment is in [`Export::env`], and what the user must know is in
//! [`Export::notes`] — never inside the text, so that the text can be pasted as it is.
//! A plan the engine cannot run is refused with an [`ExportError`] that names the
//! missing option.
//!
//! [`parse`] reads an export back into a [`ParsedConfig`]: the law is
//! `parse(e, export(e, p).text, devices) == ParsedConfig::of(p)` for every plan the
//! engine accepts (a property test checks it).
//!
//! The option names come from these engine versions (each module says where):
//! Megatron-LM `main` at commit [`MEGATRON_COMMIT`], DeepSpeed [`DEEPSPEED_VERSION`],
//! torchtitan [`TORCHTITAN_VERSION`], transformers [`TRANSFORMERS_VERSION`]. The script
//! `scripts/check_exports/` runs each engine's own parser on exports of real plans.

mod deepspeed;
mod hf;
mod megatron;
mod torchtitan;
mod words;

use super::memory::{Precision, PrecisionOptions};
use super::overlap::CommOverlap;
use super::Engine;
use crate::models::ModelConfig;
use crate::passes::{Config, Recompute, Schedule};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The Megatron-LM commit whose `megatron/training/arguments.py` the option names come
/// from.
pub const MEGATRON_COMMIT: &str = "d98e8a64ddf34856e74b24714e3bedb2f5a39553";
/// The DeepSpeed release whose `deepspeed/runtime/config.py` and pipeline engine the
/// keys come from.
pub const DEEPSPEED_VERSION: &str = "0.19.8";
/// The torchtitan release whose `torchtitan/config/configs.py` and `trainer.py` the
/// options come from.
pub const TORCHTITAN_VERSION: &str = "0.3.0";
/// The transformers release whose `TrainingArguments` the flags come from.
pub const TRANSFORMERS_VERSION: &str = "5.23.0";

/// What one virtual pipeline stage holds, in model order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageLayers {
    /// The stage holds the token embedding (block 0).
    pub embedding: bool,
    /// Transformer layers in the stage.
    pub layers: u32,
    /// The stage holds the output head and the loss (the last block).
    pub head: bool,
}

/// Everything an export reads: the configuration, the model, the job and the pipeline
/// cut.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportPlan {
    /// The chosen configuration.
    pub config: Config,
    /// The model, when it came from the zoo or a `config.json` (Megatron-LM and
    /// torchtitan need it).
    pub model: Option<ModelConfig>,
    /// Sequence length, tokens.
    pub seq: u64,
    /// Sequences per step.
    pub global_batch: u64,
    /// The virtual pipeline stages in model order (`pp × v` of them).
    pub stages: Vec<StageLayers>,
    /// The precision the plan was made at (bf16 with the engine's gradient and
    /// optimizer dtypes unless set with [`ExportPlan::with_precision`]).
    pub precision: PrecisionOptions,
    /// The data-parallel overlap switches the plan was priced with (both on unless
    /// set with [`ExportPlan::with_comm_overlap`]).
    pub comm_overlap: CommOverlap,
}

impl ExportPlan {
    /// The same plan with the data-parallel overlap switches `flags`.
    pub fn with_comm_overlap(mut self, flags: CommOverlap) -> ExportPlan {
        self.comm_overlap = flags;
        self
    }

    /// The same plan at `precision`.
    pub fn with_precision(mut self, precision: PrecisionOptions) -> ExportPlan {
        self.precision = precision;
        self
    }

    /// A plan from its parts; `stage_blocks` are the `[first, last]` blocks of each
    /// virtual stage in model order, block 0 being the embedding and the last block
    /// the head (as [`crate::Plan::stages`] gives them).
    pub fn new(
        config: Config,
        model: Option<ModelConfig>,
        seq: u64,
        global_batch: u64,
        stage_blocks: &[[usize; 2]],
    ) -> ExportPlan {
        let last = stage_blocks.iter().map(|b| b[1]).max().unwrap_or(0);
        let stages = stage_blocks
            .iter()
            .map(|&[first, end]| {
                let layers = (first.max(1)..=end.min(last.saturating_sub(1))).count();
                StageLayers {
                    embedding: first == 0,
                    layers: u32::try_from(layers).unwrap_or(u32::MAX),
                    head: end == last && last > 0,
                }
            })
            .collect();
        ExportPlan {
            config,
            model,
            seq,
            global_batch,
            stages,
            precision: PrecisionOptions::default(),
            comm_overlap: CommOverlap::default(),
        }
    }

    /// A plan whose virtual stages hold `layers[i]` transformer layers each, the
    /// embedding in the first and the head in the last.
    pub fn with_layers(
        config: Config,
        model: Option<ModelConfig>,
        seq: u64,
        layers: &[u32],
    ) -> ExportPlan {
        let n = layers.len();
        ExportPlan {
            precision: PrecisionOptions::default(),
            comm_overlap: CommOverlap::default(),
            global_batch: config.global_batch(),
            config,
            model,
            seq,
            stages: layers
                .iter()
                .enumerate()
                .map(|(i, &l)| StageLayers {
                    embedding: i == 0,
                    layers: l,
                    head: i + 1 == n,
                })
                .collect(),
        }
    }

    /// Transformer layers in all stages together.
    pub fn layers(&self) -> u32 {
        self.stages.iter().map(|s| s.layers).sum()
    }

    /// Model chunks per pipeline device (`v` of interleaved 1F1B, else 1).
    fn chunks(&self) -> u32 {
        if self.config.pp > 1 {
            self.config.schedule.chunks()
        } else {
            1
        }
    }
}

/// An engine's configuration for a plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Export {
    /// The engine it is for.
    pub engine: Engine,
    /// The arguments or the file, as the engine reads it: Megatron-LM, torchtitan and
    /// Hugging Face get shell words (one option per line, joined by `\` so that the
    /// text pastes after a command), DeepSpeed a JSON document.
    pub text: String,
    /// Environment variables the engine needs set (names and values), to put before
    /// the launcher ([`Export::env_prefix`]).
    pub env: Vec<(String, String)>,
    /// What the user must know: values the engine takes from the training script,
    /// how the job must be launched for the text to mean the plan.
    pub notes: Vec<String>,
}

impl Export {
    /// The environment as a shell prefix (`NAME=value NAME2=value2`), empty if none.
    pub fn env_prefix(&self) -> String {
        self.env
            .iter()
            .map(|(k, v)| format!("{k}={}", words::quote(v)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Why an engine cannot be given a plan.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The engine has no option for something the plan decided.
    #[error("{engine} cannot run this plan's {what}: {missing}")]
    Unsupported {
        /// The engine.
        engine: Engine,
        /// What the plan decided.
        what: String,
        /// The option the engine would need and lacks (or the check it would fail).
        missing: String,
    },
    /// The engine builds the model from its dimensions and the plan has none (a plan
    /// of a bare graph).
    #[error("{engine} builds the model from its dimensions; this plan's model `{model}` came without a configuration")]
    NoModelConfig {
        /// The engine.
        engine: Engine,
        /// The model's name.
        model: String,
    },
    /// The model has mixture-of-experts layers (or multi-latent attention), whose
    /// engine options apar does not write or read back yet for this engine (it writes
    /// Megatron-LM's `--num-experts`, `--moe-router-topk`, …; no engine's multi-latent
    /// attention options).
    #[error("{engine}: the model `{model}` has {what}, whose options apar does not export yet")]
    MixtureOfExperts {
        /// The engine.
        engine: Engine,
        /// The model's name.
        model: String,
        /// What it has (mixture-of-experts layers, multi-latent attention).
        what: &'static str,
    },
    /// torchtitan runs registered recipes only, and none matches the model.
    #[error("{engine} has no recipe (--module/--config) for the model `{model}`; it runs {known}")]
    NoRecipe {
        /// The engine.
        engine: Engine,
        /// The model's name.
        model: String,
        /// The models that have one.
        known: String,
    },
}

impl ExportError {
    fn unsupported(engine: Engine, what: impl Into<String>, missing: impl Into<String>) -> Self {
        ExportError::Unsupported {
            engine,
            what: what.into(),
            missing: missing.into(),
        }
    }
}

/// Whether `engine`'s exported options can express `precision`: they set the compute
/// precision, and the gradient and optimizer dtypes follow from it, so an override that
/// changes those cannot be written (`plan` and `eval` price it, with a warning).
///
/// # Errors
///
/// [`ExportError::Unsupported`] naming the precision or the override.
pub fn precision_exportable(
    engine: Engine,
    precision: &PrecisionOptions,
) -> Result<(), ExportError> {
    let asked = engine.states(precision);
    let usual = engine.states(&PrecisionOptions {
        compute: precision.compute,
        ..PrecisionOptions::default()
    });
    match (asked, usual) {
        (Ok(a), Ok(u)) if a.grad == u.grad && a.master == u.master => Ok(()),
        (Ok(_), Ok(_)) => Err(ExportError::unsupported(
                engine,
                "gradient or optimizer dtype other than the engine's default",
                "apar writes the compute precision only; the engine then picks its own gradient and optimizer dtypes",
            )),
        (Err(e), _) | (_, Err(e)) => Err(ExportError::unsupported(
                engine,
                format!("{} compute", precision.compute),
                e.to_string(),
            )),
    }
}

/// Renders `plan` for `engine`.
///
/// # Errors
///
/// [`ExportError`] when the engine cannot run the plan as decided (it names the option
/// the engine lacks) or lacks what it needs to build the model.
pub fn export(engine: Engine, plan: &ExportPlan) -> Result<Export, ExportError> {
    if let Some(m) = &plan.model {
        unexported_layers(engine, m)?;
    }
    precision_exportable(engine, &plan.precision)?;
    // Module sets are Megatron-LM's (`Engine::allows` refuses them elsewhere).
    if let Some(modules) = plan.config.recomputation().modules {
        if engine != Engine::Megatron {
            return Err(ExportError::unsupported(
                engine,
                format!("recompute modules {modules}"),
                "module sets are Megatron-LM's --recompute-modules; this engine's selective policy is its own",
            ));
        }
    }
    match engine {
        Engine::Megatron => megatron::export(plan),
        Engine::DeepSpeed => deepspeed::export(plan),
        Engine::Torchtitan => torchtitan::export(plan),
        Engine::Hf => hf::export(plan),
    }
}

/// Whether `engine` can train `model` at `compute` precision, whatever the parallel
/// configuration: torchtitan runs the models it has a recipe for at that precision
/// (its recipes fix bf16 or float8 linears), Megatron-LM's GPT model has no parallel
/// residual; DeepSpeed and Hugging Face take any dense configuration apar builds, and
/// only Megatron-LM's export writes experts and latent attention.
///
/// # Errors
///
/// [`ExportError::NoRecipe`] or [`ExportError::Unsupported`] naming what is missing;
/// [`ExportError::MixtureOfExperts`] for experts or latent attention outside
/// Megatron-LM.
pub fn model_supported(
    engine: Engine,
    model: &ModelConfig,
    compute: Precision,
) -> Result<(), ExportError> {
    unexported_layers(engine, model)?;
    match engine {
        Engine::Torchtitan => torchtitan::recipe(model, compute == Precision::Fp8).map(|_| ()),
        Engine::Megatron => megatron::model_supported(model),
        Engine::DeepSpeed | Engine::Hf => Ok(()),
    }
}

/// The plan's decisions as an engine's options carry them: what [`parse`] reads back.
///
/// Values without meaning in the plan are normalized away: no schedule and no stages
/// without a pipeline, no sequence parallelism without tensor parallelism, no layer
/// count without recomputation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParsedConfig {
    /// Data-parallel degree.
    pub dp: u32,
    /// Tensor-parallel degree.
    pub tp: u32,
    /// Pipeline-parallel degree.
    pub pp: u32,
    /// Context-parallel degree (left out of JSON when 1).
    #[serde(skip_serializing_if = "is_one")]
    pub cp: u32,
    /// Expert-parallel degree (left out of JSON when 1).
    #[serde(skip_serializing_if = "is_one")]
    pub ep: u32,
    /// Expert-tensor-parallel degree (left out of JSON when 1).
    #[serde(skip_serializing_if = "is_one")]
    pub etp: u32,
    /// Sequences per micro-batch.
    pub micro_batch: u32,
    /// Micro-batches per step and pipeline.
    pub num_micro_batches: u32,
    /// Sequence parallelism (only with `tp > 1`).
    pub sp: bool,
    /// Recomputation policy.
    pub recompute: Recompute,
    /// Layers per stage the policy applies to (`None`: all).
    pub recompute_layers: Option<u32>,
    /// Megatron-LM's `--recompute-modules` with selective recomputation, when not its
    /// default `core_attn` (left out of JSON when `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recompute_modules: Option<crate::passes::RecomputeModules>,
    /// ZeRO stage.
    pub zero: u8,
    /// The low-precision parameters are sharded (ZeRO-3 or the explicit flag).
    pub low_prec_shard: bool,
    /// The pipeline schedule (only with `pp > 1`; interleaving with `v ≥ 2`).
    pub schedule: Option<Schedule>,
    /// The virtual stages (only with `pp > 1`).
    pub stages: Vec<StageLayers>,
    /// FP8 compute is switched on (Megatron-LM `--fp8-format`; a torchtitan recipe
    /// with a `Float8LinearConverter`).
    pub fp8: bool,
    /// The mixture-of-experts layers (left out of JSON for a dense model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moe: Option<ParsedMoe>,
    // -- multi-latent attention (branch `mla`) --
    /// Multi-latent attention's ranks and head dims (Megatron-LM
    /// `--multi-latent-attention`, `--q-lora-rank`, …; left out of JSON without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mla: Option<crate::models::Mla>,
}

/// A model's mixture-of-experts layers as an engine's options carry them (Megatron-LM's
/// `--num-experts`, `--moe-*`); experts are replicated on every data-parallel rank
/// (expert-parallel size 1).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ParsedMoe {
    /// Routed experts.
    pub experts: u64,
    /// Experts chosen per token.
    pub topk: u64,
    /// Intermediate size of one routed expert.
    pub expert_ffn: u64,
    /// Intermediate size of the shared experts together (left out of JSON when 0).
    #[serde(skip_serializing_if = "is_zero")]
    pub shared_ffn: u64,
    /// The shared experts' output is scaled by a sigmoid gate (only with shared
    /// experts; left out of JSON when false).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shared_gate: bool,
    /// Router scoring.
    pub scoring: crate::models::Scoring,
    /// The dense layers, in order (left out of JSON when every layer has experts).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dense_layers: Vec<u32>,
    /// Capacity factor (`None`: dropless; left out of JSON then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_factor: Option<f64>,
    // -- DeepSeek routing (branch `mla`) --
    /// Scale of the routed experts' combine weights (`None`: 1; left out of JSON then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routed_scale: Option<f64>,
    /// Group-limited routing (left out of JSON when `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_limit: Option<crate::models::GroupLimit>,
    /// Auxiliary-loss-free expert bias (left out of JSON when false).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub expert_bias: bool,
    /// Softmax over all experts before the top-k, unnormalized (left out of JSON when
    /// false).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pre_softmax: bool,
}

impl ParsedMoe {
    /// The mixture-of-experts layers of `model`, if it has any.
    pub fn of(model: &ModelConfig) -> Option<ParsedMoe> {
        let m = model.moe.as_deref()?;
        Some(ParsedMoe {
            experts: m.experts,
            topk: m.topk,
            expert_ffn: m.expert_ffn,
            shared_ffn: m.shared_ffn,
            shared_gate: m.shared_gate && m.shared_ffn > 0,
            scoring: m.scoring,
            dense_layers: (0..model.layers)
                .filter(|&i| !model.is_moe_layer(i))
                .collect(),
            capacity_factor: m.capacity_factor,
            routed_scale: m.routed_scale.filter(|&r| r != 1.0),
            group_limit: m.group_limit,
            expert_bias: m.expert_bias,
            pre_softmax: m.pre_softmax,
        })
    }
}

/// Serde's test for a size left out when 0.
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ParsedConfig {
    /// What an export of `plan` must read back as.
    pub fn of(plan: &ExportPlan) -> ParsedConfig {
        let c = &plan.config;
        let pipelined = c.pp > 1;
        ParsedConfig {
            dp: c.dp,
            tp: c.tp,
            pp: c.pp,
            cp: c.cp,
            ep: c.ep,
            etp: c.etp,
            micro_batch: c.micro_batch,
            num_micro_batches: c.num_micro_batches,
            sp: c.sp && c.tp > 1,
            recompute: c.recompute,
            recompute_layers: match c.recompute {
                Recompute::None => None,
                _ => c.recompute_layers,
            },
            recompute_modules: c.recomputation().modules,
            zero: c.zero,
            low_prec_shard: c.shards_low_prec(),
            schedule: pipelined.then_some(match c.schedule {
                Schedule::Interleaved(v) if v <= 1 => Schedule::OneFOneB,
                s => s,
            }),
            stages: if pipelined {
                plan.stages.clone()
            } else {
                Vec::new()
            },
            fp8: plan.precision.compute == crate::engine::memory::Precision::Fp8,
            moe: plan.model.as_ref().and_then(ParsedMoe::of),
            mla: plan.model.as_ref().and_then(|m| m.mla.as_deref().cloned()),
        }
    }
}

/// Serde's test for a degree left out when 1.
fn is_one(n: &u32) -> bool {
    *n == 1
}

/// Why a text is not an export apar could have written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Unbalanced quotes or a dangling escape.
    #[error("cannot split the text into shell words: {0}")]
    Words(String),
    /// Not a JSON document of the expected shape.
    #[error("not a DeepSpeed configuration: {0}")]
    Json(String),
    /// A needed option is absent.
    #[error("option {0} is missing")]
    Missing(String),
    /// An option's value does not parse.
    #[error("option {option} has the value `{value}`, which it does not take")]
    BadValue {
        /// The option.
        option: String,
        /// Its value.
        value: String,
    },
    /// Values that contradict each other or the world size.
    #[error("{0}")]
    Inconsistent(String),
}

/// Reads `text`, an export for `engine`, back into the plan's decisions. `devices` is
/// the world size the job is launched with (engines that derive the data-parallel
/// degree from it need it).
///
/// # Errors
///
/// [`ParseError`] when the text is not an export apar could have written for `engine`
/// on `devices` devices.
pub fn parse(engine: Engine, text: &str, devices: u64) -> Result<ParsedConfig, ParseError> {
    match engine {
        Engine::Megatron => megatron::parse(text, devices),
        Engine::DeepSpeed => deepspeed::parse(text, devices),
        Engine::Torchtitan => torchtitan::parse(text, devices),
        Engine::Hf => hf::parse(text, devices),
    }
}

/// `a / b` when it divides exactly and fits a `u32`.
fn exact_div(a: u64, b: u64, what: &str) -> Result<u32, ParseError> {
    if b == 0 || a % b != 0 {
        return Err(ParseError::Inconsistent(format!(
            "{what}: {a} is not a multiple of {b}"
        )));
    }
    u32::try_from(a / b).map_err(|_| ParseError::Inconsistent(format!("{what} overflows")))
}

impl fmt::Display for StageLayers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{} layers{}",
            if self.embedding { "embedding + " } else { "" },
            self.layers,
            if self.head { " + head" } else { "" }
        )
    }
}

/// The number of layers per stage of an even cut, if `stages` is one.
fn even_layers(stages: &[StageLayers]) -> Option<u32> {
    let first = stages.first()?.layers;
    stages.iter().all(|s| s.layers == first).then_some(first)
}

/// Megatron-LM's MoE and multi-latent attention options are written (`megatron`); the
/// other engines' are not, so their exports of such a model are refused.
fn unexported_layers(engine: Engine, m: &ModelConfig) -> Result<(), ExportError> {
    let what = match (&m.moe, &m.mla) {
        (_, Some(_)) if engine != Engine::Megatron => Some("multi-latent attention"),
        (Some(_), _) if engine != Engine::Megatron => Some("mixture-of-experts layers"),
        _ => None,
    };
    match what {
        Some(what) => Err(ExportError::MixtureOfExperts {
            engine,
            model: m.name.clone(),
            what,
        }),
        None => Ok(()),
    }
}
