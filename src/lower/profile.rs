//! Block profiles: time, FLOPs and memory of each block of a per-device training
//! graph, read off the graph's real ops and a liveness simulation of its tensors.
//!
//! The simulation runs one micro-batch's forward and backward ops in graph order,
//! allocating each non-persistent buffer at its producer and freeing it after its
//! last use (views and in-place ops share their input's buffer). From it:
//! `saved` — bytes a block's forward leaves alive for the backward; `fwd_extra` /
//! `bwd_extra` — the most the block's forward / backward holds above the saved
//! activations of the blocks before it. Persistent buffers (parameters, gradients,
//! optimizer states) are summed per block by role.

use crate::cost::collective::collective_of;
use crate::cost::{Collective, CostModel, Group};
pub use crate::engine::CpMethod;
use crate::engine::DEEPSPEED_PARAM_PERSISTENCE_ELEMENTS;
use crate::ir::{Block, Env, Graph, Op, OpId, Phase, Role, TensorId, TensorType};
use crate::train::memory::buffer_root;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Persistent bytes of one block on one device, by role.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StateBytes {
    /// Low-precision parameter copies.
    pub low_prec_params: u64,
    /// Full-precision master parameters.
    pub master_params: u64,
    /// Gradient buffers.
    pub grads: u64,
    /// Optimizer moments.
    pub optimizer: u64,
}

impl StateBytes {
    /// Sum of all four.
    pub fn total(&self) -> u64 {
        self.low_prec_params + self.master_params + self.grads + self.optimizer
    }

    /// Adds another block's bytes.
    pub fn add(&mut self, o: &StateBytes) {
        self.low_prec_params += o.low_prec_params;
        self.master_params += o.master_params;
        self.grads += o.grads;
        self.optimizer += o.optimizer;
    }
}

/// A run of consecutive blocks with the same profile. For a run of layers, `profile`
/// is tagged with the run's first layer; the `k`-th block of the run is layer
/// `first + k`.
#[derive(Clone, Debug, PartialEq)]
struct Run {
    /// Index of the run's first block.
    start: usize,
    /// Blocks in the run.
    len: usize,
    profile: BlockProfile,
}

/// Block profiles in model order, run-length encoded: a template-compiled model's
/// `L - 1` identical inner layers are stored once, so that memory does not grow with
/// the layer count. Indexing gives each block's profile with its own block tag.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Blocks {
    runs: Vec<Run>,
    len: usize,
}

impl Blocks {
    /// One run per profile (a graph compiled whole).
    pub fn from_vec(blocks: Vec<BlockProfile>) -> Blocks {
        let mut out = Blocks::default();
        for b in blocks {
            out.push(b, 1);
        }
        out
    }

    /// Appends `count` copies of `profile`; a layer profile stands for the layers
    /// numbered from its tag on.
    pub fn push(&mut self, profile: BlockProfile, count: usize) {
        if count == 0 {
            return;
        }
        self.runs.push(Run {
            start: self.len,
            len: count,
            profile,
        });
        self.len += count;
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is no block.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// When blocks `first..=last` all lie in one run: that run's index and the span's
    /// length (its blocks then share one profile).
    pub fn within_run(&self, first: usize, last: usize) -> Option<(usize, usize)> {
        if first > last || last >= self.len {
            return None;
        }
        let r = self.run_of(first);
        let run = self.runs.get(r)?;
        (last < run.start + run.len).then_some((r, last - first + 1))
    }

    /// The runs as (length, profile of their first block).
    pub fn runs(&self) -> impl Iterator<Item = (usize, &BlockProfile)> + '_ {
        self.runs.iter().map(|r| (r.len, &r.profile))
    }

    /// The run holding block `i` (0 when there is none; callers check `i < len`).
    fn run_of(&self, i: usize) -> usize {
        self.runs
            .partition_point(|r| r.start <= i)
            .saturating_sub(1)
    }

    fn tagged(run: &Run, i: usize) -> BlockProfile {
        let mut p = run.profile.clone();
        if let Some(Block::Layer(first)) = p.block {
            let offset = u32::try_from(i - run.start).unwrap_or(u32::MAX);
            p.block = Some(Block::Layer(first.saturating_add(offset)));
        }
        p
    }

    /// The index of block `b`, if present (`O(runs)`).
    pub fn index_of(&self, b: Block) -> Option<usize> {
        self.runs.iter().find_map(|r| match (r.profile.block, b) {
            (Some(Block::Layer(first)), Block::Layer(k)) => {
                let offset = usize::try_from(k.checked_sub(first)?).ok()?;
                (offset < r.len).then_some(r.start + offset)
            }
            (tag, b) => (tag == Some(b)).then_some(r.start),
        })
    }

    /// The profile of block `i`.
    ///
    /// # Panics
    ///
    /// If `i >= self.len()` (an internal bug: stage spans index existing blocks).
    pub fn get(&self, i: usize) -> BlockProfile {
        assert!(i < self.len, "block {i} of {}", self.len);
        Blocks::tagged(&self.runs[self.run_of(i)], i)
    }

    /// The block tag of block `i` (see [`Blocks::get`]).
    pub fn block(&self, i: usize) -> Option<Block> {
        if i >= self.len {
            return None;
        }
        let run = self.runs.get(self.run_of(i))?;
        match run.profile.block {
            Some(Block::Layer(first)) => Some(Block::Layer(
                first.saturating_add(u32::try_from(i - run.start).unwrap_or(u32::MAX)),
            )),
            b => b,
        }
    }

    /// Profiles of blocks `first..=last`, in order.
    pub fn range(&self, first: usize, last: usize) -> impl Iterator<Item = BlockProfile> + '_ {
        let r0 = if first < self.len {
            self.run_of(first)
        } else {
            self.runs.len()
        };
        self.runs[r0..]
            .iter()
            .take_while(move |r| r.start <= last)
            .flat_map(move |r| {
                let lo = r.start.max(first);
                let hi = (r.start + r.len - 1).min(last);
                (lo..=hi).map(move |i| Blocks::tagged(r, i))
            })
    }

    /// Profiles of blocks `first..=last` by reference, without their own block tags
    /// (a run's blocks share one profile); `O(log runs)` per block.
    pub fn refs(
        &self,
        first: usize,
        last: usize,
    ) -> impl DoubleEndedIterator<Item = &BlockProfile> + '_ {
        (first..=last.min(self.len.wrapping_sub(1)))
            .filter(move |_| self.len > 0)
            .map(move |i| &self.runs[self.run_of(i)].profile)
    }

    /// Appends blocks `first..=last` of `src`, as runs.
    pub fn extend_from(&mut self, src: &Blocks, first: usize, last: usize) {
        if first > last || last >= src.len {
            return;
        }
        for r in &src.runs[src.run_of(first)..] {
            if r.start > last {
                break;
            }
            let lo = r.start.max(first);
            let hi = (r.start + r.len - 1).min(last);
            self.push(Blocks::tagged(r, lo), hi + 1 - lo);
        }
    }

    /// Every profile, in order.
    pub fn iter(&self) -> impl Iterator<Item = BlockProfile> + '_ {
        self.range(0, self.len.saturating_sub(1)).take(self.len)
    }
}

