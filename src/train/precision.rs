//! Precision rewrites of a forward graph, before the training graph is derived: the
//! compute dtype (the frontends build bf16 graphs), the fp32 upcast of the logits
//! that every engine's loss code runs, and FP8 linear layers ([`apply_fp8`]).
//!
//! All are real ops, so their bytes come out of liveness: with the logits upcast, the
//! loss saves the fp32 copy for its backward and the low-precision logits die after the
//! cast (Megatron-LM's `logits.float()` before the vocab-parallel cross-entropy); with
//! FP8, the casts of each linear layer's input and weight are tensors that the
//! autodiff saves (or not) and that the recipe keeps (or not) through the step.

use crate::ir::{Block, DType, Graph, GraphBuilder, Op, Role, ShapeError, TensorId, TensorType};
use serde::Serialize;
use std::collections::BTreeMap;

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

/// How an engine's FP8 training runs the linear layers of its transformer blocks:
/// both GEMM operands are cast to FP8 in forward (E4M3), the output gradient in
/// backward, and the GEMMs run on the FP8 tensor cores; everything else (norms,
/// softmax, attention core, activation functions, the output layer) stays bf16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Fp8Recipe {
    /// Dtype of the forward GEMM operands (activations and weights).
    pub forward: DType,
    /// Dtype the output gradient is cast to for the backward GEMMs.
    pub backward: DType,
    /// The backward reads the FP8 casts made in forward (Transformer Engine saves the
    /// FP8 input for the weight-gradient GEMM), rather than the bf16 operands, which it
    /// casts again (torchao's `Float8Linear`).
    pub saves_fp8: bool,
    /// The FP8 weight and its transposed FP8 copy (for the data-gradient GEMM) are
    /// buffers that live through the step (role `lowp`), rather than transient casts.
    pub weight_cache: bool,
    /// Where these facts were read.
    pub source: &'static str,
}

/// Transformer Engine as Megatron-LM runs it (`--fp8-format hybrid`): E4M3 forward,
/// E5M2 output gradients; each `Linear` casts its weight into FP8 workspaces
/// `weight_fp8` and `weight_t_fp8` (`fp8_cast_transpose_fused(weight, ...,
/// cast_out=weight_fp8._data, transpose_out=weight_t_fp8._data)`), which the module
/// keeps and refreshes on the first micro-batch only (`is_first_microbatch`), and saves
/// the FP8 input for the weight gradient (`ctx.save_for_backward(saved_inputmat,
/// saved_inputmat_t, weight, ..., weight_t_fp8, ...)`, with `saved_inputmat` the
/// `cast_to_fp8` result), `transformer_engine/pytorch/module/linear.py`. Megatron-LM
/// runs the output layer outside FP8 (`fp8_output_proj = False`,
/// `megatron/core/transformer/transformer_config.py`). Amax histories and scales are a
/// few floats per tensor and are not modelled.
pub const TRANSFORMER_ENGINE_FP8: Fp8Recipe = Fp8Recipe {
    forward: DType::F8E4M3,
    backward: DType::F8E5M2,
    saves_fp8: true,
    weight_cache: true,
    source: "TransformerEngine transformer_engine/pytorch/module/linear.py (_Linear); Megatron-LM d98e8a6 transformer_config.py (fp8 = hybrid)",
};

/// torchao's `Float8Linear` as torchtitan's `Float8LinearConverter` installs it
/// (default recipe `rowwise`: input, weight and output gradient all E4M3 with
/// axiswise scales, `Float8LinearConfig.from_recipe_name`, `torchao/float8/config.py`).
/// Its autograd function saves the high-precision operands and casts them again in
/// backward (`matmul_with_hp_or_float8_args.forward`:
/// `ctx.save_for_backward(input_hp, weight_hp_t)`, `torchao/float8/float8_linear.py`),
/// so the FP8 copies are transient and the saved activations stay bf16. torchtitan's
/// recipes leave the output layer in bf16 (`filter_fqns=["lm_head"]`,
/// `torchtitan/models/llama3/config_registry.py`).
pub const TORCHAO_FP8: Fp8Recipe = Fp8Recipe {
    forward: DType::F8E4M3,
    backward: DType::F8E4M3,
    saves_fp8: false,
    weight_cache: false,
    source: "torchao torchao/float8/float8_linear.py (matmul_with_hp_or_float8_args), config.py (rowwise); torchtitan b5bcd76 components/quantization/float8.py",
};

