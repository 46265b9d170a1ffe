//! Lowering: per-device schedules, an event simulation across pipeline stages that
//! yields the step time, and a memory timeline per stage.
//!
//! Ranks of one stage are symmetric, so one representative device per pipeline stage
//! is simulated. Work units are a micro-batch's forward or backward through one model
//! chunk; their times and memory come from [`profile::BlockProfile`]s, which come from
//! the per-device training graph's ops and tensor liveness.

pub mod compile;
pub mod overlap;
pub mod peak;
pub mod profile;
pub mod schedule;

use crate::cost::{CostModel, Group};
use crate::engine::overlap::{Bucket, Overlap, ParamGather};
use crate::ir::Block;
use crate::passes::Config;
use overlap::{Timeline, Work};
use profile::{Blocks, StateBytes};
use schedule::Pass;
use serde::{Deserialize, Serialize};

/// One sample of a device's memory timeline.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemSample {
    /// Time, seconds from the step start.
    pub t: f64,
    /// Bytes in use.
    pub bytes: u64,
    /// Of which saved activations of in-flight micro-batches.
    #[serde(default)]
    pub activations: u64,
    /// Of which transient bytes of the running pass or optimizer step.
    #[serde(default)]
    pub temporary: u64,
}

/// One simulated unit of work, for traces.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Pipeline device (stage).
    pub stage: u32,
    /// Forward or backward.
    pub pass: Pass,
    /// Model chunk.
    pub chunk: u32,
    /// Micro-batch.
    pub micro_batch: u32,
    /// Start, seconds.
    pub start: f64,
    /// End, seconds.
    pub end: f64,
}

/// What a [`CommEvent`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommKind {
    /// Pipeline point-to-point send of a stage's boundary tensors (forward
    /// activations, or their gradients in the backward).
    Send,
    /// The part of the once-per-step data-parallel gradient reduction (ZeRO-0/1
    /// all-reduce or reduce-scatter) that outlasts the last backward.
    DpReduce,
    /// One bucket's once-per-step gradient reduction (ZeRO-0/1) on the communication
    /// stream, from when the bucket's last block (the event's block) ends its last
    /// backward; overlapped with the backward of earlier blocks where it fits.
    GradReduce,
    /// The optimizer step.
    Optimizer,
    /// ZeRO-1/2's all-gather of the updated parameters after the optimizer step: all
    /// of it when the engine runs it after the step, or the part that the next step's
    /// first forward does not hide when the engine prefetches it into that forward
    /// ([`ParamGather`]).
    ParamGather,
}

impl CommKind {
    /// The name traces show.
    pub fn name(self) -> &'static str {
        match self {
            CommKind::Send => "send",
            CommKind::DpReduce => "dp-reduce",
            CommKind::GradReduce => "grad-reduce",
            CommKind::Optimizer => "optimizer",
            CommKind::ParamGather => "param-gather",
        }
    }
}

/// A communication or optimizer interval, for traces.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommEvent {
    /// Pipeline device (stage).
    pub stage: u32,
    /// What it is.
    pub what: CommKind,
    /// The block it serves, for per-bucket collectives (the last block of a gradient
    /// bucket).
    #[serde(default)]
    pub block: Option<Block>,
    /// Start, seconds.
    pub start: f64,
    /// End, seconds.
    pub end: f64,
}

/// Memory of one pipeline device at its peak.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageMemory {
    /// Pipeline stage (device index in the pipeline).
    pub stage: u32,
    /// Peak bytes.
    pub peak_bytes: u64,
    /// Parameter bytes (low-precision copies and masters).
    pub params: u64,
    /// Gradient bytes.
    pub grads: u64,
    /// Optimizer-state bytes.
    pub optimizer: u64,
    /// Saved activations of in-flight micro-batches at the peak.
    pub activations: u64,
    /// Transient bytes of the running pass at the peak.
    pub temporary: u64,
    /// The engine's named buffers outside the training graph (DeepSpeed's reduce
    /// bucket), bytes.
    #[serde(default)]
    pub buffers: u64,
    /// Runtime overhead: CUDA context, NCCL buffers, allocator reserve, bytes
    /// ([`crate::engine::memory::RuntimeOverhead`]).
    #[serde(default)]
    pub runtime: u64,
}

