//! Model frontends: the built-in zoo, Hugging Face `config.json` files, and the
//! builder that turns a [`ModelConfig`] into a forward [`Graph`](crate::ir::Graph)
//! with block tags.
//!
//! [`build_forward`] uses Megatron-LM granularity: separate layernorm, bias add, GeLU,
//! fused scale-mask-softmax and dropout ops (dropout with a 1-byte mask), so that the
//! training graph's saved tensors reproduce Korthikanti et al.'s activation counts.
//! [`build_forward_with`] also builds the op sequence Hugging Face Transformers' modules
//! run (see [`ModelCode`]), whose saved tensors are those PyTorch keeps for them.

mod build;
pub mod code;
pub mod hf;
mod load;
pub mod zoo;

pub use build::{build_forward, build_forward_with, build_template, COMPUTE_DTYPE};
pub use code::{AttnImpl, HfArch, ModelCode};
pub use load::{load, load_ir_file, resolve, LoadedModel, ModelDef, Overrides};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Normalization layer kind.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// LayerNorm with weight and bias.
    LayerNorm,
    /// RMSNorm with weight only.
    RmsNorm,
}

/// Position encoding. (Externally tagged in serde, so that plans holding a model
/// configuration go through the binary codec, which has no self-describing tags.)
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    /// A learned table of `max_positions` rows added to the token embedding.
    Learned {
        /// Rows of the position table.
        max_positions: u64,
    },
    /// Rotary embedding on the first `dims` channels of every query/key head.
    Rotary {
        /// Rotated channels per head (even).
        dims: u64,
        /// Frequency base.
        theta: f64,
    },
    /// Attention with linear biases (ALiBi; Press, Smith and Lewis 2022, "Train
    /// Short, Test Long", arXiv 2108.12409): no position table and nothing applied to
    /// the queries or keys; each head `i` adds `-m_i·(query − key position)` to its
    /// scores, with fixed slopes `m_i` (BLOOM; Falcon's `alibi`). No parameters.
    ///
    /// The graph has no op for it: the fused attention kernels take the slopes and
    /// add the bias inside the kernel (FlashAttention-2's `alibi_slopes`), and eager
    /// attention adds it in the score GEMM itself (Hugging Face's and
    /// Megatron-DeepSpeed's `baddbmm` with the `[b·heads, 1, s]` bias as its input,
    /// broadcast over the queries), which materializes no tensor beyond the scores.
    /// The one add per score (beside `2·head_dim` FLOPs of `QKᵀ` per score) and the
    /// small bias tensor are not priced.
    Alibi,
}

/// Feed-forward block kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mlp {
    /// `fc2(gelu(fc1(x)))`.
    Gelu,
    /// `down(silu(gate(x)) · up(x))` (Llama).
    SwiGlu,
    /// `down(gelu(gate(x)) · up(x))` (Gemma's GeGLU, `gelu_pytorch_tanh`; the same
    /// three projections as SwiGLU).
    GeGlu,
}

/// Where a layer's norms sit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormLayout {
    /// A norm before attention and one before the MLP (`x + f(norm(x))`): Llama, GPT.
    #[default]
    Pre,
    /// One norm whose output both attention and the MLP read, with a parallel residual
    /// `x + attn(n) + mlp(n)`, `n = norm(x)` (Falcon-7B: `parallel_attn` with one
    /// `input_layernorm`). Requires [`ModelConfig::parallel_residual`].
    Shared,
    /// Four norms: before and after attention, before and after the MLP
    /// (`x + norm(f(norm(x)))`): Gemma 2 and 3's `input_layernorm`,
    /// `post_attention_layernorm`, `pre_feedforward_layernorm`,
    /// `post_feedforward_layernorm`.
    Sandwich,
    /// A norm on each branch's output only (`x + norm(f(x))`): OLMo 2's
    /// `post_attention_layernorm` and `post_feedforward_layernorm`.
    Post,
}

impl NormLayout {
    /// Norms per layer.
    pub fn per_layer(self) -> u64 {
        match self {
            NormLayout::Shared => 1,
            NormLayout::Pre | NormLayout::Post => 2,
            NormLayout::Sandwich => 4,
        }
    }
}

/// Normalization of queries and keys before the attention scores (and before the
/// rotary embedding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    /// None.
    #[default]
    None,
    /// One norm of `head_dim` channels shared by all query heads, one for key heads
    /// (Qwen3's and Gemma 3's `q_norm`/`k_norm`, `RMSNorm(head_dim)`).
    PerHead,
    /// A norm over the whole query projection (`heads · head_dim`) and one over the
    /// whole key projection (`kv_heads · head_dim`) (OLMo 2).
    Full,
}

/// How the attention core is expressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attention {
    /// Decomposed: `QKᵀ`, fused scale-mask-softmax, dropout, `·V` (materializes `s×s`).
    Eager,
    /// One fused kernel that keeps no `s×s` tensor.
    Flash,
}

/// Largest accepted size of any single dimension (hidden, heads, head dim, ffn, vocab,
/// positions): 2^24, far above every published model (the largest hidden size in the
/// zoo is 25,600, the largest vocabulary 152,064), and small enough that the builder's
/// products of two sizes (such as `3 · heads · head_dim`) stay far inside `u64`; the
/// parameter count, a sum of products of three, is checked separately.
pub const MAX_DIM: u64 = 1 << 24;

