//! Shape and dtype inference: the result types of an op from its input types.

use super::Op;
use crate::ir::types::{DType, Dim, TensorType};
use thiserror::Error;

/// A shape or dtype rule broken by an op's inputs or attributes.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("{op}: {reason} (inputs: {})", fmt_types(inputs))]
pub struct ShapeError {
    /// Op name.
    pub op: &'static str,
    /// Input types.
    pub inputs: Vec<TensorType>,
    /// What is wrong.
    pub reason: String,
}

fn fmt_types(ts: &[TensorType]) -> String {
    if ts.is_empty() {
        return "none".into();
    }
    ts.iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The result dtype of a matmul of two 8-bit float operands (E4M3 × E4M3 forward,
/// E5M2 × E4M3 backward): bf16. Transformer Engine's FP8 GEMMs write
/// `activation_dtype` (`fp8_gemm(..., out=torch.empty(..., dtype=activation_dtype))`,
/// `transformer_engine/pytorch/module/linear.py`) and torchao's float8 `mm` writes
/// the operands' original dtype (`output_dtype = a._orig_dtype`,
/// `torchao/float8/float8_ops.py`); every FP8 recipe here runs bf16 activations.
pub const FP8_GEMM_OUT: DType = DType::Bf16;

fn axis_ok(axis: u32, rank: usize) -> Option<usize> {
    let a = axis as usize;
    (a < rank).then_some(a)
}

impl Op {
    /// Result types from input types, checking every shape and dtype rule.
    ///
    /// Returns `Ok(None)` for sources, whose result type is declared by the graph.
    ///
    /// # Errors
    /// A [`ShapeError`] naming the op, its input types and the broken rule: a wrong number
    /// of inputs, mismatched ranks, dims or dtypes, an axis out of range, or a dim a group
    /// size does not divide.
    pub fn infer(&self, inputs: &[&TensorType]) -> Result<Option<Vec<TensorType>>, ShapeError> {
        let err = |reason: String| ShapeError {
            op: self.name(),
            inputs: inputs.iter().map(|t| (*t).clone()).collect(),
            reason,
        };
        let info = self.info();
        if !info.arity.accepts(inputs.len()) {
            return Err(err(format!(
                "takes {} inputs, got {}",
                info.arity,
                inputs.len()
            )));
        }
        let float = |i: usize| -> Result<(), ShapeError> {
            if inputs[i].dtype.is_float() {
                Ok(())
            } else {
                Err(err(format!("input {i} must be a float tensor")))
            }
        };
        let same = |i: usize, j: usize| -> Result<(), ShapeError> {
            if inputs[i] == inputs[j] {
                Ok(())
            } else {
                Err(err(format!("inputs {i} and {j} must have the same type")))
            }
        };
        let same_shape = |i: usize, j: usize| -> Result<(), ShapeError> {
            if inputs[i].shape == inputs[j].shape {
                Ok(())
            } else {
                Err(err(format!("inputs {i} and {j} must have the same shape")))
            }
        };
        let rank_at_least = |i: usize, r: usize| -> Result<(), ShapeError> {
            if inputs[i].shape.rank() >= r {
                Ok(())
            } else {
                Err(err(format!("input {i} must have rank ≥ {r}")))
            }
        };
        let vector_of_last = |x: usize, v: usize| -> Result<(), ShapeError> {
            let last = inputs[x].shape.last();
            if inputs[v].shape.rank() == 1 && Some(inputs[v].shape.0[0]) == last {
                Ok(())
            } else {
                Err(err(format!(
                    "input {v} must be a vector matching the last dim of input {x}"
                )))
            }
        };
        let one = |t: TensorType| Ok(Some(vec![t]));
        match self {
            Op::Input { .. }
            | Op::Param { .. }
            | Op::State { .. }
            | Op::Constant { .. }
            | Op::Recv { .. } => Ok(None),
            Op::MatMul { ta, tb } => {
                let (a, b) = (inputs[0], inputs[1]);
                float(0)?;
                let fp8 = a.dtype.is_fp8() && b.dtype.is_fp8();
                if a.dtype != b.dtype && !fp8 {
                    return Err(err("operands must have the same dtype".into()));
                }
                rank_at_least(0, 2)?;
                rank_at_least(1, 2)?;
                let (ar, br) = (a.shape.rank(), b.shape.rank());
                let (m, ka) = if *ta {
                    (a.shape.0[ar - 1], a.shape.0[ar - 2])
                } else {
                    (a.shape.0[ar - 2], a.shape.0[ar - 1])
                };
                let (kb, n) = if *tb {
                    (b.shape.0[br - 1], b.shape.0[br - 2])
                } else {
                    (b.shape.0[br - 2], b.shape.0[br - 1])
                };
                if ka != kb {
                    return Err(err(format!("contraction dims differ: {ka} vs {kb}")));
                }
                let lead = &a.shape.0[..ar - 2];
                if br != 2 && b.shape.0[..br - 2] != *lead {
                    return Err(err("leading (batch) dims differ".into()));
                }
                let mut dims = lead.to_vec();
                dims.extend([m, n]);
                // An FP8 GEMM accumulates in fp32 and writes the activation dtype
                // ([`FP8_GEMM_OUT`]).
                let out = if fp8 { FP8_GEMM_OUT } else { a.dtype };
                one(TensorType::new(out, dims))
            }
            Op::Add | Op::Mul => {
                float(0)?;
                same(0, 1)?;
                one(inputs[0].clone())
            }
            Op::Scale { .. }
            | Op::Clamp { .. }
            | Op::Gelu
            | Op::Silu
            | Op::Pow { .. }
            | Op::Tanh
            | Op::Rsqrt
            | Op::Shift { .. } => {
                float(0)?;
                one(inputs[0].clone())
            }
            Op::BiasAdd => {
                float(0)?;
                rank_at_least(0, 1)?;
                vector_of_last(0, 1)?;
                if inputs[0].dtype != inputs[1].dtype {
                    return Err(err("bias must have the input's dtype".into()));
                }
                one(inputs[0].clone())
            }
            Op::Softmax { causal, .. } => {
                float(0)?;
                rank_at_least(0, if *causal { 2 } else { 1 })?;
                one(inputs[0].clone())
            }
            Op::Dropout { p } => {
                float(0)?;
                if !(0.0..1.0).contains(p) {
                    return Err(err(format!("drop probability {p} outside [0, 1)")));
                }
                Ok(Some(vec![
                    inputs[0].clone(),
                    inputs[0].with_dtype(DType::U8),
                ]))
            }
            Op::LayerNorm { eps } | Op::RmsNorm { eps } => {
                float(0)?;
                rank_at_least(0, 1)?;
                // The variance's epsilon: finite and non-negative (as a config.json's is).
                if !(eps.is_finite() && *eps >= 0.0) {
                    return Err(err(format!("norm epsilon {eps} is negative or not finite")));
                }
                for i in 1..inputs.len() {
                    vector_of_last(0, i)?;
                    if inputs[i].dtype != inputs[0].dtype {
                        return Err(err("norm weights must have the input's dtype".into()));
                    }
                }
                one(inputs[0].clone())
            }
            Op::Rotary { dims, .. } | Op::RotaryGrad { dims, .. } => {
                float(0)?;
                rank_at_least(0, 3)?;
                let d = inputs[0].shape.last().and_then(Dim::as_lit);
                match d {
                    Some(d) if *dims > 0 && dims % 2 == 0 && *dims <= d => {}
                    _ => {
                        return Err(err(format!(
                            "rotary dims {dims} must be even, positive and ≤ the head dim"
                        )))
                    }
                }
                one(inputs[0].clone())
            }
            Op::Embedding | Op::VocabParallelEmbedding { .. } => {
                if let Op::VocabParallelEmbedding { parts: 0 } = self {
                    return Err(err("group size must be positive".into()));
                }
                let (table, ids) = (inputs[0], inputs[1]);
                float(0)?;
                if table.shape.rank() != 2 {
                    return Err(err("table must be [vocab, hidden]".into()));
                }
                if !ids.dtype.is_int() {
                    return Err(err("ids must be integers".into()));
                }
                let mut dims = ids.shape.0.clone();
                dims.push(table.shape.0[1]);
                one(TensorType::new(table.dtype, dims))
            }
            Op::Reshape { shape } => {
                let (a, b) = (inputs[0].shape.numel(), shape.numel());
                if a.is_none() || a != b {
                    return Err(err(format!(
                        "cannot reshape {} to {shape}: element counts differ",
                        inputs[0].shape
                    )));
                }
                one(TensorType {
                    dtype: inputs[0].dtype,
                    shape: shape.clone(),
                })
            }
            Op::Transpose { perm } => {
                let rank = inputs[0].shape.rank();
                let mut seen = vec![false; rank];
                for &p in perm {
                    match seen.get_mut(p as usize) {
                        Some(s) if !*s => *s = true,
                        _ => return Err(err(format!("{perm:?} is not a permutation"))),
                    }
                }
                if perm.len() != rank {
                    return Err(err(format!(
                        "permutation {perm:?} does not match rank {rank}"
                    )));
                }
                let dims = perm.iter().map(|&p| inputs[0].shape.0[p as usize]);
                one(TensorType::new(inputs[0].dtype, dims))
            }
            Op::Slice { axis, start, len } => {
                let ax = axis_ok(*axis, inputs[0].shape.rank())
                    .ok_or_else(|| err(format!("axis {axis} out of range")))?;
                let size = inputs[0].shape.0[ax].as_lit();
                match (size, start.checked_add(*len)) {
                    (Some(n), Some(end)) if *len > 0 && end <= n => {}
                    _ => {
                        return Err(err(format!(
                            "slice {start}..{start}+{len} does not fit axis {axis}"
                        )))
                    }
                }
                let mut t = inputs[0].clone();
                t.shape.0[ax] = Dim::lit(*len);
                one(t)
            }
            Op::Concat { axis } => {
                let ax = axis_ok(*axis, inputs[0].shape.rank())
                    .ok_or_else(|| err(format!("axis {axis} out of range")))?;
                let mut total = 0u64;
                for (i, t) in inputs.iter().enumerate() {
                    let mut a = t.shape.0.clone();
                    let mut b = inputs[0].shape.0.clone();
                    if t.dtype != inputs[0].dtype || a.len() != b.len() {
                        return Err(err(format!("input {i} does not match input 0")));
                    }
                    let n = a[ax].as_lit().ok_or_else(|| {
                        err(format!("concat axis of input {i} must be a literal dim"))
                    })?;
                    total = total
                        .checked_add(n)
                        .ok_or_else(|| err("concat size overflows".into()))?;
                    a[ax] = Dim::lit(0);
                    b[ax] = Dim::lit(0);
                    if a != b {
                        return Err(err(format!("input {i} differs off the concat axis")));
                    }
                }
                let mut t = inputs[0].clone();
                t.shape.0[ax] = Dim::lit(total);
                one(t)
            }
            Op::Pad {
                axis,
                before,
                after,
            } => {
                let ax = axis_ok(*axis, inputs[0].shape.rank())
                    .ok_or_else(|| err(format!("axis {axis} out of range")))?;
                let n = inputs[0].shape.0[ax]
                    .as_lit()
                    .and_then(|n| n.checked_add(*before)?.checked_add(*after))
                    .ok_or_else(|| err("pad axis must be a literal dim".into()))?;
                let mut t = inputs[0].clone();
                t.shape.0[ax] = Dim::lit(n);
                one(t)
            }
            Op::Repeat { axis, times } => {
                let ax = axis_ok(*axis, inputs[0].shape.rank())
                    .ok_or_else(|| err(format!("axis {axis} out of range")))?;
                if *times == 0 {
                    return Err(err("repeat count must be positive".into()));
                }
                let mut t = inputs[0].clone();
                t.shape.0[ax] = t.shape.0[ax]
                    .checked_mul(Dim::lit(*times))
                    .ok_or_else(|| err("repeat size overflows".into()))?;
                one(t)
            }
            Op::Broadcast { axes, shape } => {
                let mut kept = Vec::new();
                for (i, d) in shape.0.iter().enumerate() {
                    if !axes.contains(&(i as u32)) {
                        kept.push(*d);
                    }
                }
                let sorted = axes.windows(2).all(|w| w[0] < w[1]);
                if !sorted || axes.iter().any(|&a| a as usize >= shape.rank()) {
                    return Err(err(format!("bad broadcast axes {axes:?} for {shape}")));
                }
                if kept != inputs[0].shape.0 {
                    return Err(err(format!("cannot broadcast to {shape} along {axes:?}")));
                }
                one(TensorType {
                    dtype: inputs[0].dtype,
                    shape: shape.clone(),
                })
            }
            Op::ReduceSum { axes } => {
                let rank = inputs[0].shape.rank();
                let sorted = axes.windows(2).all(|w| w[0] < w[1]);
                if !sorted || axes.iter().any(|&a| a as usize >= rank) {
                    return Err(err(format!("bad reduction axes {axes:?}")));
                }
                let dims = inputs[0]
                    .shape
                    .0
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !axes.contains(&(*i as u32)))
                    .map(|(_, d)| *d);
                one(TensorType::new(inputs[0].dtype, dims))
            }
            Op::Cast { to } => one(inputs[0].with_dtype(*to)),
            Op::Contiguous => one(inputs[0].clone()),
            Op::CrossEntropy | Op::VocabParallelCrossEntropy { .. } => {
                if let Op::VocabParallelCrossEntropy { parts: 0 } = self {
                    return Err(err("group size must be positive".into()));
                }
                let (logits, labels) = (inputs[0], inputs[1]);
                float(0)?;
                if !labels.dtype.is_int() {
                    return Err(err("labels must be integers".into()));
                }
                if logits.shape.rank() != labels.shape.rank() + 1
                    || logits.shape.0[..labels.shape.rank()] != labels.shape.0[..]
                {
                    return Err(err("logits must be labels' shape plus a vocab axis".into()));
                }
                one(TensorType::new(DType::F32, []))
            }
            Op::FlashAttention { sinks, .. } => {
                let (q, k) = (inputs[0], inputs[1]);
                float(0)?;
                same(1, 2)?;
                attention_shapes(q, k).map_err(err)?;
                if q.dtype != k.dtype {
                    return Err(err("q, k, v must share a dtype".into()));
                }
                let n = 3 + usize::from(*sinks);
                if inputs.len() != n {
                    return Err(err(format!("takes {n} inputs, got {}", inputs.len())));
                }
                if *sinks {
                    sinks_of(q, inputs[3]).map_err(err)?;
                }
                one(q.clone())
            }
            Op::Sdpa { sinks, .. } => {
                let (q, k) = (inputs[0], inputs[1]);
                float(0)?;
                same(1, 2)?;
                attention_shapes(q, k).map_err(err)?;
                if q.dtype != k.dtype {
                    return Err(err("q, k, v must share a dtype".into()));
                }
                let s = usize::from(*sinks);
                if inputs.len() > 4 + s {
                    return Err(err(format!(
                        "takes {} or {} inputs, got {}",
                        3 + s,
                        4 + s,
                        inputs.len()
                    )));
                }
                if *sinks {
                    sinks_of(q, inputs[inputs.len() - 1]).map_err(err)?;
                }
                if let Some(mask) = inputs[..inputs.len() - s].get(3) {
                    sdpa_mask(q, k, mask).map_err(err)?;
                }
                // attention_shapes checked the rank: q is [b, s, a, d].
                let (b, s, a) = (q.shape.0[0], q.shape.0[1], q.shape.0[2]);
                Ok(Some(vec![
                    q.clone(),
                    TensorType::new(DType::F32, [b, s, a]),
                ]))
            }
            Op::SdpaGrad { sinks, .. } => {
                let (dout, q, k, v, o, lse) = (
                    inputs[0], inputs[1], inputs[2], inputs[3], inputs[4], inputs[5],
                );
                float(0)?;
                if dout.shape != q.shape || o.shape != q.shape || k != v {
                    return Err(err("do, q, o must share a shape and k, v a type".into()));
                }
                attention_shapes(q, k).map_err(err)?;
                let lse_shape = [q.shape.0[0], q.shape.0[1], q.shape.0[2]];
                if lse.dtype != DType::F32 || lse.shape.0[..] != lse_shape[..] {
                    return Err(err("lse must be f32[b, s, heads] of q".into()));
                }
                let s = usize::from(*sinks);
                if inputs.len() > 7 + s {
                    return Err(err(format!(
                        "takes {} or {} inputs, got {}",
                        6 + s,
                        7 + s,
                        inputs.len()
                    )));
                }
                if let Some(mask) = inputs[..inputs.len() - s].get(6) {
                    sdpa_mask(q, k, mask).map_err(err)?;
                }
                let mut out = vec![
                    q.with_dtype(dout.dtype),
                    k.with_dtype(dout.dtype),
                    v.with_dtype(dout.dtype),
                ];
                if *sinks {
                    sinks_of(q, inputs[inputs.len() - 1]).map_err(err)?;
                    out.push(inputs[inputs.len() - 1].clone());
                }
                Ok(Some(out))
            }
            Op::GeluGrad | Op::SiluGrad | Op::SoftmaxGrad { .. } | Op::ClampGrad { .. } => {
                float(0)?;
                same_shape(0, 1)?;
                one(inputs[0].clone())
            }
            Op::DropoutGrad { .. } => {
                float(0)?;
                same_shape(0, 1)?;
                if inputs[1].dtype != DType::U8 {
                    return Err(err("dropout mask must be u8".into()));
                }
                one(inputs[0].clone())
            }
            Op::LayerNormGrad { eps } | Op::RmsNormGrad { eps } => {
                if !(eps.is_finite() && *eps >= 0.0) {
                    return Err(err(format!("norm epsilon {eps} is negative or not finite")));
                }
                float(0)?;
                same_shape(0, 1)?;
                vector_of_last(1, 2)?;
                let n = if matches!(self, Op::LayerNormGrad { .. }) {
                    2
                } else {
                    1
                };
                let mut out = vec![inputs[0].clone()];
                out.extend(std::iter::repeat_n(inputs[2].clone(), n));
                Ok(Some(out))
            }
            Op::EmbeddingGrad { vocab } | Op::VocabParallelEmbeddingGrad { vocab, .. } => {
                if let Op::VocabParallelEmbeddingGrad { parts: 0, .. } = self {
                    return Err(err("group size must be positive".into()));
                }
                let (dy, ids) = (inputs[0], inputs[1]);
                float(0)?;
                if !ids.dtype.is_int() {
                    return Err(err("ids must be integers".into()));
                }
                if dy.shape.rank() != ids.shape.rank() + 1
                    || dy.shape.0[..ids.shape.rank()] != ids.shape.0[..]
                {
                    return Err(err("dy must be ids' shape plus a hidden axis".into()));
                }
                let h = *dy.shape.0.last().expect("rank checked above");
                one(TensorType::new(dy.dtype, [Dim::lit(*vocab), h]))
            }
            Op::CrossEntropyGrad | Op::VocabParallelCrossEntropyGrad { .. } => {
                if let Op::VocabParallelCrossEntropyGrad { parts: 0 } = self {
                    return Err(err("group size must be positive".into()));
                }
                let (dloss, logits, labels) = (inputs[0], inputs[1], inputs[2]);
                if dloss.shape.rank() != 0 || !dloss.dtype.is_float() {
                    return Err(err("dloss must be a float scalar".into()));
                }
                float(1)?;
                if !labels.dtype.is_int()
                    || logits.shape.rank() != labels.shape.rank() + 1
                    || logits.shape.0[..labels.shape.rank()] != labels.shape.0[..]
                {
                    return Err(err("logits must be labels' shape plus a vocab axis".into()));
                }
                one(logits.clone())
            }
            Op::FlashAttentionGrad { sinks, .. } => {
                let (d_o, q, k, v, o) = (inputs[0], inputs[1], inputs[2], inputs[3], inputs[4]);
                float(0)?;
                if d_o.shape != q.shape || o.shape != q.shape || k != v {
                    return Err(err("do, q and o must share a shape; k and v a type".into()));
                }
                attention_shapes(q, k).map_err(err)?;
                let n = 5 + usize::from(*sinks);
                if inputs.len() != n {
                    return Err(err(format!("takes {n} inputs, got {}", inputs.len())));
                }
                let mut out = vec![
                    q.with_dtype(d_o.dtype),
                    k.with_dtype(d_o.dtype),
                    v.with_dtype(d_o.dtype),
                ];
                if *sinks {
                    sinks_of(q, inputs[5]).map_err(err)?;
                    out.push(inputs[5].clone());
                }
                Ok(Some(out))
            }
            Op::AdamW { .. } => {
                let (p, g, m, v) = (inputs[0], inputs[1], inputs[2], inputs[3]);
                float(0)?;
                float(1)?;
                if g.shape != p.shape || m != p || v != p {
                    return Err(err(
                        "grad must match the param's shape, moments its type".into()
                    ));
                }
                Ok(Some(vec![p.clone(), m.clone(), v.clone()]))
            }
            Op::AllReduce { parts } => {
                if *parts == 0 {
                    return Err(err("group size must be positive".into()));
                }
                float(0)?;
                one(inputs[0].clone())
            }
            Op::AllGather { axis, parts } | Op::TpGather { axis, parts } => {
                let ax = axis_ok(*axis, inputs[0].shape.rank())
                    .ok_or_else(|| err(format!("axis {axis} out of range")))?;
                let mut t = inputs[0].clone();
                t.shape.0[ax] = t.shape.0[ax]
                    .checked_mul(Dim::lit(u64::from(*parts)))
                    .filter(|_| *parts > 0)
                    .ok_or_else(|| err("bad group size".into()))?;
                one(t)
            }
            Op::ReduceScatter { axis, parts } => {
                float(0)?;
                let ax = axis_ok(*axis, inputs[0].shape.rank())
                    .ok_or_else(|| err(format!("axis {axis} out of range")))?;
                let mut t = inputs[0].clone();
                t.shape.0[ax] = split_dim(t.shape.0[ax], *parts).map_err(err)?;
                one(t)
            }
            Op::AllToAll {
                split,
                concat,
                parts,
            } => {
                let rank = inputs[0].shape.rank();
                let s = axis_ok(*split, rank)
                    .ok_or_else(|| err(format!("axis {split} out of range")))?;
                let c = axis_ok(*concat, rank)
                    .ok_or_else(|| err(format!("axis {concat} out of range")))?;
                let mut t = inputs[0].clone();
                t.shape.0[s] = split_dim(t.shape.0[s], *parts).map_err(err)?;
                t.shape.0[c] = t.shape.0[c]
                    .checked_mul(Dim::lit(u64::from(*parts)))
                    .ok_or_else(|| err("size overflows".into()))?;
                one(t)
            }
            Op::Send { .. } => Ok(Some(vec![])),
            Op::TpCopy { parts } => {
                if *parts == 0 {
                    return Err(err("group size must be positive".into()));
                }
                one(inputs[0].clone())
            }
            Op::TpSplit { axis, parts } => {
                let ax = axis_ok(*axis, inputs[0].shape.rank())
                    .ok_or_else(|| err(format!("axis {axis} out of range")))?;
                let mut t = inputs[0].clone();
                t.shape.0[ax] = split_dim(t.shape.0[ax], *parts).map_err(err)?;
                one(t)
            }
            Op::MoeRoute { topk, .. } => {
                float(0)?;
                rank_at_least(0, 1)?;
                let t = inputs[0];
                let e = t.shape.last().and_then(Dim::as_lit);
                if !e.is_some_and(|e| *topk > 0 && *topk <= e) {
                    return Err(err(format!(
                        "top-{topk} needs a literal expert axis of at least {topk}"
                    )));
                }
                let mut sel = t.shape.0.clone();
                *sel.last_mut().expect("rank ≥ 1") = Dim::lit(*topk);
                Ok(Some(vec![
                    TensorType::new(t.dtype, sel.clone()),
                    TensorType::new(DType::F32, t.shape.0.clone()),
                    TensorType::new(DType::I64, sel),
                ]))
            }
            Op::MoeRouteGrad { topk, .. } => {
                float(0)?;
                let (dw, probs, idx) = (inputs[0], inputs[1], inputs[2]);
                let lead = |t: &TensorType| t.shape.0.split_last().map(|(_, l)| l.to_vec());
                if dw.shape != idx.shape
                    || idx.dtype.is_float()
                    || dw.shape.last() != Some(Dim::lit(*topk))
                    || lead(dw) != lead(probs)
                {
                    return Err(err(
                        "(dweights[.., k], probs[.., E], indices[.., k]) must agree".into(),
                    ));
                }
                one(TensorType::new(dw.dtype, probs.shape.0.clone()))
            }
            Op::MoeDispatch { capacity, .. } | Op::MoeDispatchGrad { capacity, .. } => {
                let grad = matches!(self, Op::MoeDispatchGrad { .. });
                float(0)?;
                let (x, idx) = (inputs[0], inputs[1]);
                let (tokens, k) = routed(idx).map_err(err)?;
                let rows = moe_rows(tokens, k, *capacity).map_err(err)?;
                let h = x.shape.last().ok_or_else(|| err("rank 0 input".into()))?;
                if grad {
                    if x.shape.0[..] != [rows, h] {
                        return Err(err(format!("drows must be [{rows}, h]")));
                    }
                    let mut dims = idx.shape.0.clone();
                    *dims.last_mut().expect("rank ≥ 1") = h;
                    one(TensorType::new(x.dtype, dims))
                } else {
                    if x.shape.0.split_last().map(|(_, l)| l)
                        != idx.shape.0.split_last().map(|(_, l)| l)
                    {
                        return Err(err("x and indices must share the token dims".into()));
                    }
                    one(TensorType::new(x.dtype, [rows, h]))
                }
            }
            Op::GroupedMatMul { tb } => {
                float(0)?;
                let (a, w) = (inputs[0], inputs[1]);
                if a.dtype != w.dtype || a.shape.rank() != 2 || w.shape.rank() != 3 {
                    return Err(err("takes rows[R, k] and w[E, k, n] of one dtype".into()));
                }
                let (kw, n) = if *tb {
                    (w.shape.0[2], w.shape.0[1])
                } else {
                    (w.shape.0[1], w.shape.0[2])
                };
                if a.shape.0[1] != kw {
                    return Err(err(format!(
                        "contraction dims differ: {} vs {kw}",
                        a.shape.0[1]
                    )));
                }
                one(TensorType::new(a.dtype, [a.shape.0[0], n]))
            }
            Op::GroupedMatMulWgrad { experts, tb } => {
                float(0)?;
                let (a, dy) = (inputs[0], inputs[1]);
                if a.dtype != dy.dtype
                    || a.shape.rank() != 2
                    || dy.shape.rank() != 2
                    || a.shape.0[0] != dy.shape.0[0]
                {
                    return Err(err("takes rows[R, k] and dy[R, n] of one dtype".into()));
                }
                let (k, n) = (a.shape.0[1], dy.shape.0[1]);
                let e = Dim::lit(*experts);
                let dims = if *tb { [e, n, k] } else { [e, k, n] };
                one(TensorType::new(a.dtype, dims))
            }
            Op::GroupedBiasAdd => {
                float(0)?;
                let (x, bias) = (inputs[0], inputs[1]);
                if x.dtype != bias.dtype
                    || x.shape.rank() != 2
                    || bias.shape.rank() != 2
                    || x.shape.0[1] != bias.shape.0[1]
                {
                    return Err(err("takes rows[R, n] and bias[E, n] of one dtype".into()));
                }
                grouped_rows(x.shape.0[0], bias.shape.0[0]).map_err(err)?;
                one(x.clone())
            }
            Op::GroupedBiasAddGrad { experts } => {
                float(0)?;
                let dy = inputs[0];
                if dy.shape.rank() != 2 {
                    return Err(err("takes dy[R, n]".into()));
                }
                let e = Dim::lit(*experts);
                grouped_rows(dy.shape.0[0], e).map_err(err)?;
                one(TensorType::new(dy.dtype, [e, dy.shape.0[1]]))
            }
            Op::MoeCombine { capacity, .. } | Op::MoeCombineGrad { capacity, .. } => {
                let grad = matches!(self, Op::MoeCombineGrad { .. });
                float(0)?;
                let off = usize::from(grad);
                let (y, w, idx) = (inputs[off], inputs[off + 1], inputs[off + 2]);
                let (tokens, k) = routed(idx).map_err(err)?;
                let rows = moe_rows(tokens, k, *capacity).map_err(err)?;
                let h = y.shape.last().ok_or_else(|| err("rank 0 input".into()))?;
                if y.shape.0[..] != [rows, h] || w.shape != idx.shape || w.dtype != y.dtype {
                    return Err(err(format!(
                        "takes y[{rows}, h] and weights of the indices' shape in y's dtype"
                    )));
                }
                let mut dims = idx.shape.0.clone();
                *dims.last_mut().expect("rank ≥ 1") = h;
                let out = TensorType::new(y.dtype, dims);
                if grad {
                    if inputs[0] != &out {
                        return Err(err(format!("dout must be {out}")));
                    }
                    Ok(Some(vec![y.clone(), w.clone()]))
                } else {
                    one(out)
                }
            }
        }
    }
}

/// The token count `T` (product of the leading dims) and `k` of routing indices
/// `[.., k]` (integer).
fn routed(idx: &TensorType) -> Result<(Dim, u64), String> {
    if idx.dtype.is_float() || idx.shape.rank() < 2 {
        return Err("indices must be an integer [.., k] of rank ≥ 2".into());
    }
    let (k, lead) = idx.shape.0.split_last().expect("rank ≥ 2");
    let k = k.as_lit().ok_or("k must be literal")?;
    let tokens = lead
        .iter()
        .try_fold(Dim::lit(1), |acc, &d| acc.checked_mul(d))
        .ok_or("token count overflows")?;
    Ok((tokens, k))
}

/// Denominator a capacity factor is read with: factors are exact in thousandths.
const CAPACITY_DENOM: u64 = 1000;

/// Rows of the dispatch buffer for `tokens` tokens choosing `k` experts each: `k·T`
/// without a capacity factor (dropless), `c·k·T` with one (`E` buffers of `c·k·T/E`
/// rows, as Megatron-LM's `--moe-expert-capacity-factor` with `--moe-pad-expert-input-to-capacity`
/// sizes them).
///
/// # Errors
/// A message when `c` is not positive or not a whole number of thousandths.
pub fn moe_rows(tokens: Dim, k: u64, capacity: Option<f64>) -> Result<Dim, String> {
    let routed = tokens
        .checked_mul(Dim::lit(k))
        .ok_or("routed rows overflow")?;
    let Some(c) = capacity else {
        return Ok(routed);
    };
    let scaled = c * CAPACITY_DENOM as f64;
    if !(c > 0.0 && scaled.is_finite() && scaled < 1e12 && (scaled - scaled.round()).abs() < 1e-6) {
        return Err(format!(
            "capacity factor {c} must be positive, in thousandths"
        ));
    }
    routed
        .checked_mul(Dim::lit(scaled.round() as u64))
        .and_then(|d| d.checked_div(CAPACITY_DENOM))
        .ok_or_else(|| "routed rows overflow".into())
}

/// `dim / parts`, requiring exact division of literal dims (symbolic dims may carry a
/// divisor such as `s/8`; the environment must make it whole).
///
/// # Errors
/// A message when `parts` is zero or does not divide a literal `dim`.
pub fn split_dim(dim: Dim, parts: u32) -> Result<Dim, String> {
    if parts == 0 {
        return Err("group size must be positive".into());
    }
    if dim.as_lit().is_some() && !dim.divisible_by(u64::from(parts)) {
        return Err(format!("{dim} is not divisible by {parts}"));
    }
    dim.checked_div(u64::from(parts))
        .ok_or_else(|| "bad group size".into())
}

/// The sinks input of an attention op with `sinks`: one value per query head,
/// `[a]` of `q[b, s, a, d]`, a float.
fn sinks_of(q: &TensorType, sinks: &TensorType) -> Result<(), String> {
    let heads = q.shape.0.get(2).copied();
    if !sinks.dtype.is_float() || sinks.shape.rank() != 1 || Some(sinks.shape.0[0]) != heads {
        return Err(format!(
            "sinks must be a float vector of q's heads, [{}]",
            heads.map_or_else(|| "?".to_string(), |h| h.to_string())
        ));
    }
    Ok(())
}

/// The expert count of a grouped op: a positive literal. (The rows are the experts'
/// groups in order, balanced as [`Op::GroupedMatMul`] prices them; a row count the
/// experts do not divide is left to the runtime's uneven groups.)
fn grouped_rows(_rows: Dim, experts: Dim) -> Result<(), String> {
    experts
        .as_lit()
        .filter(|&e| e > 0)
        .map(|_| ())
        .ok_or_else(|| format!("the expert count must be a positive literal, not {experts}"))
}

/// The additive mask of [`Op::Sdpa`]: `[b, s, t]` for `q[b,s,..]`, `k[b,t,..]`, in `q`'s dtype.
fn sdpa_mask(q: &TensorType, k: &TensorType, mask: &TensorType) -> Result<(), String> {
    let want = [q.shape.0[0], q.shape.0[1], k.shape.0[1]];
    if mask.dtype != q.dtype || mask.shape.0[..] != want[..] {
        return Err("the mask must be [b, s, t] in q's dtype".into());
    }
    Ok(())
}

fn attention_shapes(q: &TensorType, k: &TensorType) -> Result<(), String> {
    if q.shape.rank() != 4 || k.shape.rank() != 4 {
        return Err("q, k, v must be [b, s, heads, d]".into());
    }
    let (qd, kd) = (&q.shape.0, &k.shape.0);
    if qd[0] != kd[0] || qd[3] != kd[3] {
        return Err("q and k must agree on batch and head dim".into());
    }
    match (qd[2].as_lit(), kd[2].as_lit()) {
        (Some(a), Some(kv)) if kv > 0 && a % kv == 0 => Ok(()),
        _ => Err("query heads must be a multiple of key/value heads".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DType, Dim, TensorType};

    /// A norm's epsilon is a finite non-negative number; the text and JSON forms cannot
    /// spell NaN or infinity, but a binary graph can.
    #[test]
    fn norm_epsilons_must_be_finite_and_non_negative() {
        let x = TensorType::new(DType::F32, [Dim::batch(), Dim::lit(8)]);
        let w = TensorType::new(DType::F32, [Dim::lit(8)]);
        for (eps, ok) in [
            (1e-5, true),
            (0.0, true),
            (-1e-5, false),
            (f64::NAN, false),
            (f64::INFINITY, false),
        ] {
            let got = Op::RmsNorm { eps }.infer(&[&x, &w]);
            assert_eq!(got.is_ok(), ok, "eps {eps}: {got:?}");
        }
    }
}
