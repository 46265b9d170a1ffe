//! The built-in model zoo.
//!
//! Each entry cites the source of its dimensions. Megatron-family entries use
//! decomposed (eager) attention with dropout 0.1, as those papers ran; the others
//! use flash attention and no dropout (GPT-2 keeps its configured dropout 0.1).
//! [`with_attention`] switches the attention form (the CLI's `--attention`).
//!
//! Sources:
//! - GPT-2: the Hugging Face `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` configs
//!   (Radford et al. 2019): vocabulary 50,257, 1,024 positions, tied embeddings.
//! - Megatron-LM: Narayanan et al., *Efficient Large-Scale Language Model Training
//!   on GPU Clusters Using Megatron-LM* (SC'21), Table 1: vocabulary 51,200,
//!   sequence 2,048, ffn 4h; each entry is named by the table's parameter column.
//! - Korthikanti et al., *Reducing Activation Recomputation in Large Transformer
//!   Models* (2022), Table 3: the 22B, 175B (GPT-3) and 530B (MT-NLG) models with
//!   the same Megatron conventions.
//! - Llama 2 (Touvron et al. 2023), Llama 3 / 3.1 (Dubey et al. 2024), Mistral 7B
//!   (Jiang et al. 2023, v0.1), Qwen2 (Yang et al. 2024): the published Hugging Face
//!   `config.json` of each checkpoint.
//! - Gemma 2 9B and 27B (Gemma Team 2024, Table 1): the Hugging Face
//!   `google/gemma-2-9b` and `google/gemma-2-27b` configs (`tests/data/hf/gemma-2-*.json`,
//!   whose Hugging Face counts `tests/models.rs` checks).
//! - DeepSeek-V3 (Liu et al. 2024, DeepSeek-V3 technical report) and DeepSeek-V2-Lite
//!   (DeepSeek-AI 2024, DeepSeek-V2): the Hugging Face `deepseek-ai/DeepSeek-V3` and
//!   `deepseek-ai/DeepSeek-V2-Lite` configs (`tests/data/hf/deepseek-*.json`). The
//!   counts are Hugging Face's model, which builds no multi-token-prediction module
//!   (V3's checkpoint has one more layer, 61, for it; the report's 671B excludes it).
//! - gpt-oss-20b and gpt-oss-120b (OpenAI: Agarwal et al. 2025, gpt-oss-120b & gpt-oss-20b model card): the Hugging Face
//!   `openai/gpt-oss-20b` and `openai/gpt-oss-120b` configs (`tests/data/hf/gpt-oss-*.json`).
//! - BLOOM 176B (BigScience Workshop 2022, "BLOOM: A 176B-Parameter Open-Access
//!   Multilingual Language Model", arXiv 2211.05100): the Hugging Face `bigscience/bloom`
//!   config (`tests/data/hf/bloom-176b.json`): ALiBi positions, a LayerNorm after the
//!   embedding, 250,880-token vocabulary, tied head.

use super::{Attention, Mlp, ModelConfig, ModelError, Norm, NormLayout, Position, RopeScaling};

/// One zoo entry.
pub struct ZooEntry {
    /// Name accepted by `--model`.
    pub name: &'static str,
    /// One-line description with the source of the numbers.
    pub about: &'static str,
    /// Builds the configuration.
    pub config: fn() -> ModelConfig,
    /// Positions a rotary model was trained for: its Hugging Face config's
    /// `max_position_embeddings` (the committed `tests/data/hf/*.json` where there is
    /// one; Meta's Llama 2 and Llama 3 configs give 4,096 and 8,192). `None` where
    /// positions are learned (the table's size is the limit) or not rotary.
    pub trained_positions: Option<u64>,
}

/// A GPT-2 / Megatron-style model: learned positions, LayerNorm, GeLU MLP with 4h,
/// biases everywhere, tied embeddings.
#[allow(clippy::too_many_arguments)]
pub fn gpt(
    name: &str,
    layers: u32,
    hidden: u64,
    heads: u64,
    vocab: u64,
    max_positions: u64,
    dropout: f64,
    attention: Attention,
) -> ModelConfig {
    ModelConfig {
        name: name.into(),
        layers,
        hidden,
        heads,
        kv_heads: heads,
        head_dim: hidden / heads,
        ffn: 4 * hidden,
        vocab,
        norm: Norm::LayerNorm,
        norm_eps: 1e-5,
        position: Position::Learned { max_positions },
        mlp: Mlp::Gelu,
        qkv_bias: true,
        out_bias: true,
        mlp_bias: true,
        tied_embeddings: true,
        dropout,
        attention,
        ..ModelConfig::decoder()
    }
}

