//! The closed set of operators, their attributes and the op table.
//!
//! Every consumer of ops (verifier, printer, parser, cost model, autodiff, the
//! sharding language) matches [`Op`] exhaustively. [`OpKind::info`] is the op
//! table: name, arity, result count, attribute names, class and the tensors the
//! op's derivative rule saves for backward. `ir-spec/README.md` mirrors it and a
//! test keeps the two in agreement.
//!
//! The module is split by concern: `table` (kinds, names, arity, classes and the
//! predicates derived from them), `attrs` (typed attributes by name), `shape`
//! (shape and dtype inference) and `cost` (FLOPs and bytes).

mod attrs;
mod cost;
mod shape;
mod table;

pub use attrs::{AttrError, AttrValue};
pub use cost::{attention_pairs, flops_per_element, Gemm, OpCost};
pub use shape::{moe_rows, split_dim, ShapeError, FP8_GEMM_OUT};
pub use table::{Arity, OpClass, OpInfo, OpKind, Saved};

use super::types::{DType, Shape};
use serde::{Deserialize, Serialize};

/// An operator with its typed attributes.
///
/// Layouts follow Megatron-LM: activations are `[b, s, h]` (or `[b*s, h]`), attention
/// heads are split as `[b, s, heads, d]`, the decomposed attention core works on
/// `[b, heads, s, d]`. All ops have value semantics; [`Op::is_view`] marks the ones a
/// runtime implements without a copy (the memory model lets their result share the
/// input's storage).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    // ---- sources (result type declared, not inferred) ----
    /// A data input of the step (token ids, labels).
    Input {
        /// Name of the input.
        name: String,
    },
    /// A trainable parameter.
    Param {
        /// Dotted parameter name (`layers.3.attn.qkv.weight`).
        name: String,
    },
    /// An optimizer state tensor (Adam moments).
    State {
        /// State name (`exp_avg.layers.3.attn.qkv.weight`).
        name: String,
    },
    /// A tensor filled with one value (the loss seed `dL/dL = 1`).
    Constant {
        /// The fill value.
        value: f64,
    },
    /// Receives a tensor from pipeline stage `peer`.
    Recv {
        /// Sending stage.
        peer: u32,
    },

    // ---- compute ----
    /// Batched matrix product `a[.., m, k] · b[.., k, n]`; `b` may be a rank-2 weight
    /// broadcast over `a`'s leading dims. `ta`/`tb` transpose the last two dims first.
    MatMul {
        /// Transpose `a`'s last two dims.
        ta: bool,
        /// Transpose `b`'s last two dims.
        tb: bool,
    },
    /// Elementwise `a + b` (same type).
    Add,
    /// Elementwise `a · b` (same type).
    Mul,
    /// `factor · x`.
    Scale {
        /// The multiplier.
        factor: f64,
    },
    /// `x[.., n] + bias[n]`.
    BiasAdd,
    /// GeLU (tanh approximation).
    Gelu,
    /// SiLU `x · σ(x)`.
    Silu,
    /// Fused scale, optional causal mask and softmax over the last axis.
    Softmax {
        /// Mask key positions after the query position (last two axes are query, key).
        causal: bool,
        /// Scale applied to the input before the mask.
        scale: f64,
    },
    /// Dropout with keep probability `1 - p`; results: output and the 1-byte mask.
    Dropout {
        /// Drop probability.
        p: f64,
    },
    /// LayerNorm over the last axis: `(x, gamma, beta)`.
    LayerNorm {
        /// Epsilon.
        eps: f64,
    },
    /// RMSNorm over the last axis: `(x, gamma)`.
    RmsNorm {
        /// Epsilon.
        eps: f64,
    },
    /// Rotary position embedding on `x[b, s, heads, d]` (positions along axis 1),
    /// rotating the first `dims` channels of `d`.
    Rotary {
        /// Rotated channels (even, ≤ d).
        dims: u64,
        /// Frequency base.
        theta: f64,
    },
    /// Row lookup `table[ids]`: `(table[V, h], ids[..]) → [.., h]`.
    Embedding,
    /// Reinterprets the element order under a new shape (same element count).
    Reshape {
        /// The result shape.
        shape: Shape,
    },
    /// Permutes axes: result axis `i` is input axis `perm[i]`.
    Transpose {
        /// The permutation.
        perm: Vec<u32>,
    },
    /// `x[.., start..start+len, ..]` along `axis` (a literal dimension).
    Slice {
        /// Axis.
        axis: u32,
        /// First index.
        start: u64,
        /// Length.
        len: u64,
    },
    /// Concatenation of one or more tensors along `axis`.
    Concat {
        /// Axis.
        axis: u32,
    },
    /// Zero padding along `axis` (the derivative of [`Op::Slice`]).
    Pad {
        /// Axis.
        axis: u32,
        /// Zeros before.
        before: u64,
        /// Zeros after.
        after: u64,
    },
    /// Repeats every index of `axis` `times` times (`repeat_interleave`, GQA key/value heads).
    Repeat {
        /// Axis.
        axis: u32,
        /// Repetitions.
        times: u64,
    },
    /// Broadcasts to `shape` by inserting the axes listed in `axes`.
    Broadcast {
        /// Result axes that the input does not have.
        axes: Vec<u32>,
        /// Result shape.
        shape: Shape,
    },
    /// Sum over `axes` (removed from the shape).
    ReduceSum {
        /// Axes to reduce, ascending.
        axes: Vec<u32>,
    },
    /// Element type conversion.
    Cast {
        /// Target dtype.
        to: DType,
    },
    /// Elementwise power `x^exponent` (PyTorch's `pow` with a scalar exponent; its
    /// derivative reads `x`).
    Pow {
        /// The exponent.
        exponent: f64,
    },
    /// Elementwise `min(max(x, min), max)` (PyTorch's `clamp`; an absent bound does not
    /// clamp; at least one is set). Its derivative reads `x`.
    Clamp {
        /// Lower bound. Printed only when set.
        min: Option<f64>,
        /// Upper bound. Printed only when set.
        max: Option<f64>,
    },
    /// Elementwise hyperbolic tangent (its derivative reads the result).
    Tanh,
    /// Elementwise reciprocal square root `1/√x` (its derivative reads the result).
    Rsqrt,
    /// `x + value` (PyTorch's addition of a Python scalar).
    Shift {
        /// The added constant.
        value: f64,
    },
    /// A copy of `x` into a fresh buffer (the copy PyTorch makes when it reshapes a
    /// strided view that no view can express, and `.contiguous()`). Unlike the views,
    /// its result does not share the input's storage.
    Contiguous,
    /// Mean token cross-entropy: `(logits[.., V], labels[..]) → f32[]`.
    CrossEntropy,
    /// PyTorch's `scaled_dot_product_attention` on its flash kernel:
    /// `(q[b,s,a,d], k[b,t,kv,d], v[b,t,kv,d][, mask[b,s,t]]) → (o[b,s,a,d], lse f32[b,s,a])`.
    /// Besides the output it returns the row log-sum-exp of the scores, which its
    /// derivative reads with `q`, `k`, `v`, `o` and the additive mask when one is given.
    Sdpa {
        /// Causal mask (applied in the kernel, without a mask tensor).
        causal: bool,
        /// Softmax scale.
        scale: f64,
        /// Sliding window: each query sees only the `w` latest keys up to its own
        /// position (keys `i-w+1 ..= i`); `None` for every key. Printed only when set.
        window: Option<u64>,
        /// Attention sinks: the last input is a learned logit per head, `sinks[a]`,
        /// an extra term `exp(sinks[h])` in every row's softmax denominator (gpt-oss);
        /// the gradient op then also takes `sinks` and returns `dsinks[a]`. Printed
        /// only when set.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        sinks: bool,
    },
    /// Fused attention (no `s×s` tensor): `(q[b,s,a,d], k[b,s,kv,d], v[b,s,kv,d][,
    /// sinks[a]]) → [b,s,a,d]`.
    FlashAttention {
        /// Causal mask.
        causal: bool,
        /// Softmax scale.
        scale: f64,
        /// Sliding window: each query sees only the `w` latest keys up to its own
        /// position (keys `i-w+1 ..= i`); `None` for every key. Printed only when set.
        window: Option<u64>,
        /// Attention sinks: the last input is a learned logit per head, `sinks[a]`,
        /// an extra term `exp(sinks[h])` in every row's softmax denominator (gpt-oss);
        /// the gradient op then also takes `sinks` and returns `dsinks[a]`. Printed
        /// only when set.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        sinks: bool,
    },

    // ---- backward ----
    /// `(dy, x) → dx` of GeLU.
    GeluGrad,
    /// `(dy, x) → dx` of SiLU.
    SiluGrad,
    /// `(dy, x) → dx` of [`Op::Clamp`]: `dy` where `x` is inside the bounds, 0 outside.
    ClampGrad {
        /// The forward's lower bound.
        min: Option<f64>,
        /// The forward's upper bound.
        max: Option<f64>,
    },
    /// `(dy, y) → dx` of the fused scale-mask-softmax.
    SoftmaxGrad {
        /// The forward scale.
        scale: f64,
    },
    /// `(dy, mask) → dx` of dropout.
    DropoutGrad {
        /// Drop probability.
        p: f64,
    },
    /// `(dy, x, gamma) → (dx, dgamma, dbeta)` of LayerNorm (statistics recomputed).
    LayerNormGrad {
        /// Epsilon.
        eps: f64,
    },
    /// `(dy, x, gamma) → (dx, dgamma)` of RMSNorm.
    RmsNormGrad {
        /// Epsilon.
        eps: f64,
    },
    /// `dy → dx` of rotary embedding (the inverse rotation).
    RotaryGrad {
        /// Rotated channels.
        dims: u64,
        /// Frequency base.
        theta: f64,
    },
    /// `(dy[.., h], ids[..]) → dtable[vocab, h]` (scatter-add).
    EmbeddingGrad {
        /// Table rows.
        vocab: u64,
    },
    /// `(dloss, logits, labels) → dlogits`.
    CrossEntropyGrad,
    /// `(do, q, k, v, o[, sinks]) → (dq, dk, dv[, dsinks])`; recomputes the attention
    /// scores.
    FlashAttentionGrad {
        /// Causal mask.
        causal: bool,
        /// Softmax scale.
        scale: f64,
        /// Sliding window: each query sees only the `w` latest keys up to its own
        /// position (keys `i-w+1 ..= i`); `None` for every key. Printed only when set.
        window: Option<u64>,
        /// Attention sinks: the last input is a learned logit per head, `sinks[a]`,
        /// an extra term `exp(sinks[h])` in every row's softmax denominator (gpt-oss);
        /// the gradient op then also takes `sinks` and returns `dsinks[a]`. Printed
        /// only when set.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        sinks: bool,
    },

    /// `(do, q, k, v, o, lse[, mask][, sinks]) → (dq, dk, dv[, dsinks])` of [`Op::Sdpa`].
    SdpaGrad {
        /// Causal mask.
        causal: bool,
        /// Softmax scale.
        scale: f64,
        /// Sliding window: each query sees only the `w` latest keys up to its own
        /// position (keys `i-w+1 ..= i`); `None` for every key. Printed only when set.
        window: Option<u64>,
        /// Attention sinks: the last input is a learned logit per head, `sinks[a]`,
        /// an extra term `exp(sinks[h])` in every row's softmax denominator (gpt-oss);
        /// the gradient op then also takes `sinks` and returns `dsinks[a]`. Printed
        /// only when set.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        sinks: bool,
    },

    // ---- optimizer ----
    /// AdamW step: `(param, grad, m, v) → (param', m', v')`, updated in place.
    AdamW {
        /// Learning rate.
        lr: f64,
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Denominator epsilon.
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },

    // ---- communication (per-device view, `parts` devices in the group) ----
    /// Sum over the group; every device gets the sum.
    AllReduce {
        /// Group size.
        parts: u32,
    },
    /// Concatenates the group's pieces along `axis`.
    AllGather {
        /// Axis.
        axis: u32,
        /// Group size.
        parts: u32,
    },
    /// Sums over the group and keeps this device's `1/parts` slice of `axis`.
    ReduceScatter {
        /// Axis.
        axis: u32,
        /// Group size.
        parts: u32,
    },
    /// Splits `split` into `parts` pieces, exchanges them, concatenates along `concat`.
    AllToAll {
        /// Axis split and sent.
        split: u32,
        /// Axis received pieces are concatenated on.
        concat: u32,
        /// Group size.
        parts: u32,
    },
    /// Sends a tensor to pipeline stage `peer` (no result).
    Send {
        /// Receiving stage.
        peer: u32,
    },

    // ---- tensor-parallel regions (per-device view; `rank` is the device's index in
    // its tensor-parallel group of `parts` devices) ----
    /// Identity forward; its derivative all-reduces over the group (Megatron-LM's
    /// "copy to tensor-parallel region"): marks a replicated tensor whose uses produce
    /// partial gradients.
    TpCopy {
        /// Group size.
        parts: u32,
    },
    /// Keeps this device's `1/parts` slice of `axis` (slice `rank`) of a replicated
    /// tensor; its derivative all-gathers (Megatron-LM's "scatter to region").
    TpSplit {
        /// Axis.
        axis: u32,
        /// Group size.
        parts: u32,
    },
    /// All-gather along `axis` whose derivative keeps this device's slice of the
    /// (replicated) gradient instead of reduce-scattering it (Megatron-LM's "gather
    /// from tensor-parallel region").
    TpGather {
        /// Axis.
        axis: u32,
        /// Group size.
        parts: u32,
    },
    /// Vocabulary-parallel lookup `(table[V/parts, h], ids[..]) → [.., h]`: this device
    /// holds rows `rank·V/parts ..` of the table; ids outside that range give zero
    /// rows, so the group's results sum to the full lookup.
    VocabParallelEmbedding {
        /// Group size.
        parts: u32,
    },
    /// `(dy[.., h], ids[..]) → dtable[vocab, h]` of [`Op::VocabParallelEmbedding`]:
    /// scatter-add of the rows whose ids fall in this device's range.
    VocabParallelEmbeddingGrad {
        /// Rows of this device's table shard.
        vocab: u64,
        /// Group size.
        parts: u32,
    },
    /// Mean token cross-entropy over logits split by vocabulary:
    /// `(logits[.., V/parts], labels[..]) → f32[]`, every device getting the full
    /// loss (the row maxima, exponential sums and target logits are all-reduced).
    VocabParallelCrossEntropy {
        /// Group size.
        parts: u32,
    },
    /// `(dloss, logits[.., V/parts], labels) → dlogits[.., V/parts]` of
    /// [`Op::VocabParallelCrossEntropy`] (recomputes the all-reduced statistics).
    VocabParallelCrossEntropyGrad {
        /// Group size.
        parts: u32,
    },

    // ---- mixture of experts (see `ir-spec/README.md`, "Mixture of experts") ----
    /// Router scoring and top-`k` selection: `logits[.., E] → (weights[.., k],
    /// probs f32[.., E], indices i64[.., k])`. `probs` are the scores of all `E`
    /// experts (softmax, or the sigmoid with `sigmoid`): with `indices` they are the
    /// auxiliary load-balancing loss's inputs; `weights` are the selected experts'
    /// scores, in the logits' dtype. Its derivative reads `probs` and `indices`.
    MoeRoute {
        /// Experts chosen per token.
        topk: u64,
        /// Sigmoid scores (DeepSeek-V3) instead of the softmax.
        sigmoid: bool,
    },
    /// `(dweights, probs, indices) → dlogits` of [`Op::MoeRoute`].
    MoeRouteGrad {
        /// Experts chosen per token.
        topk: u64,
        /// Sigmoid scores.
        sigmoid: bool,
    },
    /// Token dispatch: `(x[.., h], indices[.., k]) → rows[R, h]`, every token copied
    /// once for each expert it chose, grouped by expert. `R = c·k·T` for `T` tokens
    /// (the product of `x`'s leading dims): `E` buffers of `c·k·T/E` rows each with a
    /// capacity factor `c` (tokens past an expert's capacity are dropped, empty slots
    /// padded), exactly `k·T` rows without one (dropless).
    MoeDispatch {
        /// Experts `E`.
        experts: u64,
        /// Capacity factor `c`; `None`: dropless. Printed only when set.
        capacity: Option<f64>,
    },
    /// `(drows[R, h], indices[.., k]) → dx[.., h]` of [`Op::MoeDispatch`] (the rows of
    /// each token summed back).
    MoeDispatchGrad {
        /// Experts `E`.
        experts: u64,
        /// Capacity factor; `None`: dropless.
        capacity: Option<f64>,
    },
    /// Grouped expert matmul: `(rows[R, k], w[E, k, n]) → [R, n]`, each expert's rows
    /// times that expert's weight (`tb`: `w` is `[E, n, k]`). `2·R·k·n` FLOPs: `k`
    /// experts' worth per token (times the capacity factor).
    GroupedMatMul {
        /// Transpose `w`'s last two dims.
        tb: bool,
    },
    /// `(rows[R, k], dy[R, n]) → dw[E, k, n]` of [`Op::GroupedMatMul`] (`dw[E, n, k]`
    /// when `tb`).
    GroupedMatMulWgrad {
        /// Experts `E`.
        experts: u64,
        /// The forward's `tb`.
        tb: bool,
    },
    /// Per-expert bias: `(rows[R, n], bias[E, n]) → [R, n]`, each expert's rows (the
    /// `R/E` rows of each expert's group, in expert order, as [`Op::GroupedMatMul`]
    /// reads them) plus that expert's bias row.
    GroupedBiasAdd,
    /// `dy[R, n] → dbias[E, n]` of [`Op::GroupedBiasAdd`]: each expert's rows summed.
    GroupedBiasAddGrad {
        /// Experts `E`.
        experts: u64,
    },
    /// Token combine: `(y[R, h], weights[.., k], indices[.., k]) → [.., h]`, each token
    /// the weighted sum of its `k` experts' rows. Its derivative reads all three.
    MoeCombine {
        /// Experts `E`.
        experts: u64,
        /// Capacity factor; `None`: dropless.
        capacity: Option<f64>,
    },
    /// `(dout[.., h], y, weights, indices) → (dy[R, h], dweights[.., k])` of
    /// [`Op::MoeCombine`].
    MoeCombineGrad {
        /// Experts `E`.
        experts: u64,
        /// Capacity factor; `None`: dropless.
        capacity: Option<f64>,
    },
}
