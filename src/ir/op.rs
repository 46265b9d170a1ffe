//! The closed set of operators, their attributes and the op table.
//!
//! Every consumer of ops (verifier, printer, parser, cost model, autodiff, the
//! sharding language) matches [`Op`] exhaustively. [`OpKind::info`] is the op
//! table: name, arity, result count, attribute names, class and the tensors the
//! op's derivative rule saves for backward. `ir-spec/README.md` mirrors it and a
//! test keeps the two in agreement.

use super::types::{DType, Dim, Env, Shape, TensorType};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use thiserror::Error;

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
    /// Mean token cross-entropy: `(logits[.., V], labels[..]) → f32[]`.
    CrossEntropy,
    /// Fused attention (no `s×s` tensor): `(q[b,s,a,d], k[b,s,kv,d], v[b,s,kv,d]) → [b,s,a,d]`.
    FlashAttention {
        /// Causal mask.
        causal: bool,
        /// Softmax scale.
        scale: f64,
    },

    // ---- backward ----
    /// `(dy, x) → dx` of GeLU.
    GeluGrad,
    /// `(dy, x) → dx` of SiLU.
    SiluGrad,
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
    /// `(do, q, k, v, o) → (dq, dk, dv)`; recomputes the attention scores.
    FlashAttentionGrad {
        /// Causal mask.
        causal: bool,
        /// Softmax scale.
        scale: f64,
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
}

/// Operator class, used by the cost model's per-class efficiencies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpClass {
    /// No compute: result type declared.
    Source,
    /// Dense matrix products.
    MatMul,
    /// Fused attention kernels.
    Attention,
    /// Elementwise and normalization kernels (memory bound).
    Elementwise,
    /// Layout changes and copies.
    Layout,
    /// Reductions and losses.
    Reduction,
    /// Optimizer update.
    Optimizer,
    /// Collectives.
    Collective,
    /// Point-to-point transfer.
    P2p,
}

/// How many inputs an op takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arity {
    /// Exactly this many.
    Exactly(usize),
    /// At least this many.
    AtLeast(usize),
}

impl Arity {
    /// Whether `n` inputs are allowed.
    pub fn accepts(self, n: usize) -> bool {
        match self {
            Arity::Exactly(k) => n == k,
            Arity::AtLeast(k) => n >= k,
        }
    }
}

impl fmt::Display for Arity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arity::Exactly(k) => write!(f, "{k}"),
            Arity::AtLeast(k) => write!(f, "{k}+"),
        }
    }
}

/// A forward tensor that an op's derivative rule keeps for backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Saved {
    /// Input `n`.
    Input(usize),
    /// Result `n`.
    Result(usize),
}

impl fmt::Display for Saved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Saved::Input(n) => write!(f, "in{n}"),
            Saved::Result(n) => write!(f, "out{n}"),
        }
    }
}

/// One row of the op table.
#[derive(Clone, Copy, Debug)]
pub struct OpInfo {
    /// Text-format name.
    pub name: &'static str,
    /// Class.
    pub class: OpClass,
    /// Inputs.
    pub arity: Arity,
    /// Number of results.
    pub results: usize,
    /// Attribute names, in print order.
    pub attrs: &'static [&'static str],
    /// Whether autodiff has a derivative rule for it.
    pub differentiable: bool,
    /// Forward tensors the derivative rule uses (empty when not differentiable).
    pub saves: &'static [Saved],
}

macro_rules! op_kinds {
    ($($kind:ident),* $(,)?) => {
        /// The kind of an [`Op`], without attributes.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum OpKind { $(
            #[allow(missing_docs)]
            $kind
        ),* }

        impl OpKind {
            /// Every kind, in table order.
            pub const ALL: &'static [OpKind] = &[$(OpKind::$kind),*];
        }
    };
}

op_kinds!(
    Input,
    Param,
    State,
    Constant,
    Recv,
    MatMul,
    Add,
    Mul,
    Scale,
    BiasAdd,
    Gelu,
    Silu,
    Softmax,
    Dropout,
    LayerNorm,
    RmsNorm,
    Rotary,
    Embedding,
    Reshape,
    Transpose,
    Slice,
    Concat,
    Pad,
    Repeat,
    Broadcast,
    ReduceSum,
    Cast,
    CrossEntropy,
    FlashAttention,
    GeluGrad,
    SiluGrad,
    SoftmaxGrad,
    DropoutGrad,
    LayerNormGrad,
    RmsNormGrad,
    RotaryGrad,
    EmbeddingGrad,
    CrossEntropyGrad,
    FlashAttentionGrad,
    AdamW,
    AllReduce,
    AllGather,
    ReduceScatter,
    AllToAll,
    Send,
    TpCopy,
    TpSplit,
    TpGather,
    VocabParallelEmbedding,
    VocabParallelEmbeddingGrad,
    VocabParallelCrossEntropy,
    VocabParallelCrossEntropyGrad,
);

const fn info(
    name: &'static str,
    class: OpClass,
    arity: Arity,
    results: usize,
    attrs: &'static [&'static str],
    differentiable: bool,
    saves: &'static [Saved],
) -> OpInfo {
    OpInfo {
        name,
        class,
        arity,
        results,
        attrs,
        differentiable,
        saves,
    }
}

