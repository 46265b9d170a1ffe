//! Compiles one configuration end to end: per-device graph (tensor parallelism),
//! training graph, recomputation, distribution, block profiles, pipeline cut,
//! schedule simulation.
//!
//! Transformer layers repeat, so a zoo model is compiled from a two-layer template
//! (embedding, two layers, head): the first layer's profile stands for every layer but
//! the last, the second for the last; an IR file is compiled whole. Profiles are cached per (tp, sp, recompute, micro-batch,
//! ZeRO stage, low-precision sharding, dp); the cache is shared by concurrent callers.

use super::profile::{profile, BlockProfile, Groups};
use super::{simulate, SimInput, Simulation, StageSpan};
use crate::cluster::Cluster;
use crate::cost::{CostModel, Group};
use crate::ir::{Block, Env, Graph};
use crate::models::{build_forward, ModelConfig};
use crate::passes::recompute::Recomputed;
use crate::passes::{distribute, pipeline, recompute, Config, Recompute, Schedule};
use crate::train::{training_graph, TrainOptions};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use thiserror::Error;

/// Default fraction of device memory a plan may use (the reference platform's headroom).
pub const DEFAULT_MEMORY_RATIO: f64 = 0.8;

/// Why a configuration cannot be compiled (bad input, not out-of-memory).
#[derive(Clone, Debug, PartialEq, Error)]
pub enum CompileError {
    /// The configuration does not fit the cluster, batch or model.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A stage of compilation failed.
    #[error("{stage}: {why}")]
    Failed {
        /// Which stage.
        stage: &'static str,
        /// What happened.
        why: String,
    },
}