/// A Llama-style model: RoPE, RMSNorm, SwiGLU, no biases, untied embeddings.
#[allow(clippy::too_many_arguments)]
pub fn llama(
    name: &str,
    layers: u32,
    hidden: u64,
    heads: u64,
    kv_heads: u64,
    ffn: u64,
    vocab: u64,
    theta: f64,
) -> ModelConfig {
    let head_dim = hidden / heads;
    ModelConfig {
        name: name.into(),
        layers,
        hidden,
        heads,
        kv_heads,
        head_dim,
        ffn,
        vocab,
        norm: Norm::RmsNorm,
        norm_eps: 1e-5,
        position: Position::Rotary {
            dims: head_dim,
            theta,
        },
        mlp: Mlp::SwiGlu,
        qkv_bias: false,
        out_bias: false,
        mlp_bias: false,
        tied_embeddings: false,
        dropout: 0.0,
        ..ModelConfig::decoder()
    }
}

/// Vocabulary `V` of the Megatron-LM papers' GPT models (Narayanan et al. 2021, §5:
/// the GPT-2 BPE vocabulary padded to 51,200, a multiple of 1,024).
pub const MEGATRON_VOCAB: u64 = 51200;

/// Sequence length, and learned position rows, of the Megatron-LM papers' GPT models.
pub const MEGATRON_SEQ: u64 = 2048;

/// GPT-2 BPE vocabulary size (Hugging Face `gpt2*` configs, `vocab_size`).
pub const GPT2_VOCAB: u64 = 50257;

/// GPT-2 context length (Hugging Face `gpt2*` configs, `n_positions`).
pub const GPT2_POSITIONS: u64 = 1024;

/// Llama 2 and Mistral 7B v0.1 SentencePiece vocabulary (`vocab_size`).
const LLAMA2_VOCAB: u64 = 32000;

/// Llama 3 / 3.1 vocabulary (`vocab_size`).
const LLAMA3_VOCAB: u64 = 128256;

/// Llama 3 / 3.1 RoPE base (`rope_theta`).
const LLAMA3_THETA: f64 = 500000.0;

/// RoPE base of Llama 2 and Mistral 7B v0.1 (`rope_theta`, the Llama default).
const ROPE_THETA: f64 = 10000.0;

/// A Megatron-LM GPT model as in Narayanan et al. (SC'21) and Korthikanti et al.
/// (2022): vocabulary [`MEGATRON_VOCAB`], [`MEGATRON_SEQ`] learned positions,
/// ffn 4h, biases, tied embeddings, dropout 0.1, eager attention.
pub fn megatron(name: &str, layers: u32, hidden: u64, heads: u64) -> ModelConfig {
    gpt(
        name,
        layers,
        hidden,
        heads,
        MEGATRON_VOCAB,
        MEGATRON_SEQ,
        0.1,
        Attention::Eager,
    )
}

/// A GPT-2 checkpoint's shape: [`GPT2_VOCAB`], [`GPT2_POSITIONS`], dropout 0.1
/// (`attn_pdrop`, `resid_pdrop`, `embd_pdrop` of the HF configs), flash attention.
fn gpt2(name: &str, layers: u32, hidden: u64, heads: u64) -> ModelConfig {
    gpt(
        name,
        layers,
        hidden,
        heads,
        GPT2_VOCAB,
        GPT2_POSITIONS,
        0.1,
        Attention::Flash,
    )
}

/// Qwen2-7B: the Llama layout with q/k/v biases, RMSNorm eps 1e-6, RoPE base 10^6.
fn qwen2_7b() -> ModelConfig {
    let mut cfg = llama("qwen2-7b", 28, 3584, 28, 4, 18944, 152064, 1_000_000.0);
    cfg.norm_eps = 1e-6;
    cfg.qkv_bias = true;
    cfg
}

