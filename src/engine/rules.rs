//! What each engine can run: [`Engine::allows`] says whether an engine runs a
//! configuration (and why not, as a typed [`Unsupported`]); [`Engine::cuts`] lists the
//! layer placements on pipeline stages the engine can express.
//!
//! Every rule below was read from the engine's own source at the version named here
//! (read, not copied):
//!
//! * **Megatron-LM**, `main` at commit `d98e8a6` (2026-08-22, after `core_v0.19.0`):
//!   `megatron/core/pipeline_parallel/schedules.py` (`get_forward_backward_func`: no
//!   pipelining, 1F1B "without interleaving", or 1F1B "with interleaving"; the
//!   interleaved schedule checks `microbatch_group_size_per_vp_stage`, which defaults
//!   to `pp` in `model_parallel_config.py`, so `m` must be a multiple of `pp`);
//!   `megatron/training/arguments.py` (`validate_args`: with
//!   `--overlap-p2p-communication`, on by default, interleaving needs `pp > 1`;
//!   Megatron-FSDP `--data-parallel-sharding-strategy optim_grads | optim_grads_params`;
//!   sequence parallelism is switched off when `tp = 1`);
//!   `megatron/core/transformer/transformer_block.py` (`get_num_layers_to_build`: layers
//!   split evenly over pipeline ranks, or `--decoder-first/last-pipeline-num-layers`
//!   with the rest even; each rank's layers split evenly over its virtual stages);
//!   `megatron/core/transformer/pipeline_parallel_layer_layout.py`
//!   (`--pipeline-model-parallel-layout`: any contiguous placement of the embedding,
//!   the layers and the loss on the `pp · v` virtual stages);
//!   `megatron/core/transformer/transformer_config.py` (uneven first/last stages must be
//!   positive multiples of the virtual-stage count, middle ranks too;
//!   `recompute_num_layers` must be `None` with selective granularity);
//!   `megatron/core/distributed/fsdp/mcore_fsdp_adapter.py` (Megatron-FSDP v2 refuses
//!   `pipeline_model_parallel_size != 1`; the repository's Megatron-FSDP test cases run
//!   it with TP, e.g. `gpt3_mcore_te_tp2_zp_z3_resume_fsdp_dtensor`, never with PP).
//! * **DeepSpeed** 0.19.6 (`version.txt`, commit `edaa722`):
//!   `deepspeed/runtime/pipe/engine.py` (`PipelineEngine.__init__` asserts "ZeRO-2 and
//!   ZeRO-3 are incompatible with pipeline parallelism"); `deepspeed/runtime/pipe/schedule.py`
//!   (`TrainSchedule`, the only training schedule: 1F1B, no model chunks);
//!   `deepspeed/runtime/pipe/module.py` (`_partition_layers`, method `uniform` with
//!   `deepspeed/runtime/utils.py::partition_uniform`; `activation_checkpoint_interval`,
//!   whole layers); `deepspeed/runtime/engine.py` (`_configure_tensor_parallel_states`:
//!   "AutoTP + ZeRO stage 3 is supported for both inference and training");
//!   `docs/_tutorials/autotp-training.md` (AutoTP combines TP with data parallelism and
//!   ZeRO, no pipeline); `deepspeed/sequence/layer.py` (`DistributedAttention`: its
//!   sequence parallelism is Ulysses all-to-all, not Megatron's). apar models
//!   DeepSpeed's own features, not the Megatron-DeepSpeed fork: AutoTP without
//!   pipelining, no Megatron-style sequence parallelism, checkpointing of whole layers.
//! * **torchtitan** `main` at commit `b5bcd76` (2026-08-21; PyPI 0.3.0) and PyTorch 2.15
//!   `torch/distributed/pipelining/schedules.py`: `torchtitan/config/configs.py`
//!   (`ParallelismConfig`: `data_parallel_replicate_degree` × `data_parallel_shard_degree`,
//!   `fsdp_reshard_after_forward` always/never, `enable_sequence_parallel` (optional
//!   with TP), `module_fqns_per_model_part` (any contiguous modules per stage),
//!   `pipeline_parallel_schedule` GPipe, 1F1B, Interleaved1F1B, ...);
//!   `torchtitan/models/llama3/parallelize.py` (FSDP2 `fully_shard` on every data-parallel
//!   layout; no optimizer-only sharding); `torchtitan/distributed/activation_checkpoint.py`
//!   (`none`, `selective`, `full`; per-layer selective checkpoints every N-th layer, not
//!   the first `k`); `Schedule1F1B.__init__` raises when `n_microbatches < num_stages`.
//! * **Hugging Face Transformers** 5.23 `Trainer` with PyTorch FSDP
//!   (`transformers/trainer_utils.py::FSDPOption`: `full_shard`, `shard_grad_op`,
//!   `no_shard`; `gradient_checkpointing` wraps whole decoder layers). No pipeline
//!   parallelism; apar does not model tensor parallelism for this engine (Transformers'
//!   `tp_plan` through Accelerate's `ParallelismConfig` is a separate path).

use super::Engine;
use crate::engine::memory::PrecisionError;
use crate::lower::StageSpan;
use crate::passes::{Config, Recompute, RecomputeModule, RecomputeModules, Schedule};
use crate::train::precision::{Fp8Recipe, TORCHAO_FP8, TRANSFORMER_ENGINE_FP8};
use thiserror::Error;

