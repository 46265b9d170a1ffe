//! Hugging Face `config.json` loader.
//!
//! [`load`] and [`from_json_str`] read the `config.json` of a Hugging Face checkpoint
//! and return the [`ModelConfig`] of the same decoder-only transformer, with flash
//! attention (use [`super::zoo::with_attention`] for the eager form). The count of
//! parameters is that of the checkpoint.
//!
//! | `model_type` | layout | biases | tied by default | dropout from |
//! |---|---|---|---|---|
//! | `llama` | RMSNorm, RoPE, SwiGLU | `attention_bias` (q, k, v, o), `mlp_bias` | no | `attention_dropout` |
//! | `mistral` | as llama | none | no | `attention_dropout` |
//! | `qwen2` | as llama | q, k, v | no | `attention_dropout` |
//! | `gpt2` | LayerNorm, learned positions, GeLU | all | yes | `attn_pdrop`, `resid_pdrop`, `embd_pdrop` |
//! | `gpt_neox` | LayerNorm, partial RoPE, GeLU, `use_parallel_residual` | all (`attention_bias`) | no | `attention_dropout`, `hidden_dropout` |
//! | `falcon` | LayerNorm, RoPE, GeLU, parallel (one shared or two layernorms) or sequential | `bias` | yes | `attention_dropout`, `hidden_dropout` |
//! | `bloom` | LayerNorm (also after the embedding), ALiBi, GeLU of 4h, fused `query_key_value` | all | yes | `attention_dropout`, `hidden_dropout` |
//! | `gemma` | RMSNorm(1+w), RoPE, GeGLU, `√h` embedding scale, `head_dim` | `attention_bias` | yes | `attention_dropout` |
//! | `gemma2` | as gemma, four norms a layer, soft-capping, `query_pre_attn_scalar`, window on even layers | `attention_bias` | yes | `attention_dropout` |
//! | `gemma3_text` | as gemma2, q/k norms per head, five local layers to one global | `attention_bias` | yes | `attention_dropout` |
//! | `phi3` | as llama (fused `qkv_proj`, `gate_up_proj`), window on every layer | none | no | `attention_dropout`, `resid_pdrop`, `embd_pdrop` |
//! | `qwen3` | as llama, q/k norms per head | `attention_bias` (q, k, v, o) | no | `attention_dropout` |
//! | `olmo2` | as llama, norms after attention and MLP, q/k norms over the projections | `attention_bias` (q, k, v, o) | no | `attention_dropout` |
//! | `starcoder2` | LayerNorm, RoPE, GeLU (`c_fc`, `c_proj`), window on every layer | `use_bias` (all) | yes | `attention_dropout`, `residual_dropout`, `embedding_dropout` |
//! | `deepseek_v2`, `deepseek_v3` | RMSNorm, multi-head latent attention, SwiGLU, experts from `first_k_dense_replace` (see `deepseek`) | none (refused) | no | `attention_dropout` |
//!
//! Fields absent from the file take the default of the architecture's Hugging Face
//! configuration class (for example `rms_norm_eps` 1e-6, `rope_theta` 10,000,
//! `num_key_value_heads` = `num_attention_heads`; mistral's own default is 8 kv heads
//! and qwen2's is 32, as in their classes). The sizes (hidden, heads, layers, feed-forward,
//! vocabulary; positions for gpt2) are required. `null` counts as absent. The model
//! has one dropout probability, so the largest of an architecture's dropout fields is
//! used.
//!
//! Not modeled, and reported in [`ConfigNotes`] (plans carry them as warnings): a
//! sliding window shorter than the sequence on mistral, qwen2 and qwen3 (whose
//! `max_window_layers` split is not a periodic pattern; gemma2, gemma3_text, phi3 and
//! starcoder2 build theirs into [`ModelConfig::sliding_window`]), the trained positions of a
//! rotary model the sequence exceeds, mixture-of-experts keys on a dense architecture,
//! and keys the loader does not know. Read past silently: [`INERT_KEYS`] (RoPE scaling,
//! tensor-parallel pretraining hints, token ids and other keys that change no size).
//! Falcon ALiBi checkpoints (`alibi: true`) are refused as unsupported: Hugging Face's
//! Falcon adds the ALiBi bias to a causal mask it materializes per head (`[b, heads, s,
//! s]`), which the `hf` engine's model code of Falcon does not build. BLOOM's ALiBi is
//! read as [`Position::Alibi`].
//!
//! Every committed `tests/data/hf/*.json` is instantiated by Hugging Face Transformers
//! on the meta device (`scripts/count_hf_params.py`); `tests/models.rs` checks that
//! [`ModelConfig::param_count`] and the built graph's parameters equal its count.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{
    ClampedSwiglu, Mlp, ModelConfig, ModelError, Moe, Norm, NormLayout, Position, QkNorm, Scoring,
};

/// The `model_type`s this loader reads.
pub const SUPPORTED: &str = "llama, mistral, qwen2, qwen3, phi3, olmo2, gemma, gemma2, \
                             gemma3_text, starcoder2, gpt2, gpt_neox, falcon (rotary), bloom, mixtral, qwen2_moe, \
                             qwen3_moe, deepseek_v2, deepseek_v3, gpt_oss";

/// Keys that give a dense architecture's file routed experts: such a file is refused
/// ([`ModelError::ExpertsOnDense`]) rather than planned dense.
pub const EXPERT_COUNT_KEYS: &[&str] = &["num_local_experts", "num_experts", "n_routed_experts"];

/// GeLU variants accepted as `activation_function` / `hidden_act` for GeLU MLPs.
const GELU_NAMES: &[&str] = &[
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "gelu_accurate",
    "quick_gelu",
];

/// A JSON value read with duplicate object keys refused, at every depth: serde_json
/// silently keeps the last of two equal keys, and a config whose `num_attention_heads`
/// appears twice is ambiguous (Python's `json` also keeps the last; the file's author
/// may have meant the first).
struct NoDuplicates(Value);

impl<'de> serde::Deserialize<'de> for NoDuplicates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicatesVisitor)
    }
}

struct NoDuplicatesVisitor;

impl<'de> serde::de::Visitor<'de> for NoDuplicatesVisitor {
    type Value = NoDuplicates;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates(Value::from(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates(Value::from(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates(Value::from(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates(Value::from(v)))
    }

    fn visit_string<E>(self, v: String) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates(Value::String(v)))
    }

    fn visit_unit<E>(self) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates(Value::Null))
    }