/// A model read from its published `config.json`, committed under `tests/data/hf/`
/// (whose total and active counts `tests/models.rs` checks against Hugging Face's).
///
/// # Panics
/// If the committed file does not load (an internal bug, caught by the zoo tests).
fn from_hf(name: &str, json: &str) -> ModelConfig {
    super::hf::from_json_str(name, json).unwrap_or_else(|e| panic!("zoo entry {name}: {e}"))
}

/// Llama 3.1's rotary scaling (`rope_scaling` of the meta-llama/Llama-3.1-* Hugging Face
/// configs: `rope_type` `llama3`, factor 8, low/high frequency factors 1 and 4, trained
/// on 8,192 positions; Dubey et al. 2024 extend the context to 128K tokens in long-context
/// pre-training).
fn llama31_rope_scaling() -> RopeScaling {
    RopeScaling {
        rope_type: "llama3".into(),
        factor: 8.0,
        low_freq_factor: Some(1.0),
        high_freq_factor: Some(4.0),
        original_max_position_embeddings: Some(8192),
        beta_fast: None,
        beta_slow: None,
        mscale: None,
        mscale_all_dim: None,
    }
}

fn llama31_405b() -> ModelConfig {
    let mut cfg = llama(
        "llama3-405b",
        126,
        16384,
        128,
        8,
        53248,
        LLAMA3_VOCAB,
        LLAMA3_THETA,
    );
    cfg.rope_scaling = Some(Box::new(llama31_rope_scaling()));
    cfg
}

fn mixtral_8x7b() -> ModelConfig {
    from_hf(
        "mixtral-8x7b",
        include_str!("../../tests/data/hf/mixtral-8x7b.json"),
    )
}

fn mixtral_8x22b() -> ModelConfig {
    from_hf(
        "mixtral-8x22b",
        include_str!("../../tests/data/hf/mixtral-8x22b.json"),
    )
}

fn qwen3_30b_a3b() -> ModelConfig {
    from_hf(
        "qwen3-30b-a3b",
        include_str!("../../tests/data/hf/qwen3-30b-a3b.json"),
    )
}

fn qwen3_235b_a22b() -> ModelConfig {
    from_hf(
        "qwen3-235b-a22b",
        include_str!("../../tests/data/hf/qwen3-235b-a22b.json"),
    )
}

fn deepseek_v3() -> ModelConfig {
    from_hf(
        "deepseek-v3",
        include_str!("../../tests/data/hf/deepseek-v3.json"),
    )
}

fn gpt_oss_20b() -> ModelConfig {
    from_hf(
        "gpt-oss-20b",
        include_str!("../../tests/data/hf/gpt-oss-20b.json"),
    )
}

fn gpt_oss_120b() -> ModelConfig {
    from_hf(
        "gpt-oss-120b",
        include_str!("../../tests/data/hf/gpt-oss-120b.json"),
    )
}

fn bloom_176b() -> ModelConfig {
    from_hf(
        "bloom-176b",
        include_str!("../../tests/data/hf/bloom-176b.json"),
    )
}

fn deepseek_v2_lite() -> ModelConfig {
    from_hf(
        "deepseek-v2-lite",
        include_str!("../../tests/data/hf/deepseek-v2-lite.json"),
    )
}

/// Returns `cfg` with its attention expressed as `attention` (the CLI's
/// `--attention eager|flash`). Eager attention builds the `s×s` scores, the softmax
/// and (with dropout) the probability dropout; flash attention keeps none of them.
/// Parameters are unchanged.
pub fn with_attention(mut cfg: ModelConfig, attention: Attention) -> ModelConfig {
    cfg.attention = attention;
    cfg
}

