//! Whose model code a forward graph follows: Megatron-LM's fused kernels, or the
//! modules of Hugging Face Transformers.
//!
//! The same [`ModelConfig`](super::ModelConfig) runs different op sequences under
//! different engines, and the sequence decides which tensors autograd keeps for backward.
//! [`build_forward_with`](super::build_forward_with) emits the op decomposition of the
//! chosen code, so that activation memory still comes out of autodiff on real IR ops.
//!
//! What Hugging Face's model code saves beyond the fused code, per layer (measured with
//! `scripts/measure_hf_saved.py`, recorded in `tests/data/hf_saved_bytes.json`):
//!
//! * **RMSNorm** (llama, mistral, qwen2) upcasts to fp32 and runs
//!   `x·rsqrt(mean(x²) + eps)` as separate ops, then casts back and multiplies by the
//!   weight: it keeps the fp32 input (read by `pow` and the multiply), the fp32
//!   `rsqrt` rows, and the bf16 normalized tensor the weight multiplies — on top of
//!   the output the projections read. The fused kernel keeps only the bf16 input.
//! * **Eager attention** materializes the scores: `QKᵀ`, a scale, the mask and a
//!   softmax whose fp32 result (llama, mistral, qwen2, gpt_neox: `softmax(…,
//!   dtype=float32)`) or bf16 result (gpt2, falcon) backward reads, then the bf16
//!   probabilities the `·V` product reads. `torch.matmul` copies a head-split view
//!   of a projection (it cannot fold the heads into the batch without a copy), so it
//!   keeps that copy, not the projection ([`Op::Contiguous`](crate::ir::Op)).
//!   Key/value heads of grouped-query attention are repeated first (`repeat_kv`).
//! * **SDPA** runs PyTorch's flash kernel ([`Op::Sdpa`](crate::ir::Op)): it keeps `q`,
//!   `k`, `v` as given (a slice of a fused QKV projection keeps the whole projection
//!   alive), the output and the fp32 row log-sum-exp. The output projection reads the
//!   kernel's output itself, or a copy where `q` was laid out heads-first
//!   ([`HfArch::rotary_by_concat`]). Grouped-query heads go in
//!   unrepeated (`enable_gqa`), except in Falcon's new decoder architecture, which
//!   broadcasts them to all heads (Falcon-7B's shared-layernorm multi-query form does
//!   not). Falcon passes a materialized mask, which PyTorch
//!   converts to the compute dtype in every layer and the kernel's backward reads.
//! * **`gelu_new`** (gpt2) is written out as `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`:
//!   it keeps `x`, `0.5·x`, the `tanh` result and `1 + tanh` — four tensors of the MLP
//!   width where the fused GeLU keeps one. gpt_neox's and falcon's exact `gelu` keeps
//!   its input, as the fused op does.
//! * **Rotary** (`q·cos + rotate_half(q)·sin`) keeps only `cos` and `sin`, which the model
//!   computes once for all layers; the rotated `q`, `k` are new tensors, as with the fused
//!   op.
//!
//! Dropout (probability above zero) is the IR's dropout op, which keeps a 1-byte mask as
//! CUDA's `native_dropout` does; the measurements run without dropout (PyTorch skips it
//! at probability zero), so this part is not checked against them. The head's loss is the
//! fused cross-entropy op under every model code.
//!
//! Not modeled: `nn.LayerNorm`'s per-row mean and reciprocal deviation (PyTorch keeps
//! them, 2 elements per token per norm in the input dtype, 0.03–0.06% of a layer at the
//! measured sizes); Falcon's two 8-byte index tensors (multi-query key/value split).

use serde::{Deserialize, Serialize};

/// Hugging Face Transformers' `attn_implementation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttnImpl {
    /// `"eager"`: the architecture's own `QKᵀ` → softmax → `·V` in PyTorch ops.
    Eager,
    /// `"sdpa"`: `torch.nn.functional.scaled_dot_product_attention`, on its flash kernel.
    Sdpa,
}

/// The Hugging Face modeling file (`model_type`) whose code runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HfArch {
    /// `modeling_llama.py`.
    Llama,
    /// `modeling_mistral.py` (Llama's code for these purposes).
    Mistral,
    /// `modeling_qwen2.py` (Llama's code with q/k/v biases).
    Qwen2,
    /// `modeling_gpt2.py`.
    Gpt2,
    /// `modeling_gpt_neox.py`.
    GptNeox,
    /// `modeling_falcon.py`.
    Falcon,
}

impl HfArch {
    /// Every architecture, in table order.
    pub const ALL: [HfArch; 6] = [
        HfArch::Llama,
        HfArch::Mistral,
        HfArch::Qwen2,
        HfArch::Gpt2,
        HfArch::GptNeox,
        HfArch::Falcon,
    ];

