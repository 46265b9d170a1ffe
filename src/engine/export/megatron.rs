//! Megatron-LM `pretrain_gpt.py` arguments.
//!
//! Option names and their checks are those of `megatron/training/arguments.py`
//! (`add_megatron_arguments`, `validate_args`) and of the dataclasses it turns into
//! options (`TransformerConfig`, `DistributedDataParallelConfig`) at
//! [`super::MEGATRON_COMMIT`]:
//!
//! - the pipeline cut: an even cut needs nothing (`--num-virtual-stages-per-pipeline-rank`
//!   adds interleaving), a cut whose first and last pipeline ranks differ from the even
//!   middle takes `--decoder-first-pipeline-num-layers` /
//!   `--decoder-last-pipeline-num-layers`, any other cut is spelled out by
//!   `--pipeline-model-parallel-layout` (`E` embedding, `t` a layer, `L` the loss, `|`
//!   between virtual stages in model order);
//! - ZeRO-1 is `--use-distributed-optimizer`; ZeRO-2/3 are Megatron-FSDP
//!   (`--use-megatron-fsdp --data-parallel-sharding-strategy optim_grads` /
//!   `optim_grads_params`, which `validate_args` requires with `--ckpt-format
//!   fsdp_dtensor`);
//! - tensor parallelism without FSDP requires `CUDA_DEVICE_MAX_CONNECTIONS=1`
//!   (`validate_args`, before Blackwell); Megatron-FSDP requires it unset or above 1;
//! - selective recomputation is `--recompute-granularity selective --recompute-modules
//!   core_attn` (the attention core, Korthikanti et al. 2022), or the plan's module set
//!   (`--recompute-modules mlp`, `core_attn mlp`: a list option, `nargs="+"` from
//!   `ArgumentGroupFactory`); full recomputation of
//!   `k` layers per stage is `--recompute-method block --recompute-num-layers k`;
//! - attention is `--attention-backend flash` or `unfused` (`--use-flash-attn` is read
//!   by nothing any more);
//! - the overlap apar's simulation assumes (`engine::overlap`) is switched on:
//!   `--overlap-grad-reduce`, and with a sharded optimizer `--overlap-param-gather`
//!   (which `validate_args` allows with the distributed optimizer or Megatron-FSDP and
//!   `--overlap-grad-reduce` only), and with sequence parallelism `--tp-comm-overlap`
//!   (which `validate_args` allows with `--sequence-parallel` only); a plan priced
//!   without them (`apar eval --no-overlap-grad-reduce`, `--no-tp-comm-overlap`) is
//!   exported without them.
//!
//! - mixture-of-experts layers (`--num-experts`, `--moe-*` of `_add_moe_args` and
//!   `TransformerConfig`): `--num-experts`, `--moe-router-topk`, `--moe-ffn-hidden-size`,
//!   `--moe-router-score-function`, shared experts as
//!   `--moe-shared-expert-intermediate-size` (with `--moe-shared-expert-gate`, a sigmoid
//!   gate), dense layers as a `--moe-layer-freq` list pattern (`([0]*3+[1]*45)`, which
//!   `moe_freq_type` evaluates), a capacity factor as `--moe-expert-capacity-factor` with
//!   `--moe-pad-expert-input-to-capacity` (fixed buffers, as apar counts them), the
//!   alltoall dispatcher, `--moe-grouped-gemm`, and the plan's expert layout as
//!   `--expert-model-parallel-size` and `--expert-tensor-parallel-size` (always
//!   written; read back with Megatron-LM's default `tp` for the latter).
//!   `MoELayer.forward` refuses to train with tensor parallelism but no sequence
//!   parallelism, and apar's experts have no linear biases: both are refused;
//! - per-head query/key norms (Qwen3) are `--qk-layernorm`;
//! - multi-latent attention (DeepSeek-V2/V3) is `--multi-latent-attention` with
//!   `--q-lora-rank` (absent: a full query projection), `--kv-lora-rank`,
//!   `--qk-head-dim` (the non-rotary channels), `--qk-pos-emb-head-dim` (the rotary
//!   ones), `--v-head-dim` and `--rope-type rope` (MLA defaults to YaRN; a
//!   `config.json`'s YaRN is `--rope-type yarn` with its factors), with
//!   `--attention-backend fused` (query/key and value head dims differ); DeepSeek's
//!   routing is `--moe-router-topk-scaling-factor`, `--moe-router-num-groups`,
//!   `--moe-router-group-topk`, `--moe-router-enable-expert-bias` (V3's sigmoid
//!   scores with the auxiliary-loss-free bias) and `--moe-router-pre-softmax` (V2's
//!   softmax over all experts); first-k-dense layers are the
//!   `--moe-layer-freq` pattern above.
//!
//! The data-parallel degree is the world size over `tp × pp`, and the micro-batch count
//! is the global batch over `dp × micro-batch`: the job must be launched on
//! `dp × tp × pp` ranks.

use super::words::{self, Options};
use super::{
    even_layers, exact_div, Export, ExportError, ExportPlan, ParseError, ParsedConfig, ParsedMoe,
    StageLayers,
};
use crate::engine::memory::Precision;
use crate::engine::Engine;
use crate::models::{Attention, Mlp, ModelConfig, Norm, Position, QkNorm, RopeScaling, Scoring};
use crate::passes::{Recompute, RecomputeModules, Schedule};

const E: Engine = Engine::Megatron;

/// The most virtual stages a parsed text may ask for (no model has more layers).
const MAX_STAGES: u64 = 1 << 16;

/// How the pipeline cut is spelled.
enum Cut {
    /// Megatron's default even split (`v` chunks per rank).
    Even { v: u32 },
    /// First and last pipeline ranks hold these many layers, the middle ranks the rest
    /// evenly.
    FirstLast { v: u32, first: u32, last: u32 },
    /// Every virtual stage spelled out.
    Layout(String),
}