impl Engine {
    /// How this engine trains with FP8 compute, or why it does not.
    ///
    /// * Megatron-LM: Transformer Engine with `--fp8-format hybrid`
    ///   ([`TRANSFORMER_ENGINE_FP8`]; `fp8` in `transformer_config.py`, `d98e8a6`).
    /// * torchtitan: torchao's `Float8Linear` through `Float8LinearConverter`
    ///   ([`TORCHAO_FP8`]; `torchtitan/components/quantization/float8.py`, `b5bcd76`).
    /// * DeepSpeed 0.19.6: its configuration has `fp16` and `bf16` sections and no FP8
    ///   one (no `fp8` under `deepspeed/runtime/`); FP8 there is the user's own
    ///   Transformer Engine model code, which apar does not see.
    /// * Hugging Face + FSDP: the `Trainer` arguments apar exports have no FP8 switch
    ///   (FP8 is Accelerate's `mixed_precision="fp8"` with a backend choice, not
    ///   modelled).
    ///
    /// # Errors
    ///
    /// [`PrecisionError::Fp8Engine`] for DeepSpeed and Hugging Face.
    pub fn fp8(self) -> Result<Fp8Recipe, PrecisionError> {
        match self {
            Engine::Megatron => Ok(TRANSFORMER_ENGINE_FP8),
            Engine::Torchtitan => Ok(TORCHAO_FP8),
            Engine::DeepSpeed => Err(PrecisionError::Fp8Engine {
                engine: self,
                why: "DeepSpeed 0.19.6's configuration has fp16 and bf16 sections and no fp8 one",
            }),
            Engine::Hf => Err(PrecisionError::Fp8Engine {
                engine: self,
                why: "the Trainer arguments apar exports have no fp8 option (Accelerate's mixed_precision=fp8 is not modelled)",
            }),
        }
    }
}

/// Why an engine cannot run a configuration.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum Unsupported {
    /// The engine has no such pipeline schedule.
    #[error("{engine} has no {schedule} pipeline schedule ({offers})")]
    Schedule {
        /// The engine.
        engine: Engine,
        /// The schedule asked for (`gpipe`, `interleaved`).
        schedule: &'static str,
        /// What the engine offers instead.
        offers: &'static str,
    },
    /// The engine has no pipeline parallelism.
    #[error("{engine} has no pipeline parallelism (pp {pp}); it runs pp 1 only")]
    Pipeline {
        /// The engine.
        engine: Engine,
        /// Pipeline stages asked for.
        pp: u32,
    },
    /// The engine has no tensor parallelism in this combination.
    #[error("{engine} runs no tensor parallelism (tp {tp}) {context}")]
    TensorParallel {
        /// The engine.
        engine: Engine,
        /// Tensor-parallel degree asked for.
        tp: u32,
        /// When (`at all`, `with pipeline parallelism`).
        context: &'static str,
    },
    /// The engine has no Megatron-style sequence parallelism.
    #[error("{engine} has no Megatron-style sequence parallelism on the tensor-parallel group")]
    SequenceParallel {
        /// The engine.
        engine: Engine,
    },
    /// The engine has no such ZeRO stage, or not with pipelining.
    #[error("{engine} runs no ZeRO stage {zero}{}", if *.pp > 1 { format!(" with pipeline parallelism (pp {pp})", pp = .pp) } else { String::new() })]
    Zero {
        /// The engine.
        engine: Engine,
        /// The ZeRO stage asked for.
        zero: u8,
        /// Pipeline stages.
        pp: u32,
    },
    /// No engine shards the low-precision parameters without also sharding gradients
    /// (that is ZeRO-3).
    #[error("{engine} cannot shard the low-precision parameters alone (ZeRO {zero}); ZeRO-3 shards them with the gradients")]
    LowPrecShard {
        /// The engine.
        engine: Engine,
        /// The ZeRO stage asked for.
        zero: u8,
    },
    /// The engine has no such recomputation policy.
    #[error("{engine} has no {recompute} recomputation")]
    Recompute {
        /// The engine.
        engine: Engine,
        /// The policy asked for.
        recompute: Recompute,
    },
    /// The engine cannot recompute only the first `k` layers of each stage with this
    /// policy.
    #[error("{engine} cannot recompute only the first {k} layers of each stage with {recompute} recomputation")]
    RecomputeLayers {
        /// The engine.
        engine: Engine,
        /// Layers asked for.
        k: u32,
        /// The policy.
        recompute: Recompute,
    },
    /// The engine cannot recompute this set of modules (Megatron-LM's
    /// `--recompute-modules`).
    #[error("{engine} cannot recompute the modules {modules}: {why}")]
    RecomputeModules {
        /// The engine.
        engine: Engine,
        /// The modules asked for.
        modules: RecomputeModules,
        /// Why not.
        why: &'static str,
    },
    /// The engine cannot place the model's layers on these stages.
    #[error("{engine} cannot place {layers} layers on {pp} pipeline stages × {chunks} virtual stages{}", placement_hint(*.engine))]
    LayerSplit {
        /// The engine.
        engine: Engine,
        /// Transformer layers (the units the engine places).
        layers: usize,
        /// Pipeline stages.
        pp: u32,
        /// Virtual stages per pipeline stage.
        chunks: u32,
    },
    /// The engine has no ring-attention context parallelism.
    #[error("{engine} has no ring-attention context parallelism (cp {cp}): {why}")]
    ContextParallel {
        /// The engine.
        engine: Engine,
        /// Context-parallel degree asked for.
        cp: u32,
        /// Why not, and what it has instead.
        why: &'static str,
    },
    /// The engine cannot lay the experts out this way.
    #[error("{engine} cannot run experts at ep {ep}, etp {etp}: {why}")]
    ExpertParallel {
        /// The engine.
        engine: Engine,
        /// Expert-parallel degree asked for.
        ep: u32,
        /// Expert-tensor-parallel degree asked for.
        etp: u32,
        /// Why not.
        why: &'static str,
    },
    /// The schedule needs at least as many micro-batches as stages.
    #[error("{engine}'s 1F1B schedule needs at least as many micro-batches ({m}) as pipeline stages ({pp})")]
    MicroBatches {
        /// The engine.
        engine: Engine,
        /// Micro-batches per step.
        m: u32,
        /// Pipeline stages.
        pp: u32,
    },
}

