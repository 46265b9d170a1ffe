//! The op table: kinds, names, arity, result counts, attribute names, classes, and
//! the predicates derived from them.

use super::Op;
use serde::{Deserialize, Serialize};
use std::fmt;

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
    Pow,
    Clamp,
    Tanh,
    Rsqrt,
    Shift,
    Contiguous,
    CrossEntropy,
    Sdpa,
    FlashAttention,
    GeluGrad,
    SiluGrad,
    ClampGrad,
    SoftmaxGrad,
    DropoutGrad,
    LayerNormGrad,
    RmsNormGrad,
    RotaryGrad,
    EmbeddingGrad,
    CrossEntropyGrad,
    FlashAttentionGrad,
    SdpaGrad,
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
    MoeRoute,
    MoeRouteGrad,
    MoeDispatch,
    MoeDispatchGrad,
    GroupedMatMul,
    GroupedMatMulWgrad,
    GroupedBiasAdd,
    GroupedBiasAddGrad,
    MoeCombine,
    MoeCombineGrad,
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
            OpKind::Pow => info("pow", C::Elementwise, N(1), 1, &["exponent"], true, &[I(0)]),
            OpKind::Clamp => info(
                "clamp",
                C::Elementwise,
                N(1),
                1,
                &["min", "max"],
                true,
                &[I(0)],
            ),
            OpKind::Tanh => info("tanh", C::Elementwise, N(1), 1, &[], true, &[R(0)]),
            OpKind::Rsqrt => info("rsqrt", C::Elementwise, N(1), 1, &[], true, &[R(0)]),
            OpKind::Shift => info("shift", C::Elementwise, N(1), 1, &["value"], true, &[]),
            OpKind::Contiguous => info("contiguous", C::Layout, N(1), 1, &[], true, &[]),
            OpKind::CrossEntropy => info(
                "cross_entropy",
                C::Reduction,
                N(2),
                1,
                &[],
                true,
                &[I(0), I(1)],
            ),
            OpKind::Sdpa => info(
                "sdpa",
                C::Attention,
                AtLeast(3),
                2,
                &["causal", "scale", "window", "sinks"],
                true,
                &[I(0), I(1), I(2), I(3), I(4), R(0), R(1)],
            ),
            OpKind::FlashAttention => info(
                "flash_attention",
                C::Attention,
                AtLeast(3),
                1,
                &["causal", "scale", "window", "sinks"],
                true,
                &[I(0), I(1), I(2), I(3), R(0)],
            ),
            OpKind::GeluGrad => info("gelu_grad", C::Elementwise, N(2), 1, &[], false, &[]),
            OpKind::SiluGrad => info("silu_grad", C::Elementwise, N(2), 1, &[], false, &[]),
            OpKind::ClampGrad => info(
                "clamp_grad",
                C::Elementwise,
                N(2),
                1,
                &["min", "max"],
                false,
                &[],
            ),
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
                AtLeast(5),
                3,
                &["causal", "scale", "window", "sinks"],
                false,
                &[],
            ),
            OpKind::SdpaGrad => info(
                "sdpa_grad",
                C::Attention,
                AtLeast(6),
                3,
                &["causal", "scale", "window", "sinks"],
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
            OpKind::MoeRoute => info(
                "moe_route",
                C::Reduction,
                N(1),
                3,
                &["topk", "sigmoid"],
                true,
                &[R(1), R(2)],
            ),
            OpKind::MoeRouteGrad => info(
                "moe_route_grad",
                C::Reduction,
                N(3),
                1,
                &["topk", "sigmoid"],
                false,
                &[],
            ),
            OpKind::MoeDispatch => info(
                "moe_dispatch",
                C::Layout,
                N(2),
                1,
                &["experts", "capacity"],
                true,
                &[I(1)],
            ),
            OpKind::MoeDispatchGrad => info(
                "moe_dispatch_grad",
                C::Layout,
                N(2),
                1,
                &["experts", "capacity"],
                false,
                &[],
            ),
            OpKind::GroupedMatMul => info(
                "grouped_matmul",
                C::MatMul,
                N(2),
                1,
                &["tb"],
                true,
                &[I(0), I(1)],
            ),
            OpKind::GroupedMatMulWgrad => info(
                "grouped_matmul_wgrad",
                C::MatMul,
                N(2),
                1,
                &["experts", "tb"],
                false,
                &[],
            ),
            OpKind::GroupedBiasAdd => {
                info("grouped_bias_add", C::Elementwise, N(2), 1, &[], true, &[])
            }
            OpKind::GroupedBiasAddGrad => info(
                "grouped_bias_add_grad",
                C::Reduction,
                N(1),
                1,
                &["experts"],
                false,
                &[],
            ),
            OpKind::MoeCombine => info(
                "moe_combine",
                C::Layout,
                N(3),
                1,
                &["experts", "capacity"],
                true,
                &[I(0), I(1), I(2)],
            ),
            OpKind::MoeCombineGrad => info(
                "moe_combine_grad",
                C::Layout,
                N(4),
                2,
                &["experts", "capacity"],
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

    /// Whether the op is a collective over a device group: its table class is
    /// [`OpClass::Collective`] (`all_reduce`, `all_gather`, `reduce_scatter`,
    /// `all_to_all`, `tp_gather`). The one predicate every layer uses.
    pub const fn is_collective(self) -> bool {
        matches!(self.info().class, OpClass::Collective)
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
            Op::Pow { .. } => OpKind::Pow,
            Op::Tanh => OpKind::Tanh,
            Op::Rsqrt => OpKind::Rsqrt,
            Op::Shift { .. } => OpKind::Shift,
            Op::Contiguous => OpKind::Contiguous,
            Op::Sdpa { .. } => OpKind::Sdpa,
            Op::SdpaGrad { .. } => OpKind::SdpaGrad,
            Op::CrossEntropy => OpKind::CrossEntropy,
            Op::FlashAttention { .. } => OpKind::FlashAttention,
            Op::GeluGrad => OpKind::GeluGrad,
            Op::SiluGrad => OpKind::SiluGrad,
            Op::Clamp { .. } => OpKind::Clamp,
            Op::ClampGrad { .. } => OpKind::ClampGrad,
            Op::GroupedBiasAdd => OpKind::GroupedBiasAdd,
            Op::GroupedBiasAddGrad { .. } => OpKind::GroupedBiasAddGrad,
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
            Op::MoeRoute { .. } => OpKind::MoeRoute,
            Op::MoeRouteGrad { .. } => OpKind::MoeRouteGrad,
            Op::MoeDispatch { .. } => OpKind::MoeDispatch,
            Op::MoeDispatchGrad { .. } => OpKind::MoeDispatchGrad,
            Op::GroupedMatMul { .. } => OpKind::GroupedMatMul,
            Op::GroupedMatMulWgrad { .. } => OpKind::GroupedMatMulWgrad,
            Op::MoeCombine { .. } => OpKind::MoeCombine,
            Op::MoeCombineGrad { .. } => OpKind::MoeCombineGrad,
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

    /// The number of results: the table's, plus the sink gradient of an attention
    /// gradient op with sinks.
    pub fn result_count(&self) -> usize {
        let sink_grad = matches!(
            self,
            Op::FlashAttentionGrad { sinks: true, .. } | Op::SdpaGrad { sinks: true, .. }
        );
        self.info().results + usize::from(sink_grad)
    }

    /// Whether the op is an attention op with a sinks input (see [`Op::FlashAttention`]).
    pub fn has_sinks(&self) -> bool {
        matches!(
            self,
            Op::FlashAttention { sinks: true, .. }
                | Op::FlashAttentionGrad { sinks: true, .. }
                | Op::Sdpa { sinks: true, .. }
                | Op::SdpaGrad { sinks: true, .. }
        )
    }

    /// Whether the op is a collective (see [`OpKind::is_collective`]).
    pub fn is_collective(&self) -> bool {
        self.kind().is_collective()
    }

    /// Whether a runtime implements the op as a view of its input (no copy, no kernel):
    /// reshape, transpose, slice, broadcast (PyTorch's `expand`) and `tp_copy`.
    pub fn is_view(&self) -> bool {
        matches!(
            self,
            Op::Reshape { .. }
                | Op::Transpose { .. }
                | Op::Slice { .. }
                | Op::Broadcast { .. }
                | Op::TpCopy { .. }
        )
    }

    /// Whether the op updates its inputs in place (results reuse the input storage).
    pub fn is_in_place(&self) -> bool {
        matches!(self, Op::AdamW { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn collectives_are_the_collective_class() {
        let names: Vec<&str> = OpKind::ALL
            .iter()
            .filter(|k| k.is_collective())
            .map(|k| k.name())
            .collect();
        assert_eq!(
            names,
            [
                "all_reduce",
                "all_gather",
                "reduce_scatter",
                "all_to_all",
                "tp_gather"
            ]
        );
    }
}