/// Largest accepted layer count: 4,096, 32 times the zoo's deepest model (Megatron's
/// 1T, 128 layers) and above every published one; it keeps a search over every stage
/// cut to seconds (at 2^16 layers one plan took over a minute).
pub const MAX_LAYERS: u32 = 1 << 12;

/// Everything needed to build a decoder-only transformer graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Model name (the zoo key or the file it came from).
    pub name: String,
    /// Number of transformer layers `l`.
    pub layers: u32,
    /// Hidden size `h`.
    pub hidden: u64,
    /// Attention heads `a`.
    pub heads: u64,
    /// Key/value heads (`heads` without grouped-query attention).
    pub kv_heads: u64,
    /// Per-head channels `d` (usually `hidden / heads`).
    pub head_dim: u64,
    /// Feed-forward inner size.
    pub ffn: u64,
    /// Vocabulary size `V`.
    pub vocab: u64,
    /// Normalization kind.
    pub norm: Norm,
    /// Normalization epsilon.
    pub norm_eps: f64,
    /// Position encoding.
    pub position: Position,
    /// Feed-forward kind.
    pub mlp: Mlp,
    /// Bias on the query/key/value projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub out_bias: bool,
    /// Biases on the feed-forward projections.
    pub mlp_bias: bool,
    /// `x + attn(ln1(x)) + mlp(ln2(x))` instead of two sequential residuals (GPT-NeoX, GPT-J).
    pub parallel_residual: bool,
    /// Output projection shares the token embedding table.
    pub tied_embeddings: bool,
    /// Dropout probability on the embedding, attention probabilities and residual
    /// branches (0 builds no dropout ops).
    pub dropout: f64,
    /// Attention form.
    pub attention: Attention,
    /// Where the layer's norms sit (absent in older documents: [`NormLayout::Pre`]).
    #[serde(default)]
    pub norm_layout: NormLayout,
    /// Query/key normalization.
    #[serde(default)]
    pub qk_norm: QkNorm,
    /// The token embedding is multiplied by `√hidden` (Gemma's `normalizer`).
    #[serde(default)]
    pub embed_scale: bool,
    /// Attention score scale, when not `1/√head_dim` (Gemma 2's
    /// `query_pre_attn_scalar^-½`).
    #[serde(default)]
    pub attn_scale: Option<f64>,
    /// Attention logit soft-capping `c`: scores become `c·tanh(scores/c)` before the
    /// softmax (Gemma 2's `attn_logit_softcapping`).
    #[serde(default)]
    pub attn_softcap: Option<f64>,
    /// Final logit soft-capping `c`: logits become `c·tanh(logits/c)` before the loss
    /// (Gemma 2's `final_logit_softcapping`).
    #[serde(default)]
    pub final_softcap: Option<f64>,
    /// Sliding-window attention: each query sees the `w` latest keys (itself
    /// included). `None`: every layer attends to the whole sequence.
    #[serde(default)]
    pub sliding_window: Option<u64>,
    /// With a sliding window, every `n`-th layer (layers `n-1`, `2n-1`, …) is global
    /// instead (Gemma 2: 2, Gemma 3: 6); 0 makes every layer local.
    #[serde(default)]
    pub global_every: u32,
    /// Mixture-of-experts feed-forward layers (`None`: every layer is dense).
    #[serde(default)]
    pub moe: Option<Box<Moe>>,
    /// Multi-head latent attention (DeepSeek-V2/V3) instead of the query/key/value
    /// projections (`None`: ordinary attention).
    #[serde(default)]
    pub mla: Option<Box<Mla>>,
    /// Attention sinks: a learned logit per head in every softmax denominator
    /// (gpt-oss's `sinks`, `[heads]` per layer; Megatron-LM `--softmax-type
    /// learnable`). The fused attention ops take them as an input.
    #[serde(default)]
    pub attn_sinks: bool,
    /// A norm of the model's kind right after the embedding, before dropout and the
    /// first layer (BLOOM's `word_embeddings_layernorm`; Megatron-DeepSpeed's
    /// `--embed-layernorm`): `h` weights, and `h` biases for LayerNorm. Absent in
    /// older documents: none.
    #[serde(default)]
    pub embed_norm: bool,
    /// Rotary frequency scaling (a `config.json`'s `rope_scaling`, or
    /// `rope_parameters` with a `rope_type` other than `default`): it changes the
    /// rotation angles, not a tensor's size or an op's work, so plans are the same
    /// with or without it; engine exports carry it. Absent: none.
    #[serde(default)]
    pub rope_scaling: Option<Box<RopeScaling>>,
}

/// Rotary frequency scaling, as Transformers' `modeling_rope_utils.py` names its
/// parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    /// `rope_type` (or the older `type`): `llama3`, `linear`, `yarn`, `dynamic`, ….
    pub rope_type: String,
    /// `factor`: how many times the trained context the positions stretch over.
    pub factor: f64,
    /// `low_freq_factor` (`llama3`).
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// `high_freq_factor` (`llama3`).
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// `original_max_position_embeddings` (`llama3`, `yarn`).
    #[serde(default)]
    pub original_max_position_embeddings: Option<u64>,
    /// `beta_fast` (`yarn`).
    #[serde(default)]
    pub beta_fast: Option<f64>,
    /// `beta_slow` (`yarn`).
    #[serde(default)]
    pub beta_slow: Option<f64>,
    /// `mscale` (DeepSeek's `yarn`).
    #[serde(default)]
    pub mscale: Option<f64>,
    /// `mscale_all_dim` (DeepSeek's `yarn`).
    #[serde(default)]
    pub mscale_all_dim: Option<f64>,
}

