//! The memory each engine really allocates: the dtypes of its parameters, gradients
//! and optimizer states for a precision ([`Engine::states`]), the buffers it allocates
//! beside the model states ([`Engine::buffers`]), and the runtime's own share of device
//! memory ([`RuntimeOverhead`]).
//!
//! These are facts, not formulas: the compiler turns [`States`] into the dtypes and
//! extra ops of the training graph (`TrainOptions`, the forward precision rewrite, the
//! distribution pass), so that model-state bytes still come out of the liveness of real
//! tensors. Each fact names the engine version and the file it was read from.
//!
//! | engine | bf16 compute: param / grad / optimizer copy | source |
//! |---|---|---|
//! | Megatron-LM | bf16 / fp32 main grad / fp32 master + moments: 18 B, `6 + 12/d` with the distributed optimizer | `docs/source/api-guide/dist_optimizer.md` |
//! | DeepSpeed | bf16 / bf16 / fp32 master + moments: 16 B (ZeRO Table 1) | `deepspeed/runtime/zero/stage_1_and_2.py` (0.19) |
//! | torchtitan, HF + FSDP | fp32 sharded param / fp32 grad (`reduce_dtype`) / fp32 moments: `16/d`; bf16 only when gathered | `torchtitan/config/configs.py`, `torchtitan/distributed/fsdp.py` (`MixedPrecisionPolicy`) |

use super::Engine;
use crate::ir::DType;
use crate::passes::recompute::Selective;
use crate::train::precision::Fp8Recipe;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

const MIB: u64 = 1 << 20;

/// The compute precision of a training run: the dtype of activations and of the
/// parameter copy the matmuls read.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bfloat16 mixed precision (the default of every engine here).
    #[default]
    Bf16,
    /// float16 mixed precision with loss scaling.
    Fp16,
    /// float32 throughout (no low-precision copy).
    Fp32,
    /// bf16 mixed precision with FP8 GEMMs in the transformer layers' linears
    /// (Megatron-LM with Transformer Engine, torchtitan with torchao; see
    /// [`Engine::fp8`]).
    Fp8,
}

impl Precision {
    /// Every precision, in the order the CLI lists them.
    pub const ALL: [Precision; 4] = [
        Precision::Bf16,
        Precision::Fp16,
        Precision::Fp32,
        Precision::Fp8,
    ];

    /// The spelling used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
            Precision::Fp32 => "fp32",
            Precision::Fp8 => "fp8",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = PrecisionError;
    fn from_str(s: &str) -> Result<Precision, PrecisionError> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| PrecisionError::Unknown(s.to_string()))
    }
}

/// A floating-point dtype named on the command line (`fp32`, `bf16`, `fp16`), for the
/// gradient and optimizer-state options.
///
/// # Errors
///
/// [`PrecisionError::Unknown`] for any other spelling.
pub fn parse_float_dtype(s: &str) -> Result<DType, PrecisionError> {
    match s {
        "fp32" | "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::Bf16),
        "fp16" | "f16" => Ok(DType::F16),
        _ => Err(PrecisionError::Unknown(s.to_string())),
    }
}

/// What the user asked for; `None` fields take the engine's default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrecisionOptions {
    /// Compute precision (`--precision`; bf16 when absent).
    #[serde(default)]
    pub compute: Precision,
    /// Dtype of the gradient buffers the backward accumulates into and the
    /// data-parallel reduction reads (`--grad-dtype`).
    #[serde(default)]
    pub grad: Option<DType>,
    /// Dtype of the master parameters and Adam moments (`--optimizer-dtype`).
    #[serde(default)]
    pub optimizer: Option<DType>,
}

