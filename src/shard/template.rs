//! Block templates: one block of a forward graph cut out with its inputs (leaves), its
//! outputs and the layouts they cross the block boundary in, plus a canonical key under
//! which structurally identical blocks (same ops and shapes, any parameter names and
//! layer index) share one sharding run.

use super::lang::OpKey;
use super::layout::{is_sequence, Layout, Val};
use super::ShardError;
use crate::ir::{Block, Graph, Op, OpId, TensorId, TensorType};
use std::collections::BTreeMap;

/// What a leaf of a template is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum LeafKind {
    /// A parameter defined in this block (stored in whatever layout the block picks).
    Param,
    /// A data input defined in this block (fed in whatever layout the block picks).
    Input,
    /// A constant defined in this block.
    Constant,
    /// Another source defined in this block (optimizer state, pipeline receive): kept
    /// replicated.
    Opaque,
    /// A tensor of an earlier block, in the layout that block produced it in.
    Ext,
}

/// One block input.
#[derive(Clone, Debug)]
pub(crate) struct Leaf {
    /// Its kind.
    pub kind: LeafKind,
    /// The forward tensor.
    pub tensor: TensorId,
    /// Logical type and the layout the block receives it in.
    pub val: Val,
    /// A source of this block that later blocks read too (its layout must suit them).
    pub shared: bool,
}

/// One block of a forward graph, ready to shard.
#[derive(Clone, Debug)]
pub(crate) struct Template {
    /// The non-source ops of the block, in order (`tag − 1` of an op node indexes this).
    pub ops: Vec<OpId>,
    /// The block's inputs.
    pub leaves: Vec<Leaf>,
    /// Tensors the block must produce, with the layout each must have.
    pub outputs: Vec<(TensorId, Layout)>,
}

/// Canonical identity of a template for the cache.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TemplateKey {
    leaves: Vec<(LeafKind, TensorType, Layout, Option<OpKey>, bool)>,
    ops: Vec<(OpKey, Vec<u32>, usize)>,
    outputs: Vec<(u32, Layout)>,
    parts: u32,
    sp: bool,
}

/// The layout a tensor crossing a block boundary takes: split along its sequence axis
/// with sequence parallelism (float tensors that have one), replicated otherwise.
pub(crate) fn boundary_layout(ty: &TensorType, sp: bool) -> Layout {
    if !sp || !ty.dtype.is_float() {
        return Layout::Replicated;
    }
    match ty.shape.dims().iter().position(|&d| is_sequence(d)) {
        Some(a) => Layout::split(a as u32),
        None => Layout::Replicated,
    }
}

/// Cuts block `block` (its ops `ops`, in graph order) out of `fwd`. `given` tells the
/// per-device value of tensors of earlier blocks.
pub(crate) fn build(
    fwd: &Graph,
    block: Block,
    ops: &[OpId],
    given: &BTreeMap<TensorId, Val>,
    parts: u32,
    sp: bool,
) -> Result<(Template, TemplateKey), ShardError> {
    let mut leaves: Vec<Leaf> = Vec::new();
    let mut index: BTreeMap<TensorId, u32> = BTreeMap::new();
    let mut key_leaves = Vec::new();
    let mut body = Vec::new();
    for &id in ops {
        let node = fwd.node(id);
        if !node.op.is_source() {
            body.push(id);
            continue;
        }
        let kind = match node.op {
            Op::Param { .. } => LeafKind::Param,
            Op::Input { .. } => LeafKind::Input,
            Op::Constant { .. } => LeafKind::Constant,
            _ => LeafKind::Opaque,
        };
        for &t in &node.results {
            let ty = fwd.ty(t).clone();
            let op_key = (kind == LeafKind::Constant).then(|| OpKey::of(&node.op, true));
            let shared = fwd.uses(t).iter().any(|&u| fwd.node(u).block != block);
            key_leaves.push((kind, ty.clone(), Layout::Replicated, op_key, shared));
            index.insert(t, leaves.len() as u32);
            leaves.push(Leaf {
                kind,
                tensor: t,
                val: Val::replicated(ty),
                shared,
            });
        }
    }
    // Tensors of earlier blocks, in order of first use.
    for &id in &body {
        for &t in &fwd.node(id).inputs {
            let producer = fwd.tensor(t).producer;
            if fwd.node(producer).block == block || index.contains_key(&t) {
                continue;
            }
            let val = given
                .get(&t)
                .cloned()
                .ok_or(ShardError::Order { block, tensor: t })?;
            key_leaves.push((LeafKind::Ext, val.logical.clone(), val.layout, None, false));
            index.insert(t, leaves.len() as u32);
            leaves.push(Leaf {
                kind: LeafKind::Ext,
                tensor: t,
                val,
                shared: false,
            });
        }
    }
    // Ops: value numbers are leaves first, then results in order.
    let mut next = leaves.len() as u32;
    let mut key_ops = Vec::with_capacity(body.len());
    for &id in &body {
        let node = fwd.node(id);
        let args = node.inputs.iter().map(|t| index[t]).collect();
        key_ops.push((OpKey::of(&node.op, false), args, node.results.len()));
        for &r in &node.results {
            index.insert(r, next);
            next += 1;
        }
    }
    // Outputs: results used by other blocks, and results nothing uses (the loss).
    let mut outputs = Vec::new();
    for &id in &body {
        let node = fwd.node(id);
        for (i, &r) in node.results.iter().enumerate() {
            let uses = fwd.uses(r);
            let escapes = uses.iter().any(|&u| fwd.node(u).block != block);
            if escapes {
                outputs.push((r, boundary_layout(fwd.ty(r), sp)));
            } else if uses.is_empty() && i == 0 {
                outputs.push((r, Layout::Replicated));
            }
        }
    }
    let key = TemplateKey {
        leaves: key_leaves,
        ops: key_ops,
        outputs: outputs.iter().map(|&(t, l)| (index[&t], l)).collect(),
        parts,
        sp,
    };
    Ok((
        Template {
            ops: body,
            leaves,
            outputs,
        },
        key,
    ))
}