/// How a router scores the experts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    /// Softmax over all experts (Mixtral, Qwen-MoE, DeepSeek-V2).
    #[default]
    Softmax,
    /// Independent sigmoids (DeepSeek-V3's `scoring_func: sigmoid`).
    Sigmoid,
}

/// Mixture-of-experts feed-forward layers: a router picks `topk` of `experts` SwiGLU
/// experts per token; optional shared experts see every token.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Moe {
    /// Routed experts `E`.
    pub experts: u64,
    /// Experts chosen per token `k`.
    pub topk: u64,
    /// Intermediate size of one routed expert.
    pub expert_ffn: u64,
    /// Intermediate size of the shared expert(s) together (0: none); DeepSeek's
    /// `n_shared_experts · moe_intermediate_size`, Qwen-MoE's
    /// `shared_expert_intermediate_size`.
    #[serde(default)]
    pub shared_ffn: u64,
    /// The shared expert's output is scaled by `σ(x·g)`, `g[h, 1]` (Qwen-MoE's
    /// `shared_expert_gate`).
    #[serde(default)]
    pub shared_gate: bool,
    /// Router scoring.
    #[serde(default)]
    pub scoring: Scoring,
    /// The first layers are dense (DeepSeek's `first_k_dense_replace`).
    #[serde(default)]
    pub first_dense: u32,
    /// Every `n`-th layer is sparse (layers `n-1`, `2n-1`, …; Qwen-MoE's
    /// `decoder_sparse_step`); 0 or 1: every layer.
    #[serde(default)]
    pub sparse_step: u32,
    /// Layers that are dense whatever the other rules say (Qwen-MoE's `mlp_only_layers`).
    #[serde(default)]
    pub dense_layers: Vec<u32>,
    /// Capacity factor `c`: each expert's buffer holds `c·k·T/E` of the `T` tokens'
    /// rows, tokens past it are dropped. `None`: dropless (the buffers hold exactly the
    /// `k·T` routed rows, balanced).
    #[serde(default)]
    pub capacity_factor: Option<f64>,
    /// The routed experts' combine weights are multiplied by this factor (DeepSeek's
    /// `routed_scaling_factor`: 2.5 in V3, 16 in V2, 1 in V2-Lite). A value, not a
    /// size: it changes no parameter, FLOP or byte; it is carried for the engines'
    /// options (Megatron-LM `--moe-router-topk-scaling-factor`). `None`: 1.
    #[serde(default)]
    pub routed_scale: Option<f64>,
    /// Group-limited routing: the experts form `groups` equal groups and each token
    /// picks its `topk` experts among the best `topk_groups` groups (DeepSeek's
    /// `n_group` / `topk_group`, V2's `group_limited_greedy` and V3's `noaux_tc`).
    /// `None`: top-k over all experts. Changes no size; the router's extra top-k over
    /// `groups` scores is not priced (it is `O(E)` per token, beside the `h·E` logits).
    #[serde(default)]
    pub group_limit: Option<GroupLimit>,
    /// A per-expert bias is added to the scores for the choice only (DeepSeek-V3's
    /// auxiliary-loss-free balancing, `e_score_correction_bias`; Megatron-LM
    /// `--moe-router-enable-expert-bias`). Hugging Face holds it as a buffer, not a
    /// parameter, and it is updated outside the gradient step, so it is no parameter
    /// here either.
    #[serde(default)]
    pub expert_bias: bool,
    /// The softmax runs over all experts before the top-k choice and the chosen `k`
    /// weights are not renormalized (DeepSeek-V2's router; Megatron-LM
    /// `--moe-router-pre-softmax`). `false`: the weights sum to one over the chosen
    /// experts (Mixtral's softmax over the top-k logits). A value: no size changes.
    #[serde(default)]
    pub pre_softmax: bool,
    /// The router's linear layer has a bias `[E]` (gpt-oss).
    #[serde(default)]
    pub router_bias: bool,
    /// The routed experts' linear layers have biases: `[E, f]` on the gate and up
    /// projections, `[E, h]` on the down projection (gpt-oss's `gate_up_proj_bias`
    /// and `down_proj_bias`), added per expert (`grouped_bias_add`).
    #[serde(default)]
    pub expert_linear_bias: bool,
    /// The experts' activation is gpt-oss's clamped SwiGLU instead of SwiGLU.
    #[serde(default)]
    pub clamped_swiglu: Option<ClampedSwiglu>,
}

/// gpt-oss's expert activation (`GptOssExperts._apply_gate`, transformers 4.55):
/// `g = min(gate, limit)`, `u = clamp(up, −limit, limit)`, `(u + 1) · g · σ(α·g)`.
/// The same parameters as SwiGLU; a few more elementwise ops.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClampedSwiglu {
    /// `α` (gpt-oss: 1.702).
    pub alpha: f64,
    /// `limit` (gpt-oss's `swiglu_limit`: 7.0).
    pub limit: f64,
}

/// Group-limited expert choice ([`Moe::group_limit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLimit {
    /// Expert groups (divides the routed expert count).
    pub groups: u64,
    /// Groups a token's experts are chosen from (at most `groups`).
    pub topk_groups: u64,
}

