//! The library's one flow: load a model, plan or evaluate it on a cluster, and get a
//! [`Plan`] (or a typed [`PlanError`]: bad input, an empty candidate space, out of
//! memory with checked suggestions). The CLI only parses arguments into these calls
//! and prints what they return; `apar plan --json` is `serde_json::to_string(&plan)`.
//!
//! ```
//! use apar::cluster::Cluster;
//! use apar::{ModelSpec, PlanOptions, Session};
//!
//! let session = Session::for_spec(
//!     &ModelSpec::parse("tiny-gpt"),
//!     &Cluster::resolve("dgx-a100-80g:1")?,
//!     &PlanOptions::new(128, 16),
//! )?;
//! let plan = session.plan()?;
//! // One rank's point of view: its coordinates, the stage it runs, and its share of
//! // every parameter.
//! let me = plan.mesh.coordinates(3).expect("rank 3 exists");
//! let stage = me.pp;
//! for t in plan.tensors.iter().filter(|t| t.kind == apar::TensorKind::Param) {
//!     assert!(t.local_shape.iter().product::<u64>() <= t.global_shape.iter().product::<u64>());
//!     let _mine = t.tp_slices(me.tp, plan.mesh.tp);
//! }
//! assert!(plan.stages.iter().any(|s| s.device_stage == stage));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod calibrate;
mod detail;
mod diagnostics;

pub use detail::{
    Axis, BlockProgram, Coordinates, Mesh, OpStep, TensorKind, TensorPlacement, TpLayout,
};
pub use diagnostics::Warning;

use crate::cluster::{Cluster, ClusterError};
use crate::cost::Calibration;
use crate::engine::memory::{PrecisionOptions, RuntimeOverhead};
use crate::engine::overlap::CommOverlap;
use crate::engine::rules::Unsupported;
use crate::engine::Engine;
use crate::ir::{Graph, Phase};
use crate::lower::compile::{
    CompileError, Compiler, Evaluation, ModelSource, DEFAULT_MEMORY_RATIO,
};
use crate::lower::{StepTrace, TimeBreakdown};
use crate::models::{self, Attention, ModelConfig, ModelError};
use crate::passes::candidates::{enumerate, Constraints};
use crate::passes::Config;
use crate::report::{EvalJson, MemoryJson, OomReport, StageJson};
use crate::search::{self, SearchOptions, SearchResult, SearchStats};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// What to plan for besides the model and the cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanOptions {
    /// Sequence length, tokens.
    pub seq: u64,
    /// Sequences per step.
    pub global_batch: u64,
    /// Fraction of device memory a plan may use (the reference platform's 0.8 by
    /// default).
    pub memory_ratio: f64,
    /// The engine that will run the plan (Megatron-LM by default).
    #[serde(default)]
    pub engine: Engine,
    /// Compute, gradient and optimizer precision (the engine's defaults where unset).
    #[serde(default)]
    pub precision: PrecisionOptions,
    /// Runtime memory beside the tensors (context, NCCL, allocator reserve); peaks
    /// include it, and the memory ratio is a margin on top. `None`: the engine's
    /// ([`Engine::runtime`]).
    #[serde(default)]
    pub runtime: Option<RuntimeOverhead>,
    /// The engine's data-parallel overlap switches (both on: what apar's exports ask
    /// for; off to price a run made without them, Megatron-LM only).
    pub comm_overlap: CommOverlap,
    /// The cost parameters (`--calibration FILE`); `None`: the built-in table of the
    /// cluster's device ([`crate::cost::CostModel::new`]).
    #[serde(default)]
    pub calibration: Option<Calibration>,
    /// Expert load imbalance under expert parallelism (`--moe-imbalance`): the
    /// busiest expert-parallel rank's routed rows over the mean; 1 (the default) is
    /// balanced routing ([`Compiler::with_moe_imbalance`]).
    #[serde(default = "balanced")]
    pub moe_imbalance: f64,
    /// Pins, bounds and search switches.
    pub search: SearchOptions,
}

/// Serde's default expert load imbalance: balanced routing.
fn balanced() -> f64 {
    1.0
}

impl PlanOptions {
    /// Defaults for a sequence length and global batch: 0.8 of device memory, the
    /// whole candidate space, three runners-up.
    pub fn new(seq: u64, global_batch: u64) -> PlanOptions {
        PlanOptions {
            seq,
            global_batch,
            memory_ratio: DEFAULT_MEMORY_RATIO,
            engine: Engine::default(),
            precision: PrecisionOptions::default(),
            runtime: None,
            comm_overlap: CommOverlap::default(),
            calibration: None,
            moe_imbalance: 1.0,
            search: SearchOptions {
                runners_up: 3,
                ..SearchOptions::default()
            },
        }
    }
}

/// Where a model came from, recorded in a plan so that it can be loaded again and
/// the plan re-costed ([`Session::recost`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The model as the user named it: a zoo name, a file path, or the name of an
    /// in-memory graph.
    pub name: String,
    /// What `name` is.
    pub origin: ModelOrigin,
    /// The number of layers, when it overrides the zoo's or the file's.
    pub layers: Option<u32>,
    /// The attention form, when it overrides the zoo's or the file's.
    pub attention: Option<Attention>,
}

/// What a [`ModelSpec`] names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelOrigin {
    /// A built-in model (`apar models`).
    Zoo,
    /// A Hugging Face `config.json` or an IR file, by its absolute path.
    File(PathBuf),
    /// A graph handed to [`Session::for_graph`]; a plan of it can only be re-costed
    /// with the graph.
    Graph,
}

