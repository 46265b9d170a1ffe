//! Work and traffic of an op: FLOPs and bytes moved under an environment.

use super::Op;
use crate::ir::types::{Env, TensorType};

/// Per-element FLOP counts of the non-matmul kernels. They are conventions for the
/// roofline model (transcendentals count as one FLOP), not measurements; the matmul
/// counts (`2mnk`) are exact.
pub mod flops_per_element {
    /// `a + b`, `a · b`, `c · x`, bias add, dropout apply, cast-free elementwise.
    pub const SIMPLE: u64 = 1;
    /// An attention sink, per query row and head: `exp(sink − max)` and its add to the
    /// softmax denominator.
    pub const SINK: u64 = 2;
    /// An attention sink's gradient, per query row and head: the sink's probability
    /// `exp(sink − lse)`, its product with `rowsum(dO·O)`, and the sum over rows.
    pub const SINK_GRAD: u64 = 3;
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

/// Passes over the logits the cross-entropy forward makes: Megatron-LM's
/// `VocabParallelCrossEntropy.forward` (`megatron/core/tensor_parallel/cross_entropy.py`,
/// unfused unless `--cross-entropy-loss-fusion`, off by default) runs separate kernels
/// on its fp32 logits: the row max (a read), the in-place subtraction of it (a read and
/// a write), the in-place `exp` (a read and a write), the row sum (a read) and the
/// in-place division into the softmax it saves (a read and a write): seven. Its
/// backward scales that softmax in place (a read and a write: the op's own inputs and
/// result). PyTorch's `F.cross_entropy` (Hugging Face, torchtitan) makes fewer passes
/// forward (a `log_softmax` of about three reads and a write) and more backward (a
/// zero-filled gradient, then `log_softmax_backward`'s two reads and a write), about as
/// many in all, so every engine is priced with Megatron-LM's split.
pub const CROSS_ENTROPY_PASSES: u64 = 7;

/// The shape of the matrix products a [`Op::MatMul`] runs: `batch` independent
/// products of an `m×k` by a `k×n` matrix. A rank-2 weight broadcast over the leading
/// dims of `a` is one product with those dims folded into `m` (as cuBLAS runs a
/// linear layer); a batched right operand keeps them as the batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gemm {
    /// Independent products.
    pub batch: u64,
    /// Rows of the result.
    pub m: u64,
    /// Columns of the result.
    pub n: u64,
    /// Contraction depth.
    pub k: u64,
}