/// Why a precision cannot be planned.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PrecisionError {
    /// Not a precision or float dtype name.
    #[error("unknown precision `{0}` (bf16, fp16, fp32, fp8)")]
    Unknown(String),
    /// The engine does not train with FP8 GEMMs.
    #[error("{engine} does not run fp8 compute: {why}; plan with --precision bf16 or --engine megatron|torchtitan")]
    Fp8Engine {
        /// The engine.
        engine: Engine,
        /// Why not (what the engine offers instead).
        why: &'static str,
    },
    /// The engine does not train in fp16 (torchtitan: `training.mixed_precision_param`
    /// takes `bfloat16` or `float32`, `torchtitan/config/configs.py`).
    #[error("{engine} does not run fp16 compute: {why}; plan with --precision bf16")]
    Fp16Engine {
        /// The engine.
        engine: Engine,
        /// Why not (what the engine offers instead).
        why: &'static str,
    },
    /// The device has no FP8 tensor cores (`peak_fp8_flops` is absent).
    #[error("device {device} has no FP8 tensor cores (no peak_fp8_flops): fp8 compute needs e.g. H100, H200 or MI300X; plan with --precision bf16")]
    Fp8Device {
        /// The device name.
        device: String,
    },
    /// A gradient or optimizer dtype below the compute precision (fp32 compute with
    /// bf16 gradients, say): no engine here runs it.
    #[error("{what} dtype {dtype} is narrower than the {compute} compute precision")]
    Narrower {
        /// `gradient` or `optimizer`.
        what: &'static str,
        /// The dtype asked for.
        dtype: DType,
        /// The compute precision.
        compute: Precision,
    },
    /// An integer dtype was given where a float is needed.
    #[error("{what} dtype {dtype} is not a floating-point type")]
    NotFloat {
        /// `gradient` or `optimizer`.
        what: &'static str,
        /// The dtype given.
        dtype: DType,
    },
}

/// The dtypes one engine trains with at one precision: what the training graph's
/// parameters, gradients and optimizer states are, and where casts sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct States {
    /// Activations and the parameter copy the matmuls read.
    pub compute: DType,
    /// Gradient buffers: what the backward accumulates into and the data-parallel
    /// reduction reads.
    pub grad: DType,
    /// The gradient the optimizer reads; when it differs from `grad`, the optimizer
    /// step first copies each (reduced) gradient into a buffer of this dtype
    /// (Megatron-LM's fp32 main gradients of fp16 runs).
    pub main_grad: DType,
    /// Whether that copy exists only during the optimizer step (DeepSpeed converts
    /// each parameter group's gradient partition to fp32 at the step and frees it
    /// after: `stage_1_and_2.py::step`, `single_grad_partition`) rather than between
    /// steps (Megatron-LM's main-gradient buffers).
    pub main_grad_transient: bool,
    /// Master parameters and Adam moments.
    pub master: DType,
    /// Parameters live only in the master dtype and are cast to `compute` at each use
    /// (FSDP's `MixedPrecisionPolicy(param_dtype=bf16)`: no persistent low-precision
    /// copy; sharded, the cast runs on the shard before the all-gather).
    pub params_in_master: bool,
    /// The dtype the loss reads the logits in (every engine here upcasts to fp32,
    /// [`LOGITS_FP32_SOURCE`]).
    pub logits: DType,
    /// The FP8 recipe of the linear layers, with FP8 compute.
    pub fp8: Option<Fp8Recipe>,
    /// Where these facts were read.
    pub source: &'static str,
}

/// Megatron-LM: `bf16` runs keep fp32 main gradients ("accumulate and all-reduce
/// gradients in fp32 for bfloat16 data type" unless `--grad-reduce-in-bf16`,
/// `megatron/training/arguments.py`); fp16 runs keep fp16
/// gradients and the optimizer copies them into fp32 main gradients; fp32 master
/// weights always. Table "bytes per parameter" of
/// `docs/source/api-guide/dist_optimizer.md` (Megatron-LM core 0.13): 20 / 18 / 16
/// without and `4 + 16/d`, `6 + 12/d`, `8 + 8/d` with the distributed optimizer.
pub const MEGATRON_STATES_SOURCE: &str =
    "Megatron-LM core 0.20 (d98e8a6), docs/source/api-guide/dist_optimizer.md";

/// DeepSpeed ZeRO keeps gradients in the model dtype and fp32 master weights and
/// moments (Rajbhandari et al. 2020, Table 1; `stage_1_and_2.py`, DeepSpeed 0.19.6).
pub const DEEPSPEED_STATES_SOURCE: &str =
    "DeepSpeed 0.19.6 deepspeed/runtime/zero/stage_1_and_2.py; ZeRO paper Table 1";

/// torchtitan's FSDP2 mixed precision: fp32 parameters sharded, bf16 when gathered,
/// gradients reduced in fp32 (torchtitan b5bcd76, `torchtitan/config/configs.py`,
/// `torchtitan/distributed/fsdp.py`). Hugging Face + FSDP is given the same policy.
pub const FSDP_STATES_SOURCE: &str =
    "torchtitan b5bcd76 torchtitan/config/configs.py, torchtitan/distributed/fsdp.py";