/// The model a compiler plans for.
#[derive(Clone, Debug)]
pub enum ModelSource {
    /// A configuration (compiled from its one-layer template).
    Config(ModelConfig),
    /// A forward graph (compiled whole).
    Graph(Graph),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ProfileKey {
    tp: u32,
    sp: bool,
    recompute: Recompute,
    micro_batch: u32,
    zero: u8,
    low_prec_shard: bool,
    dp: u32,
}

/// The block profiles of one configuration, with range tables for the pipeline cut.
#[derive(Clone, Debug)]
pub struct ProfileSet {
    /// Per block, in model order.
    pub blocks: Vec<BlockProfile>,
    /// Model-state bytes (summed) and peak transient bytes (maximized) per block.
    states: pipeline::RangeStats,
    /// Saved activation bytes per block.
    saved: pipeline::RangeStats,
}

impl ProfileSet {
    fn new(blocks: Vec<BlockProfile>) -> ProfileSet {
        let states = pipeline::RangeStats::new(
            blocks
                .iter()
                .map(|b| (b.states.total(), b.fwd_extra.max(b.bwd_extra))),
        );
        let saved = pipeline::RangeStats::new(blocks.iter().map(|b| (b.saved, 0)));
        ProfileSet {
            blocks,
            states,
            saved,
        }
    }
}

type Profiles = Arc<Result<ProfileSet, CompileError>>;
type BlockMap = BTreeMap<Block, BlockProfile>;

/// A cache from keys to shared, possibly failed, results.
type Cache<K, V> = Mutex<BTreeMap<K, Arc<V>>>;
type Compiled<T> = Result<T, CompileError>;
/// (tp, sp, recompute, micro-batch): what block times depend on.
type BaseKey = (u32, bool, Recompute, u32);

#[derive(Default)]
struct Caches {
    /// Per-device forward graphs, by (tp, sp).
    sharded: Cache<(u32, bool), Compiled<Graph>>,
    /// Training graphs with recomputation, by (tp, sp, recompute).
    graphs: Cache<(u32, bool, Recompute), Compiled<Recomputed>>,
    /// Undistributed profiles, by (tp, sp, recompute, b).
    base: Cache<BaseKey, Compiled<BlockMap>>,
    /// Distribution profiles, by (tp, zero, low-precision sharding, dp).
    dist: Cache<(u32, u8, bool, u32), Compiled<BlockMap>>,
    profiles: Cache<ProfileKey, Compiled<ProfileSet>>,
    /// Time-balanced cuts without memory limits, by (tp, sp, recompute, b, stages).
    cuts: Cache<(BaseKey, usize), Option<Vec<StageSpan>>>,
}

/// Looks `key` up in `map`, computing and inserting it on a miss. The lock is not held
/// while computing; two threads may compute the same entry, and the first insert wins
/// (the computation is deterministic, so both are equal).
fn cached<K: Ord, V>(map: &Cache<K, V>, key: K, f: impl FnOnce() -> V) -> Arc<V> {
    if let Some(v) = map.lock().expect("cache lock").get(&key) {
        return v.clone();
    }
    let v = Arc::new(f());
    map.lock()
        .expect("cache lock")
        .entry(key)
        .or_insert(v)
        .clone()
}

/// Compiles configurations of one model on one cluster at one sequence length and
/// global batch.
pub struct Compiler {
    source: ModelSource,
    /// Forward graph compiled per configuration (the template for zoo models).
    forward: Graph,
    layers: u32,
    /// The cluster.
    pub cluster: Cluster,
    /// The cost model.
    pub cost: CostModel,
    /// Sequence length.
    pub seq: u64,
    /// Sequences per step.
    pub global_batch: u64,
    /// Memory budget per device, bytes.
    pub budget_bytes: u64,
    /// Fraction of device memory the budget is.
    pub memory_ratio: f64,
    caches: Caches,
}

/// The evaluation of one configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    /// The configuration.
    pub config: Config,
    /// Seconds per step.
    pub step_time_s: f64,
    /// Tokens per second over the cluster.
    pub tokens_per_s: f64,
    /// Achieved TFLOP/s per device (no recomputation counted).
    pub tflops_per_device: f64,
    /// Model FLOPs utilization.
    pub mfu: f64,
    /// Memory budget per device, bytes.
    pub budget_bytes: u64,
    /// Largest stage peak, bytes.
    pub peak_bytes: u64,
    /// Whether every stage's peak is within the budget.
    pub fits: bool,
    /// Block spans of the virtual stages.
    pub stages: Vec<StageSpan>,
    /// Number of blocks (embedding + layers + head).
    pub blocks: usize,
    /// The simulation.
    pub sim: Simulation,
}

impl Compiler {
    /// Prepares a compiler. `memory_ratio` is the fraction of device memory usable.
    pub fn new(
        source: ModelSource,
        cluster: Cluster,
        seq: u64,
        global_batch: u64,
        memory_ratio: f64,
    ) -> Result<Compiler, CompileError> {
        if !(memory_ratio > 0.0 && memory_ratio <= 1.0) {
            return Err(CompileError::Invalid(format!(
                "memory ratio {memory_ratio} must be in (0, 1]"
            )));
        }
        if seq == 0 || global_batch == 0 {
            return Err(CompileError::Invalid(
                "sequence length and global batch must be positive".into(),
            ));
        }
        cluster
            .validate()
            .map_err(|e| CompileError::Invalid(e.to_string()))?;
        let (forward, layers) = match &source {
            ModelSource::Config(cfg) => {
                // Two layers: `layer.0` stands for every layer but the last (its output
                // gradient sums two uses), `layer.1` for the last.
                let mut t = cfg.clone();
                t.layers = cfg.layers.min(2);
                let g = build_forward(&t).map_err(|e| CompileError::Failed {
                    stage: "model",
                    why: e.to_string(),
                })?;
                (g, cfg.layers)
            }
            ModelSource::Graph(g) => {
                let layers = g
                    .ops()
                    .filter_map(|o| match g.node(o).block {
                        Block::Layer(i) => Some(i + 1),
                        _ => None,
                    })
                    .max()
                    .unwrap_or(0);
                (g.clone(), layers)
            }
        };
        let budget_bytes = (cluster.device_memory() as f64 * memory_ratio) as u64;
        Ok(Compiler {
            source,
            forward,
            layers,
            cost: CostModel::new(cluster.clone()),
            cluster,
            seq,
            global_batch,
            budget_bytes,
            memory_ratio,
            caches: Caches::default(),
        })
    }

