//! Tensor and sequence parallelism discovered by e-graph rewrites.
//!
//! Tensor splits are not written per model: [`shard_model`] cuts a forward graph into
//! its blocks (embedding, layers, head), puts each distinct block *template* into an
//! e-graph ([`egg`]) whose language is the IR's ops plus sharding and collective nodes
//! ([`lang`]), grows it with a small set of local, named rules ([`rules`]), and
//! extracts the cheapest per-device program under a cost model ([`ShardCost`]). The
//! programs are stitched into one per-device forward [`Graph`] — per-device shapes
//! (`[b, s/8, h]`), the collectives as ops — that the verifier accepts and from which
//! [`train::training_graph`](crate::train::training_graph) derives the training step
//! (collectives differentiate to their conjugates).
//!
//! What the rules find, from nothing but their local laws: Megatron-LM's column → row
//! split of every MLP and attention block (one all-reduce each in forward), heads split
//! for attention (grouped-query attention included: with fewer kv heads than devices
//! the K/V projections stay replicated and each device takes its group's head),
//! SwiGLU's gate and up projections split by columns and down by rows,
//! vocabulary-parallel embedding and cross-entropy (the logits are never gathered),
//! one all-reduce for both branches of a parallel-residual block, and with `sp` the
//! sequence-parallel form (`all_reduce = all_gather ∘ reduce_scatter`: layer norms,
//! dropout and residuals on sequence shards). Any block nobody wrote a rule for still
//! gets a valid program: at worst the replicated one.
//!
//! # Semantics
//!
//! A term denotes one tensor per device ([`layout`]): replicated, split along an axis,
//! or partial (the devices' tensors sum to the value). Rules only equate terms under
//! which every device holds the same tensor, and every term a rule builds is checked
//! against the per-op layout table ([`layout::infer`]). The extracted program is
//! therefore equal to the unsharded block on every input; the reference interpreter
//! (`interp`, built with the `testing` feature) checks this on random inputs, gradients
//! included.
//!
//! # Search
//!
//! One run per distinct block template × tp degree × sp, cached ([`Sharder`]). Runs
//! are bounded by [`ShardLimits`] (iterations and e-nodes, no wall clock), report how
//! they stopped ([`StopReport`]) and are deterministic: same input, same program, same
//! report. Extraction uses tree cost with deterministic tie-breaks and re-scores the
//! result as a DAG.
//!
//! # Writing a rule
//!
//! See the [`rules`] module: a rule is a law `lhs = rhs` in one line, a name, the node
//! kind it matches and a body that builds the right-hand side through checked
//! constructors, so shape guards come from the layout table.

pub mod cost;
#[cfg(feature = "testing")]
pub mod interp;
pub mod lang;
pub mod layout;
mod model;
pub mod rules;
mod run;
mod template;

pub use cost::{Cost, ModelCost, ShardCost};
pub use layout::{Layout, Val};

use crate::ir::{Block, Env, Graph, GraphBuilder, Op, OpId, OpKind, Phase, TensorId, VerifyErrors};
use crate::train::{Stats, StatsError, TrainError, TrainOptions};
use serde::Serialize;
use std::collections::BTreeMap;
use thiserror::Error;

/// Default bound on rewrite iterations per run (a GPT-3 layer saturates in 11).
pub const DEFAULT_ITERATION_LIMIT: usize = 64;
/// Default bound on e-nodes per run (a GPT-3 layer with sp saturates at about 420).
pub const DEFAULT_NODE_LIMIT: usize = 50_000;
/// Default binding of `b` and `s` for pricing: one sequence of 2,048 tokens.
pub const DEFAULT_COST_ENV: Env = Env {
    batch: 1,
    seq: 2048,
};

/// Search budget of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ShardLimits {
    /// Rewrite iterations.
    pub iterations: usize,
    /// E-nodes.
    pub nodes: usize,
}

impl Default for ShardLimits {
    fn default() -> ShardLimits {
        ShardLimits {
            iterations: DEFAULT_ITERATION_LIMIT,
            nodes: DEFAULT_NODE_LIMIT,
        }
    }
}

/// What to shard for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ShardOptions {
    /// Tensor-parallel degree (devices per group); 1 gives the graph back unchanged.
    pub tp: u32,
    /// Sequence parallelism: block boundaries split along the sequence (ignored at tp 1).
    pub sp: bool,
    /// Search budget.
    pub limits: ShardLimits,
    /// Binding of `b` and `s` the cost model prices shapes at.
    pub env: Env,
}