/// Whether op `id` of `g` is a linear layer FP8 applies to: a matmul inside a
/// transformer layer whose right operand is a rank-2 parameter (a weight), the left
/// operand not transposed.
fn is_linear(g: &Graph, id: crate::ir::OpId) -> bool {
    let node = g.node(id);
    let Op::MatMul { ta: false, .. } = node.op else {
        return false;
    };
    let w = node.inputs[1];
    matches!(node.block, Block::Layer(_))
        && matches!(g.op(g.tensor(w).producer), Op::Param { .. })
        && g.ty(w).shape.rank() == 2
        && g.ty(node.inputs[0]).dtype == FRONTEND_DTYPE
        && g.ty(w).dtype == FRONTEND_DTYPE
}

/// Rewrites the linear layers of `fwd`'s transformer blocks to FP8 GEMMs: the input
/// and the weight of each are cast to `recipe.forward` (one cast per distinct tensor,
/// shared by the linears that read it: Transformer Engine's fused LayerNorm-linear
/// casts the normalised input once), and the matmul reads the casts. An input that
/// is the all-gather of a sequence-parallel shard is cast before the gather and
/// gathered in FP8 (Transformer Engine's `gather_along_first_dim(inputmat)` after the
/// cast; torchao's float8 all-gather for TP). With `recipe.weight_cache` the weight
/// casts have role `lowp` (buffers kept through the step); otherwise they are
/// activations that die after their GEMM.
///
/// # Errors
///
/// A [`ShapeError`] when a rewritten op rejects its input types (an internal bug).
pub fn apply_fp8(fwd: &Graph, recipe: &Fp8Recipe) -> Result<Graph, ShapeError> {
    let linear: Vec<bool> = fwd.ops().map(|o| is_linear(fwd, o)).collect();
    let only_linear_lhs = |t: TensorId| -> bool {
        let uses = fwd.uses(t);
        !uses.is_empty()
            && uses
                .iter()
                .all(|&u| linear[u.index()] && fwd.node(u).inputs[0] == t)
    };
    let to = recipe.forward;
    let mut b = GraphBuilder::new(fwd.name());
    let mut map: Vec<Option<TensorId>> = vec![None; fwd.tensor_count()];
    // Forward tensor → its FP8 copy in the new graph.
    let mut fp8: BTreeMap<TensorId, TensorId> = BTreeMap::new();
    for id in fwd.ops() {
        let node = fwd.node(id);
        b.set_block(node.block);
        b.set_phase(node.phase);
        // (Every input is defined earlier, except a gather replaced by its FP8
        // version, which only linears read, through `fp8`.)
        let mapped = |t: TensorId| map[t.index()].expect("inputs are defined earlier");
        if node.op.is_source() {
            let t = node.results[0];
            map[t.index()] = Some(b.source(node.op.clone(), fwd.ty(t).clone(), fwd.tensor(t).role));
            continue;
        }
        // A sequence-parallel gather read only by linears: gather the FP8 shard.
        if matches!(node.op, Op::TpGather { .. } | Op::AllGather { .. })
            && fwd.ty(node.inputs[0]).dtype == FRONTEND_DTYPE
            && only_linear_lhs(node.results[0])
        {
            let shard = b.add1(Op::Cast { to }, &[mapped(node.inputs[0])])?;
            let full = b.add1(node.op.clone(), &[shard])?;
            fp8.insert(node.results[0], full);
            continue;
        }
        let ins = if linear[id.index()] {
            let mut ins = Vec::with_capacity(2);
            for (k, &t) in node.inputs.iter().enumerate() {
                let c = match fp8.get(&t) {
                    Some(&c) => c,
                    None => {
                        let c = b.add1(Op::Cast { to }, &[mapped(t)])?;
                        if k == 1 && recipe.weight_cache {
                            b.set_role(c, Role::LowPrecParam);
                        }
                        fp8.insert(t, c);
                        c
                    }
                };
                ins.push(c);
            }
            ins
        } else {
            node.inputs.iter().map(|&t| mapped(t)).collect()
        };
        let r = b.add_with_role(node.op.clone(), &ins, Role::Activation)?;
        for (&old, &new) in node.results.iter().zip(&r) {
            b.set_role(new, fwd.tensor(old).role);
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