fn cut(p: &ExportPlan) -> Cut {
    let pp = p.config.pp as usize;
    let v = p.chunks();
    if even_layers(&p.stages).is_some() {
        return Cut::Even { v };
    }
    // Per pipeline rank r: its chunks are the virtual stages r, r + pp, r + 2pp, …
    let rank = |r: usize| -> Option<u32> {
        let mut it = p.stages.iter().skip(r).step_by(pp).map(|s| s.layers);
        let first = it.next()?;
        it.all(|l| l == first).then_some(first)
    };
    let per_rank: Option<Vec<u32>> = (0..pp).map(rank).collect();
    if let Some(per_rank) = per_rank {
        let middle = &per_rank[1..pp - 1];
        let middle_even = middle.windows(2).all(|w| w[0] == w[1]);
        let (first, last) = (per_rank[0], per_rank[pp - 1]);
        if pp >= 2 && middle_even && first > 0 && last > 0 {
            return Cut::FirstLast {
                v,
                first: first * v,
                last: last * v,
            };
        }
    }
    Cut::Layout(layout(&p.stages))
}

/// `--pipeline-model-parallel-layout` of `stages`.
fn layout(stages: &[StageLayers]) -> String {
    stages
        .iter()
        .map(|s| {
            let mut x = String::new();
            if s.embedding {
                x.push('E');
            }
            match s.layers {
                0 => {}
                1 => x.push('t'),
                n => x.push_str(&format!("t*{n}")),
            }
            if s.head {
                x.push('L');
            }
            x
        })
        .collect::<Vec<_>>()
        .join("|")
}

fn parse_layout(s: &str) -> Result<Vec<StageLayers>, ParseError> {
    let bad = || ParseError::BadValue {
        option: "--pipeline-model-parallel-layout".into(),
        value: s.to_string(),
    };
    s.split('|')
        .map(|stage| {
            let mut rest = stage;
            let embedding = rest.starts_with('E');
            if embedding {
                rest = &rest[1..];
            }
            let head = rest.ends_with('L');
            if head {
                rest = &rest[..rest.len() - 1];
            }
            let layers = match rest {
                "" => 0,
                "t" => 1,
                r => match r.strip_prefix("t*") {
                    Some(n) => n.parse().map_err(|_| bad())?,
                    None if r.chars().all(|c| c == 't') => {
                        u32::try_from(r.len()).map_err(|_| bad())?
                    }
                    None => return Err(bad()),
                },
            };
            Ok(StageLayers {
                embedding,
                layers,
                head,
            })
        })
        .collect()
}

fn arg(a: &mut Vec<Vec<String>>, k: &str, v: impl ToString) {
    a.push(vec![format!("--{k}"), v.to_string()]);
}

fn flag(a: &mut Vec<Vec<String>>, k: &str) {
    a.push(vec![format!("--{k}")]);
}