fn placement_hint(engine: Engine) -> &'static str {
    match engine {
        Engine::Megatron => " (every middle virtual stage needs a layer; the first and last may hold only the embedding or the loss)",
        Engine::Torchtitan => " (every middle stage needs a layer)",
        Engine::DeepSpeed | Engine::Hf => "",
    }
}

/// The blocks of a model as a pipeline cut sees them: how many there are and which
/// of them are transformer layers (the units engines place on stages). Blocks before
/// the first layer go with the first stage; a non-layer block after a layer goes with
/// that layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    /// Blocks in model order.
    pub blocks: usize,
    /// Block index of each layer, increasing.
    pub layers: Vec<usize>,
    /// Routed experts per mixture-of-experts layer (0: a dense model): what the
    /// expert-parallel degrees are listed from.
    pub experts: u64,
}

impl BlockLayout {
    /// The usual transformer: an embedding block, `layers` layer blocks, a head block.
    pub fn transformer(layers: usize) -> BlockLayout {
        BlockLayout {
            blocks: layers + 2,
            layers: (1..=layers).collect(),
            experts: 0,
        }
    }

    /// Spans of the virtual stages holding `counts[k]` layers each, in order. Stage 0
    /// also takes the blocks before the first layer, the last stage the blocks after
    /// the last layer. `None` when the counts do not add up to the layers or a stage
    /// would be empty.
    pub fn spans(&self, counts: &[usize]) -> Option<Vec<StageSpan>> {
        if counts.iter().sum::<usize>() != self.layers.len() || counts.is_empty() {
            return None;
        }
        let last_stage = counts.len() - 1;
        let mut spans = Vec::with_capacity(counts.len());
        let mut next_layer = 0;
        let mut first = 0;
        for (k, &n) in counts.iter().enumerate() {
            next_layer += n;
            let last = if k == last_stage {
                self.blocks.checked_sub(1)?
            } else {
                // Up to the block before the next layer (the last stage takes the
                // blocks after the last layer).
                match self.layers.get(next_layer) {
                    Some(b) => b.checked_sub(1)?,
                    None => *self.layers.last()?,
                }
            };
            if last < first {
                return None;
            }
            spans.push(StageSpan { first, last });
            first = last + 1;
        }
        Some(spans)
    }
}

/// DeepSpeed's `partition_uniform(num_items, num_parts)`: part boundaries, the first
/// `num_items mod num_parts` parts one item larger (or one item each while items last).
fn partition_uniform(items: usize, parts: usize) -> Vec<usize> {
    if items <= parts {
        return (0..=parts).map(|p| p.min(items)).collect();
    }
    let (size, extra) = (items / parts, items % parts);
    (0..=parts).map(|p| p * size + p.min(extra)).collect()
}

/// Per-rank layer counts `(f, k, …, k, l)` (`pp ≥ 2` ranks) that add up to `units`,
/// with the middle count `k` within one step of the even split and every count a
/// multiple of `step` of at least `min_end` (ends) or `step` (middle).
fn first_last_splits(units: usize, ranks: usize, step: usize, min_end: usize) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    if ranks < 2 || step == 0 || units % step != 0 {
        return out;
    }
    let u = units / step;
    let middle = ranks - 2;
    let even = u / ranks;
    let ks: Vec<usize> = if middle == 0 {
        vec![0]
    } else {
        (even.saturating_sub(1).max(1)..=even + 1).collect()
    };
    let min_end = min_end.div_ceil(step);
    for k in ks {
        let Some(ends) = u.checked_sub(middle * k) else {
            continue;
        };
        if ends < 2 * min_end {
            continue;
        }
        for f in min_end..=ends - min_end {
            let mut counts = Vec::with_capacity(ranks);
            counts.push(f * step);
            counts.extend(std::iter::repeat_n(k * step, middle));
            counts.push((ends - f) * step);
            out.push(counts);
        }
    }
    out
}

/// `units` layers over `parts` virtual stages as evenly as a layout can place them:
/// `⌊units / parts⌋` each, the remainder one more on middle stages spread over the
/// pipeline (the end stages also hold the embedding and the loss), then on the last
/// and first. Every middle stage gets a layer; `None` when there are too few layers for
/// that, or fewer than three stages (the first/last splits cover those).
fn balanced_split(units: usize, parts: usize) -> Option<Vec<usize>> {
    if parts < 3 || units < parts - 2 {
        return None;
    }
    let middle = parts - 2;
    let mut counts = vec![units / parts; parts];
    let mut extra = units % parts;
    if counts[0] == 0 {
        // Fewer layers than stages: one per middle stage first.
        counts[1..=middle].iter_mut().for_each(|c| *c = 1);
        extra = units - middle;
    }
    let on_middle = extra.min(middle);
    for j in 0..on_middle {
        counts[1 + j * middle / on_middle] += 1;
    }
    extra -= on_middle;
    if extra > 0 {
        counts[parts - 1] += 1;
        extra -= 1;
    }
    if extra > 0 {
        counts[0] += 1;
    }
    Some(counts)
}

