//! How each engine overlaps data-parallel communication with compute, under the
//! flags its export sets ([`Engine::overlap`]).
//!
//! The simulation (`crate::lower`) applies the same rules to every ZeRO stage; only
//! these facts differ between engines:
//!
//! - **Gradient reduction by buckets.** A block's gradients join the open bucket when
//!   its backward ends; the bucket's reduction (all-reduce, or ZeRO's reduce-scatter)
//!   starts on the communication stream once the bucket holds
//!   [`Overlap::grad_bucket`] parameter elements, or at the end of the pass for the
//!   last one, so the last bucket is always exposed. ZeRO-0/1 reduce once per step
//!   (after each chunk's last backward), ZeRO-2/3 every micro-batch; the pass (or the
//!   step) ends when its last bucket is reduced.
//! - **Parameter all-gather prefetch.** ZeRO-3 gathers a block's parameters before its
//!   forward and its backward; the gather of the next block is issued when the current
//!   block starts, so it overlaps the current block's compute and the first gather is
//!   exposed.
//! - **The all-gather after the optimizer** (ZeRO-1/2): either exposed after the step
//!   ([`ParamGather::AfterStep`]) or prefetched block by block into the next step's
//!   first forward ([`ParamGather::NextForward`]).
//! - **Link contention** is physical, not an engine fact: collectives of the data- and
//!   tensor-parallel groups that share a link take turns on it (see `crate::lower`).
//!
//! | engine | gradient bucket | ZeRO-3 gathers | gather after the optimizer | source |
//! |---|---|---|---|---|
//! | Megatron-LM | `max(4·10⁷, 10⁶·dp)` elements on the first pipeline stage's first chunk, one bucket per chunk elsewhere | prefetched one block ahead | next forward (`--overlap-param-gather`) | `megatron/core/distributed/distributed_data_parallel.py`, `megatron/training/arguments.py`, `megatron/training/training.py` (`get_model`, `disable_bucketing`); Megatron-Core 0.20 |
//! | DeepSpeed | `reduce_bucket_size` = 5·10⁸ elements (`overlap_comm: true`); one bucket per stage with pipelining | prefetched one block ahead, one all-gather per parameter (consecutive ones coalesced up to `stage3_prefetch_bucket_size`, [`Engine::zero3_gather_bucket`]) | after the step | `deepspeed/runtime/zero/config.py`, `stage_1_and_2.py`, `deepspeed/runtime/pipe/engine.py` (`_exec_reduce_grads`); DeepSpeed 0.19.6 |
//! | torchtitan, HF + FSDP2 | one block (each transformer block is a `fully_shard` unit) | prefetched one block ahead (implicit prefetching) | next forward | `torchtitan/distributed/fsdp.py`; PyTorch `torch/distributed/fsdp/_fully_shard/_fsdp_state.py`, `docs/source/notes/fsdp.rst` ("FSDP Prefetch Nuances") |

use super::memory::DEEPSPEED_REDUCE_BUCKET_ELEMENTS;
use super::Engine;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How many parameter elements a gradient bucket holds before its reduction starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Bucket {
    /// Every block is its own bucket (FSDP2: one `fully_shard` unit per block).
    Block,
    /// No overlap: every gradient is reduced after the whole step's backward, on the
    /// critical path (Megatron-LM without `--overlap-grad-reduce`:
    /// `finalize_model_grads` runs the reductions after the last micro-batch).
    Step,
    /// The bucket is reduced once it holds at least this many parameter elements.
    Elements(u64),
    /// One bucket per model chunk: the reduction starts after the chunk's backward.
    Chunk,
}

/// When the ZeRO-1/2 all-gather of the updated parameters runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ParamGather {
    /// After the optimizer step, exposed (DeepSpeed `all_gather_dp_groups` in
    /// `stage_1_and_2.py::step`).
    AfterStep,
    /// Block by block during the next step's first forward, prefetched one block ahead
    /// (Megatron-LM `--overlap-param-gather`; FSDP2 gathers before each forward).
    NextForward,
}

