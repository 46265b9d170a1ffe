//! The built-in model zoo.
//!
//! Each entry cites the source of its dimensions. Megatron-family entries use
//! decomposed (eager) attention with dropout 0.1, as those papers ran; the others
//! use flash attention and no dropout.

use super::{Attention, Mlp, ModelConfig, ModelError, Norm, Position};

/// One zoo entry.
pub struct ZooEntry {
    /// Name accepted by `--model`.
    pub name: &'static str,
    /// One-line description with the source of the numbers.
    pub about: &'static str,
    /// Builds the configuration.
    pub config: fn() -> ModelConfig,
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
        parallel_residual: false,
        tied_embeddings: true,
        dropout,
        attention,
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
        parallel_residual: false,
        tied_embeddings: false,
        dropout: 0.0,
        attention: Attention::Flash,
    }
}

/// The zoo, in listing order.
pub static ZOO: &[ZooEntry] = &[
    ZooEntry {
        name: "tiny-gpt",
        about: "2-layer GPT for tests (h 64, 4 heads, vocab 256, 128 positions)",
        config: || gpt("tiny-gpt", 2, 64, 4, 256, 128, 0.1, Attention::Eager),
    },
    ZooEntry {
        name: "tiny-llama",
        about: "2-layer Llama for tests (h 64, 4 heads, 2 kv heads, ffn 172, vocab 256)",
        config: || llama("tiny-llama", 2, 64, 4, 2, 172, 256, 10000.0),
    },
    ZooEntry {
        name: "gpt2",
        about: "GPT-2 small, 124M (Radford et al. 2019; HF gpt2 config)",
        config: || gpt("gpt2", 12, 768, 12, 50257, 1024, 0.1, Attention::Flash),
    },
    ZooEntry {
        name: "llama2-7b",
        about: "Llama-2-7B, 6,738,415,616 params (Touvron et al. 2023; HF config)",
        config: || llama("llama2-7b", 32, 4096, 32, 32, 11008, 32000, 10000.0),
    },
];

/// Looks a model up by name.
pub fn lookup(name: &str) -> Result<ModelConfig, ModelError> {
    ZOO.iter()
        .find(|e| e.name == name)
        .map(|e| (e.config)())
        .ok_or_else(|| ModelError::Unknown(name.to_string()))
}