    /// The same compiler with other cost-model efficiencies (for calibration); caches
    /// start empty.
    pub fn with_efficiencies(&self, eff: crate::cost::Efficiencies) -> Compiler {
        let mut c = self
            .with_job(self.cluster.clone(), self.global_batch)
            .expect("the same job was valid");
        c.cost.eff = eff;
        c
    }

    /// A compiler for the same model and sequence length on another cluster or global
    /// batch, with the same memory ratio.
    pub fn with_job(&self, cluster: Cluster, global_batch: u64) -> Result<Compiler, CompileError> {
        Compiler::new(
            self.source.clone(),
            cluster,
            self.seq,
            global_batch,
            self.memory_ratio,
        )
    }

    /// Number of blocks the pipeline can cut between.
    pub fn block_count(&self) -> usize {
        match &self.source {
            ModelSource::Config(cfg) => cfg.layers as usize + 2,
            ModelSource::Graph(g) => {
                let blocks: std::collections::BTreeSet<Block> =
                    g.ops().map(|o| g.node(o).block).collect();
                blocks.len()
            }
        }
    }

    /// Trainable parameters of the model.
    pub fn param_count(&self) -> u64 {
        match &self.source {
            ModelSource::Config(cfg) => cfg.param_count(),
            ModelSource::Graph(g) => crate::train::memory::param_count(g).unwrap_or(0),
        }
    }

    /// Transformer layers of the model.
    pub fn layers(&self) -> u32 {
        self.layers
    }

    /// Checks a configuration against the cluster, the batch and the model.
    pub fn check(&self, c: &Config) -> Result<(), CompileError> {
        let bad = |s: String| Err(CompileError::Invalid(s));
        let devices = self.cluster.devices();
        if c.dp == 0 || c.tp == 0 || c.pp == 0 || c.micro_batch == 0 || c.num_micro_batches == 0 {
            return bad("degrees, micro-batch size and count must be positive".into());
        }
        if c.devices() != devices {
            return bad(format!(
                "dp {} × tp {} × pp {} = {} devices, but the cluster has {devices}",
                c.dp,
                c.tp,
                c.pp,
                c.devices()
            ));
        }
        if self.cluster.devices_per_node % c.tp != 0 {
            return bad(format!(
                "tp {} must divide the {} devices of a node",
                c.tp, self.cluster.devices_per_node
            ));
        }
        if c.global_batch() != self.global_batch {
            return bad(format!(
                "global batch {} is not dp {} × micro-batches {} × micro-batch size {} = {}",
                self.global_batch,
                c.dp,
                c.num_micro_batches,
                c.micro_batch,
                c.global_batch()
            ));
        }
        if c.zero > 3 {
            return bad(format!("ZeRO stage {} does not exist (0–3)", c.zero));
        }
        if c.sp && c.tp == 1 {
            return bad("sequence parallelism needs tp > 1".into());
        }
        let v = c.schedule.chunks();
        let stages = c.pp as usize * v as usize;
        if stages > self.block_count() {
            return bad(format!(
                "{stages} pipeline stages but the model has only {} blocks",
                self.block_count()
            ));
        }
        if let Schedule::Interleaved(_) = c.schedule {
            if c.pp < 2 || c.num_micro_batches % c.pp != 0 {
                return bad(format!(
                    "the interleaved schedule needs pp ≥ 2 and micro-batches ({}) divisible by pp ({})",
                    c.num_micro_batches, c.pp
                ));
            }
        }
        Ok(())
    }

