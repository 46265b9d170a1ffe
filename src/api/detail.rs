//! What each device of a plan runs, as typed data a compiler can consume: the rank
//! mesh, every parameter's and boundary tensor's placement, and the per-block op
//! programs.

use crate::ir::{Block, Env, Graph, OpClass, Phase, TensorId};
use crate::lower::compile::{Compiler, DeviceProgram, Evaluation, ModelSource};
use crate::models::ModelConfig;
use crate::shard::layout::Layout;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;

/// A parallel axis of the device mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    /// Tensor parallelism (Megatron's tensor-model-parallel group).
    Tp,
    /// Data parallelism (ZeRO shards over it).
    Dp,
    /// Pipeline parallelism.
    Pp,
}

/// The device mesh: how ranks map to (tensor, data, pipeline) coordinates.
///
/// Ranks are numbered with `order[0]` varying fastest: apar's cost model places tensor
/// parallelism inside a node, then data parallelism, then pipeline stages — Megatron-LM's
/// default order (`tp-cp-ep-dp-pp`, with cp = ep = 1 here). Rank `r` sits on node
/// `r / devices_per_node`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mesh {
    /// Axes from fastest- to slowest-varying.
    pub order: [Axis; 3],
    /// Tensor-parallel degree.
    pub tp: u32,
    /// Data-parallel degree.
    pub dp: u32,
    /// Pipeline stages.
    pub pp: u32,
    /// Devices per node.
    pub devices_per_node: u32,
}

/// One rank's place in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coordinates {
    /// Global rank.
    pub rank: u64,
    /// Node index.
    pub node: u64,
    /// Rank within its node.
    pub local_rank: u32,
    /// Tensor-parallel rank.
    pub tp: u32,
    /// Data-parallel rank.
    pub dp: u32,
    /// Pipeline stage.
    pub pp: u32,
}

impl Mesh {
    /// Devices in the mesh.
    pub fn devices(&self) -> u64 {
        u64::from(self.tp) * u64::from(self.dp) * u64::from(self.pp)
    }

    fn size(&self, a: Axis) -> u64 {
        u64::from(match a {
            Axis::Tp => self.tp,
            Axis::Dp => self.dp,
            Axis::Pp => self.pp,
        })
    }

    /// The coordinates of `rank`, or `None` past the last device.
    pub fn coordinates(&self, rank: u64) -> Option<Coordinates> {
        if rank >= self.devices() {
            return None;
        }
        let mut rest = rank;
        let mut at = [0u32; 3];
        for a in self.order {
            let n = self.size(a);
            at[a as usize] = (rest % n) as u32;
            rest /= n;
        }
        let per_node = u64::from(self.devices_per_node.max(1));
        Some(Coordinates {
            rank,
            node: rank / per_node,
            local_rank: (rank % per_node) as u32,
            tp: at[Axis::Tp as usize],
            dp: at[Axis::Dp as usize],
            pp: at[Axis::Pp as usize],
        })
    }

    /// The rank at coordinates (`tp`, `dp`, `pp`), or `None` outside the mesh.
    pub fn rank(&self, tp: u32, dp: u32, pp: u32) -> Option<u64> {
        if tp >= self.tp || dp >= self.dp || pp >= self.pp {
            return None;
        }
        let at = [tp, dp, pp];
        let mut rank = 0u64;
        for a in self.order.iter().rev() {
            rank = rank * self.size(*a) + u64::from(at[*a as usize]);
        }
        Some(rank)
    }

    /// Every rank with its coordinates, in rank order.
    pub fn ranks(&self) -> impl Iterator<Item = Coordinates> + '_ {
        (0..self.devices()).filter_map(|r| self.coordinates(r))
    }

    /// The ranks of `rank`'s group along `axis` (those that differ from it only in
    /// that coordinate), in axis order.
    pub fn group(&self, rank: u64, axis: Axis) -> Vec<u64> {
        let Some(c) = self.coordinates(rank) else {
            return Vec::new();
        };
        let n = self.size(axis) as u32;
        (0..n)
            .filter_map(|i| match axis {
                Axis::Tp => self.rank(i, c.dp, c.pp),
                Axis::Dp => self.rank(c.tp, i, c.pp),
                Axis::Pp => self.rank(c.tp, c.dp, i),
            })
            .collect()
    }
}

