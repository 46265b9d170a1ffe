//! Builds the forward graph of a decoder-only transformer from a [`ModelConfig`].

use super::code::{AttnImpl, HfArch, ModelCode};
use super::{Attention, Mlp, ModelConfig, ModelError, Norm, NormLayout, Position, QkNorm};
use crate::ir::{
    Block, DType, Dim, Graph, GraphBuilder, Op, Shape, ShapeError, TensorId, TensorType,
};

/// Compute dtype of the forward graph (mixed precision keeps fp32 masters; see `train`).
pub const COMPUTE_DTYPE: DType = DType::Bf16;

struct Ctx<'a> {
    cfg: &'a ModelConfig,
    b: GraphBuilder,
    code: ModelCode,
    /// The causal mask the model materializes once (Hugging Face Falcon with SDPA).
    mask: Option<TensorId>,
    /// The attention window of the layer being built.
    window: Option<u64>,
    /// Whether the layer being built has a mixture-of-experts feed-forward.
    moe: bool,
}

type R<T> = Result<T, ShapeError>;

fn bsd(last: u64) -> Vec<Dim> {
    vec![Dim::batch(), Dim::seq(), Dim::lit(last)]
}

impl Ctx<'_> {
    fn param(&mut self, name: &str, dims: &[u64]) -> TensorId {
        let ty = TensorType::new(COMPUTE_DTYPE, dims.iter().map(|&d| Dim::lit(d)));
        self.b.param(name, ty)
    }

    fn op(&mut self, op: Op, inputs: &[TensorId]) -> R<TensorId> {
        self.b.add1(op, inputs)
    }

    /// `x · W (+ bias)` with `W[in, out]`.
    fn linear(&mut self, x: TensorId, name: &str, din: u64, dout: u64, bias: bool) -> R<TensorId> {
        let w = self.param(&format!("{name}.weight"), &[din, dout]);
        let y = self.op(
            Op::MatMul {
                ta: false,
                tb: false,
            },
            &[x, w],
        )?;
        if bias {
            let bv = self.param(&format!("{name}.bias"), &[dout]);
            self.op(Op::BiasAdd, &[y, bv])
        } else {
            Ok(y)
        }
    }

    /// The query, key and value projections of `x` for layer prefix `p`: one fused
    /// projection split into three views when `fused`, three projections otherwise.
    fn qkv(&mut self, x: TensorId, p: &str, fused: bool) -> R<(TensorId, TensorId, TensorId)> {
        let cfg = self.cfg;
        let (h, a, kv, d) = (cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim);
        if fused {
            let qkv = self.linear(x, &format!("{p}.qkv"), h, 3 * a * d, cfg.qkv_bias)?;
            let part = |c: &mut Self, i: u64| {
                c.op(
                    Op::Slice {
                        axis: 2,
                        start: i * a * d,
                        len: a * d,
                    },
                    &[qkv],
                )
            };
            Ok((part(self, 0)?, part(self, 1)?, part(self, 2)?))
        } else {
            let q = self.linear(x, &format!("{p}.q"), h, a * d, cfg.qkv_bias)?;
            let k = self.linear(x, &format!("{p}.k"), h, kv * d, cfg.qkv_bias)?;
            let v = self.linear(x, &format!("{p}.v"), h, kv * d, cfg.qkv_bias)?;
            Ok((q, k, v))
        }
    }

    fn norm(&mut self, x: TensorId, name: &str) -> R<TensorId> {
        self.norm_of(x, name, self.cfg.hidden)
    }

    /// The model's norm over the last axis of `x`, which has `h` channels.
    fn norm_of(&mut self, x: TensorId, name: &str, h: u64) -> R<TensorId> {
        let eps = self.cfg.norm_eps;
        let g = self.param(&format!("{name}.weight"), &[h]);
        match self.cfg.norm {
            Norm::LayerNorm => {
                // `nn.LayerNorm` is one kernel in Hugging Face's code too.
                let beta = self.param(&format!("{name}.bias"), &[h]);
                self.op(Op::LayerNorm { eps }, &[x, g, beta])
            }
            Norm::RmsNorm if matches!(self.code, ModelCode::Fused | ModelCode::Torchtitan) => {
                self.op(Op::RmsNorm { eps }, &[x, g])
            }
            Norm::RmsNorm => self.hf_rms_norm(x, g, h),
        }
    }

    /// `c·tanh(x/c)` (Gemma 2's soft-capping), op by op as Hugging Face writes it.
    fn softcap(&mut self, x: TensorId, cap: f64) -> R<TensorId> {
        let y = self.op(Op::Scale { factor: 1.0 / cap }, &[x])?;
        let y = self.op(Op::Tanh, &[y])?;
        self.op(Op::Scale { factor: cap }, &[y])
    }

    /// The attention score scale: `1/√head_dim` unless the model sets one.
    fn attn_scale(&self) -> f64 {
        self.cfg
            .attn_scale
            .unwrap_or(1.0 / (self.cfg.head_dim as f64).sqrt())
    }

    /// Query and key normalization of [`QkNorm::Full`] (on the projections, before the
    /// head split).
    fn qk_norm_full(&mut self, q: TensorId, k: TensorId, p: &str) -> R<(TensorId, TensorId)> {
        let cfg = self.cfg;
        if cfg.qk_norm != QkNorm::Full {
            return Ok((q, k));
        }
        let d = cfg.head_dim;
        let q = self.norm_of(q, &format!("{p}.q_norm"), cfg.heads * d)?;
        let k = self.norm_of(k, &format!("{p}.k_norm"), cfg.kv_heads * d)?;
        Ok((q, k))
    }

    /// Query and key normalization of [`QkNorm::PerHead`] (on `[b, s, n, d]` heads).
    fn qk_norm_heads(&mut self, q: TensorId, k: TensorId, p: &str) -> R<(TensorId, TensorId)> {
        if self.cfg.qk_norm != QkNorm::PerHead {
            return Ok((q, k));
        }
        let d = self.cfg.head_dim;
        let q = self.norm_of(q, &format!("{p}.q_norm"), d)?;
        let k = self.norm_of(k, &format!("{p}.k_norm"), d)?;
        Ok((q, k))
    }

    /// `LlamaRMSNorm.forward`: `x.to(f32)`, `pow(2).mean(-1, keepdim)`, `+ eps`, `rsqrt`,
    /// `x · r`, `.to(bf16)`, `weight · y`. Broadcasts are views (`expand`).
    fn hf_rms_norm(&mut self, x: TensorId, g: TensorId, h: u64) -> R<TensorId> {
        let ty = self.b.ty(x).clone();
        let rank = ty.shape.rank() as u32;
        let last = rank - 1;
        let x32 = self.op(Op::Cast { to: DType::F32 }, &[x])?;
        let sq = self.op(Op::Pow { exponent: 2.0 }, &[x32])?;
        let sum = self.op(Op::ReduceSum { axes: vec![last] }, &[sq])?;
        let mean = self.op(
            Op::Scale {
                factor: 1.0 / h as f64,
            },
            &[sum],
        )?;
        let var = self.op(
            Op::Shift {
                value: self.cfg.norm_eps,
            },
            &[mean],
        )?;
        let r = self.op(Op::Rsqrt, &[var])?;
        let rows = Op::Broadcast {
            axes: vec![last],
            shape: ty.shape.clone(),
        };
        let r = self.op(rows, &[r])?;
        let y32 = self.op(Op::Mul, &[x32, r])?;
        let y = self.op(Op::Cast { to: ty.dtype }, &[y32])?;
        let cols = Op::Broadcast {
            axes: (0..last).collect(),
            shape: ty.shape,
        };
        let g = self.op(cols, &[g])?;
        self.op(Op::Mul, &[g, y])
    }

    fn dropout(&mut self, x: TensorId) -> R<TensorId> {
        if self.cfg.dropout > 0.0 {
            Ok(self.b.add(
                Op::Dropout {
                    p: self.cfg.dropout,
                },
                &[x],
            )?[0])
        } else {
            Ok(x)
        }
    }

    /// The attention sinks `[heads]` of layer prefix `p` when the model has them.
    fn sinks(&mut self, p: &str) -> Option<TensorId> {
        self.cfg
            .attn_sinks
            .then(|| self.param(&format!("{p}.sinks"), &[self.cfg.heads]))
    }

    /// The rotary embedding of `x` as the model code applies it: one op, except in
    /// torchtitan's Llama, whose `ComplexRoPE.apply_rotary_emb` upcasts (`x.float()`),
    /// multiplies by the complex cache in fp32 and casts back (`type_as`)
    /// (`torchtitan/models/common/rope.py`): three kernels, two of them fp32 passes.
    fn rotary(&mut self, x: TensorId, dims: u64, theta: f64) -> R<TensorId> {
        if self.code != ModelCode::Torchtitan {
            return self.op(Op::Rotary { dims, theta }, &[x]);
        }
        let dtype = self.b.ty(x).dtype;
        let x32 = self.op(Op::Cast { to: DType::F32 }, &[x])?;
        let y32 = self.op(Op::Rotary { dims, theta }, &[x32])?;
        self.op(Op::Cast { to: dtype }, &[y32])
    }

    /// `[b, s, n·d]` → `[b, s, n, d]`.
    fn split_heads(&mut self, x: TensorId, n: u64) -> R<TensorId> {
        let d = self.cfg.head_dim;
        let shape = Shape::new([Dim::batch(), Dim::seq(), Dim::lit(n), Dim::lit(d)]);
        self.op(Op::Reshape { shape }, &[x])
    }

    fn attention(&mut self, x: TensorId, p: &str) -> R<TensorId> {
        if let Some(m) = &self.cfg.mla {
            return self.mla_attention(x, p, m);
        }
        if let ModelCode::Transformers { arch, attn } = self.code {
            return self.hf_attention(x, p, arch, attn);
        }
        if self.code == ModelCode::Torchtitan {
            return self.hf_attention(x, p, HfArch::Llama, AttnImpl::Sdpa);
        }
        let cfg = self.cfg;
        let (h, a, kv, d) = (cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim);
        // Megatron-style fused projection, split into views, when heads are not grouped.
        let (q, k, v) = self.qkv(x, p, a == kv)?;
        let (q, k) = self.qk_norm_full(q, k, p)?;
        let q = self.split_heads(q, a)?;
        let k = self.split_heads(k, kv)?;
        let v = self.split_heads(v, kv)?;
        let (mut q, mut k) = self.qk_norm_heads(q, k, p)?;
        // ALiBi adds no op: its bias is added inside the attention kernel or the score
        // GEMM (see `Position::Alibi`).
        if let Position::Rotary { dims, theta } = cfg.position {
            q = self.op(Op::Rotary { dims, theta }, &[q])?;
            k = self.op(Op::Rotary { dims, theta }, &[k])?;
        }
        let scale = self.attn_scale();
        let ctx = match cfg.attention {
            Attention::Flash => {
                let mut ins = vec![q, k, v];
                ins.extend(self.sinks(p));
                self.op(
                    Op::FlashAttention {
                        causal: true,
                        scale,
                        window: self.window,
                        sinks: cfg.attn_sinks,
                    },
                    &ins,
                )?
            }
            Attention::Eager => {
                let (k, v) = if a == kv {
                    (k, v)
                } else {
                    let times = a / kv;
                    (
                        self.op(Op::Repeat { axis: 2, times }, &[k])?,
                        self.op(Op::Repeat { axis: 2, times }, &[v])?,
                    )
                };
                self.eager_attention(q, k, v, scale)?
            }
        };
        let ctx = self.op(
            Op::Reshape {
                shape: Shape::new(bsd(a * d)),
            },
            &[ctx],
        )?;
        self.linear(ctx, &format!("{p}.out"), a * d, h, cfg.out_bias)
    }

    /// Multi-head latent attention (DeepSeek-V2 section 2.1; [`super::Mla`] gives the
    /// equations and shapes), for layer prefix `p`, from existing ops only:
    ///
    /// * queries: `q_a` `[h, r_q]` → the model's norm over `r_q` → `q_b`
    ///   `[r_q, a·(d_n+d_r)]` (or one `q` `[h, a·(d_n+d_r)]` without a query latent),
    ///   split into heads; the `d_r` part is sliced off, rotated and concatenated back;
    /// * keys/values: `kv_a` `[h, r_kv + d_r]`, sliced into the latent (normed over
    ///   `r_kv`) and the shared rotary key `[b, s, 1, d_r]` (rotated, then repeated to
    ///   the `a` heads, as `expand` + `cat` does in Megatron-LM and Hugging Face);
    ///   `kv_b` `[r_kv, a·(d_n+d_v)]` split into heads and sliced into `k_n`, `v`;
    ///   `k = k_n ‖ k_r` (`concat`);
    /// * the attention core with query/key head dim `d_n + d_r` and value head dim
    ///   `d_v`; the output projection `[a·d_v, h]`.
    ///
    /// The fused attention ops ([`Op::FlashAttention`], [`Op::Sdpa`]) take keys and
    /// values of one head dim, so for them the values are zero-padded to `d_n + d_r`
    /// channels and the output sliced back to `d_v` (what Hugging Face's DeepSeek code
    /// does for `flash_attention_2`; a wider `d_v` pads `q` and `k` instead). That counts the `P·V` product and the saved
    /// `v`/output at `d_n + d_r` channels instead of `d_v` (DeepSeek-V3: 192 for 128,
    /// +20% of the attention core's FLOPs); Transformer Engine's fused attention runs
    /// `d_v` directly. Eager attention builds the two matmuls with their own head dims.
    ///
    /// Tensor parallelism (the sharder) splits `q_b`, `kv_b` (or `q`) by columns and
    /// the output projection by rows; `q_a`, `kv_a` and the latent norms stay
    /// replicated, as in Megatron-LM's `MLASelfAttention`.
    fn mla_attention(&mut self, x: TensorId, p: &str, m: &super::Mla) -> R<TensorId> {
        let cfg = self.cfg;
        let (h, a) = (cfg.hidden, cfg.heads);
        let (dn, dr, dv) = (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim);
        let dqk = dn + dr;
        let theta = match cfg.position {
            Position::Rotary { theta, .. } => theta,
            // `validate` refuses MLA without rotary positions.
            Position::Learned { .. } | Position::Alibi => 10_000.0,
        };
        let rotary = Op::Rotary { dims: dr, theta };
        let heads = |c: &mut Self, t: TensorId, d: u64| {
            let shape = Shape::new([Dim::batch(), Dim::seq(), Dim::lit(a), Dim::lit(d)]);
            c.op(Op::Reshape { shape }, &[t])
        };
        let slice = |c: &mut Self, t: TensorId, axis: u32, start: u64, len: u64| {
            c.op(Op::Slice { axis, start, len }, &[t])
        };
        // Queries.
        let q = match m.q_lora_rank {
            Some(r) => {
                let c_q = self.linear(x, &format!("{p}.q_a"), h, r, false)?;
                let c_q = self.norm_of(c_q, &format!("{p}.q_a_norm"), r)?;
                self.linear(c_q, &format!("{p}.q_b"), r, a * dqk, false)?
            }
            None => self.linear(x, &format!("{p}.q"), h, a * dqk, false)?,
        };
        let q = heads(self, q, dqk)?;
        let q_nope = slice(self, q, 3, 0, dn)?;
        let q_rope = slice(self, q, 3, dn, dr)?;
        let q_rope = self.op(rotary.clone(), &[q_rope])?;
        let q = self.op(Op::Concat { axis: 3 }, &[q_nope, q_rope])?;
        // Keys and values.
        let r = m.kv_lora_rank;
        let kv_a = self.linear(x, &format!("{p}.kv_a"), h, r + dr, false)?;
        let c_kv = slice(self, kv_a, 2, 0, r)?;
        let c_kv = self.norm_of(c_kv, &format!("{p}.kv_a_norm"), r)?;
        let k_rope = slice(self, kv_a, 2, r, dr)?;
        let one_head = Shape::new([Dim::batch(), Dim::seq(), Dim::lit(1), Dim::lit(dr)]);
        let k_rope = self.op(Op::Reshape { shape: one_head }, &[k_rope])?;
        let k_rope = self.op(rotary, &[k_rope])?;
        let k_rope = self.op(Op::Repeat { axis: 2, times: a }, &[k_rope])?;
        let kv = self.linear(c_kv, &format!("{p}.kv_b"), r, a * (dn + dv), false)?;
        let kv = heads(self, kv, dn + dv)?;
        let k_nope = slice(self, kv, 3, 0, dn)?;
        let v = slice(self, kv, 3, dn, dv)?;
        let k = self.op(Op::Concat { axis: 3 }, &[k_nope, k_rope])?;
        let scale = self.attn_scale();
        let fused = match self.code {
            ModelCode::Fused => match cfg.attention {
                Attention::Flash => Some(false),
                Attention::Eager => None,
            },
            ModelCode::Transformers {
                attn: AttnImpl::Sdpa,
                ..
            }
            | ModelCode::Torchtitan => Some(true),
            ModelCode::Transformers {
                attn: AttnImpl::Eager,
                ..
            } => None,
        };
        let ctx = match fused {
            Some(sdpa) => {
                // Zero channels change no score: pad the narrower of q/k and v to the
                // wider head dim.
                let d = dqk.max(dv);
                let pad = |c: &mut Self, t: TensorId, have: u64| {
                    if have < d {
                        let op = Op::Pad {
                            axis: 3,
                            before: 0,
                            after: d - have,
                        };
                        c.op(op, &[t])
                    } else {
                        Ok(t)
                    }
                };
                let q = pad(self, q, dqk)?;
                let k = pad(self, k, dqk)?;
                let v = pad(self, v, dv)?;
                let o = if sdpa {
                    let op = Op::Sdpa {
                        causal: true,
                        scale,
                        window: self.window,
                        sinks: false,
                    };
                    self.b.add(op, &[q, k, v])?[0]
                } else {
                    let op = Op::FlashAttention {
                        causal: true,
                        scale,
                        window: self.window,
                        sinks: false,
                    };
                    self.op(op, &[q, k, v])?
                };
                if dv < d {
                    slice(self, o, 3, 0, dv)?
                } else {
                    o
                }
            }
            None => self.eager_attention(q, k, v, scale)?,
        };
        let ctx = self.op(
            Op::Reshape {
                shape: Shape::new(bsd(a * dv)),
            },
            &[ctx],
        )?;
        self.linear(ctx, &format!("{p}.out"), a * dv, h, cfg.out_bias)
    }

    /// Eager causal attention over `[b, s, heads, d]` queries, keys and values (as many
    /// key/value heads as query heads): heads first, `q·kᵀ`, soft-capping when the
    /// model has it (on the scaled scores), the causal softmax at `scale`, dropout,
    /// `·v`, and back to `[b, s, heads, d_v]`.
    fn eager_attention(
        &mut self,
        q: TensorId,
        k: TensorId,
        v: TensorId,
        scale: f64,
    ) -> R<TensorId> {
        let heads_first = Op::Transpose {
            perm: vec![0, 2, 1, 3],
        };
        let q = self.op(heads_first.clone(), &[q])?;
        let k = self.op(heads_first.clone(), &[k])?;
        let v = self.op(heads_first.clone(), &[v])?;
        let scores = self.op(
            Op::MatMul {
                ta: false,
                tb: true,
            },
            &[q, k],
        )?;
        // Soft-capping needs the scaled scores: scale, cap, then the softmax.
        let (scores, scale) = match self.cfg.attn_softcap {
            Some(cap) => {
                let s = self.op(Op::Scale { factor: scale }, &[scores])?;
                (self.softcap(s, cap)?, 1.0)
            }
            None => (scores, scale),
        };
        let probs = self.op(
            Op::Softmax {
                causal: true,
                scale,
            },
            &[scores],
        )?;
        let probs = self.dropout(probs)?;
        let ctx = self.op(
            Op::MatMul {
                ta: false,
                tb: false,
            },
            &[probs, v],
        )?;
        self.op(heads_first, &[ctx])
    }

    /// The attention block as Hugging Face's modules run it (see [`ModelCode`]).
    fn hf_attention(&mut self, x: TensorId, p: &str, arch: HfArch, attn: AttnImpl) -> R<TensorId> {
        let cfg = self.cfg;
        let (h, a, kv, d) = (cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim);
        // One fused projection (`c_attn`, `query_key_value`), split into views.
        let (q, k, v) = self.qkv(x, p, a == kv && !arch.separate_qkv())?;
        let (q, k) = self.qk_norm_full(q, k, p)?;
        let q = self.split_heads(q, a)?;
        let k = self.split_heads(k, kv)?;
        let mut v = self.split_heads(v, kv)?;
        let (mut q, mut k) = self.qk_norm_heads(q, k, p)?;
        // Whether q, k, v are still views of a projection (no op has copied them yet).
        let qk_view = cfg.qk_norm == QkNorm::None;
        let (mut q_view, mut k_view, mut v_view) = (qk_view, qk_view, true);
        if let Position::Rotary { dims, theta } = cfg.position {
            // `q·cos + rotate_half(q)·sin`: a new tensor; it keeps only cos and sin.
            q = self.rotary(q, dims, theta)?;
            k = self.rotary(k, dims, theta)?;
            (q_view, k_view) = (false, false);
        }
        // `repeat_kv` (eager) and Falcon's new decoder broadcast key/value heads to all
        // query heads with a copy; SDPA otherwise takes them unrepeated (`enable_gqa`;
        // Falcon-7B's multi-query form too, measured to the byte).
        let repeat = a != kv
            && (attn == AttnImpl::Eager
                || (arch == HfArch::Falcon && cfg.norm_layout != NormLayout::Shared));
        if repeat {
            let times = a / kv;
            k = self.op(Op::Repeat { axis: 2, times }, &[k])?;
            v = self.op(Op::Repeat { axis: 2, times }, &[v])?;
            (k_view, v_view) = (false, false);
        }
        let scale = self.attn_scale();
        let ctx = match attn {
            AttnImpl::Sdpa => {
                let mut ins = vec![q, k, v];
                if let Some(mask) = self.mask {
                    // PyTorch turns the boolean mask into an additive one of the compute
                    // dtype on every call.
                    let dtype = self.b.ty(q).dtype;
                    ins.push(self.op(Op::Cast { to: dtype }, &[mask])?);
                }
                ins.extend(self.sinks(p));
                let causal = self.mask.is_none();
                let op = Op::Sdpa {
                    causal,
                    scale,
                    window: self.window,
                    sinks: cfg.attn_sinks,
                };
                let o = self.b.add(op, &ins)?[0];
                // The flash kernel lays its output out like `q`: `[b, s, heads, d]`,
                // where the model's `transpose(1, 2).contiguous()` copies nothing, unless
                // a concatenation laid `q` out heads-first.
                if arch.rotary_by_concat() {
                    self.op(Op::Contiguous, &[o])?
                } else {
                    o
                }
            }
            AttnImpl::Eager if cfg.attn_sinks => {
                return Err(ShapeError {
                    op: "softmax",
                    inputs: Vec::new(),
                    reason: "eager attention with sinks (a softmax over the scores and one \
                             more column) is not expressed; use the sdpa code"
                        .into(),
                });
            }
            AttnImpl::Eager => {
                let heads_first = Op::Transpose {
                    perm: vec![0, 2, 1, 3],
                };
                let mut q = self.op(heads_first.clone(), &[q])?;
                let mut k = self.op(heads_first.clone(), &[k])?;
                let mut v = self.op(heads_first.clone(), &[v])?;
                // `torch.matmul` folds heads into the batch; a head-split view of a
                // projection cannot fold without a copy, which backward then reads.
                for (t, view) in [(&mut q, q_view), (&mut k, k_view), (&mut v, v_view)] {
                    if view {
                        *t = self.op(Op::Contiguous, &[*t])?;
                    }
                }
                let scores = self.op(
                    Op::MatMul {
                        ta: false,
                        tb: true,
                    },
                    &[q, k],
                )?;
                let mut scores = self.op(Op::Scale { factor: scale }, &[scores])?;
                if let Some(cap) = cfg.attn_softcap {
                    scores = self.softcap(scores, cap)?;
                }
                // The additive causal mask, then the softmax: one op (the mask add keeps
                // nothing for backward).
                let softmax = Op::Softmax {
                    causal: true,
                    scale: 1.0,
                };
                let probs = if arch.eager_softmax_fp32() {
                    let dtype = self.b.ty(scores).dtype;
                    let s32 = self.op(Op::Cast { to: DType::F32 }, &[scores])?;
                    let p32 = self.op(softmax, &[s32])?;
                    self.op(Op::Cast { to: dtype }, &[p32])?
                } else {
                    self.op(softmax, &[scores])?
                };
                let probs = self.dropout(probs)?;
                let ctx = self.op(
                    Op::MatMul {
                        ta: false,
                        tb: false,
                    },
                    &[probs, v],
                )?;
                let ctx = self.op(heads_first, &[ctx])?;
                self.op(Op::Contiguous, &[ctx])?
            }
        };
        let ctx = self.op(
            Op::Reshape {
                shape: Shape::new(bsd(a * d)),
            },
            &[ctx],
        )?;
        self.linear(ctx, &format!("{p}.out"), a * d, h, cfg.out_bias)
    }

    /// `NewGELUActivation`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, op by op.
    fn gelu_new(&mut self, x: TensorId) -> R<TensorId> {
        let half = self.op(Op::Scale { factor: 0.5 }, &[x])?;
        let cube = self.op(Op::Pow { exponent: 3.0 }, &[x])?;
        let cube = self.op(Op::Scale { factor: 0.044715 }, &[cube])?;
        let inner = self.op(Op::Add, &[x, cube])?;
        let inner = self.op(
            Op::Scale {
                factor: (2.0 / std::f64::consts::PI).sqrt(),
            },
            &[inner],
        )?;
        let t = self.op(Op::Tanh, &[inner])?;
        let t = self.op(Op::Shift { value: 1.0 }, &[t])?;
        self.op(Op::Mul, &[half, t])
    }

    fn mlp(&mut self, x: TensorId, p: &str) -> R<TensorId> {
        let cfg = self.cfg;
        if let (true, Some(m)) = (self.moe, &cfg.moe) {
            return self.moe_mlp(x, p, m);
        }
        let (h, f) = (cfg.hidden, cfg.ffn);
        match cfg.mlp {
            Mlp::Gelu => {
                let y = self.linear(x, &format!("{p}.fc1"), h, f, cfg.mlp_bias)?;
                let y = match self.code {
                    ModelCode::Transformers { arch, .. } if arch.gelu_new() => self.gelu_new(y)?,
                    _ => self.op(Op::Gelu, &[y])?,
                };
                self.linear(y, &format!("{p}.fc2"), f, h, cfg.mlp_bias)
            }
            Mlp::SwiGlu | Mlp::GeGlu => {
                let gate = self.linear(x, &format!("{p}.gate"), h, f, cfg.mlp_bias)?;
                let up = self.linear(x, &format!("{p}.up"), h, f, cfg.mlp_bias)?;
                let act = if cfg.mlp == Mlp::GeGlu {
                    self.op(Op::Gelu, &[gate])?
                } else {
                    self.op(Op::Silu, &[gate])?
                };
                let y = self.op(Op::Mul, &[act, up])?;
                self.linear(y, &format!("{p}.down"), f, h, cfg.mlp_bias)
            }
        }
    }

    /// A SwiGLU feed-forward of intermediate size `f` (a shared expert).
    fn swiglu(&mut self, x: TensorId, p: &str, f: u64) -> R<TensorId> {
        let h = self.cfg.hidden;
        let gate = self.linear(x, &format!("{p}.gate"), h, f, false)?;
        let up = self.linear(x, &format!("{p}.up"), h, f, false)?;
        let act = self.op(Op::Silu, &[gate])?;
        let y = self.op(Op::Mul, &[act, up])?;
        self.linear(y, &format!("{p}.down"), f, h, false)
    }

    /// A mixture-of-experts feed-forward: the router's logits `x·W[h, E]`, scoring and
    /// top-k (`moe_route`), the tokens' rows grouped by expert (`moe_dispatch`), each
    /// expert's SwiGLU as grouped matmuls over the stacked `[E, h, f]` weights, the
    /// weighted sum back per token (`moe_combine`), and shared experts on every token.
    ///
    /// Saved for backward (from the op rules): the router's scores and choices, the
    /// dispatched rows, the experts' gate/up outputs and SwiGLU product for the routed
    /// rows, the experts' outputs with the combine weights.
    fn moe_mlp(&mut self, x: TensorId, p: &str, m: &super::Moe) -> R<TensorId> {
        let h = self.cfg.hidden;
        let (e, f) = (m.experts, m.expert_ffn);
        let logits = self.linear(x, &format!("{p}.router"), h, e, m.router_bias)?;
        let route = Op::MoeRoute {
            topk: m.topk,
            sigmoid: m.scoring == super::Scoring::Sigmoid,
        };
        let r = self.b.add(route, &[logits])?;
        let (weights, idx) = (r[0], r[2]);
        let capacity = m.capacity_factor;
        let rows = self.op(
            Op::MoeDispatch {
                experts: e,
                capacity,
            },
            &[x, idx],
        )?;
        let w = |c: &mut Self, name: &str, din: u64, dout: u64| {
            let ty = TensorType::new(COMPUTE_DTYPE, [Dim::lit(e), Dim::lit(din), Dim::lit(dout)]);
            c.b.param(&format!("{p}.experts.{name}.weight"), ty)
        };
        let (wg, wu, wd) = (
            w(self, "gate", h, f),
            w(self, "up", h, f),
            w(self, "down", f, h),
        );
        // Per-expert biases `[E, n]` (gpt-oss), added to each expert's rows.
        let bias = |c: &mut Self, y: TensorId, name: &str, n: u64| -> R<TensorId> {
            if !m.expert_linear_bias {
                return Ok(y);
            }
            let ty = TensorType::new(COMPUTE_DTYPE, [Dim::lit(e), Dim::lit(n)]);
            let b = c.b.param(&format!("{p}.experts.{name}.bias"), ty);
            c.op(Op::GroupedBiasAdd, &[y, b])
        };
        let gate = self.op(Op::GroupedMatMul { tb: false }, &[rows, wg])?;
        let gate = bias(self, gate, "gate", f)?;
        let up = self.op(Op::GroupedMatMul { tb: false }, &[rows, wu])?;
        let up = bias(self, up, "up", f)?;
        let y = match m.clamped_swiglu {
            None => {
                let act = self.op(Op::Silu, &[gate])?;
                self.op(Op::Mul, &[act, up])?
            }
            Some(c) => self.clamped_swiglu(gate, up, c)?,
        };
        let y = self.op(Op::GroupedMatMul { tb: false }, &[y, wd])?;
        let y = bias(self, y, "down", h)?;
        let mut out = self.op(
            Op::MoeCombine {
                experts: e,
                capacity,
            },
            &[y, weights, idx],
        )?;
        if m.shared_ffn > 0 {
            let mut shared = self.swiglu(x, &format!("{p}.shared"), m.shared_ffn)?;
            if m.shared_gate {
                // `sigmoid(shared_expert_gate(x)) * shared_expert(x)`, with
                // σ(z) = (1 + tanh(z/2))/2.
                let z = self.linear(x, &format!("{p}.shared_gate"), h, 1, false)?;
                let z = self.op(Op::Scale { factor: 0.5 }, &[z])?;
                let z = self.op(Op::Tanh, &[z])?;
                let z = self.op(Op::Shift { value: 1.0 }, &[z])?;
                let z = self.op(Op::Scale { factor: 0.5 }, &[z])?;
                let col = Shape::new([Dim::batch(), Dim::seq()]);
                let z = self.op(Op::Reshape { shape: col }, &[z])?;
                let full = Op::Broadcast {
                    axes: vec![2],
                    shape: Shape::new(bsd(h)),
                };
                let z = self.op(full, &[z])?;
                shared = self.op(Op::Mul, &[z, shared])?;
            }
            out = self.op(Op::Add, &[out, shared])?;
        }
        Ok(out)
    }

    /// gpt-oss's clamped SwiGLU: `g = min(gate, limit)`, `u = clamp(up, −limit,
    /// limit)`, `(u + 1) · g · σ(α·g)`, with `g · σ(α·g) = silu(α·g)/α` exactly.
    fn clamped_swiglu(
        &mut self,
        gate: TensorId,
        up: TensorId,
        c: super::ClampedSwiglu,
    ) -> R<TensorId> {
        let g = self.op(
            Op::Clamp {
                min: None,
                max: Some(c.limit),
            },
            &[gate],
        )?;
        let u = self.op(
            Op::Clamp {
                min: Some(-c.limit),
                max: Some(c.limit),
            },
            &[up],
        )?;
        let ag = self.op(Op::Scale { factor: c.alpha }, &[g])?;
        let glu = self.op(Op::Silu, &[ag])?;
        let glu = self.op(
            Op::Scale {
                factor: 1.0 / c.alpha,
            },
            &[glu],
        )?;
        let u1 = self.op(Op::Shift { value: 1.0 }, &[u])?;
        self.op(Op::Mul, &[u1, glu])
    }

    /// Layer `i` of the graph, built as the model's layer `real` (which decides its
    /// attention window).
    fn layer(&mut self, x: TensorId, i: u32, real: u32) -> R<TensorId> {
        let p = format!("layers.{i}");
        self.window = self.cfg.layer_window(real);
        self.moe = self.cfg.is_moe_layer(real);
        match self.cfg.norm_layout {
            NormLayout::Pre | NormLayout::Shared => {
                let n1 = self.norm(x, &format!("{p}.norm1"))?;
                let attn = self.attention(n1, &format!("{p}.attn"))?;
                let attn = self.dropout(attn)?;
                if self.cfg.parallel_residual {
                    let n2 = if self.cfg.norm_layout == NormLayout::Shared {
                        n1
                    } else {
                        self.norm(x, &format!("{p}.norm2"))?
                    };
                    let m = self.mlp(n2, &format!("{p}.mlp"))?;
                    let m = self.dropout(m)?;
                    let y = self.op(Op::Add, &[x, attn])?;
                    self.op(Op::Add, &[y, m])
                } else {
                    let y = self.op(Op::Add, &[x, attn])?;
                    let n2 = self.norm(y, &format!("{p}.norm2"))?;
                    let m = self.mlp(n2, &format!("{p}.mlp"))?;
                    let m = self.dropout(m)?;
                    self.op(Op::Add, &[y, m])
                }
            }
            NormLayout::Sandwich | NormLayout::Post => {
                let pre = self.cfg.norm_layout == NormLayout::Sandwich;
                let n1 = if pre {
                    self.norm(x, &format!("{p}.norm1"))?
                } else {
                    x
                };
                let attn = self.attention(n1, &format!("{p}.attn"))?;
                let attn = self.norm(attn, &format!("{p}.post_attn_norm"))?;
                let attn = self.dropout(attn)?;
                let y = self.op(Op::Add, &[x, attn])?;
                let n2 = if pre {
                    self.norm(y, &format!("{p}.norm2"))?
                } else {
                    y
                };
                let m = self.mlp(n2, &format!("{p}.mlp"))?;
                let m = self.norm(m, &format!("{p}.post_mlp_norm"))?;
                let m = self.dropout(m)?;
                self.op(Op::Add, &[y, m])
            }
        }
    }
}

