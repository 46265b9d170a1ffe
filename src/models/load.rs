//! Resolves a `--model` argument: a zoo name, a Hugging Face `config.json`, or an IR
//! file (`.apir` text, JSON graph, or the binary codec).

use super::{build_forward, hf, zoo, Attention, ModelConfig, ModelError};
use crate::ir::{self, Graph, Phase};
use std::path::Path;

/// Changes applied to a zoo or `config.json` model before it is built.
#[derive(Clone, Copy, Debug, Default)]
pub struct Overrides {
    /// Attention form.
    pub attention: Option<Attention>,
    /// Number of layers.
    pub layers: Option<u32>,
}

/// A model ready for planning.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    /// The configuration, when the model came from the zoo or a `config.json`.
    pub config: Option<ModelConfig>,
    /// The graph: forward, or a whole training graph when `is_training`.
    pub graph: Graph,
    /// Whether `graph` already has backward and optimizer ops.
    pub is_training: bool,
    /// What a `config.json` loader ignored (empty for zoo models and IR files).
    pub notes: hf::ConfigNotes,
}

/// A model as named, before a configuration's graph is built: planning compiles a
/// configuration from a two-layer template, so its whole graph is never needed.
#[derive(Clone, Debug)]
pub enum ModelDef {
    /// A zoo model or a `config.json`, with what the loader ignored.
    Config {
        /// The configuration (overrides applied).
        config: ModelConfig,
        /// What a `config.json` loader ignored (empty for zoo models).
        notes: hf::ConfigNotes,
    },
    /// An IR file (verified).
    Graph {
        /// The graph.
        graph: Graph,
        /// Whether it already has backward and optimizer ops.
        is_training: bool,
    },
}

/// Resolves a zoo name, a `config.json` path or an IR file path without building a
/// configuration's graph.
///
/// # Errors
///
/// [`ModelError::Unknown`] for a name that is neither in the zoo nor a file; the
/// loader's error for a malformed `config.json` or IR file (naming the file);
/// [`ModelError::Invalid`] for overrides on an IR file.
pub fn resolve(spec: &str, overrides: &Overrides) -> Result<ModelDef, ModelError> {
    let path = Path::new(spec);
    let mut notes = hf::ConfigNotes::default();
    let mut cfg = match zoo::lookup(spec) {
        Ok(cfg) => {
            notes.trained_positions = zoo::trained_positions(spec);
            cfg
        }
        Err(unknown) => {
            if !path.exists() {
                return Err(unknown);
            }
            if is_hf_config(path)? {
                let (cfg, n) = hf::load_with_notes(path)?;
                notes = n;
                cfg
            } else {
                if overrides.attention.is_some() || overrides.layers.is_some() {
                    return Err(ModelError::Invalid {
                        model: spec.to_string(),
                        field: "overrides",
                        why: "--attention and --layers apply to zoo and config.json models, not IR files".into(),
                    });
                }
                let graph = load_ir_file(path)?;
                ir::verify(&graph).map_err(|e| ModelError::File {
                    file: spec.to_string(),
                    why: e.to_string(),
                })?;
                let is_training = graph.ops().any(|o| graph.node(o).phase != Phase::Fwd);
                return Ok(ModelDef::Graph { graph, is_training });
            }
        }
    };
    if let Some(a) = overrides.attention {
        cfg.attention = a;
    }
    if let Some(l) = overrides.layers {
        cfg.layers = l;
    }
    cfg.validate()?;
    Ok(ModelDef::Config { config: cfg, notes })
}

/// Loads a model from a zoo name, a `config.json` path or an IR file path, building
/// a configuration's whole forward graph.
///
/// # Errors
///
/// As [`resolve`], and the builder's error for a configuration it cannot build.
pub fn load(spec: &str, overrides: &Overrides) -> Result<LoadedModel, ModelError> {
    Ok(match resolve(spec, overrides)? {
        ModelDef::Config { config, notes } => LoadedModel {
            graph: build_forward(&config)?,
            config: Some(config),
            is_training: false,
            notes,
        },
        ModelDef::Graph { graph, is_training } => LoadedModel {
            config: None,
            graph,
            is_training,
            notes: hf::ConfigNotes::default(),
        },
    })
}

fn read(path: &Path) -> Result<Vec<u8>, ModelError> {
    crate::input::read_bytes(path).map_err(|e| ModelError::File {
        file: path.display().to_string(),
        why: e.to_string(),
    })
}

fn is_hf_config(path: &Path) -> Result<bool, ModelError> {
    if path.extension().and_then(|e| e.to_str()) != Some("json") {
        return Ok(false);
    }
    let bytes = read(path)?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| ModelError::File {
            file: path.display().to_string(),
            why: format!("not JSON: {e}"),
        })?;
    Ok(value.get("model_type").is_some() || value.get("architectures").is_some())
}

/// Reads an IR file: the binary codec (by its magic number), JSON (`.json`), or text.
/// The graph is not verified.
pub fn load_ir_file(path: &Path) -> Result<Graph, ModelError> {
    let file = path.display().to_string();
    let bytes = read(path)?;
    let err = |why: String| ModelError::File {
        file: file.clone(),
        why,
    };
    if bytes.starts_with(&ir::codec::GRAPH_MAGIC) {
        return ir::codec::decode_graph(&bytes).map_err(|e| err(e.to_string()));
    }
    let text = String::from_utf8(bytes).map_err(|_| err("not UTF-8 text".into()))?;
    if path.extension().and_then(|e| e.to_str()) == Some("json") {
        ir::json::from_json(&text).map_err(|e| err(e.to_string()))
    } else {
        ir::text::parse(&text).map_err(|e| err(e.to_string()))
    }
}