impl ModelSpec {
    /// A zoo name or a file path as typed by a user: a zoo name when the zoo has it,
    /// otherwise a path (made absolute when the file exists, so that a saved plan
    /// still finds it from another directory).
    pub fn parse(spec: &str) -> ModelSpec {
        let origin = if models::zoo::lookup(spec).is_ok() {
            ModelOrigin::Zoo
        } else {
            let path = Path::new(spec);
            ModelOrigin::File(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
        };
        ModelSpec {
            name: spec.to_string(),
            origin,
            layers: None,
            attention: None,
        }
    }

    /// Loads the model, building a configuration's whole forward graph (for `apar ir`
    /// and the like; planning uses [`ModelSpec::resolve`]).
    ///
    /// # Errors
    ///
    /// As [`ModelSpec::resolve`], and the builder's error.
    pub fn load(&self) -> Result<models::LoadedModel, PlanError> {
        Ok(models::load(&self.path()?, &self.overrides())?)
    }

    /// Resolves the model without building a configuration's graph.
    ///
    /// # Errors
    ///
    /// [`PlanError::Model`] for an unknown name, a missing or malformed file (the
    /// message names the file), or overrides an IR file cannot take;
    /// [`PlanError::GraphOnly`] for a spec of an in-memory graph.
    pub fn resolve(&self) -> Result<models::ModelDef, PlanError> {
        Ok(models::resolve(&self.path()?, &self.overrides())?)
    }

    fn overrides(&self) -> models::Overrides {
        models::Overrides {
            attention: self.attention,
            layers: self.layers,
        }
    }

    /// The name the model loader takes: the zoo name, or the file's path.
    fn path(&self) -> Result<String, PlanError> {
        match &self.origin {
            ModelOrigin::Zoo => Ok(self.name.clone()),
            ModelOrigin::File(path) => {
                let looks_like_file = self.name.contains(std::path::MAIN_SEPARATOR)
                    || self.name.contains('/')
                    || Path::new(&self.name).extension().is_some();
                if !path.exists() && !looks_like_file {
                    return Err(PlanError::Model(ModelError::Unknown(self.name.clone())));
                }
                if !path.exists() {
                    return Err(PlanError::Model(ModelError::File {
                        file: path.display().to_string(),
                        why: "no such file".into(),
                    }));
                }
                Ok(path.to_string_lossy().into_owned())
            }
            ModelOrigin::Graph => Err(PlanError::GraphOnly(self.name.clone())),
        }
    }
}

/// A plan: the job, the chosen configuration with its evaluation, and what each
/// device runs. `apar plan --json` and `apar eval --json` print this document; it
/// round-trips through JSON and the binary codec, and `apar eval --plan FILE`
/// re-costs it.
///
/// Times are seconds, memory is bytes per device, throughput is tokens per second
/// over the whole cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The model and how to load it again.
    pub model: ModelSpec,
    /// The model's configuration, when it came from the zoo or a `config.json` (what
    /// engine exports need: layers, hidden size, heads, vocabulary).
    pub model_config: Option<ModelConfig>,
    /// The cluster.
    pub cluster: Cluster,
    /// Sequence length, tokens.
    pub seq: u64,
    /// Sequences per step.
    pub global_batch: u64,
    /// Fraction of device memory used as the budget.
    pub memory_ratio: f64,
    /// The engine the plan is for (plans saved before engines existed read as
    /// Megatron-LM).
    #[serde(default)]
    pub engine: Engine,
    /// The precision the plan was made at.
    #[serde(default)]
    pub precision: PrecisionOptions,
    /// The runtime overhead the plan was made with.
    #[serde(default)]
    pub runtime: RuntimeOverhead,
    /// The communication overlap switches the plan was priced with (plans saved
    /// before them read as all on).
    #[serde(default)]
    pub comm_overlap: CommOverlap,
    /// The calibration the plan was priced with, when a user gave one (`None`: the
    /// built-in table of the cluster's device).
    #[serde(default)]
    pub calibration: Option<Calibration>,
    /// The expert load imbalance the plan was priced with (1: balanced; plans saved
    /// before it existed read as 1).
    #[serde(default = "balanced")]
    pub moe_imbalance: f64,
    /// The configuration.
    pub config: Config,
    /// Seconds per training step.
    pub step_time_s: f64,
    /// Tokens per second over the cluster.
    pub tokens_per_s: f64,
    /// Model TFLOP/s per device: PaLM's model FLOPs (`6·N + 12·L·H·Q·T` per token,
    /// recomputation and tensor-parallel replication not counted) per second.
    pub tflops_per_device: f64,
    /// Model FLOPs utilization: `tflops_per_device` over the device's bf16 peak.
    pub mfu: f64,
    /// Hardware FLOPs utilization: the FLOPs the devices execute (recomputation and
    /// replicated work included, causal attention at the half its kernels run) over
    /// the bf16 peak (0 in plans saved before it existed).
    #[serde(default)]
    pub hfu: f64,
    /// Budget, peak and per-stage breakdown.
    pub memory: MemoryJson,
    /// Virtual pipeline stages in model order with their blocks and times.
    pub stages: Vec<StageJson>,
    /// Where the slowest device's step time goes.
    pub breakdown: TimeBreakdown,
    /// The search that chose it (`None` for an evaluation of a given configuration).
    pub search: Option<SearchStats>,
    /// The next fastest fitting configurations (a search keeps the true ones: the
    /// step-time shortcut never prunes a candidate that could be among them).
    pub runners_up: Vec<EvalJson>,
    /// What apar assumed or could not do for this plan.
    pub warnings: Vec<Warning>,
    /// Ranks and their (tensor, data, pipeline) coordinates.
    pub mesh: Mesh,
    /// Every parameter and every tensor that crosses a block boundary: global and
    /// per-device shapes, and how it is split.
    pub tensors: Vec<TensorPlacement>,
    /// Per distinct block, the ops one device runs in order (forward, backward with
    /// recomputation, optimizer), collectives marked with their group.
    pub programs: Vec<BlockProgram>,
    /// The simulated step: every forward/backward unit per pipeline device in order,
    /// sends, gradient reduction, optimizer and parameter gathers, and the memory
    /// timeline of each pipeline device.
    pub trace: StepTrace,
}

