//! Recomputation insertion: clones forward ops into the backward pass so that the
//! backward reads recomputed tensors instead of saved ones.
//!
//! * **full** — every forward op of a selected layer is cloned right before the
//!   layer's first backward op; the layer's backward reads only clones, so the only
//!   forward tensor of the layer still kept is what later layers read (its output,
//!   the next layer's checkpoint).
//! * **selective** — the attention core (ops whose result has two sequence-length
//!   dimensions: `QKᵀ`, softmax, attention dropout) is cloned right before the first
//!   backward op that reads it (Korthikanti et al. 2022, Sec. 4.2).
//!
//! What "selective" saves is the engine's choice ([`Selective`]): Megatron-LM
//! recomputes the attention core; torchtitan's per-op selective checkpointing
//! recomputes everything but every other linear layer and the attention kernels.
//!
//! Embedding and head blocks are never recomputed.

use super::Recompute;
use crate::ir::{Block, Graph, GraphBuilder, Op, OpId, Phase, ShapeError, TensorId};
use serde::Serialize;
use std::collections::BTreeSet;

/// Which forward ops selective recomputation reruns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Selective {
    /// The attention core (ops with an `s×s` result), cloned before the first
    /// backward op that reads it: Megatron-LM's `--recompute-granularity selective`
    /// (Korthikanti et al. 2022, Sec. 4.2).
    #[default]
    AttentionCore,
    /// torchtitan's per-op selective checkpointing (`SelectiveAC` with the op policy,
    /// `torchtitan/distributed/activation_checkpoint.py`): the outputs of attention
    /// kernels, of batched matmuls, of reduce-scatters and of every odd-numbered
    /// linear layer of a block are saved, every even-numbered linear layer and every
    /// other op is recomputed before the layer's backward. (apar's fused QKV
    /// projection counts as one linear layer where torchtitan's Llama has three.)
    PerOp,
}

/// Whether a tensor type is `s×s`-shaped (two dimensions mention the sequence length).
fn is_quadratic(g: &Graph, t: TensorId) -> bool {
    let dims = g.ty(t).shape.dims();
    dims.iter().filter(|d| d.has_seq()).count() >= 2
}

/// A graph with recomputation and the clone ops it added.
#[derive(Clone, Debug)]
pub struct Recomputed {
    /// The transformed graph.
    pub graph: Graph,
    /// The backward-phase clones of forward ops.
    pub clones: BTreeSet<OpId>,
}

/// Applies `policy` to the layers for which `select` returns true, with Megatron-LM's
/// selective policy ([`Selective::AttentionCore`]).
///
/// # Errors
///
/// A [`ShapeError`] when a cloned op rejects its inputs (an internal inconsistency).
pub fn apply(
    g: &Graph,
    policy: Recompute,
    select: impl Fn(u32) -> bool,
) -> Result<Recomputed, ShapeError> {
    apply_with(g, policy, Selective::AttentionCore, select)
}

/// Whether op `id` reads a parameter directly (a linear layer's matmul).
fn reads_param(g: &Graph, id: OpId) -> bool {
    g.node(id)
        .inputs
        .iter()
        .any(|&t| matches!(g.op(g.tensor(t).producer), Op::Param { .. }))
}