/// Multi-head latent attention (DeepSeek-V2, DeepSeek-AI 2024, section 2.1): queries
/// and keys/values go through low-rank latents; each head's query/key is a
/// `qk_nope`-channel part from the latent and a `qk_rope`-channel rotary part (the
/// key's rotary part shared by all heads).
///
/// With `a` heads, `d_n = qk_nope_head_dim`, `d_r = qk_rope_head_dim`,
/// `d_v = v_head_dim`, `r_q = q_lora_rank`, `r_kv = kv_lora_rank` (the paper's
/// equations 37–47; shapes per token):
///
/// ```text
/// c_q  = RMSNorm(x · W_DQ)             W_DQ [h, r_q]        (no latent: q = x · W_Q, W_Q [h, a·(d_n+d_r)])
/// q    = c_q · W_UQ                    W_UQ [r_q, a·(d_n+d_r)]   → [a, d_n] ‖ [a, d_r] (rotary)
/// c_kv ‖ k_r = x · W_DKV               W_DKV [h, r_kv + d_r]     (k_r: rotary, one head)
/// k_n ‖ v = RMSNorm(c_kv) · W_UKV      W_UKV [r_kv, a·(d_n+d_v)] → [a, d_n] ‖ [a, d_v]
/// k    = k_n ‖ repeat_a(k_r)           [a, d_n + d_r]
/// o    = softmax(q·kᵀ / √(d_n+d_r)) · v   [a, d_v];   y = o · W_O,  W_O [a·d_v, h]
/// ```
///
/// In a [`ModelConfig`] with MLA, `head_dim` is the query/key head dim `d_n + d_r`,
/// `kv_heads` equals `heads`, and the rotary embedding covers `d_r` channels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mla {
    /// Query latent rank (`None`: a full query projection, DeepSeek-V2-Lite).
    pub q_lora_rank: Option<u64>,
    /// Key/value latent rank.
    pub kv_lora_rank: u64,
    /// Per-head query/key channels without rotary embedding.
    pub qk_nope_head_dim: u64,
    /// Per-head query/key channels with rotary embedding.
    pub qk_rope_head_dim: u64,
    /// Per-head value channels.
    pub v_head_dim: u64,
}

impl Moe {
    /// Parameters of one MoE feed-forward layer: router, `E` SwiGLU experts, shared
    /// experts and their gate.
    fn params(&self, h: u64) -> Option<u64> {
        let mut router = h.checked_mul(self.experts)?;
        if self.router_bias {
            router = router.checked_add(self.experts)?;
        }
        let experts = self.experts.checked_mul(self.per_expert(h)?)?;
        let shared = h.checked_mul(self.shared_ffn)?.checked_mul(3)?;
        let gate = if self.shared_gate { h } else { 0 };
        router
            .checked_add(experts)?
            .checked_add(shared)?
            .checked_add(gate)
    }

    /// Parameters of the `E - k` routed experts a token does not use, per layer.
    fn inactive(&self, h: u64) -> Option<u64> {
        self.experts
            .checked_sub(self.topk)?
            .checked_mul(self.per_expert(h)?)
    }

    /// Parameters of one routed expert: three `[h, f]` matrices, and with
    /// [`Moe::expert_linear_bias`] the biases `2f + h`.
    pub fn per_expert(&self, h: u64) -> Option<u64> {
        let f = self.expert_ffn;
        let mut n = h.checked_mul(f)?.checked_mul(3)?;
        if self.expert_linear_bias {
            n = n.checked_add(f.checked_mul(2)?.checked_add(h)?)?;
        }
        Some(n)
    }
}

impl Mla {
    /// Parameters of one MLA block (no biases), norms of `norm_params` per channel.
    fn params(&self, h: u64, heads: u64, per_channel: u64) -> Option<u64> {
        let qk = self.qk_nope_head_dim.checked_add(self.qk_rope_head_dim)?;
        let q = match self.q_lora_rank {
            Some(r) => h
                .checked_mul(r)?
                .checked_add(r.checked_mul(per_channel)?)?
                .checked_add(r.checked_mul(heads)?.checked_mul(qk)?)?,
            None => h.checked_mul(heads)?.checked_mul(qk)?,
        };
        let r = self.kv_lora_rank;
        let kv_a = h.checked_mul(r.checked_add(self.qk_rope_head_dim)?)?;
        let kv_norm = r.checked_mul(per_channel)?;
        let kv_b = r
            .checked_mul(heads)?
            .checked_mul(self.qk_nope_head_dim.checked_add(self.v_head_dim)?)?;
        let out = heads.checked_mul(self.v_head_dim)?.checked_mul(h)?;
        q.checked_add(kv_a)?
            .checked_add(kv_norm)?
            .checked_add(kv_b)?
            .checked_add(out)
    }
}

impl ModelConfig {
    /// The smallest side of a weight every engine's tensor parallelism splits: half the
    /// hidden size. The attention and MLP projections, the embedding and the output
    /// layer are at least that large in both dimensions; the routers and multi-head
    /// latent attention's down-projections, which Megatron-LM keeps whole, are not
    /// (`crate::shard::ModelCost::min_split_dim`).
    pub fn tp_split_dim(&self) -> u64 {
        (self.hidden / 2).max(1)
    }

