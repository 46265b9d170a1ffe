//! Configurations for the engines people run, from a chosen configuration: Megatron-LM
//! command-line arguments, a DeepSpeed `ds_config` JSON, a torchtitan TOML. Only option
//! names those projects document are used; what an engine cannot express is said in a
//! comment.

use crate::models::{Attention, Mlp, ModelConfig, Norm, Position};
use crate::passes::{Config, Recompute, Schedule};
use serde_json::json;
use std::fmt::Write;

use super::Engine;

/// Renders `c` for `engine`. `model` adds the model dimensions where the engine takes
/// them on the command line (Megatron-LM).
pub fn emit(
    engine: Engine,
    c: &Config,
    model: Option<&ModelConfig>,
    seq: u64,
    global_batch: u64,
) -> String {
    match engine {
        Engine::Megatron => megatron(c, model, seq, global_batch),
        Engine::DeepSpeed => deepspeed(c, global_batch),
        Engine::Torchtitan => torchtitan(c, seq, global_batch),
        Engine::Hf => String::from("# Hugging Face + FSDP export: not written yet\n"),
    }
}

fn megatron(c: &Config, model: Option<&ModelConfig>, seq: u64, global_batch: u64) -> String {
    let mut a: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut arg = |k: &str, v: String| a.push(format!("--{k} {v}"));
    arg("tensor-model-parallel-size", c.tp.to_string());
    arg("pipeline-model-parallel-size", c.pp.to_string());
    if let Schedule::Interleaved(v) = c.schedule {
        arg("virtual-pipeline-model-parallel-size", v.to_string());
    }
    arg("micro-batch-size", c.micro_batch.to_string());
    arg("global-batch-size", global_batch.to_string());
    arg("seq-length", seq.to_string());
    let mut flags: Vec<&str> = vec!["--bf16"];
    if c.sp {
        flags.push("--sequence-parallel");
    }
    match c.recompute {
        Recompute::None => {}
        Recompute::Selective => {
            a.push("--recompute-granularity selective".into());
        }
        Recompute::Full => {
            a.push("--recompute-granularity full".into());
            match c.recompute_layers {
                Some(k) => {
                    a.push("--recompute-method block".into());
                    a.push(format!("--recompute-num-layers {k}"));
                }
                None => {
                    a.push("--recompute-method uniform".into());
                    a.push("--recompute-num-layers 1".into());
                }
            }
        }
    }
    if c.zero >= 1 {
        flags.push("--use-distributed-optimizer");
    }
    if c.zero >= 2 || c.low_prec_shard {
        notes.push(format!(
            "ZeRO stage {}{} has no Megatron-LM equivalent; --use-distributed-optimizer shards optimizer states (stage 1). Use DeepSpeed or torchtitan for this plan.",
            c.zero,
            if c.low_prec_shard { " with sharded low-precision parameters" } else { "" }
        ));
    }
    if matches!(c.schedule, Schedule::Gpipe) && c.pp > 1 {
        notes.push("Megatron-LM runs 1F1B; the plan's GPipe order is not available (1F1B needs less memory for the same step time).".into());
    }
    if let Some(m) = model {
        a.push(format!("--num-layers {}", m.layers));
        a.push(format!("--hidden-size {}", m.hidden));
        a.push(format!("--ffn-hidden-size {}", m.ffn));
        a.push(format!("--num-attention-heads {}", m.heads));
        if m.kv_heads != m.heads {
            flags.push("--group-query-attention");
            a.push(format!("--num-query-groups {}", m.kv_heads));
        }
        if m.head_dim * m.heads != m.hidden {
            a.push(format!("--kv-channels {}", m.head_dim));
        }
        match m.position {
            Position::Learned { max_positions } => {
                a.push("--position-embedding-type learned_absolute".into());
                a.push(format!("--max-position-embeddings {max_positions}"));
            }
            Position::Rotary { theta, dims } => {
                a.push("--position-embedding-type rope".into());
                a.push(format!("--rotary-base {theta}"));
                if dims != m.head_dim {
                    a.push(format!(
                        "--rotary-percent {}",
                        dims as f64 / m.head_dim as f64
                    ));
                }
                a.push(format!("--max-position-embeddings {seq}"));
            }
        }
        if m.norm == Norm::RmsNorm {
            a.push("--normalization RMSNorm".into());
        }
        a.push(format!("--norm-epsilon {}", m.norm_eps));
        if m.mlp == Mlp::SwiGlu {
            flags.push("--swiglu");
        }
        if !m.tied_embeddings {
            flags.push("--untie-embeddings-and-output-weights");
        }
        if !m.mlp_bias && !m.out_bias {
            flags.push("--disable-bias-linear");
        }
        if m.qkv_bias && !m.out_bias {
            flags.push("--add-qkv-bias");
        }
        a.push(format!("--attention-dropout {}", m.dropout));
        a.push(format!("--hidden-dropout {}", m.dropout));
        if m.attention == Attention::Flash {
            flags.push("--use-flash-attn");
        }
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Megatron-LM arguments for dp {} × tp {} × pp {} = {} GPUs (data parallel size is implied by the world size)",
        c.dp,
        c.tp,
        c.pp,
        c.devices()
    );
    for n in notes {
        let _ = writeln!(s, "# note: {n}");
    }
    for x in a.iter().map(String::as_str).chain(flags) {
        let _ = writeln!(s, "{x} \\");
    }
    s.trim_end().trim_end_matches('\\').trim_end().to_string() + "\n"
}