impl OpKind {
    /// The op table row.
    pub const fn info(self) -> OpInfo {
        use Arity::{AtLeast, Exactly as N};
        use OpClass as C;
        use Saved::{Input as I, Result as R};
        match self {
            OpKind::Input => info("input", C::Source, N(0), 1, &["name"], true, &[]),
            OpKind::Param => info("param", C::Source, N(0), 1, &["name"], true, &[]),
            OpKind::State => info("state", C::Source, N(0), 1, &["name"], false, &[]),
            OpKind::Constant => info("constant", C::Source, N(0), 1, &["value"], true, &[]),
            OpKind::Recv => info("recv", C::P2p, N(0), 1, &["peer"], false, &[]),
            OpKind::MatMul => info(
                "matmul",
                C::MatMul,
                N(2),
                1,
                &["ta", "tb"],
                true,
                &[I(0), I(1)],
            ),
            OpKind::Add => info("add", C::Elementwise, N(2), 1, &[], true, &[]),
            OpKind::Mul => info("mul", C::Elementwise, N(2), 1, &[], true, &[I(0), I(1)]),
            OpKind::Scale => info("scale", C::Elementwise, N(1), 1, &["factor"], true, &[]),
            OpKind::BiasAdd => info("bias_add", C::Elementwise, N(2), 1, &[], true, &[]),
            OpKind::Gelu => info("gelu", C::Elementwise, N(1), 1, &[], true, &[I(0)]),
            OpKind::Silu => info("silu", C::Elementwise, N(1), 1, &[], true, &[I(0)]),
            OpKind::Softmax => info(
                "softmax",
                C::Elementwise,
                N(1),
                1,
                &["causal", "scale"],
                true,
                &[R(0)],
            ),
            OpKind::Dropout => info("dropout", C::Elementwise, N(1), 2, &["p"], true, &[R(1)]),
            OpKind::LayerNorm => info(
                "layernorm",
                C::Elementwise,
                N(3),
                1,
                &["eps"],
                true,
                &[I(0), I(1)],
            ),
            OpKind::RmsNorm => info(
                "rmsnorm",
                C::Elementwise,
                N(2),
                1,
                &["eps"],
                true,
                &[I(0), I(1)],
            ),
            OpKind::Rotary => info(
                "rotary",
                C::Elementwise,
                N(1),
                1,
                &["dims", "theta"],
                true,
                &[],
            ),
            OpKind::Embedding => info("embedding", C::Layout, N(2), 1, &[], true, &[I(1)]),
            OpKind::Reshape => info("reshape", C::Layout, N(1), 1, &["shape"], true, &[]),
            OpKind::Transpose => info("transpose", C::Layout, N(1), 1, &["perm"], true, &[]),
            OpKind::Slice => info(
                "slice",
                C::Layout,
                N(1),
                1,
                &["axis", "start", "len"],
                true,
                &[],
            ),
            OpKind::Concat => info("concat", C::Layout, AtLeast(1), 1, &["axis"], true, &[]),
            OpKind::Pad => info(
                "pad",
                C::Layout,
                N(1),
                1,
                &["axis", "before", "after"],
                true,
                &[],
            ),
            OpKind::Repeat => info("repeat", C::Layout, N(1), 1, &["axis", "times"], true, &[]),
            OpKind::Broadcast => info(
                "broadcast",
                C::Layout,
                N(1),
                1,
                &["axes", "shape"],
                true,
                &[],
            ),
            OpKind::ReduceSum => info("reduce_sum", C::Reduction, N(1), 1, &["axes"], true, &[]),
            OpKind::Cast => info("cast", C::Elementwise, N(1), 1, &["to"], true, &[]),
            OpKind::CrossEntropy => info(
                "cross_entropy",
                C::Reduction,
                N(2),
                1,
                &[],
                true,
                &[I(0), I(1)],
            ),
            OpKind::FlashAttention => info(
                "flash_attention",
                C::Attention,
                N(3),
                1,
                &["causal", "scale"],
                true,
                &[I(0), I(1), I(2), R(0)],
            ),
            OpKind::GeluGrad => info("gelu_grad", C::Elementwise, N(2), 1, &[], false, &[]),
            OpKind::SiluGrad => info("silu_grad", C::Elementwise, N(2), 1, &[], false, &[]),
            OpKind::SoftmaxGrad => info(
                "softmax_grad",
                C::Elementwise,
                N(2),
                1,
                &["scale"],
                false,
                &[],
            ),
            OpKind::DropoutGrad => {
                info("dropout_grad", C::Elementwise, N(2), 1, &["p"], false, &[])
            }
            OpKind::LayerNormGrad => info(
                "layernorm_grad",
                C::Elementwise,
                N(3),
                3,
                &["eps"],
                false,
                &[],
            ),
            OpKind::RmsNormGrad => info(
                "rmsnorm_grad",
                C::Elementwise,
                N(3),
                2,
                &["eps"],
                false,
                &[],
            ),
            OpKind::RotaryGrad => info(
                "rotary_grad",
                C::Elementwise,
                N(1),
                1,
                &["dims", "theta"],
                false,
                &[],
            ),
            OpKind::EmbeddingGrad => {
                info("embedding_grad", C::Layout, N(2), 1, &["vocab"], false, &[])
            }
            OpKind::CrossEntropyGrad => {
                info("cross_entropy_grad", C::Reduction, N(3), 1, &[], false, &[])
            }
            OpKind::FlashAttentionGrad => info(
                "flash_attention_grad",
                C::Attention,
                N(5),
                3,
                &["causal", "scale"],
                false,
                &[],
            ),
            OpKind::AdamW => info(
                "adamw",
                C::Optimizer,
                N(4),
                3,
                &["lr", "beta1", "beta2", "eps", "weight_decay"],
                false,
                &[],
            ),
            OpKind::AllReduce => info("all_reduce", C::Collective, N(1), 1, &["parts"], true, &[]),
            OpKind::AllGather => info(
                "all_gather",
                C::Collective,
                N(1),
                1,
                &["axis", "parts"],
                true,
                &[],
            ),
            OpKind::ReduceScatter => info(
                "reduce_scatter",
                C::Collective,
                N(1),
                1,
                &["axis", "parts"],
                true,
                &[],
            ),
            OpKind::AllToAll => info(
                "all_to_all",
                C::Collective,
                N(1),
                1,
                &["split", "concat", "parts"],
                true,
                &[],
            ),
            OpKind::Send => info("send", C::P2p, N(1), 0, &["peer"], false, &[]),
            OpKind::TpCopy => info("tp_copy", C::Layout, N(1), 1, &["parts"], true, &[]),
            OpKind::TpSplit => info(
                "tp_split",
                C::Layout,
                N(1),
                1,
                &["axis", "parts"],
                true,
                &[],
            ),
            OpKind::TpGather => info(
                "tp_gather",
                C::Collective,
                N(1),
                1,
                &["axis", "parts"],
                true,
                &[],
            ),
            OpKind::VocabParallelEmbedding => info(
                "vocab_parallel_embedding",
                C::Layout,
                N(2),
                1,
                &["parts"],
                true,
                &[I(1)],
            ),
            OpKind::VocabParallelEmbeddingGrad => info(
                "vocab_parallel_embedding_grad",
                C::Layout,
                N(2),
                1,
                &["vocab", "parts"],
                false,
                &[],
            ),
            OpKind::VocabParallelCrossEntropy => info(
                "vocab_parallel_cross_entropy",
                C::Reduction,
                N(2),
                1,
                &["parts"],
                true,
                &[I(0), I(1)],
            ),
            OpKind::VocabParallelCrossEntropyGrad => info(
                "vocab_parallel_cross_entropy_grad",
                C::Reduction,
                N(3),
                1,
                &["parts"],
                false,
                &[],
            ),
        }
    }