pub(super) fn export(p: &ExportPlan) -> Result<Export, ExportError> {
    let c = &p.config;
    let m = p.model.as_ref().ok_or_else(|| ExportError::NoModelConfig {
        engine: E,
        model: String::from("(graph)"),
    })?;
    if c.pp > 1 && c.schedule == Schedule::Gpipe {
        return Err(ExportError::unsupported(
            E,
            "GPipe schedule",
            "Megatron-LM schedules a pipeline 1F1B or interleaved 1F1B only (no option selects GPipe)",
        ));
    }
    if c.pp == 1 && c.schedule.chunks() > 1 {
        return Err(ExportError::unsupported(
            E,
            "interleaved schedule without a pipeline",
            "--num-virtual-stages-per-pipeline-rank needs --pipeline-model-parallel-size > 1",
        ));
    }
    if c.recompute == Recompute::Selective && c.recompute_layers.is_some() {
        return Err(ExportError::unsupported(
            E,
            "selective recomputation of some layers only",
            "--recompute-num-layers must be unset with --recompute-granularity selective",
        ));
    }
    if c.low_prec_shard && c.zero < 3 {
        return Err(ExportError::unsupported(
            E,
            format!("sharded low-precision parameters with ZeRO-{}", c.zero),
            "--data-parallel-sharding-strategy shards parameters only together with gradients and optimizer states (optim_grads_params, ZeRO-3)",
        ));
    }
    model_supported(m)?;
    let mut a: Vec<Vec<String>> = Vec::new();
    let mut env = Vec::new();
    let mut notes = vec![format!(
        "launch on dp {} x {}tp {} x pp {} = {} ranks: Megatron-LM derives the data-parallel size from the world size",
        c.dp,
        if c.cp > 1 {
            format!("cp {} x ", c.cp)
        } else {
            String::new()
        },
        c.tp,
        c.pp,
        c.devices()
    )];
    arg(&mut a, "tensor-model-parallel-size", c.tp);
    arg(&mut a, "pipeline-model-parallel-size", c.pp);
    if c.cp > 1 {
        // Ring attention over the context-parallel group: Transformer Engine passes
        // K/V blocks peer to peer (`--cp-comm-type p2p`, the default), on the
        // load-balanced 2·cp chunking `get_batch_on_this_cp_rank` applies.
        arg(&mut a, "context-parallel-size", c.cp);
        arg(&mut a, "cp-comm-type", "p2p");
    }
    if c.pp > 1 {
        match cut(p) {
            Cut::Even { v } => {
                if v > 1 {
                    arg(&mut a, "num-virtual-stages-per-pipeline-rank", v);
                }
            }
            Cut::FirstLast { v, first, last } => {
                if v > 1 {
                    arg(&mut a, "num-virtual-stages-per-pipeline-rank", v);
                }
                arg(&mut a, "decoder-first-pipeline-num-layers", first);
                arg(&mut a, "decoder-last-pipeline-num-layers", last);
            }
            Cut::Layout(l) => arg(&mut a, "pipeline-model-parallel-layout", l),
        }
    }
    arg(&mut a, "micro-batch-size", c.micro_batch);
    arg(&mut a, "global-batch-size", p.global_batch);
    arg(&mut a, "seq-length", p.seq);
    match p.precision.compute {
        Precision::Bf16 => flag(&mut a, "bf16"),
        Precision::Fp16 => flag(&mut a, "fp16"),
        Precision::Fp8 => {
            // Transformer Engine FP8 over bf16 (`fp8`, `fp8_amax_history_len`,
            // `fp8_amax_compute_algo` of `transformer_config.py`, as options by
            // `ArgumentGroupFactory`); the amax values of Megatron-LM's
            // `examples/llama/train_llama3_8b_h100_fp8.sh`, for the default `delayed`
            // recipe.
            flag(&mut a, "bf16");
            arg(&mut a, "fp8-format", "hybrid");
            arg(&mut a, "fp8-amax-history-len", 1024);
            arg(&mut a, "fp8-amax-compute-algo", "max");
        }
        Precision::Fp32 => {}
    }
    if c.sp && c.tp > 1 {
        flag(&mut a, "sequence-parallel");
    }
    match c.recompute {
        Recompute::None => {}
        Recompute::Selective => {
            arg(&mut a, "recompute-granularity", "selective");
            let modules = c
                .recompute_modules
                .unwrap_or_else(RecomputeModules::core_attn);
            let mut words = vec!["--recompute-modules".to_string()];
            words.extend(modules.iter().map(|m| m.name().to_string()));
            a.push(words);
        }
        Recompute::Full => {
            arg(&mut a, "recompute-granularity", "full");
            match c.recompute_layers {
                Some(k) => {
                    arg(&mut a, "recompute-method", "block");
                    arg(&mut a, "recompute-num-layers", k);
                }
                None => {
                    arg(&mut a, "recompute-method", "uniform");
                    arg(&mut a, "recompute-num-layers", 1);
                }
            }
        }
    }
    // The simulation overlaps the gradient reduction with the backward by buckets and,
    // with the distributed optimizer or Megatron-FSDP, the parameter all-gather with
    // the next forward (`engine::overlap`); Megatron-LM does either only when asked.
    // A plan priced without them (a measured run's switches) is exported without.
    if p.comm_overlap.grad_reduce {
        flag(&mut a, "overlap-grad-reduce");
    }
    if c.zero >= 1 && p.comm_overlap.param_gather {
        flag(&mut a, "overlap-param-gather");
    }
    // With sequence parallelism the simulation hides the tensor-parallel collectives
    // behind their GEMMs (Transformer Engine userbuffers, `lower::profile::TpOverlap`).
    if c.sp && c.tp > 1 && p.comm_overlap.tp_comm {
        flag(&mut a, "tp-comm-overlap");
    }
    match c.zero {
        0 => {}
        1 => flag(&mut a, "use-distributed-optimizer"),
        z => {
            flag(&mut a, "use-distributed-optimizer");
            flag(&mut a, "use-megatron-fsdp");
            let strategy = if z == 2 {
                "optim_grads"
            } else {
                "optim_grads_params"
            };
            arg(&mut a, "data-parallel-sharding-strategy", strategy);
            arg(&mut a, "ckpt-format", "fsdp_dtensor");
            notes
                .push("Megatron-FSDP requires CUDA_DEVICE_MAX_CONNECTIONS unset or above 1".into());
        }
    }
    if c.tp > 1 && c.zero < 2 {
        env.push(("CUDA_DEVICE_MAX_CONNECTIONS".to_string(), "1".to_string()));
    }
    arg(&mut a, "num-layers", m.layers);
    arg(&mut a, "hidden-size", m.hidden);
    arg(&mut a, "ffn-hidden-size", m.ffn);
    arg(&mut a, "num-attention-heads", m.heads);
    if m.kv_heads != m.heads {
        flag(&mut a, "group-query-attention");
        arg(&mut a, "num-query-groups", m.kv_heads);
    }
    // Multi-latent attention sets its own head dims (`mla_args`).
    if m.head_dim * m.heads != m.hidden && m.mla.is_none() {
        arg(&mut a, "kv-channels", m.head_dim);
    }
    match m.position {
        Position::Learned { max_positions } => {
            arg(&mut a, "position-embedding-type", "learned_absolute");
            arg(&mut a, "max-position-embeddings", max_positions);
        }
        Position::Rotary { theta, dims } => {
            arg(&mut a, "position-embedding-type", "rope");
            // `--rotary-base` is an integer option (Python's int: any size).
            arg(&mut a, "rotary-base", format!("{:.0}", theta.round()));
            if theta.fract() != 0.0 {
                notes.push(format!(
                    "rope_theta {theta} is not an integer and --rotary-base takes one: \
                     written as {:.0}",
                    theta.round()
                ));
            }
            if dims != m.head_dim && m.mla.is_none() {
                arg(&mut a, "rotary-percent", dims as f64 / m.head_dim as f64);
            }
            arg(&mut a, "max-position-embeddings", p.seq);
            // Multi-latent attention takes its YaRN with its own options (`mla_args`).
            match &m.rope_scaling {
                Some(r) if m.mla.is_some() && r.rope_type == "yarn" => {}
                Some(r) => rope_scaling_args(&mut a, &mut notes, r),
                None => {}
            }
        }
        // Refused by `model_supported` above.
        Position::Alibi => {}
    }
    if m.norm == Norm::RmsNorm {
        arg(&mut a, "normalization", "RMSNorm");
    }
    arg(&mut a, "norm-epsilon", m.norm_eps);
    let clamped = m
        .moe
        .as_deref()
        .is_some_and(|moe| moe.clamped_swiglu.is_some());
    if m.mlp == Mlp::SwiGlu && !clamped {
        flag(&mut a, "swiglu");
    }
    if m.qk_norm == QkNorm::PerHead {
        flag(&mut a, "qk-layernorm");
    }
    if !m.tied_embeddings {
        flag(&mut a, "untie-embeddings-and-output-weights");
    }
    if !m.mlp_bias && !m.out_bias {
        flag(&mut a, "disable-bias-linear");
        if m.qkv_bias {
            flag(&mut a, "add-qkv-bias");
        }
    }
    arg(&mut a, "attention-dropout", m.dropout);
    arg(&mut a, "hidden-dropout", m.dropout);
    gpt_oss_args(&mut a, m);
    let backend = match m.attention {
        // Multi-latent attention's query/key and value head dims differ, which the
        // flash-attn backend does not take; Transformer Engine's cuDNN fused attention
        // does (branch `mla`), and runs the learnable softmax's sinks
        // (`TransformerConfig.softmax_type`: TE FusedAttention or unfused).
        Attention::Flash if m.mla.is_some() || m.attn_sinks => "fused",
        Attention::Flash => "flash",
        Attention::Eager => "unfused",
    };
    arg(&mut a, "attention-backend", backend);
    if let Some(moe) = ParsedMoe::of(m) {
        if c.tp > 1 && !c.sp {
            return Err(ExportError::unsupported(
                E,
                "mixture-of-experts layers with tensor parallelism but no sequence parallelism",
                "MoELayer.forward refuses to train with tensor parallelism unless --sequence-parallel is set",
            ));
        }
        if m.mlp_bias {
            return Err(ExportError::unsupported(
                E,
                "experts with linear biases",
                "TransformerConfig allows bias in MoE only with --expert-tensor-parallel-size 1, and apar shards experts by the tensor-parallel degree",
            ));
        }
        let expert_bias = m.moe.as_deref().is_some_and(|moe| moe.expert_linear_bias);
        if expert_bias && c.etp > 1 {
            return Err(ExportError::unsupported(
                E,
                "experts with linear biases split over expert tensor parallelism",
                "TransformerConfig allows bias in MoE only with --expert-tensor-parallel-size 1",
            ));
        }
        moe_args(&mut a, &moe, m.layers);
        // The expert layout: `E/ep` experts per rank, each split over etp ranks
        // (written even at its default, tp, so that the export reads the same
        // whatever Megatron-LM's default becomes).
        arg(&mut a, "expert-model-parallel-size", c.ep);
        arg(&mut a, "expert-tensor-parallel-size", c.etp);
        deepseek_router_args(&mut a, &moe);
    }
    if let Some(mla) = &m.mla {
        mla_args(&mut a, &mut notes, mla, m.rope_scaling.as_deref());
    }
    if m.attn_sinks && m.rope_scaling.is_none() {
        notes.push(
            "the plan prices the rotary embedding, not its frequencies: add gpt-oss's YaRN \
             scaling (--position-embedding-type yarn and its factors from rope_scaling) to \
             match the checkpoint"
                .into(),
        );
    }
    notes.push(format!(
        "the tokenizer sets the vocabulary ({} tokens in the plan)",
        m.vocab
    ));
    Ok(Export {
        engine: E,
        text: words::lines(&a),
        env,
        notes,
    })
}