    fn groups(&self, c: &Config) -> (Group, Group) {
        let per_node = self.cluster.devices_per_node;
        let tp = Group {
            size: c.tp,
            per_node: c.tp,
        };
        // Ranks are ordered tensor-parallel fastest, then data-parallel, then pipeline
        // (Megatron-LM's default order), so a dp group has per_node / tp members per node.
        let dp_per_node = (per_node / c.tp).clamp(1, c.dp);
        let dp = Group {
            size: c.dp,
            per_node: dp_per_node,
        };
        (tp, dp)
    }

    /// Block profiles for a configuration (cached).
    ///
    /// Composed from two cached parts: the per-micro-batch profile of the training
    /// graph with tensor parallelism and recomputation (keyed by tp, sp, recompute,
    /// micro-batch), and the distribution profile (keyed by tp, ZeRO stage,
    /// low-precision sharding, dp): model-state bytes, data-parallel collectives,
    /// optimizer time, and the transient bytes distribution adds to each block's
    /// forward and backward (gathered parameters, unreduced gradients), which do not
    /// depend on the micro-batch.
    pub fn profiles(&self, c: &Config) -> Profiles {
        let key = ProfileKey {
            tp: c.tp,
            sp: c.sp,
            recompute: c.recompute,
            micro_batch: c.micro_batch,
            zero: if c.dp > 1 { c.zero } else { 0 },
            low_prec_shard: c.dp > 1 && c.shards_low_prec(),
            dp: c.dp,
        };
        cached(&self.caches.profiles, key, || {
            self.compute_profiles(c).map(ProfileSet::new)
        })
    }

    /// Computes, in parallel and each once, the cached pieces `configs` will need
    /// (sharded and training graphs, micro-batch and distribution profiles), so that
    /// concurrent evaluations do not race to compute the same entry.
    pub fn warm(&self, configs: &[Config]) {
        use rayon::prelude::*;
        let graphs: BTreeSet<(u32, bool)> = configs.iter().map(|c| (c.tp, c.sp)).collect();
        graphs.par_iter().for_each(|&(tp, sp)| {
            cached(&self.caches.sharded, (tp, sp), || {
                per_device_forward(&self.forward, tp, sp, &self.cost)
            });
        });
        let trains: BTreeSet<(u32, bool, Recompute)> = configs
            .iter()
            .map(|c| (c.tp, c.sp, c.recompute))
            .chain(configs.iter().map(|c| (c.tp, false, Recompute::None)))
            .collect();
        trains.par_iter().for_each(|&(tp, sp, rc)| {
            self.graph(tp, sp, rc);
        });
        let bases: BTreeSet<BaseKey> = configs
            .iter()
            .map(|c| (c.tp, c.sp, c.recompute, c.micro_batch))
            .chain(configs.iter().map(|c| (c.tp, false, Recompute::None, 1)))
            .collect();
        bases.par_iter().for_each(|&(tp, sp, rc, b)| {
            self.base(tp, sp, rc, b);
        });
        let mut dists: BTreeMap<(u32, u8, bool, u32), Config> = BTreeMap::new();
        for c in configs.iter().filter(|c| c.dp > 1) {
            dists
                .entry((c.tp, c.zero, c.shards_low_prec(), c.dp))
                .or_insert(*c);
        }
        dists.par_iter().for_each(|(_, c)| {
            self.distribution(c);
        });
    }

    fn fail(stage: &'static str) -> impl Fn(&dyn std::fmt::Display) -> CompileError {
        move |e| CompileError::Failed {
            stage,
            why: e.to_string(),
        }
    }