/// Where the step time of the slowest device goes.
///
/// Serialized with its fields in declaration order; `ep_comm_s` is left out of
/// human-readable formats (JSON) when 0, so breakdowns of plans without expert
/// parallelism print as before, and always written in binary ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Deserialize)]
pub struct TimeBreakdown {
    /// Forward and backward compute (no communication, no recomputation).
    pub compute_s: f64,
    /// Tensor-parallel communication (inside the passes, not overlapped), the
    /// expert-tensor-parallel gathers and reduce-scatters included.
    pub tp_comm_s: f64,
    /// Expert-parallel token exchanges (the all-to-all dispatch and combine of every
    /// MoE layer, forward and backward; inside the passes, not overlapped). Left out of
    /// JSON when 0.
    #[serde(default)]
    pub ep_comm_s: f64,
    /// Data-parallel communication not hidden behind compute.
    pub dp_comm_s: f64,
    /// Pipeline point-to-point waits.
    pub pp_comm_s: f64,
    /// Pipeline bubble (idle while waiting on other stages).
    pub bubble_s: f64,
    /// Recomputation.
    pub recompute_s: f64,
    /// Optimizer step.
    pub optimizer_s: f64,
}

pub use crate::passes::pipeline::StageSpan;

impl Serialize for TimeBreakdown {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let skip_ep = s.is_human_readable() && self.ep_comm_s == 0.0;
        let mut st = s.serialize_struct("TimeBreakdown", 8 - usize::from(skip_ep))?;
        st.serialize_field("compute_s", &self.compute_s)?;
        st.serialize_field("tp_comm_s", &self.tp_comm_s)?;
        if skip_ep {
            st.skip_field("ep_comm_s")?;
        } else {
            st.serialize_field("ep_comm_s", &self.ep_comm_s)?;
        }
        st.serialize_field("dp_comm_s", &self.dp_comm_s)?;
        st.serialize_field("pp_comm_s", &self.pp_comm_s)?;
        st.serialize_field("bubble_s", &self.bubble_s)?;
        st.serialize_field("recompute_s", &self.recompute_s)?;
        st.serialize_field("optimizer_s", &self.optimizer_s)?;
        st.end()
    }
}

/// One block's share of a virtual stage's work unit (one micro-batch), for traces:
/// a forward unit runs its blocks in order, a backward unit in reverse.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockTiming {
    /// The block (`embed`, `layer.N`, `head`).
    pub block: Option<Block>,
    /// Forward time, seconds: from the end of the block before it in the pass (or the
    /// pass start) to the end of its compute, so waits for its parameter gather
    /// included.
    pub fwd_s: f64,
    /// Backward time, seconds (recomputation and waits for its gather included), as
    /// `fwd_s` in backward order.
    pub bwd_s: f64,
    /// Tensor-parallel collectives inside the forward, seconds.
    pub tp_fwd_s: f64,
    /// Tensor-parallel collectives inside the backward, seconds.
    pub tp_bwd_s: f64,
    /// Recomputation inside the backward, seconds.
    pub recompute_s: f64,
    /// ZeRO-3 parameter gather before the block's forward, seconds (link waits
    /// included).
    pub dp_fwd_s: f64,
    /// When that gather starts, seconds from the start of the forward pass.
    #[serde(default)]
    pub dp_fwd_at_s: f64,
    /// ZeRO-3 parameter gather before the block's backward, seconds.
    pub dp_bwd_s: f64,
    /// When that gather starts, seconds from the start of the backward pass.
    #[serde(default)]
    pub dp_bwd_at_s: f64,
    /// Per-micro-batch gradient reduction (ZeRO-2/3) of the bucket this block closes,
    /// seconds (0 when it closes none).
    #[serde(default)]
    pub reduce_s: f64,
    /// When that reduction starts, seconds from the start of the backward pass.
    #[serde(default)]
    pub reduce_at_s: f64,
}

/// The simulated step of every pipeline device: the work units in the order they ran,
/// the communication and optimizer intervals, and the memory timelines.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTrace {
    /// Per virtual stage (model order), its blocks' shares of one work unit.
    #[serde(default)]
    pub blocks: Vec<Vec<BlockTiming>>,
    /// Forward and backward work units, per device in execution order.
    pub events: Vec<Event>,
    /// Point-to-point sends, exposed data-parallel reduction, optimizer step and ZeRO
    /// parameter gathers.
    pub comm: Vec<CommEvent>,
    /// Memory in use over the step, per pipeline device.
    pub timeline: Vec<Vec<MemSample>>,
}