    /// Text-format name.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Looks a kind up by its text-format name.
    pub fn from_name(name: &str) -> Option<OpKind> {
        OpKind::ALL.iter().copied().find(|k| k.name() == name)
    }
}

/// An attribute value as the text format spells it.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    /// `true` / `false`.
    Bool(bool),
    /// A non-negative integer.
    Int(u64),
    /// A float (integers are accepted where a float is expected).
    Float(f64),
    /// A quoted string.
    Str(String),
    /// A dtype token.
    DType(DType),
    /// A list of integers `[0,2,1]`.
    Ints(Vec<u64>),
    /// A shape `[b,s,4096]`.
    Shape(Shape),
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Int(n) => write!(f, "{n}"),
            AttrValue::Float(x) => {
                if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e15 {
                    write!(f, "{x:.1}")
                } else {
                    write!(f, "{x:e}")
                }
            }
            AttrValue::Str(s) => write!(f, "{s:?}"),
            AttrValue::DType(d) => write!(f, "{d}"),
            AttrValue::Ints(v) => {
                f.write_str("[")?;
                for (i, n) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{n}")?;
                }
                f.write_str("]")
            }
            AttrValue::Shape(s) => write!(f, "{s}"),
        }
    }
}

/// A problem building an op from named attributes.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AttrError {
    /// The op name is not in the op table.
    #[error("unknown op `{0}`")]
    UnknownOp(String),
    /// An attribute the op does not have.
    #[error("op `{op}` has no attribute `{attr}`")]
    Unknown {
        /// Op name.
        op: &'static str,
        /// Attribute name.
        attr: String,
    },
    /// A required attribute is absent.
    #[error("op `{op}` needs attribute `{attr}`")]
    Missing {
        /// Op name.
        op: &'static str,
        /// Attribute name.
        attr: &'static str,
    },
    /// The attribute has the wrong kind of value.
    #[error("attribute `{attr}` of `{op}` must be {expected}")]
    Type {
        /// Op name.
        op: &'static str,
        /// Attribute name.
        attr: &'static str,
        /// What was expected.
        expected: &'static str,
    },
}

struct AttrReader<'a> {
    op: &'static str,
    attrs: &'a BTreeMap<String, AttrValue>,
}

impl AttrReader<'_> {
    fn get(&self, attr: &'static str) -> Result<&AttrValue, AttrError> {
        self.attrs
            .get(attr)
            .ok_or(AttrError::Missing { op: self.op, attr })
    }
    fn ty(&self, attr: &'static str, expected: &'static str) -> AttrError {
        AttrError::Type {
            op: self.op,
            attr,
            expected,
        }
    }
    fn bool(&self, attr: &'static str) -> Result<bool, AttrError> {
        match self.get(attr)? {
            AttrValue::Bool(b) => Ok(*b),
            _ => Err(self.ty(attr, "a bool")),
        }
    }
    fn u64(&self, attr: &'static str) -> Result<u64, AttrError> {
        match self.get(attr)? {
            AttrValue::Int(n) => Ok(*n),
            _ => Err(self.ty(attr, "an integer")),
        }
    }
    fn u32(&self, attr: &'static str) -> Result<u32, AttrError> {
        u32::try_from(self.u64(attr)?).map_err(|_| self.ty(attr, "an integer below 2^32"))
    }
    fn f64(&self, attr: &'static str) -> Result<f64, AttrError> {
        match self.get(attr)? {
            AttrValue::Float(x) if x.is_finite() => Ok(*x),
            AttrValue::Int(n) => Ok(*n as f64),
            _ => Err(self.ty(attr, "a finite number")),
        }
    }
    fn string(&self, attr: &'static str) -> Result<String, AttrError> {
        match self.get(attr)? {
            AttrValue::Str(s) => Ok(s.clone()),
            _ => Err(self.ty(attr, "a string")),
        }
    }
    fn dtype(&self, attr: &'static str) -> Result<DType, AttrError> {
        match self.get(attr)? {
            AttrValue::DType(d) => Ok(*d),
            _ => Err(self.ty(attr, "a dtype")),
        }
    }
    fn u32s(&self, attr: &'static str) -> Result<Vec<u32>, AttrError> {
        match self.get(attr)? {
            AttrValue::Ints(v) => v
                .iter()
                .map(|&n| u32::try_from(n).map_err(|_| self.ty(attr, "a list of small integers")))
                .collect(),
            _ => Err(self.ty(attr, "a list of integers")),
        }
    }
    fn shape(&self, attr: &'static str) -> Result<Shape, AttrError> {
        match self.get(attr)? {
            AttrValue::Shape(s) => Ok(s.clone()),
            AttrValue::Ints(v) => Ok(Shape::new(v.iter().map(|&n| Dim::lit(n)))),
            _ => Err(self.ty(attr, "a shape")),
        }
    }
}