impl ShardOptions {
    /// Degree `tp`, with or without sequence parallelism, default limits and pricing.
    pub fn new(tp: u32, sp: bool) -> ShardOptions {
        ShardOptions {
            tp,
            sp,
            limits: ShardLimits::default(),
            env: DEFAULT_COST_ENV,
        }
    }
}

/// Why a run stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Stop {
    /// No rule added anything: every equivalent program the rules know was considered.
    Saturated,
    /// The iteration limit was reached.
    IterationLimit {
        /// Iterations run.
        iterations: usize,
    },
    /// The e-node limit was reached.
    NodeLimit {
        /// E-nodes at the stop.
        enodes: usize,
    },
    /// Anything else egg reports.
    Other {
        /// Its message.
        why: String,
    },
}

/// How one sharding run went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StopReport {
    /// Why it stopped.
    pub stop: Stop,
    /// Rewrite iterations.
    pub iterations: usize,
    /// E-nodes at the end.
    pub enodes: usize,
    /// E-classes at the end.
    pub eclasses: usize,
    /// Cost of the extracted per-device block (DAG), picoseconds.
    pub cost_ps: u64,
    /// Cost of the replicated block on one device, picoseconds.
    pub replicated_cost_ps: u64,
}

/// One distinct template that was sharded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TemplateRun {
    /// The first block with this template.
    pub first_block: Block,
    /// The run's report.
    pub report: StopReport,
}

/// Which template a block used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BlockRun {
    /// The block.
    pub block: Block,
    /// Index into [`ShardedModel::templates`].
    pub template: usize,
    /// Whether the program came from the cache.
    pub cached: bool,
}

/// A sharded model: the per-device forward graph and what the sharding decided.
#[derive(Clone, Debug)]
pub struct ShardedModel {
    /// The forward graph one device runs (every device runs the same program).
    pub graph: Graph,
    /// Tensor-parallel degree.
    pub tp: u32,
    /// Whether sequence parallelism is on.
    pub sp: bool,
    /// Per tensor of `graph`: its logical type and layout.
    pub layouts: Vec<Val>,
    /// Per op of `graph`: the op of the unsharded graph it implements (none for
    /// collectives and ops the sharding introduced).
    pub origins: Vec<Option<OpId>>,
    /// Per block, in order: its template run.
    pub blocks: Vec<BlockRun>,
    /// The distinct template runs (every run of the [`Sharder`] so far).
    pub templates: Vec<TemplateRun>,
}

/// A problem sharding a graph.
#[derive(Debug, Error)]
pub enum ShardError {
    /// `tp` is zero.
    #[error("the tensor-parallel degree must be at least 1")]
    ZeroTp,
    /// The input graph does not verify.
    #[error("the graph is not valid: {0}")]
    Invalid(VerifyErrors),
    /// The input graph has backward or optimizer ops.
    #[error("{op} is not a forward op: shard the forward graph, then derive its training graph")]
    NotForward {
        /// The first such op.
        op: OpId,
    },
    /// A block reads a tensor of a later block.
    #[error("block {block} reads {tensor}, which no earlier block defines")]
    Order {
        /// The reading block.
        block: Block,
        /// The tensor.
        tensor: TensorId,
    },
    /// The graph has no such block.
    #[error("the graph has no block {0}")]
    NoBlock(Block),
    /// The training graph of the sharded model could not be derived.
    #[error("training graph of the sharded model: {0}")]
    Train(#[from] TrainError),
    /// Per-device stats could not be computed.
    #[error("per-device stats: {0}")]
    Stats(#[from] StatsError),
    /// Every per-device program of the block is priced [`cost::Cost::INFEASIBLE`]: a
    /// time or size overflows (a sequence or batch far too large) or a dimension does
    /// not divide.
    #[error("no per-device program of the block can be priced: its sizes overflow (the sequence or micro-batch is too large) or a dimension does not divide")]
    Unpriceable,
    /// An internal inconsistency (a bug in a rule or the lowering).
    #[error("internal sharding error: {why}")]
    Internal {
        /// What went wrong.
        why: String,
    },
}

/// The binding shapes are priced at: `opts.env` with the sequence length rounded up to
/// a multiple of `tp` (so that sequence shards are whole whatever the degree).
fn pricing_env(opts: &ShardOptions) -> Env {
    let tp = u64::from(opts.tp.max(1));
    Env {
        batch: opts.env.batch,
        seq: opts.env.seq.div_ceil(tp).saturating_mul(tp),
    }
}

/// Shards models with one cost model and options, caching template runs across calls.
pub struct Sharder<'c> {
    opts: ShardOptions,
    cost: Pricing<'c>,
    cache: model::Cache,
}

/// The cost a [`Sharder`] prices with.
enum Pricing<'c> {
    /// The calibrated cost model on [`cost::DEFAULT_CLUSTER`].
    Default(ModelCost<'static>),
    /// A caller's.
    Given(&'c dyn ShardCost),
}

impl Sharder<'static> {
    /// A sharder pricing with the calibrated cost model on [`cost::DEFAULT_CLUSTER`]
    /// (tensor-parallel group inside one node).
    pub fn new(opts: ShardOptions) -> Sharder<'static> {
        Sharder {
            opts,
            cost: Pricing::Default(ModelCost::tensor_parallel(
                cost::default_cost_model(),
                opts.tp,
            )),
            cache: model::Cache::default(),
        }
    }
}