    /// The `model_type` of a Hugging Face `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            HfArch::Llama => "llama",
            HfArch::Mistral => "mistral",
            HfArch::Qwen2 => "qwen2",
            HfArch::Gpt2 => "gpt2",
            HfArch::GptNeox => "gpt_neox",
            HfArch::Falcon => "falcon",
        }
    }

    /// The modeling file whose code runs a configuration that names none (a zoo model),
    /// when its layout says it unambiguously: RMSNorm with SwiGLU and rotary positions
    /// is Llama's code (Qwen2's with q/k/v biases only); LayerNorm with learned
    /// positions and GeLU is GPT-2's. Other layouts (LayerNorm with rotary positions:
    /// GPT-NeoX or Falcon) need the `model_type` of a `config.json`.
    pub fn infer(cfg: &super::ModelConfig) -> Option<HfArch> {
        use super::{Mlp, Norm, NormLayout, Position, QkNorm};
        // Features the modelled code does not have (Qwen3/OLMo 2 query-key norms,
        // OLMo 2's post-norms, latent attention, Gemma's scalings and caps, sinks, an
        // embedding norm) mean another architecture's code. Experts do not: apar builds
        // the MoE block itself, as Mixtral's code runs it (see `from_model_type`).
        let plain = cfg.qk_norm == QkNorm::None
            && cfg.norm_layout == NormLayout::Pre
            && cfg.mla.is_none()
            && !cfg.embed_scale
            && cfg.attn_scale.is_none()
            && cfg.attn_softcap.is_none()
            && cfg.final_softcap.is_none()
            && !cfg.attn_sinks
            && !cfg.embed_norm;
        if !plain {
            return None;
        }
        match (cfg.norm, cfg.mlp, cfg.position) {
            (Norm::RmsNorm, Mlp::SwiGlu, Position::Rotary { .. }) => {
                Some(if cfg.qkv_bias && !cfg.out_bias {
                    HfArch::Qwen2
                } else {
                    HfArch::Llama
                })
            }
            (Norm::LayerNorm, Mlp::Gelu, Position::Learned { .. }) => Some(HfArch::Gpt2),
            _ => None,
        }
    }

    /// `model_type`s whose code is another architecture's: `modeling_mixtral.py` is
    /// Mistral's attention and decoder layer around a sparse MoE block, which apar
    /// builds for every MoE model; the plan of its `config.json` agrees with a
    /// `torch.export` capture of Transformers' own Mixtral
    /// (`python/tests/test_capture_hf.py`).
    const ALIASES: [(&'static str, HfArch); 1] = [("mixtral", HfArch::Mistral)];

    /// The architecture of a `model_type`, if apar models its code.
    pub fn from_model_type(model_type: &str) -> Option<HfArch> {
        HfArch::ALL
            .into_iter()
            .find(|a| a.model_type() == model_type)
            .or_else(|| {
                HfArch::ALIASES
                    .into_iter()
                    .find_map(|(t, a)| (t == model_type).then_some(a))
            })
    }

    /// Every `model_type` [`HfArch::from_model_type`] knows, in order.
    pub fn model_types() -> Vec<&'static str> {
        HfArch::ALL
            .map(HfArch::model_type)
            .into_iter()
            .chain(HfArch::ALIASES.map(|(t, _)| t))
            .collect()
    }

    /// Whether eager attention takes the softmax in fp32 (`softmax(…, dtype=float32)`)
    /// rather than in the compute dtype.
    pub fn eager_softmax_fp32(self) -> bool {
        !matches!(self, HfArch::Gpt2 | HfArch::Falcon)
    }

    /// Whether the q/k/v projections are separate modules even without grouped-query
    /// attention (`q_proj`, `k_proj`, `v_proj`), rather than one fused projection.
    pub fn separate_qkv(self) -> bool {
        matches!(self, HfArch::Llama | HfArch::Mistral | HfArch::Qwen2)
    }

    /// Whether the MLP's GeLU is `gelu_new`, written out in PyTorch ops, rather than
    /// PyTorch's one-kernel `gelu` (the architecture's default activation).
    pub fn gelu_new(self) -> bool {
        matches!(self, HfArch::Gpt2)
    }

    /// Whether the rotary embedding is applied by concatenating the rotated and the
    /// passed-through channels (`torch.cat((q_embed, q_pass), -1)`, gpt_neox's partial
    /// rotary, used at any fraction). The concatenation lays `q` out heads-first, and
    /// SDPA's flash kernel lays its output out like `q`: the model's
    /// `transpose(1, 2).contiguous()` then copies it. (Elsewhere `q` keeps the projection's
    /// `[b, s, heads, d]` layout and that call copies nothing.)
    pub fn rotary_by_concat(self) -> bool {
        matches!(self, HfArch::GptNeox)
    }

    /// Whether the model materializes the causal mask and hands it to SDPA (Falcon builds
    /// it with `allow_is_causal_skip=False`) instead of asking for `is_causal`.
    pub fn sdpa_mask(self) -> bool {
        matches!(self, HfArch::Falcon)
    }
}

/// Whose model code the forward graph follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelCode {
    /// Megatron-LM's (and Transformer Engine's) fused kernels: one op each for
    /// layernorm/RMSNorm, scale-mask-softmax, GeLU, flash attention as
    /// [`ModelConfig::attention`](super::ModelConfig) says; what
    /// [`build_forward`](super::build_forward) builds.
    Fused,
    /// Hugging Face Transformers' modules for `arch` with attention `attn`: what the
    /// `hf` engine runs.
    Transformers {
        /// The modeling file.
        arch: HfArch,
        /// `attn_implementation`.
        attn: AttnImpl,
    },
    /// torchtitan's Llama (`torchtitan/models/llama3/model.py`), eager PyTorch: separate
    /// q/k/v projections, rotary embedding and SwiGLU as separate ops, causal
    /// `F.scaled_dot_product_attention`, like Hugging Face's Llama with `sdpa`; but its
    /// RMSNorm is one kernel (`nn.RMSNorm` → `F.rms_norm`, which on CUDA runs the
    /// fused `_fused_rms_norm` and saves its input and the per-row reciprocal RMS,
    /// where Hugging Face's `LlamaRMSNorm` upcasts and saves an fp32 copy).
    Torchtitan,
}