    /// The first of the counts tensor parallelism splits evenly (attention heads,
    /// key/value heads, feed-forward channels: Megatron-LM asserts each divides) that
    /// `tp` does not divide, as `(what, count)`; `None` when `tp` divides all three.
    pub fn tp_indivisible(&self, tp: u32) -> Option<(&'static str, u64)> {
        [
            ("attention heads", self.heads),
            ("key/value heads", self.kv_heads),
            ("feed-forward channels", self.ffn),
        ]
        .into_iter()
        .find(|&(_, count)| count % u64::from(tp.max(1)) != 0)
    }

    /// The base the loaders and the zoo complete with struct update syntax
    /// (`ModelConfig { hidden: 4096, .., ..ModelConfig::decoder() }`): a sequential,
    /// pre-norm decoder with fused attention and none of the optional features
    /// (no biases, untied, no dropout, no windows, experts, latent attention, sinks,
    /// scales or soft-capping). Its sizes are zero, which [`ModelConfig::validate`]
    /// refuses, so a literal must give every size (and its name, norm, position and
    /// MLP, which the base only fills in).
    pub fn decoder() -> ModelConfig {
        ModelConfig {
            name: String::new(),
            layers: 0,
            hidden: 0,
            heads: 0,
            kv_heads: 0,
            head_dim: 0,
            ffn: 0,
            vocab: 0,
            norm: Norm::LayerNorm,
            norm_eps: 1e-5,
            position: Position::Alibi,
            mlp: Mlp::Gelu,
            qkv_bias: false,
            out_bias: false,
            mlp_bias: false,
            parallel_residual: false,
            tied_embeddings: false,
            dropout: 0.0,
            attention: Attention::Flash,
            norm_layout: NormLayout::Pre,
            qk_norm: QkNorm::None,
            embed_scale: false,
            attn_scale: None,
            attn_softcap: None,
            final_softcap: None,
            sliding_window: None,
            global_every: 0,
            moe: None,
            mla: None,
            attn_sinks: false,
            embed_norm: false,
            rope_scaling: None,
        }
    }

    /// Number of trainable parameters, counted from the configuration (the built
    /// graph's parameter tensors must add up to the same number; a test checks it).
    ///
    /// Saturates at `u64::MAX` for a configuration whose count does not fit (which
    /// [`ModelConfig::validate`] rejects).
    pub fn param_count(&self) -> u64 {
        self.checked_param_count().unwrap_or(u64::MAX)
    }

    /// The layers a compiler builds to stand for all of them, as indices of this
    /// model's layers in order: one inner layer of each kind, then the last layer
    /// (whose output gradient has one use, not two). A uniform model builds layers 0
    /// and `l-1` (layer 0 only when `l` is 1); one whose sliding window skips every
    /// `n`-th layer also builds the first global inner layer `n-1` (when it is not the
    /// last), so local and global layers each get their own template.
    pub fn template_layers(&self) -> Vec<u32> {
        let last = self.layers.saturating_sub(1);
        let mut t = vec![0];
        if self.moe.is_none() {
            if self.alternates() {
                t.push(self.global_every - 1);
            }
        } else {
            let mut kinds = vec![self.layer_kind(0)];
            for i in 1..last {
                let k = self.layer_kind(i);
                if !kinds.contains(&k) {
                    kinds.push(k);
                    t.push(i);
                }
            }
        }
        if last > 0 {
            t.push(last);
        }
        t
    }

    /// Whether inner layers come in two kinds (local and global attention).
    fn alternates(&self) -> bool {
        let last = self.layers.saturating_sub(1);
        self.sliding_window.is_some() && self.global_every > 1 && self.global_every - 1 < last
    }

    /// What distinguishes one layer's structure from another's: global attention, and a
    /// mixture-of-experts feed-forward.
    fn layer_kind(&self, i: u32) -> (bool, bool) {
        (self.layer_window(i).is_none(), self.is_moe_layer(i))
    }

    /// Which of [`ModelConfig::template_layers`] stands for layer `i` (an index into
    /// that list).
    pub fn template_of(&self, i: u32) -> usize {
        if self.moe.is_none() {
            let alternates = self.alternates();
            if i + 1 >= self.layers {
                return if self.layers <= 1 {
                    0
                } else {
                    1 + usize::from(alternates)
                };
            }
            return usize::from(alternates && self.layer_window(i).is_none());
        }
        self.template_indices()
            .get(i as usize)
            .copied()
            .unwrap_or(0)
    }

    /// [`ModelConfig::template_of`] of every layer, in layer order, in `O(layers)`
    /// (`template_of` alone rebuilds the template list, `O(layers)` per call): what a
    /// compiler computes once and reads per configuration.
    pub fn template_indices(&self) -> Vec<usize> {
        if self.moe.is_none() {
            return (0..self.layers).map(|i| self.template_of(i)).collect();
        }
        let t = self.template_layers();
        let kinds: Vec<(bool, bool)> = t.iter().map(|&j| self.layer_kind(j)).collect();
        (0..self.layers)
            .map(|i| {
                if i + 1 >= self.layers {
                    return t.len() - 1;
                }
                let kind = self.layer_kind(i);
                kinds.iter().position(|&k| k == kind).unwrap_or(0)
            })
            .collect()
    }

    /// Whether layer `i`'s feed-forward is a mixture of experts.
    pub fn is_moe_layer(&self, i: u32) -> bool {
        let Some(m) = &self.moe else {
            return false;
        };
        let step = m.sparse_step.max(1);
        i >= m.first_dense && !m.dense_layers.contains(&i) && (i + 1) % step == 0
    }