/// What one block costs on one device for one micro-batch (and per step for the
/// optimizer part).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BlockProfile {
    /// The block.
    pub block: Option<Block>,
    /// Forward compute time (tensor-parallel collectives included).
    pub fwd_s: f64,
    /// Backward compute time, recomputation included.
    pub bwd_s: f64,
    /// Recomputation share of `bwd_s`.
    pub recompute_s: f64,
    /// Tensor-parallel collective share of `fwd_s + bwd_s`.
    pub tp_comm_s: f64,
    /// Tensor-parallel collective share of `fwd_s`.
    pub tp_fwd_s: f64,
    /// Expert-parallel token exchanges (the all-to-all dispatch and combine, forward
    /// and backward) per micro-batch: the part of `tp_comm_s` on the expert-parallel
    /// group.
    pub ep_comm_s: f64,
    /// Data-parallel collectives issued every micro-batch (ZeRO-2/3), forward.
    pub dp_fwd_s: f64,
    /// Data-parallel parameter gathers issued every micro-batch before the backward
    /// (ZeRO-3).
    pub dp_bwd_s: f64,
    /// Data-parallel gradient reduction issued every micro-batch after the backward
    /// (ZeRO-2/3 reduce-scatter).
    pub dp_reduce_s: f64,
    /// Data-parallel gradient reduction once per step (ZeRO-0/1).
    pub dp_grad_s: f64,
    /// Data-parallel parameter all-gather once per step, after the optimizer.
    pub dp_param_s: f64,
    /// Optimizer compute once per step.
    pub opt_s: f64,
    /// Forward and backward FLOPs executed per micro-batch (no recomputation; causal
    /// attention at its executed share, [`crate::cost::executed_share`]).
    pub flops: f64,
    /// Recomputation FLOPs executed per micro-batch.
    pub recompute_flops: f64,
    /// Activation bytes kept from this block's forward until its backward.
    pub saved: u64,
    /// Peak bytes of the forward above the earlier blocks' saved activations.
    pub fwd_extra: u64,
    /// Peak bytes of the backward above the earlier blocks' saved activations.
    pub bwd_extra: u64,
    /// Peak transient bytes of the optimizer step.
    pub opt_extra: u64,
    /// Forward bytes that cross the cut right after this block: tensors produced in it
    /// or an earlier block and read by a later block's forward (what a pipeline cut
    /// here sends per micro-batch, skip connections included).
    pub boundary: u64,
    /// Persistent bytes.
    pub states: StateBytes,
    /// Parameter elements of the block on this device before data-parallel sharding
    /// (what fills a gradient bucket).
    pub param_elems: u64,
    /// Kernels the block's forward launches per micro-batch: its ops that are neither
    /// views, sources nor collectives (recomputation clones included).
    pub fwd_kernels: u32,
    /// Kernels the block's backward launches per micro-batch (as `fwd_kernels`).
    pub bwd_kernels: u32,
    /// Context-parallel ring transfers of the block's attention per micro-batch
    /// (forward and backward), the whole transfer time whether hidden or not.
    pub cp_comm_s: f64,
    /// The part of `cp_comm_s` not hidden behind the attention compute (included in
    /// `fwd_s` and `bwd_s`).
    pub cp_exposed_s: f64,
    /// Parameters of another block this block reads (a head tied to the embedding),
    /// or `None`.
    pub borrowed: Option<Borrowed>,
}

/// Parameters a block reads from another block (a head tied to the word embedding).
/// A pipeline stage that runs the block without the owner holds its own copy, as
/// Megatron-LM and DeepSpeed's pipeline engine do for tied embeddings (the last stage
/// allocates the output layer's weight, keeps its gradient and optimizer state, and
/// all-reduces the gradient with the first stage's before the step:
/// `_allreduce_word_embedding_grads` in Megatron-LM's `finalize_model_grads`, the tied
/// modules' all-reduce in DeepSpeed's `PipelineEngine._exec_reduce_tied_grads`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Borrowed {
    /// The block that owns the parameters.
    pub owner: Block,
    /// The copy's persistent bytes: the owner's state bytes in proportion to the
    /// borrowed parameter elements.
    pub states: StateBytes,
    /// The copy's share of the owner's optimizer time.
    pub opt_s: f64,
}

/// Which collectives run on the data-parallel group, and the two groups.
#[derive(Clone, Debug)]
pub struct Groups<'a> {
    /// Data-parallel collective ops of the graph.
    pub dp_ops: &'a BTreeSet<OpId>,
    /// The tensor-parallel group.
    pub tp: Group,
    /// The data-parallel group.
    pub dp: Group,
    /// The context-parallel group ([`Group::SINGLE`] for none): the graph is priced
    /// at the device's `s / cp` tokens, and its attention ops as ring attention over
    /// the whole sequence's keys ([`ring_attention`]).
    pub cp: Group,
    /// How the context-parallel ranks exchange keys and values (the engine's).
    pub cp_method: CpMethod,
    /// Tensor-parallel collectives overlapped with their GEMMs (Megatron-LM's
    /// `--tp-comm-overlap`), or `None`.
    pub tp_overlap: Option<TpOverlap>,
    /// The expert-parallel group ([`Group::SINGLE`] for none): token exchanges
    /// ([`crate::passes::expert::is_token_exchange`]) run on it.
    pub ep: Group,
    /// The expert-data-parallel group: the routed experts' gradient reductions and
    /// ZeRO collectives (`edp_ops`) run on it.
    pub edp: Group,
    /// The data-parallel collectives of routed-expert states (a subset of `dp_ops`).
    pub edp_ops: &'a BTreeSet<OpId>,
    /// Expert load imbalance with expert parallelism: the busiest rank's routed rows
    /// over the mean (1 = balanced). Its grouped expert matmuls and token exchanges
    /// take this many times the mean rank's time; FLOPs stay the mean.
    pub imbalance: f64,
    /// ZeRO-3 parameter gathers issued parameter by parameter, coalescing consecutive
    /// ones up to this many elements ([`crate::engine::Engine::zero3_gather_bucket`],
    /// DeepSpeed), or `None` for one gather per block.
    pub gather_bucket: Option<u64>,
}