impl Plan {
    /// The same plan without wall-clock timings (`search.compile_ms`, `cost_ms`), so
    /// that a snapshot of it is stable across runs and machines.
    pub fn without_timings(mut self) -> Plan {
        if let Some(s) = &mut self.search {
            s.compile_ms = 0.0;
            s.cost_ms = 0.0;
        }
        self
    }

    /// The pipeline device that runs block `block` (0 = embedding), if any.
    pub fn stage_of_block(&self, block: usize) -> Option<u32> {
        self.stages
            .iter()
            .find(|s| s.blocks[0] <= block && block <= s.blocks[1])
            .map(|s| s.device_stage)
    }

    /// The human-readable evaluation (configuration, step time, memory by stage).
    pub fn text(&self) -> String {
        crate::report::summary_text(&self.summary(), &self.stages)
    }

    /// The evaluation part of the plan, as runners-up are reported.
    pub fn summary(&self) -> EvalJson {
        EvalJson {
            config: self.config,
            step_time_s: self.step_time_s,
            tokens_per_s: self.tokens_per_s,
            tflops_per_device: self.tflops_per_device,
            mfu: self.mfu,
            hfu: self.hfu,
            memory: self.memory.clone(),
            stages: self.stages.clone(),
            breakdown: self.breakdown,
        }
    }

    /// A Chrome/Perfetto trace of the simulated step.
    pub fn chrome_trace(&self) -> serde_json::Value {
        crate::report::trace::chrome_trace(&self.trace, self.config.pp)
    }

    /// An SVG plot of each pipeline device's memory over the step.
    pub fn memory_svg(&self) -> String {
        crate::report::trace::memory_svg(&self.trace, &self.memory, self.step_time_s)
    }

    /// The configuration file or arguments of `engine` for this plan, with the
    /// environment it needs and notes for the user ([`crate::engine::export`]).
    ///
    /// # Errors
    ///
    /// [`crate::engine::export::ExportError`] when the engine cannot run the plan as
    /// decided (naming the option it lacks) or cannot build the model.
    pub fn export(
        &self,
        engine: crate::engine::Engine,
    ) -> Result<crate::engine::export::Export, crate::engine::export::ExportError> {
        let blocks: Vec<[usize; 2]> = self.stages.iter().map(|s| s.blocks).collect();
        let plan = crate::engine::export::ExportPlan::new(
            self.config,
            self.model_config.clone(),
            self.seq,
            self.global_batch,
            &blocks,
        )
        .with_precision(self.precision)
        .with_comm_overlap(self.comm_overlap);
        crate::engine::export::export(engine, &plan)
    }

    /// The search log in the reference platform's words, then the plan, its runners-up
    /// and the warnings.
    pub fn log(&self) -> String {
        crate::report::plan_log(
            &self.summary(),
            self.engine,
            self.search.as_ref(),
            &self.runners_up,
        )
    }
}

/// Why a plan's candidate space is empty.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum EmptySpace {
    /// This pin or bound alone leaves no configuration.
    #[error("no configuration has --{pin} {value} (tp divides the {devices_per_node} devices of a node, dp × tp × pp = {devices}, pp at most the model's {blocks} blocks, dp divides the global batch {global_batch}{})", if *.experts == 0 { ", ep = etp = 1 for a dense model".to_string() } else { format!(", ep a power of two (or the pinned degree) dividing the {experts} experts, ep × etp dividing tp × cp × dp, etp 1 or tp") })]
    Pin {
        /// The option.
        pin: &'static str,
        /// Its value.
        value: String,
        /// Devices in the cluster.
        devices: u64,
        /// Devices per node.
        devices_per_node: u32,
        /// Blocks the pipeline can cut between.
        blocks: usize,
        /// Sequences per step.
        global_batch: u64,
        /// Routed experts per MoE layer (0: a dense model).
        experts: u64,
    },
    /// Each pin allows configurations, but not together.
    #[error("the pins and bounds {} allow no configuration together (each alone does)", .pins.iter().map(|p| format!("--{p}")).collect::<Vec<_>>().join(", "))]
    Pins {
        /// The options set.
        pins: Vec<&'static str>,
    },
    /// Configurations exist, but the engine runs none of them (with these pins, or
    /// for this job when `pins` is empty).
    #[error("{engine} runs no configuration {}: {reason}", if .pins.is_empty() { "of this job".to_string() } else { format!("with {}", .pins.iter().map(|(p, v)| format!("--{p} {v}")).collect::<Vec<_>>().join(" ")) })]
    Engine {
        /// The engine.
        engine: Engine,
        /// The pins and bounds (option, value) that, with the engine's rules, empty
        /// the space; empty when the job alone does.
        pins: Vec<(&'static str, String)>,
        /// The rule the refused configurations break most often (first in
        /// enumeration order on ties).
        reason: Unsupported,
    },
    /// Without any pin there is no configuration.
    #[error("no dp × tp × pp layout of {devices} devices ({devices_per_node} per node, at most {blocks} pipeline stages) has a data-parallel degree that divides the global batch {global_batch}")]
    NoLayout {
        /// Devices in the cluster.
        devices: u64,
        /// Devices per node.
        devices_per_node: u32,
        /// Blocks the pipeline can cut between.
        blocks: usize,
        /// Sequences per step.
        global_batch: u64,
    },
}