/// Result of simulating one configuration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Simulation {
    /// Step time, seconds.
    pub step_time_s: f64,
    /// Per pipeline device.
    pub memory: Vec<StageMemory>,
    /// Per virtual stage: forward+backward time of one micro-batch.
    pub stage_time_s: Vec<f64>,
    /// Breakdown on the device that finishes last.
    pub breakdown: TimeBreakdown,
    /// FLOPs one device of each stage executes per step (no recomputation; causal
    /// attention at its executed share, [`crate::cost::executed_share`]). A float: a
    /// step of millions of micro-batches exceeds `u64`.
    pub flops_per_device: Vec<f64>,
    /// Recomputation FLOPs one device of each stage executes per step.
    pub recompute_flops_per_device: Vec<f64>,
    /// Every work unit (for traces).
    pub events: Vec<Event>,
    /// Communication and optimizer intervals (for traces).
    pub comm: Vec<CommEvent>,
    /// Memory timeline per pipeline device.
    pub timeline: Vec<Vec<MemSample>>,
    /// Per virtual stage, its blocks' shares of a work unit (for traces).
    pub blocks: Vec<Vec<BlockTiming>>,
}

impl Simulation {
    /// The recorded events and timelines (empty unless simulated with `detail`).
    pub fn trace(&self) -> StepTrace {
        StepTrace {
            blocks: self.blocks.clone(),
            events: self.events.clone(),
            comm: self.comm.clone(),
            timeline: self.timeline.clone(),
        }
    }
}

/// Inputs of the simulation besides the block profiles.
#[derive(Clone, Debug)]
pub struct SimInput<'a> {
    /// The configuration.
    pub config: &'a Config,
    /// Virtual stages in model order; `pp · v` of them. Device `s` runs stages `s`,
    /// `s + pp`, `s + 2pp`, ….
    pub stages: &'a [StageSpan],
    /// Cost model (for pipeline point-to-point transfers).
    pub cost: &'a CostModel,
    /// Whether neighbouring pipeline stages sit on different nodes.
    pub pp_cross_node: bool,
    /// Record every event and the memory timeline (for traces); off during search.
    pub detail: bool,
    /// How the engine overlaps data-parallel communication with compute.
    pub overlap: Overlap,
    /// Which links data-parallel collectives share with other traffic.
    pub links: SharedLinks,
}

/// Links that data-parallel collectives share with other traffic of the same device
/// (see [`overlap`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SharedLinks {
    /// The data-parallel group has members inside a node (its ring, or its
    /// hierarchical collective's intra-node phases, run on the intra-node link) and the
    /// tensor-parallel group, inside the node, uses that link too.
    pub tp: bool,
    /// The data-parallel group crosses nodes and pipeline sends cross nodes too: both
    /// use the inter-node link.
    pub pp: bool,
}

impl SharedLinks {
    /// The links a data-parallel group `dp` shares with tensor-parallel group `tp`
    /// (inside a node) and with pipeline sends (`pp_cross_node` when they leave the
    /// node).
    pub fn of(tp: crate::cost::Group, dp: crate::cost::Group, pp_cross_node: bool) -> SharedLinks {
        SharedLinks {
            tp: tp.size > 1 && dp.size > 1 && dp.per_node > 1,
            pp: pp_cross_node && dp.nodes() > 1,
        }
    }
}

struct Vs {
    fwd: f64,
    bwd: f64,
    recompute: f64,
    tp: f64,
    ep: f64,
    dp_exposed_fwd: f64,
    dp_exposed_bwd: f64,
    saved: u64,
    /// Peak during the forward: (bytes above the in-flight activations, of which
    /// this micro-batch's own saved activations).
    fwd_peak: (u64, u64),
    /// Same for the backward.
    bwd_peak: (u64, u64),
    p2p_out: f64,
    flops: f64,
    recompute_flops: f64,
    /// Forward and backward work per block, in pass order.
    fwd_work: Vec<Work>,
    bwd_work: Vec<Work>,
    /// Once-per-step gradient reduction (ZeRO-0/1) per block, backward order.
    grad_s: Vec<f64>,
    /// Post-optimizer parameter gather per block, forward order.
    param_s: Vec<f64>,
    fwd_t: Timeline,
    bwd_t: Timeline,
    bucket: Bucket,
}