impl Gemm {
    /// `2·batch·m·n·k`, `None` on overflow.
    pub fn flops(&self) -> Option<u64> {
        self.batch
            .checked_mul(self.m)?
            .checked_mul(self.n)?
            .checked_mul(self.k)?
            .checked_mul(2)
    }
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
    /// The GEMM shape of a [`Op::MatMul`] from its input types (`None` for other ops, on
    /// overflow, or for a dimension `env` does not make whole).
    pub fn gemm(&self, inputs: &[&TensorType], env: Env) -> Option<Gemm> {
        let Op::MatMul { ta, tb } = self else {
            return None;
        };
        let (a, b) = (inputs.first()?, inputs.get(1)?);
        let (ar, br) = (a.shape.rank(), b.shape.rank());
        let dim = |t: &TensorType, i: usize| t.shape.0.get(i)?.eval(env);
        let (m, k) = if *ta {
            (dim(a, ar.checked_sub(1)?)?, dim(a, ar.checked_sub(2)?)?)
        } else {
            (dim(a, ar.checked_sub(2)?)?, dim(a, ar.checked_sub(1)?)?)
        };
        let n = if *tb {
            dim(b, br.checked_sub(2)?)?
        } else {
            dim(b, br.checked_sub(1)?)?
        };
        let lead = (0..ar - 2).try_fold(1u64, |acc, i| acc.checked_mul(dim(a, i)?))?;
        Some(if br == 2 {
            Gemm {
                batch: 1,
                m: m.checked_mul(lead)?,
                n,
                k,
            }
        } else {
            Gemm {
                batch: lead,
                m,
                n,
                k,
            }
        })
    }

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
            Op::Reshape { .. } | Op::Transpose { .. } | Op::Slice { .. } | Op::Broadcast { .. } => {
                Some(OpCost::default())
            }
            Op::MatMul { .. } => Some(OpCost {
                flops: self.gemm(inputs, env)?.flops()?,
                bytes: io_bytes()?,
            }),
            Op::Add
            | Op::Mul
            | Op::Scale { .. }
            | Op::BiasAdd
            | Op::DropoutGrad { .. }
            | Op::Pow { .. }
            | Op::Tanh
            | Op::Rsqrt
            | Op::Clamp { .. }
            | Op::ClampGrad { .. }
            | Op::GroupedBiasAdd
            | Op::Shift { .. } => per_elem(fpe::SIMPLE),
            // Each expert's rows summed: one add per element of dy.
            Op::GroupedBiasAddGrad { .. } => Some(OpCost {
                flops: numel(inputs.first()?)?,
                bytes: io_bytes()?,
            }),
            Op::Contiguous => per_elem(0),
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
            Op::Repeat { .. } | Op::EmbeddingGrad { .. } => per_elem(0),
            Op::ReduceSum { .. } => Some(OpCost {
                flops: numel(inputs.first()?)?,
                bytes: io_bytes()?,
            }),
            // The op's own traffic (one read of the logits, the labels, the loss) plus
            // the further passes over the logits (`CROSS_ENTROPY_PASSES`).
            Op::CrossEntropy | Op::VocabParallelCrossEntropy { .. } => Some(OpCost {
                flops: numel(inputs.first()?)?.checked_mul(fpe::CROSS_ENTROPY)?,
                bytes: inputs
                    .first()?
                    .bytes_at(env)?
                    .checked_mul(CROSS_ENTROPY_PASSES - 1)?
                    .checked_add(io_bytes()?)?,
            }),
            Op::CrossEntropyGrad | Op::VocabParallelCrossEntropyGrad { .. } => {
                per_elem(fpe::CROSS_ENTROPY_GRAD)
            }
            Op::FlashAttention { .. }
            | Op::FlashAttentionGrad { .. }
            | Op::Sdpa { .. }
            | Op::SdpaGrad { .. } => {
                // q[b,s,a,d] against k[b,t,kv,d]: QKᵀ and PV are 2·b·a·s·t·d each.
                let grad = matches!(self, Op::FlashAttentionGrad { .. } | Op::SdpaGrad { .. });
                let (causal, window) = match self {
                    Op::FlashAttention { causal, window, .. }
                    | Op::FlashAttentionGrad { causal, window, .. }
                    | Op::Sdpa { causal, window, .. }
                    | Op::SdpaGrad { causal, window, .. } => (*causal, *window),
                    _ => return None,
                };
                let q = inputs.get(usize::from(grad))?;
                let k = inputs.get(usize::from(grad) + 1)?;
                let s = q.shape.0.get(1)?.eval(env)?;
                let t = k.shape.0.get(1)?.eval(env)?;
                let pairs = attention_pairs(s, t, causal, window)?;
                let per_pair = numel(q)?.checked_div(s).unwrap_or(0);
                let pair = per_pair.checked_mul(pairs)?.checked_mul(4)?;
                // Backward recomputes QKᵀ and runs dV, dP, dQ, dK: five products.
                let matmuls = if grad { 5 } else { 2 };
                // Sinks: one more term per query row and head in the softmax
                // denominator (forward), and the sink's share of each row against
                // `rowsum(dO·O)` summed per head (backward): O(b·s·a), not O(s·t).
                let sink = if self.has_sinks() {
                    let rows = numel(q)?.checked_div(q.shape.0.get(3)?.eval(env)?)?;
                    rows.checked_mul(if grad { fpe::SINK_GRAD } else { fpe::SINK })?
                } else {
                    0
                };
                Some(OpCost {
                    flops: (pair.checked_mul(matmuls)? / 2).checked_add(sink)?,
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
            // Scoring all E experts (a softmax or sigmoid) and the top-k selection.
            Op::MoeRoute { .. } => Some(OpCost {
                flops: numel(results.get(1)?)?.checked_mul(fpe::SOFTMAX)?,
                bytes: io_bytes()?,
            }),
            Op::MoeRouteGrad { .. } => per_elem(fpe::SOFTMAX_GRAD),
            // Copies; the gradient of a dispatch sums each token's k rows.
            Op::MoeDispatch { .. } => per_elem(0),
            Op::MoeDispatchGrad { .. } => Some(OpCost {
                flops: numel(inputs.first()?)?,
                bytes: io_bytes()?,
            }),
            // Each of the R rows times its expert's [k, n] weight: 2·R·k·n.
            Op::GroupedMatMul { .. } => {
                let a = inputs.first()?;
                let n = results.first()?.shape.last()?.eval(env)?;
                Some(OpCost {
                    flops: numel(a)?.checked_mul(n)?.checked_mul(2)?,
                    bytes: io_bytes()?,
                })
            }
            // dw = Σ over each expert's rows of aᵀ·dy: 2·R·k·n.
            Op::GroupedMatMulWgrad { .. } => {
                let (a, dy) = (inputs.first()?, inputs.get(1)?);
                let n = dy.shape.last()?.eval(env)?;
                Some(OpCost {
                    flops: numel(a)?.checked_mul(n)?.checked_mul(2)?,
                    bytes: io_bytes()?,
                })
            }
            // The weighted sum of k rows per token: 2·T·k·h (a multiply and an add).
            Op::MoeCombine { .. } => Some(OpCost {
                flops: numel(inputs.first()?)?.checked_mul(2)?,
                bytes: io_bytes()?,
            }),
            // dy = weight·dout per row, dweights = ⟨dout, y⟩ per row: 2 + 2 per element.
            Op::MoeCombineGrad { .. } => Some(OpCost {
                flops: numel(inputs.get(1)?)?.checked_mul(4)?,
                bytes: io_bytes()?,
            }),
        }
    }
}

/// Query–key pairs an attention op counts for `s` queries against `t` keys.
///
/// Without a window, every query against every key, `s·t`, also when causal: the
/// counted FLOPs are the whole rectangle, and the time model executes a causal share
/// of them (`apar::cost::CAUSAL_WORK_FRACTION`, one half). With a window `w < t`, query
/// `i` sees `min(i+1, w)` keys, the band `Σᵢ min(i+1, w)`; a causal windowed op counts
/// twice the band (never more than `s·t`), so that the same causal share executes
/// exactly the band. A window not shorter than the keys changes nothing.
pub fn attention_pairs(s: u64, t: u64, causal: bool, window: Option<u64>) -> Option<u64> {
    let whole = s.checked_mul(t)?;
    let Some(w) = window.filter(|&w| w < t) else {
        return Some(whole);
    };
    if !causal {
        // Every model apar builds windows causal attention; a non-causal windowed op
        // is counted at `w` keys a query.
        return Some(s.checked_mul(w)?.min(whole));
    }
    // Σ_{i<s} min(i+1, w) = w(w+1)/2 + (s-w)·w for s ≥ w, s(s+1)/2 otherwise.
    let band = if s >= w {
        (w.checked_mul(w + 1)? / 2).checked_add((s - w).checked_mul(w)?)?
    } else {
        s.checked_mul(s + 1)? / 2
    };
    Some(band.checked_mul(2)?.min(whole))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::types::{DType, Dim};

    fn t(dtype: DType, dims: &[&str]) -> TensorType {
        TensorType::new(dtype, dims.iter().map(|d| Dim::parse(d).unwrap()))
    }

    #[test]
    fn windowed_attention_counts_the_band() {
        // 8 queries, window 3: 1 + 2 + 3·6 = 21 pairs run; counted twice under the
        // causal convention.
        assert_eq!(attention_pairs(8, 8, true, Some(3)), Some(42));
        assert_eq!(attention_pairs(8, 8, true, None), Some(64));
        assert_eq!(attention_pairs(8, 8, true, Some(8)), Some(64));
        assert_eq!(attention_pairs(8, 8, true, Some(7)), Some(64));
        assert_eq!(attention_pairs(8, 8, false, Some(3)), Some(24));
        // Gemma 2's 4096 window at 8192 tokens: 3/4 of the causal triangle's work.
        let full = attention_pairs(8192, 8192, true, None).unwrap();
        let band = attention_pairs(8192, 8192, true, Some(4096)).unwrap();
        assert!((band as f64 / full as f64 - 0.75).abs() < 1e-3);
        let q = t(DType::Bf16, &["b", "s", "4", "16"]);
        let op = Op::FlashAttention {
            causal: true,
            scale: 0.25,
            window: Some(3),
            sinks: false,
        };
        let out = op.infer(&[&q, &q, &q]).unwrap().unwrap();
        let env = Env::new(2, 8);
        let c = op.cost(&[&q, &q, &q], &[&out[0]], env).unwrap();
        assert_eq!(c.flops, 2 * 4 * 16 * 42 * 2 * 2);
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
        let g = op.gemm(&[&x, &w], Env::new(2, 8)).unwrap();
        assert_eq!((g.batch, g.m, g.n, g.k), (1, 16, 256, 64));
        // A batched product keeps its leading dims as the batch.
        let q = t(DType::Bf16, &["b", "4", "s", "64"]);
        let kt = t(DType::Bf16, &["b", "4", "64", "s"]);
        let g = op.gemm(&[&q, &kt], Env::new(2, 8)).unwrap();
        assert_eq!((g.batch, g.m, g.n, g.k), (8, 8, 8, 64));
        let bad = t(DType::Bf16, &["65", "256"]);
        assert!(op.infer(&[&x, &bad]).is_err());
    }
}