/// The `--num-experts`, `--moe-*` options of `moe`, a model of `layers` layers.
fn moe_args(a: &mut Vec<Vec<String>>, moe: &ParsedMoe, layers: u32) {
    arg(a, "num-experts", moe.experts);
    arg(a, "moe-router-topk", moe.topk);
    arg(a, "moe-ffn-hidden-size", moe.expert_ffn);
    let score = match moe.scoring {
        Scoring::Softmax => "softmax",
        Scoring::Sigmoid => "sigmoid",
    };
    arg(a, "moe-router-score-function", score);
    if moe.shared_ffn > 0 {
        arg(a, "moe-shared-expert-intermediate-size", moe.shared_ffn);
        if moe.shared_gate {
            flag(a, "moe-shared-expert-gate");
        }
    }
    if !moe.dense_layers.is_empty() {
        arg(
            a,
            "moe-layer-freq",
            layer_pattern(&moe.dense_layers, layers),
        );
    }
    if let Some(c) = moe.capacity_factor {
        arg(a, "moe-expert-capacity-factor", c);
        flag(a, "moe-pad-expert-input-to-capacity");
    }
    arg(a, "moe-token-dispatcher-type", "alltoall");
    flag(a, "moe-grouped-gemm");
}

// ---- multi-latent attention and DeepSeek routing (branch `mla`) ----