fn summarize(blocks: &Blocks, k: usize, input: &SimInput) -> Vs {
    let span = input.stages[k];
    let pp = input.config.pp.max(1);
    let mut v = Vs {
        fwd: 0.0,
        bwd: 0.0,
        recompute: 0.0,
        tp: 0.0,
        ep: 0.0,
        dp_exposed_fwd: 0.0,
        dp_exposed_bwd: 0.0,
        saved: 0,
        fwd_peak: (0, 0),
        bwd_peak: (0, 0),
        p2p_out: 0.0,
        flops: 0.0,
        recompute_flops: 0.0,
        fwd_work: Vec::new(),
        bwd_work: Vec::new(),
        grad_s: Vec::new(),
        param_s: Vec::new(),
        fwd_t: Timeline::default(),
        bwd_t: Timeline::default(),
        bucket: input.overlap.bucket(k as u32 % pp, k as u32 / pp, pp),
    };
    // Pipeline boundaries move the tensors that cross them: a stage keeps the
    // boundary tensors it receives (the next block's backward reads them) and frees
    // the ones it sends once its forward is done (its own backward does not read
    // them). Block profiles count a tensor in its producer's block, so a stage's
    // in-flight activations are its blocks' saved bytes minus what it sends plus what
    // it receives. The received bytes are the saved bytes that the block before the
    // stage leaves for a later block (at most its boundary).
    let boundary_after = |i: usize| blocks.refs(i, i).next().map_or(0, |b| b.boundary);
    let received = if span.first > 0 {
        let prev = blocks.refs(span.first - 1, span.first - 1).next();
        prev.map_or(0, |b| b.boundary.min(b.saved))
    } else {
        0
    };
    let mut held = received;
    let shared = |t: f64| if input.links.tp { t } else { 0.0 };
    let mut compute = (0.0f64, 0.0f64);
    for b in blocks.refs(span.first, span.last) {
        v.fwd_work.push(Work {
            compute_s: b.fwd_s,
            link_s: shared(b.tp_fwd_s),
            gather_s: b.dp_fwd_s,
            reduce_s: 0.0,
            elems: b.param_elems,
        });
        v.bwd_work.push(Work {
            compute_s: b.bwd_s,
            link_s: shared(b.tp_comm_s - b.tp_fwd_s),
            gather_s: b.dp_bwd_s,
            reduce_s: b.dp_reduce_s,
            elems: b.param_elems,
        });
        v.grad_s.push(b.dp_grad_s);
        v.param_s.push(b.dp_param_s);
        compute.0 += b.fwd_s;
        compute.1 += b.bwd_s;
        v.recompute += b.recompute_s;
        v.tp += b.tp_comm_s;
        v.ep += b.ep_comm_s;
        if held + b.fwd_extra > v.fwd_peak.0 {
            v.fwd_peak = (held + b.fwd_extra, held);
        }
        if held + b.bwd_extra > v.bwd_peak.0 {
            v.bwd_peak = (held + b.bwd_extra, held);
        }
        held += b.saved;
        v.flops += b.flops;
        v.recompute_flops += b.recompute_flops;
    }
    let last_saved = blocks
        .refs(span.last, span.last)
        .next()
        .map_or(0, |b| b.saved);
    let sent = if span.last + 1 < blocks.len() {
        boundary_after(span.last).min(last_saved)
    } else {
        0
    };
    v.saved = held.saturating_sub(sent);
    let boundary = boundary_after(span.last) as f64;
    let tp = f64::from(input.config.tp.max(1));
    // Megatron's scatter/gather optimization sends 1/t of a replicated boundary tensor.
    let bytes = if input.config.sp {
        boundary
    } else {
        boundary / tp
    };
    v.p2p_out = input.cost.p2p_time(bytes, input.pp_cross_node);
    // The send into this stage (the one before it sends what it cut off).
    let p2p_in = if span.first > 0 {
        let b = boundary_after(span.first - 1) as f64;
        let b = if input.config.sp { b } else { b / tp };
        input.cost.p2p_time(b, input.pp_cross_node)
    } else {
        0.0
    };
    v.bwd_work.reverse();
    v.grad_s.reverse();
    let nvs = input.stages.len();
    let busy = |sends: bool, t: f64| if input.links.pp && sends { t } else { 0.0 };
    v.fwd_t = overlap::run(
        &v.fwd_work,
        &overlap::Rules {
            bucket: v.bucket,
            prefetch: input.overlap.prefetch,
            busy_s: busy(k + 1 < nvs, v.p2p_out),
            slowdown: input.cost.eff.overlap_slowdown,
        },
    );
    v.bwd_t = overlap::run(
        &v.bwd_work,
        &overlap::Rules {
            bucket: v.bucket,
            prefetch: input.overlap.prefetch,
            busy_s: busy(k > 0, p2p_in),
            slowdown: input.cost.eff.overlap_slowdown,
        },
    );
    v.fwd = v.fwd_t.end_s();
    v.bwd = v.bwd_t.end_s();
    v.dp_exposed_fwd = (v.fwd - compute.0).max(0.0);
    v.dp_exposed_bwd = (v.bwd - compute.1).max(0.0);
    v
}

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<f64>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Simulates one step. `blocks` are the per-device block profiles in model order.
pub fn simulate(blocks: &Blocks, input: &SimInput) -> Simulation {
    let cfg = input.config;
    let pp = cfg.pp.max(1);
    let v = cfg.schedule.chunks();
    let m = cfg.num_micro_batches.max(1);
    let nvs = input.stages.len();
    let vs: Vec<Vs> = (0..nvs).map(|k| summarize(blocks, k, input)).collect();
    let idx = |c: u32, mb: u32| -> usize { c as usize * m as usize + mb as usize };
    let vstage = |s: u32, c: u32| -> usize { (c * pp + s) as usize };

    // Persistent bytes per device.
    let mut states = vec![StateBytes::default(); pp as usize];
    let mut opt_s = vec![0.0; pp as usize];
    let mut param_gather_s = vec![0.0; pp as usize];
    let mut opt_extra = vec![0u64; pp as usize];
    for (i, span) in input.stages.iter().enumerate() {
        let dev = i % pp as usize;
        for b in blocks.refs(span.first, span.last) {
            states[dev].add(&b.states);
            opt_s[dev] += b.opt_s;
            opt_extra[dev] = opt_extra[dev].max(b.opt_extra);
            // A borrowed parameter (a tied head) whose owner runs on another device:
            // this device keeps a copy with its gradient and optimizer state, and the
            // two devices all-reduce the copies' gradients before the step
            // (`profile::Borrowed`), over the pipeline's link.
            if let Some(copy) = b.borrowed {
                let owner_dev = blocks.index_of(copy.owner).and_then(|o| {
                    input
                        .stages
                        .iter()
                        .position(|s| (s.first..=s.last).contains(&o))
                        .map(|k| k % pp as usize)
                });
                if owner_dev.is_some_and(|o| o != dev) {
                    states[dev].add(&copy.states);
                    opt_s[dev] += copy.opt_s;
                    let pair = Group {
                        size: 2,
                        per_node: if input.pp_cross_node { 1 } else { 2 },
                    };
                    let t = input.cost.collective_time(
                        crate::cost::Collective::AllReduce,
                        copy.states.grads as f64,
                        pair,
                    );
                    opt_s[dev] += t;
                    if let Some(o) = owner_dev {
                        opt_s[o] += t;
                    }
                }
            }
        }
    }
    // Gradient clipping before the step (`crate::cost::overhead`): the norm over the
    // gradients this device's optimizer updates (all its gradients, or their 1/dp
    // share under ZeRO-1, whose gradients are whole but whose optimizer is sharded),
    // all-reduced over the ranks that hold the others: the model-parallel group, and
    // the data-parallel one too when gradients or optimizer are sharded.
    let clip_group = {
        let mp = cfg.tp.max(1) * pp;
        let per_node = input.cost.cluster.devices_per_node.max(1);
        if cfg.zero >= 1 && cfg.dp > 1 {
            let n = mp * cfg.dp;
            Group {
                size: n,
                per_node: per_node.min(n),
            }
        } else {
            Group {
                size: mp,
                per_node: cfg.tp.max(1).min(per_node),
            }
        }
    };
    for d in 0..pp as usize {
        let grads = if cfg.zero == 1 {
            states[d].grads as f64 / f64::from(cfg.dp.max(1))
        } else {
            states[d].grads as f64
        };
        opt_s[d] += input.cost.grad_clip_time(grads, clip_group);
    }

    let orders: Vec<schedule::DeviceOrder> = (0..pp)
        .map(|s| schedule::DeviceOrder::new(cfg.schedule, s, pp, m))
        .collect();
    // End times per (virtual stage, micro-batch), in reused per-thread buffers: large
    // pipelines have hundreds of thousands of entries, and fresh zeroed pages per
    // candidate cost more than the simulation.
    let mut ends = SCRATCH.with(|c| c.take());
    ends.clear();
    ends.resize(2 * nvs * m as usize, f64::NAN);
    let (f_end, b_end) = ends.split_at_mut(nvs * m as usize);
    let mut pos = vec![0usize; pp as usize];
    let mut free_at = vec![0.0f64; pp as usize];
    let mut busy = vec![0.0f64; pp as usize];
    let mut p2p_wait = vec![0.0f64; pp as usize];
    let mut events = Vec::with_capacity(if input.detail {
        orders.iter().map(schedule::DeviceOrder::len).sum()
    } else {
        0
    });
    let mut comm_events = Vec::new();
    let mut inflight = vec![0u64; pp as usize];
    let mut peak = vec![(0u64, 0u64, 0u64); pp as usize]; // (total, activations, temporary)
    let mut timeline: Vec<Vec<MemSample>> = (0..pp as usize)
        .map(|d| {
            if input.detail {
                vec![MemSample {
                    t: 0.0,
                    bytes: states[d].total(),
                    activations: 0,
                    temporary: 0,
                }]
            } else {
                Vec::new()
            }
        })
        .collect();

    loop {
        let mut progressed = false;
        let mut done = true;
        for s in 0..pp {
            let d = s as usize;
            while pos[d] < orders[d].len() {
                let step = orders[d].step(pos[d]);
                let k = vstage(s, step.chunk);
                let i = idx(k as u32, step.micro_batch);
                let dep = match step.pass {
                    Pass::F if k == 0 => Some(0.0),
                    Pass::F => {
                        let e = f_end[idx(k as u32 - 1, step.micro_batch)];
                        (!e.is_nan()).then(|| e + vs[k - 1].p2p_out)
                    }
                    Pass::B if k + 1 == nvs => {
                        let e = f_end[i];
                        (!e.is_nan()).then_some(e)
                    }
                    Pass::B => {
                        let e = b_end[idx(k as u32 + 1, step.micro_batch)];
                        (!e.is_nan()).then(|| e + vs[k].p2p_out)
                    }
                };
                let Some(ready) = dep else {
                    break;
                };
                let start = free_at[d].max(ready);
                if ready > free_at[d] {
                    let p2p = match step.pass {
                        Pass::F if k > 0 => vs[k - 1].p2p_out,
                        Pass::B if k + 1 < nvs => vs[k].p2p_out,
                        _ => 0.0,
                    };
                    p2p_wait[d] += p2p.min(ready - free_at[d]);
                }
                let dur = match step.pass {
                    Pass::F => vs[k].fwd,
                    Pass::B => vs[k].bwd,
                };
                let end = start + dur;
                let base = states[d].total();
                let (extra, after) = match step.pass {
                    Pass::F => (vs[k].fwd_peak, inflight[d] + vs[k].saved),
                    Pass::B => {
                        inflight[d] -= vs[k].saved;
                        (vs[k].bwd_peak, inflight[d])
                    }
                };
                let during = base + inflight[d] + extra.0;
                if during > peak[d].0 {
                    peak[d] = (during, inflight[d] + extra.1, extra.0 - extra.1);
                }
                timeline[d].push(MemSample {
                    t: start,
                    bytes: during,
                    activations: inflight[d] + extra.1,
                    temporary: extra.0 - extra.1,
                });
                inflight[d] = after;
                timeline[d].push(MemSample {
                    t: end,
                    bytes: base + inflight[d],
                    activations: inflight[d],
                    temporary: 0,
                });
                match step.pass {
                    Pass::F => f_end[i] = end,
                    Pass::B => b_end[i] = end,
                }
                let sends = match step.pass {
                    Pass::F => k + 1 < nvs,
                    Pass::B => k > 0,
                };
                let p2p = match step.pass {
                    Pass::F => vs[k].p2p_out,
                    Pass::B if k > 0 => vs[k - 1].p2p_out,
                    Pass::B => 0.0,
                };
                if input.detail && sends && p2p > 0.0 {
                    comm_events.push(CommEvent {
                        stage: s,
                        block: None,
                        what: CommKind::Send,
                        start: end,
                        end: end + p2p,
                    });
                }
                // Sends block the sender until the receiver has the data (Megatron-LM's
                // 1F1B `p2p_communication._communicate` waits on its requests and
                // synchronizes; DeepSpeed's pipeline engine sends with blocking
                // `dist.send`). The interleaved schedule overlaps them with the next
                // chunk's compute (Megatron-LM `overlap_p2p_comm`, on unless
                // `--no-overlap-p2p-communication`).
                let blocking = if sends && v == 1 { p2p } else { 0.0 };
                p2p_wait[d] += blocking;
                free_at[d] = end + blocking;
                busy[d] += dur;
                if input.detail {
                    events.push(Event {
                        stage: s,
                        pass: step.pass,
                        chunk: step.chunk,
                        micro_batch: step.micro_batch,
                        start,
                        end,
                    });
                }
                pos[d] += 1;
                progressed = true;
            }
            if pos[d] < orders[d].len() {
                done = false;
            }
        }
        if done {
            break;
        }
        assert!(progressed, "pipeline schedule deadlocked (internal bug)");
    }

    // Once-per-step gradient reduction (ZeRO-0/1) by buckets during the last backward
    // of each chunk, on the device's communication stream; then the optimizer and the
    // parameter gather.
    let mut finish = vec![0.0f64; pp as usize];
    let mut dp_exposed = vec![0.0f64; pp as usize];
    for s in 0..pp {
        let d = s as usize;
        let mut comm = 0.0f64;
        // Without overlap every reduction waits for the stage's last backward.
        let mut after_step = 0.0f64;
        for c in (0..v).rev() {
            let k = vstage(s, c);
            if vs[k].grad_s.iter().all(|&g| g <= 0.0) {
                continue;
            }
            if vs[k].bucket == Bucket::Step {
                // Once-per-step reductions only: a micro-batch's reduce-scatter
                // (ZeRO-2/3) is in the backward already.
                after_step += vs[k].grad_s.iter().sum::<f64>();
                continue;
            }
            let span = input.stages[k];
            let end_of_chunk = (0..m)
                .map(|mb| b_end[idx(k as u32, mb)])
                .fold(0.0f64, f64::max);
            let start = end_of_chunk - vs[k].bwd;
            let work: Vec<Work> = vs[k]
                .bwd_work
                .iter()
                .zip(&vs[k].grad_s)
                .map(|(w, &g)| Work {
                    reduce_s: w.reduce_s + g,
                    ..*w
                })
                .collect();
            let t = overlap::run(
                &work,
                &overlap::Rules {
                    bucket: vs[k].bucket,
                    prefetch: input.overlap.prefetch,
                    busy_s: (comm - start).max(0.0),
                    slowdown: input.cost.eff.overlap_slowdown,
                },
            );
            comm = comm.max(start + t.comm_end_s);
            if input.detail {
                for (back, slot) in t.slots.iter().enumerate() {
                    if slot.reduce.1 > slot.reduce.0 {
                        comm_events.push(CommEvent {
                            stage: s,
                            block: blocks.block(span.last - back),
                            what: CommKind::GradReduce,
                            start: start + slot.reduce.0,
                            end: start + slot.reduce.1,
                        });
                    }
                }
            }
        }
        // The post-optimizer gather: after the step, or hidden in the next step's first
        // forward of each chunk (run back to back) where prefetching hides it.
        let gather_total: f64 = (0..v).flat_map(|c| vs[vstage(s, c)].param_s.iter()).sum();
        let param_gather = match input.overlap.param_gather {
            ParamGather::AfterStep => gather_total,
            ParamGather::NextForward if gather_total > 0.0 => {
                let plain: Vec<Work> = (0..v)
                    .flat_map(|c| vs[vstage(s, c)].fwd_work.iter().copied())
                    .collect();
                let with: Vec<Work> = (0..v)
                    .flat_map(|c| {
                        let x = &vs[vstage(s, c)];
                        x.fwd_work.iter().zip(&x.param_s).map(|(w, &g)| Work {
                            gather_s: w.gather_s + g,
                            ..*w
                        })
                    })
                    .collect();
                let rules = overlap::Rules {
                    bucket: Bucket::Block,
                    prefetch: input.overlap.prefetch,
                    busy_s: 0.0,
                    slowdown: input.cost.eff.overlap_slowdown,
                };
                (overlap::run(&with, &rules).end_s() - overlap::run(&plain, &rules).end_s())
                    .max(0.0)
            }
            ParamGather::NextForward => 0.0,
        };
        param_gather_s[d] = param_gather;
        let compute_end = free_at[d];
        if after_step > 0.0 {
            comm = comm.max(compute_end) + after_step;
        }
        let end = compute_end.max(comm);
        let mut push = |what, start: f64, stop: f64| {
            if input.detail && stop > start {
                comm_events.push(CommEvent {
                    stage: s,
                    block: None,
                    what,
                    start,
                    end: stop,
                });
            }
        };
        push(CommKind::DpReduce, compute_end, end);
        push(CommKind::Optimizer, end, end + opt_s[d]);
        push(
            CommKind::ParamGather,
            end + opt_s[d],
            end + opt_s[d] + param_gather_s[d],
        );
        dp_exposed[d] = end - compute_end;
        finish[d] = end + opt_s[d] + param_gather_s[d];
        dp_exposed[d] += param_gather_s[d];
        if input.detail {
            timeline[d].push(MemSample {
                t: end,
                bytes: states[d].total() + opt_extra[d],
                activations: 0,
                temporary: opt_extra[d],
            });
            timeline[d].push(MemSample {
                t: finish[d],
                bytes: states[d].total(),
                activations: 0,
                temporary: 0,
            });
        }
        let opt_peak = states[d].total() + opt_extra[d];
        if opt_peak > peak[d].0 {
            peak[d] = (opt_peak, 0, opt_extra[d]);
        }
    }
    SCRATCH.with(|c| c.replace(ends));
    let step_time_s = finish.iter().copied().fold(0.0, f64::max);
    let critical = finish
        .iter()
        .enumerate()
        .fold(0, |best, (i, &f)| if f > finish[best] { i } else { best });

    let mut br = TimeBreakdown::default();
    {
        let d = critical;
        let mut recompute = 0.0;
        let mut tp = 0.0;
        let mut ep = 0.0;
        let mut dp_mb = 0.0;
        for c in 0..v {
            let k = vstage(d as u32, c);
            recompute += vs[k].recompute * f64::from(m);
            tp += vs[k].tp * f64::from(m);
            ep += vs[k].ep * f64::from(m);
            dp_mb += (vs[k].dp_exposed_fwd + vs[k].dp_exposed_bwd) * f64::from(m);
        }
        br.recompute_s = recompute;
        br.tp_comm_s = tp - ep;
        br.ep_comm_s = ep;
        br.dp_comm_s = dp_exposed[d] + dp_mb;
        br.compute_s = busy[d] - recompute - tp - dp_mb;
        br.pp_comm_s = p2p_wait[d];
        br.bubble_s = (free_at[d] - busy[d] - p2p_wait[d]).max(0.0);
        br.optimizer_s = opt_s[d];
    }

    let memory = (0..pp as usize)
        .map(|d| StageMemory {
            stage: d as u32,
            peak_bytes: peak[d].0,
            params: states[d].low_prec_params + states[d].master_params,
            grads: states[d].grads,
            optimizer: states[d].optimizer,
            activations: peak[d].1,
            temporary: peak[d].2,
            buffers: 0,
            runtime: 0,
        })
        .collect();
    let flops_per_device = (0..pp)
        .map(|s| {
            (0..v)
                .map(|c| vs[vstage(s, c)].flops * f64::from(m))
                .sum::<f64>()
        })
        .collect();
    let recompute_flops_per_device = (0..pp)
        .map(|s| {
            (0..v)
                .map(|c| vs[vstage(s, c)].recompute_flops * f64::from(m))
                .sum::<f64>()
        })
        .collect();
    let block_timings = if input.detail {
        input
            .stages
            .iter()
            .zip(&vs)
            .map(|(span, x)| block_timings(blocks, *span, x))
            .collect()
    } else {
        Vec::new()
    };
    Simulation {
        blocks: block_timings,
        step_time_s,
        memory,
        stage_time_s: vs.iter().map(|x| x.fwd + x.bwd).collect(),
        breakdown: br,
        flops_per_device,
        recompute_flops_per_device,
        events,
        comm: comm_events,
        timeline,
    }
}