    fn visit_none<E>(self) -> Result<NoDuplicates, E> {
        Ok(NoDuplicates(Value::Null))
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<NoDuplicates, D::Error> {
        serde::Deserialize::deserialize(d)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<NoDuplicates, A::Error> {
        let mut out = Vec::new();
        while let Some(NoDuplicates(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(NoDuplicates(Value::Array(out)))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<NoDuplicates, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key `{key}`")));
            }
            let NoDuplicates(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(NoDuplicates(Value::Object(out)))
    }
}

/// Reads a Hugging Face `config.json`; the model is named after the path.
///
/// # Errors
///
/// [`ModelError::File`] when the file cannot be read, otherwise as
/// [`from_json_str`].
pub fn load(path: &Path) -> Result<ModelConfig, ModelError> {
    load_with_notes(path).map(|(cfg, _)| cfg)
}

/// As [`load`], with what the loader ignored or could not use ([`ConfigNotes`]).
///
/// # Errors
///
/// As [`load`].
pub fn load_with_notes(path: &Path) -> Result<(ModelConfig, ConfigNotes), ModelError> {
    let file = path.display().to_string();
    let text = crate::input::read_text(path).map_err(|e| ModelError::File {
        file: file.clone(),
        why: e.to_string(),
    })?;
    from_json_str_with_notes(&file, &text)
}

/// Keys of a `config.json` that change nothing a plan depends on (token ids,
/// initialization, serialization and inference switches, heads for other tasks, RoPE
/// scaling — which changes position values, not sizes or FLOPs — and Llama's
/// `pretraining_tp`, which slices the same matmuls). They are read past silently.
pub const INERT_KEYS: &[&str] = &[
    "_name_or_path",
    "architectures",
    "auto_map",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "initializer_range",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "use_cache",
    "cache_implementation",
    "task_specific_params",
    "summary_activation",
    "summary_first_dropout",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
    "tokenizer_class",
    "n_ctx",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "id2label",
    "label2id",
    "classifier_dropout",
    "pretraining_tp",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "n_positions",
];

/// Mixture-of-experts keys: on the dense architectures this loader reads they describe
/// experts the model code does not build.
pub const MOE_KEYS: &[&str] = &[
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "n_routed_experts",
    "n_shared_experts",
    "output_router_logits",
    "router_aux_loss_coef",
    "router_jitter_noise",
    "decoder_sparse_step",
    "norm_topk_prob",
];

/// Sliding-window attention keys (mistral, qwen2; modeled for gemma2, gemma3_text,
/// phi3, starcoder2).
pub const SLIDING_WINDOW_KEYS: &[&str] = &[
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "sliding_window_size",
    "sliding_window_pattern",
    "layer_types",
];

/// The rotary dictionary a loader keeps: the key it came from, and its fields.
type RopeDict<'a> = (&'static str, &'a Map<String, Value>);

/// Why a `config.json` key was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IgnoredKind {
    /// Mixture-of-experts keys on a dense architecture: planned as dense.
    MoeOnDense,
    /// A key the loader does not know.
    Unknown,
    /// `rope_parameters` next to a `rope_scaling` object: Transformers' config loading
    /// replaces the first with the second (`PreTrainedConfig.convert_rope_params_to_dict`:
    /// `rope_scaling or rope_parameters`), and so does apar.
    RopeParametersReplaced,
}

/// What loading a `config.json` could not use.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigNotes {
    /// Ignored keys, by why (keys sorted).
    pub ignored: Vec<(IgnoredKind, Vec<String>)>,
    /// The attention window, when sliding-window attention is on (apar plans attention
    /// over the whole sequence: an upper bound on its FLOPs and, for eager attention,
    /// its memory, once the sequence is longer than the window).
    pub sliding_window: Option<u64>,
    /// The file's `model_type` (whose Hugging Face modeling code runs the model).
    pub model_type: Option<String>,
    /// Positions the checkpoint was trained for (`max_position_embeddings` /
    /// `n_positions`), when the file gives them.
    pub trained_positions: Option<u64>,
}

/// Parses the text of a Hugging Face `config.json`; `name` names the model and, in
/// errors, the file.
///
/// # Errors
///
/// [`ModelError::File`] when the text is not JSON, repeats a key in any object, or is
/// not an object; [`ModelError::MissingField`], [`ModelError::Unsupported`] or
/// [`ModelError::Invalid`] when a field is missing, the architecture unknown or a
/// value unusable.
pub fn from_json_str(name: &str, text: &str) -> Result<ModelConfig, ModelError> {
    from_json_str_with_notes(name, text).map(|(cfg, _)| cfg)
}

/// As [`from_json_str`], with what the loader ignored or could not use.
///
/// # Errors
///
/// As [`from_json_str`].
pub fn from_json_str_with_notes(
    name: &str,
    text: &str,
) -> Result<(ModelConfig, ConfigNotes), ModelError> {
    let NoDuplicates(value) = serde_json::from_str(text).map_err(|e| ModelError::File {
        file: name.to_string(),
        why: format!("not a JSON config: {e}"),
    })?;
    let Value::Object(map) = value else {
        return Err(ModelError::File {
            file: name.to_string(),
            why: format!(
                "expected a JSON object at the top level, found {}",
                kind(&value)
            ),
        });
    };
    let f = Fields::new(name, &map);
    let model_type = f.req_str("model_type")?;
    let cfg = match model_type {
        "llama" => llama_like(&f, Family::Llama)?,
        "mistral" => llama_like(&f, Family::Mistral)?,
        "qwen2" => llama_like(&f, Family::Qwen2)?,
        "gpt2" => gpt2(&f)?,
        "gpt_neox" => gpt_neox(&f)?,
        "falcon" => falcon(&f)?,
        "bloom" => bloom(&f)?,
        "gemma" => gemma(&f, Gemma::V1)?,
        "gemma2" => gemma(&f, Gemma::V2)?,
        "gemma3_text" => gemma(&f, Gemma::V3)?,
        "phi3" => llama_like(&f, Family::Phi3)?,
        "qwen3" => llama_like(&f, Family::Qwen3)?,
        "olmo2" => llama_like(&f, Family::Olmo2)?,
        "starcoder2" => starcoder2(&f)?,
        "mixtral" => llama_like(&f, Family::Mixtral)?,
        "qwen2_moe" => llama_like(&f, Family::Qwen2Moe)?,
        "qwen3_moe" => llama_like(&f, Family::Qwen3Moe)?,
        "deepseek_v2" => deepseek(&f, DeepSeek::V2)?,
        "deepseek_v3" => deepseek(&f, DeepSeek::V3)?,
        "gpt_oss" => gpt_oss(&f)?,
        other => return Err(f.unsupported(other.to_string())),
    };
    if cfg.moe.is_none() {
        let keys: Vec<String> = EXPERT_COUNT_KEYS
            .iter()
            .filter(|&&k| {
                map.get(k)
                    .is_some_and(|v| v.as_u64().map_or(!v.is_null(), |n| n > 0))
            })
            .map(|k| k.to_string())
            .collect();
        if !keys.is_empty() {
            return Err(ModelError::ExpertsOnDense {
                file: name.to_string(),
                arch: model_type.to_string(),
                keys,
            });
        }
    }
    cfg.validate().map_err(|e| match e {
        // Name the file's own key, not apar's field.
        ModelError::Invalid { model, field, why } => ModelError::Invalid {
            model,
            field: config_key(field, &map).unwrap_or(field),
            why,
        },
        other => other,
    })?;
    let mut cfg = cfg;
    if matches!(cfg.position, super::Position::Rotary { .. }) {
        cfg.rope_scaling = rope_scaling(&f)?;
    }
    let notes = f.notes()?;
    Ok((cfg, notes))
}

/// The rotary scaling of `rope_scaling` (`null` or absent: none), else of
/// `rope_parameters` when its `rope_type` is not `default`.
fn rope_scaling(f: &Fields) -> Result<Option<Box<super::RopeScaling>>, ModelError> {
    let Some((key, map)) = f.rope_dict()? else {
        return Ok(None);
    };
    let nested = Fields::new(f.name, map);
    let rope_type = match (nested.str("rope_type")?, nested.str("type")?) {
        (Some(t), _) | (None, Some(t)) => t.to_string(),
        (None, None) if key == "rope_parameters" => return Ok(None),
        (None, None) => return Err(f.invalid(key, "has no `rope_type` (or `type`)".into())),
    };
    if rope_type == "default" {
        return Ok(None);
    }
    // LongRoPE (`longrope`, Phi-3's older `su`) may leave `factor` out: Transformers
    // then takes `max_position_embeddings / original_max_position_embeddings`
    // (`modeling_rope_utils.py`, `_compute_longrope_parameters`; Phi-3 gives the
    // original length at the top level).
    let longrope_factor = || -> Result<Option<f64>, ModelError> {
        let original = match nested.u64("original_max_position_embeddings")? {
            Some(o) => Some(o),
            None => f.u64("original_max_position_embeddings")?,
        };
        Ok(match (f.u64("max_position_embeddings")?, original) {
            (Some(max), Some(orig)) if orig > 0 => Some(max as f64 / orig as f64),
            _ => None,
        })
    };
    let factor = match nested.f64("factor")? {
        Some(x) if x.is_finite() && x >= 1.0 => x,
        Some(x) => {
            return Err(f.invalid(
                key,
                format!("`factor` {x} must be at least 1 (Transformers' rope validation)"),
            ))
        }
        None => match longrope_factor()? {
            Some(x) if matches!(rope_type.as_str(), "longrope" | "su") && x >= 1.0 => x,
            _ => return Err(f.invalid(key, format!("`{rope_type}` scaling has no `factor`"))),
        },
    };
    Ok(Some(Box::new(super::RopeScaling {
        rope_type,
        factor,
        low_freq_factor: nested.f64("low_freq_factor")?,
        high_freq_factor: nested.f64("high_freq_factor")?,
        original_max_position_embeddings: nested.u64("original_max_position_embeddings")?,
        beta_fast: nested.f64("beta_fast")?,
        beta_slow: nested.f64("beta_slow")?,
        mscale: nested.f64("mscale")?,
        mscale_all_dim: nested.f64("mscale_all_dim")?,
    })))
}

/// The `config.json` key a [`ModelConfig`] size was read from: the first of the
/// spellings the families use that the file has.
fn config_key(field: &str, map: &Map<String, Value>) -> Option<&'static str> {
    let keys: &[&'static str] = match field {
        "layers" => &["num_hidden_layers", "n_layer", "num_layers"],
        "hidden" => &["hidden_size", "n_embd", "n_embed", "d_model"],
        "heads" => &["num_attention_heads", "n_head"],
        "kv_heads" => &["num_key_value_heads", "num_kv_heads", "n_head_kv"],
        "head_dim" => &["head_dim"],
        "ffn" => &["intermediate_size", "n_inner", "ffn_hidden_size"],
        "vocab" => &["vocab_size"],
        _ => &[],
    };
    keys.iter().copied().find(|k| map.contains_key(*k))
}

/// The Llama-layout architectures.
#[derive(Clone, Copy, PartialEq)]
enum Family {
    Llama,
    Mistral,
    Qwen2,
    /// `modeling_phi3.py`: fused `qkv_proj` and `gate_up_proj` (the same parameters as
    /// separate projections), no biases, `sliding_window` on every layer.
    Phi3,
    /// `modeling_qwen3.py`: `q_norm`/`k_norm`, `RMSNorm(head_dim)` on each head before
    /// the rotary embedding; `attention_bias` on q, k, v, o.
    Qwen3,
    /// `modeling_olmo2.py`: norms after attention and after the MLP
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`, no input norm), and
    /// `q_norm`/`k_norm` over the whole projections (`heads · head_dim`,
    /// `kv_heads · head_dim`).
    Olmo2,
    /// `modeling_mixtral.py`: Mistral attention, `num_local_experts` SwiGLU experts of
    /// `intermediate_size`, top `num_experts_per_tok`, softmax router (`gate`).
    Mixtral,
    /// `modeling_qwen2_moe.py`: Qwen2 attention (q, k, v biases), `num_experts` experts
    /// of `moe_intermediate_size`, a shared expert of `shared_expert_intermediate_size`
    /// with its sigmoid `shared_expert_gate`; dense `intermediate_size` MLPs on
    /// `mlp_only_layers` and off the `decoder_sparse_step`.
    Qwen2Moe,
    /// `modeling_qwen3_moe.py`: Qwen3 attention, experts as Qwen-MoE without the shared
    /// expert.
    Qwen3Moe,
}

fn llama_like(f: &Fields, family: Family) -> Result<ModelConfig, ModelError> {
    let hidden = f.req_u64("hidden_size")?;
    let heads = f.req_u64("num_attention_heads")?;
    let default_kv = match family {
        // MistralConfig and Qwen2Config default `num_key_value_heads` to 8 and 32.
        Family::Mistral => 8,
        Family::Qwen2 => 32,
        Family::Mixtral => 8,
        Family::Qwen2Moe => 16,
        Family::Llama | Family::Phi3 | Family::Qwen3 | Family::Olmo2 | Family::Qwen3Moe => heads,
    };
    let kv_heads = f.u64("num_key_value_heads")?.unwrap_or(default_kv);
    let head_dim = match f.u64("head_dim")? {
        Some(d) => d,
        None => f.head_dim(hidden, "hidden_size", heads, "num_attention_heads")?,
    };
    let act = f.str("hidden_act")?.unwrap_or("silu");
    if act != "silu" {
        return Err(f.invalid(
            "hidden_act",
            format!("`{act}` is not supported: the SwiGLU MLP needs `silu`"),
        ));
    }
    let factor = f.fraction("partial_rotary_factor")?.unwrap_or(1.0);
    let (qkv_bias, out_bias, mlp_bias) = match family {
        Family::Llama => {
            let attn = f.bool("attention_bias")?.unwrap_or(false);
            (attn, attn, f.bool("mlp_bias")?.unwrap_or(false))
        }
        Family::Qwen3 | Family::Olmo2 | Family::Qwen3Moe => {
            let attn = f.bool("attention_bias")?.unwrap_or(false);
            (attn, attn, false)
        }
        Family::Mistral | Family::Phi3 | Family::Mixtral => (false, false, false),
        Family::Qwen2 | Family::Qwen2Moe => (true, false, false),
    };
    let (norm_layout, qk_norm) = match family {
        Family::Qwen3 | Family::Qwen3Moe => (NormLayout::Pre, QkNorm::PerHead),
        Family::Olmo2 => (NormLayout::Post, QkNorm::Full),
        _ => (NormLayout::Pre, QkNorm::None),
    };
    let dropout = match family {
        Family::Phi3 => f.dropout(&["attention_dropout", "resid_pdrop", "embd_pdrop"], 0.0)?,
        _ => f.dropout(&["attention_dropout"], 0.0)?,
    };
    // Phi-3 windows every layer (`sliding_window` in its attention call); Mistral's,
    // Qwen2's and Qwen3's windows stay a note.
    let sliding_window = match family {
        Family::Phi3 => f.window()?,
        _ => None,
    };
    let moe = match family {
        Family::Mixtral | Family::Qwen2Moe | Family::Qwen3Moe => Some(Box::new(f.moe(family)?)),
        _ => None,
    };
    Ok(ModelConfig {
        name: f.name.to_string(),
        layers: f.layers("num_hidden_layers")?,
        hidden,
        heads,
        kv_heads,
        head_dim,
        ffn: f.req_u64("intermediate_size")?,
        vocab: f.req_u64("vocab_size")?,
        norm: Norm::RmsNorm,
        norm_eps: f.non_negative("rms_norm_eps")?.unwrap_or(1e-6),
        position: Position::Rotary {
            dims: rotary_dims(factor, head_dim),
            theta: f.rope_theta(&["rope_theta"])?,
        },
        mlp: Mlp::SwiGlu,
        qkv_bias,
        out_bias,
        mlp_bias,
        tied_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
        dropout,
        norm_layout,
        qk_norm,
        sliding_window,
        moe,
        ..ModelConfig::decoder()
    })
}

fn gpt2(f: &Fields) -> Result<ModelConfig, ModelError> {
    let hidden = f.req_u64("n_embd")?;
    let heads = f.req_u64("n_head")?;
    let head_dim = f.head_dim(hidden, "n_embd", heads, "n_head")?;
    f.gelu("activation_function", "gelu_new")?;
    let ffn = match f.u64("n_inner")? {
        Some(n) => n,
        None => f.times4(hidden, "n_embd")?,
    };
    Ok(ModelConfig {
        name: f.name.to_string(),
        layers: f.layers("n_layer")?,
        hidden,
        heads,
        kv_heads: heads,
        head_dim,
        ffn,
        vocab: f.req_u64("vocab_size")?,
        norm: Norm::LayerNorm,
        norm_eps: f.non_negative("layer_norm_epsilon")?.unwrap_or(1e-5),
        position: Position::Learned {
            max_positions: f.req_u64("n_positions")?,
        },
        mlp: Mlp::Gelu,
        qkv_bias: true,
        out_bias: true,
        mlp_bias: true,
        tied_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(true),
        // GPT2Config defaults each of the three to 0.1.
        dropout: f.dropout(&["attn_pdrop", "resid_pdrop", "embd_pdrop"], 0.1)?,
        ..ModelConfig::decoder()
    })
}

fn gpt_neox(f: &Fields) -> Result<ModelConfig, ModelError> {
    let hidden = f.req_u64("hidden_size")?;
    let heads = f.req_u64("num_attention_heads")?;
    let head_dim = f.head_dim(hidden, "hidden_size", heads, "num_attention_heads")?;
    f.gelu("hidden_act", "gelu")?;
    // Older files spell the rotary fraction and base `rotary_pct` / `rotary_emb_base`,
    // newer ones `partial_rotary_factor` / `rope_theta`.
    let pct = match f.fraction("rotary_pct")? {
        Some(p) => p,
        None => f.fraction("partial_rotary_factor")?.unwrap_or(0.25),
    };
    let bias = f.bool("attention_bias")?.unwrap_or(true);
    Ok(ModelConfig {
        name: f.name.to_string(),
        layers: f.layers("num_hidden_layers")?,
        hidden,
        heads,
        kv_heads: heads,
        head_dim,
        ffn: f.req_u64("intermediate_size")?,
        vocab: f.req_u64("vocab_size")?,
        norm: Norm::LayerNorm,
        norm_eps: f.non_negative("layer_norm_eps")?.unwrap_or(1e-5),
        position: Position::Rotary {
            dims: rotary_dims(pct, head_dim),
            theta: f.rope_theta(&["rotary_emb_base", "rope_theta"])?,
        },
        mlp: Mlp::Gelu,
        qkv_bias: bias,
        out_bias: bias,
        mlp_bias: true,
        parallel_residual: f.bool("use_parallel_residual")?.unwrap_or(true),
        tied_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
        dropout: f.dropout(&["attention_dropout", "hidden_dropout"], 0.0)?,
        ..ModelConfig::decoder()
    })
}

fn falcon(f: &Fields) -> Result<ModelConfig, ModelError> {
    // FalconConfig maps `n_embed`, `n_head`, `n_layer`, `n_head_kv` onto these.
    let hidden = f.req_u64_any(&["hidden_size", "n_embed"])?;
    let heads = f.req_u64_any(&["num_attention_heads", "n_head"])?;
    let layers = f.layers_any(&["num_hidden_layers", "n_layer"])?;
    let head_dim = f.head_dim(hidden, "hidden_size", heads, "num_attention_heads")?;
    if f.bool("alibi")?.unwrap_or(false) {
        return Err(f.unsupported("falcon with ALiBi positions".into()));
    }
    let new_arch = f.bool("new_decoder_architecture")?.unwrap_or(false);
    let parallel = f.bool("parallel_attn")?.unwrap_or(true);
    let norms = f.u64("num_ln_in_parallel_attn")?;
    // The layer has one layernorm per branch only in these two forms; otherwise
    // attention and MLP read the same layernorm output, which ModelConfig cannot say.
    // `FalconDecoderLayer`: the new decoder architecture has `ln_attn` and `ln_mlp`
    // unless `num_ln_in_parallel_attn` is 1; the old one with `parallel_attn` has one
    // `input_layernorm` whose output attention and MLP both read (falcon-7b); without
    // `parallel_attn` a `post_attention_layernorm` follows the attention residual.
    let (parallel_residual, norm_layout) = match (new_arch, parallel, norms) {
        (true, _, None | Some(2)) => (true, NormLayout::Pre),
        (false, false, _) => (false, NormLayout::Pre),
        (true, _, Some(1)) | (false, true, None | Some(1)) => (true, NormLayout::Shared),
        (_, _, Some(n)) => {
            return Err(f.invalid(
                "num_ln_in_parallel_attn",
                format!("{n} layernorms in a parallel layer: Falcon has 1 or 2"),
            ))
        }
    };
    let kv_heads = if new_arch {
        match f.u64("num_kv_heads")? {
            Some(n) => n,
            None => f.u64("n_head_kv")?.unwrap_or(heads),
        }
    } else if f.bool("multi_query")?.unwrap_or(true) {
        1
    } else {
        heads
    };
    f.gelu("activation", "gelu")?;
    let ffn = match f.u64("ffn_hidden_size")? {
        Some(n) => n,
        None => f.times4(hidden, "hidden_size")?,
    };
    let bias = f.bool("bias")?.unwrap_or(false);
    Ok(ModelConfig {
        name: f.name.to_string(),
        layers,
        hidden,
        heads,
        kv_heads,
        head_dim,
        ffn,
        vocab: f.req_u64("vocab_size")?,
        norm: Norm::LayerNorm,
        norm_eps: f.non_negative("layer_norm_epsilon")?.unwrap_or(1e-5),
        position: Position::Rotary {
            dims: head_dim,
            theta: f.rope_theta(&["rope_theta"])?,
        },
        mlp: Mlp::Gelu,
        qkv_bias: bias,
        out_bias: bias,
        mlp_bias: bias,
        parallel_residual,
        tied_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(true),
        dropout: f.dropout(&["attention_dropout", "hidden_dropout"], 0.0)?,
        norm_layout,
        ..ModelConfig::decoder()
    })
}

/// BLOOM (`modeling_bloom.py`, `configuration_bloom.py`; BigScience Workshop 2022,
/// "BLOOM: A 176B-Parameter Open-Access Multilingual Language Model", arXiv 2211.05100):
/// the word embedding followed by a LayerNorm (`word_embeddings_layernorm`,
/// [`ModelConfig::embed_norm`]); ALiBi positions ([`Position::Alibi`]); pre-LayerNorm
/// layers (`input_layernorm`, `post_attention_layernorm`) with a fused
/// `query_key_value` (h → 3h) and `dense`, an MLP `dense_h_to_4h` → GeLU (the tanh
/// approximation, `bloom_gelu_forward`) → `dense_4h_to_h` of `4·hidden` (no key sets
/// it), biases on every linear layer; a final `ln_f`; the head tied to the embedding
/// (`tie_word_embeddings`, true by default). All norms use `layer_norm_epsilon`.
///
/// `n_embed` (older files) is the hidden size and takes precedence over `hidden_size`
/// in `BloomConfig`; `num_hidden_layers` and `num_attention_heads` are aliases of
/// `n_layer` and `n_head` (its `attribute_map`). Two spellings of one size that disagree
/// are refused. Read past: switches of the Megatron-DeepSpeed training run that the
/// published files carry and that change no size (`masked_softmax_fusion`,
/// `attention_softmax_in_fp32`, `bias_dropout_fusion`, `skip_bias_add`,
/// `skip_bias_add_qkv`, `offset_alibi`, `slow_but_exact` — which splits the output
/// projections into `pretraining_tp` slices of the same product — and `unk_token_id`).
///
/// Refused, naming the key: `apply_residual_connection_post_layernorm` true (the
/// residual taken after each layernorm is no [`NormLayout`]), and an `n_inner` other
/// than `4·hidden` (Hugging Face's MLP is `4·hidden` whatever it says; the training
/// code's `--ffn-hidden-size` would not be).
fn bloom(f: &Fields) -> Result<ModelConfig, ModelError> {
    let hidden = f
        .agreeing_u64(&["n_embed", "hidden_size"])?
        .ok_or_else(|| f.missing("hidden_size"))?;
    let heads = f
        .agreeing_u64(&["n_head", "num_attention_heads"])?
        .ok_or_else(|| f.missing("n_head"))?;
    let layers = f
        .agreeing_u64(&["n_layer", "num_hidden_layers"])?
        .ok_or_else(|| f.missing("n_layer"))?;
    let layers = u32::try_from(layers)
        .map_err(|_| f.invalid("n_layer", format!("{layers} layers is too many")))?;
    let head_dim = f.head_dim(hidden, "hidden_size", heads, "n_head")?;
    if f.bool("apply_residual_connection_post_layernorm")?
        .unwrap_or(false)
    {
        return Err(f.invalid(
            "apply_residual_connection_post_layernorm",
            "is true: residuals taken after the layernorms are not modeled (only the \
             pre-layernorm residual, the default)"
                .into(),
        ));
    }
    let ffn = f.times4(hidden, "hidden_size")?;
    if let Some(n) = f.u64("n_inner")? {
        if n != ffn {
            return Err(f.invalid(
                "n_inner",
                format!(
                    "{n}: Hugging Face's BLOOM MLP is 4·hidden = {ffn} whatever n_inner says; \
                     only that value (or null) is unambiguous"
                ),
            ));
        }
    }
    for key in [
        "masked_softmax_fusion",
        "attention_softmax_in_fp32",
        "bias_dropout_fusion",
        "skip_bias_add",
        "skip_bias_add_qkv",
        "offset_alibi",
        "slow_but_exact",
        "unk_token_id",
    ] {
        let _ = f.get(key);
    }
    Ok(ModelConfig {
        name: f.name.to_string(),
        layers,
        hidden,
        heads,
        kv_heads: heads,
        head_dim,
        ffn,
        vocab: f.req_u64("vocab_size")?,
        norm: Norm::LayerNorm,
        norm_eps: f.non_negative("layer_norm_epsilon")?.unwrap_or(1e-5),
        position: Position::Alibi,
        mlp: Mlp::Gelu,
        qkv_bias: true,
        out_bias: true,
        mlp_bias: true,
        tied_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(true),
        dropout: f.dropout(&["attention_dropout", "hidden_dropout"], 0.0)?,
        embed_norm: true,
        ..ModelConfig::decoder()
    })
}

/// Gemma generations.
#[derive(Clone, Copy, PartialEq)]
enum Gemma {
    /// `modeling_gemma.py`.
    V1,
    /// `modeling_gemma2.py`.
    V2,
    /// `modeling_gemma3.py` (`Gemma3ForCausalLM`, the text model).
    V3,
}

/// Gemma, Gemma 2 and Gemma 3's text model (`modeling_gemma*.py`): RMSNorm computed as
/// `x·(1 + w)` (the same one weight per channel), the embedding scaled by `√hidden`
/// (`normalizer`), a tied head, `head_dim` independent of `hidden / heads` (256 by
/// default), and the GeGLU MLP `down(gelu_pytorch_tanh(gate(x)) · up(x))`
/// (`hidden_activation`, older files `hidden_act`). Gemma 2 adds four norms per layer
/// (`input_layernorm`, `post_attention_layernorm`, `pre_feedforward_layernorm`,
/// `post_feedforward_layernorm`), the score scale `query_pre_attn_scalar^-½`, attention
/// and final logit soft-capping `c·tanh(x/c)` (`attn_logit_softcapping` 50,
/// `final_logit_softcapping` 30 by default), and a `sliding_window` (4096) on every
/// other layer, starting with layer 0. Gemma 3 keeps the four norms, adds
/// `q_norm`/`k_norm` (`RMSNorm(head_dim)`), drops the soft-capping by default and makes
/// five of every six layers local (`sliding_window_pattern` 6, window 4096 by default;
/// the published checkpoints use 1024). Newer files list `layer_types`
/// (`"sliding_attention"` / `"full_attention"`), which must repeat one global layer
/// every `n`.
fn gemma(f: &Fields, v: Gemma) -> Result<ModelConfig, ModelError> {
    let hidden = f.req_u64("hidden_size")?;
    let heads = f.req_u64("num_attention_heads")?;
    let kv_heads = f.u64("num_key_value_heads")?.unwrap_or(heads);
    let head_dim = f.u64("head_dim")?.unwrap_or(256);
    // GemmaConfig prefers `hidden_activation`; an exact `gelu` in `hidden_act` is the
    // legacy spelling of the tanh approximation (Transformers rewrites it).
    match f.str("hidden_activation")? {
        Some(_) => {
            f.gelu("hidden_activation", "gelu_pytorch_tanh")?;
            let _ = f.str("hidden_act")?; // superseded
        }
        None => f.gelu("hidden_act", "gelu_pytorch_tanh")?,
    }
    let bias = f.bool("attention_bias")?.unwrap_or(false);
    let softcap = |key: &'static str, default: Option<f64>| -> Result<Option<f64>, ModelError> {
        if v != Gemma::V2 && !f.map.contains_key(key) {
            return Ok(None);
        }
        match f.get(key) {
            None if f.map.contains_key(key) => Ok(None),
            None => Ok(default),
            Some(_) => match f.non_negative(key)? {
                Some(x) if x > 0.0 => Ok(Some(x)),
                _ => Err(f.invalid(key, "must be positive".into())),
            },
        }
    };
    let (attn_softcap, final_softcap) = match v {
        Gemma::V1 => (None, None),
        Gemma::V2 | Gemma::V3 => (
            softcap("attn_logit_softcapping", Some(50.0))?,
            softcap("final_logit_softcapping", Some(30.0))?,
        ),
    };
    let attn_scale = match v {
        Gemma::V1 => None,
        Gemma::V2 | Gemma::V3 => {
            let s = f.non_negative("query_pre_attn_scalar")?.unwrap_or(256.0);
            if s == 0.0 {
                return Err(f.invalid("query_pre_attn_scalar", "must be positive".into()));
            }
            Some(1.0 / s.sqrt())
        }
    };
    let (sliding_window, global_every) = match v {
        Gemma::V1 => (None, 0),
        Gemma::V2 | Gemma::V3 => {
            let w = f.window()?.unwrap_or(4096);
            let every = match f.layer_types()? {
                Some(every) => every,
                None if v == Gemma::V3 => match f.u64("sliding_window_pattern")?.unwrap_or(6) {
                    0 => {
                        return Err(f.invalid("sliding_window_pattern", "must be at least 1".into()))
                    }
                    n => u32::try_from(n).map_err(|_| {
                        f.invalid("sliding_window_pattern", format!("{n} is too large"))
                    })?,
                },
                None => 2,
            };
            (Some(w), every)
        }
    };
    // Gemma 3's local layers use `rope_local_base_freq` as their RoPE base: a position
    // value, no size.
    let _ = f.f64("rope_local_base_freq")?;
    let (norm_layout, qk_norm) = match v {
        Gemma::V1 => (NormLayout::Pre, QkNorm::None),
        Gemma::V2 => (NormLayout::Sandwich, QkNorm::None),
        Gemma::V3 => (NormLayout::Sandwich, QkNorm::PerHead),
    };
    Ok(ModelConfig {
        name: f.name.to_string(),
        layers: f.layers("num_hidden_layers")?,
        hidden,
        heads,
        kv_heads,
        head_dim,
        ffn: f.req_u64("intermediate_size")?,
        vocab: f.req_u64("vocab_size")?,
        norm: Norm::RmsNorm,
        norm_eps: f.non_negative("rms_norm_eps")?.unwrap_or(1e-6),
        position: Position::Rotary {
            dims: head_dim,
            theta: f.rope_theta(&["rope_theta"])?,
        },
        mlp: Mlp::GeGlu,
        qkv_bias: bias,
        out_bias: bias,
        mlp_bias: false,
        tied_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(true),
        dropout: f.dropout(&["attention_dropout"], 0.0)?,
        norm_layout,
        qk_norm,
        embed_scale: true,
        attn_scale,
        attn_softcap,
        final_softcap,
        sliding_window,
        global_every,
        ..ModelConfig::decoder()
    })
}

/// `modeling_gpt_oss.py` (transformers 4.55; `GptOssConfig` defaults where a key is
/// absent): RMSNorm pre-norm; GQA attention with biases on q, k, v, o
/// (`attention_bias`), rotary embedding over the whole head (YaRN's scaling changes
/// the frequencies, not the work), `layer_types` alternating sliding (`sliding_window`)
/// and full attention, and a learned sink logit per head (`sinks`); every layer a
/// mixture of `num_local_experts` experts, top `num_experts_per_tok` (softmax over the
/// chosen logits), a router with a bias, experts with biases and the clamped SwiGLU
/// (`swiglu_alpha`, `swiglu_limit`); untied head.
///
/// Modeled as: the fused `gate_up_proj` `[E, h, 2f]` (gate and up interleaved) as two
/// `[E, h, f]` grouped matmuls with their `[E, f]` biases (the same parameters and
/// FLOPs).
fn gpt_oss(f: &Fields) -> Result<ModelConfig, ModelError> {
    let hidden = f.req_u64("hidden_size")?;
    let heads = f.req_u64("num_attention_heads")?;
    let kv_heads = f.u64("num_key_value_heads")?.unwrap_or(8);
    let head_dim = f.u64("head_dim")?.unwrap_or(64);
    let act = f.str("hidden_act")?.unwrap_or("silu");
    if act != "silu" {
        return Err(f.invalid(
            "hidden_act",
            format!("`{act}` is not supported: gpt-oss's experts use the clamped SwiGLU"),
        ));
    }
    let bias = f.bool("attention_bias")?.unwrap_or(true);
    let window = f.window()?.or(Some(128));
    // `GptOssConfig` defaults `layer_types` to sliding, full, sliding, ….
    let global_every = f.layer_types()?.unwrap_or(2);
    let positive = |key: &'static str, default: f64| -> Result<f64, ModelError> {
        match f.non_negative(key)? {
            Some(x) if x > 0.0 => Ok(x),
            Some(_) => Err(f.invalid(key, "must be positive".into())),
            None => Ok(default),
        }
    };
    let clamp = ClampedSwiglu {
        alpha: positive("swiglu_alpha", 1.702)?,
        limit: positive("swiglu_limit", 7.0)?,
    };
    // `experts_per_token` is the original release's spelling of `num_experts_per_tok`.
    let topk = f.req_u64_any(&["num_experts_per_tok", "experts_per_token"])?;
    if let (Some(a), Some(b)) = (f.u64("num_experts_per_tok")?, f.u64("experts_per_token")?) {
        if a != b {
            return Err(f.invalid(
                "experts_per_token",
                format!("{b} differs from num_experts_per_tok {a}"),
            ));
        }
    }
    for key in [
        "router_aux_loss_coef",
        "output_router_logits",
        "initial_context_length",
    ] {
        let _ = f.get(key);
    }
    let ffn = f.req_u64("intermediate_size")?;
    let moe = Moe {
        experts: f.req_u64("num_local_experts")?,
        topk,
        expert_ffn: ffn,
        router_bias: true,
        expert_linear_bias: true,
        clamped_swiglu: Some(clamp),
        ..Default::default()
    };
    Ok(ModelConfig {
        name: f.name.to_string(),
        layers: f.layers("num_hidden_layers")?,
        hidden,
        heads,
        kv_heads,
        head_dim,
        ffn,
        vocab: f.req_u64("vocab_size")?,
        norm: Norm::RmsNorm,
        norm_eps: f.non_negative("rms_norm_eps")?.unwrap_or(1e-5),
        position: Position::Rotary {
            dims: head_dim,
            theta: f.rope_theta(&["rope_theta"])?,
        },
        mlp: Mlp::SwiGlu,
        qkv_bias: bias,
        out_bias: bias,
        mlp_bias: false,
        tied_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
        dropout: f.dropout(&["attention_dropout"], 0.0)?,
        sliding_window: window,
        global_every,
        moe: Some(Box::new(moe)),
        attn_sinks: true,
        ..ModelConfig::decoder()
    })
}

/// DeepSeek generations.
#[derive(Clone, Copy, PartialEq)]
enum DeepSeek {
    /// `modeling_deepseek_v2.py` (DeepSeek-V2, V2-Lite).
    V2,
    /// `modeling_deepseek_v3.py` (DeepSeek-V3, R1).
    V3,
}

/// DeepSeek-V2 and V3 (`modeling_deepseek_v2.py`, `modeling_deepseek_v3.py`, Transformers
/// 5.x): multi-head latent attention ([`super::Mla`]: `q_lora_rank`, `null` for a full
/// query projection as in V2-Lite; `kv_lora_rank`, `qk_nope_head_dim`,
/// `qk_rope_head_dim`, `v_head_dim`), RMSNorm, and mixture-of-experts layers from
/// `first_k_dense_replace` on: `n_routed_experts` SwiGLU experts of
/// `moe_intermediate_size`, top `num_experts_per_tok`, `n_shared_experts` shared experts
/// (one SwiGLU of `n_shared_experts · moe_intermediate_size`), a router of `h·E` weights.
/// The first layers' dense MLPs have `intermediate_size`.
///
/// V2 scores with a softmax and picks greedily (`topk_method` `greedy`) or among the best
/// `topk_group` of `n_group` groups (`group_limited_greedy`); V3 scores with sigmoids,
/// adds the `e_score_correction_bias` (a buffer, not a parameter) for the choice and
/// always picks among groups (`noaux_tc`). `routed_scaling_factor` scales the combine
/// weights. Values that change no size (`norm_topk_prob`, `rope_interleave`, the YaRN
/// `rope_scaling`, `aux_loss_alpha`, `seq_aux`, `ep_size`) are read past; the
/// multi-token-prediction module (`num_nextn_predict_layers`) is not built, as Hugging
/// Face's model builds none (the checkpoint's layer 61 of V3 is dropped on load).
///
/// Refused: `attention_bias` or `mlp_bias` true (no published checkpoint has them),
/// `moe_layer_freq` other than 1 (Hugging Face ignores it and puts experts in every
/// layer from `first_k_dense_replace`; DeepSeek's own code would not), a
/// `scoring_func` or `topk_method` other than the code runs, and key/value heads other
/// than the query heads.
fn deepseek(f: &Fields, v: DeepSeek) -> Result<ModelConfig, ModelError> {
    let hidden = f.req_u64("hidden_size")?;
    let heads = f.req_u64("num_attention_heads")?;
    if let Some(kv) = f.u64("num_key_value_heads")? {
        if kv != heads {
            return Err(f.invalid(
                "num_key_value_heads",
                format!("{kv}: latent attention has one key/value head per query head ({heads})"),
            ));
        }
    }
    let act = f.str("hidden_act")?.unwrap_or("silu");
    if act != "silu" {
        return Err(f.invalid(
            "hidden_act",
            format!("`{act}` is not supported: the SwiGLU MLP needs `silu`"),
        ));
    }
    for key in ["attention_bias", "mlp_bias"] {
        if f.bool(key)?.unwrap_or(false) {
            return Err(f.invalid(
                key,
                "is true: biased latent projections and MLPs are not built".into(),
            ));
        }
    }
    // `q_lora_rank: null` is a full query projection; an absent key takes the class
    // default (1536 in both classes).
    let q_lora_rank = match f.map.get("q_lora_rank") {
        Some(Value::Null) => {
            let _ = f.get("q_lora_rank");
            None
        }
        _ => Some(f.u64("q_lora_rank")?.unwrap_or(1536)),
    };
    let mla = super::Mla {
        q_lora_rank,
        kv_lora_rank: f.u64("kv_lora_rank")?.unwrap_or(512),
        qk_nope_head_dim: f.u64("qk_nope_head_dim")?.unwrap_or(128),
        qk_rope_head_dim: f.u64("qk_rope_head_dim")?.unwrap_or(64),
        v_head_dim: f.u64("v_head_dim")?.unwrap_or(128),
    };
    let qk = mla
        .qk_nope_head_dim
        .checked_add(mla.qk_rope_head_dim)
        .ok_or_else(|| f.invalid("qk_nope_head_dim", "is too large".into()))?;
    let (default_experts, default_ffn, default_shared, default_dense) = match v {
        DeepSeek::V2 => (64, 1407, 2, 0),
        DeepSeek::V3 => (256, 2048, 1, 3),
    };
    let experts = f.u64("n_routed_experts")?.unwrap_or(default_experts);
    let expert_ffn = f.u64("moe_intermediate_size")?.unwrap_or(default_ffn);
    let topk = match v {
        DeepSeek::V2 => f.req_u64("num_experts_per_tok")?,
        DeepSeek::V3 => f.u64("num_experts_per_tok")?.unwrap_or(8),
    };
    let shared = f.u64("n_shared_experts")?.unwrap_or(default_shared);
    let first_dense = f.u64("first_k_dense_replace")?.unwrap_or(default_dense);
    let first_dense = u32::try_from(first_dense).map_err(|_| {
        f.invalid(
            "first_k_dense_replace",
            format!("{first_dense} is too large"),
        )
    })?;
    if let Some(freq) = f.u64("moe_layer_freq")? {
        if freq != 1 {
            return Err(f.invalid(
                "moe_layer_freq",
                format!(
                    "{freq}: Hugging Face's model ignores it (experts in every layer from \
                     first_k_dense_replace), DeepSeek's code does not; only 1 is unambiguous"
                ),
            ));
        }
    }
    let (want_scoring, scoring) = match v {
        DeepSeek::V2 => ("softmax", Scoring::Softmax),
        DeepSeek::V3 => ("sigmoid", Scoring::Sigmoid),
    };
    if let Some(s) = f.str("scoring_func")? {
        if s != want_scoring {
            return Err(f.invalid(
                "scoring_func",
                format!("`{s}`: this model's code scores with `{want_scoring}`"),
            ));
        }
    }
    let method = f.str("topk_method")?;
    let groups = f.u64("n_group")?;
    let topk_groups = f.u64("topk_group")?;
    let grouped = match (v, method) {
        (DeepSeek::V2, None | Some("greedy")) => false,
        (DeepSeek::V2, Some("group_limited_greedy")) => true,
        (DeepSeek::V3, None | Some("noaux_tc")) => true,
        (_, Some(m)) => {
            return Err(f.invalid(
                "topk_method",
                format!("`{m}` is not what this model's code runs"),
            ))
        }
    };
    let group_limit = if grouped {
        let (g, t) = match v {
            DeepSeek::V2 => (
                groups.ok_or_else(|| f.missing("n_group"))?,
                topk_groups.ok_or_else(|| f.missing("topk_group"))?,
            ),
            DeepSeek::V3 => (groups.unwrap_or(8), topk_groups.unwrap_or(4)),
        };
        Some(super::GroupLimit {
            groups: g,
            topk_groups: t,
        })
    } else {
        None
    };
    let routed_scale = f.non_negative("routed_scaling_factor")?.unwrap_or(match v {
        DeepSeek::V2 => 1.0,
        DeepSeek::V3 => 2.5,
    });
    // Read: values that change no size (see the doc above).
    for key in [
        "norm_topk_prob",
        "rope_interleave",
        "aux_loss_alpha",
        "seq_aux",
        "ep_size",
        "num_nextn_predict_layers",
        "num_mtp_layers",
        "output_router_logits",
        "router_aux_loss_coef",
        "head_dim",
    ] {
        let _ = f.get(key);
    }
    let moe = Moe {
        experts,
        topk,
        expert_ffn,
        shared_ffn: shared
            .checked_mul(expert_ffn)
            .ok_or_else(|| f.invalid("n_shared_experts", "is too large".into()))?,
        shared_gate: false,
        scoring,
        first_dense,
        sparse_step: 1,
        dense_layers: Vec::new(),
        capacity_factor: None,
        routed_scale: Some(routed_scale).filter(|&r| r != 1.0),
        group_limit,
        expert_bias: v == DeepSeek::V3,
        // `DeepseekV2TopkRouter`: softmax over all experts, top-k, no renormalization
        // (it reads no `norm_topk_prob`).
        pre_softmax: v == DeepSeek::V2,
        router_bias: false,
        expert_linear_bias: false,
        clamped_swiglu: None,
    };
    Ok(ModelConfig {
        name: f.name.to_string(),
        layers: f.layers("num_hidden_layers")?,
        hidden,
        heads,
        kv_heads: heads,
        head_dim: qk,
        ffn: f.req_u64("intermediate_size")?,
        vocab: f.req_u64("vocab_size")?,
        norm: Norm::RmsNorm,
        norm_eps: f.non_negative("rms_norm_eps")?.unwrap_or(1e-6),
        position: Position::Rotary {
            dims: mla.qk_rope_head_dim,
            theta: f.rope_theta(&["rope_theta"])?,
        },
        mlp: Mlp::SwiGlu,
        qkv_bias: false,
        out_bias: false,
        mlp_bias: false,
        tied_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(false),
        dropout: f.dropout(&["attention_dropout"], 0.0)?,
        moe: Some(Box::new(moe)),
        mla: Some(Box::new(mla)),
        ..ModelConfig::decoder()
    })
}

/// StarCoder2 (`modeling_starcoder2.py`): LayerNorm with bias (`norm_epsilon`), biases
/// on q, k, v, o and on the MLP's `c_fc`/`c_proj` (`use_bias`), a plain GeLU MLP
/// (`gelu_pytorch_tanh`), grouped-query attention, and `sliding_window` on every layer.
fn starcoder2(f: &Fields) -> Result<ModelConfig, ModelError> {
    let hidden = f.req_u64("hidden_size")?;
    let heads = f.req_u64("num_attention_heads")?;
    let head_dim = f.head_dim(hidden, "hidden_size", heads, "num_attention_heads")?;
    f.gelu("hidden_act", "gelu_pytorch_tanh")?;
    // Keys of BigCode's training configuration that the published files carry and
    // `Starcoder2Config` does not read (the model is always LayerNorm, `c_fc`/`c_proj`).
    for key in [
        "activation_function",
        "attention_softmax_in_fp32",
        "layer_norm_epsilon",
        "mlp_type",
        "norm_type",
        "scale_attention_softmax_in_fp32",
        "scale_attn_weights",
    ] {
        let _ = f.get(key);
    }
    let bias = f.bool("use_bias")?.unwrap_or(true);
    Ok(ModelConfig {
        name: f.name.to_string(),
        layers: f.layers("num_hidden_layers")?,
        hidden,
        heads,
        kv_heads: f.u64("num_key_value_heads")?.unwrap_or(2),
        head_dim,
        ffn: f.req_u64("intermediate_size")?,
        vocab: f.req_u64("vocab_size")?,
        norm: Norm::LayerNorm,
        norm_eps: f.non_negative("norm_epsilon")?.unwrap_or(1e-5),
        position: Position::Rotary {
            dims: head_dim,
            theta: f.rope_theta(&["rope_theta"])?,
        },
        mlp: Mlp::Gelu,
        qkv_bias: bias,
        out_bias: bias,
        mlp_bias: bias,
        tied_embeddings: f.bool("tie_word_embeddings")?.unwrap_or(true),
        dropout: f.dropout(
            &["attention_dropout", "residual_dropout", "embedding_dropout"],
            0.0,
        )?,
        sliding_window: f.window()?,
        ..ModelConfig::decoder()
    })
}

/// Rotated channels per head: `int(fraction · head_dim)`, as Hugging Face computes it.
/// An odd or zero result is left for [`ModelConfig::validate`] to reject.
fn rotary_dims(fraction: f64, head_dim: u64) -> u64 {
    // `fraction` is in (0, 1], so the product is at most `head_dim`.
    (fraction * head_dim as f64) as u64
}

/// Typed access to the top-level fields of one config file.
struct Fields<'a> {
    name: &'a str,
    map: &'a Map<String, Value>,
    /// Keys the architecture's reader asked for.
    read: RefCell<BTreeSet<String>>,
    /// Whether the reader built the sliding window into the model (then it is no note).
    window_used: Cell<bool>,
    /// Whether a `rope_scaling` object replaced a different `rope_parameters`.
    rope_replaced: Cell<bool>,
}

impl<'a> Fields<'a> {
    /// The fields of `map`, none read yet; `name` names the model in errors.
    fn new(name: &'a str, map: &'a Map<String, Value>) -> Fields<'a> {
        Fields {
            name,
            map,
            read: RefCell::default(),
            window_used: Cell::new(false),
            rope_replaced: Cell::new(false),
        }
    }

    /// The value of `key`, with `null` counted as absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.read.borrow_mut().insert(key.to_string());
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// The keys no reader asked for, by why they do not matter or were ignored, and
    /// the trained positions.
    fn notes(&self) -> Result<ConfigNotes, ModelError> {
        let read = self.read.borrow().clone();
        let trained_positions = match self.u64("max_position_embeddings")? {
            Some(p) => Some(("max_position_embeddings", p)),
            None => self.u64("n_positions")?.map(|p| ("n_positions", p)),
        };
        let trained_positions = match trained_positions {
            Some((key, 0)) => return Err(self.invalid(key, "0 positions: must be positive".into())),
            other => other.map(|(_, p)| p),
        };
        // Qwen2 turns the window on with `use_sliding_window`; Mistral has no switch
        // and uses `sliding_window` when it is set.
        let sliding_window = match self.bool("use_sliding_window")? {
            _ if self.window_used.get() => None,
            Some(false) => None,
            _ => match self.u64("sliding_window")? {
                Some(0) => return Err(self.invalid("sliding_window", "must be positive".into())),
                w => w,
            },
        };
        let mut by_kind: std::collections::BTreeMap<IgnoredKind, Vec<String>> =
            std::collections::BTreeMap::new();
        for (key, value) in self.map {
            if read.contains(key) || INERT_KEYS.contains(&key.as_str()) {
                continue;
            }
            let kind = if SLIDING_WINDOW_KEYS.contains(&key.as_str()) {
                continue;
            } else if MOE_KEYS.contains(&key.as_str()) {
                if value.is_null() || *value == Value::Bool(false) {
                    continue;
                }
                IgnoredKind::MoeOnDense
            } else {
                IgnoredKind::Unknown
            };
            by_kind.entry(kind).or_default().push(key.clone());
        }
        if self.rope_replaced.get() {
            by_kind
                .entry(IgnoredKind::RopeParametersReplaced)
                .or_default()
                .push("rope_parameters".into());
        }
        Ok(ConfigNotes {
            ignored: by_kind.into_iter().collect(),
            sliding_window,
            model_type: self
                .map
                .get("model_type")
                .and_then(Value::as_str)
                .map(str::to_string),
            trained_positions,
        })
    }

    /// `sliding_window` of an architecture that windows every layer with it (absent or
    /// `null`: none); the window is then modeled, not noted.
    fn window(&self) -> Result<Option<u64>, ModelError> {
        self.window_used.set(true);
        match self.u64("sliding_window")? {
            Some(0) => Err(self.invalid("sliding_window", "must be positive".into())),
            w => Ok(w),
        }
    }

    /// The period of `layer_types` (`"sliding_attention"` / `"full_attention"`), when
    /// the file lists them: `n` when every `n`-th layer is global and the rest local
    /// (0 when none is global).
    fn layer_types(&self) -> Result<Option<u32>, ModelError> {
        const KEY: &str = "layer_types";
        let Some(v) = self.get(KEY) else {
            return Ok(None);
        };
        let Some(list) = v.as_array() else {
            return Err(self.wrong_type(KEY, "a list of layer types", v));
        };
        if let Some(n) = self.u64("num_hidden_layers")? {
            if list.len() as u64 != n {
                return Err(self.invalid(KEY, format!("has {} entries for {n} layers", list.len())));
            }
        }
        let mut global = Vec::with_capacity(list.len());
        for t in list {
            match t.as_str() {
                Some("full_attention") => global.push(true),
                Some("sliding_attention") => global.push(false),
                _ => return Err(self.wrong_type(KEY, "a list of layer types", t)),
            }
        }
        let every = global.iter().position(|&g| g).map_or(0, |i| i + 1);
        let periodic = global
            .iter()
            .enumerate()
            .all(|(i, &g)| g == (every > 0 && (i + 1) % every == 0));
        if !periodic {
            return Err(self.invalid(
                KEY,
                "must repeat one global layer every n layers (other patterns are not modeled)"
                    .into(),
            ));
        }
        u32::try_from(every)
            .map(Some)
            .map_err(|_| self.invalid(KEY, "is too long".into()))
    }

    /// The experts of a mixture-of-experts `family`.
    fn moe(&self, family: Family) -> Result<Moe, ModelError> {
        let (experts, expert_ffn) = match family {
            Family::Mixtral => (
                self.req_u64("num_local_experts")?,
                self.req_u64("intermediate_size")?,
            ),
            _ => {
                // transformers 5 maps `num_experts` to `num_local_experts`
                // (`Qwen3MoeConfig.attribute_map`) and saves that spelling.
                if let (Some(a), Some(b)) =
                    (self.u64("num_experts")?, self.u64("num_local_experts")?)
                {
                    if a != b {
                        return Err(self.invalid(
                            "num_local_experts",
                            format!("{b} differs from num_experts {a}"),
                        ));
                    }
                }
                (
                    self.req_u64_any(&["num_experts", "num_local_experts"])?,
                    self.req_u64("moe_intermediate_size")?,
                )
            }
        };
        let topk = self.req_u64("num_experts_per_tok")?;
        let (shared_ffn, shared_gate) = match family {
            Family::Qwen2Moe => (self.req_u64("shared_expert_intermediate_size")?, true),
            _ => (0, false),
        };
        let (sparse_step, dense_layers) = match family {
            Family::Mixtral => (1, Vec::new()),
            _ => {
                let step = self.u64("decoder_sparse_step")?.unwrap_or(1);
                // Hugging Face takes `(i + 1) % decoder_sparse_step`: 0 divides by zero.
                if step == 0 {
                    return Err(self.invalid("decoder_sparse_step", "must be at least 1".into()));
                }
                let step = u32::try_from(step)
                    .map_err(|_| self.invalid("decoder_sparse_step", "is too large".into()))?;
                let dense = self.u32s("mlp_only_layers")?;
                let layers = self.layers("num_hidden_layers")?;
                if let Some(&bad) = dense.iter().find(|&&i| i >= layers) {
                    return Err(self.invalid(
                        "mlp_only_layers",
                        format!("names layer {bad}; the model has layers 0..{layers}"),
                    ));
                }
                (step, dense)
            }
        };
        // Read: they change no size (the router's aux-loss weight, output and
        // normalization of the top-k weights, training noise).
        for key in [
            "router_aux_loss_coef",
            "output_router_logits",
            "norm_topk_prob",
            "router_jitter_noise",
        ] {
            let _ = self.get(key);
        }
        Ok(Moe {
            experts,
            topk,
            expert_ffn,
            shared_ffn,
            shared_gate,
            scoring: Scoring::Softmax,
            first_dense: 0,
            sparse_step,
            dense_layers,
            capacity_factor: None,
            ..Default::default()
        })
    }

    /// A list of layer indices (absent: empty).
    fn u32s(&self, key: &'static str) -> Result<Vec<u32>, ModelError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| self.wrong_type(key, "a list of layer indices", v))
                })
                .collect(),
            Some(v) => Err(self.wrong_type(key, "a list of layer indices", v)),
        }
    }

    fn missing(&self, key: &str) -> ModelError {
        ModelError::MissingField {
            file: self.name.to_string(),
            field: key.to_string(),
        }
    }

    fn invalid(&self, key: &'static str, why: String) -> ModelError {
        ModelError::Invalid {
            model: self.name.to_string(),
            field: key,
            why,
        }
    }

    fn unsupported(&self, arch: String) -> ModelError {
        ModelError::Unsupported {
            file: self.name.to_string(),
            arch,
            supported: SUPPORTED,
        }
    }

    fn wrong_type(&self, key: &'static str, want: &str, v: &Value) -> ModelError {
        self.invalid(key, format!("must be {want}, found {}", describe(v)))
    }

    fn u64(&self, key: &'static str) -> Result<Option<u64>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v)),
        }
    }

    fn req_u64(&self, key: &'static str) -> Result<u64, ModelError> {
        self.u64(key)?.ok_or_else(|| self.missing(key))
    }

    /// The first of `keys` present (aliases); missing names the first.
    fn req_u64_any(&self, keys: &[&'static str]) -> Result<u64, ModelError> {
        for &key in keys {
            if let Some(v) = self.u64(key)? {
                return Ok(v);
            }
        }
        Err(self.missing(keys[0]))
    }

    /// The value of the first of `keys` present (spellings of one size, by
    /// precedence), refusing a file where two of them disagree.
    fn agreeing_u64(&self, keys: &[&'static str]) -> Result<Option<u64>, ModelError> {
        let mut found: Option<(&'static str, u64)> = None;
        for &key in keys {
            match (self.u64(key)?, found) {
                (Some(v), None) => found = Some((key, v)),
                (Some(v), Some((first, w))) if v != w => {
                    return Err(self.invalid(key, format!("{v} differs from {first} {w}")));
                }
                _ => {}
            }
        }
        Ok(found.map(|(_, v)| v))
    }

    fn layers(&self, key: &'static str) -> Result<u32, ModelError> {
        self.layers_any(&[key])
    }

    fn layers_any(&self, keys: &[&'static str]) -> Result<u32, ModelError> {
        let n = self.req_u64_any(keys)?;
        u32::try_from(n).map_err(|_| self.invalid(keys[0], format!("{n} layers is too many")))
    }

    fn f64(&self, key: &'static str) -> Result<Option<f64>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(self.wrong_type(key, "a finite number", v)),
            },
        }
    }

    fn non_negative(&self, key: &'static str) -> Result<Option<f64>, ModelError> {
        match self.f64(key)? {
            Some(x) if x < 0.0 => Err(self.invalid(key, format!("{x} is negative"))),
            other => Ok(other),
        }
    }

    /// A number in (0, 1].
    fn fraction(&self, key: &'static str) -> Result<Option<f64>, ModelError> {
        match self.f64(key)? {
            Some(x) if !(x > 0.0 && x <= 1.0) => {
                Err(self.invalid(key, format!("{x} is outside (0, 1]")))
            }
            other => Ok(other),
        }
    }

    fn bool(&self, key: &'static str) -> Result<Option<bool>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "true or false", v)),
        }
    }

    fn str(&self, key: &'static str) -> Result<Option<&str>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a string", v)),
        }
    }

    fn req_str(&self, key: &'static str) -> Result<&str, ModelError> {
        self.str(key)?.ok_or_else(|| self.missing(key))
    }

    /// `hidden / heads`, which must divide exactly.
    fn head_dim(
        &self,
        hidden: u64,
        hidden_key: &'static str,
        heads: u64,
        heads_key: &'static str,
    ) -> Result<u64, ModelError> {
        if heads == 0 {
            return Err(self.invalid(heads_key, "must be positive".into()));
        }
        if hidden % heads != 0 {
            return Err(self.invalid(
                hidden_key,
                format!("{hidden} is not a multiple of {heads} heads (`{heads_key}`)"),
            ));
        }
        Ok(hidden / heads)
    }

    /// The default feed-forward size `4 · hidden`.
    fn times4(&self, hidden: u64, key: &'static str) -> Result<u64, ModelError> {
        hidden
            .checked_mul(4)
            .ok_or_else(|| self.invalid(key, format!("{hidden} is too large")))
    }

    /// The rotary dictionary Transformers keeps (`rope_scaling or rope_parameters` in
    /// `PreTrainedConfig.convert_rope_params_to_dict`): a non-empty `rope_scaling`
    /// object, else `rope_parameters`; `None` when neither is there. A
    /// `rope_parameters` the first replaces is noted in [`ConfigNotes::ignored`].
    fn rope_dict(&self) -> Result<Option<RopeDict<'_>>, ModelError> {
        let scaling = match self.get("rope_scaling") {
            Some(v) => match v.as_object() {
                Some(m) if !m.is_empty() => Some(m),
                Some(_) => None,
                None => return Err(self.wrong_type("rope_scaling", "an object or null", v)),
            },
            None => None,
        };
        let parameters = match self.get("rope_parameters") {
            Some(v) => match v.as_object() {
                Some(m) => Some(m),
                None => return Err(self.wrong_type("rope_parameters", "an object", v)),
            },
            None => None,
        };
        Ok(match (scaling, parameters) {
            (Some(m), Some(p)) => {
                if m != p {
                    self.rope_replaced.set(true);
                }
                Some(("rope_scaling", m))
            }
            (Some(m), None) => Some(("rope_scaling", m)),
            (None, Some(p)) => Some(("rope_parameters", p)),
            (None, None) => None,
        })
    }

    /// The rotary dictionary's `rope_theta` ([`Fields::rope_dict`]; Transformers puts
    /// the value there first), else the first RoPE base present among `keys`, else
    /// 10,000.
    fn rope_theta(&self, keys: &[&'static str]) -> Result<f64, ModelError> {
        let mut theta = None;
        if let Some((_, map)) = self.rope_dict()? {
            let nested = Fields::new(self.name, map);
            theta = nested.f64("rope_theta")?.map(|x| ("rope_theta", x));
        }
        if theta.is_none() {
            for &key in keys {
                if let Some(x) = self.f64(key)? {
                    theta = Some((key, x));
                    break;
                }
            }
        }
        match theta {
            None => Ok(10000.0),
            Some((_, x)) if x > 0.0 => Ok(x),
            Some((key, x)) => Err(self.invalid(key, format!("{x} must be positive"))),
        }
    }

    /// The largest of the dropout fields present, `default` for each absent one.
    fn dropout(&self, keys: &[&'static str], default: f64) -> Result<f64, ModelError> {
        let mut p: f64 = 0.0;
        for &key in keys {
            p = p.max(self.non_negative(key)?.unwrap_or(default));
        }
        Ok(p)
    }

    /// Checks that the activation named by `key` (default `default`) is a GeLU.
    fn gelu(&self, key: &'static str, default: &str) -> Result<(), ModelError> {
        let act = self.str(key)?.unwrap_or(default);
        if GELU_NAMES.contains(&act) {
            Ok(())
        } else {
            Err(self.invalid(
                key,
                format!(
                    "`{act}` is not supported: this architecture's MLP is modeled as GeLU \
                     (accepted: {})",
                    GELU_NAMES.join(", ")
                ),
            ))
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `a string "4096"`: the kind and a short rendering of a value.
fn describe(v: &Value) -> String {
    const SHOWN_CHARS: usize = 40;
    let text = v.to_string();
    let short: String = text.chars().take(SHOWN_CHARS).collect();
    let dots = if short.len() < text.len() { "…" } else { "" };
    format!("{} {short}{dots}", kind(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_dims_truncate_like_hugging_face() {
        assert_eq!(rotary_dims(0.25, 128), 32);
        assert_eq!(rotary_dims(0.25, 96), 24);
        assert_eq!(rotary_dims(1.0, 80), 80);
        assert_eq!(rotary_dims(0.3, 10), 3);
    }

    #[test]
    fn describe_shortens_long_values() {
        assert_eq!(describe(&Value::from("4096")), "a string \"4096\"");
        let long = Value::from("x".repeat(100));
        assert!(describe(&long).ends_with('…'));
    }
}