/// [`apply`] with the engine's meaning of selective recomputation.
///
/// # Errors
///
/// As [`apply`].
pub fn apply_with(
    g: &Graph,
    policy: Recompute,
    selective: Selective,
    select: impl Fn(u32) -> bool,
) -> Result<Recomputed, ShapeError> {
    let per_op = policy == Recompute::Selective && selective == Selective::PerOp;
    if policy == Recompute::None {
        return Ok(Recomputed {
            graph: g.clone(),
            clones: BTreeSet::new(),
        });
    }
    let mut clones = BTreeSet::new();
    // Forward ops to clone, per layer.
    let mut cloned = vec![false; g.op_count()];
    // Linear layers seen so far in each layer (per-op policy).
    let mut linears: std::collections::BTreeMap<u32, u32> = Default::default();
    for id in g.ops() {
        let node = g.node(id);
        let Block::Layer(i) = node.block else {
            continue;
        };
        if node.phase != Phase::Fwd || node.op.is_source() || !select(i) {
            continue;
        }
        cloned[id.index()] = match policy {
            Recompute::None => false,
            Recompute::Full => true,
            Recompute::Selective if per_op => match node.op {
                Op::MatMul { .. } if reads_param(g, id) => {
                    let n = linears.entry(i).or_default();
                    *n += 1;
                    *n % 2 == 0
                }
                Op::MatMul { .. }
                | Op::FlashAttention { .. }
                | Op::ReduceScatter { .. }
                | Op::AllToAll { .. } => false,
                _ => true,
            },
            Recompute::Selective => node.results.iter().any(|&r| is_quadratic(g, r)),
        };
    }
    let mut by_block: std::collections::BTreeMap<Block, Vec<OpId>> = Default::default();
    for id in g.ops().filter(|o| cloned[o.index()]) {
        by_block.entry(g.node(id).block).or_default().push(id);
    }
    // Where each layer's clones go: before its first backward op that reads a cloned
    // tensor (selective) or before its first backward op (full).
    let mut insert_before = vec![false; g.op_count()];
    let mut placed = BTreeSet::new();
    for id in g.ops() {
        let node = g.node(id);
        let Block::Layer(i) = node.block else {
            continue;
        };
        if node.phase != Phase::Bwd || placed.contains(&i) {
            continue;
        }
        let reads_clone = node
            .inputs
            .iter()
            .any(|&t| cloned[g.tensor(t).producer.index()]);
        let trigger = match policy {
            Recompute::Full => by_block.contains_key(&node.block),
            _ if per_op => by_block.contains_key(&node.block),
            _ => reads_clone,
        };
        if trigger {
            insert_before[id.index()] = true;
            placed.insert(i);
        }
    }

    let mut b = GraphBuilder::new(g.name());
    let mut map: Vec<Option<TensorId>> = vec![None; g.tensor_count()];
    let mut clone_of: Vec<Option<TensorId>> = vec![None; g.tensor_count()];
    let get = |map: &[Option<TensorId>], t: TensorId| map[t.index()].expect("defined earlier");
    for id in g.ops() {
        let node = g.node(id);
        if insert_before[id.index()] {
            b.set_block(node.block);
            b.set_phase(Phase::Bwd);
            for &src in by_block.get(&node.block).map_or(&[][..], Vec::as_slice) {
                let inputs: Vec<TensorId> = g
                    .node(src)
                    .inputs
                    .iter()
                    .map(|&t| clone_of[t.index()].unwrap_or_else(|| get(&map, t)))
                    .collect();
                let results = b.copy_op(g, src, &inputs)?;
                if let Some(&r) = results.first() {
                    clones.insert(b.graph().tensor(r).producer);
                }
                for (&old, new) in g.node(src).results.iter().zip(results) {
                    clone_of[old.index()] = Some(new);
                }
            }
        }
        b.set_block(node.block);
        b.set_phase(node.phase);
        let use_clones = node.phase == Phase::Bwd;
        let inputs: Vec<TensorId> = node
            .inputs
            .iter()
            .map(|&t| {
                let same_block = g.node(g.tensor(t).producer).block == node.block;
                match clone_of[t.index()] {
                    Some(c) if use_clones && same_block => c,
                    _ => get(&map, t),
                }
            })
            .collect();
        let results = b.copy_op(g, id, &inputs)?;
        for (&old, new) in node.results.iter().zip(results) {
            map[old.index()] = Some(new);
        }
    }
    Ok(Recomputed {
        graph: b.finish(),
        clones,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{verify, Env};
    use crate::models::{build_forward, zoo, Attention};
    use crate::train::memory::saved_activation_bytes;
    use crate::train::{training_graph, TrainOptions};

    fn gpt3_like_one_layer() -> Graph {
        // GPT-3 175B dimensions (Brown et al. 2020), one layer is enough per layer.
        let mut cfg = zoo::gpt("g", 96, 12288, 96, 51200, 2048, 0.1, Attention::Eager);
        cfg.layers = 2;
        training_graph(&build_forward(&cfg).unwrap(), &TrainOptions::default()).unwrap()
    }

    /// Korthikanti et al. 2022, Table 2: with selective recomputation and no
    /// parallelism the per-layer activations are 34·s·b·h; with full recomputation
    /// only the layer input, 2·s·b·h, is kept.
    #[test]
    fn recompute_policies_match_korthikanti_table2() {
        let g = gpt3_like_one_layer();
        let (s, b, h) = (2048.0, 1.0, 12288.0);
        let env = Env::new(1, 2048);
        for (policy, expected) in [
            (Recompute::Selective, s * b * h * 34.0),
            (Recompute::Full, s * b * h * 2.0),
        ] {
            let r = apply(&g, policy, |_| true).unwrap().graph;
            verify(&r).unwrap();
            let saved = saved_activation_bytes(&r, env).unwrap();
            let got = saved[&Block::Layer(0)] as f64;
            assert!(
                (got - expected).abs() / expected < 0.01,
                "{policy}: {got} vs {expected}"
            );
            // Recomputation adds forward work to the step.
            assert!(r.total_flops(env).unwrap() > g.total_flops(env).unwrap());
        }
    }
}