impl Op {
    /// The op's kind.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Input { .. } => OpKind::Input,
            Op::Param { .. } => OpKind::Param,
            Op::State { .. } => OpKind::State,
            Op::Constant { .. } => OpKind::Constant,
            Op::Recv { .. } => OpKind::Recv,
            Op::MatMul { .. } => OpKind::MatMul,
            Op::Add => OpKind::Add,
            Op::Mul => OpKind::Mul,
            Op::Scale { .. } => OpKind::Scale,
            Op::BiasAdd => OpKind::BiasAdd,
            Op::Gelu => OpKind::Gelu,
            Op::Silu => OpKind::Silu,
            Op::Softmax { .. } => OpKind::Softmax,
            Op::Dropout { .. } => OpKind::Dropout,
            Op::LayerNorm { .. } => OpKind::LayerNorm,
            Op::RmsNorm { .. } => OpKind::RmsNorm,
            Op::Rotary { .. } => OpKind::Rotary,
            Op::Embedding => OpKind::Embedding,
            Op::Reshape { .. } => OpKind::Reshape,
            Op::Transpose { .. } => OpKind::Transpose,
            Op::Slice { .. } => OpKind::Slice,
            Op::Concat { .. } => OpKind::Concat,
            Op::Pad { .. } => OpKind::Pad,
            Op::Repeat { .. } => OpKind::Repeat,
            Op::Broadcast { .. } => OpKind::Broadcast,
            Op::ReduceSum { .. } => OpKind::ReduceSum,
            Op::Cast { .. } => OpKind::Cast,
            Op::CrossEntropy => OpKind::CrossEntropy,
            Op::FlashAttention { .. } => OpKind::FlashAttention,
            Op::GeluGrad => OpKind::GeluGrad,
            Op::SiluGrad => OpKind::SiluGrad,
            Op::SoftmaxGrad { .. } => OpKind::SoftmaxGrad,
            Op::DropoutGrad { .. } => OpKind::DropoutGrad,
            Op::LayerNormGrad { .. } => OpKind::LayerNormGrad,
            Op::RmsNormGrad { .. } => OpKind::RmsNormGrad,
            Op::RotaryGrad { .. } => OpKind::RotaryGrad,
            Op::EmbeddingGrad { .. } => OpKind::EmbeddingGrad,
            Op::CrossEntropyGrad => OpKind::CrossEntropyGrad,
            Op::FlashAttentionGrad { .. } => OpKind::FlashAttentionGrad,
            Op::AdamW { .. } => OpKind::AdamW,
            Op::AllReduce { .. } => OpKind::AllReduce,
            Op::AllGather { .. } => OpKind::AllGather,
            Op::ReduceScatter { .. } => OpKind::ReduceScatter,
            Op::AllToAll { .. } => OpKind::AllToAll,
            Op::Send { .. } => OpKind::Send,
            Op::TpCopy { .. } => OpKind::TpCopy,
            Op::TpSplit { .. } => OpKind::TpSplit,
            Op::TpGather { .. } => OpKind::TpGather,
            Op::VocabParallelEmbedding { .. } => OpKind::VocabParallelEmbedding,
            Op::VocabParallelEmbeddingGrad { .. } => OpKind::VocabParallelEmbeddingGrad,
            Op::VocabParallelCrossEntropy { .. } => OpKind::VocabParallelCrossEntropy,
            Op::VocabParallelCrossEntropyGrad { .. } => OpKind::VocabParallelCrossEntropyGrad,
        }
    }

    /// The op table row.
    pub fn info(&self) -> OpInfo {
        self.kind().info()
    }

    /// Text-format name.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// Whether the result type is declared rather than inferred.
    pub fn is_source(&self) -> bool {
        matches!(
            self,
            Op::Input { .. }
                | Op::Param { .. }
                | Op::State { .. }
                | Op::Constant { .. }
                | Op::Recv { .. }
        )
    }

    /// Whether a runtime implements the op as a view of its input (no copy, no kernel).
    pub fn is_view(&self) -> bool {
        matches!(
            self,
            Op::Reshape { .. } | Op::Transpose { .. } | Op::Slice { .. } | Op::TpCopy { .. }
        )
    }

    /// Whether the op updates its inputs in place (results reuse the input storage).
    pub fn is_in_place(&self) -> bool {
        matches!(self, Op::AdamW { .. })
    }

    /// Attributes as `(name, value)` pairs in table order.
    pub fn attrs(&self) -> Vec<(&'static str, AttrValue)> {
        use AttrValue as V;
        let ints = |v: &[u32]| V::Ints(v.iter().map(|&n| u64::from(n)).collect());
        match self {
            Op::Input { name } | Op::Param { name } | Op::State { name } => {
                vec![("name", V::Str(name.clone()))]
            }
            Op::Constant { value } => vec![("value", V::Float(*value))],
            Op::Recv { peer } | Op::Send { peer } => vec![("peer", V::Int(u64::from(*peer)))],
            Op::MatMul { ta, tb } => vec![("ta", V::Bool(*ta)), ("tb", V::Bool(*tb))],
            Op::Add
            | Op::Mul
            | Op::BiasAdd
            | Op::Gelu
            | Op::Silu
            | Op::Embedding
            | Op::CrossEntropy
            | Op::GeluGrad
            | Op::SiluGrad
            | Op::CrossEntropyGrad => vec![],
            Op::Scale { factor } => vec![("factor", V::Float(*factor))],
            Op::Softmax { causal, scale }
            | Op::FlashAttention { causal, scale }
            | Op::FlashAttentionGrad { causal, scale } => {
                vec![("causal", V::Bool(*causal)), ("scale", V::Float(*scale))]
            }
            Op::Dropout { p } | Op::DropoutGrad { p } => vec![("p", V::Float(*p))],
            Op::LayerNorm { eps }
            | Op::RmsNorm { eps }
            | Op::LayerNormGrad { eps }
            | Op::RmsNormGrad { eps } => vec![("eps", V::Float(*eps))],
            Op::Rotary { dims, theta } | Op::RotaryGrad { dims, theta } => {
                vec![("dims", V::Int(*dims)), ("theta", V::Float(*theta))]
            }
            Op::Reshape { shape } => vec![("shape", V::Shape(shape.clone()))],
            Op::Transpose { perm } => vec![("perm", ints(perm))],
            Op::Slice { axis, start, len } => vec![
                ("axis", V::Int(u64::from(*axis))),
                ("start", V::Int(*start)),
                ("len", V::Int(*len)),
            ],
            Op::Concat { axis } => vec![("axis", V::Int(u64::from(*axis)))],
            Op::Pad {
                axis,
                before,
                after,
            } => vec![
                ("axis", V::Int(u64::from(*axis))),
                ("before", V::Int(*before)),
                ("after", V::Int(*after)),
            ],
            Op::Repeat { axis, times } => {
                vec![
                    ("axis", V::Int(u64::from(*axis))),
                    ("times", V::Int(*times)),
                ]
            }
            Op::Broadcast { axes, shape } => {
                vec![("axes", ints(axes)), ("shape", V::Shape(shape.clone()))]
            }
            Op::ReduceSum { axes } => vec![("axes", ints(axes))],
            Op::Cast { to } => vec![("to", V::DType(*to))],
            Op::SoftmaxGrad { scale } => vec![("scale", V::Float(*scale))],
            Op::EmbeddingGrad { vocab } => vec![("vocab", V::Int(*vocab))],
            Op::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => vec![
                ("lr", V::Float(*lr)),
                ("beta1", V::Float(*beta1)),
                ("beta2", V::Float(*beta2)),
                ("eps", V::Float(*eps)),
                ("weight_decay", V::Float(*weight_decay)),
            ],
            Op::AllReduce { parts }
            | Op::TpCopy { parts }
            | Op::VocabParallelEmbedding { parts }
            | Op::VocabParallelCrossEntropy { parts }
            | Op::VocabParallelCrossEntropyGrad { parts } => {
                vec![("parts", V::Int(u64::from(*parts)))]
            }
            Op::VocabParallelEmbeddingGrad { vocab, parts } => vec![
                ("vocab", V::Int(*vocab)),
                ("parts", V::Int(u64::from(*parts))),
            ],
            Op::AllGather { axis, parts }
            | Op::ReduceScatter { axis, parts }
            | Op::TpSplit { axis, parts }
            | Op::TpGather { axis, parts } => vec![
                ("axis", V::Int(u64::from(*axis))),
                ("parts", V::Int(u64::from(*parts))),
            ],
            Op::AllToAll {
                split,
                concat,
                parts,
            } => vec![
                ("split", V::Int(u64::from(*split))),
                ("concat", V::Int(u64::from(*concat))),
                ("parts", V::Int(u64::from(*parts))),
            ],
        }
    }

    /// Builds an op from its kind and named attributes; rejects unknown, missing and
    /// ill-typed attributes.
    pub fn from_attrs(kind: OpKind, attrs: &BTreeMap<String, AttrValue>) -> Result<Op, AttrError> {
        let info = kind.info();
        if let Some(extra) = attrs.keys().find(|k| !info.attrs.contains(&k.as_str())) {
            return Err(AttrError::Unknown {
                op: info.name,
                attr: extra.clone(),
            });
        }
        let r = AttrReader {
            op: info.name,
            attrs,
        };
        Ok(match kind {
            OpKind::Input => Op::Input {
                name: r.string("name")?,
            },
            OpKind::Param => Op::Param {
                name: r.string("name")?,
            },
            OpKind::State => Op::State {
                name: r.string("name")?,
            },
            OpKind::Constant => Op::Constant {
                value: r.f64("value")?,
            },
            OpKind::Recv => Op::Recv {
                peer: r.u32("peer")?,
            },
            OpKind::MatMul => Op::MatMul {
                ta: r.bool("ta")?,
                tb: r.bool("tb")?,
            },
            OpKind::Add => Op::Add,
            OpKind::Mul => Op::Mul,
            OpKind::Scale => Op::Scale {
                factor: r.f64("factor")?,
            },
            OpKind::BiasAdd => Op::BiasAdd,
            OpKind::Gelu => Op::Gelu,
            OpKind::Silu => Op::Silu,
            OpKind::Softmax => Op::Softmax {
                causal: r.bool("causal")?,
                scale: r.f64("scale")?,
            },
            OpKind::Dropout => Op::Dropout { p: r.f64("p")? },
            OpKind::LayerNorm => Op::LayerNorm { eps: r.f64("eps")? },
            OpKind::RmsNorm => Op::RmsNorm { eps: r.f64("eps")? },
            OpKind::Rotary => Op::Rotary {
                dims: r.u64("dims")?,
                theta: r.f64("theta")?,
            },
            OpKind::Embedding => Op::Embedding,
            OpKind::Reshape => Op::Reshape {
                shape: r.shape("shape")?,
            },
            OpKind::Transpose => Op::Transpose {
                perm: r.u32s("perm")?,
            },
            OpKind::Slice => Op::Slice {
                axis: r.u32("axis")?,
                start: r.u64("start")?,
                len: r.u64("len")?,
            },
            OpKind::Concat => Op::Concat {
                axis: r.u32("axis")?,
            },
            OpKind::Pad => Op::Pad {
                axis: r.u32("axis")?,
                before: r.u64("before")?,
                after: r.u64("after")?,
            },
            OpKind::Repeat => Op::Repeat {
                axis: r.u32("axis")?,
                times: r.u64("times")?,
            },
            OpKind::Broadcast => Op::Broadcast {
                axes: r.u32s("axes")?,
                shape: r.shape("shape")?,
            },
            OpKind::ReduceSum => Op::ReduceSum {
                axes: r.u32s("axes")?,
            },
            OpKind::Cast => Op::Cast { to: r.dtype("to")? },
            OpKind::CrossEntropy => Op::CrossEntropy,
            OpKind::FlashAttention => Op::FlashAttention {
                causal: r.bool("causal")?,
                scale: r.f64("scale")?,
            },
            OpKind::GeluGrad => Op::GeluGrad,
            OpKind::SiluGrad => Op::SiluGrad,
            OpKind::SoftmaxGrad => Op::SoftmaxGrad {
                scale: r.f64("scale")?,
            },
            OpKind::DropoutGrad => Op::DropoutGrad { p: r.f64("p")? },
            OpKind::LayerNormGrad => Op::LayerNormGrad { eps: r.f64("eps")? },
            OpKind::RmsNormGrad => Op::RmsNormGrad { eps: r.f64("eps")? },
            OpKind::RotaryGrad => Op::RotaryGrad {
                dims: r.u64("dims")?,
                theta: r.f64("theta")?,
            },
            OpKind::EmbeddingGrad => Op::EmbeddingGrad {
                vocab: r.u64("vocab")?,
            },
            OpKind::CrossEntropyGrad => Op::CrossEntropyGrad,
            OpKind::FlashAttentionGrad => Op::FlashAttentionGrad {
                causal: r.bool("causal")?,
                scale: r.f64("scale")?,
            },
            OpKind::AdamW => Op::AdamW {
                lr: r.f64("lr")?,
                beta1: r.f64("beta1")?,
                beta2: r.f64("beta2")?,
                eps: r.f64("eps")?,
                weight_decay: r.f64("weight_decay")?,
            },
            OpKind::AllReduce => Op::AllReduce {
                parts: r.u32("parts")?,
            },
            OpKind::AllGather => Op::AllGather {
                axis: r.u32("axis")?,
                parts: r.u32("parts")?,
            },
            OpKind::ReduceScatter => Op::ReduceScatter {
                axis: r.u32("axis")?,
                parts: r.u32("parts")?,
            },
            OpKind::AllToAll => Op::AllToAll {
                split: r.u32("split")?,
                concat: r.u32("concat")?,
                parts: r.u32("parts")?,
            },
            OpKind::Send => Op::Send {
                peer: r.u32("peer")?,
            },
            OpKind::TpCopy => Op::TpCopy {
                parts: r.u32("parts")?,
            },
            OpKind::TpSplit => Op::TpSplit {
                axis: r.u32("axis")?,
                parts: r.u32("parts")?,
            },
            OpKind::TpGather => Op::TpGather {
                axis: r.u32("axis")?,
                parts: r.u32("parts")?,
            },
            OpKind::VocabParallelEmbedding => Op::VocabParallelEmbedding {
                parts: r.u32("parts")?,
            },
            OpKind::VocabParallelEmbeddingGrad => Op::VocabParallelEmbeddingGrad {
                vocab: r.u64("vocab")?,
                parts: r.u32("parts")?,
            },
            OpKind::VocabParallelCrossEntropy => Op::VocabParallelCrossEntropy {
                parts: r.u32("parts")?,
            },
            OpKind::VocabParallelCrossEntropyGrad => Op::VocabParallelCrossEntropyGrad {
                parts: r.u32("parts")?,
            },
        })
    }
}

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