/// Multi-latent attention's options (`MLATransformerConfig`, built when
/// `--multi-latent-attention` is set; `megatron/training/arguments.py` `_add_mla_args`):
/// `--q-lora-rank` (absent: a full query projection), `--kv-lora-rank`, `--qk-head-dim`
/// (the non-rotary part, DeepSeek's `qk_nope_head_dim`), `--qk-pos-emb-head-dim` (the
/// rotary part), `--v-head-dim`, and the rotary kind: `--rope-type rope` for plain
/// rotary positions (MLA defaults to YaRN), or the `config.json`'s YaRN as `--rope-type
/// yarn --rotary-scaling-factor --mscale --mscale-all-dim` (`_add_mla_args`); its
/// `beta_fast`, `beta_slow` and `original_max_position_embeddings` have no MLA option
/// and are noted where they differ from `MLATransformerConfig`'s 32, 1 and 4096. YaRN
/// changes position values and the score scale, no size: the plan is the same.
fn mla_args(
    a: &mut Vec<Vec<String>>,
    notes: &mut Vec<String>,
    m: &crate::models::Mla,
    scaling: Option<&RopeScaling>,
) {
    flag(a, "multi-latent-attention");
    if let Some(r) = m.q_lora_rank {
        arg(a, "q-lora-rank", r);
    }
    arg(a, "kv-lora-rank", m.kv_lora_rank);
    arg(a, "qk-head-dim", m.qk_nope_head_dim);
    arg(a, "qk-pos-emb-head-dim", m.qk_rope_head_dim);
    arg(a, "v-head-dim", m.v_head_dim);
    match scaling {
        Some(r) if r.rope_type == "yarn" => {
            arg(a, "rope-type", "yarn");
            arg(a, "rotary-scaling-factor", r.factor);
            arg(a, "mscale", r.mscale.unwrap_or(1.0));
            arg(a, "mscale-all-dim", r.mscale_all_dim.unwrap_or(0.0));
            let original = r.original_max_position_embeddings.map(|x| x as f64);
            note_fixed(
                notes,
                "multi-latent attention takes",
                &[
                    ("beta_fast", r.beta_fast, 32.0),
                    ("beta_slow", r.beta_slow, 1.0),
                    ("original_max_position_embeddings", original, 4096.0),
                ],
            );
        }
        _ => arg(a, "rope-type", "rope"),
    }
}

/// DeepSeek's routing options (`TransformerConfig` fields, exposed by its argument
/// factory): `--moe-router-topk-scaling-factor` (`routed_scaling_factor`),
/// `--moe-router-num-groups` / `--moe-router-group-topk` (group-limited routing), and
/// `--moe-router-enable-expert-bias` (auxiliary-loss-free balancing, which
/// `TransformerConfig` accepts with sigmoid scores only), and `--moe-router-pre-softmax`
/// (DeepSeek-V2: softmax over all experts, then the top-k, unnormalized).
fn deepseek_router_args(a: &mut Vec<Vec<String>>, moe: &ParsedMoe) {
    if let Some(r) = moe.routed_scale {
        arg(a, "moe-router-topk-scaling-factor", r);
    }
    if let Some(g) = moe.group_limit {
        arg(a, "moe-router-num-groups", g.groups);
        arg(a, "moe-router-group-topk", g.topk_groups);
    }
    if moe.expert_bias {
        flag(a, "moe-router-enable-expert-bias");
    }
    if moe.pre_softmax {
        flag(a, "moe-router-pre-softmax");
    }
}

/// The multi-latent attention of `o` (`None` without `--multi-latent-attention`),
/// with Megatron-LM's defaults for absent options.
fn parse_mla(o: &Options) -> Result<Option<crate::models::Mla>, ParseError> {
    if !o.has("--multi-latent-attention") {
        return Ok(None);
    }
    // YaRN changes position values and the score scale, no size: either kind reads
    // back as the same planned model.
    if let Some(t) = o.value("--rope-type")? {
        if t != "rope" && t != "yarn" {
            return Err(ParseError::Inconsistent(format!(
                "--rope-type {t}: apar plans rotary positions (rope or yarn)"
            )));
        }
    }
    Ok(Some(crate::models::Mla {
        q_lora_rank: o.num("--q-lora-rank")?,
        kv_lora_rank: o.num("--kv-lora-rank")?.unwrap_or(32),
        qk_nope_head_dim: o.num("--qk-head-dim")?.unwrap_or(128),
        qk_rope_head_dim: o.num("--qk-pos-emb-head-dim")?.unwrap_or(64),
        v_head_dim: o.num("--v-head-dim")?.unwrap_or(128),
    }))
}

/// The DeepSeek routing options of `o` into `moe`.
fn parse_deepseek_router(o: &Options, moe: &mut ParsedMoe) -> Result<(), ParseError> {
    moe.routed_scale = o
        .num::<f64>("--moe-router-topk-scaling-factor")?
        .filter(|&r| r != 1.0);
    moe.group_limit = match (
        o.num::<u64>("--moe-router-num-groups")?,
        o.num::<u64>("--moe-router-group-topk")?,
    ) {
        (Some(groups), Some(topk_groups)) => Some(crate::models::GroupLimit {
            groups,
            topk_groups,
        }),
        (None, None) => None,
        _ => {
            return Err(ParseError::Inconsistent(
                "--moe-router-num-groups and --moe-router-group-topk go together".into(),
            ))
        }
    };
    moe.expert_bias = o.has("--moe-router-enable-expert-bias");
    moe.pre_softmax = o.has("--moe-router-pre-softmax");
    Ok(())
}

// ---- end of branch `mla` additions ----

/// `--moe-layer-freq` as a list expression (`1` expert layer, `0` dense), runs of
/// equal layers as `[d]*n`: `([0]*3+[1]*45)`.
fn layer_pattern(dense: &[u32], layers: u32) -> String {
    let mut runs: Vec<(u8, u32)> = Vec::new();
    for i in 0..layers {
        let d = u8::from(!dense.contains(&i));
        match runs.last_mut() {
            Some((last, n)) if *last == d => *n += 1,
            _ => runs.push((d, 1)),
        }
    }
    let terms: Vec<String> = runs
        .iter()
        .map(|&(d, n)| {
            if n == 1 {
                format!("[{d}]")
            } else {
                format!("[{d}]*{n}")
            }
        })
        .collect();
    format!("({})", terms.join("+"))
}