/// An engine's overlap of data-parallel communication with compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Overlap {
    /// Gradient bucket on the pipeline stage and chunk where the engine buckets.
    pub grad_bucket: Bucket,
    /// Whether bucketing is limited to the first pipeline stage's first model chunk
    /// (every other chunk reduces as one bucket).
    pub bucket_first_chunk_only: bool,
    /// Bucket used instead of [`Overlap::grad_bucket`] when the job is pipelined.
    pub pipelined_bucket: Option<Bucket>,
    /// Whether ZeRO-3 parameter gathers are prefetched one block ahead.
    pub prefetch: bool,
    /// When the post-optimizer parameter all-gather runs.
    pub param_gather: ParamGather,
    /// Engine version the facts were read from.
    pub version: &'static str,
}

/// Megatron-LM's default bucket floor, elements: `bucket_size = max(40000000, 1000000 *
/// dp_group.size())` when `--ddp-bucket-size` is unset and `--overlap-grad-reduce` is on
/// (`megatron/core/distributed/distributed_data_parallel.py`, Megatron-Core 0.20).
pub const MEGATRON_BUCKET_FLOOR_ELEMENTS: u64 = 40_000_000;

/// Megatron-LM's bucket growth per data-parallel rank, elements (same source).
pub const MEGATRON_BUCKET_PER_RANK_ELEMENTS: u64 = 1_000_000;

/// The communication overlap switches of a job: Megatron-LM's
/// `--overlap-grad-reduce`, `--overlap-param-gather` and `--tp-comm-overlap` (all off
/// by default in `arguments.py`, all on in apar's exports). A plan is made with them
/// on; a measured run made without them (`apar eval --no-overlap-grad-reduce`, a
/// calibration run's `overlap_grad_reduce` column) is priced as the engine ran it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommOverlap {
    /// Gradient reductions overlap the backward by buckets.
    pub grad_reduce: bool,
    /// The distributed optimizer's parameter all-gather overlaps the next forward.
    pub param_gather: bool,
    /// With sequence parallelism, the tensor-parallel all-gathers and reduce-scatters
    /// overlap their GEMMs (`--tp-comm-overlap`, Transformer Engine userbuffers; see
    /// `crate::lower::profile::TpOverlap`). Missing in JSON written before it: on.
    #[serde(default = "on")]
    pub tp_comm: bool,
}

fn on() -> bool {
    true
}

impl Default for CommOverlap {
    /// All on: what apar's exports ask for.
    fn default() -> CommOverlap {
        CommOverlap {
            grad_reduce: true,
            param_gather: true,
            tp_comm: true,
        }
    }
}

/// Overlap switches an engine cannot run with.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum CommOverlapError {
    /// Only Megatron-LM has the switches; the FSDP engines always overlap and
    /// DeepSpeed's `overlap_comm: false` is not modelled.
    #[error("{engine} has no switch apar models for running without communication overlap (only megatron's --overlap-grad-reduce / --overlap-param-gather / --tp-comm-overlap are)")]
    Engine {
        /// The engine.
        engine: Engine,
    },
    /// Megatron-LM asserts that `--overlap-param-gather` comes with
    /// `--overlap-grad-reduce` (`arguments.py`, `validate_args`).
    #[error("overlapping the parameter gather needs the gradient reduction overlapped too (Megatron-LM asserts --overlap-param-gather implies --overlap-grad-reduce)")]
    ParamGatherWithoutGradReduce,
}

impl CommOverlap {
    /// All on (the default).
    pub fn is_default(&self) -> bool {
        *self == CommOverlap::default()
    }

    /// Checks the switches against `engine`.
    ///
    /// # Errors
    ///
    /// [`CommOverlapError`] when an engine other than Megatron-LM is asked to run
    /// without overlap, or the parameter gather is overlapped without the gradient
    /// reduction.
    pub fn check(&self, engine: Engine) -> Result<(), CommOverlapError> {
        if self.is_default() {
            return Ok(());
        }
        if engine != Engine::Megatron {
            return Err(CommOverlapError::Engine { engine });
        }
        if self.param_gather && !self.grad_reduce {
            return Err(CommOverlapError::ParamGatherWithoutGradReduce);
        }
        Ok(())
    }
}

impl Engine {
    /// How this engine overlaps data-parallel communication with compute for `dp`
    /// data-parallel ranks, with the flags its export sets (see the module table), or
    /// as Megatron-LM runs without them (`flags`; the other engines have no such
    /// switch, see [`CommOverlap::check`]).
    pub fn overlap_with(self, dp: u32, flags: CommOverlap) -> Overlap {
        let mut o = self.overlap(dp);
        if self == Engine::Megatron {
            if !flags.grad_reduce {
                o.grad_bucket = Bucket::Step;
                o.bucket_first_chunk_only = false;
                o.pipelined_bucket = None;
            }
            if !flags.param_gather {
                // Without it the distributed optimizer gathers the updated
                // parameters right after the step (`DistributedOptimizer.step`).
                o.param_gather = ParamGather::AfterStep;
            }
        }
        o
    }