fn deepspeed(c: &Config, global_batch: u64) -> String {
    let mut v = json!({
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": c.micro_batch,
        "gradient_accumulation_steps": c.num_micro_batches,
        "bf16": {"enabled": true},
        "zero_optimization": {"stage": c.zero},
    });
    if c.recompute != Recompute::None {
        v["activation_checkpointing"] = json!({
            "partition_activations": c.sp,
            "contiguous_memory_optimization": false,
            "cpu_checkpointing": false,
        });
    }
    let mut notes = vec![format!(
        "data parallel {}, tensor parallel {} and pipeline {} are set by the launcher/model (Megatron-DeepSpeed --tensor-model-parallel-size / --pipeline-model-parallel-size); train_batch_size = micro batch × accumulation × data parallel",
        c.dp, c.tp, c.pp
    )];
    if c.recompute == Recompute::Selective {
        notes.push(
            "selective recomputation: checkpoint only the attention core in the model code".into(),
        );
    }
    if c.low_prec_shard && c.zero < 3 {
        notes.push("sharded low-precision parameters without ZeRO-3 have no ds_config switch; stage 3 shards them".into());
    }
    v["comment"] = json!(notes.join("; "));
    serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
}

fn torchtitan(c: &Config, seq: u64, global_batch: u64) -> String {
    let shard = c.zero >= 1 || c.low_prec_shard;
    let (replicate, shard_degree) = if shard { (1, c.dp) } else { (c.dp, 1) };
    let schedule = match c.schedule {
        Schedule::Gpipe => "GPipe",
        Schedule::OneFOneB => "1F1B",
        Schedule::Interleaved(_) => "Interleaved1F1B",
    };
    let local = if c.pp > 1 {
        u64::from(c.micro_batch) * u64::from(c.num_micro_batches)
    } else {
        u64::from(c.micro_batch)
    };
    let mut s = String::new();
    let _ = writeln!(s, "# torchtitan job config for {} GPUs", c.devices());
    if shard && c.zero < 3 {
        let _ = writeln!(
            s,
            "# note: torchtitan shards with FSDP2 (ZeRO-3 style); the plan's ZeRO stage {} maps to data_parallel_shard_degree",
            c.zero
        );
    }
    if c.tp > 1 && !c.sp {
        let _ = writeln!(
            s,
            "# note: the plan has no sequence parallelism; torchtitan enables it with TP by default"
        );
    }
    let _ = writeln!(s, "[training]");
    let _ = writeln!(s, "local_batch_size = {local}");
    let _ = writeln!(s, "global_batch_size = {global_batch}");
    let _ = writeln!(s, "seq_len = {seq}");
    let _ = writeln!(s, "mixed_precision_param = \"bfloat16\"");
    let _ = writeln!(s, "\n[parallelism]");
    let _ = writeln!(s, "data_parallel_replicate_degree = {replicate}");
    let _ = writeln!(s, "data_parallel_shard_degree = {shard_degree}");
    let _ = writeln!(s, "tensor_parallel_degree = {}", c.tp);
    let _ = writeln!(s, "enable_sequence_parallel = {}", c.sp);
    let _ = writeln!(s, "pipeline_parallel_degree = {}", c.pp);
    if c.pp > 1 {
        let _ = writeln!(s, "pipeline_parallel_schedule = \"{schedule}\"");
        let _ = writeln!(s, "pipeline_parallel_microbatch_size = {}", c.micro_batch);
    }
    let _ = writeln!(s, "\n[activation_checkpoint]");
    let mode = match c.recompute {
        Recompute::None => "none",
        Recompute::Selective => "selective",
        Recompute::Full => "full",
    };
    let _ = writeln!(s, "mode = \"{mode}\"");
    if c.recompute == Recompute::Selective {
        let _ = writeln!(s, "selective_ac_option = \"op\"");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            dp: 4,
            tp: 8,
            pp: 2,
            micro_batch: 2,
            num_micro_batches: 8,
            sp: true,
            recompute: Recompute::Selective,
            zero: 1,
            low_prec_shard: false,
            schedule: Schedule::Interleaved(2),
            recompute_layers: None,
        }
    }

    fn arg(text: &str, key: &str) -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("--{key} ")))
            .unwrap_or_else(|| panic!("{key} missing in\n{text}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Degrees multiply to the world size and global = dp · m · b in every export.
    #[test]
    fn exports_agree_with_the_plan() {
        let c = cfg();
        let gb = c.global_batch();
        let m = megatron(&c, None, 2048, gb);
        let (tp, pp, mb, g) = (
            arg(&m, "tensor-model-parallel-size"),
            arg(&m, "pipeline-model-parallel-size"),
            arg(&m, "micro-batch-size"),
            arg(&m, "global-batch-size"),
        );
        // Megatron derives dp = world / (tp · pp) and m = global / (dp · b).
        let dp = c.devices() / (tp * pp);
        assert_eq!(dp, u64::from(c.dp));
        assert_eq!(g / (dp * mb), u64::from(c.num_micro_batches));
        assert!(m.contains("--sequence-parallel") && m.contains("--use-distributed-optimizer"));

        let d: serde_json::Value = serde_json::from_str(&deepspeed(&c, gb)).unwrap();
        let (tb, mbg, acc) = (
            d["train_batch_size"].as_u64().unwrap(),
            d["train_micro_batch_size_per_gpu"].as_u64().unwrap(),
            d["gradient_accumulation_steps"].as_u64().unwrap(),
        );
        assert_eq!(tb, mbg * acc * u64::from(c.dp));
        assert_eq!(d["zero_optimization"]["stage"], 1);

        let t = torchtitan(&c, 2048, gb);
        let get = |k: &str| -> u64 {
            t.lines()
                .find_map(|l| l.strip_prefix(&format!("{k} = ")))
                .unwrap()
                .parse()
                .unwrap()
        };
        let world = get("data_parallel_replicate_degree")
            * get("data_parallel_shard_degree")
            * get("tensor_parallel_degree")
            * get("pipeline_parallel_degree");
        assert_eq!(world, c.devices());
        assert_eq!(
            get("global_batch_size"),
            get("local_batch_size")
                * (get("data_parallel_replicate_degree") * get("data_parallel_shard_degree"))
        );
    }
}
