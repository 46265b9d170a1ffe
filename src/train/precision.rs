//! Precision rewrites of a forward graph, before the training graph is derived: the
//! compute dtype (the frontends build bf16 graphs) and the fp32 upcast of the logits
//! that every engine's loss code runs.
//!
//! Both are real ops, so their bytes come out of liveness: with the logits upcast, the
//! loss saves the fp32 copy for its backward and the low-precision logits die after the
//! cast (Megatron-LM's `logits.float()` before the vocab-parallel cross-entropy).

use crate::ir::{DType, Graph, GraphBuilder, Op, ShapeError, TensorId, TensorType};

/// The dtype the frontends build forward graphs in.
pub const FRONTEND_DTYPE: DType = crate::models::COMPUTE_DTYPE;

/// Rewrites `fwd` (built in [`FRONTEND_DTYPE`]) to compute in `compute`, and casts the
/// logits of every cross-entropy to `logits` first. Returns `fwd` unchanged (cloned)
/// when there is nothing to do.
///
/// # Errors
///
/// A [`ShapeError`] when a rewritten op rejects its input types (an op that only
/// accepts the frontend dtype).
pub fn apply(fwd: &Graph, compute: DType, logits: DType) -> Result<Graph, ShapeError> {
    let retype = |ty: &TensorType| -> TensorType {
        if ty.dtype == FRONTEND_DTYPE {
            ty.with_dtype(compute)
        } else {
            ty.clone()
        }
    };
    let mut b = GraphBuilder::new(fwd.name());
    let mut map: Vec<Option<TensorId>> = vec![None; fwd.tensor_count()];
    for id in fwd.ops() {
        let node = fwd.node(id);
        b.set_block(node.block);
        b.set_phase(node.phase);
        let mut inputs: Vec<TensorId> = node
            .inputs
            .iter()
            .map(|&t| map[t.index()].expect("inputs are defined earlier"))
            .collect();
        let results = if node.op.is_source() {
            let t = node.results[0];
            vec![b.source(node.op.clone(), retype(fwd.ty(t)), fwd.tensor(t).role)]
        } else {
            let op = match &node.op {
                Op::Cast { to } if *to == FRONTEND_DTYPE => Op::Cast { to: compute },
                op => op.clone(),
            };
            if matches!(op, Op::CrossEntropy | Op::VocabParallelCrossEntropy { .. })
                && b.ty(inputs[0]).dtype != logits
            {
                inputs[0] = b.add1(Op::Cast { to: logits }, &inputs[..1])?;
            }
            let r = b.add_with_role(op, &inputs, crate::ir::Role::Activation)?;
            for (&new, &old) in r.iter().zip(&node.results) {
                b.set_role(new, fwd.tensor(old).role);
            }
            r
        };
        for (&old, new) in node.results.iter().zip(results) {
            map[old.index()] = Some(new);
        }
    }
    Ok(b.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{verify, Env, Role};
    use crate::models::{build_forward, zoo};

    #[test]
    fn fp32_compute_retypes_every_float_and_the_logits_are_upcast() {
        let g = build_forward(&zoo::lookup("tiny-gpt").unwrap()).unwrap();
        let f = apply(&g, DType::F32, DType::F32).unwrap();
        verify(&f).unwrap();
        assert!(f.tensor_ids().all(|t| f.ty(t).dtype != DType::Bf16));
        let h = apply(&g, DType::Bf16, DType::F32).unwrap();
        verify(&h).unwrap();
        assert_eq!(h.op_count(), g.op_count() + 1);
        let env = Env::new(1, 16);
        let params = |g: &Graph| -> u64 {
            g.tensor_ids()
                .filter(|&t| g.tensor(t).role == Role::Param)
                .map(|t| g.ty(t).bytes_at(env).unwrap())
                .sum()
        };
        assert_eq!(params(&f), 2 * params(&g));
    }
}