    /// The per-device training graph with recomputation (symbolic in `b` and `s`).
    fn graph(&self, tp: u32, sp: bool, rc: Recompute) -> Arc<Result<Recomputed, CompileError>> {
        cached(&self.caches.graphs, (tp, sp, rc), || {
            let fwd = cached(&self.caches.sharded, (tp, sp), || {
                per_device_forward(&self.forward, tp, sp, &self.cost)
            });
            let fwd = fwd.as_ref().as_ref().map_err(Clone::clone)?;
            let train = training_graph(fwd, &TrainOptions::default())
                .map_err(|e| Self::fail("training graph")(&e))?;
            let r =
                recompute::apply(&train, rc, |_| true).map_err(|e| Self::fail("recompute")(&e))?;
            #[cfg(debug_assertions)]
            crate::ir::verify(&r.graph).map_err(|e| Self::fail("verify")(&e))?;
            Ok(r)
        })
    }

    fn size_error(&self) -> CompileError {
        CompileError::Invalid(format!(
            "sizes overflow or the sequence length {} is not divisible as the sharding needs",
            self.seq
        ))
    }

    /// Profiles of the undistributed training graph at micro-batch `b`.
    fn base(
        &self,
        tp: u32,
        sp: bool,
        rc: Recompute,
        b: u32,
    ) -> Arc<Result<BlockMap, CompileError>> {
        cached(&self.caches.base, (tp, sp, rc, b), || {
            let g = self.graph(tp, sp, rc);
            let g = g.as_ref().as_ref().map_err(Clone::clone)?;
            let env = Env::new(u64::from(b), self.seq);
            let none = BTreeSet::new();
            let groups = Groups {
                dp_ops: &none,
                tp: Group {
                    size: tp,
                    per_node: tp,
                },
                dp: Group::SINGLE,
            };
            profile(&g.graph, env, &self.cost, &groups, &g.clones).ok_or_else(|| self.size_error())
        })
    }

    /// What distribution changes per block (see [`Compiler::profiles`]).
    fn distribution(&self, c: &Config) -> Arc<Result<BlockMap, CompileError>> {
        let key = (c.tp, c.zero, c.shards_low_prec(), c.dp);
        cached(&self.caches.dist, key, || {
            let g = self.graph(c.tp, false, Recompute::None);
            let g = g.as_ref().as_ref().map_err(Clone::clone)?;
            let d = distribute::apply(&g.graph, c).map_err(|e| Self::fail("distribute")(&e))?;
            #[cfg(debug_assertions)]
            crate::ir::verify(&d.graph).map_err(|e| Self::fail("verify")(&e))?;
            let env = Env::new(1, self.seq);
            let (tp, dp) = self.groups(c);
            let groups = Groups {
                dp_ops: &d.dp_ops,
                tp,
                dp,
            };
            let mut with = profile(&d.graph, env, &self.cost, &groups, &BTreeSet::new())
                .ok_or_else(|| self.size_error())?;
            let without = self.base(c.tp, false, Recompute::None, 1);
            let without = without.as_ref().as_ref().map_err(Clone::clone)?;
            for (b, p) in with.iter_mut() {
                let base = without.get(b).cloned().unwrap_or_default();
                p.fwd_extra = p.fwd_extra.saturating_sub(base.fwd_extra);
                p.bwd_extra = p.bwd_extra.saturating_sub(base.bwd_extra);
            }
            Ok(with)
        })
    }