/// The zoo, in listing order.
pub static ZOO: &[ZooEntry] = &[
    ZooEntry {
        name: "tiny-gpt",
        about: "2-layer GPT for tests (h 64, 4 heads, vocab 256, 128 positions)",
        trained_positions: None,
        config: || gpt("tiny-gpt", 2, 64, 4, 256, 128, 0.1, Attention::Eager),
    },
    ZooEntry {
        name: "tiny-llama",
        about: "2-layer Llama for tests (h 64, 4 heads, 2 kv heads, ffn 172, vocab 256)",
        trained_positions: None,
        config: || llama("tiny-llama", 2, 64, 4, 2, 172, 256, 10000.0),
    },
    ZooEntry {
        name: "gpt2",
        about: "GPT-2 small, 124,439,808 params: 12 layers, h 768, 12 heads \
                (Radford et al. 2019; HF gpt2 config)",
        trained_positions: None,
        config: || gpt2("gpt2", 12, 768, 12),
    },
    ZooEntry {
        name: "gpt2-medium",
        about: "GPT-2 medium, 354,823,168 params: 24 layers, h 1024, 16 heads \
                (Radford et al. 2019; HF gpt2-medium config)",
        trained_positions: None,
        config: || gpt2("gpt2-medium", 24, 1024, 16),
    },
    ZooEntry {
        name: "gpt2-large",
        about: "GPT-2 large, 774,030,080 params: 36 layers, h 1280, 20 heads \
                (Radford et al. 2019; HF gpt2-large config)",
        trained_positions: None,
        config: || gpt2("gpt2-large", 36, 1280, 20),
    },
    ZooEntry {
        name: "gpt2-xl",
        about: "GPT-2 XL, 1,557,611,200 params: 48 layers, h 1600, 25 heads \
                (Radford et al. 2019; HF gpt2-xl config)",
        trained_positions: None,
        config: || gpt2("gpt2-xl", 48, 1600, 25),
    },
    ZooEntry {
        name: "megatron-1.7b",
        about: "Megatron GPT 1.7B: 24 layers, h 2304, 24 heads \
                (Narayanan et al. SC'21, Table 1)",
        trained_positions: None,
        config: || megatron("megatron-1.7b", 24, 2304, 24),
    },
    ZooEntry {
        name: "megatron-3.6b",
        about: "Megatron GPT 3.6B: 30 layers, h 3072, 32 heads \
                (Narayanan et al. SC'21, Table 1)",
        trained_positions: None,
        config: || megatron("megatron-3.6b", 30, 3072, 32),
    },
    ZooEntry {
        name: "megatron-7.5b",
        about: "Megatron GPT 7.5B: 36 layers, h 4096, 32 heads \
                (Narayanan et al. SC'21, Table 1)",
        trained_positions: None,
        config: || megatron("megatron-7.5b", 36, 4096, 32),
    },
    ZooEntry {
        name: "megatron-18.4b",
        about: "Megatron GPT 18.4B: 40 layers, h 6144, 48 heads \
                (Narayanan et al. SC'21, Table 1)",
        trained_positions: None,
        config: || megatron("megatron-18.4b", 40, 6144, 48),
    },
    ZooEntry {
        name: "megatron-39.1b",
        about: "Megatron GPT 39.1B: 48 layers, h 8192, 64 heads \
                (Narayanan et al. SC'21, Table 1)",
        trained_positions: None,
        config: || megatron("megatron-39.1b", 48, 8192, 64),
    },
    ZooEntry {
        name: "megatron-76.1b",
        about: "Megatron GPT 76.1B: 60 layers, h 10240, 80 heads \
                (Narayanan et al. SC'21, Table 1)",
        trained_positions: None,
        config: || megatron("megatron-76.1b", 60, 10240, 80),
    },
    ZooEntry {
        name: "megatron-145.6b",
        about: "Megatron GPT 145.6B: 80 layers, h 12288, 96 heads \
                (Narayanan et al. SC'21, Table 1)",
        trained_positions: None,
        config: || megatron("megatron-145.6b", 80, 12288, 96),
    },
    ZooEntry {
        name: "megatron-310.1b",
        about: "Megatron GPT 310.1B: 96 layers, h 16384, 128 heads \
                (Narayanan et al. SC'21, Table 1)",
        trained_positions: None,
        config: || megatron("megatron-310.1b", 96, 16384, 128),
    },
    ZooEntry {
        name: "megatron-529.6b",
        about: "Megatron GPT 529.6B: 105 layers, h 20480, 128 heads \
                (Narayanan et al. SC'21, Table 1)",
        trained_positions: None,
        config: || megatron("megatron-529.6b", 105, 20480, 128),
    },
    ZooEntry {
        name: "megatron-1t",
        about: "Megatron GPT 1T (1008.0B): 128 layers, h 25600, 160 heads \
                (Narayanan et al. SC'21, Table 1)",
        trained_positions: None,
        config: || megatron("megatron-1t", 128, 25600, 160),
    },
    ZooEntry {
        name: "megatron-22b",
        about: "Megatron GPT 22B: 48 layers, h 6144, 64 heads \
                (Korthikanti et al. 2022, Table 3)",
        trained_positions: None,
        config: || megatron("megatron-22b", 48, 6144, 64),
    },
    ZooEntry {
        name: "gpt3-175b",
        about: "GPT-3 175B, Megatron form (vocab 51200): 96 layers, h 12288, 96 heads \
                (Korthikanti et al. 2022, Table 3)",
        trained_positions: None,
        config: || megatron("gpt3-175b", 96, 12288, 96),
    },
    ZooEntry {
        name: "mt-nlg-530b",
        about: "MT-NLG 530B, Megatron form: 105 layers, h 20480, 128 heads \
                (Korthikanti et al. 2022, Table 3)",
        trained_positions: None,
        config: || megatron("mt-nlg-530b", 105, 20480, 128),
    },
    ZooEntry {
        name: "llama2-7b",
        about: "Llama-2-7B, 6,738,415,616 params: 32 layers, h 4096, 32 heads, ffn 11008 \
                (Touvron et al. 2023; HF config)",
        trained_positions: Some(4096),
        config: || {
            llama(
                "llama2-7b",
                32,
                4096,
                32,
                32,
                11008,
                LLAMA2_VOCAB,
                ROPE_THETA,
            )
        },
    },
    ZooEntry {
        name: "llama2-13b",
        about: "Llama-2-13B, 13,015,864,320 params: 40 layers, h 5120, 40 heads, ffn 13824 \
                (Touvron et al. 2023; HF config)",
        trained_positions: Some(4096),
        config: || {
            llama(
                "llama2-13b",
                40,
                5120,
                40,
                40,
                13824,
                LLAMA2_VOCAB,
                ROPE_THETA,
            )
        },
    },
    ZooEntry {
        name: "llama2-70b",
        about: "Llama-2-70B, 68,976,648,192 params: 80 layers, h 8192, 64 heads / 8 kv, \
                ffn 28672 (Touvron et al. 2023; HF config)",
        trained_positions: Some(4096),
        config: || {
            llama(
                "llama2-70b",
                80,
                8192,
                64,
                8,
                28672,
                LLAMA2_VOCAB,
                ROPE_THETA,
            )
        },
    },
    ZooEntry {
        name: "llama3-8b",
        about: "Llama-3-8B, 8,030,261,248 params: 32 layers, h 4096, 32 heads / 8 kv, \
                ffn 14336, theta 5e5 (Dubey et al. 2024; HF config)",
        trained_positions: Some(8192),
        config: || {
            llama(
                "llama3-8b",
                32,
                4096,
                32,
                8,
                14336,
                LLAMA3_VOCAB,
                LLAMA3_THETA,
            )
        },
    },
    ZooEntry {
        name: "llama3-70b",
        about: "Llama-3-70B, 70,553,706,496 params: 80 layers, h 8192, 64 heads / 8 kv, \
                ffn 28672, theta 5e5 (Dubey et al. 2024; HF config)",
        trained_positions: Some(8192),
        config: || {
            llama(
                "llama3-70b",
                80,
                8192,
                64,
                8,
                28672,
                LLAMA3_VOCAB,
                LLAMA3_THETA,
            )
        },
    },
    ZooEntry {
        name: "llama3-405b",
        about: "Llama-3.1-405B, 405,853,388,800 params: 126 layers, h 16384, 128 heads / 8 kv, \
                ffn 53248, theta 5e5, llama3 rotary scaling 8x of 8192 (Dubey et al. 2024; HF config)",
        trained_positions: Some(131072),
        config: llama31_405b,
    },
    ZooEntry {
        name: "mistral-7b",
        about: "Mistral-7B-v0.1, 7,241,732,096 params: 32 layers, h 4096, 32 heads / 8 kv, \
                ffn 14336; 4096-token sliding window not modeled (Jiang et al. 2023; HF config)",
        trained_positions: Some(32768),
        config: || {
            llama(
                "mistral-7b",
                32,
                4096,
                32,
                8,
                14336,
                LLAMA2_VOCAB,
                ROPE_THETA,
            )
        },
    },
    ZooEntry {
        name: "mixtral-8x7b",
        about: "Mixtral-8x7B, 46,702,792,704 params (12,879,925,248 active): 32 layers, h 4096, \
                32 heads / 8 kv, 8 SwiGLU experts of 14336, top 2 (Jiang et al. 2024; HF config \
                mistralai/Mixtral-8x7B-v0.1)",
        trained_positions: Some(32768),
        config: mixtral_8x7b,
    },
    ZooEntry {
        name: "mixtral-8x22b",
        about: "Mixtral-8x22B, 140,630,071,296 params (39,161,468,928 active): 56 layers, \
                h 6144, 48 heads / 8 kv, 8 experts of 16384, top 2, vocab 32768 (the Mixtral architecture of Jiang et al. 2024; HF config \
                mistralai/Mixtral-8x22B-v0.1)",
        trained_positions: Some(65536),
        config: mixtral_8x22b,
    },
    ZooEntry {
        name: "qwen3-30b-a3b",
        about: "Qwen3-30B-A3B, 30,532,122,624 params (3,353,032,704 active): 48 layers, \
                h 2048, 32 heads / 4 kv of 128, 128 experts of 768, top 8 (Qwen3 Technical Report, Yang et al. \
                2025; HF config Qwen/Qwen3-30B-A3B)",
        trained_positions: Some(40960),
        config: qwen3_30b_a3b,
    },
    ZooEntry {
        name: "qwen3-235b-a22b",
        about: "Qwen3-235B-A22B, 235,093,634,560 params (22,190,763,520 active): 94 layers, \
                h 4096, 64 heads / 4 kv of 128, 128 experts of 1536, top 8 (Qwen3 Technical Report, Yang et al. \
                2025; HF config Qwen/Qwen3-235B-A22B)",
        trained_positions: Some(40960),
        config: qwen3_235b_a22b,
    },
    ZooEntry {
        name: "deepseek-v3",
        about: "DeepSeek-V3, 671,026,404,352 params (37,552,282,624 active) as Hugging Face \
                builds it (no multi-token-prediction module): 61 layers, h 7168, 128 heads of \
                multi-head latent attention (q rank 1536, kv rank 512, qk 128+64, v 128), first \
                3 layers dense (18432), then 256 experts of 2048 + 1 shared, top 8 of 4 of 8 \
                groups, sigmoid scores (DeepSeek-V3 technical report, Liu et al. 2024; HF config \
                deepseek-ai/DeepSeek-V3)",
        trained_positions: Some(163840),
        config: deepseek_v3,
    },
    ZooEntry {
        name: "deepseek-v2-lite",
        about: "DeepSeek-V2-Lite, 15,706,484,224 params (2,661,150,208 active): 27 layers, \
                h 2048, 16 heads of latent attention (no query latent, kv rank 512, qk 128+64, \
                v 128), layer 0 dense (10944), then 64 experts of 1408 + 2 shared, top 6, \
                softmax (DeepSeek-V2 paper, DeepSeek-AI: Liu et al. 2024; HF config deepseek-ai/DeepSeek-V2-Lite)",
        trained_positions: Some(163840),
        config: deepseek_v2_lite,
    },
    ZooEntry {
        name: "gpt-oss-20b",
        about: "gpt-oss-20b, 20,914,757,184 params (4,187,440,704 active): 24 layers, h 2880, \
                64 heads / 8 kv of 64 with biases and attention sinks, 128-token window on \
                every other layer, 32 experts of 2880 with biases and the clamped SwiGLU, \
                top 4 (gpt-oss model card, OpenAI: Agarwal et al. 2025; HF config \
                openai/gpt-oss-20b)",
        trained_positions: Some(131072),
        config: gpt_oss_20b,
    },
    ZooEntry {
        name: "gpt-oss-120b",
        about: "gpt-oss-120b, 116,829,156,672 params (5,711,982,912 active): 36 layers, \
                h 2880, 64 heads / 8 kv of 64 with biases and attention sinks, 128-token \
                window on every other layer, 128 experts of 2880 with biases and the clamped \
                SwiGLU, top 4 (gpt-oss model card, OpenAI: Agarwal et al. 2025; HF config \
                openai/gpt-oss-120b)",
        trained_positions: Some(131072),
        config: gpt_oss_120b,
    },
    ZooEntry {
        name: "qwen2-7b",
        about: "Qwen2-7B, 7,615,616,512 params: 28 layers, h 3584, 28 heads / 4 kv, \
                ffn 18944, qkv bias, untied, theta 1e6 (Yang et al. 2024; HF config)",
        trained_positions: Some(131072),
        config: qwen2_7b,
    },
    ZooEntry {
        name: "gemma2-9b",
        about: "Gemma-2-9B, 9,241,705,984 params: 42 layers, h 3584, 16 heads / 8 kv of 256, \
                ffn 14336 GeGLU, 4096-token window on every other layer, soft-capping 50/30 \
                (Gemma Team, Riviere et al. 2024; HF google/gemma-2-9b config)",
        trained_positions: Some(8192),
        config: || gemma2("gemma2-9b", 42, 3584, 16, 8, 256, 14336, 256.0),
    },
    ZooEntry {
        name: "gemma2-27b",
        about: "Gemma-2-27B, 27,227,128,320 params: 46 layers, h 4608, 32 heads / 16 kv of \
                128, ffn 36864 GeGLU, 4096-token window on every other layer, soft-capping \
                50/30 (Gemma Team, Riviere et al. 2024; HF google/gemma-2-27b config)",
        trained_positions: Some(8192),
        config: || gemma2("gemma2-27b", 46, 4608, 32, 16, 128, 36864, 144.0),
    },
    ZooEntry {
        name: "bloom-176b",
        about: "BLOOM, 176,247,271,424 params: 70 layers, h 14336, 112 heads, ffn 4h GeLU, \
                ALiBi positions, a LayerNorm after the embedding, vocab 250880, tied (BigScience \
                Workshop: Le Scao et al. 2022, BLOOM: A 176B-Parameter Open-Access Multilingual \
                Language Model, arXiv 2211.05100; HF config bigscience/bloom)",
        trained_positions: None,
        config: bloom_176b,
    },
];