/// How the tensor-parallel group holds a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TpLayout {
    /// Every tensor-parallel rank holds all of it.
    Replicated,
    /// Split along global dimension `dim`: the dimension is cut into `groups` equal
    /// groups and tensor-parallel rank `r` holds block `r` of every group, concatenated
    /// (`groups = 1`: a plain split; `groups = 3`: a fused QKV projection split by
    /// heads, each rank holding its heads' slice of Q, of K and of V).
    Split {
        /// The split dimension.
        dim: u32,
        /// Equal groups cut before splitting.
        groups: u32,
    },
    /// Each rank holds a partial sum; the tensor is their sum.
    Partial,
}

impl From<Layout> for TpLayout {
    fn from(l: Layout) -> TpLayout {
        match l {
            Layout::Replicated => TpLayout::Replicated,
            Layout::Sharded { axis, groups } => TpLayout::Split { dim: axis, groups },
            Layout::Partial => TpLayout::Partial,
        }
    }
}

/// What a [`TensorPlacement`] describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorKind {
    /// A trainable parameter.
    Param,
    /// A forward activation read by a later block (what a pipeline cut there sends).
    Boundary,
}

/// One parameter or block-boundary tensor: its global and per-device shapes and how
/// the tensor-parallel group splits it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorPlacement {
    /// Parameter name, or `"<producer op>#<result>"` of the producing forward op for a
    /// boundary tensor. A model planned from its two-layer template names its
    /// template layers (`layers.0.…`); `blocks` says which layers have the same tensor.
    pub name: String,
    /// Parameter or boundary activation.
    pub kind: TensorKind,
    /// Block indices (0 = embedding): for a parameter the blocks holding their own copy
    /// of it; for a boundary tensor its producer block and last consumer block.
    pub blocks: [usize; 2],
    /// Element type as the IR spells it.
    pub dtype: String,
    /// Shape of the whole tensor (activations at the plan's micro-batch and sequence).
    pub global_shape: Vec<u64>,
    /// Shape of one device's tensor.
    pub local_shape: Vec<u64>,
    /// How the tensor-parallel group holds it.
    pub tp_layout: TpLayout,
    /// Whether ZeRO shards this parameter's low-precision copy over the data-parallel
    /// group (flattened, `1/dp` each; gathered before use; a routed expert's weight
    /// over the expert-data-parallel group, `1/edp`). Master weights, gradients
    /// and optimizer states follow the plan's ZeRO stage.
    pub dp_sharded: bool,
    /// Bytes of one device's tensor.
    pub bytes_per_device: u64,
}

impl TensorPlacement {
    /// The index ranges of the split global dimension that tensor-parallel rank `rank`
    /// of `tp` holds, in the order its local tensor concatenates them; empty for a
    /// replicated or partial tensor (every rank holds every index).
    pub fn tp_slices(&self, rank: u32, tp: u32) -> Vec<Range<u64>> {
        match self.tp_layout {
            TpLayout::Split { dim, groups } => {
                let n = self.global_shape.get(dim as usize).copied().unwrap_or(0);
                let (g, p) = (u64::from(groups.max(1)), u64::from(tp.max(1)));
                let group = n / g;
                let part = group / p;
                (0..g)
                    .map(|k| {
                        let start = k * group + u64::from(rank) * part;
                        start..start + part
                    })
                    .collect()
            }
            TpLayout::Replicated | TpLayout::Partial => Vec::new(),
        }
    }
}

/// One op of a device's program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpStep {
    /// The op as the text IR names it (`matmul`, `all_reduce`, `adamw`, …).
    pub op: String,
    /// Forward, backward or optimizer.
    pub phase: Phase,
    /// The group a collective runs on (`None` for compute ops).
    pub group: Option<Axis>,
    /// Whether the op is a recomputation clone of a forward op.
    pub recompute: bool,
}

