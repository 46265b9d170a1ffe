//! Memory facts read off a training graph: buffers (tensors and the views that share
//! their storage), activations saved for backward, and model-state bytes by role.

use crate::ir::{Block, Env, Graph, Op, Phase, Role, TensorId};
use serde::Serialize;
use std::collections::BTreeMap;

/// The tensor whose storage `t` uses: `t` itself; for a view (reshape, transpose,
/// slice) the storage of the viewed tensor; for an in-place op (all-reduce, AdamW)
/// the storage of the input it overwrites.
pub fn buffer_root(g: &Graph, mut t: TensorId) -> TensorId {
    loop {
        let node = g.node(g.tensor(t).producer);
        let port = node.results.iter().position(|&r| r == t).unwrap_or(0);
        let src = match node.op {
            _ if node.op.is_view() => node.inputs.first(),
            Op::AllReduce { .. } => node.inputs.first(),
            // AdamW: (param, grad, m, v) → (param', m', v').
            Op::AdamW { .. } => node.inputs.get([0, 2, 3][port.min(2)]),
            _ => None,
        };
        match src {
            Some(&s) => t = s,
            None => return t,
        }
    }
}

/// Bytes of the forward activation buffers that a backward op reads, by the block
/// that produced them: the activations a training step keeps between a micro-batch's
/// forward and backward pass (without recomputation). `None` if a size overflows or
/// `env` leaves a dimension fractional.
pub fn saved_activation_bytes(g: &Graph, env: Env) -> Option<BTreeMap<Block, u64>> {
    let mut saved = vec![false; g.tensor_count()];
    for id in g.ops() {
        let node = g.node(id);
        if node.phase != Phase::Bwd {
            continue;
        }
        for &t in &node.inputs {
            let root = buffer_root(g, t);
            let producer = g.node(g.tensor(root).producer);
            if producer.phase == Phase::Fwd && g.tensor(root).role == Role::Activation {
                saved[root.index()] = true;
            }
        }
    }
    let mut by_block = BTreeMap::new();
    for t in g.tensor_ids().filter(|t| saved[t.index()]) {
        let block = g.node(g.tensor(t).producer).block;
        let bytes = g.ty(t).bytes_at(env)?;
        let e = by_block.entry(block).or_insert(0u64);
        *e = e.checked_add(bytes)?;
    }
    Some(by_block)
}

/// Model-state bytes by role, as the ZeRO paper splits them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ModelStateBytes {
    /// Low-precision working copies of the parameters (FP8 weight caches included).
    pub low_prec_params: u64,
    /// Full-precision master parameters.
    pub params_fp32: u64,
    /// Parameter gradients.
    pub grads: u64,
    /// Optimizer states (Adam moments).
    pub optimizer: u64,
}

impl ModelStateBytes {
    /// Sum of the four.
    pub fn total(&self) -> u64 {
        self.low_prec_params + self.params_fp32 + self.grads + self.optimizer
    }
}

/// Sums the persistent buffers of a training graph by role: parameter and state
/// sources, and the gradient buffers (views and in-place results are not counted again).
pub fn model_state_bytes(g: &Graph, env: Env) -> Option<ModelStateBytes> {
    let mut m = ModelStateBytes::default();
    for t in g.tensor_ids() {
        if buffer_root(g, t) != t {
            continue;
        }
        let tensor = g.tensor(t);
        let source = g.op(tensor.producer).is_source();
        // FP8 weight caches: low-precision copies made outside the optimizer step.
        let cache = g.node(tensor.producer).phase != Phase::Opt;
        let slot = match tensor.role {
            Role::LowPrecParam if source || cache => &mut m.low_prec_params,
            Role::Param if source => &mut m.params_fp32,
            Role::OptimizerState if source => &mut m.optimizer,
            Role::Grad => &mut m.grads,
            _ => continue,
        };
        *slot = slot.checked_add(tensor.ty.bytes_at(env)?)?;
    }
    Some(m)
}

/// Number of trainable parameters: elements of the parameter tensors with role
/// `param` (the master copies of a training graph, the parameters of a forward graph).
pub fn param_count(g: &Graph) -> Option<u64> {
    let one = Env::new(1, 1);
    g.ops()
        .filter(|&o| matches!(g.op(o), Op::Param { .. }))
        .map(|o| g.node(o).results[0])
        .filter(|&t| g.tensor(t).role == Role::Param)
        .try_fold(0u64, |acc, t| acc.checked_add(g.ty(t).shape.numel_at(one)?))
}