/// Gemma 2's vocabulary (`vocab_size` of the google/gemma-2-* configs).
const GEMMA_VOCAB: u64 = 256000;

/// Gemma 2's local attention window (`sliding_window` of the google/gemma-2-* configs).
const GEMMA2_WINDOW: u64 = 4096;

/// Gemma 2's attention and final logit soft-capping (`attn_logit_softcapping`,
/// `final_logit_softcapping` of the google/gemma-2-* configs).
const GEMMA2_SOFTCAP: (f64, f64) = (50.0, 30.0);

/// A Gemma 2 checkpoint (Gemma Team 2024, "Gemma 2: Improving Open Language Models at
/// a Practical Size", Table 1; the Hugging Face google/gemma-2-* configs): RMSNorm
/// before and after attention and MLP, GeGLU, `√h`-scaled tied embedding, scores scaled
/// by `query_pre_attn_scalar^-½`, soft-capping, local layers (even) with a 4096-token
/// window alternating with global ones, RoPE base 10,000.
#[allow(clippy::too_many_arguments)]
fn gemma2(
    name: &str,
    layers: u32,
    hidden: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    ffn: u64,
    query_pre_attn_scalar: f64,
) -> ModelConfig {
    let mut cfg = llama(
        name,
        layers,
        hidden,
        heads,
        kv_heads,
        ffn,
        GEMMA_VOCAB,
        ROPE_THETA,
    );
    cfg.head_dim = head_dim;
    cfg.position = Position::Rotary {
        dims: head_dim,
        theta: ROPE_THETA,
    };
    cfg.norm_eps = 1e-6;
    cfg.mlp = Mlp::GeGlu;
    cfg.tied_embeddings = true;
    cfg.norm_layout = NormLayout::Sandwich;
    cfg.embed_scale = true;
    cfg.attn_scale = Some(1.0 / query_pre_attn_scalar.sqrt());
    cfg.attn_softcap = Some(GEMMA2_SOFTCAP.0);
    cfg.final_softcap = Some(GEMMA2_SOFTCAP.1);
    cfg.sliding_window = Some(GEMMA2_WINDOW);
    cfg.global_every = 2;
    cfg
}

/// Positions the zoo model `name` was trained for ([`ZooEntry::trained_positions`]);
/// `None` for other names.
pub fn trained_positions(name: &str) -> Option<u64> {
    ZOO.iter()
        .find(|e| e.name == name)
        .and_then(|e| e.trained_positions)
}

/// Looks a model up by name.
pub fn lookup(name: &str) -> Result<ModelConfig, ModelError> {
    ZOO.iter()
        .find(|e| e.name == name)
        .map(|e| (e.config)())
        .ok_or_else(|| ModelError::Unknown(name.to_string()))
}