/// The ops one device runs for one block, in program order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockProgram {
    /// The block as the IR names it (`embed`, `layer.0`, `head`).
    pub block: String,
    /// The block indices that run this program (a template layer stands for many).
    pub blocks: [usize; 2],
    /// Its ops in order.
    pub ops: Vec<OpStep>,
}

/// The typed detail of a plan.
pub(super) struct Detail {
    pub mesh: Mesh,
    pub tensors: Vec<TensorPlacement>,
    pub programs: Vec<BlockProgram>,
}

/// Block indices a block of the compiled graph stands for.
fn block_range(compiler: &Compiler, block: Block, order: &[Block]) -> [usize; 2] {
    match compiler.source() {
        ModelSource::Config(cfg) => {
            let l = cfg.layers as usize;
            match block {
                Block::Embed => [0, 0],
                Block::Head => [l + 1, l + 1],
                // A template layer stands for the layers of its kind; uniform models:
                // the first for every layer but the last. (Alternating local and
                // global layers interleave: the range spans the first to the last of
                // the kind.)
                Block::Layer(t) => {
                    let t = t as usize;
                    let mine: Vec<usize> = cfg
                        .template_indices()
                        .iter()
                        .enumerate()
                        .filter(|&(_, &of)| of == t)
                        .map(|(i, _)| i + 1)
                        .collect();
                    match (mine.first(), mine.last()) {
                        (Some(&a), Some(&b)) => [a, b],
                        _ => [l, l],
                    }
                }
            }
        }
        ModelSource::Graph(_) => {
            let i = order.binary_search(&block).unwrap_or(0);
            [i, i]
        }
    }
}