impl Groups<'_> {
    /// The slowdown of the busiest expert-parallel rank on `op` (1 for other ops).
    fn expert_load(&self, op: &Op) -> f64 {
        let expert = matches!(op, Op::GroupedMatMul { .. } | Op::GroupedMatMulWgrad { .. })
            || crate::passes::expert::is_token_exchange(op);
        if self.ep.size > 1 && expert && self.imbalance.is_finite() {
            // The busiest of `ep` ranks receives at most every token's routes: `ep`
            // times the mean.
            self.imbalance.clamp(1.0, f64::from(self.ep.size))
        } else {
            1.0
        }
    }
}

/// Transformer Engine's userbuffers overlap of the sequence-parallel all-gathers and
/// reduce-scatters with the GEMMs beside them (Megatron-LM `--tp-comm-overlap`, which
/// needs `--sequence-parallel`). TE's `initialize_ub` picks a method per GEMM:
///
/// - *ring exchange* for the all-gathers in front of a GEMM (`qkv_fprop`,
///   `fc1_fprop`, `proj_dgrad`, `fc2_dgrad`): the GEMM runs on each of the `t`
///   shards as it arrives by peer-to-peer copy, so only one shard's share of the
///   shorter of the two is exposed beyond the longer:
///   `max(G, C) + min(G, C)/t`;
/// - *pipeline* for the reduce-scatters after a GEMM (`proj_fprop`, `fc2_fprop`): the
///   GEMM in `n = num_splits` chunks, each chunk's reduce-scatter behind the next
///   chunk, on [`TpOverlap::comm_sms`] of the SMs, which the GEMM loses while it
///   runs: `max(C, G + C·f) + min(G, C)/n`;
/// - *bulk* for the backward's re-gather of a forward input for the weight gradient
///   and the reduce-scatter of the input gradient (`qkv_dgrad`, `qkv_wgrad`,
///   `fc1_dgrad`, `fc1_wgrad`): the whole collective beside a GEMM of the same layer,
///   `max(C, G + C·f)`.
///
/// A collective's exposed time is what the pair takes beyond its GEMM `G`; each GEMM
/// hides at most one collective, and a collective with no GEMM beside it is not
/// hidden. Source: Transformer Engine `transformer_engine/pytorch/module/base.py`
/// (`initialize_ub`: the method table, `num_sm = 16`, `num_splits = 4` for
/// pipeline); Megatron-LM `arguments.py` (`--tp-comm-overlap` asserts sequence
/// parallelism).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TpOverlap {
    /// Fraction of the device's compute units the pipeline and bulk methods take
    /// from the GEMM (`num_sm` / SMs), in `[0, 1)`.
    pub comm_sms: f64,
    /// Chunks of the pipeline method (`num_splits`).
    pub pipeline_splits: u32,
}

/// Transformer Engine's default SMs for a pipeline or bulk userbuffers overlap
/// (`initialize_ub`, `add_ub(num_sm=16)`).
pub const TE_UB_NUM_SM: u32 = 16;

/// Transformer Engine's default chunks of a pipelined GEMM + reduce-scatter
/// (`initialize_ub`, `add_ub(num_splits=4)`).
pub const TE_UB_NUM_SPLITS: u32 = 4;

impl TpOverlap {
    /// TE's defaults on a device with `compute_units` SMs.
    pub fn te_default(compute_units: u32) -> TpOverlap {
        TpOverlap {
            comm_sms: (f64::from(TE_UB_NUM_SM) / f64::from(compute_units.max(1))).min(0.9),
            pipeline_splits: TE_UB_NUM_SPLITS,
        }
    }
}

/// How a userbuffers overlap runs a collective beside its GEMM (see [`TpOverlap`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UbMethod {
    RingExchange,
    Pipeline,
    Bulk,
}

/// The GEMMs a tensor-parallel collective overlaps, and how: the GEMMs reading an
/// all-gather's result or producing a reduce-scatter's input (through views, and
/// through the sum of two input-gradient GEMMs), not yet taken by another
/// collective. `None` when the op is not such a collective or has no free GEMM.
fn ub_pair(g: &Graph, id: OpId, taken: &BTreeSet<OpId>) -> Option<(UbMethod, Vec<OpId>)> {
    let node = g.node(id);
    let gather = matches!(node.op, Op::AllGather { .. });
    let scatter = matches!(node.op, Op::ReduceScatter { .. });
    if !(gather || scatter) || node.phase == Phase::Opt {
        return None;
    }
    let mut gemms = Vec::new();
    if gather {
        let mut frontier: Vec<_> = node.results.clone();
        for _ in 0..3 {
            let mut next = Vec::new();
            for t in frontier {
                for &u in g.uses(t) {
                    match g.op(u) {
                        Op::MatMul { .. } if !taken.contains(&u) && !gemms.contains(&u) => {
                            gemms.push(u)
                        }
                        op if op.is_view() => next.extend(g.node(u).results.iter().copied()),
                        _ => {}
                    }
                }
            }
            frontier = next;
        }
    } else {
        let mut frontier: Vec<_> = node.inputs.clone();
        for _ in 0..3 {
            let mut next = Vec::new();
            for t in frontier {
                let p = g.tensor(t).producer;
                match g.op(p) {
                    Op::MatMul { .. } if !taken.contains(&p) && !gemms.contains(&p) => {
                        gemms.push(p)
                    }
                    op if op.is_view() || matches!(op, Op::Add) => {
                        next.extend(g.node(p).inputs.iter().copied())
                    }
                    _ => {}
                }
            }
            frontier = next;
        }
    }
    if gemms.is_empty() {
        return None;
    }
    let method = match (node.phase, gather) {
        (Phase::Fwd, true) => UbMethod::RingExchange,
        (Phase::Fwd, false) => UbMethod::Pipeline,
        (_, false) => UbMethod::Bulk,
        // The backward gathers either an output gradient for the input-gradient GEMM
        // (ring exchange) or a forward input again for the weight gradient (bulk).
        (_, true) => {
            let input = node.inputs.first().map(|&t| g.tensor(t).producer);
            if input.is_some_and(|p| g.node(p).phase == Phase::Fwd) {
                UbMethod::Bulk
            } else {
                UbMethod::RingExchange
            }
        }
    };
    Some((method, gemms))
}