/// Each block's share of a virtual stage's forward and backward units, from the
/// passes' timelines.
fn block_timings(blocks: &Blocks, span: StageSpan, x: &Vs) -> Vec<BlockTiming> {
    let n = x.fwd_t.slots.len();
    let gap = |slots: &[overlap::Slot], i: usize| {
        let before = if i == 0 { 0.0 } else { slots[i - 1].end_s };
        slots[i].end_s - before
    };
    (span.first..=span.last)
        .zip(blocks.refs(span.first, span.last))
        .enumerate()
        .map(|(i, (b_i, b))| {
            let f = x.fwd_t.slots[i];
            let j = n - 1 - i;
            let bw = x.bwd_t.slots[j];
            BlockTiming {
                block: blocks.block(b_i),
                fwd_s: gap(&x.fwd_t.slots, i),
                bwd_s: gap(&x.bwd_t.slots, j),
                tp_fwd_s: b.tp_fwd_s,
                tp_bwd_s: b.tp_comm_s - b.tp_fwd_s,
                recompute_s: b.recompute_s,
                dp_fwd_s: f.gather.1 - f.gather.0,
                dp_fwd_at_s: f.gather.0,
                dp_bwd_s: bw.gather.1 - bw.gather.0,
                dp_bwd_at_s: bw.gather.0,
                reduce_s: bw.reduce.1 - bw.reduce.0,
                reduce_at_s: bw.reduce.0,
            }
        })
        .collect()
}