impl Detail {
    pub fn new(
        compiler: &Compiler,
        e: &Evaluation,
        program: &DeviceProgram,
        _config: Option<&ModelConfig>,
    ) -> Detail {
        let c = &e.config;
        let mesh = Mesh {
            order: [Axis::Tp, Axis::Dp, Axis::Pp],
            tp: c.tp,
            dp: c.dp,
            pp: c.pp,
            devices_per_node: compiler.cluster.devices_per_node,
        };
        let fwd: &Graph = program
            .sharded
            .as_ref()
            .map_or(&program.forward, |s| &s.graph);
        let mut order: Vec<Block> = fwd.ops().map(|o| fwd.node(o).block).collect();
        order.sort();
        order.dedup();
        let env = Env::new(u64::from(c.micro_batch), compiler.seq);
        let dp_sharded = c.shards_low_prec();
        let layout = |t: TensorId| -> (TpLayout, Vec<u64>) {
            let local: Vec<u64> = eval_shape(fwd, t, env);
            match &program.sharded {
                Some(s) => match s.layouts.get(t.index()) {
                    Some(v) => (
                        v.layout.into(),
                        v.logical
                            .shape
                            .dims()
                            .iter()
                            .map(|d| d.eval(env).unwrap_or(0))
                            .collect(),
                    ),
                    None => (TpLayout::Replicated, local),
                },
                None => (TpLayout::Replicated, local),
            }
        };
        // Routed-expert weights per device under the plan's expert layout (`E/ep`
        // experts, channels split by `etp`): the parameter shapes of the laid-out
        // forward graph.
        let laid = if compiler.block_layout().experts > 0 {
            let layout = crate::passes::expert::ExpertLayout {
                tp: c.tp,
                ep: c.ep,
                etp: c.etp,
            };
            crate::passes::expert::apply(fwd, layout).ok()
        } else {
            None
        };
        let expert_shapes: BTreeMap<String, crate::ir::TensorType> = laid
            .as_ref()
            .map(|g| {
                let names = crate::passes::expert::expert_param_names(g);
                g.ops()
                    .filter_map(|o| match g.op(o) {
                        crate::ir::Op::Param { name } if names.contains(name) => {
                            Some((name.clone(), g.ty(g.node(o).results[0]).clone()))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut tensors = Vec::new();
        for id in fwd.ops() {
            let node = fwd.node(id);
            for (k, &r) in node.results.iter().enumerate() {
                let tensor = fwd.tensor(r);
                let ty = fwd.ty(r);
                let bytes = ty.bytes_at(env).unwrap_or(0);
                let kind = match (&node.op, tensor.role) {
                    (crate::ir::Op::Param { .. }, _) => TensorKind::Param,
                    (_, role) if role.is_persistent() => continue,
                    _ => {
                        let last = fwd
                            .uses(r)
                            .iter()
                            .map(|&u| fwd.node(u))
                            .filter(|u| u.phase == Phase::Fwd && u.block != node.block)
                            .map(|u| u.block)
                            .max();
                        match last {
                            Some(_) => TensorKind::Boundary,
                            None => continue,
                        }
                    }
                };
                let (tp_layout, global_shape) = layout(r);
                let here = block_range(compiler, node.block, &order);
                let blocks = match kind {
                    TensorKind::Param => here,
                    TensorKind::Boundary => {
                        let last = fwd
                            .uses(r)
                            .iter()
                            .map(|&u| fwd.node(u).block)
                            .max()
                            .unwrap_or(node.block);
                        [here[0], block_range(compiler, last, &order)[1]]
                    }
                };
                let name = match &node.op {
                    crate::ir::Op::Param { name } => name.clone(),
                    op => format!("{}{}#{k}", op.name(), id),
                };
                // Ranks the low-precision copy is sharded over: the data-parallel ones,
                // the expert-data-parallel ones for a routed expert's weight.
                let sharded_over = match (dp_sharded, expert_shapes.contains_key(&name)) {
                    (false, _) => 1,
                    (true, false) => c.dp,
                    (true, true) => c.expert_dp(),
                };
                let (local_shape, bytes) = match expert_shapes.get(&name) {
                    Some(t) => (
                        t.shape
                            .dims()
                            .iter()
                            .map(|d| d.eval_ceil(env).unwrap_or(0))
                            .collect(),
                        t.bytes_at(env).unwrap_or(0),
                    ),
                    None => (eval_shape(fwd, r, env), bytes),
                };
                tensors.push(TensorPlacement {
                    name,
                    kind,
                    blocks,
                    dtype: ty.dtype.to_string(),
                    global_shape,
                    local_shape,
                    tp_layout,
                    dp_sharded: sharded_over > 1 && kind == TensorKind::Param,
                    bytes_per_device: if sharded_over > 1 && kind == TensorKind::Param {
                        bytes.div_ceil(u64::from(sharded_over))
                    } else {
                        bytes
                    },
                });
            }
        }
        let g = &program.graph;
        let mut programs: BTreeMap<Block, BlockProgram> = BTreeMap::new();
        for id in g.ops() {
            let node = g.node(id);
            if g.op(id).is_source() {
                continue;
            }
            let collective = node.op.info().class == OpClass::Collective;
            let group = collective.then(|| {
                if program.dp_ops.contains(&id) {
                    Axis::Dp
                } else {
                    Axis::Tp
                }
            });
            programs
                .entry(node.block)
                .or_insert_with(|| BlockProgram {
                    block: node.block.to_string(),
                    blocks: block_range(compiler, node.block, &order),
                    ops: Vec::new(),
                })
                .ops
                .push(OpStep {
                    op: node.op.name().to_string(),
                    phase: node.phase,
                    group,
                    recompute: program.recomputed.contains(&id),
                });
        }
        let programs: Vec<BlockProgram> = programs.into_values().collect();
        Detail {
            mesh,
            tensors,
            programs,
        }
    }
}

fn eval_shape(g: &Graph, t: TensorId, env: Env) -> Vec<u64> {
    g.ty(t)
        .shape
        .dims()
        .iter()
        .map(|d| d.eval_ceil(env).unwrap_or(0))
        .collect()
}