    /// Parameters a token uses: [`ModelConfig::param_count`] less the routed experts it
    /// is not sent to (`(E - k)/E` of the routed experts' parameters in every MoE
    /// layer). Equal to the total for a dense model.
    pub fn active_param_count(&self) -> u64 {
        let total = self.param_count();
        let Some(m) = &self.moe else {
            return total;
        };
        let moe_layers = (0..self.layers).filter(|&i| self.is_moe_layer(i)).count() as u64;
        m.inactive(self.hidden)
            .and_then(|p| p.checked_mul(moe_layers))
            .map_or(total, |p| total.saturating_sub(p))
    }

    /// Per-head channels of the attention scores and of the values: `(head_dim,
    /// head_dim)` for ordinary attention, `(qk_nope + qk_rope, v_head_dim)` with
    /// multi-head latent attention. The attention core's forward FLOPs per query/key
    /// pair and head are `2·(d_qk + d_v)` (PaLM's `12·H·Q` model-FLOPs term per token
    /// and context position is `6·H·(d_qk + d_v)`).
    pub fn attention_head_dims(&self) -> (u64, u64) {
        match &self.mla {
            Some(m) => (
                m.qk_nope_head_dim.saturating_add(m.qk_rope_head_dim),
                m.v_head_dim,
            ),
            None => (self.head_dim, self.head_dim),
        }
    }

    /// The attention window of layer `i` (`None`: global attention).
    pub fn layer_window(&self, i: u32) -> Option<u64> {
        let w = self.sliding_window?;
        let global = self.global_every > 0 && (i + 1) % self.global_every == 0;
        (!global).then_some(w)
    }

    /// [`ModelConfig::param_count`], or `None` when the count overflows `u64`.
    pub fn checked_param_count(&self) -> Option<u64> {
        let (h, f, v) = (self.hidden, self.ffn, self.vocab);
        let d = self.head_dim;
        // Weights per normalized channel: scale and bias, or scale alone.
        let per_channel: u64 = match self.norm {
            Norm::LayerNorm => 2,
            Norm::RmsNorm => 1,
        };
        let norm = h.checked_mul(per_channel)?;
        let q = h.checked_mul(self.heads)?.checked_mul(d)?;
        let kv = h
            .checked_mul(self.kv_heads)?
            .checked_mul(d)?
            .checked_mul(2)?;
        let out = self.heads.checked_mul(d)?.checked_mul(h)?;
        let qk_norm = match self.qk_norm {
            QkNorm::None => 0,
            QkNorm::PerHead => d.checked_mul(2)?,
            QkNorm::Full => self.heads.checked_add(self.kv_heads)?.checked_mul(d)?,
        };
        let attn = match &self.mla {
            Some(m) => m.params(h, self.heads, per_channel)?,
            None => q.checked_add(kv)?.checked_add(out)?,
        };
        let mut layer = attn
            .checked_add(norm.checked_mul(self.norm_layout.per_layer())?)?
            .checked_add(qk_norm.checked_mul(per_channel)?)?;
        if self.qkv_bias {
            let n = self.kv_heads.checked_mul(2)?.checked_add(self.heads)?;
            layer = layer.checked_add(n.checked_mul(d)?)?;
        }
        if self.out_bias {
            layer = layer.checked_add(h)?;
        }
        if self.attn_sinks {
            layer = layer.checked_add(self.heads)?;
        }
        let (mats, bias) = match self.mlp {
            Mlp::Gelu => (2, f.checked_add(h)?),
            Mlp::SwiGlu | Mlp::GeGlu => (3, f.checked_mul(2)?.checked_add(h)?),
        };
        let mut dense = h.checked_mul(f)?.checked_mul(mats)?;
        if self.mlp_bias {
            dense = dense.checked_add(bias)?;
        }
        let moe_layers = match &self.moe {
            Some(_) => (0..self.layers).filter(|&i| self.is_moe_layer(i)).count() as u64,
            None => 0,
        };
        let mut layers = u64::from(self.layers)
            .checked_mul(layer)?
            .checked_add((u64::from(self.layers) - moe_layers).checked_mul(dense)?)?;
        if let Some(m) = &self.moe {
            layers = layers.checked_add(moe_layers.checked_mul(m.params(h)?)?)?;
        }
        let embed = v.checked_mul(h)?;
        let mut total = layers.checked_add(embed)?.checked_add(norm)?;
        if self.embed_norm {
            total = total.checked_add(norm)?;
        }
        if let Position::Learned { max_positions } = self.position {
            total = total.checked_add(max_positions.checked_mul(h)?)?;
        }
        if !self.tied_embeddings {
            total = total.checked_add(embed)?;
        }
        Some(total)
    }