    /// How this engine overlaps data-parallel communication with compute for `dp`
    /// data-parallel ranks, with the flags its export sets (see the module table).
    pub fn overlap(self, dp: u32) -> Overlap {
        match self {
            // `--overlap-grad-reduce` (default off, arguments.py) makes buckets of
            // `--ddp-bucket-size`; `get_model` passes `disable_bucketing` for model
            // chunks after the first and DDP drops bucketing on pipeline ranks > 0
            // ("not on the critical path"). `--overlap-param-gather` dispatches each
            // bucket's all-gather from the forward pre-hook of the bucket before it
            // (`next_param_gather_bucket_group`).
            Engine::Megatron => Overlap {
                grad_bucket: Bucket::Elements(
                    MEGATRON_BUCKET_FLOOR_ELEMENTS
                        .max(MEGATRON_BUCKET_PER_RANK_ELEMENTS * u64::from(dp)),
                ),
                bucket_first_chunk_only: true,
                pipelined_bucket: None,
                prefetch: true,
                param_gather: ParamGather::NextForward,
                version: "Megatron-Core 0.20",
            },
            // `overlap_comm` defaults to true only for stage 3 (`overlap_comm_valid`);
            // with it, `reduce_independent_p_g_buckets_and_remove_grads` reduces the
            // `ipg` bucket once `reduce_bucket_size` elements are in it, and the
            // epilogue synchronizes at the end of each backward. The pipeline engine
            // reduces after the last backward (`_exec_reduce_grads`). Stage 3 prefetches
            // the parameters of the next submodules (`stage3_prefetch_bucket_size`).
            Engine::DeepSpeed => Overlap {
                grad_bucket: Bucket::Elements(DEEPSPEED_REDUCE_BUCKET_ELEMENTS),
                bucket_first_chunk_only: false,
                pipelined_bucket: Some(Bucket::Chunk),
                prefetch: true,
                param_gather: ParamGather::AfterStep,
                version: "DeepSpeed 0.19.6",
            },
            // FSDP2: one reduce-scatter per `fully_shard` unit in its post-backward,
            // waited for by the root's post-backward callback; all-gathers issued on a
            // separate stream overlap the compute issued before them (implicit
            // prefetching, always on); backward prefetching of the next unit by default.
            Engine::Torchtitan | Engine::Hf => Overlap {
                grad_bucket: Bucket::Block,
                bucket_first_chunk_only: false,
                pipelined_bucket: None,
                prefetch: true,
                param_gather: ParamGather::NextForward,
                version: "PyTorch 2.x FSDP2",
            },
        }
    }
}

impl Overlap {
    /// The gradient bucket of virtual stage `chunk` on pipeline device `stage` of a
    /// job with `pp` pipeline stages.
    pub fn bucket(&self, stage: u32, chunk: u32, pp: u32) -> Bucket {
        if pp > 1 {
            if let Some(b) = self.pipelined_bucket {
                return b;
            }
        }
        if self.bucket_first_chunk_only && (stage > 0 || chunk > 0) {
            Bucket::Chunk
        } else {
            self.grad_bucket
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn megatron_buckets_grow_with_the_data_parallel_group() {
        // max(40000000, 1000000 * dp) (distributed_data_parallel.py).
        assert_eq!(
            Engine::Megatron.overlap(8).grad_bucket,
            Bucket::Elements(40_000_000)
        );
        assert_eq!(
            Engine::Megatron.overlap(64).grad_bucket,
            Bucket::Elements(64_000_000)
        );
        let o = Engine::Megatron.overlap(8);
        assert_eq!(o.bucket(0, 0, 4), Bucket::Elements(40_000_000));
        assert_eq!(o.bucket(1, 0, 4), Bucket::Chunk);
        assert_eq!(o.bucket(0, 1, 4), Bucket::Chunk);
        assert_eq!(Engine::DeepSpeed.overlap(8).bucket(0, 0, 2), Bucket::Chunk);
        assert_eq!(Engine::Torchtitan.overlap(8).bucket(3, 0, 4), Bucket::Block);
    }
}