/// Why no plan was returned.
#[derive(Debug, Error)]
pub enum PlanError {
    /// The model could not be loaded or is invalid.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The `hf` engine runs a model's Hugging Face modeling code, and this model's
    /// layout does not say which (LayerNorm with rotary positions: GPT-NeoX or Falcon).
    #[error("the hf engine runs Hugging Face model code, and `{0}` does not say which architecture: plan its config.json (with its model_type), or plan it for another engine")]
    NoHfArchitecture(String),
    /// The `hf` engine runs a model's Hugging Face modeling code, and apar does not
    /// model this `model_type`'s code.
    #[error("the hf engine runs Hugging Face's `{model_type}` model code, which apar does not model (it models {modelled}): plan it for another engine")]
    HfCodeNotModelled {
        /// The file's `model_type`.
        model_type: String,
        /// The `model_type`s whose code apar models.
        modelled: String,
    },
    /// A runtime-overhead value outside its range.
    #[error("runtime overhead: {field} = {value} is outside its range (allocator_fragmentation 0 to 0.9; byte counts at most 10^6 GiB, 1073741824000000)")]
    InvalidRuntime {
        /// The field.
        field: &'static str,
        /// Its value.
        value: f64,
    },
    /// An expert load imbalance outside `[1, 1000]` (or not a number).
    #[error("expert load imbalance {0} must be between 1 (balanced) and 1000")]
    MoeImbalance(f64),
    /// An expert load imbalance other than 1 for a model without experts.
    #[error("expert load imbalance {0} given for a model without mixture-of-experts layers")]
    MoeImbalanceDense(f64),
    /// A calibration (from `--calibration` or stored in a saved plan) with an unusable
    /// value.
    #[error(transparent)]
    Calibration(#[from] crate::cost::CalibrationError),
    /// A saved plan's `model_config` differs from the model its `model` entry loads.
    #[error("the plan's model_config differs from the model its `model` entry loads: apar rebuilds the model from `model` (a zoo name or file, with `layers` and `attention` overrides); edit that, or the config file it names, instead")]
    EditedModelConfig,
    /// The cluster could not be resolved or is invalid.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// The job or a given configuration is invalid.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// The IR file is a training graph; planning derives the training step itself.
    #[error("`{0}` already has backward ops; planning needs a forward graph")]
    TrainingGraph(String),
    /// No configuration is left to try.
    #[error(transparent)]
    EmptySpace(#[from] EmptySpace),
    /// Nothing fits; the report of the closest candidate, with checked suggestions.
    #[error("out of memory: {} bytes requested, {} available", .0.requested_bytes, .0.available_bytes)]
    OutOfMemory(Box<OomReport>),
    /// No candidate compiled: the most common reason, and how many it rejected.
    #[error("no candidate could be compiled: {reason} ({count} of {candidates} candidates rejected for this reason)")]
    NothingCompiled {
        /// The reason of the most candidates (first in enumeration order on ties).
        reason: CompileError,
        /// Candidates rejected for it.
        count: usize,
        /// Candidates enumerated.
        candidates: usize,
    },
    /// The global batch does not split into the given data-parallel degree and
    /// micro-batch size.
    #[error("global batch {global_batch} is not divisible by dp {dp} × micro-batch {micro_batch}")]
    BatchNotDivisible {
        /// Sequences per step.
        global_batch: u64,
        /// Data-parallel degree.
        dp: u32,
        /// Sequences per micro-batch.
        micro_batch: u32,
    },
    /// The plan names an in-memory graph, which cannot be loaded again.
    #[error("the plan was made from the in-memory graph `{0}`; re-cost it with `Session::for_graph` and `Session::evaluate`")]
    GraphOnly(String),
    /// A saved plan could not be read.
    #[error("{path}: {source}")]
    ReadPlan {
        /// The file.
        path: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// A saved plan is not a plan.
    #[error("{path}: not a saved plan: {source}")]
    ParsePlan {
        /// The file.
        path: String,
        /// What is wrong.
        #[source]
        source: serde_json::Error,
    },
}

/// A model on a cluster for one job (sequence length, global batch, memory ratio):
/// plans it, evaluates configurations of it, and turns results into [`Plan`]s.
pub struct Session {
    compiler: Compiler,
    model: ModelSpec,
    config: Option<ModelConfig>,
    search: SearchOptions,
    warnings: Vec<Warning>,
}

impl Session {
    /// A session for a forward graph (compiled whole).
    ///
    /// # Errors
    ///
    /// [`PlanError::Compile`] for an invalid job or a graph that fails verification,
    /// [`PlanError::TrainingGraph`] for a graph with backward ops.
    pub fn for_graph(
        graph: &Graph,
        cluster: &Cluster,
        options: &PlanOptions,
    ) -> Result<Session, PlanError> {
        let spec = ModelSpec {
            name: graph.name().to_string(),
            origin: ModelOrigin::Graph,
            layers: None,
            attention: None,
        };
        let def = models::ModelDef::Graph {
            is_training: graph.ops().any(|o| graph.node(o).phase != Phase::Fwd),
            graph: graph.clone(),
        };
        Session::new(spec, def, cluster, options)
    }

    /// A session for a model configuration, compiled from its two-layer template
    /// (much faster than the built graph for deep models, and the same plan).
    ///
    /// # Errors
    ///
    /// [`PlanError::Model`] for an invalid configuration, [`PlanError::Compile`] for
    /// an invalid job.
    pub fn for_config(
        model: &ModelConfig,
        cluster: &Cluster,
        options: &PlanOptions,
    ) -> Result<Session, PlanError> {
        let spec = ModelSpec {
            origin: if models::zoo::lookup(&model.name).is_ok_and(|z| &z == model) {
                ModelOrigin::Zoo
            } else {
                ModelOrigin::Graph
            },
            name: model.name.clone(),
            layers: None,
            attention: None,
        };
        model.validate()?;
        let def = models::ModelDef::Config {
            config: model.clone(),
            notes: models::hf::ConfigNotes::default(),
        };
        Session::new(spec, def, cluster, options)
    }

    /// A session for a model named by a zoo name or a file ([`ModelSpec`]).
    ///
    /// # Errors
    ///
    /// As [`ModelSpec::load`], and as [`Session::for_graph`].
    pub fn for_spec(
        spec: &ModelSpec,
        cluster: &Cluster,
        options: &PlanOptions,
    ) -> Result<Session, PlanError> {
        let def = spec.resolve()?;
        Session::new(spec.clone(), def, cluster, options)
    }

    fn new(
        model: ModelSpec,
        def: models::ModelDef,
        cluster: &Cluster,
        options: &PlanOptions,
    ) -> Result<Session, PlanError> {
        let (source, config, notes) = match def {
            models::ModelDef::Graph { is_training, .. } if is_training => {
                return Err(PlanError::TrainingGraph(model.name));
            }
            models::ModelDef::Graph { graph, .. } => {
                crate::ir::verify(&graph).map_err(CompileError::Verify)?;
                (ModelSource::Graph(graph), None, Default::default())
            }
            models::ModelDef::Config { config, notes } => {
                (ModelSource::Config(config.clone()), Some(config), notes)
            }
        };
        let compiler = Compiler::new(
            source,
            cluster.clone(),
            options.seq,
            options.global_batch,
            options.memory_ratio,
        )?
        .with_engine(options.engine)
        .with_model_code(model_code(options.engine, config.as_ref(), &notes)?)?
        .with_precision(options.precision)?
        .with_comm_overlap(options.comm_overlap)?
        .with_runtime(checked_runtime(
            options.runtime.unwrap_or(options.engine.runtime()),
        )?)
        .with_moe_imbalance(options.moe_imbalance);
        if !(options.moe_imbalance.is_finite() && (1.0..=1e3).contains(&options.moe_imbalance)) {
            return Err(PlanError::MoeImbalance(options.moe_imbalance));
        }
        if options.moe_imbalance != 1.0 && compiler.block_layout().experts == 0 {
            return Err(PlanError::MoeImbalanceDense(options.moe_imbalance));
        }
        let compiler = match &options.calibration {
            Some(c) => {
                c.validate()?;
                compiler.with_calibration(c.clone())?
            }
            None => compiler,
        };
        let warnings = diagnostics::of_model(&compiler, config.as_ref(), &notes);
        Ok(Session {
            compiler,
            model,
            config,
            search: options.search.clone(),
            warnings,
        })
    }

    /// The compiler (caches shared by every call of this session).
    pub fn compiler(&self) -> &Compiler {
        &self.compiler
    }

    /// The session's compiler, the session consumed.
    pub fn into_compiler(self) -> Compiler {
        self.compiler
    }

    /// The model's configuration, when it came from the zoo or a `config.json`.
    pub fn model_config(&self) -> Option<&ModelConfig> {
        self.config.as_ref()
    }

    /// Warnings about the model and the job (more come with each plan).
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// Plans: the fastest configuration that fits.
    ///
    /// # Errors
    ///
    /// [`PlanError::EmptySpace`] when no configuration is left to try (naming the pin
    /// that empties the space), [`PlanError::OutOfMemory`] when nothing fits (with
    /// the closest candidate and suggestions, each checked to fit),
    /// [`PlanError::NothingCompiled`] when every candidate was rejected.
    pub fn plan(&self) -> Result<Plan, PlanError> {
        self.plan_with_progress(&|_, _| {})
    }

    /// [`Session::plan`], calling `progress(done, total)` from worker threads as
    /// candidates are screened and simulated (for progress bars; results do not
    /// depend on it).
    ///
    /// # Errors
    ///
    /// As [`Session::plan`].
    pub fn plan_with_progress(
        &self,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Plan, PlanError> {
        let r = self.search(progress);
        self.conclude(&r)
    }

    /// Runs the search alone: every candidate's outcome, the best, the runners-up and
    /// the closest out-of-memory candidate. [`Session::conclude`] turns it into a plan.
    pub fn search(&self, progress: &(dyn Fn(usize, usize) + Sync)) -> SearchResult {
        search::plan_with_progress(&self.compiler, &self.search, progress)
    }

    /// The plan (or the reason there is none) of a finished search.
    ///
    /// # Errors
    ///
    /// As [`Session::plan`].
    pub fn conclude(&self, r: &SearchResult) -> Result<Plan, PlanError> {
        if r.stats.candidates == 0 {
            return Err(self.empty_space().into());
        }
        match (&r.best, &r.closest) {
            (Some(best), _) => {
                let runners = r.runners_up.iter().map(EvalJson::new).collect();
                self.plan_of(best, Some(r.stats), runners)
            }
            (None, Some(closest)) => {
                let suggestions =
                    search::plan_suggestions(&self.compiler, &self.search, Some(&closest.config));
                Err(PlanError::OutOfMemory(Box::new(OomReport::new(
                    closest,
                    self.compiler.engine,
                    suggestions,
                ))))
            }
            (None, None) => {
                // The most common rejection by message (first in enumeration order on
                // ties).
                let mut counts: Vec<(&CompileError, String, usize)> = Vec::new();
                for o in &r.outcomes {
                    if let search::Outcome::Rejected { reason } = &o.outcome {
                        let message = reason.to_string();
                        match counts.iter_mut().find(|(_, m, _)| *m == message) {
                            Some(entry) => entry.2 += 1,
                            None => counts.push((reason, message, 1)),
                        }
                    }
                }
                let most =
                    counts.iter().fold(
                        None::<(CompileError, usize)>,
                        |best, (e, _, n)| match best {
                            Some((_, m)) if m >= *n => best,
                            _ => Some(((*e).clone(), *n)),
                        },
                    );
                // Without a rejection, every candidate was skipped by the memory bound
                // and the closest of them failed to compile: its own error is the reason.
                let (reason, count) = match most {
                    Some(found) => found,
                    None => {
                        let first = r.outcomes.first().map(|o| o.config);
                        match first.map(|c| self.compiler.evaluate(&c)) {
                            Some(Err(e)) => (e, 1),
                            _ => return Err(self.empty_space().into()),
                        }
                    }
                };
                Err(PlanError::NothingCompiled {
                    reason,
                    count,
                    candidates: r.stats.candidates,
                })
            }
        }
    }

    /// Why the candidate space is empty: the single pin or bound that empties it, the
    /// pins together, the engine's rules (alone or with pins), or the job itself.
    fn empty_space(&self) -> EmptySpace {
        let c = &self.compiler;
        let k = &self.search.constraints;
        let layout = c.block_layout();
        let all = |k: &Constraints| {
            crate::passes::candidates::with_experts(
                enumerate(
                    c.cluster.devices(),
                    c.cluster.devices_per_node,
                    c.global_batch,
                    c.seq,
                    c.block_count(),
                    k,
                ),
                layout.experts,
                k,
            )
        };
        // The engine's most common rule against what `k` allows (counting, per rule,
        // every configuration that breaks it, whatever its degrees), with its first
        // instance, if `k` allows something and the engine runs none of it.
        let refusal = |k: &Constraints| -> Option<Unsupported> {
            let mut counts: Vec<(Unsupported, usize)> = Vec::new();
            for x in all(k) {
                let reasons = c.engine.refusals(&x, layout);
                if reasons.is_empty() {
                    return None;
                }
                for e in reasons {
                    let rule = std::mem::discriminant(&e);
                    match counts
                        .iter_mut()
                        .find(|(r, _)| std::mem::discriminant(r) == rule)
                    {
                        Some(entry) => entry.1 += 1,
                        None => counts.push((e, 1)),
                    }
                }
            }
            counts
                .into_iter()
                .fold(None::<(Unsupported, usize)>, |best, (e, n)| match best {
                    Some((_, m)) if m >= n => best,
                    _ => Some((e, n)),
                })
                .map(|(e, _)| e)
        };
        let free = Constraints::default();
        if all(&free).is_empty() {
            return EmptySpace::NoLayout {
                devices: c.cluster.devices(),
                devices_per_node: c.cluster.devices_per_node,
                blocks: c.block_count(),
                global_batch: c.global_batch,
            };
        }
        if let Some(reason) = refusal(&free) {
            return EmptySpace::Engine {
                engine: c.engine,
                pins: Vec::new(),
                reason,
            };
        }
        let pins = k.pins();
        for (pin, value, only) in &pins {
            if all(only).is_empty() {
                return EmptySpace::Pin {
                    pin,
                    value: value.clone(),
                    devices: c.cluster.devices(),
                    devices_per_node: c.cluster.devices_per_node,
                    blocks: c.block_count(),
                    global_batch: c.global_batch,
                    experts: c.block_layout().experts,
                };
            }
        }
        for (pin, value, only) in &pins {
            if let Some(reason) = refusal(only) {
                return EmptySpace::Engine {
                    engine: c.engine,
                    pins: vec![(pin, value.clone())],
                    reason,
                };
            }
        }
        if let Some(reason) = refusal(k) {
            return EmptySpace::Engine {
                engine: c.engine,
                pins: pins.iter().map(|(p, v, _)| (*p, v.clone())).collect(),
                reason,
            };
        }
        EmptySpace::Pins {
            pins: pins.iter().map(|p| p.0).collect(),
        }
    }

    /// The expert-tensor-parallel degree a configuration at tensor-parallel degree `tp`
    /// gets when none is given: Megatron-LM's default, `tp`, for a model with routed
    /// experts (`--expert-tensor-parallel-size`, `arguments.py`); 1 otherwise.
    pub fn default_etp(&self, tp: u32) -> u32 {
        if self.compiler.block_layout().experts > 0 {
            tp
        } else {
            1
        }
    }

    /// Completes a configuration given without its micro-batch count: `m = B / (dp ·
    /// b)` for the session's global batch `B`.
    ///
    /// # Errors
    ///
    /// [`PlanError::BatchNotDivisible`] when `dp · b` does not divide `B`;
    /// [`PlanError::Compile`] when `m` does not fit a `u32`.
    pub fn with_micro_batches(&self, c: Config) -> Result<Config, PlanError> {
        let per_step = u64::from(c.dp) * u64::from(c.micro_batch);
        let global_batch = self.compiler.global_batch;
        if per_step == 0 || global_batch % per_step != 0 {
            return Err(PlanError::BatchNotDivisible {
                global_batch,
                dp: c.dp,
                micro_batch: c.micro_batch,
            });
        }
        let num_micro_batches = u32::try_from(global_batch / per_step).map_err(|_| {
            CompileError::TooManyMicroBatches {
                units: global_batch / per_step,
                max: u64::from(u32::MAX),
            }
        })?;
        Ok(Config {
            num_micro_batches,
            ..c
        })
    }

    /// Compiles and simulates one configuration.
    ///
    /// # Errors
    ///
    /// [`PlanError::Compile`] for a configuration that does not fit the cluster,
    /// batch or model; [`PlanError::OutOfMemory`] when it does not fit in memory (with
    /// single changes that fit).
    pub fn evaluate(&self, c: &Config) -> Result<Plan, PlanError> {
        let e = self.compiler.evaluate(c)?;
        if !e.fits {
            let suggestions = search::suggestions(&self.compiler, &e.config);
            return Err(PlanError::OutOfMemory(Box::new(OomReport::new(
                &e,
                self.compiler.engine,
                suggestions,
            ))));
        }
        self.plan_of(&e, None, Vec::new())
    }

    /// The evaluation of `c` whether or not it fits (for traces of an out-of-memory
    /// configuration).
    ///
    /// # Errors
    ///
    /// [`PlanError::Compile`] for an invalid configuration.
    pub fn simulate(&self, c: &Config) -> Result<Evaluation, PlanError> {
        Ok(self.compiler.evaluate(c)?)
    }

    /// Re-costs a saved plan: loads its model, rebuilds the session and evaluates its
    /// configuration (the plan's own numbers are not trusted).
    ///
    /// # Errors
    ///
    /// As [`Session::for_spec`] and [`Session::evaluate`].
    pub fn recost(plan: &Plan) -> Result<Plan, PlanError> {
        let mut options = PlanOptions::new(plan.seq, plan.global_batch);
        options.memory_ratio = plan.memory_ratio;
        options.engine = plan.engine;
        options.precision = plan.precision;
        options.runtime = Some(plan.runtime);
        options.comm_overlap = plan.comm_overlap;
        options.calibration = plan.calibration.clone();
        options.moe_imbalance = plan.moe_imbalance;
        let session = Session::for_spec(&plan.model, &plan.cluster, &options)?;
        // The model is rebuilt from `model`; `model_config` is what that gave when the
        // plan was saved. An edit there would be ignored, so it is refused instead.
        if let (Some(saved), Some(rebuilt)) = (&plan.model_config, session.model_config()) {
            if saved != rebuilt {
                return Err(PlanError::EditedModelConfig);
            }
        }
        session.evaluate(&plan.config)
    }

    /// Reads a plan saved as JSON (`--save`).
    ///
    /// # Errors
    ///
    /// [`PlanError::ReadPlan`] / [`PlanError::ParsePlan`], naming the file.
    pub fn read_plan(path: &Path) -> Result<Plan, PlanError> {
        let text = crate::input::read_text(path).map_err(|source| PlanError::ReadPlan {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| PlanError::ParsePlan {
            path: path.display().to_string(),
            source,
        })
    }

    fn plan_of(
        &self,
        e: &Evaluation,
        search: Option<SearchStats>,
        runners_up: Vec<EvalJson>,
    ) -> Result<Plan, PlanError> {
        let program = self.compiler.device_program(&e.config)?;
        let summary = EvalJson::new(e);
        let detail = detail::Detail::new(&self.compiler, e, &program, self.config.as_ref());
        let mut warnings = self.warnings.clone();
        warnings.extend(diagnostics::of_plan(
            &self.compiler,
            e,
            &program,
            self.config.as_ref(),
        ));
        Ok(Plan {
            model: self.model.clone(),
            model_config: self.config.clone(),
            cluster: self.compiler.cluster.clone(),
            seq: self.compiler.seq,
            global_batch: self.compiler.global_batch,
            memory_ratio: self.compiler.memory_ratio,
            engine: self.compiler.engine,
            precision: self.compiler.precision,
            runtime: self.compiler.runtime,
            comm_overlap: self.compiler.priced_comm_overlap(),
            calibration: self.compiler.calibration.clone(),
            moe_imbalance: self.compiler.moe_imbalance,
            config: e.config,
            step_time_s: summary.step_time_s,
            tokens_per_s: summary.tokens_per_s,
            tflops_per_device: summary.tflops_per_device,
            mfu: summary.mfu,
            hfu: summary.hfu,
            memory: summary.memory,
            stages: summary.stages,
            breakdown: summary.breakdown,
            search,
            runners_up,
            warnings,
            mesh: detail.mesh,
            tensors: detail.tensors,
            programs: detail.programs,
            trace: e.sim.trace(),
        })
    }
}

/// `runtime` when its allocator fragmentation is a share in `[0, 0.9]` (the range
/// [`crate::engine::memory::RuntimeOverhead::bytes`] computes with; a saved or
/// hand-written plan may hold anything).
fn checked_runtime(
    runtime: crate::engine::memory::RuntimeOverhead,
) -> Result<crate::engine::memory::RuntimeOverhead, PlanError> {
    let f = runtime.allocator_fragmentation;
    if !(0.0..=0.9).contains(&f) {
        return Err(PlanError::InvalidRuntime {
            field: "allocator_fragmentation",
            value: f,
        });
    }
    let bytes = [
        ("context_bytes", Some(runtime.context_bytes)),
        (
            "nccl_bytes_per_communicator",
            Some(runtime.nccl_bytes_per_communicator),
        ),
        ("fixed_bytes", runtime.fixed_bytes),
    ];
    for (field, b) in bytes {
        if let Some(b) = b.filter(|&b| b > crate::engine::memory::MAX_RUNTIME_BYTES) {
            return Err(PlanError::InvalidRuntime {
                field,
                value: b as f64,
            });
        }
    }
    Ok(runtime)
}

/// Whose model code runs a configuration under `engine`: Hugging Face Transformers'
/// modules for the `hf` engine (the `config.json`'s `model_type`, else the layout's
/// architecture, [`models::HfArch::infer`]; attention `sdpa` for flash attention,
/// `eager` for eager), torchtitan's own code for the layouts it has one for
/// ([`torchtitan_code`]), the fused kernels otherwise. A graph is its own code.
fn model_code(
    engine: Engine,
    config: Option<&ModelConfig>,
    notes: &models::hf::ConfigNotes,
) -> Result<models::ModelCode, PlanError> {
    let cfg = match (engine, config) {
        (Engine::Hf, Some(cfg)) => cfg,
        (Engine::Torchtitan, Some(cfg)) => {
            let code = torchtitan_code(cfg);
            if code.is_some() && cfg.attention == Attention::Eager {
                // Its Llama calls `scaled_dot_product_attention` (or FlexAttention):
                // an eager attention is not something it can run.
                return Err(PlanError::Model(ModelError::Invalid {
                    model: cfg.name.clone(),
                    field: "attention",
                    why: "is eager, but torchtitan's Llama runs PyTorch's \
                          scaled_dot_product_attention (or FlexAttention), never the \
                          eager form: use flash attention for this engine"
                        .into(),
                }));
            }
            return Ok(code.unwrap_or(models::ModelCode::Fused));
        }
        _ => return Ok(models::ModelCode::Fused),
    };
    if cfg.attn_sinks {
        // `GptOssPreTrainedModel._supports_sdpa = False` (transformers 4.55): its
        // sinks run in eager attention or a kernels-hub flash kernel, neither of
        // which apar models as Hugging Face runs it.
        return Err(PlanError::Model(ModelError::Invalid {
            model: cfg.name.clone(),
            field: "attn_sinks",
            why: "run in Hugging Face's eager attention or a kernels-hub flash kernel \
                  (gpt-oss does not support sdpa), which the hf engine's model code does \
                  not model"
                .into(),
        }));
    }
    // A `config.json`'s `model_type` names the code Transformers runs: one apar does
    // not model is refused, not priced as the nearest layout's.
    let model_type = notes.model_type.as_deref();
    let arch = match model_type {
        Some(t) => models::HfArch::from_model_type(t),
        None => models::HfArch::infer(cfg),
    }
    .ok_or_else(|| match model_type {
        Some(t) => PlanError::HfCodeNotModelled {
            model_type: t.to_string(),
            modelled: models::HfArch::model_types().join(", "),
        },
        None => PlanError::NoHfArchitecture(cfg.name.clone()),
    })?;
    let attn = match cfg.attention {
        Attention::Flash => models::AttnImpl::Sdpa,
        Attention::Eager => models::AttnImpl::Eager,
    };
    Ok(models::ModelCode::Transformers { arch, attn })
}

/// Plans `graph` (a forward graph) on `cluster`: the fastest configuration that fits.
///
/// # Errors
///
/// As [`Session::for_graph`] and [`Session::plan`].
pub fn plan(graph: &Graph, cluster: &Cluster, options: &PlanOptions) -> Result<Plan, PlanError> {
    Session::for_graph(graph, cluster, options)?.plan()
}

/// Plans a model configuration; compiles a two-layer template for all layers, which
/// is much faster than [`plan`] on the built graph and gives the same result.
///
/// # Errors
///
/// As [`Session::for_config`] and [`Session::plan`].
pub fn plan_model(
    model: &ModelConfig,
    cluster: &Cluster,
    options: &PlanOptions,
) -> Result<Plan, PlanError> {
    Session::for_config(model, cluster, options)?.plan()
}

/// The model code torchtitan runs for a Llama-layout configuration: its own eager
/// Llama ([`models::ModelCode::Torchtitan`]) rather than Megatron-LM's fused kernels;
/// `None` for layouts torchtitan has no model code for.
fn torchtitan_code(cfg: &ModelConfig) -> Option<models::ModelCode> {
    (models::HfArch::infer(cfg) == Some(models::HfArch::Llama))
        .then_some(models::ModelCode::Torchtitan)
}
