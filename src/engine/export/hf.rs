//! Hugging Face `Trainer` command-line flags (`TrainingArguments`, parsed by
//! `HfArgumentParser`), with PyTorch FSDP2 through `--fsdp` and `--fsdp_config`.
//!
//! Names and meanings from transformers [`super::TRANSFORMERS_VERSION`]
//! (`transformers/training_args.py`): `--fsdp_config` takes a JSON object on the
//! command line (`_VALID_DICT_FIELDS`); with FSDP2 (`"version": 2`)
//! `"reshard_after_forward": true` is full sharding (ZeRO-3) and `false` keeps the
//! gathered parameters from forward to backward (ZeRO-2); recomputation under FSDP is
//! `fsdp_config["activation_checkpointing"]` (the `--activation_checkpointing` flag adds
//! an all-gather there), and `--activation_checkpointing` without FSDP. The
//! data-parallel degree is the number of processes: the `Trainer` has no tensor or
//! pipeline parallelism, no optimizer-only sharding and no selective recomputation.

use super::words::{self, Options};
use super::{exact_div, Export, ExportError, ExportPlan, ParseError, ParsedConfig};
use crate::engine::memory::Precision;
use crate::engine::Engine;
use crate::passes::Recompute;
use serde_json::{json, Value};

const E: Engine = Engine::Hf;

pub(super) fn export(p: &ExportPlan) -> Result<Export, ExportError> {
    let c = &p.config;
    if c.cp > 1 {
        return Err(ExportError::unsupported(
            E,
            format!("context parallel {}", c.cp),
            "TrainingArguments has no context-parallel option",
        ));
    }
    if c.tp > 1 || c.pp > 1 {
        return Err(ExportError::unsupported(
            E,
            format!("tensor parallel {} x pipeline {}", c.tp, c.pp),
            "TrainingArguments has no tensor- or pipeline-parallel option (the Trainer replicates or shards the whole model over data-parallel ranks)",
        ));
    }
    if c.zero == 1 {
        return Err(ExportError::unsupported(
            E,
            "ZeRO-1",
            "FSDP shards gradients with the optimizer states (reshard_after_forward false is ZeRO-2); no fsdp_config key shards the optimizer states alone",
        ));
    }
    if c.low_prec_shard && c.zero < 3 {
        return Err(ExportError::unsupported(
            E,
            format!("sharded low-precision parameters with ZeRO-{}", c.zero),
            "FSDP keeps parameters sharded after forward only with reshard_after_forward true (ZeRO-3)",
        ));
    }
    if c.recompute == Recompute::Selective {
        return Err(ExportError::unsupported(
            E,
            "selective recomputation",
            "activation checkpointing in transformers wraps whole decoder layers (no attention-core policy)",
        ));
    }
    if c.recompute == Recompute::Full && c.recompute_layers.is_some() {
        return Err(ExportError::unsupported(
            E,
            "recomputation of some layers only",
            "fsdp_config activation_checkpointing wraps every decoder layer",
        ));
    }
    let mut a = vec![
        vec![
            "--per_device_train_batch_size".to_string(),
            c.micro_batch.to_string(),
        ],
        vec![
            "--gradient_accumulation_steps".to_string(),
            c.num_micro_batches.to_string(),
        ],
    ];
    match p.precision.compute {
        Precision::Bf16 => a.push(vec!["--bf16".to_string()]),
        Precision::Fp16 => a.push(vec!["--fp16".to_string()]),
        // FP8 was refused by `export` (`Engine::fp8`).
        Precision::Fp32 | Precision::Fp8 => {}
    }
    let full = c.recompute == Recompute::Full;
    if c.zero >= 2 {
        let cfg = json!({
            "version": 2,
            "reshard_after_forward": c.zero >= 3,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "activation_checkpointing": full,
        });
        a.push(vec!["--fsdp".to_string()]);
        a.push(vec!["--fsdp_config".to_string(), cfg.to_string()]);
    } else if full {
        a.push(vec!["--activation_checkpointing".to_string()]);
    }
    let notes = vec![
        format!(
            "launch on {} processes (accelerate launch / torchrun --nproc-per-node): the Trainer's data-parallel degree is the world size",
            c.dp
        ),
        format!(
            "the data collator sets the sequence length ({} tokens in the plan)",
            p.seq
        ),
    ];
    Ok(Export {
        engine: E,
        text: words::lines(&a),
        env: Vec::new(),
        notes,
    })
}

pub(super) fn parse(text: &str, devices: u64) -> Result<ParsedConfig, ParseError> {
    let w = Options::parse(text)?;
    let micro_batch: u32 = w.req("--per_device_train_batch_size")?;
    let num_micro_batches: u32 = w.num("--gradient_accumulation_steps")?.unwrap_or(1);
    let dp = exact_div(devices, 1, "world size")?;
    let fsdp = w.has("--fsdp");
    let cfg: Value = match w.value("--fsdp_config")? {
        Some(s) => serde_json::from_str(s).map_err(|e| ParseError::Json(e.to_string()))?,
        None => json!({}),
    };
    let zero = if fsdp {
        if cfg["reshard_after_forward"].as_bool().unwrap_or(true) {
            3
        } else {
            2
        }
    } else {
        0
    };
    let full = w.has("--activation_checkpointing")
        || cfg["activation_checkpointing"].as_bool() == Some(true);
    Ok(ParsedConfig {
        dp,
        tp: 1,
        pp: 1,
        cp: 1,
        ep: 1,
        etp: 1,
        micro_batch,
        num_micro_batches,
        sp: false,
        recompute: if full {
            Recompute::Full
        } else {
            Recompute::None
        },
        recompute_layers: None,
        recompute_modules: None,
        zero,
        low_prec_shard: zero >= 3,
        schedule: None,
        stages: Vec::new(),
        fp8: false,
        moe: None,
        mla: None,
    })
}