    /// Checks the configuration's internal consistency.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &'static str, why: String| {
            Err(ModelError::Invalid {
                model: self.name.clone(),
                field,
                why,
            })
        };
        if self.layers == 0 {
            return bad("layers", "must be positive".into());
        }
        if self.layers > MAX_LAYERS {
            return bad(
                "layers",
                format!(
                    "{} exceeds the largest supported count {MAX_LAYERS}",
                    self.layers
                ),
            );
        }
        for (field, v) in [
            ("hidden", self.hidden),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("ffn", self.ffn),
            ("vocab", self.vocab),
        ] {
            if v == 0 {
                return bad(field, "must be positive".into());
            }
        }
        let positions = match self.position {
            Position::Learned { max_positions } => max_positions,
            Position::Rotary { .. } | Position::Alibi => 0,
        };
        for (field, v) in [
            ("hidden", self.hidden),
            ("heads", self.heads),
            ("head_dim", self.head_dim),
            ("ffn", self.ffn),
            ("vocab", self.vocab),
            ("max_positions", positions),
        ] {
            if v > MAX_DIM {
                return bad(
                    field,
                    format!("{v} exceeds the largest supported size {MAX_DIM}"),
                );
            }
        }
        if self.heads % self.kv_heads != 0 {
            return bad(
                "kv_heads",
                format!(
                    "{} heads are not a multiple of {} kv heads",
                    self.heads, self.kv_heads
                ),
            );
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("{} is outside [0, 1)", self.dropout));
        }
        if let Position::Rotary { dims, .. } = self.position {
            if dims == 0 || dims % 2 != 0 || dims > self.head_dim {
                return bad(
                    "rotary dims",
                    format!(
                        "{dims} must be even, positive and ≤ head dim {}",
                        self.head_dim
                    ),
                );
            }
        }
        if let Position::Learned { max_positions: 0 } = self.position {
            return bad("max_positions", "must be positive".into());
        }
        let shared = self.norm_layout == NormLayout::Shared;
        let sequential_only = matches!(self.norm_layout, NormLayout::Sandwich | NormLayout::Post);
        if shared && !self.parallel_residual {
            return bad(
                "norm_layout",
                "`shared` needs the parallel residual (attention and MLP read one norm)".into(),
            );
        }
        if sequential_only && self.parallel_residual {
            return bad(
                "norm_layout",
                format!("{:?} norms need the sequential residual", self.norm_layout),
            );
        }
        for (field, v) in [
            ("attn_scale", self.attn_scale),
            ("attn_softcap", self.attn_softcap),
            ("final_softcap", self.final_softcap),
        ] {
            if let Some(x) = v {
                if !(x.is_finite() && x > 0.0) {
                    return bad(field, format!("{x} must be positive and finite"));
                }
            }
        }
        if let Some(r) = &self.rope_scaling {
            // Transformers' rope validation (`modeling_rope_utils.py`) asks every
            // scaling for a factor of at least 1; the frequency factors and betas are
            // positive, the YaRN mscales non-negative (0 is DeepSeek's default).
            if !(r.factor.is_finite() && r.factor >= 1.0) {
                return bad(
                    "rope_scaling",
                    format!("factor {} must be at least 1", r.factor),
                );
            }
            for (key, v, min) in [
                ("low_freq_factor", r.low_freq_factor, f64::MIN_POSITIVE),
                ("high_freq_factor", r.high_freq_factor, f64::MIN_POSITIVE),
                ("beta_fast", r.beta_fast, f64::MIN_POSITIVE),
                ("beta_slow", r.beta_slow, f64::MIN_POSITIVE),
                ("mscale", r.mscale, 0.0),
                ("mscale_all_dim", r.mscale_all_dim, 0.0),
            ] {
                if let Some(x) = v.filter(|&x| !(x.is_finite() && x >= min)) {
                    return bad("rope_scaling", format!("{key} {x} is out of range"));
                }
            }
            if r.original_max_position_embeddings == Some(0) {
                return bad(
                    "rope_scaling",
                    "original_max_position_embeddings must be positive".into(),
                );
            }
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window", "must be positive".into());
        }
        if self.global_every > 0 && self.sliding_window.is_none() {
            return bad(
                "global_every",
                "alternates local and global layers, but there is no sliding window".into(),
            );
        }
        if self.attn_sinks && (self.mla.is_some() || self.attention == Attention::Eager) {
            return bad(
                "attn_sinks",
                "attention sinks are an input of the fused attention ops only (not with \
                 eager attention or MLA)"
                    .into(),
            );
        }
        if let Some(m) = &self.moe {
            if m.experts == 0 || m.expert_ffn == 0 || m.experts > MAX_DIM || m.expert_ffn > MAX_DIM
            {
                return bad(
                    "moe",
                    format!(
                        "{} experts of size {}: each must be in 1..={MAX_DIM}",
                        m.experts, m.expert_ffn
                    ),
                );
            }
            if m.topk == 0 || m.topk > m.experts {
                return bad(
                    "moe.topk",
                    format!("{} must be in 1..={} (the expert count)", m.topk, m.experts),
                );
            }
            if let Some(c) = m.clamped_swiglu {
                if !(c.alpha.is_finite() && c.alpha > 0.0 && c.limit.is_finite() && c.limit > 0.0) {
                    return bad(
                        "moe.clamped_swiglu",
                        format!(
                            "alpha {} and limit {} must be positive and finite",
                            c.alpha, c.limit
                        ),
                    );
                }
            }
            if m.shared_gate && m.shared_ffn == 0 {
                return bad(
                    "moe.shared_gate",
                    "gates a shared expert there is not".into(),
                );
            }
            if let Some(g) = m.group_limit {
                if g.groups == 0
                    || m.experts % g.groups != 0
                    || g.topk_groups == 0
                    || g.topk_groups > g.groups
                    || m.topk > g.topk_groups.saturating_mul(m.experts / g.groups)
                {
                    return bad(
                        "moe.group_limit",
                        format!(
                            "{} groups, top {} groups: the groups must divide {} experts and \
                             the chosen groups hold at least top-k = {} experts",
                            g.groups, g.topk_groups, m.experts, m.topk
                        ),
                    );
                }
            }
            if m.pre_softmax && m.scoring != Scoring::Softmax {
                return bad(
                    "moe.pre_softmax",
                    "is a softmax router's option; the scores are sigmoids".into(),
                );
            }
            if let Some(r) = m.routed_scale {
                if !(r.is_finite() && r > 0.0) {
                    return bad(
                        "moe.routed_scale",
                        format!("{r} must be positive and finite"),
                    );
                }
            }
            if let Some(c) = m.capacity_factor {
                if crate::ir::moe_rows(crate::ir::Dim::lit(1), 1, Some(c)).is_err() {
                    return bad(
                        "moe.capacity_factor",
                        format!("{c} must be positive, in thousandths"),
                    );
                }
            }
        }
        if let Some(m) = &self.mla {
            let dims = [
                m.kv_lora_rank,
                m.qk_nope_head_dim,
                m.qk_rope_head_dim,
                m.v_head_dim,
                m.q_lora_rank.unwrap_or(1),
            ];
            if dims.iter().any(|&d| d == 0 || d > MAX_DIM) || m.qk_rope_head_dim % 2 != 0 {
                return bad(
                    "mla",
                    "needs positive ranks and head dims, an even rotary part".into(),
                );
            }
            if self.qkv_bias || !matches!(self.position, Position::Rotary { .. }) {
                return bad(
                    "mla",
                    "takes no query/key/value bias and needs rotary positions".into(),
                );
            }
            let qk = m.qk_nope_head_dim.saturating_add(m.qk_rope_head_dim);
            if self.head_dim != qk || self.kv_heads != self.heads {
                return bad(
                    "mla",
                    format!(
                        "needs head_dim = qk_nope + qk_rope = {qk} (found {}) and one key/value \
                         head per query head (found {} of {})",
                        self.head_dim, self.kv_heads, self.heads
                    ),
                );
            }
            if let Position::Rotary { dims, .. } = self.position {
                if dims != m.qk_rope_head_dim {
                    return bad(
                        "mla",
                        format!(
                            "rotates the qk_rope_head_dim = {} channels, not {dims}",
                            m.qk_rope_head_dim
                        ),
                    );
                }
            }
            if self.qk_norm != QkNorm::None {
                return bad("mla", "has latent norms, not query/key norms".into());
            }
        }
        if self.checked_param_count().is_none() {
            return bad("param_count", "overflows u64".into());
        }
        Ok(())
    }
}