/// Builds the forward graph: `embed` (with [`ModelConfig::embed_norm`], the embedding
/// norm), `layer.0` … `layer.{l-1}`, `head` (final norm, logits, mean cross-entropy).
/// Inputs `tokens` and `labels` (and `positions` with learned positions) are
/// `i64[b,s]`; parameters are bf16 with role `param`. ALiBi positions add no op
/// ([`Position::Alibi`] says why).
///
/// This is the fused (Megatron-LM) model code: `build_forward_with(cfg, ModelCode::Fused)`.
pub fn build_forward(cfg: &ModelConfig) -> Result<Graph, ModelError> {
    build_forward_with(cfg, ModelCode::Fused)
}

/// [`build_forward`] for the op sequence of `code`: the fused kernels, or Hugging Face
/// Transformers' modules with their attention implementation (see [`ModelCode`] for what
/// differs and why). The parameters are the same; with Hugging Face code whose model
/// materializes the causal mask and hands it to SDPA (Falcon), the embedding block also
/// has the input `attention_mask`, `u8[b,s,s]` (a boolean mask).
///
/// With [`ModelCode::Transformers`], [`ModelConfig::attention`] is ignored (the
/// attention implementation decides), and the head's loss is the fused cross-entropy op.
pub fn build_forward_with(cfg: &ModelConfig, code: ModelCode) -> Result<Graph, ModelError> {
    let layers: Vec<u32> = (0..cfg.layers).collect();
    build(cfg, code, &layers)
}