/// Megatron-LM's vocab-parallel cross-entropy runs on `vocab_parallel_logits.float()`
/// (`megatron/core/tensor_parallel/cross_entropy.py`) and saves its fp32 softmax for
/// the backward. Hugging Face's `ForCausalLMLoss` ("Upcast to float",
/// `transformers/loss/loss_utils.py`) and torchtitan's loss (`pred.float()`,
/// `torchtitan/components/loss.py`) upcast the same way.
pub const LOGITS_FP32_SOURCE: &str =
    "megatron/core/tensor_parallel/cross_entropy.py; transformers/loss/loss_utils.py; torchtitan/components/loss.py";

impl Engine {
    /// The dtypes this engine trains with at `p` (engine defaults where `p` leaves a
    /// field `None`).
    ///
    /// # Errors
    ///
    /// [`PrecisionError::Fp8Engine`] for FP8 on an engine without it
    /// ([`Engine::fp8`]); [`PrecisionError::NotFloat`] or
    /// [`PrecisionError::Narrower`] for a gradient or optimizer dtype that is not a
    /// float or is narrower than the compute dtype.
    pub fn states(self, p: &PrecisionOptions) -> Result<States, PrecisionError> {
        let compute = match p.compute {
            Precision::Bf16 => DType::Bf16,
            Precision::Fp16 => DType::F16,
            Precision::Fp32 => DType::F32,
            // FP8 recipes keep bf16 activations and parameter copies; only the
            // linears' GEMM operands are FP8.
            Precision::Fp8 => DType::Bf16,
        };
        let fp8 = match p.compute {
            Precision::Fp8 => Some(self.fp8()?),
            _ => None,
        };
        if self == Engine::Torchtitan && p.compute == Precision::Fp16 {
            return Err(PrecisionError::Fp16Engine {
                engine: self,
                why: "training.mixed_precision_param takes bfloat16 or float32",
            });
        }
        let fsdp = matches!(self, Engine::Torchtitan | Engine::Hf);
        let default_grad = match (self, compute) {
            // Megatron-LM: fp32 main gradients for bf16; fp16 gradients for fp16.
            (Engine::Megatron, DType::Bf16) => DType::F32,
            // FSDP2 `reduce_dtype=torch.float32` (torchtitan's defaults
            // `mixed_precision_param = "bfloat16"`, `mixed_precision_reduce =
            // "float32"`, torchtitan/config/configs.py).
            _ if fsdp => DType::F32,
            // DeepSpeed: gradients in the model dtype (ZeRO paper's 2Ψ).
            (_, c) => c,
        };
        let grad = p.grad.unwrap_or(default_grad);
        let master = p.optimizer.unwrap_or(DType::F32);
        for (what, dtype) in [("gradient", grad), ("optimizer", master)] {
            if !dtype.is_float() {
                return Err(PrecisionError::NotFloat { what, dtype });
            }
            if dtype.size_bytes() < compute.size_bytes() {
                return Err(PrecisionError::Narrower {
                    what,
                    dtype,
                    compute: p.compute,
                });
            }
        }
        // Megatron's fp16 optimizer (`Float16OptimizerWithFloat16Params`, and the
        // distributed optimizer's shard copy) hands the optimizer fp32 main gradients.
        // DeepSpeed's ZeRO optimizer (`stage_1_and_2.py::step`, `stage3.py`) steps on an
        // fp32 copy of each group's gradient partition, made at the step.
        let copies = matches!(self, Engine::Megatron | Engine::DeepSpeed);
        let main_grad = if copies && grad != master && master == DType::F32 {
            master
        } else {
            grad
        };
        Ok(States {
            compute,
            grad,
            main_grad,
            main_grad_transient: self == Engine::DeepSpeed,
            master,
            params_in_master: fsdp && master != compute,
            logits: DType::F32,
            fp8,
            source: match self {
                Engine::Megatron => MEGATRON_STATES_SOURCE,
                Engine::DeepSpeed => DEEPSPEED_STATES_SOURCE,
                Engine::Torchtitan | Engine::Hf => FSDP_STATES_SOURCE,
            },
        })
    }