/// A problem loading or building a model.
#[derive(Debug, Error)]
pub enum ModelError {
    /// The zoo has no such model.
    #[error("unknown model `{0}` (see `apar models`)")]
    Unknown(String),
    /// A configuration field is missing.
    #[error("{file}: missing field `{field}`")]
    MissingField {
        /// The file.
        file: String,
        /// The field.
        field: String,
    },
    /// The architecture is not supported.
    #[error("{file}: unsupported architecture `{arch}` (supported: {supported})")]
    Unsupported {
        /// The file.
        file: String,
        /// The `model_type` / architecture found.
        arch: String,
        /// What is supported.
        supported: &'static str,
    },
    /// A field has an invalid value.
    #[error("model `{model}`: `{field}` {why}")]
    Invalid {
        /// Model name.
        model: String,
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The file could not be read or is not JSON.
    #[error("{file}: {why}")]
    File {
        /// The file.
        file: String,
        /// What went wrong.
        why: String,
    },
    /// A dense architecture's file names routed experts (a Mixtral or Qwen-MoE file
    /// relabelled `llama`/`mistral`): planning it dense would drop the experts.
    #[error("{file}: `{arch}` is a dense architecture, but the file has routed experts ({}); use the mixture-of-experts `model_type` (mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3)", keys.join(", "))]
    ExpertsOnDense {
        /// The file.
        file: String,
        /// The `model_type` found.
        arch: String,
        /// The expert-count keys present.
        keys: Vec<String>,
    },
    /// The builder produced an op with a shape error (a configuration the graph cannot express).
    #[error("model `{model}`: {source}")]
    Shape {
        /// Model name.
        model: String,
        /// The shape error.
        source: crate::ir::ShapeError,
    },
}

#[cfg(test)]
mod tests {
    use super::zoo::ZOO;

    /// Every layer's template is a layer of the same kind (window and experts), the
    /// last layer's the last template, for every zoo model and a few layer counts
    /// (uniform, alternating and mixture-of-experts layouts).
    #[test]
    fn every_layer_maps_to_a_template_of_its_kind() {
        for e in ZOO {
            for layers in [None, Some(1), Some(2), Some(3), Some(7)] {
                let mut cfg = (e.config)();
                if let Some(l) = layers {
                    cfg.layers = l;
                }
                let templates = cfg.template_layers();
                let of = cfg.template_indices();
                assert_eq!(of.len(), cfg.layers as usize, "{}", e.name);
                for (i, &t) in of.iter().enumerate() {
                    let i = i as u32;
                    assert_eq!(cfg.template_of(i), t, "{} layer {i}", e.name);
                    if i + 1 == cfg.layers {
                        assert_eq!(t, templates.len() - 1, "{} last layer", e.name);
                    } else {
                        assert_eq!(
                            cfg.layer_kind(templates[t]),
                            cfg.layer_kind(i),
                            "{} layer {i} of {} layers",
                            e.name,
                            cfg.layers
                        );
                    }
                }
            }
        }
    }
}