    fn compute_profiles(&self, c: &Config) -> Result<Vec<BlockProfile>, CompileError> {
        let base = self.base(c.tp, c.sp, c.recompute, c.micro_batch);
        let mut by_block = base.as_ref().as_ref().map_err(Clone::clone)?.clone();
        if c.dp > 1 {
            let dist = self.distribution(c);
            let dist = dist.as_ref().as_ref().map_err(Clone::clone)?;
            for (b, p) in by_block.iter_mut() {
                let d = dist.get(b).cloned().unwrap_or_default();
                p.states = d.states;
                p.dp_fwd_s = d.dp_fwd_s;
                p.dp_bwd_s = d.dp_bwd_s;
                p.dp_grad_s = d.dp_grad_s;
                p.dp_param_s = d.dp_param_s;
                p.opt_s = d.opt_s;
                p.opt_extra = d.opt_extra;
                p.fwd_extra += d.fwd_extra;
                p.bwd_extra += d.bwd_extra;
            }
        }
        Ok(match &self.source {
            ModelSource::Config(cfg) => {
                let get = |b: Block| by_block.get(&b).cloned().unwrap_or_default();
                let (inner, last) = (
                    get(Block::Layer(0)),
                    get(Block::Layer(cfg.layers.min(2) - 1)),
                );
                let mut out = Vec::with_capacity(cfg.layers as usize + 2);
                out.push(get(Block::Embed));
                for i in 0..cfg.layers {
                    let mut l = if i + 1 == cfg.layers {
                        last.clone()
                    } else {
                        inner.clone()
                    };
                    l.block = Some(Block::Layer(i));
                    out.push(l);
                }
                out.push(get(Block::Head));
                out
            }
            ModelSource::Graph(_) => by_block.into_values().collect(),
        })
    }

    /// Compiles and simulates one configuration, recording its events and memory
    /// timeline.
    pub fn evaluate(&self, c: &Config) -> Result<Evaluation, CompileError> {
        self.evaluate_with(c, true)
    }

    /// The pipeline cut of `c` and a lower bound on its step time: the busiest
    /// pipeline device's forward and backward work over all micro-batches plus its
    /// optimizer step, with no bubble, no waiting and every data-parallel transfer
    /// hidden. Cheaper than [`Compiler::evaluate`] (no simulation); pass the cut on to
    /// [`Compiler::evaluate_cut`].
    pub fn lower_bound(&self, c: &Config) -> Result<(f64, Vec<StageSpan>), CompileError> {
        self.check(c)?;
        if c.recompute == Recompute::Selective {
            let g = self.graph(c.tp, c.sp, c.recompute);
            if g.as_ref().as_ref().is_ok_and(|g| g.clones.is_empty()) {
                return Err(CompileError::Invalid(
                    "selective recomputation recomputes nothing in this model (no s×s attention tensors); it is the same program as --recompute none".into(),
                ));
            }
        }
        let profiles = self.profiles(c);
        let set = profiles.as_ref().as_ref().map_err(Clone::clone)?;
        let stages = self.cut(set, c)?;
        let composed = self.compose(c, &set.blocks, &stages)?;
        let blocks = composed.as_ref();
        let pp = c.pp.max(1) as usize;
        let m = f64::from(c.num_micro_batches);
        let mut busy = vec![0.0f64; pp];
        for (i, span) in stages.iter().enumerate() {
            for b in &blocks[span.first..=span.last] {
                busy[i % pp] += m * (b.fwd_s.max(b.dp_fwd_s) + b.bwd_s.max(b.dp_bwd_s)) + b.opt_s;
            }
        }
        Ok((busy.into_iter().fold(0.0, f64::max), stages))
    }

    /// Compiles and simulates one configuration; `detail` records every event and the
    /// memory timeline (needed for traces and plots, not for ranking).
    pub fn evaluate_with(&self, c: &Config, detail: bool) -> Result<Evaluation, CompileError> {
        let (_, stages) = self.lower_bound(c)?;
        self.evaluate_cut(c, stages, detail)
    }

