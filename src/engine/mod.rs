//! The engines a plan is for: what each can run, the memory it really allocates, how
//! it overlaps communication, and its configuration format ([`export`]).
//!
//! A plan is a plan *for an engine*: the candidate space, the memory model and the
//! export all depend on which engine runs the job.

pub mod export;
pub mod memory;
pub mod overlap;
pub mod rules;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// DeepSpeed's default `stage3_prefetch_bucket_size`, elements: 5·10⁷
/// (`deepspeed/runtime/zero/config.py`, `prefetch_bucket_size: int = Field(pp_int(5e7),
/// alias="stage3_prefetch_bucket_size")`, DeepSpeed 0.19.8).
pub const DEEPSPEED_PREFETCH_BUCKET_ELEMENTS: u64 = 50_000_000;

/// DeepSpeed's default `stage3_param_persistence_threshold`, elements: 10⁵ (same
/// file: parameters smaller than this are never partitioned).
pub const DEEPSPEED_PARAM_PERSISTENCE_ELEMENTS: u64 = 100_000;

/// The training engine a plan is made for.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Megatron-LM (`pretrain_gpt.py`, Megatron-Core).
    #[default]
    Megatron,
    /// DeepSpeed (`ds_config.json`, its pipeline engine for pipelining).
    DeepSpeed,
    /// torchtitan (FSDP2, DTensor tensor parallelism, `torch.distributed.pipelining`).
    Torchtitan,
    /// Hugging Face Transformers model code trained with PyTorch FSDP.
    Hf,
}

/// How an engine's context parallelism moves keys and values between the ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum CpMethod {
    /// Ring attention: `cp − 1` peer-to-peer steps, each sending the next key/value
    /// block while the current one is computed on (Megatron-LM / Transformer Engine
    /// `--cp-comm-type p2p`, the default).
    #[default]
    Ring,
    /// One all-gather of every rank's keys and values before the blockwise attention,
    /// issued with the local block's compute (PyTorch's `context_parallel`,
    /// `_AllGatherRotater`, the default `rotate_method` that torchtitan runs); the
    /// backward gathers them again and passes the key/value gradients around the ring
    /// (`_templated_ring_attention_backward`: `dkv_rotater` is `ALL_TO_ALL`). Source:
    /// `torch/distributed/tensor/experimental/_context_parallel/_attention.py`,
    /// PyTorch 2.15.
    AllGather,
}

/// Megatron-LM's `--make-vocab-size-divisible-by` default: the vocabulary is padded to
/// a multiple of this times the tensor-parallel degree ([`Engine::padded_vocab`]).
pub const MEGATRON_VOCAB_DIVISOR: u64 = 128;

impl Engine {
    /// Every engine, in the order the CLI lists them.
    pub const ALL: [Engine; 4] = [
        Engine::Megatron,
        Engine::DeepSpeed,
        Engine::Torchtitan,
        Engine::Hf,
    ];

    /// The engine version its facts (rules, memory, option names) were read from.
    pub fn version(self) -> &'static str {
        match self {
            Engine::Megatron => "Megatron-LM main at d98e8a6 (after core_v0.19.0)",
            Engine::DeepSpeed => {
                "DeepSpeed 0.19 (rules and memory read in 0.19.6, exports checked with 0.19.8)"
            }
            Engine::Torchtitan => "torchtitan 0.3.0 (main at b5bcd76) on PyTorch 2.15",
            Engine::Hf => "Transformers 5.23 with PyTorch FSDP2",
        }
    }

    /// How the engine's context parallelism exchanges keys and values: ring
    /// attention for Megatron-LM (Transformer Engine's default `p2p`), one all-gather
    /// for torchtitan (PyTorch's `context_parallel` default rotate method); the others
    /// refuse context parallelism (`engine::rules`), so theirs is never used.
    pub fn cp_method(self) -> CpMethod {
        match self {
            Engine::Torchtitan => CpMethod::AllGather,
            Engine::Megatron | Engine::DeepSpeed | Engine::Hf => CpMethod::Ring,
        }
    }

    /// How many parameter elements one ZeRO-3 parameter all-gather carries at most,
    /// when the engine gathers parameter by parameter rather than a block at a time
    /// (`None`: one collective per block, FSDP2's per-`fully_shard`-unit gather).
    ///
    /// DeepSpeed's stage 3 fetches each submodule's parameters from its forward and
    /// backward pre-hooks (`PartitionedParameterCoordinator.fetch_sub_module`), and
    /// each fetch issues one coalesced all-gather (`all_gather_coalesced`) of the
    /// upcoming parameters not yet fetched, up to `stage3_prefetch_bucket_size`
    /// elements ([`DEEPSPEED_PREFETCH_BUCKET_ELEMENTS`]): every parameter tensor of
    /// a block is gathered by its own collective, and one larger than the bucket is
    /// still one collective. Parameters below `stage3_param_persistence_threshold`
    /// ([`DEEPSPEED_PARAM_PERSISTENCE_ELEMENTS`]; norms, biases) stay gathered and are
    /// not fetched. Each collective pays its own latency, which at hundreds of ranks
    /// is milliseconds per ring.
    pub fn zero3_gather_bucket(self) -> Option<u64> {
        match self {
            Engine::DeepSpeed => Some(DEEPSPEED_PREFETCH_BUCKET_ELEMENTS),
            Engine::Megatron | Engine::Torchtitan | Engine::Hf => None,
        }
    }

    /// The vocabulary rows the engine builds for a `vocab`-token model at
    /// tensor-parallel degree `tp`: Megatron-LM pads it to a multiple of
    /// `--make-vocab-size-divisible-by` ([`MEGATRON_VOCAB_DIVISOR`], its default 128)
    /// times `tp` (`megatron/training/vocab_utils.py`, `_calculate_padded_vocab_size_cached`,
    /// at d98e8a6) and
    /// splits the padded embedding and output layer; the others build the model's own
    /// size (Hugging Face's and torchtitan's models take the configuration's
    /// `vocab_size`).
    pub fn padded_vocab(self, vocab: u64, tp: u32) -> u64 {
        match self {
            Engine::Megatron => {
                let multiple = MEGATRON_VOCAB_DIVISOR * u64::from(tp.max(1));
                vocab.div_ceil(multiple) * multiple
            }
            Engine::DeepSpeed | Engine::Torchtitan | Engine::Hf => vocab,
        }
    }

    /// The spelling used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Megatron => "megatron",
            Engine::DeepSpeed => "deepspeed",
            Engine::Torchtitan => "torchtitan",
            Engine::Hf => "hf",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An engine name that is not one of [`Engine::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown engine `{0}` (megatron, deepspeed, torchtitan, hf)")]
pub struct UnknownEngine(pub String);

impl FromStr for Engine {
    type Err = UnknownEngine;
    fn from_str(s: &str) -> Result<Engine, UnknownEngine> {
        Engine::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| UnknownEngine(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for e in Engine::ALL {
            assert_eq!(e.name().parse::<Engine>(), Ok(e));
            assert_eq!(serde_json::to_string(&e).unwrap(), format!("\"{e}\""));
        }
        assert!("nemo".parse::<Engine>().is_err());
    }
}