fn axis_ok(axis: u32, rank: usize) -> Option<usize> {
    let a = axis as usize;
    (a < rank).then_some(a)
}

impl Op {
    /// Result types from input types, checking every shape and dtype rule.
    ///
    /// Returns `Ok(None)` for sources, whose result type is declared by the graph.
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
                if a.dtype != b.dtype {
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
                one(TensorType::new(a.dtype, dims))
            }
            Op::Add | Op::Mul => {
                float(0)?;
                same(0, 1)?;
                one(inputs[0].clone())
            }
            Op::Scale { .. } | Op::Gelu | Op::Silu => {
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
            Op::LayerNorm { .. } | Op::RmsNorm { .. } => {
                float(0)?;
                rank_at_least(0, 1)?;
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
            Op::FlashAttention { .. } => {
                let (q, k) = (inputs[0], inputs[1]);
                float(0)?;
                same(1, 2)?;
                attention_shapes(q, k).map_err(err)?;
                if q.dtype != k.dtype {
                    return Err(err("q, k, v must share a dtype".into()));
                }
                one(q.clone())
            }
            Op::GeluGrad | Op::SiluGrad | Op::SoftmaxGrad { .. } => {
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
            Op::LayerNormGrad { .. } | Op::RmsNormGrad { .. } => {
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
            Op::FlashAttentionGrad { .. } => {
                let (d_o, q, k, v, o) = (inputs[0], inputs[1], inputs[2], inputs[3], inputs[4]);
                float(0)?;
                if d_o.shape != q.shape || o.shape != q.shape || k != v {
                    return Err(err("do, q and o must share a shape; k and v a type".into()));
                }
                attention_shapes(q, k).map_err(err)?;
                Ok(Some(vec![
                    q.with_dtype(d_o.dtype),
                    k.with_dtype(d_o.dtype),
                    v.with_dtype(d_o.dtype),
                ]))
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
        }
    }
}

/// `dim / parts`, requiring exact division of literal dims (symbolic dims may carry a
/// divisor such as `s/8`; the environment must make it whole).
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

/// Per-element FLOP counts of the non-matmul kernels. They are conventions for the
/// roofline model (transcendentals count as one FLOP), not measurements; the matmul
/// counts (`2mnk`) are exact.
pub mod flops_per_element {
    /// `a + b`, `a · b`, `c · x`, bias add, dropout apply, cast-free elementwise.
    pub const SIMPLE: u64 = 1;
    /// GeLU tanh approximation: cube, 2 mul, add, tanh, add, 2 mul.
    pub const GELU: u64 = 8;
    /// GeLU backward: the forward terms plus the tanh derivative.
    pub const GELU_GRAD: u64 = 13;
    /// SiLU: exp, add, divide, multiply.
    pub const SILU: u64 = 4;
    /// SiLU backward.
    pub const SILU_GRAD: u64 = 7;
    /// Scale, mask, max, subtract, exp, sum, divide.
    pub const SOFTMAX: u64 = 7;
    /// `y · (dy - Σ dy·y) · scale`.
    pub const SOFTMAX_GRAD: u64 = 4;
    /// Dropout: compare a random number, select, scale.
    pub const DROPOUT: u64 = 3;
    /// LayerNorm: mean, variance, normalize, affine.
    pub const LAYERNORM: u64 = 8;
    /// LayerNorm backward (statistics recomputed).
    pub const LAYERNORM_GRAD: u64 = 14;
    /// RMSNorm: square, mean, rsqrt, scale, affine.
    pub const RMSNORM: u64 = 5;
    /// RMSNorm backward.
    pub const RMSNORM_GRAD: u64 = 10;
    /// Rotary: two multiplies and an add per rotated channel.
    pub const ROTARY: u64 = 3;
    /// Cross-entropy: max, subtract, exp, sum, log, select.
    pub const CROSS_ENTROPY: u64 = 5;
    /// Cross-entropy backward: softmax minus one-hot, scaled.
    pub const CROSS_ENTROPY_GRAD: u64 = 6;
    /// AdamW: two moment updates, bias corrections, sqrt, divide, decay, update.
    pub const ADAMW: u64 = 12;
}

/// Work and traffic of one op under an environment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpCost {
    /// Floating-point operations.
    pub flops: u64,
    /// Bytes read and written by the kernel (0 for views and sources).
    pub bytes: u64,
}

impl Op {
    /// FLOPs and bytes moved for given input and result types; `None` on overflow or a
    /// dimension that `env` does not make whole.
    pub fn cost(
        &self,
        inputs: &[&TensorType],
        results: &[&TensorType],
        env: Env,
    ) -> Option<OpCost> {
        use flops_per_element as fpe;
        let numel = |t: &TensorType| t.shape.numel_at(env);
        let out = || numel(results.first()?);
        let io_bytes = || -> Option<u64> {
            inputs
                .iter()
                .chain(results.iter())
                .try_fold(0u64, |acc, t| acc.checked_add(t.bytes_at(env)?))
        };
        let per_elem = |k: u64| -> Option<OpCost> {
            Some(OpCost {
                flops: out()?.checked_mul(k)?,
                bytes: io_bytes()?,
            })
        };
        match self {
            Op::Input { .. } | Op::Param { .. } | Op::State { .. } | Op::Constant { .. } => {
                Some(OpCost::default())
            }
            Op::Reshape { .. } | Op::Transpose { .. } | Op::Slice { .. } => Some(OpCost::default()),
            Op::MatMul { ta, .. } => {
                let a = inputs.first()?;
                let r = a.shape.rank();
                let k = a.shape.0.get(if *ta {
                    r.checked_sub(2)?
                } else {
                    r.checked_sub(1)?
                })?;
                Some(OpCost {
                    flops: out()?.checked_mul(k.eval(env)?)?.checked_mul(2)?,
                    bytes: io_bytes()?,
                })
            }
            Op::Add | Op::Mul | Op::Scale { .. } | Op::BiasAdd | Op::DropoutGrad { .. } => {
                per_elem(fpe::SIMPLE)
            }
            Op::Gelu => per_elem(fpe::GELU),
            Op::GeluGrad => per_elem(fpe::GELU_GRAD),
            Op::Silu => per_elem(fpe::SILU),
            Op::SiluGrad => per_elem(fpe::SILU_GRAD),
            Op::Softmax { .. } => per_elem(fpe::SOFTMAX),
            Op::SoftmaxGrad { .. } => per_elem(fpe::SOFTMAX_GRAD),
            Op::Dropout { .. } => per_elem(fpe::DROPOUT),
            Op::LayerNorm { .. } => per_elem(fpe::LAYERNORM),
            Op::LayerNormGrad { .. } => per_elem(fpe::LAYERNORM_GRAD),
            Op::RmsNorm { .. } => per_elem(fpe::RMSNORM),
            Op::RmsNormGrad { .. } => per_elem(fpe::RMSNORM_GRAD),
            Op::Rotary { .. } | Op::RotaryGrad { .. } => per_elem(fpe::ROTARY),
            Op::Cast { .. } | Op::Embedding | Op::Concat { .. } | Op::Pad { .. } => per_elem(0),
            Op::VocabParallelEmbedding { .. }
            | Op::VocabParallelEmbeddingGrad { .. }
            | Op::TpSplit { .. } => per_elem(0),
            Op::TpCopy { .. } => Some(OpCost::default()),
            Op::Repeat { .. } | Op::Broadcast { .. } | Op::EmbeddingGrad { .. } => per_elem(0),
            Op::ReduceSum { .. } => Some(OpCost {
                flops: numel(inputs.first()?)?,
                bytes: io_bytes()?,
            }),
            Op::CrossEntropy | Op::VocabParallelCrossEntropy { .. } => Some(OpCost {
                flops: numel(inputs.first()?)?.checked_mul(fpe::CROSS_ENTROPY)?,
                bytes: io_bytes()?,
            }),
            Op::CrossEntropyGrad | Op::VocabParallelCrossEntropyGrad { .. } => {
                per_elem(fpe::CROSS_ENTROPY_GRAD)
            }
            Op::FlashAttention { .. } | Op::FlashAttentionGrad { .. } => {
                // q[b,s,a,d] against k[b,t,kv,d]: QKᵀ and PV are 2·b·a·s·t·d each.
                let q = inputs.get(usize::from(matches!(self, Op::FlashAttentionGrad { .. })))?;
                let k =
                    inputs.get(usize::from(matches!(self, Op::FlashAttentionGrad { .. })) + 1)?;
                let t = k.shape.0.get(1)?.eval(env)?;
                let pair = numel(q)?.checked_mul(t)?.checked_mul(4)?;
                // Backward recomputes QKᵀ and runs dV, dP, dQ, dK: five products.
                let matmuls = if matches!(self, Op::FlashAttention { .. }) {
                    2
                } else {
                    5
                };
                Some(OpCost {
                    flops: pair.checked_mul(matmuls)? / 2,
                    bytes: io_bytes()?,
                })
            }
            Op::AdamW { .. } => per_elem(fpe::ADAMW),
            Op::AllReduce { .. }
            | Op::AllGather { .. }
            | Op::ReduceScatter { .. }
            | Op::AllToAll { .. }
            | Op::TpGather { .. }
            | Op::Send { .. }
            | Op::Recv { .. } => Some(OpCost {
                flops: 0,
                bytes: io_bytes()?,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(dtype: DType, dims: &[&str]) -> TensorType {
        TensorType::new(dtype, dims.iter().map(|d| Dim::parse(d).unwrap()))
    }

    #[test]
    fn table_names_are_unique_and_round_trip() {
        for &k in OpKind::ALL {
            assert_eq!(OpKind::from_name(k.name()), Some(k));
            let info = k.info();
            assert!(
                info.saves.is_empty() || info.differentiable,
                "{}",
                info.name
            );
        }
    }

    #[test]
    fn matmul_shapes_and_flops() {
        let x = t(DType::Bf16, &["b", "s", "64"]);
        let w = t(DType::Bf16, &["64", "256"]);
        let op = Op::MatMul {
            ta: false,
            tb: false,
        };
        let out = op.infer(&[&x, &w]).unwrap().unwrap();
        assert_eq!(out[0], t(DType::Bf16, &["b", "s", "256"]));
        let cost = op.cost(&[&x, &w], &[&out[0]], Env::new(2, 8)).unwrap();
        // 2·m·n·k with m = b·s = 16, n = 256, k = 64.
        assert_eq!(cost.flops, 2 * 16 * 256 * 64);
        let bad = t(DType::Bf16, &["65", "256"]);
        assert!(op.infer(&[&x, &bad]).is_err());
    }

    #[test]
    fn attrs_round_trip_through_from_attrs() {
        let ops = [
            Op::Softmax {
                causal: true,
                scale: 0.125,
            },
            Op::Reshape {
                shape: Shape::new([Dim::batch(), Dim::seq(), Dim::lit(4), Dim::lit(16)]),
            },
            Op::AllToAll {
                split: 1,
                concat: 2,
                parts: 4,
            },
        ];
        for op in ops {
            let attrs: BTreeMap<String, AttrValue> = op
                .attrs()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            assert_eq!(Op::from_attrs(op.kind(), &attrs).unwrap(), op);
        }
    }
}