    /// [`Compiler::evaluate_with`] on the cut [`Compiler::lower_bound`] returned.
    pub fn evaluate_cut(
        &self,
        c: &Config,
        stages: Vec<StageSpan>,
        detail: bool,
    ) -> Result<Evaluation, CompileError> {
        let profiles = self.profiles(c);
        let set = profiles.as_ref().as_ref().map_err(Clone::clone)?;
        let composed = self.compose(c, &set.blocks, &stages)?;
        let blocks = composed.as_ref();
        let stage_devices = u64::from(c.tp) * u64::from(c.dp);
        let pp_cross_node = stage_devices >= u64::from(self.cluster.devices_per_node);
        let sim = simulate(
            blocks,
            &SimInput {
                config: c,
                stages: &stages,
                cost: &self.cost,
                pp_cross_node,
                detail,
            },
        );
        let peak_bytes = sim.memory.iter().map(|m| m.peak_bytes).max().unwrap_or(0);
        let tokens = self.global_batch as f64 * self.seq as f64;
        let step = sim.step_time_s;
        let avg_flops = sim.flops_per_device.iter().sum::<u64>() as f64
            / sim.flops_per_device.len().max(1) as f64;
        let tflops = avg_flops / step / 1e12;
        Ok(Evaluation {
            config: *c,
            step_time_s: step,
            tokens_per_s: tokens / step,
            tflops_per_device: tflops,
            mfu: tflops * 1e12 / self.cluster.device.peak_bf16_flops,
            budget_bytes: self.budget_bytes,
            peak_bytes,
            fits: peak_bytes <= self.budget_bytes,
            stages,
            blocks: blocks.len(),
            sim,
        })
    }

    /// With `recompute_layers = Some(k)`, the blocks of each stage with recomputation on
    /// its first `k` layers only (the rest from the profile without recomputation); the
    /// cut is the one for recomputation on every layer, which needs the least memory.
    fn compose<'b>(
        &self,
        c: &Config,
        blocks: &'b [BlockProfile],
        stages: &[StageSpan],
    ) -> Result<std::borrow::Cow<'b, [BlockProfile]>, CompileError> {
        let Some(k) = c
            .recompute_layers
            .filter(|_| c.recompute != Recompute::None)
        else {
            return Ok(std::borrow::Cow::Borrowed(blocks));
        };
        let plain = Config {
            recompute: Recompute::None,
            recompute_layers: None,
            ..*c
        };
        let plain = self.profiles(&plain);
        let plain = &plain.as_ref().as_ref().map_err(Clone::clone)?.blocks;
        let mut out = blocks.to_vec();
        for span in stages {
            let mut layers = 0;
            for (i, b) in out
                .iter_mut()
                .enumerate()
                .take(span.last + 1)
                .skip(span.first)
            {
                if matches!(b.block, Some(Block::Layer(_))) {
                    if layers >= k {
                        *b = plain[i].clone();
                    }
                    layers += 1;
                }
            }
        }
        Ok(std::borrow::Cow::Owned(out))
    }

    /// The model this compiler plans for.
    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// The forward graph compiled per configuration: the whole graph of an IR model,
    /// or the two-layer template (`embed`, `layer.0`, `layer.1`, `head`) of a
    /// configuration, whose `layer.0` stands for every layer but the last.
    pub fn forward(&self) -> &Graph {
        &self.forward
    }

    /// The per-device program of configuration `c`, op by op (for the chosen plan, not
    /// the search): the tensor-parallel sharding with every tensor's layout, and the
    /// training graph one device runs after recomputation and distribution, with its
    /// data-parallel collectives marked.
    ///
    /// # Errors
    ///
    /// As [`Compiler::evaluate`]: the configuration is invalid or a pass fails.
    pub fn device_program(&self, c: &Config) -> Result<DeviceProgram, CompileError> {
        self.check(c)?;
        let sharded = if c.tp > 1 {
            let price = crate::shard::cost::ModelCost {
                model: &self.cost,
                group: Group {
                    size: c.tp,
                    per_node: c.tp,
                },
            };
            crate::shard::Sharder::with_cost(crate::shard::ShardOptions::new(c.tp, c.sp), &price)
                .shard_model(&self.forward)
                .map(Some)
                .map_err(|e| Self::fail("shard")(&e))?
        } else {
            None
        };
        let g = self.graph(c.tp, c.sp, c.recompute);
        let g = g.as_ref().as_ref().map_err(Clone::clone)?;
        let d = distribute::apply(&g.graph, c).map_err(|e| Self::fail("distribute")(&e))?;
        Ok(DeviceProgram {
            sharded,
            graph: d.graph,
            dp_ops: d.dp_ops,
            recomputed: g.clones.clone(),
        })
    }

    fn cut(&self, set: &ProfileSet, c: &Config) -> Result<Vec<StageSpan>, CompileError> {
        let blocks = &set.blocks;
        let pp = c.pp as usize;
        let parts = pp * c.schedule.chunks() as usize;
        let times: Vec<f64> = blocks.iter().map(|b| b.fwd_s + b.bwd_s).collect();
        // In-flight micro-batches per device: all of them for GPipe, pp - s for 1F1B.
        let inflight = |stage: usize| -> u64 {
            let s = stage % pp;
            let m = u64::from(c.num_micro_batches);
            match c.schedule {
                Schedule::Gpipe => m,
                _ => ((pp - s) as u64).min(m),
            }
        };
        let v = u64::from(c.schedule.chunks());
        let budget = self.budget_bytes;
        let (states, saved) = (&set.states, &set.saved);
        let fits = |stage: usize, first: usize, last: usize| {
            let (extra, states, saved) = (
                states.max(first, last),
                states.sum(first, last),
                saved.sum(first, last),
            );
            // A device holds v chunks; charge each chunk a 1/v share of the budget.
            (states + saved * inflight(stage) + extra) * v <= budget
        };
        // Block times do not depend on distribution, so the time-optimal cut is shared
        // by every candidate with the same (tp, sp, recompute, b); if it meets the
        // memory limits it is also the constrained optimum.
        let free = cached(
            &self.caches.cuts,
            ((c.tp, c.sp, c.recompute, c.micro_batch), parts),
            || pipeline::cut(&times, parts, |_, _, _| true),
        );
        if let Some(spans) = free.as_ref() {
            if spans
                .iter()
                .enumerate()
                .all(|(i, sp)| fits(i, sp.first, sp.last))
            {
                return Ok(spans.clone());
            }
        }
        pipeline::cut(&times, parts, fits)
            .or_else(|| free.as_ref().clone())
            .ok_or_else(|| {
                CompileError::Invalid(format!(
                    "cannot cut {} blocks into {parts} stages",
                    blocks.len()
                ))
            })
    }
}