/// The template graph a compiler plans `cfg` with: the layers of
/// [`ModelConfig::template_layers`], tagged `layer.0` … in that order, each built as
/// the model layer it stands for (its attention window), with the embedding and head.
pub fn build_template(cfg: &ModelConfig, code: ModelCode) -> Result<Graph, ModelError> {
    cfg.validate()?;
    build(cfg, code, &cfg.template_layers())
}

fn build(cfg: &ModelConfig, code: ModelCode, layers: &[u32]) -> Result<Graph, ModelError> {
    cfg.validate()?;
    let shape_err = |source| ModelError::Shape {
        model: cfg.name.clone(),
        source,
    };
    let mut c = Ctx {
        cfg,
        b: GraphBuilder::new(cfg.name.clone()),
        code,
        mask: None,
        window: None,
        moe: false,
    };
    let ids = TensorType::new(DType::I64, [Dim::batch(), Dim::seq()]);
    let (h, v) = (cfg.hidden, cfg.vocab);

    c.b.set_block(Block::Embed);
    let tokens = c.b.input("tokens", ids.clone());
    let wte = c.param("embed.tokens.weight", &[v, h]);
    let mut x = c.op(Op::Embedding, &[wte, tokens]).map_err(shape_err)?;
    if let Position::Learned { max_positions } = cfg.position {
        let pos = c.b.input("positions", ids.clone());
        let wpe = c.param("embed.positions.weight", &[max_positions, h]);
        let pe = c.op(Op::Embedding, &[wpe, pos]).map_err(shape_err)?;
        x = c.op(Op::Add, &[x, pe]).map_err(shape_err)?;
    }
    if cfg.embed_scale {
        // Gemma: `hidden_states * normalizer`, `normalizer = hidden_size ** 0.5`.
        let factor = (h as f64).sqrt();
        x = c.op(Op::Scale { factor }, &[x]).map_err(shape_err)?;
    }
    if cfg.embed_norm {
        // BLOOM: `word_embeddings_layernorm(inputs_embeds)`.
        x = c.norm(x, "embed.norm").map_err(shape_err)?;
    }
    x = c.dropout(x).map_err(shape_err)?;
    if let ModelCode::Transformers {
        arch,
        attn: AttnImpl::Sdpa,
    } = code
    {
        if arch.sdpa_mask() {
            let mask = TensorType::new(DType::U8, [Dim::batch(), Dim::seq(), Dim::seq()]);
            c.mask = Some(c.b.input("attention_mask", mask));
        }
    }

    for (i, &real) in (0u32..).zip(layers) {
        c.b.set_block(Block::Layer(i));
        x = c.layer(x, i, real).map_err(shape_err)?;
    }

    c.b.set_block(Block::Head);
    let run = |c: &mut Ctx| -> R<TensorId> {
        let xn = c.norm(x, "head.norm")?;
        let logits = if cfg.tied_embeddings {
            c.op(
                Op::MatMul {
                    ta: false,
                    tb: true,
                },
                &[xn, wte],
            )?
        } else {
            let w = c.param("head.out.weight", &[h, v]);
            c.op(
                Op::MatMul {
                    ta: false,
                    tb: false,
                },
                &[xn, w],
            )?
        };
        let logits = match cfg.final_softcap {
            Some(cap) => c.softcap(logits, cap)?,
            None => logits,
        };
        let labels = c.b.input("labels", ids.clone());
        c.op(Op::CrossEntropy, &[logits, labels])
    };
    run(&mut c).map_err(shape_err)?;
    Ok(c.b.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{verify, Env};

    #[test]
    fn every_zoo_model_builds_verifies_and_counts_its_params() {
        for entry in crate::models::zoo::ZOO {
            let cfg = (entry.config)();
            let g = build_forward(&cfg).unwrap();
            verify(&g).unwrap();
            let env = Env::new(1, 1);
            let counted: u64 = g
                .ops()
                .filter(|&o| matches!(g.op(o), Op::Param { .. }))
                .map(|o| g.ty(g.node(o).results[0]).shape.numel_at(env).unwrap())
                .sum();
            assert_eq!(counted, cfg.param_count(), "{}", cfg.name);
        }
    }
}