impl<'c> Sharder<'c> {
    /// A sharder pricing with `cost`.
    pub fn with_cost(opts: ShardOptions, cost: &'c dyn ShardCost) -> Sharder<'c> {
        Sharder {
            opts,
            cost: Pricing::Given(cost),
            cache: model::Cache::default(),
        }
    }

    /// The options.
    pub fn options(&self) -> &ShardOptions {
        &self.opts
    }

    /// Shards every block of a forward graph (see the module docs).
    ///
    /// # Errors
    /// [`ShardError::ZeroTp`] when the degree is zero, [`ShardError::Invalid`] when `fwd`
    /// does not verify, [`ShardError::NotForward`] when it has backward or optimizer ops,
    /// [`ShardError::Order`] when a block reads a tensor of a later block, and
    /// [`ShardError::Internal`] for a bug in a rule or the lowering.
    pub fn shard_model(&mut self, fwd: &Graph) -> Result<ShardedModel, ShardError> {
        let cost: &dyn ShardCost = match &self.cost {
            Pricing::Default(c) => c,
            Pricing::Given(c) => *c,
        };
        model::shard(fwd, &self.opts, cost, &mut self.cache)
    }
}

/// Shards every block of `fwd` with the default cost model (see [`Sharder::new`]).
///
/// # Errors
/// As [`Sharder::shard_model`].
pub fn shard_model(fwd: &Graph, opts: &ShardOptions) -> Result<ShardedModel, ShardError> {
    Sharder::new(*opts).shard_model(fwd)
}

/// One sharded block, standalone.
#[derive(Clone, Debug)]
pub struct ShardedBlock {
    /// The block's per-device ops; tensors of other blocks are `input`s named `in.N`.
    pub graph: Graph,
    /// The run that produced the block's template.
    pub report: StopReport,
}

/// Shards `fwd` and returns block `block` standalone with its run's report. (The whole
/// model is sharded so that parameters shared across blocks, such as tied embeddings,
/// get one layout.)
///
/// # Errors
/// As [`shard_model`], and [`ShardError::NoBlock`] when `fwd` has no block `block`.
pub fn shard_block(
    fwd: &Graph,
    block: Block,
    opts: &ShardOptions,
) -> Result<ShardedBlock, ShardError> {
    let m = shard_model(fwd, opts)?;
    let report = m.report(block).ok_or(ShardError::NoBlock(block))?.clone();
    Ok(ShardedBlock {
        graph: m.block_graph(block)?,
        report,
    })
}

/// Per-device figures of `fwd`'s training step at tensor-parallel degree `opts.tp`
/// (with sequence parallelism if `opts.sp`): what `apar stats --tp T [--sp]` reports.
///
/// # Errors
/// As [`shard_model`], and [`ShardError::Train`] or [`ShardError::Stats`] when the
/// training graph or its stats cannot be computed.
pub fn per_device_stats(
    fwd: &Graph,
    opts: &ShardOptions,
    train: &TrainOptions,
    env: Env,
) -> Result<Stats, ShardError> {
    shard_model(fwd, opts)?.stats(train, env)
}

impl ShardedModel {
    /// The run that sharded `block`'s template.
    pub fn report(&self, block: Block) -> Option<&StopReport> {
        let b = self.blocks.iter().find(|b| b.block == block)?;
        Some(&self.templates.get(b.template)?.report)
    }

