//! Compiles one configuration end to end: per-device graph (tensor parallelism),
//! training graph, recomputation, distribution, block profiles, pipeline cut,
//! schedule simulation.
//!
//! Transformer layers repeat, so a zoo model is compiled from a two-layer template
//! (embedding, two layers, head): the first layer's profile stands for every layer but
//! the last, the second for the last; an IR file is compiled whole. Profiles are cached per (tp, sp, recompute, micro-batch,
//! ZeRO stage, low-precision sharding, dp); the cache is shared by concurrent callers.

use super::peak::{max_device_peak, ChunkSummary, InFlight};
use super::profile::{
    is_ring_attention, profile, BlockProfile, Blocks, Groups, ProfilePrep, TpOverlap,
};
use super::{simulate, SharedLinks, SimInput, Simulation, StageSpan};
use crate::cluster::{Cluster, ClusterError};
use crate::cost::{Calibration, CostModel, Group};
use crate::engine::memory::{PrecisionError, PrecisionOptions, RuntimeOverhead, States};
use crate::engine::overlap::{CommOverlap, CommOverlapError};
use crate::engine::rules::{BlockLayout, Unsupported};
use crate::engine::Engine;
use crate::ir::{Block, Env, Graph, Op, ShapeError, VerifyErrors};
use crate::models::{build_template, ModelCode, ModelConfig, ModelError, Position};
use crate::passes::expert::ExpertLayout;
use crate::passes::manager::{
    Autodiff, Distribute, ExpertParallel, Fp8Linears, MixedPrecision, PassError, PassManager,
    RecomputeLayers, TensorParallel,
};
use crate::passes::recompute::Recomputed;
use crate::passes::{pipeline, Config, Recomputation, Recompute, RecomputeModules, Schedule};
use crate::shard::ShardError;
use crate::train::TrainError;
use crate::train::TrainOptions;
use serde::Serialize;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// Default fraction of device memory a plan may use (the reference platform's headroom).
pub const DEFAULT_MEMORY_RATIO: f64 = 0.8;

/// Largest number of pipeline work units `pp · v · m` (virtual stages times
/// micro-batches) a configuration may have: 2^20. The event simulation keeps two end
/// times per unit (16 bytes) and, for traces, two events and four memory samples per
/// unit (about 130 bytes), so this bounds a simulation to 16 MiB of scratch and a
/// detailed one to about 150 MiB, whatever the global batch. Published runs are far
/// below it (Megatron-LM's 1T run: 64 stages × 8 chunks × 1,536 micro-batches / 64
/// data-parallel replicas ≈ 12,300 units per replica).
pub const MAX_PIPELINE_UNITS: u64 = 1 << 20;

/// Largest accepted number of tokens per step (global batch × sequence length): 2^40,
/// about 65,000× the largest published batch (Llama 3 405B: 16M tokens per step).
/// Keeps every per-step token and byte count far inside `u64`.
pub const MAX_TOKENS_PER_STEP: u64 = 1 << 40;

/// Stage summaries [`Compiler::cut`] keeps per call for stages inside one run of equal
/// blocks (a pipeline's middle stages take two or three lengths; the bound keeps the
/// lookup short for a graph of many one-block runs).
const INNER_SUMMARIES: usize = 16;

/// Which of the interleaved schedule's conditions `pp` and `m` micro-batches break.
fn interleaved_violation(pp: u32, m: u32) -> String {
    if pp < 2 {
        format!("pp is {pp}")
    } else {
        format!("{m} micro-batches are not a multiple of pp {pp}")
    }
}

