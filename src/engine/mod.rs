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