    /// The buffers this engine allocates beside the model states and activations for a
    /// configuration with ZeRO stage `zero` over `dp` ranks, gradients in `grad`.
    pub fn buffers(self, zero: u8, dp: u32, grad: DType) -> Vec<NamedBuffer> {
        match self {
            // DeepSpeed ZeRO 1–3 with `contiguous_gradients` (default true) copy each
            // gradient into an `ipg` bucket of `reduce_bucket_size` elements in the
            // gradient dtype before reducing it (`stage_1_and_2.py::setup_buckets`,
            // `stage3.py` bucket buffer); ZeRO 1–2 allocate a second one when
            // `overlap_comm` is on ("Use double buffers to avoid data access conflict
            // when overlap_comm is enabled", `setup_buckets`), which the overlap this
            // plan assumes needs ([`Engine::overlap`]; default on for stage 3 only,
            // `zero/config.py`).
            Engine::DeepSpeed if zero >= 1 && dp > 1 => {
                let bytes = DEEPSPEED_REDUCE_BUCKET_ELEMENTS * grad.size_bytes();
                let mut out = vec![NamedBuffer {
                    name: "deepspeed.reduce_bucket",
                    bytes,
                }];
                if zero <= 2 {
                    out.push(NamedBuffer {
                        name: "deepspeed.reduce_bucket.overlap_comm",
                        bytes,
                    });
                }
                out
            }
            _ => Vec::new(),
        }
    }
}

impl Engine {
    /// What this engine's selective recomputation reruns: torchtitan's selective
    /// activation checkpointing is per-op (`SelectiveAC`, "Per-op selective activation
    /// checkpointing", `torchtitan/distributed/activation_checkpoint.py`); Megatron-LM (and
    /// DeepSpeed's Megatron model code) recompute the attention core; Hugging Face +
    /// FSDP is given Megatron-LM's meaning (its own checkpointing is whole-layer).
    pub fn selective_recompute(self) -> Selective {
        match self {
            Engine::Torchtitan => Selective::PerOp,
            Engine::Megatron | Engine::DeepSpeed | Engine::Hf => Selective::AttentionCore,
        }
    }

    /// What selective recomputation reruns with Megatron-LM's `--recompute-modules`
    /// `modules` ([`Selective::Modules`]), or the engine's own policy without
    /// ([`Engine::selective_recompute`]). Only Megatron-LM takes module sets
    /// ([`Engine::allows`] refuses them elsewhere).
    pub fn selective_for(self, modules: Option<crate::passes::RecomputeModules>) -> Selective {
        match modules {
            Some(m) => Selective::Modules(m),
            None => self.selective_recompute(),
        }
    }
}

/// DeepSpeed's default `reduce_bucket_size`, elements: 5·10⁸
/// (`deepspeed/runtime/zero/config.py`, DeepSpeed 0.19.6, edaa722). `allgather_bucket_size`
/// (also 5·10⁸) only chunks the all-gather into the existing parameter buffer and
/// allocates nothing of its own.
pub const DEEPSPEED_REDUCE_BUCKET_ELEMENTS: u64 = 500_000_000;

/// One engine buffer outside the training graph's tensors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NamedBuffer {
    /// The engine's own name for it.
    pub name: &'static str,
    /// Bytes per device.
    pub bytes: u64,
}

/// Device memory the runtime takes before and beside the tensors of the step: the
/// CUDA/ROCm context with its loaded kernels, NCCL's communication buffers, and the
/// caching allocator's reserve. Peak memory includes it; the memory ratio is a safety
/// margin on top.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(default)]
pub struct RuntimeOverhead {
    /// CUDA context, cuBLAS/cuDNN workspaces and loaded kernels, bytes.
    pub context_bytes: u64,
    /// NCCL buffers per communicator a rank is a member of, bytes.
    pub nccl_bytes_per_communicator: u64,
    /// Caching-allocator fragmentation: the share of reserved memory that no tensor
    /// uses at the peak (`nvidia-smi` counts it); reserved = allocated / (1 − f).
    pub allocator_fragmentation: f64,
    /// When set, replaces the three: bytes per device (`--runtime-overhead-gib`).
    pub fixed_bytes: Option<u64>,
}

/// Fragmentation of PyTorch's caching allocator in LLM training, as the share of
/// reserved memory no tensor uses: 15% on average over eight LLMs on A100-80GB
/// (Guo et al. 2024, "GMLake", ASPLOS '24, abstract and Sec. 6: the reduction
/// GMLake achieves relative to the caching allocator). Reserved = allocated / (1 − f).
pub const CACHING_ALLOCATOR_FRAGMENTATION: f64 = 0.15;

/// CUDA context with PyTorch's kernels loaded: 781 MiB on the device before any
/// tensor (pytorch/pytorch#34323, nvidia-smi after CUDA initialization).
pub const CUDA_CONTEXT_BYTES: u64 = 781 * MIB;

/// NCCL's default `NCCL_BUFFSIZE`: 4 MiB per channel and peer for the Simple protocol
/// (NCCL environment-variable documentation).
pub const NCCL_BUFFSIZE_BYTES: u64 = 4 * MIB;