/// Exposed seconds of a collective of `comm_s` overlapped by `method` with GEMMs of
/// `gemm_s` on a tensor-parallel group of `tp` (see [`TpOverlap`]).
fn ub_exposed(method: UbMethod, comm_s: f64, gemm_s: f64, tp: u32, o: &TpOverlap) -> f64 {
    // While the collective's kernels hold their SMs the GEMM runs on the rest.
    let beside = (comm_s.max(gemm_s + comm_s * o.comm_sms.clamp(0.0, 0.9))) - gemm_s;
    let exposed = match method {
        UbMethod::RingExchange => {
            (gemm_s.max(comm_s) - gemm_s) + gemm_s.min(comm_s) / f64::from(tp.max(1))
        }
        UbMethod::Pipeline => beside + gemm_s.min(comm_s) / f64::from(o.pipeline_splits.max(1)),
        UbMethod::Bulk => beside,
    };
    exposed.max(0.0)
}

/// Whether `op` is an attention kernel that ring attention runs blockwise over the
/// context-parallel ranks' keys and values (a fused kernel; decomposed attention
/// materializes the `s×s` scores and has no ring form).
pub fn is_ring_attention(op: &Op) -> bool {
    matches!(
        op,
        Op::FlashAttention { .. }
            | Op::FlashAttentionGrad { .. }
            | Op::Sdpa { .. }
            | Op::SdpaGrad { .. }
    )
}

/// One device's share of an attention op under ring attention over `cp` ranks
/// (Megatron-LM / Transformer Engine `--cp-comm-type p2p`, torchtitan's
/// `context_parallel`), each holding `s / cp` tokens in the load-balanced layout
/// (the sequence cut into `2·cp` chunks, rank `r` holding chunks `r` and
/// `2·cp − 1 − r`, so every rank has the same causal work).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RingAttention {
    /// FLOPs: the op over `s / cp` queries × `s` keys, `1 / cp` of the whole op.
    pub flops: u64,
    /// Compute time: `1 / cp` of the whole op's.
    pub compute_s: f64,
    /// Time of all `cp − 1` ring transfers.
    pub comm_s: f64,
    /// The transfers not hidden behind compute: each of the `cp − 1` steps sends the
    /// next block while the current one is computed, exposing `max(0, send − compute)`.
    pub exposed_s: f64,
    /// Receive buffers: two blocks in flight (the one computed on and the one
    /// arriving), key and value blocks (and their gradients in the backward).
    pub buffer_bytes: u64,
}

/// Ring attention for op `id` of `g` at the device's environment `env` (`s / cp`
/// tokens) on the context-parallel group `cp` (size > 1). The forward passes each
/// rank's key and value blocks around the ring (`cp − 1` steps, `(cp − 1)/cp` of the
/// whole K and V); the backward passes them again with their gradients. `None` if a
/// size overflows.
pub fn ring_attention(
    g: &Graph,
    id: OpId,
    env: Env,
    cost: &CostModel,
    tp: Group,
    cp: Group,
    method: CpMethod,
) -> Option<RingAttention> {
    let node = g.node(id);
    let ins = g.input_types(id);
    let res = g.result_types(id);
    let n = u64::from(cp.size.max(1));
    let whole = Env::new(env.batch, env.seq.checked_mul(n)?);
    let flops = node.op.cost(&ins, &res, whole)?.flops / n;
    // The whole op's time over the ranks, plus the launches of the kernel's other
    // `cp − 1` blockwise calls.
    let compute_s = cost.op_time(&node.op, &ins, &res, whole, tp) / n as f64
        + cost.launch_time(u32::try_from(n - 1).unwrap_or(u32::MAX));
    // Inputs: (q, k, v, ...) forward; (do, q, k, v, ...) backward.
    let grad = matches!(node.op, Op::FlashAttentionGrad { .. } | Op::SdpaGrad { .. });
    let (k, v) = if grad { (2, 3) } else { (1, 2) };
    let kv = ins
        .get(k)?
        .bytes_at(env)?
        .checked_add(ins.get(v)?.bytes_at(env)?)?;
    // The backward sends the key/value block and the gradient block accumulated
    // for it.
    let block = if grad { kv.checked_mul(2)? } else { kv };
    let steps = (n - 1) as f64;
    let step_compute = compute_s / n as f64;
    match method {
        CpMethod::Ring => {
            let send = cost.p2p_time(block as f64, cp.nodes() > 1);
            Some(RingAttention {
                flops,
                compute_s,
                comm_s: steps * send,
                exposed_s: steps * (send - step_compute).max(0.0),
                buffer_bytes: block.checked_mul(2)?,
            })
        }
        CpMethod::AllGather => {
            // Every rank's keys and values at once, hidden behind the local block only.
            let gathered = kv.checked_mul(n)?;
            let gather =
                cost.collective_time(crate::cost::Collective::AllGather, gathered as f64, cp);
            let mut comm_s = gather;
            let mut exposed_s = (gather - step_compute).max(0.0);
            let mut buffer_bytes = gathered;
            if grad {
                // The key/value gradients go around the ring, one block a step.
                let send = cost.p2p_time(kv as f64, cp.nodes() > 1);
                comm_s += steps * send;
                exposed_s += steps * (send - step_compute).max(0.0);
                buffer_bytes = buffer_bytes.checked_add(kv.checked_mul(2)?)?;
            }
            Some(RingAttention {
                flops,
                compute_s,
                comm_s,
                exposed_s,
                buffer_bytes,
            })
        }
    }
}

/// Where a data-parallel collective runs in the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum DpSlot {
    /// Before a block's forward (ZeRO-3 gather).
    Fwd,
    /// Before a block's backward (ZeRO-3 gather).
    BwdGather,
    /// After a block's backward (ZeRO-2/3 reduce-scatter).
    BwdReduce,
    /// After the optimizer (ZeRO-1/2 parameter gather).
    OptGather,
    /// Once per step before the optimizer (ZeRO-0/1 reduction).
    OptReduce,
}

fn persistent(role: Role) -> bool {
    role.is_persistent()
}

/// Profiles every block of `g` under `env`. Returns `None` if a size overflows.
///
/// The same as [`ProfilePrep::new`] on `g` followed by [`ProfilePrep::profile`]; a
/// caller profiling one graph at several environments prepares it once.
pub fn profile(
    g: &Graph,
    env: Env,
    cost: &CostModel,
    groups: &Groups,
    clones: &BTreeSet<OpId>,
) -> Option<BTreeMap<Block, BlockProfile>> {
    ProfilePrep::new(g, groups.dp_ops, groups.edp_ops, clones).profile(g, env, cost, groups)
}