/// Why Megatron-LM does not run selective recomputation of `modules` with policy
/// `recompute` as apar models it (`None`: it does). From `transformer_config.py` and
/// `transformer_layer.py` at `d98e8a6`: `recompute_modules` is read only with
/// `--recompute-granularity selective`; `moe_act`, `moe`, `shared_experts` and
/// `mla_up_proj` act on mixture-of-experts and multi-latent-attention layers, which apar
/// does not build; `layernorm` recomputes `input_layernorm` and `pre_mlp_layernorm`
/// only where they are modules of their own, and the default Transformer Engine layer
/// (`get_gpt_layer_with_transformer_engine_submodules`, `--transformer-impl
/// transformer_engine`) fuses both into `linear_qkv` and `linear_fc1`
/// (`TELayerNormColumnParallelLinear`) and leaves them `IdentityOp` on dense layers.
fn megatron_modules_refusal(
    recompute: Recompute,
    modules: RecomputeModules,
) -> Option<&'static str> {
    if recompute != Recompute::Selective {
        return Some("--recompute-modules is read only with --recompute-granularity selective");
    }
    if modules.iter().any(|m| !m.is_modelled()) {
        return Some("moe_act, moe, shared_experts and mla_up_proj need mixture-of-experts or multi-latent-attention layers, which apar does not build yet");
    }
    if modules.contains(RecomputeModule::Layernorm) {
        return Some("Megatron-LM's Transformer Engine layer fuses the input and pre-MLP norms into linear_qkv and linear_fc1 (IdentityOp norms on dense layers), so layernorm recomputes nothing there");
    }
    None
}

impl Engine {
    /// The module sets this engine offers for selective recomputation besides its own
    /// selective policy, which the candidate space lists beside each selective
    /// candidate ([`crate::passes::candidates::enumerate_for`]).
    ///
    /// Megatron-LM: `mlp` and `core_attn,mlp`. `core_attn` alone is its default (the
    /// plain selective candidate). The MLP holds most of a layer's saved tensors once
    /// the attention core is gone (its input, the gate/up outputs, the activation and
    /// the product: `2sbh + 8sbf` bytes of a SwiGLU layer's `~2sbh·(5 + …)`), so
    /// recomputing it is the step between the attention core and the whole layer;
    /// with flash attention `core_attn` recomputes nothing (Megatron-LM warns that it
    /// is not needed with fused attention), so `mlp` alone is the set that runs there
    /// and `core_attn,mlp` the one for unfused attention (apar refuses a module that
    /// recomputes nothing, so only one of the two compiles for a given model).
    /// `layernorm` is left out: it recomputes nothing on Megatron-LM's Transformer
    /// Engine dense layers (see [`Unsupported::RecomputeModules`]). Other engines: none.
    pub fn recompute_module_sets(self) -> Vec<RecomputeModules> {
        use RecomputeModule::{CoreAttn, Mlp};
        match self {
            Engine::Megatron => [vec![Mlp], vec![CoreAttn, Mlp]]
                .into_iter()
                .filter_map(RecomputeModules::new)
                .collect(),
            Engine::DeepSpeed | Engine::Torchtitan | Engine::Hf => Vec::new(),
        }
    }

    /// The module set this engine's own selective policy is, when it is one:
    /// Megatron-LM's `core_attn` (`recompute_modules = ["core_attn"]` when unset).
    pub fn default_recompute_modules(self) -> Option<RecomputeModules> {
        match self {
            Engine::Megatron => Some(RecomputeModules::core_attn()),
            Engine::DeepSpeed | Engine::Torchtitan | Engine::Hf => None,
        }
    }