/// NCCL's largest channel count, `MAXCHANNELS = 32` (`src/include/device.h`), which
/// NVSwitch systems use for rings: a rank receives from one peer per channel.
pub const NCCL_MAX_CHANNELS: u64 = 32;

/// Largest runtime overhead apar takes, bytes: 10⁶ GiB per device (`--runtime-overhead-gib`'s
/// bound), beyond any device; a saved plan's byte counts are checked against it.
pub const MAX_RUNTIME_BYTES: u64 = 1_000_000 << 30;

impl Default for RuntimeOverhead {
    /// The context, NCCL's Simple-protocol ring buffers at the largest channel count,
    /// and the published average fragmentation of the caching allocator.
    fn default() -> RuntimeOverhead {
        RuntimeOverhead {
            context_bytes: CUDA_CONTEXT_BYTES,
            nccl_bytes_per_communicator: NCCL_MAX_CHANNELS * NCCL_BUFFSIZE_BYTES,
            allocator_fragmentation: CACHING_ALLOCATOR_FRAGMENTATION,
            fixed_bytes: None,
        }
    }
}

impl RuntimeOverhead {
    /// A fixed overhead of `bytes` per device (the user's figure).
    pub fn fixed(bytes: u64) -> RuntimeOverhead {
        RuntimeOverhead {
            fixed_bytes: Some(bytes),
            ..RuntimeOverhead::default()
        }
    }

    /// Overhead bytes of a device whose tensors peak at `allocated` bytes and that is
    /// a member of `communicators` NCCL communicators (fragmentation is clamped to
    /// `[0, 0.9]`).
    pub fn bytes(&self, allocated: u64, communicators: u32) -> u64 {
        if let Some(b) = self.fixed_bytes {
            return b;
        }
        let f = self.allocator_fragmentation.clamp(0.0, 0.9);
        let reserve = (allocated as f64 * f / (1.0 - f)) as u64;
        self.context_bytes
            .saturating_add(
                self.nccl_bytes_per_communicator
                    .saturating_mul(u64::from(communicators)),
            )
            .saturating_add(reserve)
    }
}

impl Engine {
    /// The runtime overhead of this engine's processes. Every engine here runs on
    /// PyTorch with its CUDA caching allocator and NCCL, so all share the same facts
    /// ([`RuntimeOverhead::default`]).
    pub fn runtime(self) -> RuntimeOverhead {
        RuntimeOverhead::default()
    }
}

impl RuntimeOverhead {
    /// The most bytes the tensors of a device may peak at so that they and the
    /// overhead fit in `budget` bytes (the inverse of [`RuntimeOverhead::bytes`]).
    pub fn allocatable(&self, budget: u64, communicators: u32) -> u64 {
        if let Some(b) = self.fixed_bytes {
            return budget.saturating_sub(b);
        }
        let fixed = self.bytes(0, communicators);
        let f = self.allocator_fragmentation.clamp(0.0, 0.9);
        (budget.saturating_sub(fixed) as f64 * (1.0 - f)) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_defaults() {
        let p = PrecisionOptions::default();
        let m = Engine::Megatron.states(&p).unwrap();
        assert_eq!(
            (m.grad, m.main_grad, m.master),
            (DType::F32, DType::F32, DType::F32)
        );
        let d = Engine::DeepSpeed.states(&p).unwrap();
        assert_eq!(d.grad, DType::Bf16);
        let t = Engine::Torchtitan.states(&p).unwrap();
        assert!(t.params_in_master && t.grad == DType::F32);
        let fp16 = PrecisionOptions {
            compute: Precision::Fp16,
            ..p
        };
        let m = Engine::Megatron.states(&fp16).unwrap();
        assert_eq!((m.grad, m.main_grad), (DType::F16, DType::F32));
        let fp8 = PrecisionOptions {
            compute: Precision::Fp8,
            ..p
        };
        let m = Engine::Megatron.states(&fp8).unwrap();
        assert_eq!((m.compute, m.grad), (DType::Bf16, DType::F32));
        assert!(m.fp8.is_some_and(|r| r.saves_fp8 && r.weight_cache));
        let t = Engine::Torchtitan.states(&fp8).unwrap();
        assert!(t.fp8.is_some_and(|r| !r.saves_fp8 && !r.weight_cache));
        for e in [Engine::DeepSpeed, Engine::Hf] {
            assert!(matches!(
                e.states(&fp8),
                Err(PrecisionError::Fp8Engine { engine, .. }) if engine == e
            ));
        }
        for x in Precision::ALL {
            assert_eq!(x.name().parse::<Precision>(), Ok(x));
        }
    }
}