/// Per-op flags of a [`ProfilePrep`].
const DP: u8 = 1;
const EDP: u8 = 1 << 1;
const EXCHANGE: u8 = 1 << 2;
const RING: u8 = 1 << 3;
const CLONE: u8 = 1 << 4;
const COLLECTIVE: u8 = 1 << 5;
/// Neither a view, a source nor a collective: a kernel launch.
const KERNEL: u8 = 1 << 6;
const ALL_GATHER: u8 = 1 << 7;

/// Which model-state bytes a persistent buffer counts as (see [`StateBytes`]).
#[derive(Clone, Copy, Debug)]
enum StateKind {
    LowPrec,
    /// A master parameter, with its element size (for `param_elems`).
    Master(u64),
    Optimizer,
    Grad,
}

/// What [`profile`] reads off a graph apart from sizes and costs: which block and kind
/// each op is, the userbuffers pairs, buffer roots, where each buffer is allocated and
/// freed, which buffers are model states or saved activations, and which forward
/// tensors cross each block boundary. None of it depends on the environment, so a
/// graph profiled at several micro-batch sizes is walked once
/// ([`ProfilePrep::profile`] then only sizes and prices the ops, in the same order).
#[derive(Clone, Debug)]
pub struct ProfilePrep {
    /// The graph's blocks, in order (the result's keys).
    blocks: Vec<Block>,
    /// Per op: its block's index in `blocks`.
    block_of: Vec<u32>,
    /// Per op: [`DP`], [`EDP`], ... flags.
    flags: Vec<u8>,
    /// Per op: the userbuffers pair a tensor-parallel collective would overlap with
    /// (method and a range of `ub_gemms`), taken in op order as [`ub_pair`] takes them.
    ub: Vec<Option<(UbMethod, u32, u32)>>,
    ub_gemms: Vec<OpId>,
    /// Buffer roots (tensor indices), in tensor order.
    roots: Vec<u32>,
    /// Per op `i`: `allocs[alloc_at[i]..alloc_at[i + 1]]` are the non-persistent
    /// buffers its results allocate.
    alloc_at: Vec<u32>,
    allocs: Vec<u32>,
    /// Per op `i`: `frees[free_at[i]..free_at[i + 1]]` are the buffers freed after it.
    free_at: Vec<u32>,
    frees: Vec<u32>,
    /// Persistent buffers: (tensor, block index, kind).
    states: Vec<(u32, u32, StateKind)>,
    /// Parameters read across blocks: (reader block index, owner block index, root
    /// tensor), each once.
    borrowed: Vec<(u32, u32, u32)>,
    /// Forward buffers alive into the backward: (tensor, block index).
    saved: Vec<(u32, u32)>,
    /// Per block: whether it saves any buffer (its liveness base is the saved bytes of
    /// the blocks before it; 0 otherwise, as [`profile`] has always counted it).
    has_saved: Vec<bool>,
    /// Forward tensors read by a later block's forward: (tensor, from, to) block
    /// indices.
    crossing: Vec<(u32, u32, u32)>,
}