/// Why a configuration cannot be compiled (bad input, not out-of-memory).
///
/// Every variant is typed so that an embedder can match on it; `Display` gives the
/// message the CLI prints.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum CompileError {
    /// A calibration that [`Calibration::validate`] refuses (the message names the
    /// field).
    #[error("{0}")]
    Calibration(String),
    /// The memory ratio is outside `(0, 1]`.
    #[error("memory ratio {ratio} must be in (0, 1]")]
    MemoryRatio {
        /// The ratio given.
        ratio: f64,
    },
    /// The sequence length or the global batch is zero.
    #[error("sequence length ({seq}) and global batch ({global_batch}) must be positive")]
    EmptyJob {
        /// Sequence length.
        seq: u64,
        /// Global batch.
        global_batch: u64,
    },
    /// Global batch × sequence length exceeds [`MAX_TOKENS_PER_STEP`].
    #[error("global batch {global_batch} × sequence length {seq} exceeds the limit of {max} tokens per step")]
    TooManyTokens {
        /// Global batch.
        global_batch: u64,
        /// Sequence length.
        seq: u64,
        /// [`MAX_TOKENS_PER_STEP`].
        max: u64,
    },
    /// The cluster description is invalid.
    #[error("{0}")]
    Cluster(#[source] Shared<ClusterError>),
    /// The engine has no data-parallel overlap switch like the one asked for.
    #[error("{0}")]
    CommOverlap(#[source] CommOverlapError),
    /// The model configuration is invalid or cannot be built.
    #[error("{0}")]
    Model(#[source] Shared<ModelError>),
    /// The sequence is longer than the model's learned position table.
    #[error("sequence length {seq} exceeds the {max_positions} positions of model `{model}`'s learned position table")]
    SequenceTooLong {
        /// Model name.
        model: String,
        /// Sequence length asked for.
        seq: u64,
        /// Rows of the position table.
        max_positions: u64,
    },
    /// A degree, the micro-batch size or the micro-batch count is zero.
    #[error("degrees, micro-batch size and count must be positive")]
    ZeroDegree,
    /// `dp · cp · tp · pp` is not the cluster's device count.
    #[error("dp {dp} × {}tp {tp} × pp {pp} = {} devices, but the cluster has {devices}", if *.cp > 1 { format!("cp {} × ", .cp) } else { String::new() }, u64::from(*.dp) * u64::from(*.cp) * u64::from(*.tp) * u64::from(*.pp))]
    DeviceCountMismatch {
        /// Data-parallel degree.
        dp: u32,
        /// Context-parallel degree.
        cp: u32,
        /// Tensor-parallel degree.
        tp: u32,
        /// Pipeline stages.
        pp: u32,
        /// Devices of the cluster.
        devices: u64,
    },
    /// The tensor-parallel group would span nodes.
    #[error("tp {tp} must divide the {devices_per_node} devices of a node")]
    TpNotDividingNode {
        /// Tensor-parallel degree.
        tp: u32,
        /// Devices per node.
        devices_per_node: u32,
    },
    /// `dp · m · b` is not the global batch.
    #[error("global batch {global_batch} is not dp {dp} × micro-batches {num_micro_batches} × micro-batch size {micro_batch} = {product}")]
    BatchNotDivisible {
        /// The global batch of the job.
        global_batch: u64,
        /// Data-parallel degree.
        dp: u32,
        /// Micro-batches per step.
        num_micro_batches: u32,
        /// Micro-batch size.
        micro_batch: u32,
        /// Their product.
        product: u64,
    },
    /// The tensor-parallel degree does not divide a dimension the sharding splits
    /// (Megatron-LM requires `heads % tp == 0` and `kv_heads % tp == 0`).
    #[error("tp {tp} does not divide the {count} {what} of model `{model}`")]
    TpNotDividingHeads {
        /// Model name.
        model: String,
        /// Tensor-parallel degree.
        tp: u32,
        /// What is split (`attention heads`, `key/value heads`, `ffn channels`).
        what: &'static str,
        /// Its size.
        count: u64,
    },
    /// The ZeRO stage does not exist.
    #[error("ZeRO stage {0} does not exist (0–3)")]
    NoSuchZeroStage(u8),
    /// Expert degrees for a model without mixture-of-experts layers.
    #[error("ep {ep} / etp {etp}: the model has no mixture-of-experts layers")]
    ExpertsWithoutMoe {
        /// Expert-parallel degree.
        ep: u32,
        /// Expert-tensor-parallel degree.
        etp: u32,
    },
    /// The routed experts do not split over the expert-parallel ranks.
    #[error("expert parallelism ep {ep} needs the experts per layer ({experts}) divisible by ep")]
    ExpertsNotDividing {
        /// Routed experts per layer.
        experts: u64,
        /// Expert-parallel degree.
        ep: u32,
    },
    /// `ep · etp` does not divide the ranks of one pipeline stage.
    #[error("ep {ep} × etp {etp} must divide tp × cp × dp = {ranks} (experts fold over the same ranks as attention; `--etp` defaults to tp, Megatron-LM's default)")]
    ExpertGroupNotDividing {
        /// Expert-parallel degree.
        ep: u32,
        /// Expert-tensor-parallel degree.
        etp: u32,
        /// `tp · cp · dp`.
        ranks: u64,
    },
    /// An expert-tensor degree other than 1 or the tensor-parallel degree.
    #[error("expert tensor parallelism etp {etp} must be 1 or tp ({tp})")]
    ExpertTensorDegree {
        /// Expert-tensor-parallel degree.
        etp: u32,
        /// Tensor-parallel degree.
        tp: u32,
    },
    /// Sequence parallelism was asked for without tensor parallelism.
    #[error("sequence parallelism needs tp > 1")]
    SequenceParallelNeedsTp,
    /// The sequence does not split into the `2·cp` equal chunks of load-balanced
    /// context parallelism.
    #[error("context parallelism cp {cp} needs the sequence length ({seq}) divisible by 2·cp = {}", 2 * u64::from(*.cp))]
    CpNotDividingSeq {
        /// Context-parallel degree.
        cp: u32,
        /// Sequence length.
        seq: u64,
    },
    /// Context parallelism over a model whose attention materializes the `s×s` scores:
    /// ring attention passes K/V blocks through a fused (flash) attention kernel, as
    /// Megatron-LM (Transformer Engine's `AttnFuncWithCPAndKVP2P`) and torchtitan
    /// (SDPA's flash and memory-efficient backends) run it.
    #[error("context parallelism (cp {cp}) needs fused attention (--attention flash); the model's attention is decomposed")]
    CpNeedsFusedAttention {
        /// Context-parallel degree.
        cp: u32,
    },
    /// More pipeline stages than blocks.
    #[error("{stages} pipeline stages but the model has only {blocks} blocks")]
    TooManyStages {
        /// Virtual stages `pp · v`.
        stages: u64,
        /// Blocks of the model.
        blocks: usize,
    },
    /// The interleaved schedule's requirements are not met.
    #[error("the interleaved schedule needs pp ≥ 2 and micro-batches divisible by pp: {}", interleaved_violation(*.pp, *.num_micro_batches))]
    InterleavedNeeds {
        /// Pipeline stages.
        pp: u32,
        /// Micro-batches per step.
        num_micro_batches: u32,
    },
    /// `pp · v · m` exceeds [`MAX_PIPELINE_UNITS`].
    #[error("{units} pipeline work units (pp × chunks × micro-batches) exceed the simulation limit of {max}; use a larger micro-batch or fewer micro-batches")]
    TooManyMicroBatches {
        /// `pp · v · m`.
        units: u64,
        /// [`MAX_PIPELINE_UNITS`].
        max: u64,
    },
    /// `--recompute-layers` is zero.
    #[error("recompute-layers must be at least 1")]
    RecomputeLayersZero,
    /// `--recompute-layers` without a recomputation policy.
    #[error("recompute-layers {0} needs a recomputation policy (selective or full), not none")]
    RecomputeLayersWithoutPolicy(u32),
    /// `--recompute-layers` above the layers of every pipeline stage.
    #[error("recompute-layers {k} exceeds the {layers} layers of the largest pipeline stage (virtual stage {stage})")]
    RecomputeLayersTooMany {
        /// Layers to recompute per stage.
        k: u32,
        /// Layers of the largest stage.
        layers: u32,
        /// That (virtual) stage.
        stage: usize,
    },
    /// Selective recomputation on a model with no `s×s` attention tensors.
    #[error("selective recomputation recomputes nothing in this model: it recomputes the s×s attention tensors (Megatron-LM's default module, core_attn), and with flash attention there are none, so it is the same program as --recompute none; recompute the MLP (--recompute-modules mlp, Megatron-LM) or whole layers (--recompute full) instead")]
    SelectiveRecomputesNothing,
    /// Megatron-LM recompute modules that claim no op of this model (`core_attn` with
    /// flash attention, `mlp` or `layernorm` without norm ops).
    #[error("--recompute-modules {0}: recomputes nothing in this model (core_attn keeps no s×s tensors with flash attention; mlp and layernorm need the layer's norm ops); leave it out")]
    ModulesRecomputeNothing(RecomputeModules),
    /// A size overflows 64 bits, or the sequence length is not divisible as the
    /// sharding needs.
    #[error("sizes overflow or the sequence length {seq} is not divisible as the sharding needs")]
    SizeOverflow {
        /// Sequence length.
        seq: u64,
    },
    /// The engine cannot run the configuration.
    #[error("{0}")]
    Unsupported(#[from] Unsupported),
    /// The blocks cannot be cut into the stages (no contiguous cut exists).
    #[error("cannot cut {blocks} blocks into {stages} stages")]
    NoCut {
        /// Blocks of the model.
        blocks: usize,
        /// Virtual stages.
        stages: usize,
    },
    /// Tensor-parallel sharding failed.
    #[error("shard: {0}")]
    Shard(#[source] Shared<ShardError>),
    /// The training graph could not be derived.
    #[error("training graph: {0}")]
    Train(#[source] Shared<TrainError>),
    /// Recomputation or distribution produced an op with a shape error.
    #[error("{pass}: {source}")]
    Pass {
        /// `recompute` or `distribute`.
        pass: &'static str,
        /// The shape error.
        #[source]
        source: ShapeError,
    },
    /// The precision options cannot be planned.
    #[error("{0}")]
    Precision(#[source] PrecisionError),
    /// Model code was asked of a graph: a graph's ops are its code.
    #[error("a graph is planned as its ops are; only a model configuration can be built as another engine's model code")]
    ModelCodeOfGraph,
    /// A pass produced a graph that does not verify (an internal bug).
    #[error("verify: {0}")]
    Verify(#[source] VerifyErrors),
}

impl From<PassError<TrainError>> for CompileError {
    fn from(e: PassError<TrainError>) -> CompileError {
        match e {
            PassError::Failed { source, .. } => CompileError::Train(source.into()),
            PassError::Verify { errors, .. } => CompileError::Verify(errors),
        }
    }
}

impl From<PassError<ShardError>> for CompileError {
    fn from(e: PassError<ShardError>) -> CompileError {
        match e {
            PassError::Failed { source, .. } => CompileError::Shard(source.into()),
            PassError::Verify { errors, .. } => CompileError::Verify(errors),
        }
    }
}

impl From<PassError<ShapeError>> for CompileError {
    fn from(e: PassError<ShapeError>) -> CompileError {
        match e {
            PassError::Failed { pass, source } => CompileError::Pass { pass, source },
            PassError::Verify { errors, .. } => CompileError::Verify(errors),
        }
    }
}

/// A lower-level error shared between cached results: cloning shares it, and two are
/// equal when they are the same instance (the wrapped errors are not comparable).
#[derive(Debug)]
pub struct Shared<E>(pub Arc<E>);

impl<E> Clone for Shared<E> {
    fn clone(&self) -> Self {
        Shared(self.0.clone())
    }
}

impl<E> PartialEq for Shared<E> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<E: std::fmt::Display> std::fmt::Display for Shared<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: std::error::Error> std::error::Error for Shared<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl<E> Shared<E> {
    /// The wrapped error.
    pub fn get(&self) -> &E {
        &self.0
    }
}

impl<E> From<E> for Shared<E> {
    fn from(e: E) -> Self {
        Shared(Arc::new(e))
    }
}

/// The model a compiler plans for.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// A configuration (compiled from its one-layer template).
    Config(ModelConfig),
    /// A forward graph (compiled whole).
    Graph(Graph),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ProfileKey {
    tp: u32,
    cp: u32,
    experts: Xk,
    sp: bool,
    recompute: Recomputation,
    micro_batch: u32,
    zero: u8,
    low_prec_shard: bool,
    dp: u32,
}

/// The block profiles of one configuration.
#[derive(Clone, Debug)]
pub struct ProfileSet {
    /// Per block, in model order (run-length encoded: memory does not grow with the
    /// layer count of a template-compiled model).
    pub blocks: Blocks,
}

impl ProfileSet {
    fn new(blocks: Blocks) -> ProfileSet {
        ProfileSet { blocks }
    }
}

type Profiles = Arc<Result<ProfileSet, CompileError>>;
type BlockMap = BTreeMap<Block, BlockProfile>;

/// A cache from keys to shared, possibly failed, results.
type Cache<K, V> = Mutex<BTreeMap<K, Arc<V>>>;
type Compiled<T> = Result<T, CompileError>;
/// (tp, sp, recompute, micro-batch): what block times depend on.
type BaseKey = (u32, bool, Recomputation, u32, u32, Xk);
/// (tp, zero, low-precision sharding, dp, cp, (ep, etp)).
type DistKey = (u32, u8, bool, u32, u32, Xk);
/// (ep, etp): the expert layout (always (1, 1) for a dense model).
type Xk = (u32, u32);

/// `calibration` if [`Calibration::validate`] accepts it, as a compile error.
fn checked(calibration: &Calibration) -> Result<(), CompileError> {
    calibration
        .validate()
        .map_err(|e| CompileError::Calibration(e.to_string()))
}

/// A training graph with recomputation: (tp, sp, cp, recompute, (ep, etp)).
type GraphKey = (u32, bool, u32, Recomputation, Xk);

#[derive(Default)]
struct Caches {
    /// Per-device forward graphs, by (tp, sp, cp): the split is chosen at the
    /// `s / cp` tokens a device runs.
    sharded: Cache<(u32, bool, u32), Compiled<Graph>>,
    /// Training graphs before recomputation, by (tp, sp, cp, (ep, etp)).
    trained: Cache<(u32, bool, u32, Xk), Compiled<Graph>>,
    /// Training graphs with recomputation, by (tp, sp, cp, recompute, (ep, etp)).
    graphs: Cache<GraphKey, Compiled<Recomputed>>,
    /// What profiling a training graph reads off it at every micro-batch, by the
    /// training graph's key.
    prepared: Cache<GraphKey, ProfilePrep>,
    /// Undistributed profiles, by (tp, sp, recompute, b).
    base: Cache<BaseKey, Compiled<BlockMap>>,
    /// Distribution profiles, by (tp, zero, low-precision sharding, dp, cp).
    dist: Cache<DistKey, Compiled<BlockMap>>,
    profiles: Cache<ProfileKey, Compiled<ProfileSet>>,
    /// The engine's cuts of the model, by (pp, virtual stages per rank).
    cuts: Cache<(u32, u32), Vec<Vec<StageSpan>>>,
    /// In-flight micro-batch patterns of each device, by (schedule, pp, m).
    inflight: Cache<(Schedule, u32, u32), InFlight>,
}

/// A cache holding the same entries as `map`.
fn copy_cache<K: Ord + Clone, V>(map: &Cache<K, V>) -> Cache<K, V> {
    Mutex::new(map.lock().expect("cache lock").clone())
}

/// Looks `key` up in `map`, computing and inserting it on a miss. The lock is not held
/// while computing; two threads may compute the same entry, and the first insert wins
/// (the computation is deterministic, so both are equal).
fn cached<K: Ord, V>(map: &Cache<K, V>, key: K, f: impl FnOnce() -> V) -> Arc<V> {
    if let Some(v) = map.lock().expect("cache lock").get(&key) {
        return v.clone();
    }
    let v = Arc::new(f());
    map.lock()
        .expect("cache lock")
        .entry(key)
        .or_insert(v)
        .clone()
}

/// Compiles configurations of one model on one cluster at one sequence length and
/// global batch.
pub struct Compiler {
    source: ModelSource,
    /// Forward graph compiled per configuration (the template for zoo models).
    forward: Graph,
    layers: u32,
    /// The blocks the pipeline cuts between, and which are layers.
    layout: BlockLayout,
    /// A configuration's layers as runs of one template each: (first layer, layers,
    /// index into [`ModelConfig::template_layers`]); computed once, since finding a
    /// layer's template walks the layers (empty for a graph).
    template_runs: Vec<(u32, u32, usize)>,
    /// The cluster.
    pub cluster: Cluster,
    /// The cost model.
    pub cost: CostModel,
    /// The cost model the sharding pass compares layouts with: always the device's
    /// built-in table, so that a user's calibration changes what a program costs,
    /// never which program the engine runs (a fitted calibration would otherwise
    /// reshard the runs it was fitted to).
    shard_cost: CostModel,
    /// Sequence length.
    pub seq: u64,
    /// Sequences per step.
    pub global_batch: u64,
    /// Memory budget per device, bytes.
    pub budget_bytes: u64,
    /// Fraction of device memory the budget is.
    pub memory_ratio: f64,
    /// The engine the configurations are compiled for.
    pub engine: Engine,
    /// The engine's data-parallel overlap switches (both on unless a measured run
    /// was made without them).
    pub comm_overlap: CommOverlap,
    /// Runs the passes (verifying their graphs in debug builds).
    passes: PassManager,
    /// Whose model code the forward graph follows (a configuration's; a graph is
    /// its own code).
    pub model_code: ModelCode,
    /// Compute, gradient and optimizer precision (engine defaults where unset).
    pub precision: PrecisionOptions,
    /// Context, communication and allocator memory beside the tensors.
    pub runtime: RuntimeOverhead,
    /// The calibration a user gave (`None`: the device's built-in table, see
    /// [`CostModel::new`]); kept by [`Compiler::with_job`].
    pub calibration: Option<Calibration>,
    /// Expert load imbalance under expert parallelism: the busiest expert-parallel
    /// rank's routed rows over the mean, at least 1 (1: balanced routing, what
    /// auxiliary load-balancing losses aim at). See [`Compiler::with_moe_imbalance`].
    pub moe_imbalance: f64,
    caches: Caches,
}

/// The evaluation of one configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    /// The configuration.
    pub config: Config,
    /// Seconds per step.
    pub step_time_s: f64,
    /// Tokens per second over the cluster.
    pub tokens_per_s: f64,
    /// Model TFLOP/s per device: [`Compiler::model_flops_per_step`] over the step
    /// time and the devices.
    pub tflops_per_device: f64,
    /// Model FLOPs utilization: `tflops_per_device` over the device's bf16 peak
    /// ([`Compiler::model_flops_per_step`] says which FLOPs count).
    pub mfu: f64,
    /// Hardware FLOPs utilization: the FLOPs the devices execute (recomputation and
    /// work replicated across tensor-parallel ranks included, causal attention at its
    /// executed share [`crate::cost::executed_share`], read off the per-device
    /// training graphs) per second over the bf16 peak.
    pub hfu: f64,
    /// Memory budget per device, bytes.
    pub budget_bytes: u64,
    /// Largest stage peak, bytes.
    pub peak_bytes: u64,
    /// Whether every stage's peak is within the budget.
    pub fits: bool,
    /// Block spans of the virtual stages.
    pub stages: Vec<StageSpan>,
    /// Number of blocks (embedding + layers + head).
    pub blocks: usize,
    /// The simulation.
    pub sim: Simulation,
}

impl Compiler {
    /// Prepares a compiler. `memory_ratio` is the fraction of device memory usable.
    ///
    /// # Errors
    ///
    /// [`CompileError::MemoryRatio`] outside `(0, 1]`, [`CompileError::EmptyJob`] for a
    /// zero sequence length or batch, [`CompileError::TooManyTokens`] above
    /// [`MAX_TOKENS_PER_STEP`], [`CompileError::Cluster`] for an invalid cluster,
    /// [`CompileError::Model`] for a model that cannot be built, and
    /// [`CompileError::SequenceTooLong`] for a sequence longer than a learned position
    /// table.
    pub fn new(
        source: ModelSource,
        cluster: Cluster,
        seq: u64,
        global_batch: u64,
        memory_ratio: f64,
    ) -> Result<Compiler, CompileError> {
        if !(memory_ratio > 0.0 && memory_ratio <= 1.0) {
            return Err(CompileError::MemoryRatio {
                ratio: memory_ratio,
            });
        }
        if seq == 0 || global_batch == 0 {
            return Err(CompileError::EmptyJob { seq, global_batch });
        }
        if global_batch
            .checked_mul(seq)
            .is_none_or(|t| t > MAX_TOKENS_PER_STEP)
        {
            return Err(CompileError::TooManyTokens {
                global_batch,
                seq,
                max: MAX_TOKENS_PER_STEP,
            });
        }
        cluster
            .validate()
            .map_err(|e| CompileError::Cluster(e.into()))?;
        let (forward, layers, layout, template_runs) = match &source {
            ModelSource::Config(cfg) => {
                // Two layers: `layer.0` stands for every layer but the last (its output
                // gradient sums two uses), `layer.1` for the last; a model alternating
                // local and global attention has one inner template of each kind
                // (`ModelConfig::template_layers`).
                let g = build_template(cfg, ModelCode::Fused)
                    .map_err(|e| CompileError::Model(e.into()))?;
                let mut layout = BlockLayout::transformer(cfg.layers as usize);
                layout.experts = cfg.moe.as_ref().map_or(0, |m| m.experts);
                (g, cfg.layers, layout, template_runs(cfg))
            }
            ModelSource::Graph(g) => {
                let layers = g
                    .ops()
                    .filter_map(|o| match g.node(o).block {
                        Block::Layer(i) => Some(i + 1),
                        _ => None,
                    })
                    .max()
                    .unwrap_or(0);
                let blocks: BTreeSet<Block> = g.ops().map(|o| g.node(o).block).collect();
                let layout = BlockLayout {
                    blocks: blocks.len(),
                    layers: blocks
                        .iter()
                        .enumerate()
                        .filter(|(_, b)| matches!(b, Block::Layer(_)))
                        .map(|(i, _)| i)
                        .collect(),
                    experts: g
                        .ops()
                        .find_map(|o| match g.node(o).op {
                            Op::MoeDispatch { experts, .. } => Some(experts),
                            _ => None,
                        })
                        .unwrap_or(0),
                };
                (g.clone(), layers, layout, Vec::new())
            }
        };
        if let Some(max_positions) = learned_positions(&forward) {
            if seq > max_positions {
                return Err(CompileError::SequenceTooLong {
                    model: forward.name().to_string(),
                    seq,
                    max_positions,
                });
            }
        }
        let budget_bytes = (cluster.device_memory() as f64 * memory_ratio) as u64;
        Ok(Compiler {
            source,
            forward,
            layers,
            layout,
            template_runs,
            cost: CostModel::new(cluster.clone()),
            shard_cost: CostModel::new(cluster.clone()),
            cluster,
            seq,
            global_batch,
            budget_bytes,
            memory_ratio,
            engine: Engine::default(),
            comm_overlap: CommOverlap::default(),
            passes: PassManager::debug_verifying(),
            model_code: ModelCode::Fused,
            precision: PrecisionOptions::default(),
            runtime: Engine::default().runtime(),
            calibration: None,
            moe_imbalance: 1.0,
            caches: Caches::default(),
        })
    }

    /// The same compiler with expert load imbalance `f` (the busiest expert-parallel
    /// rank receives `f` times the mean routed rows; values below 1, and non-finite
    /// ones, are taken as 1): with `ep > 1` that rank's grouped expert matmuls and
    /// token exchanges take `f` times as long, and every rank waits for it at the
    /// combine's all-to-all. Activation memory stays the mean's. Caches start empty.
    pub fn with_moe_imbalance(mut self, f: f64) -> Compiler {
        self.moe_imbalance = if f.is_finite() { f.max(1.0) } else { 1.0 };
        self.caches = Caches::default();
        self
    }

    /// The same compiler for another engine, with the engine's runtime overhead;
    /// caches start empty.
    pub fn with_engine(mut self, engine: Engine) -> Compiler {
        self.engine = engine;
        self.runtime = engine.runtime();
        self.caches = Caches::default();
        self
    }

    /// The same compiler at another precision; caches start empty.
    ///
    /// # Errors
    ///
    /// [`CompileError::Precision`] when the engine cannot train at `precision`
    /// (see [`Engine::states`]), or for FP8 on a device without FP8 tensor cores.
    pub fn with_precision(mut self, precision: PrecisionOptions) -> Result<Compiler, CompileError> {
        let states = self
            .engine
            .states(&precision)
            .map_err(CompileError::Precision)?;
        if states.fp8.is_some() && self.cluster.device.peak_fp8_flops.is_none() {
            return Err(CompileError::Precision(PrecisionError::Fp8Device {
                device: self.cluster.device.name.clone(),
            }));
        }
        self.precision = precision;
        self.caches = Caches::default();
        Ok(self)
    }

    /// The same compiler for a configuration run by other model code (Hugging Face
    /// Transformers' modules for the `hf` engine); caches start empty.
    ///
    /// # Errors
    ///
    /// [`CompileError::Model`] when the configuration cannot be built as that code, and
    /// [`CompileError::ModelCodeOfGraph`] for a graph (its ops are its code).
    pub fn with_model_code(mut self, code: ModelCode) -> Result<Compiler, CompileError> {
        if code == self.model_code {
            return Ok(self);
        }
        let ModelSource::Config(cfg) = &self.source else {
            return Err(CompileError::ModelCodeOfGraph);
        };
        self.forward = build_template(cfg, code).map_err(|e| CompileError::Model(e.into()))?;
        self.model_code = code;
        self.caches = Caches::default();
        Ok(self)
    }

    /// The same compiler with the engine's data-parallel overlap switches set to
    /// `flags`; caches start empty.
    ///
    /// # Errors
    ///
    /// [`CompileError::CommOverlap`] when the engine has no such switch (see
    /// [`CommOverlap::check`]).
    pub fn with_comm_overlap(mut self, flags: CommOverlap) -> Result<Compiler, CompileError> {
        flags
            .check(self.engine)
            .map_err(CompileError::CommOverlap)?;
        self.comm_overlap = flags;
        self.caches = Caches::default();
        Ok(self)
    }

    /// The same compiler with another runtime overhead (peaks change, profiles do not).
    pub fn with_runtime(mut self, runtime: RuntimeOverhead) -> Compiler {
        self.runtime = runtime;
        self
    }

    /// The dtypes the engine trains with at this compiler's precision.
    ///
    /// # Panics
    ///
    /// Never for a compiler built by this module: [`Compiler::with_precision`] checks
    /// the precision, and the default precision is valid for every engine.
    pub fn states(&self) -> States {
        // `with_precision` checked the precision for this compiler's engine (and
        // `with_engine` is always called before it), so the fallback is never taken.
        self.engine
            .states(&self.precision)
            .or_else(|_| self.engine.states(&PrecisionOptions::default()))
            .expect("the default precision is valid for every engine")
    }

    /// Bytes beside the training graph's tensors on one device of configuration `c`:
    /// the engine's named buffers, and the runtime overhead of a device whose tensors
    /// and buffers peak at `allocated` bytes.
    pub fn overhead_bytes(&self, c: &Config, allocated: u64) -> (u64, u64) {
        let states = self.states();
        let buffers: u64 = self
            .engine
            .buffers(c.zero, c.grad_ranks(), states.grad)
            .iter()
            .map(|b| b.bytes)
            .sum();
        let runtime = self
            .runtime
            .bytes(allocated.saturating_add(buffers), communicators(c));
        (buffers, runtime)
    }

    /// The bytes the training graph's tensors of one device of `c` may peak at within
    /// the budget, once the engine's buffers and the runtime overhead are counted.
    pub fn tensor_budget(&self, c: &Config) -> u64 {
        let (buffers, _) = self.overhead_bytes(c, 0);
        self.runtime
            .allocatable(self.budget_bytes, communicators(c))
            .saturating_sub(buffers)
    }

    /// The same compiler priced with `calibration` instead of the device's built-in
    /// table; caches start empty.
    ///
    /// # Errors
    ///
    /// [`CompileError::Calibration`] for a calibration [`Calibration::validate`]
    /// refuses (an efficiency outside `[0.01, 1]`, an overlap slowdown outside
    /// `[0, 0.9]`, an empty tile list, …): it would price nonsense.
    pub fn with_calibration(mut self, calibration: Calibration) -> Result<Compiler, CompileError> {
        checked(&calibration)?;
        self.cost = CostModel::with_calibration(self.cluster.clone(), calibration.clone());
        self.calibration = Some(calibration);
        self.caches = Caches::default();
        Ok(self)
    }

    /// Prices with `calibration` from now on, keeping the per-device and training
    /// graphs already built (their sharding was chosen under the previous costs):
    /// what a fit does many times. Profiles are dropped.
    ///
    /// # Errors
    ///
    /// As [`Compiler::with_calibration`]; the compiler is left unchanged.
    pub fn reprice(&mut self, calibration: Calibration) -> Result<(), CompileError> {
        checked(&calibration)?;
        self.cost.eff = calibration.clone();
        self.cost.defaulted = false;
        self.calibration = Some(calibration);
        self.caches.base = Mutex::default();
        self.caches.dist = Mutex::default();
        self.caches.profiles = Mutex::default();
        Ok(())
    }

    /// The same compiler priced with `calibration`, keeping the per-device and
    /// training graphs already built (their sharding was chosen under the current
    /// costs): what a fit re-evaluates many times. Profiles start empty.
    ///
    /// # Errors
    ///
    /// As [`Compiler::with_calibration`].
    pub fn repriced(&self, calibration: Calibration) -> Result<Compiler, CompileError> {
        checked(&calibration)?;
        Ok(Compiler {
            source: self.source.clone(),
            forward: self.forward.clone(),
            layers: self.layers,
            layout: self.layout.clone(),
            template_runs: self.template_runs.clone(),
            cluster: self.cluster.clone(),
            cost: CostModel::with_calibration(self.cluster.clone(), calibration.clone()),
            shard_cost: self.shard_cost.clone(),
            seq: self.seq,
            global_batch: self.global_batch,
            budget_bytes: self.budget_bytes,
            memory_ratio: self.memory_ratio,
            engine: self.engine,
            comm_overlap: self.comm_overlap,
            passes: PassManager::debug_verifying(),
            model_code: self.model_code,
            precision: self.precision,
            runtime: self.runtime,
            calibration: Some(calibration),
            moe_imbalance: self.moe_imbalance,
            caches: Caches {
                sharded: copy_cache(&self.caches.sharded),
                trained: copy_cache(&self.caches.trained),
                graphs: copy_cache(&self.caches.graphs),
                ..Caches::default()
            },
        })
    }

    /// A compiler for the same model and sequence length on another cluster or global
    /// batch, with the same memory ratio.
    ///
    /// # Errors
    ///
    /// As [`Compiler::new`].
    pub fn with_job(&self, cluster: Cluster, global_batch: u64) -> Result<Compiler, CompileError> {
        let c = Compiler::new(
            self.source.clone(),
            cluster,
            self.seq,
            global_batch,
            self.memory_ratio,
        )?
        .with_engine(self.engine)
        .with_model_code(self.model_code)?
        .with_precision(self.precision)?
        .with_comm_overlap(self.comm_overlap)?
        .with_runtime(self.runtime)
        .with_moe_imbalance(self.moe_imbalance);
        match &self.calibration {
            Some(cal) => c.with_calibration(cal.clone()),
            None => Ok(c),
        }
    }

    /// Number of blocks the pipeline can cut between.
    pub fn block_count(&self) -> usize {
        self.layout.blocks
    }

    /// The blocks the pipeline can cut between, and which of them are layers (what
    /// the engine's layer placement rules see).
    pub fn block_layout(&self) -> &BlockLayout {
        &self.layout
    }

    /// Trainable parameters of the model.
    pub fn param_count(&self) -> u64 {
        match &self.source {
            ModelSource::Config(cfg) => cfg.param_count(),
            ModelSource::Graph(g) => crate::train::memory::param_count(g).unwrap_or(0),
        }
    }

    /// Parameters of the routed experts (0 for a dense model): the stacked expert
    /// weights of every MoE layer, which expert parallelism splits.
    pub fn expert_param_count(&self) -> u64 {
        match &self.source {
            ModelSource::Config(cfg) => cfg.moe.as_ref().map_or(0, |m| {
                let layers = (0..cfg.layers).filter(|&i| cfg.is_moe_layer(i)).count() as u64;
                layers
                    .saturating_mul(m.experts)
                    .saturating_mul(m.per_expert(cfg.hidden).unwrap_or(u64::MAX))
            }),
            ModelSource::Graph(g) => {
                let names = crate::passes::expert::expert_param_names(g);
                g.ops()
                    .filter(|&o| matches!(g.op(o), Op::Param { name } if names.contains(name)))
                    .filter_map(|o| {
                        let t = g.node(o).results[0];
                        g.ty(t).shape.numel_at(Env::new(1, 1))
                    })
                    .fold(0u64, u64::saturating_add)
            }
        }
    }

    /// Model FLOPs of one training step, the numerator of MFU: PaLM's definition
    /// (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways",
    /// Appendix B), `6·N + 12·L·H·Q·T` FLOPs per token for `N` parameters, `L` layers,
    /// `H` attention heads of `Q` channels and `T` tokens of context, times the tokens
    /// of the step. `6·N` is a forward (2 FLOPs per parameter per token) and a
    /// backward (4); `12·L·H·Q·T` is the attention scores and their weighted sum, a
    /// `T × T` product each, forward and backward, counted whole (no causal halving,
    /// as PaLM and Narayanan et al. 2021 eq. 3 count it). `N` leaves out the input
    /// embedding and learned position tables, which are lookups (torchtitan's
    /// `get_nparams_and_flops` does the same); a table tied to the output projection
    /// counts once, as that projection. Recomputation is not model work (it is in
    /// HFU), and neither is anything tensor parallelism replicates: the formula counts
    /// the model once, whatever the degrees.
    ///
    /// For a GPT-style model this equals Narayanan et al. 2021 eq. 3 without its
    /// recomputation forward (`72·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))` for
    /// `96·…`), up to biases and norms.
    ///
    /// For a graph (no configuration to read `N`, `H`, `Q` from) it is three times the
    /// FLOPs of the whole forward graph (a backward is twice its forward), per sequence,
    /// times the sequences of the step.
    pub fn model_flops_per_step(&self) -> f64 {
        let tokens = self.global_batch as f64 * self.seq as f64;
        match &self.source {
            ModelSource::Config(cfg) => tokens * model_flops_per_token(cfg, self.seq),
            ModelSource::Graph(g) => {
                let env = Env::new(1, self.seq);
                let forward: f64 = g
                    .ops()
                    .filter(|&o| g.node(o).phase == crate::ir::Phase::Fwd)
                    .filter_map(|o| {
                        let op = &g.node(o).op;
                        op.cost(&g.input_types(o), &g.result_types(o), env)
                            .map(|c| c.flops as f64)
                    })
                    .sum();
                3.0 * forward * self.global_batch as f64
            }
        }
    }

    /// Transformer layers of the model.
    pub fn layers(&self) -> u32 {
        self.layers
    }

    /// Checks a configuration against the cluster, the batch and the model.
    ///
    /// # Errors
    ///
    /// The first rule `c` breaks: a zero degree, a device count or global batch that
    /// does not match, a tensor-parallel degree that spans nodes or does not divide the
    /// model's heads, key/value heads or feed-forward channels, a ZeRO stage above 3,
    /// sequence parallelism without tensor parallelism, more stages than blocks, an
    /// interleaved schedule without its divisibility, more than
    /// [`MAX_PIPELINE_UNITS`] work units, `recompute_layers` that is zero or has
    /// no recomputation policy, or [`CompileError::Unsupported`]: something the
    /// compiler's engine cannot run ([`Engine::allows`]).
    pub fn check(&self, c: &Config) -> Result<(), CompileError> {
        let devices = self.cluster.devices();
        if c.dp == 0
            || c.tp == 0
            || c.pp == 0
            || c.cp == 0
            || c.ep == 0
            || c.etp == 0
            || c.micro_batch == 0
            || c.num_micro_batches == 0
        {
            return Err(CompileError::ZeroDegree);
        }
        if c.devices() != devices {
            return Err(CompileError::DeviceCountMismatch {
                dp: c.dp,
                cp: c.cp,
                tp: c.tp,
                pp: c.pp,
                devices,
            });
        }
        if self.cluster.devices_per_node % c.tp != 0 {
            return Err(CompileError::TpNotDividingNode {
                tp: c.tp,
                devices_per_node: self.cluster.devices_per_node,
            });
        }
        if c.global_batch() != self.global_batch {
            return Err(CompileError::BatchNotDivisible {
                global_batch: self.global_batch,
                dp: c.dp,
                num_micro_batches: c.num_micro_batches,
                micro_batch: c.micro_batch,
                product: c.global_batch(),
            });
        }
        if let ModelSource::Config(cfg) = &self.source {
            if let Some((what, count)) = cfg.tp_indivisible(c.tp) {
                return Err(CompileError::TpNotDividingHeads {
                    model: cfg.name.clone(),
                    tp: c.tp,
                    what,
                    count,
                });
            }
        }
        if c.zero > 3 {
            return Err(CompileError::NoSuchZeroStage(c.zero));
        }
        if c.sp && c.tp == 1 {
            return Err(CompileError::SequenceParallelNeedsTp);
        }
        self.check_experts(c)?;
        if c.cp > 1 {
            if self.seq % (2 * u64::from(c.cp)) != 0 {
                return Err(CompileError::CpNotDividingSeq {
                    cp: c.cp,
                    seq: self.seq,
                });
            }
            if !self.fused_attention() {
                return Err(CompileError::CpNeedsFusedAttention { cp: c.cp });
            }
        }
        let v = c.schedule.chunks();
        let stages = u64::from(c.pp) * u64::from(v);
        if stages > self.block_count() as u64 {
            return Err(CompileError::TooManyStages {
                stages,
                blocks: self.block_count(),
            });
        }
        if let Schedule::Interleaved(_) = c.schedule {
            if c.pp < 2 || c.num_micro_batches % c.pp != 0 {
                return Err(CompileError::InterleavedNeeds {
                    pp: c.pp,
                    num_micro_batches: c.num_micro_batches,
                });
            }
        }
        let units = stages.saturating_mul(u64::from(c.num_micro_batches));
        if units > MAX_PIPELINE_UNITS {
            return Err(CompileError::TooManyMicroBatches {
                units,
                max: MAX_PIPELINE_UNITS,
            });
        }
        match (c.recompute_layers, c.recompute) {
            (Some(0), _) => return Err(CompileError::RecomputeLayersZero),
            (Some(k), Recompute::None) => {
                return Err(CompileError::RecomputeLayersWithoutPolicy(k))
            }
            _ => {}
        }
        self.engine.allows(c, &self.layout)?;
        Ok(())
    }

    /// The expert layout's own rules (see [`Config`]'s folding).
    fn check_experts(&self, c: &Config) -> Result<(), CompileError> {
        let experts = self.layout.experts;
        if experts == 0 {
            if c.ep > 1 || c.etp > 1 {
                return Err(CompileError::ExpertsWithoutMoe {
                    ep: c.ep,
                    etp: c.etp,
                });
            }
            return Ok(());
        }
        if c.etp != 1 && c.etp != c.tp {
            return Err(CompileError::ExpertTensorDegree {
                etp: c.etp,
                tp: c.tp,
            });
        }
        if experts % u64::from(c.ep) != 0 {
            return Err(CompileError::ExpertsNotDividing { experts, ep: c.ep });
        }
        if c.expert_dp() == 0 {
            return Err(CompileError::ExpertGroupNotDividing {
                ep: c.ep,
                etp: c.etp,
                ranks: u64::from(c.tp) * u64::from(c.cp) * u64::from(c.dp),
            });
        }
        Ok(())
    }

    /// Whether the forward graph's attention is fused (no `s×s` scores): what ring
    /// attention needs.
    fn fused_attention(&self) -> bool {
        match &self.source {
            ModelSource::Config(cfg) => cfg.attention == crate::models::Attention::Flash,
            ModelSource::Graph(g) => {
                g.ops().any(|o| is_ring_attention(&g.node(o).op))
                    && !g.ops().any(|o| matches!(g.node(o).op, Op::Softmax { .. }))
            }
        }
    }

    /// The tensor-parallel and gradient-reduction (`dp · cp`) groups of `c`.
    fn groups(&self, c: &Config) -> (Group, Group) {
        let per_node = self.cluster.devices_per_node;
        let tp = Group {
            size: c.tp,
            per_node: c.tp,
        };
        // Ranks are ordered tensor-parallel fastest, then context-parallel, then
        // data-parallel, then pipeline (Megatron-LM's order tp-cp-ep-dp-pp), so the
        // gradient group (dp · cp ranks) has per_node / tp members per node.
        let grad = c.grad_ranks();
        let dp_per_node = (per_node / c.tp).clamp(1, grad);
        let dp = Group {
            size: grad,
            per_node: dp_per_node,
        };
        (tp, dp)
    }

    /// Whether the tensor-parallel collectives of a program at `tp` (with sequence
    /// parallelism `sp`) overlap their GEMMs: Megatron-LM's `--tp-comm-overlap`, on
    /// in apar's exports whenever sequence parallelism is, unless the switch is off,
    /// on NVIDIA devices (Transformer Engine's userbuffers; ROCm's port is not
    /// assumed).
    fn tp_overlap(&self, tp: u32, sp: bool) -> Option<TpOverlap> {
        (self.engine == Engine::Megatron && self.priced_comm_overlap().tp_comm && sp && tp > 1)
            .then(|| TpOverlap::te_default(self.cost.eff.gemm.compute_units))
    }

    /// The communication-overlap switches this compiler prices plans with: the ones
    /// given, less `--tp-comm-overlap` on devices other than NVIDIA's (Transformer
    /// Engine's userbuffers; ROCm's port is not assumed), so that a plan's
    /// `comm_overlap` and its export ask for no overlap it was not priced with.
    pub fn priced_comm_overlap(&self) -> CommOverlap {
        let userbuffers = self.cluster.device.vendor == Some(crate::cluster::Vendor::Nvidia);
        CommOverlap {
            tp_comm: self.comm_overlap.tp_comm && userbuffers,
            ..self.comm_overlap
        }
    }

    /// The context-parallel group of `cp` ranks beside `tp` tensor-parallel ones: next
    /// after the tensor-parallel ranks in Megatron-LM's order, so inside a node while
    /// `tp · cp` fits one.
    fn cp_group(&self, tp: u32, cp: u32) -> Group {
        Group {
            size: cp,
            per_node: (self.cluster.devices_per_node / tp.max(1)).clamp(1, cp.max(1)),
        }
    }

    /// `c`'s expert layout as the caches key it: (1, 1) for a dense model.
    fn xk(&self, c: &Config) -> Xk {
        if self.layout.experts == 0 {
            (1, 1)
        } else {
            (c.ep, c.etp)
        }
    }

    /// Whether `c` reduces any gradient over data-parallel ranks: the dense states
    /// over `dp · cp`, the routed experts' over the expert-data-parallel ranks.
    fn reduces(&self, c: &Config) -> bool {
        c.grad_ranks() > 1 || (self.layout.experts > 0 && c.expert_dp() > 1)
    }

    /// The expert-parallel group of `(ep, etp)`: in Megatron-Core's expert rank order
    /// (etp fastest, then ep, then edp: `order="tp-ep-dp-pp"` over the same ranks), so
    /// `ep` ranks `etp` apart, inside a node while `ep · etp` fits one.
    fn ep_group(&self, (ep, etp): Xk) -> Group {
        Group {
            size: ep.max(1),
            per_node: (self.cluster.devices_per_node / etp.max(1)).clamp(1, ep.max(1)),
        }
    }

    /// The expert-data-parallel group of `c`: `edp` ranks `ep · etp` apart.
    fn edp_group(&self, c: &Config) -> Group {
        let edp = c.expert_dp().max(1);
        let stride = c.ep.max(1).saturating_mul(c.etp.max(1));
        Group {
            size: edp,
            per_node: (self.cluster.devices_per_node / stride).clamp(1, edp),
        }
    }

    /// The configuration whose data-parallel degree is `c`'s gradient group (`dp ·
    /// cp`): what the distribution pass shards and reduces over.
    fn grad_config(c: &Config) -> Config {
        Config {
            dp: c.grad_ranks(),
            cp: 1,
            ..*c
        }
    }

    /// The environment one device of context-parallel degree `cp` runs at: its
    /// `s / cp` tokens of each sequence.
    fn env(&self, b: u32, cp: u32) -> Env {
        Env::new(u64::from(b), self.seq / u64::from(cp.max(1)))
    }

    /// Block profiles for a configuration (cached).
    ///
    /// Composed from two cached parts: the per-micro-batch profile of the training
    /// graph with tensor parallelism and recomputation (keyed by tp, sp, recompute,
    /// micro-batch), and the distribution profile (keyed by tp, ZeRO stage,
    /// low-precision sharding, dp): model-state bytes, data-parallel collectives,
    /// optimizer time, and the transient bytes distribution adds to each block's
    /// forward and backward (gathered parameters, unreduced gradients), which do not
    /// depend on the micro-batch.
    pub fn profiles(&self, c: &Config) -> Profiles {
        let key = ProfileKey {
            tp: c.tp,
            cp: c.cp,
            sp: c.sp,
            recompute: c.recomputation(),
            micro_batch: c.micro_batch,
            experts: self.xk(c),
            zero: if self.reduces(c) { c.zero } else { 0 },
            low_prec_shard: self.reduces(c) && c.shards_low_prec(),
            dp: c.dp,
        };
        cached(&self.caches.profiles, key, || {
            self.compute_profiles(c).map(ProfileSet::new)
        })
    }

    /// Computes, in parallel and each once, the cached pieces `configs` will need
    /// (sharded and training graphs, micro-batch and distribution profiles), so that
    /// concurrent evaluations do not race to compute the same entry.
    pub fn warm(&self, configs: &[Config]) {
        use rayon::prelude::*;
        let graphs: BTreeSet<(u32, bool, u32)> =
            configs.iter().map(|c| (c.tp, c.sp, c.cp)).collect();
        graphs.par_iter().for_each(|&(tp, sp, cp)| {
            cached(&self.caches.sharded, (tp, sp, cp), || {
                self.per_device_forward(tp, sp, cp)
            });
        });
        let trains: BTreeSet<GraphKey> = configs
            .iter()
            .map(|c| (c.tp, c.sp, c.cp, c.recomputation(), self.xk(c)))
            .chain(
                configs
                    .iter()
                    .map(|c| (c.tp, false, c.cp, Recomputation::NONE, self.xk(c))),
            )
            .collect();
        let unrecomputed: BTreeSet<(u32, bool, u32, Xk)> = trains
            .iter()
            .map(|&(tp, sp, cp, _, x)| (tp, sp, cp, x))
            .collect();
        unrecomputed.par_iter().for_each(|&(tp, sp, cp, x)| {
            self.train_graph(tp, sp, cp, x);
        });
        trains.par_iter().for_each(|&(tp, sp, cp, rc, x)| {
            self.graph(tp, sp, cp, rc, x);
        });
        // Profiles only for the configurations that get to them: those
        // [`Compiler::lower_bound`] refuses before its profiles need none (selective
        // recomputation that recomputes nothing is most of the space of a model with
        // flash attention).
        let configs: Vec<Config> = configs
            .iter()
            .filter(|c| self.check(c).is_ok() && self.recomputes_something(c).is_ok())
            .copied()
            .collect();
        let bases: BTreeSet<BaseKey> = configs
            .iter()
            .map(|c| {
                let x = self.xk(c);
                (c.tp, c.sp, c.recomputation(), c.micro_batch, c.cp, x)
            })
            .chain(configs.iter().map(|c| {
                let x = self.xk(c);
                (c.tp, false, Recomputation::NONE, 1, c.cp, x)
            }))
            .collect();
        bases.par_iter().for_each(|&(tp, sp, rc, b, cp, x)| {
            self.base(tp, sp, rc, b, cp, x);
        });
        let mut dists: BTreeMap<DistKey, Config> = BTreeMap::new();
        for c in configs.iter().filter(|c| self.reduces(c)) {
            dists
                .entry((c.tp, c.zero, c.shards_low_prec(), c.dp, c.cp, self.xk(c)))
                .or_insert(*c);
        }
        dists.par_iter().for_each(|(_, c)| {
            self.distribution(c);
        });
    }

    /// The sharding pass at degree `tp`, priced at the job's sequence and one
    /// sequence per micro-batch (the split trades compute against collective time,
    /// both linear in the micro-batch but for the collectives' latency).
    fn tensor_parallel(&self, tp: u32, sp: bool, cp: u32) -> TensorParallel<'_> {
        TensorParallel {
            tp,
            sp,
            cost: &self.shard_cost,
            env: Env::new(1, (self.seq / u64::from(cp.max(1))).max(1)),
            min_split_dim: match &self.source {
                ModelSource::Config(cfg) => Some(cfg.tp_split_dim()),
                _ => None,
            },
        }
    }

    /// The forward graph the engine builds at tensor-parallel degree `tp`: a
    /// configuration's template with the engine's padded vocabulary
    /// ([`Engine::padded_vocab`]: Megatron-LM's rows up to a multiple of `128 · tp`,
    /// which it splits over the ranks), else the compiled forward graph.
    fn forward_at(&self, tp: u32) -> Result<Cow<'_, Graph>, CompileError> {
        let ModelSource::Config(cfg) = &self.source else {
            return Ok(Cow::Borrowed(&self.forward));
        };
        let vocab = self.engine.padded_vocab(cfg.vocab, tp);
        if vocab == cfg.vocab {
            return Ok(Cow::Borrowed(&self.forward));
        }
        let padded = ModelConfig {
            vocab,
            ..cfg.clone()
        };
        build_template(&padded, self.model_code)
            .map(Cow::Owned)
            .map_err(|e| CompileError::Model(e.into()))
    }

    /// The forward graph one device runs at tensor-parallel degree `tp` with
    /// context-parallel degree `cp` (the split priced at its `s / cp` tokens).
    fn per_device_forward(&self, tp: u32, sp: bool, cp: u32) -> Result<Graph, CompileError> {
        let forward = self.forward_at(tp)?;
        if tp <= 1 {
            return Ok(forward.into_owned());
        }
        Ok(self
            .passes
            .run(&self.tensor_parallel(tp, sp, cp), &forward)?
            .graph)
    }

    /// The per-device training graph with recomputation (symbolic in `b` and `s`).
    fn graph(
        &self,
        tp: u32,
        sp: bool,
        cp: u32,
        rc: Recomputation,
        (ep, etp): Xk,
    ) -> Arc<Result<Recomputed, CompileError>> {
        cached(&self.caches.graphs, (tp, sp, cp, rc, (ep, etp)), || {
            let train = self.train_graph(tp, sp, cp, (ep, etp));
            let train = train.as_ref().as_ref().map_err(Clone::clone)?;
            let selective = self.engine.selective_for(rc.modules);
            let r = self
                .passes
                .run(&RecomputeLayers(rc.policy, selective), train)?;
            Ok(r)
        })
    }

    /// The per-device training graph before recomputation (what every recomputation
    /// policy of `(tp, sp, (ep, etp))` starts from).
    fn train_graph(
        &self,
        tp: u32,
        sp: bool,
        cp: u32,
        (ep, etp): Xk,
    ) -> Arc<Result<Graph, CompileError>> {
        cached(&self.caches.trained, (tp, sp, cp, (ep, etp)), || {
            let fwd = cached(&self.caches.sharded, (tp, sp, cp), || {
                self.per_device_forward(tp, sp, cp)
            });
            let fwd = fwd.as_ref().as_ref().map_err(Clone::clone)?;
            let states = self.states();
            let layout = ExpertLayout { tp, ep, etp };
            let laid;
            let fwd = if self.layout.experts > 0 && !layout.is_identity() {
                laid = self.passes.run(&ExpertParallel(layout), fwd)?;
                &laid
            } else {
                fwd
            };
            let mut fwd = self
                .passes
                .run(&MixedPrecision(states.compute, states.logits), fwd)?;
            if let Some(recipe) = states.fp8 {
                fwd = self.passes.run(&Fp8Linears(recipe), &fwd)?;
            }
            let opts = TrainOptions {
                grad_dtype: states.grad,
                main_grad_dtype: states.main_grad,
                main_grad_transient: states.main_grad_transient,
                master_dtype: states.master,
                fp8: states.fp8,
                ..TrainOptions::default()
            };
            Ok(self.passes.run(&Autodiff(opts), &fwd)?)
        })
    }

    fn size_error(&self) -> CompileError {
        CompileError::SizeOverflow { seq: self.seq }
    }

    /// Profiles of the undistributed training graph at micro-batch `b`, on a device
    /// of context-parallel degree `cp` (the same program at `s / cp` tokens, its
    /// attention ops over the whole sequence's keys: [`Groups::cp`]).
    fn base(
        &self,
        tp: u32,
        sp: bool,
        rc: Recomputation,
        b: u32,
        cp: u32,
        x: Xk,
    ) -> Arc<Result<BlockMap, CompileError>> {
        cached(&self.caches.base, (tp, sp, rc, b, cp, x), || {
            let g = self.graph(tp, sp, cp, rc, x);
            let g = g.as_ref().as_ref().map_err(Clone::clone)?;
            let env = self.env(b, cp);
            let none = BTreeSet::new();
            let groups = Groups {
                dp_ops: &none,
                tp: Group {
                    size: tp,
                    per_node: tp,
                },
                dp: Group::SINGLE,
                cp: self.cp_group(tp, cp),
                cp_method: self.engine.cp_method(),
                tp_overlap: self.tp_overlap(tp, sp),
                ep: self.ep_group(x),
                edp: Group::SINGLE,
                edp_ops: &none,
                imbalance: self.moe_imbalance,
                gather_bucket: None,
            };
            // The graph is profiled at every micro-batch and context-parallel degree:
            // what does not depend on them is read off it once.
            let prep = cached(&self.caches.prepared, (tp, sp, cp, rc, x), || {
                ProfilePrep::new(&g.graph, &none, &none, &g.clones)
            });
            prep.profile(&g.graph, env, &self.cost, &groups)
                .ok_or_else(|| self.size_error())
        })
    }

    /// What distribution changes per block (see [`Compiler::profiles`]).
    fn distribution(&self, c: &Config) -> Arc<Result<BlockMap, CompileError>> {
        let x = self.xk(c);
        let key = (c.tp, c.zero, c.shards_low_prec(), c.dp, c.cp, x);
        cached(&self.caches.dist, key, || {
            let g = self.graph(c.tp, false, c.cp, Recomputation::NONE, x);
            let g = g.as_ref().as_ref().map_err(Clone::clone)?;
            let d = self.passes.run(
                &Distribute(Compiler::grad_config(c), self.states().params_in_master),
                &g.graph,
            )?;
            let env = self.env(1, c.cp);
            let (tp, dp) = self.groups(c);
            let groups = Groups {
                dp_ops: &d.dp_ops,
                tp,
                dp,
                cp: self.cp_group(c.tp, c.cp),
                cp_method: self.engine.cp_method(),
                tp_overlap: None,
                ep: self.ep_group(x),
                edp: self.edp_group(c),
                edp_ops: &d.edp_ops,
                imbalance: self.moe_imbalance,
                gather_bucket: self.engine.zero3_gather_bucket(),
            };
            let mut with = profile(&d.graph, env, &self.cost, &groups, &BTreeSet::new())
                .ok_or_else(|| self.size_error())?;
            let without = self.base(c.tp, false, Recomputation::NONE, 1, c.cp, x);
            let without = without.as_ref().as_ref().map_err(Clone::clone)?;
            for (b, p) in with.iter_mut() {
                let base = without.get(b).cloned().unwrap_or_default();
                p.fwd_extra = p.fwd_extra.saturating_sub(base.fwd_extra);
                p.bwd_extra = p.bwd_extra.saturating_sub(base.bwd_extra);
                // The kernels distribution adds beside its collectives (the cast of a
                // shard before its gather, FSDP2's copy-out after it, a gradient's
                // cast before its reduction): their time at one sequence, which they
                // do not depend on (they touch parameters and gradients only).
                p.fwd_s = (p.fwd_s - base.fwd_s).max(0.0);
                p.bwd_s = (p.bwd_s - base.bwd_s).max(0.0);
                p.fwd_kernels = p.fwd_kernels.saturating_sub(base.fwd_kernels);
                p.bwd_kernels = p.bwd_kernels.saturating_sub(base.bwd_kernels);
            }
            Ok(with)
        })
    }

    fn compute_profiles(&self, c: &Config) -> Result<Blocks, CompileError> {
        let base = self.base(
            c.tp,
            c.sp,
            c.recomputation(),
            c.micro_batch,
            c.cp,
            self.xk(c),
        );
        let mut by_block = base.as_ref().as_ref().map_err(Clone::clone)?.clone();
        if self.reduces(c) {
            let dist = self.distribution(c);
            let dist = dist.as_ref().as_ref().map_err(Clone::clone)?;
            for (b, p) in by_block.iter_mut() {
                let d = dist.get(b).cloned().unwrap_or_default();
                p.states = d.states;
                p.borrowed = d.borrowed;
                p.dp_fwd_s = d.dp_fwd_s;
                p.dp_bwd_s = d.dp_bwd_s;
                p.dp_reduce_s = d.dp_reduce_s;
                p.dp_grad_s = d.dp_grad_s;
                p.dp_param_s = d.dp_param_s;
                p.opt_s = d.opt_s;
                p.opt_extra = d.opt_extra;
                p.fwd_extra += d.fwd_extra;
                p.bwd_extra += d.bwd_extra;
                p.fwd_s += d.fwd_s;
                p.bwd_s += d.bwd_s;
                p.fwd_kernels += d.fwd_kernels;
                p.bwd_kernels += d.bwd_kernels;
            }
        }
        Ok(match &self.source {
            ModelSource::Config(cfg) => {
                let get = |b: Block| by_block.get(&b).cloned().unwrap_or_default();
                // Embedding, layers 0..L-1 as runs of one template each (one run for a
                // uniform model: layers 0..L-2, then the last layer), the head.
                let mut out = Blocks::default();
                out.push(get(Block::Embed), 1);
                debug_assert_eq!(
                    self.template_runs.iter().map(|r| r.1).sum::<u32>(),
                    cfg.layers
                );
                for &(start, len, t) in &self.template_runs {
                    let mut p = get(Block::Layer(t as u32));
                    p.block = Some(Block::Layer(start));
                    out.push(p, len as usize);
                }
                out.push(get(Block::Head), 1);
                out
            }
            ModelSource::Graph(_) => Blocks::from_vec(by_block.into_values().collect()),
        })
    }

    /// Compiles and simulates one configuration, recording its events and memory
    /// timeline.
    ///
    /// # Errors
    ///
    /// As [`Compiler::lower_bound`].
    pub fn evaluate(&self, c: &Config) -> Result<Evaluation, CompileError> {
        self.evaluate_with(c, true)
    }

    /// The pipeline cut of `c` and a lower bound on its step time: the busiest
    /// pipeline device's forward and backward work over all micro-batches plus its
    /// optimizer step, with no bubble, no waiting and every data-parallel transfer
    /// hidden. Cheaper than [`Compiler::evaluate`] (no simulation); pass the cut on to
    /// [`Compiler::evaluate_cut`].
    ///
    /// # Errors
    ///
    /// Any [`Compiler::check`] error; [`CompileError::SelectiveRecomputesNothing`];
    /// [`CompileError::RecomputeLayersTooMany`]; a failure to shard, derive the
    /// training graph, recompute or distribute ([`CompileError::Shard`],
    /// [`CompileError::Train`], [`CompileError::Pass`]); [`CompileError::SizeOverflow`]
    /// when a size does not fit at this micro-batch and sequence; [`CompileError::NoCut`].
    pub fn lower_bound(&self, c: &Config) -> Result<(f64, Vec<StageSpan>), CompileError> {
        self.check(c)?;
        self.recomputes_something(c)?;
        let profiles = self.profiles(c);
        let set = profiles.as_ref().as_ref().map_err(Clone::clone)?;
        let stages = self.cut(set, c)?;
        if let Some(k) = c.recompute_layers {
            let layers = |span: &StageSpan| {
                (span.first..=span.last)
                    .filter(|&i| matches!(set.blocks.block(i), Some(Block::Layer(_))))
                    .count()
            };
            // The stage holding the most layers: recomputing more than it holds means
            // nothing (and Megatron-LM's block method would recompute them all).
            let (stage, most) =
                stages
                    .iter()
                    .map(layers)
                    .enumerate()
                    .fold(
                        (0, 0),
                        |best, (i, n)| if n > best.1 { (i, n) } else { best },
                    );
            if k as usize > most {
                return Err(CompileError::RecomputeLayersTooMany {
                    k,
                    layers: u32::try_from(most).unwrap_or(u32::MAX),
                    stage,
                });
            }
        }
        let composed = self.compose(c, &set.blocks, &stages)?;
        let blocks = composed.as_ref();
        let pp = c.pp.max(1) as usize;
        let m = f64::from(c.num_micro_batches);
        let mut busy = vec![0.0f64; pp];
        for (i, span) in stages.iter().enumerate() {
            for b in blocks.refs(span.first, span.last) {
                busy[i % pp] += m * (b.fwd_s + b.bwd_s) + b.opt_s;
            }
        }
        Ok((busy.into_iter().fold(0.0, f64::max), stages))
    }

    /// Selective recomputation of `c` that recomputes nothing is refused (it would be
    /// `--recompute none` under another name).
    fn recomputes_something(&self, c: &Config) -> Result<(), CompileError> {
        if c.recompute == Recompute::Selective {
            let g = self.graph(c.tp, c.sp, c.cp, c.recomputation(), self.xk(c));
            if let Ok(g) = g.as_ref() {
                if let Some(idle) = g.idle {
                    return Err(CompileError::ModulesRecomputeNothing(idle));
                }
                if g.clones.is_empty() {
                    return Err(CompileError::SelectiveRecomputesNothing);
                }
            }
        }
        Ok(())
    }

    /// Compiles and simulates one configuration; `detail` records every event and the
    /// memory timeline (needed for traces and plots, not for ranking).
    ///
    /// # Errors
    ///
    /// As [`Compiler::lower_bound`].
    pub fn evaluate_with(&self, c: &Config, detail: bool) -> Result<Evaluation, CompileError> {
        let (_, stages) = self.lower_bound(c)?;
        self.evaluate_cut(c, stages, detail)
    }

    /// [`Compiler::evaluate_with`] on the cut [`Compiler::lower_bound`] returned (or
    /// another cut of `c`'s `pp · v` virtual stages covering every block in order).
    ///
    /// # Errors
    ///
    /// As [`Compiler::lower_bound`] ([`Compiler::check`] first; profiles are cached).
    pub fn evaluate_cut(
        &self,
        c: &Config,
        stages: Vec<StageSpan>,
        detail: bool,
    ) -> Result<Evaluation, CompileError> {
        self.check(c)?;
        let profiles = self.profiles(c);
        let set = profiles.as_ref().as_ref().map_err(Clone::clone)?;
        let composed = self.compose(c, &set.blocks, &stages)?;
        let blocks = composed.as_ref();
        let stage_devices = u64::from(c.tp) * u64::from(c.cp) * u64::from(c.dp);
        let pp_cross_node = stage_devices >= u64::from(self.cluster.devices_per_node);
        let (tp, dp) = self.groups(c);
        let sim = simulate(
            blocks,
            &SimInput {
                config: c,
                stages: &stages,
                cost: &self.cost,
                pp_cross_node,
                detail,
                overlap: self.engine.overlap_with(c.grad_ranks(), self.comm_overlap),
                links: SharedLinks::of(tp, dp, pp_cross_node && c.pp > 1),
            },
        );
        let mut sim = sim;
        for (d, m) in sim.memory.iter_mut().enumerate() {
            let (buffers, runtime) = self.overhead_bytes(c, m.peak_bytes);
            let extra = buffers.saturating_add(runtime);
            m.buffers = buffers;
            m.runtime = runtime;
            m.peak_bytes = m.peak_bytes.saturating_add(extra);
            if let Some(t) = sim.timeline.get_mut(d) {
                for s in t.iter_mut() {
                    s.bytes = s.bytes.saturating_add(extra);
                }
            }
        }
        let peak_bytes = sim.memory.iter().map(|m| m.peak_bytes).max().unwrap_or(0);
        let tokens = self.global_batch as f64 * self.seq as f64;
        let step = sim.step_time_s;
        // Ranks of a stage are symmetric and every stage has dp · tp of them, so the
        // executed FLOPs per device are the mean over the pipeline devices.
        let pipeline = sim.flops_per_device.len().max(1) as f64;
        let executed = sim
            .flops_per_device
            .iter()
            .zip(&sim.recompute_flops_per_device)
            .map(|(&f, &r)| f + r)
            .sum::<f64>()
            / pipeline;
        let model = self.model_flops_per_step() / self.cluster.devices().max(1) as f64;
        // A positive, finite step (bounded cluster numbers and sizes make it so); the
        // guard keeps NaN and infinity out of reports should a graph have no work.
        let per_s = |x: f64| if step > 0.0 { x / step } else { 0.0 };
        let peak = self.cluster.device.peak_bf16_flops;
        Ok(Evaluation {
            config: *c,
            step_time_s: step,
            tokens_per_s: per_s(tokens),
            tflops_per_device: per_s(model) / 1e12,
            mfu: per_s(model) / peak,
            hfu: per_s(executed) / peak,
            budget_bytes: self.budget_bytes,
            peak_bytes,
            fits: peak_bytes <= self.budget_bytes,
            stages,
            blocks: blocks.len(),
            sim,
        })
    }

    /// With `recompute_layers = Some(k)`, the blocks of each stage with recomputation on
    /// its first `k` layers only (the rest from the profile without recomputation), as
    /// Megatron-LM's `--recompute-method block` does per model chunk. The cut is chosen
    /// on these composed stages ([`Compiler::chunk_summary`]).
    fn compose<'b>(
        &self,
        c: &Config,
        blocks: &'b Blocks,
        stages: &[StageSpan],
    ) -> Result<std::borrow::Cow<'b, Blocks>, CompileError> {
        let Some(k) = c
            .recompute_layers
            .filter(|_| c.recompute != Recompute::None)
        else {
            return Ok(std::borrow::Cow::Borrowed(blocks));
        };
        let plain = Config {
            recompute: Recompute::None,
            recompute_layers: None,
            ..*c
        };
        let plain = self.profiles(&plain);
        let plain = &plain.as_ref().as_ref().map_err(Clone::clone)?.blocks;
        // Blocks are in model order (embedding, layers, head), so a stage's layers are
        // contiguous: the first `k` of them from `blocks`, the rest from `plain`.
        let mut out = Blocks::default();
        let mut next = 0;
        for span in stages {
            if span.first > next {
                out.extend_from(blocks, next, span.first - 1);
            }
            let mut layers = 0u32;
            let mut i = span.first;
            while i <= span.last {
                let is_layer = matches!(blocks.block(i), Some(Block::Layer(_)));
                if is_layer && layers >= k {
                    // The remaining layers of the stage (a contiguous stretch).
                    let mut j = i;
                    while j < span.last && matches!(blocks.block(j + 1), Some(Block::Layer(_))) {
                        j += 1;
                    }
                    out.extend_from(plain, i, j);
                    i = j + 1;
                    continue;
                }
                if is_layer {
                    // Up to `k` recomputed layers in one stretch.
                    let mut j = i;
                    let mut n = 1;
                    while j < span.last
                        && layers + n < k
                        && matches!(blocks.block(j + 1), Some(Block::Layer(_)))
                    {
                        j += 1;
                        n += 1;
                    }
                    out.extend_from(blocks, i, j);
                    layers += n;
                    i = j + 1;
                    continue;
                }
                out.extend_from(blocks, i, i);
                i += 1;
            }
            next = span.last + 1;
        }
        if next < blocks.len() {
            out.extend_from(blocks, next, blocks.len() - 1);
        }
        Ok(std::borrow::Cow::Owned(out))
    }

    /// The model this compiler plans for.
    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// The forward graph compiled per configuration: the whole graph of an IR model,
    /// or the two-layer template (`embed`, `layer.0`, `layer.1`, `head`) of a
    /// configuration, whose `layer.0` stands for every layer but the last.
    pub fn forward(&self) -> &Graph {
        &self.forward
    }

    /// The per-device program of configuration `c`, op by op (for the chosen plan, not
    /// the search): the tensor-parallel sharding with every tensor's layout, and the
    /// training graph one device runs after recomputation and distribution, with its
    /// data-parallel collectives marked.
    ///
    /// # Errors
    ///
    /// As [`Compiler::evaluate`]: the configuration is invalid or a pass fails.
    pub fn device_program(&self, c: &Config) -> Result<DeviceProgram, CompileError> {
        self.check(c)?;
        let forward = self.forward_at(c.tp)?.into_owned();
        let sharded = if c.tp > 1 {
            Some(
                self.passes
                    .run(&self.tensor_parallel(c.tp, c.sp, c.cp), &forward)?,
            )
        } else {
            None
        };
        let g = self.graph(c.tp, c.sp, c.cp, c.recomputation(), self.xk(c));
        let g = g.as_ref().as_ref().map_err(Clone::clone)?;
        let d = self.passes.run(
            &Distribute(Compiler::grad_config(c), self.states().params_in_master),
            &g.graph,
        )?;
        Ok(DeviceProgram {
            forward,
            sharded,
            graph: d.graph,
            dp_ops: d.dp_ops,
            recomputed: g.clones.clone(),
        })
    }

    /// The cut of `c`: among the cuts the engine can express ([`Engine::cuts`]), the
    /// fastest whose exact peak fits the budget, else the one with the smallest peak
    /// ([`pipeline::select`], monotone in the budget). Peaks are those the simulation
    /// reports, with `recompute_layers` applied per stage as [`Compiler::evaluate`]
    /// composes it.
    fn cut(&self, set: &ProfileSet, c: &Config) -> Result<Vec<StageSpan>, CompileError> {
        let blocks = &set.blocks;
        let parts = c.pp as usize * c.schedule.chunks() as usize;
        let no_cut = CompileError::NoCut {
            blocks: blocks.len(),
            stages: parts,
        };
        // The engine's cuts depend on the stages alone (the layout is the compiler's).
        let family = cached(&self.caches.cuts, (c.pp, c.schedule.chunks()), || {
            self.engine.cuts(c, &self.layout)
        });
        if family.len() == 1 {
            return family.first().cloned().ok_or(no_cut);
        }
        let plain = match c.recompute_layers {
            Some(k) if c.recompute != Recompute::None => {
                let plain = Config {
                    recompute: Recompute::None,
                    recompute_layers: None,
                    ..*c
                };
                Some((k, self.profiles(&plain)))
            }
            _ => None,
        };
        let plain = match &plain {
            Some((k, p)) => Some((*k, &p.as_ref().as_ref().map_err(Clone::clone)?.blocks)),
            None => None,
        };
        let inflight = cached(
            &self.caches.inflight,
            (c.schedule, c.pp, c.num_micro_batches),
            || InFlight::new(c.schedule, c.pp, c.num_micro_batches),
        );
        let mut chunks: Vec<ChunkSummary> = Vec::with_capacity(parts);
        // A stage inside one run of equal blocks (most middle stages of a pipeline) is
        // summarized by that run's profile pushed `len` times, whatever its position:
        // such summaries are computed once per (run, len) here.
        let mut inner: Vec<(usize, usize, ChunkSummary)> = Vec::new();
        let scores: Vec<pipeline::CutScore> = family
            .iter()
            .map(|spans| {
                chunks.clear();
                for s in spans {
                    let within = plain
                        .is_none()
                        .then(|| blocks.within_run(s.first, s.last))
                        .flatten();
                    let x = match within {
                        Some((run, len)) => {
                            match inner.iter().find(|x| x.0 == run && x.1 == len) {
                                Some(x) => x.2,
                                None => {
                                    let x = self.chunk_summary(blocks, None, *s);
                                    // A few lengths per run in practice; bounded so
                                    // that a graph of many one-block runs stays linear.
                                    if inner.len() < INNER_SUMMARIES {
                                        inner.push((run, len, x));
                                    }
                                    x
                                }
                            }
                        }
                        None => self.chunk_summary(blocks, plain, *s),
                    };
                    chunks.push(x);
                }
                pipeline::CutScore {
                    time_s: chunks.iter().map(|x| x.time_s).fold(0.0, f64::max),
                    peak_bytes: max_device_peak(&chunks, c.pp, &inflight),
                }
            })
            .collect();
        pipeline::select(&scores, self.tensor_budget(c))
            .and_then(|best| family.get(best).cloned())
            .ok_or(no_cut)
    }

    /// The summary of one stage as [`Compiler::compose`] builds it: with `plain =
    /// Some((k, plain))`, the stage's layers after its first `k` come from `plain`.
    fn chunk_summary(
        &self,
        blocks: &Blocks,
        plain: Option<(u32, &Blocks)>,
        span: StageSpan,
    ) -> ChunkSummary {
        let mut sum = ChunkSummary::default();
        let Some((k, plain)) = plain else {
            sum.push_range(blocks, span.first, span.last);
            return sum;
        };
        let layers = &self.layout.layers;
        let from = layers.partition_point(|&b| b < span.first);
        let to = layers.partition_point(|&b| b <= span.last);
        let Some(&switch) = layers[from..to].get(k as usize) else {
            sum.push_range(blocks, span.first, span.last);
            return sum;
        };
        sum.push_range(blocks, span.first, switch - 1);
        // The remaining layers from `plain`, the other blocks between them from
        // `blocks`, in stretches of consecutive layers.
        let rest = &layers[from + k as usize..to];
        let mut at = switch;
        let mut i = 0;
        while i < rest.len() {
            let mut j = i;
            while j + 1 < rest.len() && rest[j + 1] == rest[j] + 1 {
                j += 1;
            }
            if rest[i] > at {
                sum.push_range(blocks, at, rest[i] - 1);
            }
            sum.push_range(plain, rest[i], rest[j]);
            at = rest[j] + 1;
            i = j + 1;
        }
        sum.push_range(blocks, at, span.last);
        sum
    }
}

/// The rows of a graph's learned position table: the table an `embedding` looks up
/// with the `input` named `positions` (the IR's name for the position indices,
/// `ir-spec/README.md`; the model builder names it so too), when its row count is
/// literal. The smallest if several.
pub fn learned_positions(g: &Graph) -> Option<u64> {
    g.ops()
        .filter(|&o| matches!(g.op(o), Op::Embedding))
        .filter_map(|o| {
            let inputs = &g.node(o).inputs;
            let (&table, &indices) = (inputs.first()?, inputs.get(1)?);
            let reads_positions = matches!(
                g.op(g.tensor(indices).producer),
                Op::Input { name } if name == "positions"
            );
            reads_positions.then(|| g.ty(table).shape.dims().first()?.as_lit())?
        })
        .min()
}

/// The layers of `cfg` as runs of consecutive layers with one template each: (first
/// layer, layers, template index of [`ModelConfig::template_of`]).
fn template_runs(cfg: &ModelConfig) -> Vec<(u32, u32, usize)> {
    let mut runs: Vec<(u32, u32, usize)> = Vec::new();
    for (i, t) in cfg.template_indices().into_iter().enumerate() {
        match runs.last_mut() {
            Some(r) if r.2 == t => r.1 += 1,
            _ => runs.push((i as u32, 1, t)),
        }
    }
    runs
}

/// PaLM's model FLOPs per token of `cfg` at context `seq`: `6·N + 12·L·H·Q·T`
/// ([`Compiler::model_flops_per_step`] gives the definition and its sources). For a
/// mixture of experts `N` is the active parameters (a token meets `k` of the `E`
/// routed experts; [`ModelConfig::active_param_count`]), the count the MoE papers'
/// MFU uses (DeepSeek-V3 technical report; Mixtral's "active parameters").
pub fn model_flops_per_token(cfg: &ModelConfig, seq: u64) -> f64 {
    let h = cfg.hidden as f64;
    let mut n = cfg.active_param_count() as f64;
    if !cfg.tied_embeddings {
        // The input table is a lookup; the untied output projection stays in `N`.
        n -= cfg.vocab as f64 * h;
    }
    if let Position::Learned { max_positions } = cfg.position {
        n -= max_positions as f64 * h;
    }
    // A sliding-window layer's `T × T` becomes the keys its band counts, per query
    // (the attention ops' own count, `apar::ir::attention_pairs`).
    let keys_per_query = |i: u32| -> f64 {
        match cfg.layer_window(i) {
            Some(w) if seq > 0 && w < seq => {
                crate::ir::attention_pairs(seq, seq, true, Some(w)).unwrap_or(u64::MAX) as f64
                    / seq as f64
            }
            _ => seq as f64,
        }
    };
    let context: f64 = if cfg.sliding_window.is_some() {
        (0..cfg.layers).map(keys_per_query).sum()
    } else {
        f64::from(cfg.layers) * seq as f64
    };
    // Q·Kᵀ over the query/key head dim and P·V over the value head dim, forward and
    // backward (6 FLOPs per multiply-add pair and token): `12·a·d` when they are equal;
    // MLA's differ (DeepSeek-V2: 192 and 128).
    let (d_qk, d_v) = cfg.attention_head_dims();
    let attention = 6.0 * cfg.heads as f64 * (d_qk + d_v) as f64 * context;
    6.0 * n + attention
}

/// NCCL communicators a device of `c` is a member of: one per parallel dimension it
/// communicates over (NCCL connects a communicator's buffers at its first collective,
/// so groups a configuration never uses cost nothing).
fn communicators(c: &Config) -> u32 {
    u32::from(c.tp > 1)
        + u32::from(c.grad_ranks() > 1)
        + u32::from(c.pp > 1)
        + u32::from(c.cp > 1)
        + u32::from(c.ep > 1)
        + u32::from(c.ep > 1 && c.expert_dp() > 1)
}

/// What one device of a configuration runs, op by op ([`Compiler::device_program`]).
#[derive(Clone, Debug)]
pub struct DeviceProgram {
    /// The forward graph the engine builds at the configuration's `tp`, before
    /// sharding: [`Compiler::forward`] but for the engine's padded vocabulary
    /// ([`Engine::padded_vocab`]).
    pub forward: Graph,
    /// The tensor-parallel sharding of `forward` (every tensor's logical type and
    /// layout); `None` when `tp = 1` (every tensor of `forward` whole on every device).
    pub sharded: Option<crate::shard::ShardedModel>,
    /// The training graph one device runs: forward, backward (with recomputation
    /// clones) and optimizer, with ZeRO's collectives.
    pub graph: Graph,
    /// Collectives of `graph` over the data-parallel group (the others run on the
    /// tensor-parallel group).
    pub dp_ops: BTreeSet<crate::ir::OpId>,
    /// Backward-phase clones of forward ops (recomputation).
    pub recomputed: BTreeSet<crate::ir::OpId>,
}