    /// Block `block` of the per-device forward graph, standalone.
    ///
    /// # Errors
    /// As [`block_subgraph`].
    pub fn block_graph(&self, block: Block) -> Result<Graph, ShardError> {
        block_subgraph(&self.graph, block)
    }

    /// The per-device training graph (forward, backward with the conjugate collectives,
    /// optimizer).
    ///
    /// # Errors
    /// [`ShardError::Train`] when autodiff fails on the per-device graph.
    pub fn training_graph(&self, opts: &TrainOptions) -> Result<Graph, ShardError> {
        Ok(crate::train::training_graph(&self.graph, opts)?)
    }

    /// Block `block` of the per-device training graph, standalone.
    ///
    /// # Errors
    /// As [`training_graph`](Self::training_graph) and [`block_subgraph`].
    pub fn training_block(&self, block: Block, opts: &TrainOptions) -> Result<Graph, ShardError> {
        block_subgraph(&self.training_graph(opts)?, block)
    }

    /// Per-device stats of the training step.
    ///
    /// # Errors
    /// [`ShardError::Train`] when the training graph cannot be derived, and
    /// [`ShardError::Stats`] when a size overflows or is fractional at `env`.
    pub fn stats(&self, train: &TrainOptions, env: Env) -> Result<Stats, ShardError> {
        Ok(Stats::of_training_graph(&self.training_graph(train)?, env)?)
    }

    /// Collective ops of `block` in the per-device forward graph, by op name.
    pub fn collectives(&self, block: Block) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for id in self.graph.ops() {
            let node = self.graph.node(id);
            if node.block == block && is_collective(&node.op) {
                *counts.entry(node.op.name()).or_insert(0) += 1;
            }
        }
        counts
    }
}

/// The collectives [`ShardedModel::collectives`] lists: the op table's, and `tp_copy`
/// (identity forward, all-reduce backward).
fn is_collective(op: &Op) -> bool {
    op.is_collective() || op.kind() == OpKind::TpCopy
}

/// Block `block` of `g` as a graph of its own: its ops in order (all phases), with every
/// tensor of another block replaced by an `input` named `in.N` (`N` the tensor's number
/// in `g`) of the same type and role.
///
/// # Errors
/// [`ShardError::NoBlock`] when `g` has no op in `block`, and [`ShardError::Internal`]
/// when the standalone graph cannot be built.
pub fn block_subgraph(g: &Graph, block: Block) -> Result<Graph, ShardError> {
    let ops: Vec<OpId> = g.ops().filter(|&o| g.node(o).block == block).collect();
    if ops.is_empty() {
        return Err(ShardError::NoBlock(block));
    }
    let mut b = GraphBuilder::new(format!("{} {block}", g.name()));
    b.set_block(block);
    let mut map: BTreeMap<TensorId, TensorId> = BTreeMap::new();
    for &id in &ops {
        let node = g.node(id);
        for &t in &node.inputs {
            if map.contains_key(&t) {
                continue;
            }
            let tensor = g.tensor(t);
            b.set_phase(Phase::Fwd);
            let name = format!("in.{}", t.index());
            let new = b.source(Op::Input { name }, tensor.ty.clone(), tensor.role);
            map.insert(t, new);
        }
        b.set_phase(node.phase);
        let results = if node.op.is_source() {
            let r = node.results[0];
            vec![b.source(node.op.clone(), g.ty(r).clone(), g.tensor(r).role)]
        } else {
            let args: Vec<TensorId> = node.inputs.iter().map(|t| map[t]).collect();
            let role = g.tensor(node.results[0]).role;
            let rs = b
                .add_with_role(node.op.clone(), &args, role)
                .map_err(|e| ShardError::Internal { why: e.to_string() })?;
            for (&old, &new) in node.results.iter().zip(&rs) {
                b.set_role(new, g.tensor(old).role);
            }
            rs
        };
        for (&old, new) in node.results.iter().zip(results) {
            map.insert(old, new);
        }
    }
    Ok(b.finish())
}