impl ProfilePrep {
    /// Prepares `g` with data-parallel collectives `dp_ops` (of which `edp_ops` run on
    /// the expert-data-parallel group) and recomputation clones `clones`.
    pub fn new(
        g: &Graph,
        dp_ops: &BTreeSet<OpId>,
        edp_ops: &BTreeSet<OpId>,
        clones: &BTreeSet<OpId>,
    ) -> ProfilePrep {
        let n = g.op_count();
        let nt = g.tensor_count();
        let blocks: Vec<Block> = {
            let set: BTreeSet<Block> = g.ops().map(|o| g.node(o).block).collect();
            set.into_iter().collect()
        };
        let index = |b: Block| blocks.binary_search(&b).unwrap_or(0) as u32;
        let mut block_of = Vec::with_capacity(n);
        let mut flags = Vec::with_capacity(n);
        let mut ub = Vec::with_capacity(n);
        let mut ub_gemms = Vec::new();
        let mut ub_taken: BTreeSet<OpId> = BTreeSet::new();
        for id in g.ops() {
            let node = g.node(id);
            block_of.push(index(node.block));
            let op = &node.op;
            let is_dp = dp_ops.contains(&id);
            let collective = op.is_collective();
            let mut f = 0u8;
            for (on, bit) in [
                (is_dp, DP),
                (edp_ops.contains(&id), EDP),
                (crate::passes::expert::is_token_exchange(op), EXCHANGE),
                (is_ring_attention(op), RING),
                (clones.contains(&id), CLONE),
                (collective, COLLECTIVE),
                (!collective && !op.is_view() && !op.is_source(), KERNEL),
                (matches!(op, Op::AllGather { .. }), ALL_GATHER),
            ] {
                if on {
                    f |= bit;
                }
            }
            flags.push(f);
            // [`profile`] pairs the collectives that are not data-parallel, in op order
            // (data-parallel ones that `collective_of` prices as buckets never reach
            // the pairing; any other data-parallel op is not paired either).
            let pair = if collective && !is_dp {
                ub_pair(g, id, &ub_taken).map(|(method, gemms)| {
                    let from = ub_gemms.len() as u32;
                    ub_taken.extend(gemms.iter().copied());
                    ub_gemms.extend(gemms);
                    (method, from, ub_gemms.len() as u32)
                })
            } else {
                None
            };
            ub.push(pair);
        }

        // Buffer roots and last uses.
        let mut root_of = vec![0usize; nt];
        let mut last_use = vec![0usize; nt];
        let mut roots = Vec::new();
        for t in g.tensor_ids() {
            let r = buffer_root(g, t);
            root_of[t.index()] = r.index();
            last_use[r.index()] = last_use[r.index()].max(g.tensor(t).producer.index());
            if r == t {
                roots.push(t.index() as u32);
            }
        }
        for id in g.ops() {
            for &t in &g.node(id).inputs {
                let r = root_of[t.index()];
                last_use[r] = last_use[r].max(id.index());
            }
        }
        let is_root = |i: usize| root_of[i] == i;
        let transient = |t: TensorId| !persistent(g.tensor(t).role);

        // Persistent state bytes by block of the buffer's producer.
        let mut states = Vec::new();
        for &i in &roots {
            let t = TensorId::from_index(i as usize);
            let tensor = g.tensor(t);
            let producer = g.node(tensor.producer);
            let source = producer.op.is_source();
            // A low-precision copy made outside the optimizer step and not by a
            // recomputation: an FP8 weight cache (`Fp8Recipe::weight_cache`).
            let cache = producer.phase != Phase::Opt && !clones.contains(&tensor.producer);
            let kind = match tensor.role {
                Role::LowPrecParam if source || cache => Some(StateKind::LowPrec),
                Role::Param if source => Some(StateKind::Master(g.ty(t).dtype.size_bytes().max(1))),
                Role::OptimizerState if source => Some(StateKind::Optimizer),
                Role::Grad => Some(StateKind::Grad),
                _ => None,
            };
            if let Some(k) = kind {
                states.push((i, index(producer.block), k));
            }
        }
        // Parameters one block reads from another's source (a tied head).
        let mut borrowed: Vec<(u32, u32, u32)> = Vec::new();
        for id in g.ops() {
            let reader = index(g.node(id).block);
            for &t in &g.node(id).inputs {
                let r = root_of[t.index()];
                let root = g.tensor(TensorId::from_index(r));
                let producer = g.node(root.producer);
                let param = matches!(root.role, Role::Param | Role::LowPrecParam);
                let owner = index(producer.block);
                if param && producer.op.is_source() && owner != reader {
                    borrowed.push((reader, owner, r as u32));
                }
            }
        }
        borrowed.sort_unstable();
        borrowed.dedup();

        // Allocations, frees and saved buffers.
        let first_bwd = g
            .ops()
            .find(|&o| g.node(o).phase != Phase::Fwd)
            .map_or(n, |o| o.index());
        let mut alloc_at = Vec::with_capacity(n + 1);
        let mut allocs = Vec::new();
        for id in g.ops() {
            alloc_at.push(allocs.len() as u32);
            for &r in &g.node(id).results {
                if is_root(r.index()) && transient(r) {
                    allocs.push(r.index() as u32);
                }
            }
        }
        alloc_at.push(allocs.len() as u32);
        let mut free_count = vec![0u32; n + 1];
        let free_op = |t: TensorId| {
            let i = t.index();
            last_use[i].max(g.tensor(t).producer.index())
        };
        let freed: Vec<TensorId> = g
            .tensor_ids()
            .filter(|&t| is_root(t.index()) && transient(t))
            .collect();
        for &t in &freed {
            free_count[free_op(t)] += 1;
        }
        let mut free_at = Vec::with_capacity(n + 1);
        let mut acc = 0u32;
        for c in &free_count[..n] {
            free_at.push(acc);
            acc += c;
        }
        free_at.push(acc);
        let mut frees = vec![0u32; acc as usize];
        let mut fill = free_at.clone();
        for &t in &freed {
            let o = free_op(t);
            frees[fill[o] as usize] = t.index() as u32;
            fill[o] += 1;
        }
        let mut saved = Vec::new();
        let mut has_saved = vec![false; blocks.len()];
        for &t in &freed {
            let i = t.index();
            let producer = g.node(g.tensor(t).producer);
            if producer.phase == Phase::Fwd && last_use[i] >= first_bwd {
                let b = index(producer.block);
                saved.push((i as u32, b));
                has_saved[b as usize] = true;
            }
        }

        // Forward tensors crossing block boundaries.
        let mut crossing = Vec::new();
        for id in g.ops() {
            let node = g.node(id);
            if node.phase != Phase::Fwd {
                continue;
            }
            let from = index(node.block);
            for &r in &node.results {
                if !transient(r) {
                    continue;
                }
                let to = g
                    .uses(r)
                    .iter()
                    .map(|&u| g.node(u))
                    .filter(|un| un.phase == Phase::Fwd)
                    .map(|un| index(un.block))
                    .max()
                    .unwrap_or(from);
                if to > from {
                    crossing.push((r.index() as u32, from, to));
                }
            }
        }
        ProfilePrep {
            blocks,
            block_of,
            flags,
            ub,
            ub_gemms,
            roots,
            alloc_at,
            allocs,
            free_at,
            frees,
            states,
            borrowed,
            saved,
            has_saved,
            crossing,
        }
    }

