//! Training-graph derivation: reverse-mode autodiff by per-op derivative rules, mixed
//! precision and the AdamW step, with every tensor tagged by its [`Role`](crate::ir::Role).
//!
//! Given a forward graph whose parameters are in the compute dtype (bf16), the
//! training graph is:
//!
//! * **forward** — the forward ops unchanged; each parameter is read through its
//!   low-precision working copy (role `lowp`);
//! * **backward** — for each forward op in reverse, the op's derivative rule
//!   ([`OpInfo::saves`](crate::ir::OpInfo) lists the forward tensors the rule reads);
//!   gradients of tensors used several times are summed; each parameter's gradient is
//!   cast to [`TrainOptions::grad_dtype`] (role `grad`);
//! * **optimizer** — per parameter: the fp32 master copy (role `param`), the two Adam
//!   moments (role `opt`), one `adamw` op, and the cast that refreshes the working copy.
//!
//! This reproduces the model states of mixed-precision Adam as the ZeRO paper counts
//! them: `2Ψ` (bf16 params) + `2Ψ` (bf16 grads) + `12Ψ` (fp32 params, momentum,
//! variance) bytes for `Ψ` parameters.

mod autodiff;
pub mod memory;
pub mod precision;

use crate::ir::{DType, Graph, OpId, ShapeError};
use thiserror::Error;

pub use autodiff::{derive, derive_with_report, SavedReport};

/// Options of the training-graph derivation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainOptions {
    /// Dtype of parameter gradients (the gradient buffers).
    pub grad_dtype: DType,
    /// Dtype of the gradient the optimizer reads. When it differs from `grad_dtype`,
    /// the optimizer phase first copies each gradient into a persistent buffer of this
    /// dtype (role `grad`): Megatron-LM's fp32 main gradients of fp16 runs.
    pub main_grad_dtype: DType,
    /// Whether that copy lives only through the optimizer step (role `temporary`:
    /// DeepSpeed's fp32 partition gradient) rather than between steps (role `grad`).
    pub main_grad_transient: bool,
    /// Dtype of master parameters and optimizer moments.
    pub master_dtype: DType,
    /// Learning rate written into the `adamw` ops.
    pub lr: f64,
    /// Adam `beta1`.
    pub beta1: f64,
    /// Adam `beta2`.
    pub beta2: f64,
    /// Adam epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// The FP8 recipe of a forward graph rewritten by [`precision::apply_fp8`]: what the
    /// backward of an FP8 GEMM casts, saves and reads.
    pub fp8: Option<precision::Fp8Recipe>,
}

impl Default for TrainOptions {
    /// bf16 gradients (read as such by the optimizer), fp32 masters and moments; the AdamW hyper-parameters of
    /// Megatron-LM's GPT-3 recipe (lr 1.5e-4, betas 0.9/0.95, eps 1e-8, decay 0.1).
    fn default() -> TrainOptions {
        TrainOptions {
            grad_dtype: DType::Bf16,
            main_grad_dtype: DType::Bf16,
            main_grad_transient: false,
            master_dtype: DType::F32,
            lr: 1.5e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            fp8: None,
        }
    }
}

/// Why a training graph could not be derived.
#[derive(Debug, Error)]
pub enum TrainError {
    /// The forward graph reads an op that has no derivative rule on a gradient path.
    #[error("{op} ({name}): no derivative rule; it cannot appear on a path from a parameter to the loss")]
    NoRule {
        /// The op.
        op: OpId,
        /// Its name.
        name: &'static str,
    },
    /// The derivative rule exists but not for this configuration of the op.
    #[error("{op} ({name}): {why}")]
    Unsupported {
        /// The op.
        op: OpId,
        /// Its name.
        name: &'static str,
        /// What is not supported.
        why: String,
    },
    /// The graph has no scalar float result to differentiate.
    #[error(
        "the graph has no loss: expected exactly one scalar float result without uses, found {0}"
    )]
    NoLoss(usize),
    /// The graph is already a training graph.
    #[error("the graph already has backward or optimizer ops")]
    NotForward,
    /// A derived op failed shape inference (an internal inconsistency).
    #[error("derived op: {0}")]
    Shape(#[from] ShapeError),
}

/// Derives the training graph of a forward graph (see the module docs).
///
/// # Errors
/// As [`autodiff::derive_with_report`].
pub fn training_graph(fwd: &Graph, opts: &TrainOptions) -> Result<Graph, TrainError> {
    derive(fwd, opts)
}

/// Per-step figures of a model's training graph at one micro-batch (`apar stats`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Trainable parameters.
    pub params: u64,
    /// Transformer layers (distinct `layer.N` blocks).
    pub layers: u32,
    /// FLOPs of forward, backward and optimizer step for one micro-batch.
    pub flops_per_step: u64,
    /// Forward activations kept for backward by the largest layer, in bytes
    /// (no parallelism, no recomputation).
    pub activation_bytes_per_layer: u64,
    /// Model-state bytes by role.
    pub model_state_bytes: memory::ModelStateBytes,
}

/// Why stats could not be computed.
#[derive(Debug, Error)]
pub enum StatsError {
    /// The training graph could not be derived.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// A size does not fit in 64 bits, or a dimension is fractional at this binding.
    #[error("sizes overflow or are fractional at micro-batch {}, sequence {}", .0.batch, .0.seq)]
    Size(crate::ir::Env),
}

impl Stats {
    /// Computes the stats of a training graph under `env`.
    ///
    /// # Errors
    /// [`StatsError::Size`] when a size overflows 64 bits or a dimension is fractional at
    /// `env`.
    pub fn of_training_graph(g: &Graph, env: crate::ir::Env) -> Result<Stats, StatsError> {
        use crate::ir::Block;
        let size = || StatsError::Size(env);
        let saved = memory::saved_activation_bytes(g, env).ok_or_else(size)?;
        let layer_bytes = saved
            .iter()
            .filter(|(b, _)| matches!(b, Block::Layer(_)))
            .map(|(_, &v)| v);
        let layers: std::collections::BTreeSet<u32> = g
            .ops()
            .filter_map(|o| match g.node(o).block {
                Block::Layer(i) => Some(i),
                _ => None,
            })
            .collect();
        Ok(Stats {
            params: memory::param_count(g).ok_or_else(size)?,
            layers: u32::try_from(layers.len()).unwrap_or(u32::MAX),
            flops_per_step: g.total_flops(env).ok_or_else(size)?,
            activation_bytes_per_layer: layer_bytes.max().unwrap_or(0),
            model_state_bytes: memory::model_state_bytes(g, env).ok_or_else(size)?,
        })
    }
}