    /// Why this engine takes no `--recompute-modules` (`None` for Megatron-LM).
    fn no_modules_reason(self) -> Option<&'static str> {
        match self {
            Engine::Megatron => None,
            Engine::DeepSpeed => Some("DeepSpeed's activation checkpointing wraps whole layers (no per-module sets)"),
            Engine::Torchtitan => Some("torchtitan's selective checkpointing is per layer or per op (activation_checkpoint.mode), not by Megatron-LM module"),
            Engine::Hf => Some("Hugging Face gradient checkpointing wraps whole decoder layers"),
        }
    }

    /// Whether this engine runs `c` on a model whose pipeline sees `model`.
    ///
    /// Checks only what depends on the engine; [`crate::lower::compile::Compiler::check`]
    /// checks the rest (degrees, batch, divisibility of heads) first.
    ///
    /// # Errors
    ///
    /// The first rule of the engine that `c` breaks, as an [`Unsupported`] (the module
    /// documentation names each rule's source).
    pub fn allows(self, c: &Config, model: &BlockLayout) -> Result<(), Unsupported> {
        match self.refusals(c, model).into_iter().next() {
            Some(first) => Err(first),
            None => Ok(()),
        }
    }

    /// Every rule of this engine that `c` breaks, in the order [`Engine::allows`]
    /// checks them (empty when the engine runs `c`).
    pub fn refusals(self, c: &Config, model: &BlockLayout) -> Vec<Unsupported> {
        let engine = self;
        let mut out = Vec::new();
        let pipelined = c.pp > 1;
        // Shared by all four: no engine shards the bf16 weights while keeping full
        // gradients (DeepSpeed ZeRO-1/2, Megatron's distributed optimizer, FSDP's
        // SHARD_GRAD_OP and FSDP2 all keep or gather them with the gradients).
        if c.low_prec_shard && c.zero < 3 {
            out.push(Unsupported::LowPrecShard {
                engine,
                zero: c.zero,
            });
        }
        match self {
            Engine::Megatron => {
                if c.schedule == Schedule::Gpipe && pipelined {
                    out.push(Unsupported::Schedule {
                        engine,
                        schedule: "gpipe",
                        offers: "1F1B or interleaved 1F1B",
                    });
                }
                if c.zero >= 2 && pipelined {
                    out.push(Unsupported::Zero {
                        engine,
                        zero: c.zero,
                        pp: c.pp,
                    });
                }
                if let (Some(k), Recompute::Selective) = (c.recompute_layers, c.recompute) {
                    out.push(Unsupported::RecomputeLayers {
                        engine,
                        k,
                        recompute: c.recompute,
                    });
                }
                if model.experts > 0 && c.tp > 1 && !c.sp {
                    // `MoELayer.forward` raises during training when the attention's
                    // tensor-parallel group has more than one rank and
                    // `sequence_parallel` is off (megatron/core/transformer/moe/moe_layer.py).
                    out.push(Unsupported::ExpertParallel {
                        engine,
                        ep: c.ep,
                        etp: c.etp,
                        why: "MoELayer.forward refuses tensor parallelism without --sequence-parallel",
                    });
                }
                if let Some(modules) = c.recompute_modules {
                    if let Some(why) = megatron_modules_refusal(c.recompute, modules) {
                        out.push(Unsupported::RecomputeModules {
                            engine,
                            modules,
                            why,
                        });
                    }
                }
            }
            Engine::DeepSpeed => {
                match c.schedule {
                    Schedule::Gpipe if pipelined => out.push(Unsupported::Schedule {
                        engine,
                        schedule: "gpipe",
                        offers: "TrainSchedule, a 1F1B schedule",
                    }),
                    Schedule::Interleaved(_) => out.push(Unsupported::Schedule {
                        engine,
                        schedule: "interleaved",
                        offers: "TrainSchedule, a 1F1B schedule without model chunks",
                    }),
                    _ => {}
                }
                if c.zero >= 2 && pipelined {
                    out.push(Unsupported::Zero {
                        engine,
                        zero: c.zero,
                        pp: c.pp,
                    });
                }
                if c.tp > 1 && pipelined {
                    out.push(Unsupported::TensorParallel {
                        engine,
                        tp: c.tp,
                        context: "with pipeline parallelism (AutoTP combines TP with data parallelism and ZeRO only)",
                    });
                }
                if c.sp {
                    out.push(Unsupported::SequenceParallel { engine });
                }
                if c.cp > 1 {
                    out.push(Unsupported::ContextParallel {
                        engine,
                        cp: c.cp,
                        why: "DeepSpeed-Ulysses splits the sequence with all-to-all over attention heads, a different scheme",
                    });
                }
                if c.recompute == Recompute::Selective {
                    out.push(Unsupported::Recompute {
                        engine,
                        recompute: c.recompute,
                    });
                }
                if let Some(k) = c.recompute_layers {
                    out.push(Unsupported::RecomputeLayers {
                        engine,
                        k,
                        recompute: c.recompute,
                    });
                }
                if model.experts > 0 && c.zero >= 3 {
                    // `DeepSpeedEngine` raises for `deepspeed.moe.layer.MoE` layers at
                    // stage 3 ("Native DeepSpeed MoE is not supported with ZeRO Stage
                    // 3", deepspeed/runtime/engine.py, 0.19.8); its AutoEP layers are
                    // another dispatcher apar does not model.
                    out.push(Unsupported::ExpertParallel {
                        engine,
                        ep: c.ep,
                        etp: c.etp,
                        why: "DeepSpeed's engine refuses its native mixture-of-experts layers at ZeRO stage 3",
                    });
                }
            }
            Engine::Torchtitan => {
                // `parallelize_llama` applies FSDP over the `dp_shard_cp` mesh whenever
                // context parallelism is on: parameters, gradients and optimizer
                // states are sharded over dp_shard × cp (ZeRO-2/3), never replicated.
                if c.cp > 1 && c.zero < 2 {
                    out.push(Unsupported::ContextParallel {
                        engine,
                        cp: c.cp,
                        why: "it shards with FSDP over the dp_shard × cp mesh whenever cp > 1 (ZeRO-2 or 3)",
                    });
                }
                if c.zero == 1 {
                    out.push(Unsupported::Zero {
                        engine,
                        zero: c.zero,
                        pp: 1,
                    });
                }
                // `ParallelismConfig` has `expert_parallel_degree` and no expert-tensor
                // degree: the sparse region is efsdp × ep over the dense region's
                // dp_shard × cp × tp ranks (torchtitan/config/configs.py, b5bcd76).
                if c.etp > 1 {
                    out.push(Unsupported::ExpertParallel {
                        engine,
                        ep: c.ep,
                        etp: c.etp,
                        why: "its ParallelismConfig has expert_parallel_degree but no expert-tensor-parallel degree",
                    });
                }
                if c.ep > 1 && c.zero < 2 && (c.tp * c.cp) % c.ep != 0 {
                    out.push(Unsupported::ExpertParallel {
                        engine,
                        ep: c.ep,
                        etp: c.etp,
                        why: "expert parallelism borrows ranks from dp_shard × cp × tp, and without FSDP dp_shard is 1",
                    });
                }
                if c.schedule == Schedule::OneFOneB && pipelined && c.num_micro_batches < c.pp {
                    out.push(Unsupported::MicroBatches {
                        engine,
                        m: c.num_micro_batches,
                        pp: c.pp,
                    });
                }
                if let Some(k) = c.recompute_layers {
                    out.push(Unsupported::RecomputeLayers {
                        engine,
                        k,
                        recompute: c.recompute,
                    });
                }
            }
            Engine::Hf => {
                if pipelined {
                    out.push(Unsupported::Pipeline { engine, pp: c.pp });
                }
                if c.cp > 1 {
                    out.push(Unsupported::ContextParallel {
                        engine,
                        cp: c.cp,
                        why: "the Trainer with FSDP splits no sequence",
                    });
                }
                if c.tp > 1 {
                    out.push(Unsupported::TensorParallel {
                        engine,
                        tp: c.tp,
                        context: "at all (apar plans data parallelism with FSDP for it)",
                    });
                }
                if c.ep > 1 || c.etp > 1 {
                    out.push(Unsupported::ExpertParallel {
                        engine,
                        ep: c.ep,
                        etp: c.etp,
                        why: "the Trainer with FSDP has no expert parallelism",
                    });
                }
                if c.zero == 1 {
                    out.push(Unsupported::Zero {
                        engine,
                        zero: c.zero,
                        pp: c.pp,
                    });
                }
                if c.recompute == Recompute::Selective {
                    out.push(Unsupported::Recompute {
                        engine,
                        recompute: c.recompute,
                    });
                }
                if let Some(k) = c.recompute_layers {
                    out.push(Unsupported::RecomputeLayers {
                        engine,
                        k,
                        recompute: c.recompute,
                    });
                }
            }
        }
        if let (Some(modules), Some(why)) = (c.recompute_modules, self.no_modules_reason()) {
            out.push(Unsupported::RecomputeModules {
                engine,
                modules,
                why,
            });
        }
        if (pipelined || c.schedule.chunks() > 1) && !self.can_split(c, model) {
            out.push(Unsupported::LayerSplit {
                engine,
                layers: model.layers.len(),
                pp: c.pp,
                chunks: c.schedule.chunks(),
            });
        }
        out
    }

    /// Whether [`Engine::cuts`] is non-empty, in `O(1)`.
    fn can_split(self, c: &Config, model: &BlockLayout) -> bool {
        let (units, pp, v) = (
            model.layers.len(),
            c.pp as usize,
            c.schedule.chunks() as usize,
        );
        if pp <= 1 {
            // No engine interleaves chunks without pipeline parallelism.
            return v <= 1;
        }
        match self {
            // `--pipeline-model-parallel-layout` places any contiguous cut (and the
            // per-rank forms, positive multiples of v on every rank, are a subset);
            // as with torchtitan, middle virtual stages need a layer and the ends may
            // hold only the embedding or the loss.
            Engine::Megatron | Engine::Torchtitan => units + 2 >= pp * v,
            // One item per stage at least (the items are the blocks).
            Engine::DeepSpeed => v == 1 && model.blocks >= pp,
            Engine::Hf => false,
        }
    }

    /// The cuts of `model` into `c`'s `pp · v` virtual stages that this engine can
    /// express, in a fixed order (virtual stage `k` is chunk `k / pp` of pipeline rank
    /// `k mod pp`). Empty when it can express none.
    ///
    /// * Megatron-LM: per-rank layer counts `(f, k, …, k, l)`, the even split
    ///   (`f = k = l`) or `--decoder-first/last-pipeline-num-layers` `f` and `l`, each a
    ///   positive multiple of `v` and split evenly over the rank's `v` virtual stages;
    ///   then per-virtual-stage counts `(f, k, …, k, l)` as for torchtitan, which
    ///   `--pipeline-model-parallel-layout` spells out (`validate_layer_layout` asks
    ///   only that the embedding come first, the loss last, and every layer once). These
    ///   include `--account-for-embedding-in-pipeline-split` /
    ///   `--account-for-loss-in-pipeline-split` (`get_num_layers_to_build`: the first
    ///   virtual stage holds one layer fewer for the embedding, the last one fewer for
    ///   the loss), the placement the Llama 3 paper describes (Dubey et al. 2024,
    ///   Sec. 3.3.2: one layer fewer on the first and last stages). apar lists the
    ///   middle count `k` within one step of the even split, and of the layouts only
    ///   those whose first and last virtual stages hold at most `k` layers (they also
    ///   hold the embedding and the loss).
    /// * torchtitan (`module_fqns_per_model_part`, any contiguous modules per stage):
    ///   per-virtual-stage counts `(f, k, …, k, l)` with `f, l ≥ 0` (the first and last
    ///   stages also hold the embedding and the head), `k` as above.
    /// * DeepSpeed: `partition_method="uniform"` over the blocks (one `LayerSpec` each).
    /// * Hugging Face: no pipeline, the single whole-model stage.
    pub fn cuts(self, c: &Config, model: &BlockLayout) -> Vec<Vec<StageSpan>> {
        let (pp, v) = (c.pp.max(1) as usize, c.schedule.chunks() as usize);
        let parts = pp * v;
        let whole = || {
            (model.blocks > 0).then(|| {
                vec![StageSpan {
                    first: 0,
                    last: model.blocks - 1,
                }]
            })
        };
        if parts == 1 {
            return whole().into_iter().collect();
        }
        if !self.can_split(c, model) {
            return Vec::new();
        }
        let units = model.layers.len();
        match self {
            Engine::Megatron => {
                let mut per_stage: Vec<Vec<usize>> = first_last_splits(units, pp, v, v)
                    .into_iter()
                    .map(|per_rank| (0..parts).map(|k| per_rank[k % pp] / v).collect())
                    .collect();
                // The ends also hold the embedding and the loss: no more layers than a
                // middle virtual stage.
                let ends_light =
                    |s: &Vec<usize>| parts < 3 || (s[0] <= s[1] && s[parts - 1] <= s[1]);
                let layouts = first_last_splits(units, parts, 1, 0)
                    .into_iter()
                    .filter(|s| ends_light(s))
                    .chain(balanced_split(units, parts));
                for s in layouts {
                    if !per_stage.contains(&s) {
                        per_stage.push(s);
                    }
                }
                per_stage.iter().filter_map(|s| model.spans(s)).collect()
            }
            Engine::Torchtitan => first_last_splits(units, parts, 1, 0)
                .into_iter()
                .filter_map(|per_stage| model.spans(&per_stage))
                .collect(),
            Engine::DeepSpeed => {
                let bounds = partition_uniform(model.blocks, pp);
                let spans: Vec<StageSpan> = bounds
                    .windows(2)
                    .map(|w| StageSpan {
                        first: w[0],
                        last: w[1].saturating_sub(1),
                    })
                    .collect();
                if spans.iter().all(|s| s.last >= s.first) && bounds[0] == 0 {
                    vec![spans]
                } else {
                    Vec::new()
                }
            }
            Engine::Hf => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Layers of `model` inside span `s`.
    fn layers_in(model: &BlockLayout, s: &StageSpan) -> usize {
        model
            .layers
            .iter()
            .filter(|&&b| b >= s.first && b <= s.last)
            .count()
    }

    fn config(pp: u32, schedule: Schedule, m: u32) -> Config {
        Config {
            schedule,
            ..Config::new(1, 1, pp, 1, m)
        }
    }

    /// Megatron-LM `get_num_layers_to_build`: 80 layers on 4 ranks is 20 layers per
    /// rank, split evenly over 2, 4, 5 or 10 virtual stages; 7 virtual stages per rank
    /// (80 is not a multiple of 7) need `--pipeline-model-parallel-layout`, which places
    /// any contiguous cut: 28 virtual stages of 3 layers with 1 on the first and last.
    /// More virtual stages than layers (plus the embedding and loss stages) cannot be
    /// placed.
    #[test]
    fn megatron_places_even_splits_and_layouts() {
        let llama = BlockLayout::transformer(80);
        let c = |v| config(4, Schedule::Interleaved(v), 8);
        let layers_of = |s: &StageSpan| layers_in(&llama, s);
        for v in [2, 4, 5, 10] {
            assert_eq!(Engine::Megatron.allows(&c(v), &llama), Ok(()));
            let cuts = Engine::Megatron.cuts(&c(v), &llama);
            let per_layer = 80 / (4 * v as usize);
            assert!(
                cuts.iter()
                    .any(|spans| spans.iter().all(|s| layers_of(s) == per_layer)),
                "the even split of {v} virtual stages is listed"
            );
        }
        assert_eq!(Engine::Megatron.allows(&c(7), &llama), Ok(()));
        let cuts = Engine::Megatron.cuts(&c(7), &llama);
        assert!(cuts.iter().any(|spans| {
            let n: Vec<usize> = spans.iter().map(layers_of).collect();
            n[0] == 1 && n[27] == 1 && n[1..27].iter().all(|&k| k == 3)
        }));
        // 82 virtual stages: 80 layers and the embedding and loss stages, one each.
        let tiny = |v| config(2, Schedule::Interleaved(v), 4);
        assert_eq!(Engine::Megatron.allows(&tiny(41), &llama), Ok(()));
        assert!(matches!(
            Engine::Megatron.allows(&tiny(42), &llama),
            Err(Unsupported::LayerSplit { chunks: 42, .. })
        ));
    }

    /// Layer counts that no equal-middle cut fits (81 layers on 4 ranks × 5 virtual
    /// stages: 4 on each of the 18 middle stages leaves 9 for the two ends, more than
    /// either may hold) still have a layout: 4 layers a stage, the one extra on a
    /// middle stage.
    #[test]
    fn megatron_places_layer_counts_no_equal_middle_fits() {
        for (layers, pp, v) in [(81usize, 4u32, 5u32), (41, 4, 5), (61, 4, 9), (97, 8, 6)] {
            let model = BlockLayout::transformer(layers);
            let c = config(pp, Schedule::Interleaved(v), 2 * pp);
            assert_eq!(Engine::Megatron.allows(&c, &model), Ok(()));
            let cuts = Engine::Megatron.cuts(&c, &model);
            assert!(!cuts.is_empty(), "{layers} layers on {pp} x {v}");
            for spans in &cuts {
                let n: Vec<usize> = spans.iter().map(|s| layers_in(&model, s)).collect();
                assert_eq!(n.iter().sum::<usize>(), layers);
                assert!(n[1..n.len() - 1].iter().all(|&k| k > 0));
            }
        }
        let mut want = vec![4; 20];
        want[1] = 5;
        assert_eq!(balanced_split(81, 20), Some(want));
        // 97 layers on 48 stages: 2 each, one more on a middle stage.
        assert_eq!(
            balanced_split(97, 48).map(|c| c.iter().sum::<usize>()),
            Some(97)
        );
        assert_eq!(balanced_split(3, 5), Some(vec![0, 1, 1, 1, 0]));
        assert_eq!(balanced_split(2, 5), None);
    }

    /// Llama 3 405B's placement (Dubey et al. 2024, Sec. 3.3.2: one layer fewer on the
    /// first and last stages): 126 layers on 16 ranks × 8 virtual stages is Megatron-LM's
    /// `--account-for-embedding-in-pipeline-split --account-for-loss-in-pipeline-split`
    /// (128 units, one per virtual stage, the first holding only the embedding and the
    /// last only the loss), which no per-rank split of 126 layers expresses.
    #[test]
    fn megatron_places_llama_3_405b_on_16_ranks_of_8_virtual_stages() {
        let model = BlockLayout::transformer(126);
        let c = config(16, Schedule::Interleaved(8), 16);
        assert_eq!(Engine::Megatron.allows(&c, &model), Ok(()));
        let cuts = Engine::Megatron.cuts(&c, &model);
        let layers_of = |s: &StageSpan| layers_in(&model, s);
        assert!(cuts.iter().any(|spans| {
            let n: Vec<usize> = spans.iter().map(layers_of).collect();
            n[0] == 0 && n[127] == 0 && n[1..127].iter().all(|&k| k == 1)
        }));
    }

    /// Every cut an engine lists covers the blocks in order, one span per virtual
    /// stage, and (Megatron, torchtitan) gives every middle virtual stage a layer.
    #[test]
    fn cuts_are_contiguous_and_follow_the_rules() {
        for layers in [1usize, 2, 5, 12, 24, 30] {
            let model = BlockLayout::transformer(layers);
            for pp in 1..=6u32 {
                for schedule in [
                    Schedule::OneFOneB,
                    Schedule::Gpipe,
                    Schedule::Interleaved(2),
                    Schedule::Interleaved(3),
                ] {
                    let c = config(pp, schedule, 2 * pp);
                    for engine in Engine::ALL {
                        let cuts = engine.cuts(&c, &model);
                        let allowed = engine.allows(&c, &model).is_ok();
                        if allowed {
                            assert!(!cuts.is_empty(), "{engine} {c}");
                        }
                        for spans in &cuts {
                            assert_eq!(spans.len(), (pp * schedule.chunks()) as usize);
                            assert_eq!(spans[0].first, 0);
                            assert_eq!(spans.last().unwrap().last, model.blocks - 1);
                            for w in spans.windows(2) {
                                assert_eq!(w[1].first, w[0].last + 1);
                            }
                            assert!(spans.iter().all(|s| s.last >= s.first));
                            if matches!(engine, Engine::Megatron | Engine::Torchtitan) && pp > 1 {
                                let layers_of = |s: &StageSpan| layers_in(&model, s);
                                let n = spans.len();
                                assert!(spans[1..n - 1].iter().all(|s| layers_of(s) > 0));
                            }
                        }
                    }
                }
            }
        }
    }

    /// DeepSpeed `partition_uniform(10, 4)` puts 3, 3, 2, 2 items on the parts (the
    /// residual goes to the first parts).
    #[test]
    fn deepspeed_uniform_partition() {
        assert_eq!(partition_uniform(10, 4), vec![0, 3, 6, 8, 10]);
        assert_eq!(partition_uniform(3, 4), vec![0, 1, 2, 3, 3]);
        let c = config(4, Schedule::OneFOneB, 8);
        let cuts = Engine::DeepSpeed.cuts(&c, &BlockLayout::transformer(8));
        assert_eq!(cuts.len(), 1);
        let sizes: Vec<usize> = cuts[0].iter().map(|s| s.last - s.first + 1).collect();
        assert_eq!(sizes, vec![3, 3, 2, 2]);
    }

    /// DeepSpeed `PipelineEngine` asserts ZeRO < 2; Megatron's interleaved and 1F1B
    /// schedules are its only pipelined ones; HF Trainer has no pipeline.
    #[test]
    fn engine_specific_refusals() {
        let model = BlockLayout::transformer(8);
        let mut c = config(2, Schedule::OneFOneB, 4);
        c.dp = 2;
        c.zero = 2;
        assert!(matches!(
            Engine::DeepSpeed.allows(&c, &model),
            Err(Unsupported::Zero { zero: 2, .. })
        ));
        assert_eq!(Engine::Torchtitan.allows(&c, &model), Ok(()));
        c.zero = 1;
        assert_eq!(Engine::DeepSpeed.allows(&c, &model), Ok(()));
        assert!(Engine::Torchtitan.allows(&c, &model).is_err());
        c.schedule = Schedule::Gpipe;
        assert!(matches!(
            Engine::Megatron.allows(&c, &model),
            Err(Unsupported::Schedule { .. })
        ));
        assert!(matches!(
            Engine::Hf.allows(&c, &model),
            Err(Unsupported::Pipeline { .. })
        ));
        c.schedule = Schedule::OneFOneB;
        c.recompute = Recompute::Selective;
        c.recompute_layers = Some(1);
        assert!(matches!(
            Engine::Megatron.allows(&c, &model),
            Err(Unsupported::RecomputeLayers { .. })
        ));
        c.recompute = Recompute::Full;
        assert_eq!(Engine::Megatron.allows(&c, &model), Ok(()));
    }
}