    /// Profiles every block of `g` (the graph this was prepared from) under `env`, with
    /// `groups` (whose data-parallel op sets must be those given to
    /// [`ProfilePrep::new`]). Returns `None` if a size overflows.
    pub fn profile(
        &self,
        g: &Graph,
        env: Env,
        cost: &CostModel,
        groups: &Groups,
    ) -> Option<BTreeMap<Block, BlockProfile>> {
        let n = g.op_count();
        let mut out: Vec<BlockProfile> = self
            .blocks
            .iter()
            .map(|&b| BlockProfile {
                block: Some(b),
                ..BlockProfile::default()
            })
            .collect();

        // Data-parallel collectives run as one message per block, kind and slot: the
        // engines flatten a unit's tensors into one buffer before communicating (FSDP2's
        // per-block `fully_shard` all-gather and reduce-scatter, Megatron-LM's and
        // DeepSpeed's contiguous gradient buckets), so a block pays one collective's
        // latency, not one per parameter tensor. Keyed by (block, slot, kind).
        // Routed-expert states are bucketed apart: they reduce over the expert-data-parallel
        // group (the key's last field).
        let mut dp_bytes: BTreeMap<(Block, DpSlot, u8, bool), (Collective, f64)> = BTreeMap::new();
        // Parameter-by-parameter ZeRO-3 gathers (`gather_bucket`): (elements, bytes) of
        // each gathered parameter in op order, per (block, slot, expert).
        let mut dp_tensors: BTreeMap<(Block, DpSlot, bool), Vec<(u64, f64)>> = BTreeMap::new();
        // Ring attention's receive buffers per op (alive while the op runs).
        let ring_on = groups.cp.size > 1;
        let mut ring_bytes: Vec<u64> = if ring_on { vec![0; n] } else { Vec::new() };
        // Input and result types of the op at hand (reused: no allocation per op).
        let mut ins: Vec<&TensorType> = Vec::new();
        let mut res: Vec<&TensorType> = Vec::new();

        // Times and FLOPs.
        for id in g.ops() {
            let i = id.index();
            let node = g.node(id);
            let f = self.flags[i];
            let p = &mut out[self.block_of[i] as usize];
            ins.clear();
            ins.extend(node.inputs.iter().map(|&t| g.ty(t)));
            res.clear();
            res.extend(node.results.iter().map(|&t| g.ty(t)));
            let is_dp = f & DP != 0;
            let is_edp = f & EDP != 0;
            let exchange = groups.ep.size > 1 && f & EXCHANGE != 0;
            let group = match (is_dp, is_edp, exchange) {
                (true, true, _) => groups.edp,
                (true, false, _) => groups.dp,
                (false, _, true) => groups.ep,
                (false, _, false) => groups.tp,
            };
            let gather = f & ALL_GATHER != 0;
            if is_dp {
                if let Some((kind, bytes)) = collective_of(&node.op, &ins, &res, env) {
                    let slot = match node.phase {
                        Phase::Fwd => DpSlot::Fwd,
                        Phase::Bwd if gather => DpSlot::BwdGather,
                        Phase::Bwd => DpSlot::BwdReduce,
                        Phase::Opt if gather => DpSlot::OptGather,
                        Phase::Opt => DpSlot::OptReduce,
                    };
                    let numel = res.first().and_then(|t| t.shape.numel_at(env)).unwrap_or(0);
                    let per_tensor = groups.gather_bucket.is_some()
                        && kind == Collective::AllGather
                        && matches!(slot, DpSlot::Fwd | DpSlot::BwdGather)
                        && numel >= DEEPSPEED_PARAM_PERSISTENCE_ELEMENTS;
                    if per_tensor {
                        dp_tensors
                            .entry((node.block, slot, is_edp))
                            .or_default()
                            .push((numel, bytes));
                        continue;
                    }
                    let e = dp_bytes
                        .entry((node.block, slot, kind as u8, is_edp))
                        .or_insert((kind, 0.0));
                    e.1 += bytes;
                    continue;
                }
            }
            let mut t =
                cost.op_time(&node.op, &ins, &res, env, group) * groups.expert_load(&node.op);
            let mut flops = node.op.cost(&ins, &res, env)?.flops as f64;
            if ring_on && f & RING != 0 {
                let r = ring_attention(g, id, env, cost, groups.tp, groups.cp, groups.cp_method)?;
                t = r.compute_s + r.exposed_s;
                flops = r.flops as f64;
                p.cp_comm_s += r.comm_s;
                p.cp_exposed_s += r.exposed_s;
                ring_bytes[i] = r.buffer_bytes;
            }
            let collective = f & COLLECTIVE != 0;
            if let (true, false, Some(o)) = (collective, is_dp, groups.tp_overlap) {
                if let Some((method, from, to)) = self.ub[i] {
                    let gemm_s: f64 = self.ub_gemms[from as usize..to as usize]
                        .iter()
                        .map(|&m| {
                            let node = g.node(m);
                            cost.op_time(
                                &node.op,
                                &g.input_types(m),
                                &g.result_types(m),
                                env,
                                group,
                            )
                        })
                        .sum();
                    t = ub_exposed(method, t, gemm_s, groups.tp.size, &o);
                }
            }
            if f & KERNEL != 0 {
                // The host issues kernels one after another: a kernel shorter than its
                // launch waits for the next one to be issued (`crate::cost::overhead`).
                t = t.max(cost.launch_time(1));
                match node.phase {
                    Phase::Fwd => p.fwd_kernels += 1,
                    Phase::Bwd => p.bwd_kernels += 1,
                    Phase::Opt => {}
                }
            }
            match node.phase {
                Phase::Fwd if is_dp => p.dp_fwd_s += t,
                Phase::Bwd if is_dp && gather => p.dp_bwd_s += t,
                Phase::Bwd if is_dp => p.dp_reduce_s += t,
                Phase::Opt if is_dp && gather => p.dp_param_s += t,
                Phase::Opt if is_dp => p.dp_grad_s += t,
                Phase::Fwd => {
                    p.fwd_s += t;
                    p.flops += flops * crate::cost::executed_share(&node.op);
                }
                Phase::Bwd => {
                    p.bwd_s += t;
                    let executed = flops * crate::cost::executed_share(&node.op);
                    if f & CLONE != 0 {
                        p.recompute_s += t;
                        p.recompute_flops += executed;
                    } else {
                        p.flops += executed;
                    }
                }
                Phase::Opt => p.opt_s += t,
            }
            if collective && !is_dp && node.phase != Phase::Opt {
                if exchange {
                    p.ep_comm_s += t;
                }
                p.tp_comm_s += t;
                if node.phase == Phase::Fwd {
                    p.tp_fwd_s += t;
                }
            }
        }

        let bucket = groups.gather_bucket.unwrap_or(u64::MAX);
        let packed = dp_tensors
            .into_iter()
            .flat_map(|((block, slot, expert), ts)| {
                // Consecutive parameters coalesce into one all-gather up to the bucket; one
                // larger than the bucket is a collective of its own.
                let mut packs: Vec<(u64, f64)> = Vec::new();
                for (numel, bytes) in ts {
                    match packs.last_mut() {
                        Some(last) if last.0.saturating_add(numel) <= bucket => {
                            last.0 += numel;
                            last.1 += bytes;
                        }
                        _ => packs.push((numel, bytes)),
                    }
                }
                packs.into_iter().map(move |(_, bytes)| {
                    ((block, slot, 0, expert), (Collective::AllGather, bytes))
                })
            });
        for ((block, slot, _, expert), (kind, bytes)) in dp_bytes.into_iter().chain(packed) {
            let group = if expert { groups.edp } else { groups.dp };
            let t = cost.collective_time(kind, bytes, group);
            let at = self.blocks.binary_search(&block).unwrap_or(0);
            let p = &mut out[at];
            match slot {
                DpSlot::Fwd => p.dp_fwd_s += t,
                DpSlot::BwdGather => p.dp_bwd_s += t,
                DpSlot::BwdReduce => p.dp_reduce_s += t,
                DpSlot::OptGather => p.dp_param_s += t,
                DpSlot::OptReduce => p.dp_grad_s += t,
            }
        }

        // Buffer bytes (roots only).
        let mut bytes = vec![0u64; g.tensor_count()];
        for &i in &self.roots {
            bytes[i as usize] = g.ty(TensorId::from_index(i as usize)).bytes_at(env)?;
        }
        // Persistent state bytes by block of the buffer's producer.
        for &(i, b, kind) in &self.states {
            let x = bytes[i as usize];
            let p = &mut out[b as usize];
            let s = &mut p.states;
            match kind {
                StateKind::LowPrec => s.low_prec_params += x,
                StateKind::Master(size) => {
                    s.master_params += x;
                    p.param_elems += x / size;
                }
                StateKind::Optimizer => s.optimizer += x,
                StateKind::Grad => s.grads += x,
            }
        }

        // Copies of borrowed parameters: the owner's states and optimizer time in
        // proportion to the elements read (all of them for a tied embedding).
        let mut reads: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        for &(reader, owner, r) in &self.borrowed {
            let elems = g.ty(TensorId::from_index(r as usize)).shape.numel_at(env)?;
            *reads.entry((reader, owner)).or_default() += elems;
        }
        for ((reader, owner), elems) in reads {
            let o = &out[owner as usize];
            if o.param_elems == 0 || out[reader as usize].borrowed.is_some() {
                continue;
            }
            let share = (elems as f64 / o.param_elems as f64).min(1.0);
            let part = |x: u64| (x as f64 * share).round() as u64;
            let copy = Borrowed {
                owner: self.blocks[owner as usize],
                states: StateBytes {
                    low_prec_params: part(o.states.low_prec_params),
                    master_params: part(o.states.master_params),
                    grads: part(o.states.grads),
                    optimizer: part(o.states.optimizer),
                },
                opt_s: o.opt_s * share,
            };
            out[reader as usize].borrowed = Some(copy);
        }

        // Liveness over forward+backward, then over the optimizer step.
        let mut saved_by_block = vec![0u64; self.blocks.len()];
        for &(i, b) in &self.saved {
            saved_by_block[b as usize] += bytes[i as usize];
        }
        let mut before = vec![0u64; self.blocks.len()];
        let mut acc = 0u64;
        for (b, &s) in saved_by_block.iter().enumerate() {
            if self.has_saved[b] {
                before[b] = acc;
                acc += s;
            }
        }
        let mut live: u64 = 0;
        for id in g.ops() {
            let i = id.index();
            for &r in &self.allocs[self.alloc_at[i] as usize..self.alloc_at[i + 1] as usize] {
                live += bytes[r as usize];
            }
            let ring = if ring_on { ring_bytes[i] } else { 0 };
            let b = self.block_of[i] as usize;
            let p = &mut out[b];
            let extra = (live + ring).saturating_sub(before[b]);
            match g.node(id).phase {
                Phase::Fwd => p.fwd_extra = p.fwd_extra.max(extra),
                Phase::Bwd => p.bwd_extra = p.bwd_extra.max(extra),
                Phase::Opt => p.opt_extra = p.opt_extra.max(live),
            }
            for &r in &self.frees[self.free_at[i] as usize..self.free_at[i + 1] as usize] {
                live = live.saturating_sub(bytes[r as usize]);
            }
        }
        for (b, s) in saved_by_block.into_iter().enumerate() {
            if self.has_saved[b] {
                out[b].saved = s;
            }
        }

        // Boundary: forward bytes alive across the cut after each block — every tensor
        // produced at or before the block and read by a forward op after it (the next
        // block's input, and skip connections from any earlier block).
        let mut delta = vec![0i128; self.blocks.len() + 1];
        for &(r, from, to) in &self.crossing {
            let b = i128::from(g.ty(TensorId::from_index(r as usize)).bytes_at(env)?);
            delta[from as usize] += b;
            delta[to as usize] -= b;
        }
        let mut crossing = 0i128;
        for (i, p) in out.iter_mut().enumerate() {
            crossing += delta[i];
            p.boundary = u64::try_from(crossing.max(0)).ok()?;
        }
        Some(self.blocks.iter().copied().zip(out).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(i: u32, saved: u64) -> BlockProfile {
        BlockProfile {
            block: Some(Block::Layer(i)),
            saved,
            ..BlockProfile::default()
        }
    }

    /// The three userbuffers methods on round numbers (t = 4, 16 of 128 SMs, 4
    /// pipeline splits).
    #[test]
    fn userbuffers_expose_what_the_gemm_cannot_hide() {
        let o = TpOverlap {
            comm_sms: 16.0 / 128.0,
            pipeline_splits: 4,
        };
        let close = |got: f64, want: f64| assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // Ring exchange, GEMM 8 ms, all-gather 4 ms: one shard of the all-gather.
        close(ub_exposed(UbMethod::RingExchange, 4e-3, 8e-3, 4, &o), 1e-3);
        // All-gather longer than the GEMM: the difference plus one shard of the GEMM.
        close(
            ub_exposed(UbMethod::RingExchange, 8e-3, 4e-3, 4, &o),
            4e-3 + 1e-3,
        );
        // Bulk: the GEMM loses 1/8 of its SMs while the 4 ms collective runs.
        close(ub_exposed(UbMethod::Bulk, 4e-3, 8e-3, 4, &o), 0.5e-3);
        // Pipeline: the same, plus the last of 4 chunks' reduce-scatter.
        close(
            ub_exposed(UbMethod::Pipeline, 4e-3, 8e-3, 4, &o),
            0.5e-3 + 1e-3,
        );
        // Never more than the collective alone would take, plus its last chunk.
        for m in [UbMethod::RingExchange, UbMethod::Pipeline, UbMethod::Bulk] {
            for (c, g) in [(1e-3, 9e-3), (9e-3, 1e-3), (5e-3, 5e-3)] {
                let e = ub_exposed(m, c, g, 8, &o);
                assert!(
                    e >= 0.0 && e <= c + g.min(c) / 4.0 + 1e-15,
                    "{m:?} {c} {g}: {e}"
                );
            }
        }
    }

    #[test]
    fn runs_read_back_as_the_expanded_blocks() {
        let embed = BlockProfile {
            block: Some(Block::Embed),
            ..BlockProfile::default()
        };
        let mut b = Blocks::default();
        assert_eq!(b.block(0), None);
        assert_eq!(b.refs(0, 3).count(), 0);
        assert_eq!(b.range(0, 3).count(), 0);
        b.push(embed.clone(), 1);
        b.push(layer(0, 5), 4);
        b.push(layer(4, 7), 1);
        let expanded: Vec<BlockProfile> = std::iter::once(embed)
            .chain((0..4).map(|i| layer(i, 5)))
            .chain([layer(4, 7)])
            .collect();
        assert_eq!(b.len(), expanded.len());
        assert_eq!(b.iter().collect::<Vec<_>>(), expanded);
        for first in 0..b.len() {
            for last in first..b.len() {
                let r: Vec<_> = b.range(first, last).collect();
                assert_eq!(r, expanded[first..=last]);
                let saved: Vec<u64> = b.refs(first, last).rev().map(|p| p.saved).collect();
                let want: Vec<u64> = expanded[first..=last]
                    .iter()
                    .rev()
                    .map(|p| p.saved)
                    .collect();
                assert_eq!(saved, want);
                let mut part = Blocks::default();
                part.extend_from(&b, first, last);
                assert_eq!(part.iter().collect::<Vec<_>>(), expanded[first..=last]);
            }
            assert_eq!(b.get(first), expanded[first]);
            assert_eq!(b.block(first), expanded[first].block);
        }
        assert_eq!(b.block(b.len()), None);
    }
}