/// The dense layers of a `--moe-layer-freq` value: an integer `n` (layers `0, n, 2n, …`
/// have experts) or a sum of `[d, …]` / `[d, …]*n` terms, in parentheses or not, whose
/// length is `layers`.
fn parse_layer_pattern(s: &str, layers: u32) -> Result<Vec<u32>, ParseError> {
    let bad = || ParseError::BadValue {
        option: "--moe-layer-freq".into(),
        value: s.to_string(),
    };
    if let Ok(n) = s.parse::<u32>() {
        if n == 0 {
            return Err(bad());
        }
        return Ok((0..layers).filter(|i| i % n != 0).collect());
    }
    let body = s
        .strip_prefix('(')
        .and_then(|b| b.strip_suffix(')'))
        .unwrap_or(s);
    let mut pattern: Vec<bool> = Vec::new();
    for term in body.split('+') {
        let (list, times) = match term.split_once("]*") {
            Some((l, n)) => (l, n.parse::<u64>().map_err(|_| bad())?),
            None => (term.strip_suffix(']').ok_or_else(bad)?, 1),
        };
        let list = list.strip_prefix('[').ok_or_else(bad)?;
        let items: Vec<bool> = list
            .split(',')
            .map(|d| match d {
                "0" => Ok(false),
                "1" => Ok(true),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?;
        let grown = (items.len() as u64).saturating_mul(times);
        if pattern.len() as u64 + grown > u64::from(layers) {
            return Err(ParseError::Inconsistent(format!(
                "--moe-layer-freq {s} is longer than --num-layers {layers}"
            )));
        }
        for _ in 0..times {
            pattern.extend_from_slice(&items);
        }
    }
    if pattern.len() != layers as usize {
        return Err(ParseError::Inconsistent(format!(
            "--moe-layer-freq {s} has {} layers; --num-layers is {layers}",
            pattern.len()
        )));
    }
    Ok((0..layers).filter(|&i| !pattern[i as usize]).collect())
}

/// The mixture-of-experts options of `o`, a model of `layers` layers (`None`: dense).
fn parse_moe(o: &Options, layers: u32) -> Result<Option<ParsedMoe>, ParseError> {
    let Some(experts) = o.num::<u64>("--num-experts")? else {
        return Ok(None);
    };
    if experts == 0 {
        return Ok(None);
    }
    let scoring = match o.value("--moe-router-score-function")?.unwrap_or("softmax") {
        "softmax" => Scoring::Softmax,
        "sigmoid" => Scoring::Sigmoid,
        other => {
            return Err(ParseError::BadValue {
                option: "--moe-router-score-function".into(),
                value: other.into(),
            })
        }
    };
    let shared_ffn: u64 = o.num("--moe-shared-expert-intermediate-size")?.unwrap_or(0);
    let dense_layers = match o.value("--moe-layer-freq")? {
        Some(f) => parse_layer_pattern(f, layers)?,
        None => Vec::new(),
    };
    let capacity_factor: Option<f64> = o
        .num::<f64>("--moe-expert-capacity-factor")?
        .filter(|c| *c >= 0.0);
    Ok(Some(ParsedMoe {
        experts,
        // Megatron-LM's defaults: top 2, the dense intermediate size.
        topk: o.num("--moe-router-topk")?.unwrap_or(2),
        expert_ffn: match o.num("--moe-ffn-hidden-size")? {
            Some(f) => f,
            None => o.req("--ffn-hidden-size")?,
        },
        shared_ffn,
        shared_gate: shared_ffn > 0 && o.has("--moe-shared-expert-gate"),
        scoring,
        dense_layers,
        capacity_factor,
        routed_scale: None,
        group_limit: None,
        expert_bias: false,
        pre_softmax: false,
    }))
}

/// Whether `pretrain_gpt.py`'s GPT model, as this export configures it, is `m`: a
/// model feature the export writes no option for is refused (naming it) rather than
/// dropped, since the launched model would differ from the planned one.
pub(super) fn model_supported(m: &ModelConfig) -> Result<(), ExportError> {
    use crate::models::NormLayout;
    let missing = |what: &str, why: &str| Err(ExportError::unsupported(E, what, why.to_string()));
    if m.qk_norm == QkNorm::Full {
        return missing(
            "model's query/key norms over the whole projection",
            "--qk-layernorm normalizes each head (head_dim channels)",
        );
    }
    if let Position::Rotary { theta, .. } = m.position {
        // `--rotary-base` is an integer: a base that rounds below 1 cannot be written.
        if theta.round() < 1.0 {
            return Err(ExportError::unsupported(
                E,
                format!("rotary base {theta:e}"),
                "--rotary-base takes a positive integer",
            ));
        }
    }
    if m.position == Position::Alibi {
        return missing(
            "model's ALiBi positions",
            "--position-embedding-type takes learned_absolute, rope, mrope, relative or none (ALiBi is Megatron-DeepSpeed's)",
        );
    }
    if m.embed_norm {
        return missing(
            "model's norm after the embedding",
            "the GPT model has no embedding layernorm (Megatron-DeepSpeed's --embed-layernorm)",
        );
    }
    if m.parallel_residual {
        return missing(
            "model's parallel residual",
            "the GPT model of pretrain_gpt.py has no parallel-residual option",
        );
    }
    if m.norm_layout != NormLayout::Pre {
        return missing(
            "model's norm placement",
            "the GPT layer normalizes before attention and the MLP only (no sandwich or post norms)",
        );
    }
    if m.mlp == Mlp::GeGlu {
        return missing(
            "model's GeGLU MLP",
            "pretrain_gpt.py gates its MLP with SiLU (--swiglu) only",
        );
    }
    if m.attn_softcap.is_some() || m.final_softcap.is_some() {
        return missing(
            "model's logit soft-capping",
            "the GPT model has no soft-capping option",
        );
    }
    if m.embed_scale || m.attn_scale.is_some() {
        return missing(
            "model's embedding or attention-score scale",
            "the GPT model scales neither the embedding nor the scores by a configured factor",
        );
    }
    if m.sliding_window.is_some() && m.global_every == 1 {
        return missing(
            "model's window that no layer uses",
            "--window-attn-skip-freq 1 is not a pattern apar writes",
        );
    }
    if let Some(moe) = m.moe.as_deref() {
        // `--add-bias-linear` (biases unless `--disable-bias-linear`) biases every
        // linear layer alike: attention, router (`TopKRouter.bias`) and experts.
        let linears = m.mlp_bias || m.out_bias;
        if linears != (moe.router_bias && moe.expert_linear_bias) {
            return missing(
                "model's biases on some linear layers but not on the router and experts",
                "--add-bias-linear biases the attention projections, the router and the experts together",
            );
        }
        if let Some(c) = moe.clamped_swiglu {
            if c.alpha != QUICK_GELU_ALPHA {
                return missing(
                    &format!("experts' clamped SwiGLU with alpha {}", c.alpha),
                    "--quick-geglu gates with x·σ(1.702·x) (megatron/core/fusions/fused_bias_geglu.py)",
                );
            }
        }
    }
    Ok(())
}

/// The `α` of Megatron-LM's `quick_gelu`, `y·σ(1.702·y)`
/// (`megatron/core/fusions/fused_bias_geglu.py`, Megatron-LM `d98e8a6`).
const QUICK_GELU_ALPHA: f64 = 1.702;

/// gpt-oss's options (Megatron-LM `d98e8a6`, as `examples/gptoss/02_train.sh` sets
/// them): the learned sinks (`--softmax-type learnable`, `TransformerConfig.softmax_type`),
/// the window (`--window-size w-1,0`: `w - 1` keys to the left of each query, and
/// `--window-attn-skip-freq n`: one full layer after `n - 1` windowed ones, apar's
/// `global_every`), and the experts' clamped SwiGLU as `--quick-geglu` (`y·σ(1.702·y)`
/// on the gate) with `--glu-linear-offset 1` (`up + 1`) and
/// `--activation-func-clamp-value` (gate ≤ limit, up in ±limit: `mlp.py`).
fn gpt_oss_args(a: &mut Vec<Vec<String>>, m: &ModelConfig) {
    if m.attn_sinks {
        arg(a, "softmax-type", "learnable");
    }
    if let Some(w) = m.sliding_window {
        arg(a, "window-size", format!("{},0", w - 1));
        if m.global_every > 1 {
            arg(a, "window-attn-skip-freq", m.global_every);
        }
    }
    if let Some(c) = m.moe.as_deref().and_then(|moe| moe.clamped_swiglu) {
        flag(a, "quick-geglu");
        arg(a, "glu-linear-offset", 1.0);
        arg(a, "activation-func-clamp-value", c.limit);
    }
}

pub(super) fn parse(text: &str, devices: u64) -> Result<ParsedConfig, ParseError> {
    let o = Options::parse(text)?;
    let tp: u32 = o.req("--tensor-model-parallel-size")?;
    let pp: u32 = o.req("--pipeline-model-parallel-size")?;
    let cp: u32 = o.num("--context-parallel-size")?.unwrap_or(1);
    if let Some(kind) = o.value("--cp-comm-type")? {
        if kind != "p2p" {
            return Err(ParseError::Inconsistent(format!(
                "--cp-comm-type {kind}: apar plans ring attention (p2p)"
            )));
        }
    }
    let dp = exact_div(
        devices,
        u64::from(tp) * u64::from(pp) * u64::from(cp),
        "world size over tp × cp × pp",
    )?;
    let micro_batch: u32 = o.req("--micro-batch-size")?;
    let global: u64 = o.req("--global-batch-size")?;
    let num_micro_batches = exact_div(
        global,
        u64::from(dp) * u64::from(micro_batch),
        "global batch over dp × micro-batch",
    )?;
    let layers: u32 = o.req("--num-layers")?;
    let v: u32 = o
        .num("--num-virtual-stages-per-pipeline-rank")?
        .unwrap_or(1);
    // Every virtual stage holds a layer, the embedding or the head.
    if u64::from(pp) * u64::from(v) > (u64::from(layers) + 2).min(MAX_STAGES) {
        return Err(ParseError::Inconsistent(format!(
            "{pp} × {v} virtual stages for {layers} layers"
        )));
    }
    let stages = if pp <= 1 {
        Vec::new()
    } else if let Some(l) = o.value("--pipeline-model-parallel-layout")? {
        parse_layout(l)?
    } else {
        let first: Option<u32> = o.num("--decoder-first-pipeline-num-layers")?;
        let last: Option<u32> = o.num("--decoder-last-pipeline-num-layers")?;
        let mut rest = layers;
        let mut middle_ranks = pp;
        for n in [first, last].into_iter().flatten() {
            rest = rest.checked_sub(n).ok_or_else(|| {
                ParseError::Inconsistent("first/last layers exceed --num-layers".into())
            })?;
            middle_ranks -= 1;
        }
        let middle = if middle_ranks == 0 {
            0
        } else {
            exact_div(
                u64::from(rest),
                u64::from(middle_ranks),
                "middle layers over middle ranks",
            )?
        };
        let per_rank: Vec<u32> = (0..pp)
            .map(|r| match (r, first, last) {
                (0, Some(f), _) => f,
                (r, _, Some(l)) if r == pp - 1 => l,
                _ => middle,
            })
            .collect();
        let mut stages = Vec::new();
        for chunk in 0..v {
            for (r, &n) in per_rank.iter().enumerate() {
                stages.push(StageLayers {
                    embedding: chunk == 0 && r == 0,
                    layers: exact_div(u64::from(n), u64::from(v), "layers per rank over chunks")?,
                    head: chunk == v - 1 && r + 1 == pp as usize,
                });
            }
        }
        stages
    };
    if pp > 1 {
        // In u64: the stages of a mangled option may sum past u32.
        let total: u64 = stages.iter().map(|s| u64::from(s.layers)).sum();
        if total != u64::from(layers) || stages.len() % pp as usize != 0 {
            return Err(ParseError::Inconsistent(format!(
                "the pipeline cut holds {total} layers in {} stages; --num-layers is {layers}, pp {pp}",
                stages.len()
            )));
        }
    }
    let chunks = if pp > 1 { stages.len() as u32 / pp } else { 1 };
    let (recompute, recompute_layers) = match o.value("--recompute-granularity")? {
        None => (Recompute::None, None),
        Some("selective") => {
            if o.value("--recompute-method")?.is_some() {
                return Err(ParseError::Inconsistent(
                    "--recompute-method with --recompute-granularity selective".into(),
                ));
            }
            (Recompute::Selective, None)
        }
        Some("full") => match o.value("--recompute-method")? {
            Some("uniform") => (Recompute::Full, None),
            Some("block") => (Recompute::Full, Some(o.req("--recompute-num-layers")?)),
            other => {
                return Err(ParseError::BadValue {
                    option: "--recompute-method".into(),
                    value: other.unwrap_or("").into(),
                })
            }
        },
        Some(other) => {
            return Err(ParseError::BadValue {
                option: "--recompute-granularity".into(),
                value: other.into(),
            })
        }
    };
    // Megatron-LM's default is `core_attn`, which apar spells as no module set.
    let recompute_modules = match o.values("--recompute-modules") {
        Some(names) if recompute == Recompute::Selective => {
            let modules: RecomputeModules =
                names.join(",").parse().map_err(|_| ParseError::BadValue {
                    option: "--recompute-modules".into(),
                    value: names.join(" "),
                })?;
            (modules != RecomputeModules::core_attn()).then_some(modules)
        }
        _ => None,
    };
    let zero = if o.has("--use-megatron-fsdp") {
        match o.value("--data-parallel-sharding-strategy")? {
            Some("optim_grads") => 2,
            Some("optim_grads_params") | None => 3,
            Some(other) => {
                return Err(ParseError::BadValue {
                    option: "--data-parallel-sharding-strategy".into(),
                    value: other.into(),
                })
            }
        }
    } else if o.has("--use-distributed-optimizer") {
        1
    } else {
        0
    };
    let fp8 = match o.value("--fp8-format")? {
        None => false,
        Some("hybrid" | "e4m3") => true,
        Some(other) => {
            return Err(ParseError::BadValue {
                option: "--fp8-format".into(),
                value: other.into(),
            })
        }
    };
    let moe = match parse_moe(&o, layers)? {
        Some(mut moe) => {
            parse_deepseek_router(&o, &mut moe)?;
            Some(moe)
        }
        None => None,
    };
    // Megatron-LM's default expert-tensor degree is the tensor-parallel degree.
    let (ep, etp) = match moe {
        Some(_) => (
            o.num("--expert-model-parallel-size")?.unwrap_or(1),
            o.num("--expert-tensor-parallel-size")?.unwrap_or(tp),
        ),
        None => (1, 1),
    };
    Ok(ParsedConfig {
        dp,
        tp,
        pp,
        cp,
        ep,
        etp,
        micro_batch,
        num_micro_batches,
        sp: tp > 1 && o.has("--sequence-parallel"),
        recompute,
        recompute_layers,
        recompute_modules,
        zero,
        low_prec_shard: zero >= 3,
        schedule: (pp > 1).then_some(if chunks > 1 {
            Schedule::Interleaved(chunks)
        } else {
            Schedule::OneFOneB
        }),
        stages,
        fp8,
        moe,
        mla: parse_mla(&o)?,
    })
}

/// Megatron-LM's options for a `config.json`'s rotary scaling: Llama 3's is
/// `--use-rope-scaling --rope-scaling-factor` (`RotaryEmbedding._apply_scaling`, whose
/// other parameters are fixed at low 1, high 4 and 8192 original positions: others are
/// noted), linear interpolation by an integer factor
/// `--rotary-seq-len-interpolation-factor` (positions divided by it); other kinds are
/// noted for the user to add.
fn rope_scaling_args(a: &mut Vec<Vec<String>>, notes: &mut Vec<String>, r: &RopeScaling) {
    match r.rope_type.as_str() {
        "llama3" => {
            flag(a, "use-rope-scaling");
            arg(a, "rope-scaling-factor", r.factor);
            let original = r.original_max_position_embeddings.map(|x| x as f64);
            note_fixed(
                notes,
                "llama3 scaling fixes it at",
                &[
                    ("low_freq_factor", r.low_freq_factor, 1.0),
                    ("high_freq_factor", r.high_freq_factor, 4.0),
                    ("original_max_position_embeddings", original, 8192.0),
                ],
            );
        }
        "linear" if r.factor.fract() == 0.0 => {
            arg(a, "rotary-seq-len-interpolation-factor", r.factor);
        }
        other => notes.push(format!(
            "the plan prices the rotary embedding, not its frequencies: add the checkpoint's \
             `{other}` rope scaling (factor {}) by hand",
            r.factor
        )),
    }
}

/// Notes each rotary-scaling parameter `(key, the config.json's value, Megatron-LM's)`
/// that the file sets to something other than the one Megatron-LM has no option for.
fn note_fixed(notes: &mut Vec<String>, megatron_does: &str, fixed: &[(&str, Option<f64>, f64)]) {
    for &(key, value, megatron) in fixed {
        if let Some(v) = value.filter(|&v| v != megatron) {
            notes.push(format!(
                "rope_scaling {key} is {v}; Megatron-LM's {megatron_does} {megatron}"
            ));
        }
    }
}