/// What one device of a configuration runs, op by op ([`Compiler::device_program`]).
#[derive(Clone, Debug)]
pub struct DeviceProgram {
    /// The tensor-parallel sharding of the forward graph (every tensor's logical type
    /// and layout); `None` when `tp = 1` (every tensor whole on every device, the
    /// forward graph as [`Compiler::forward`]).
    pub sharded: Option<crate::shard::ShardedModel>,
    /// The training graph one device runs: forward, backward (with recomputation
    /// clones) and optimizer, with ZeRO's collectives.
    pub graph: Graph,
    /// Collectives of `graph` over the data-parallel group (the others run on the
    /// tensor-parallel group).
    pub dp_ops: BTreeSet<crate::ir::OpId>,
    /// Backward-phase clones of forward ops (recomputation).
    pub recomputed: BTreeSet<crate::ir::OpId>,
}

/// The forward graph one device runs at tensor-parallel degree `tp`: the e-graph
/// sharding of [`crate::shard`], extraction priced by `cost` on the tp group.
pub fn per_device_forward(
    fwd: &Graph,
    tp: u32,
    sp: bool,
    cost: &CostModel,
) -> Result<Graph, CompileError> {
    if tp <= 1 {
        return Ok(fwd.clone());
    }
    let price = crate::shard::cost::ModelCost {
        model: cost,
        group: Group {
            size: tp,
            per_node: tp,
        },
    };
    let mut sharder =
        crate::shard::Sharder::with_cost(crate::shard::ShardOptions::new(tp, sp), &price);
    sharder
        .shard_model(fwd)
        .map(|m| m.graph)
        .map_err(|e| CompileError::Failed {
            stage: "shard",
            why: e.to_string(),
        })
}
