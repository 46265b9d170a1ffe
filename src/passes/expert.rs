//! Expert layout: the per-device program of mixture-of-experts layers under expert
//! parallelism (EP) and expert tensor parallelism (ETP), as Megatron-Core's all-to-all
//! token dispatcher runs it (`MoEAlltoAllTokenDispatcher`,
//! `megatron/core/transformer/moe/token_dispatcher.py`, Megatron-LM `d98e8a6`).
//!
//! A graph transform on the per-device forward graph the sharding pass returns (at
//! tensor-parallel degree `tp`, experts still replicated there), before autodiff, so
//! that the backward's collectives, saved tensors and gradients come out of the
//! derivative rules. For each MoE layer (a `moe_dispatch` and the `moe_combine` of the
//! same routing indices):
//!
//! 1. **Local tokens.** Each rank routes its own `1/tp` of the tokens, as Megatron-LM
//!    does with sequence parallelism (which it requires for MoE with `tp > 1`): the
//!    router, dispatch and combine read the sequence-parallel slices (the inputs of
//!    the sharder's `tp_gather`s on the sequence axis), and the combine's output takes
//!    the place of its `tp_split`. Without sequence parallelism the slice is a
//!    `tp_split` of the replicated input and the output is gathered back
//!    (`tp_gather`).
//! 2. **Dispatch.** The `k·T` routed rows go through an `all_to_all` over the `ep`
//!    ranks of the expert-parallel group (rows split and concatenated on axis 0: a
//!    personalized exchange; balanced routing returns as many rows as were sent), then
//!    an `all_gather` over the `etp` ranks of the expert-tensor group.
//! 3. **Experts.** The stacked expert weights are the device's `E/ep` experts, the
//!    first grouped matmuls column-split (`f/etp` output channels), the last row-split
//!    (`f/etp` input channels, partial sums). Per-expert biases (`grouped_bias_add`,
//!    gpt-oss) follow the weights: `E/ep` experts, the column-split GEMMs' biases
//!    `f/etp` channels; a bias after the row-split GEMM needs `etp = 1` (as in
//!    Megatron-LM).
//! 4. **Combine.** A `reduce_scatter` over `etp` sums the partial rows and returns this
//!    rank's, an `all_to_all` over `ep` sends them home, and the combine runs on the
//!    local tokens.
//!
//! Per device the expert GEMMs do `k·T_local` rows' worth of `E`'s experts whatever `ep`
//! and `etp` are (`etp·k·T_local` rows over `f/etp` channels); summed over the `ep·etp`
//! ranks of an expert group that is exactly the layer's `k` experts per token. Expert
//! parameters per device are `1/(ep·etp)` of the layer's.
//!
//! An `all_to_all` whose split and concat axes coincide is an expert-parallel token
//! exchange: [`crate::lower::profile`] prices it on the expert-parallel group.

use crate::ir::{split_dim, Graph, GraphBuilder, Op, OpId, ShapeError, TensorId, TensorType};
use std::collections::{BTreeMap, BTreeSet};

/// The degrees that decide a device's expert program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExpertLayout {
    /// Tensor-parallel degree of the rest of the model (the token slice is `1/tp`).
    pub tp: u32,
    /// Expert-parallel degree: experts per device `E/ep`.
    pub ep: u32,
    /// Expert-tensor-parallel degree: each expert's intermediate channels `f/etp`.
    pub etp: u32,
}

impl ExpertLayout {
    /// No expert parallelism, experts on each rank's own tokens.
    pub fn is_identity(self) -> bool {
        self.tp <= 1 && self.ep <= 1 && self.etp <= 1
    }
}

/// Whether `op` is an expert-parallel token exchange (see the module doc).
pub fn is_token_exchange(op: &Op) -> bool {
    matches!(op, Op::AllToAll { split, concat, .. } if split == concat)
}

/// Names of the parameters that are routed-expert weights: the weights (input 1) of
/// `grouped_matmul` ops and the biases (input 1) of `grouped_bias_add` ops. Their
/// low-precision copies, master copies (`name.master`) and gradients are the expert
/// states that expert data parallelism reduces and shards.
pub fn expert_param_names(g: &Graph) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for id in g.ops() {
        let node = g.node(id);
        if matches!(node.op, Op::GroupedMatMul { .. } | Op::GroupedBiasAdd) {
            let Some(&w) = node.inputs.get(1) else {
                continue;
            };
            if let Op::Param { name } = g.op(g.tensor(w).producer) {
                out.insert(name.clone());
            }
        }
    }
    out
}

/// One MoE layer of the forward graph.
struct Layer {
    /// The dispatch op.
    dispatch: OpId,
    /// The combine op.
    combine: OpId,
    /// The tensors the layer's token-wise ops read whole that each rank now reads as its
    /// `1/tp` token slice: the dispatch's input and the outputs of the sharder's
    /// sequence gathers (`tp_gather` on axis 1) the combine depends on, each with the
    /// slice it gathered (`None`: the tensor is replicated, and the slice is a
    /// `tp_split` of it). With `tp = 1`, the dispatch's input only.
    boundary: BTreeMap<TensorId, Option<TensorId>>,
    /// Ops computing the combine from the boundary (router, dispatch, experts,
    /// combine).
    region: BTreeSet<OpId>,
}

/// Whether `op` is the sharder's gather of a sequence split over `tp` ranks.
fn is_seq_gather(op: &Op, tp: u32) -> bool {
    matches!(op, Op::TpGather { axis: 1, parts } if *parts == tp && tp > 1)
}

fn layers(g: &Graph, tp: u32) -> Vec<Layer> {
    let mut out = Vec::new();
    for d in g.ops() {
        let node = g.node(d);
        if !matches!(node.op, Op::MoeDispatch { .. }) || node.inputs.len() != 2 {
            continue;
        }
        let (x, idx) = (node.inputs[0], node.inputs[1]);
        let Some(&c) = g.uses(idx).iter().find(|&&u| {
            matches!(g.op(u), Op::MoeCombine { .. }) && g.node(u).inputs.get(2) == Some(&idx)
        }) else {
            continue;
        };
        // Ancestors of the combine up to the layer's input and the sequence gathers
        // (the boundary), not beyond.
        let mut up: BTreeSet<OpId> = BTreeSet::new();
        let mut boundary: BTreeMap<TensorId, Option<TensorId>> = BTreeMap::new();
        boundary.insert(x, None);
        let mut stack = vec![c];
        while let Some(o) = stack.pop() {
            if !up.insert(o) {
                continue;
            }
            for &t in &g.node(o).inputs {
                let p = g.node(g.tensor(t).producer);
                if is_seq_gather(&p.op, tp) {
                    boundary.insert(t, Some(p.inputs[0]));
                } else if t != x {
                    stack.push(g.tensor(t).producer);
                }
            }
        }
        // Descendants of the boundary, inside the ancestors: the region.
        let mut region: BTreeSet<OpId> = BTreeSet::new();
        let mut stack: Vec<OpId> = boundary.keys().flat_map(|&t| g.uses(t).to_vec()).collect();
        while let Some(o) = stack.pop() {
            if up.contains(&o) && !is_seq_gather(g.op(o), tp) && region.insert(o) {
                for &r in &g.node(o).results {
                    stack.extend_from_slice(g.uses(r));
                }
            }
        }
        out.push(Layer {
            dispatch: d,
            combine: c,
            boundary,
            region,
        });
    }
    out
}

fn shape_error(op: &Op, reason: String) -> ShapeError {
    ShapeError {
        op: op.name(),
        inputs: Vec::new(),
        reason,
    }
}

/// Rewrites every MoE layer of the per-device forward graph `g` to `layout` (see the
/// module doc). A graph without MoE layers, or the identity layout, comes back
/// unchanged (cloned).
///
/// # Errors
///
/// A [`ShapeError`] when the experts do not split (`E` not divisible by `ep`, an
/// intermediate size not divisible by `etp`) or a rewritten op rejects its inputs.
pub fn apply(g: &Graph, layout: ExpertLayout) -> Result<Graph, ShapeError> {
    let (tp, ep, etp) = (layout.tp.max(1), layout.ep.max(1), layout.etp.max(1));
    let found = layers(g, tp);
    if found.is_empty() || layout.is_identity() {
        return Ok(g.clone());
    }
    let mut in_region: BTreeMap<OpId, usize> = BTreeMap::new();
    for (i, l) in found.iter().enumerate() {
        for &o in &l.region {
            in_region.insert(o, i);
        }
    }
    // Expert weights (input 1 of the region's grouped matmuls, through the sharder's
    // `tp_copy` if it marked them): whether each is column-split (its rows are not
    // computed by an earlier grouped matmul of the layer) or row-split.
    let mut weights: BTreeMap<TensorId, (bool, bool)> = BTreeMap::new();
    // Per-expert biases `[E, n]` (input 1 of the region's `grouped_bias_add`s): whether
    // each adds to column-split channels (split `n` over etp like the weight's
    // columns) or to the row-split GEMM's partial sums.
    let mut biases: BTreeMap<TensorId, bool> = BTreeMap::new();
    let source_of = |t: TensorId| -> TensorId {
        let p = g.node(g.tensor(t).producer);
        match p.op {
            Op::TpCopy { .. } => p.inputs[0],
            _ => t,
        }
    };
    for l in &found {
        // Tensors computed from an expert GEMM's output (split channels).
        let mut split: BTreeSet<TensorId> = BTreeSet::new();
        for &o in &l.region {
            let node = g.node(o);
            if let Op::GroupedMatMul { tb } = node.op {
                let column = !split.contains(&node.inputs[0]);
                weights.insert(source_of(node.inputs[1]), (column, tb));
                if column {
                    split.extend(node.results.iter().copied());
                }
            } else if let Op::GroupedBiasAdd = node.op {
                let column = split.contains(&node.inputs[0]);
                if !column && etp > 1 {
                    // The row-split GEMM's rows are partial sums over etp: each rank
                    // adding the bias would add it etp times. Megatron-LM likewise
                    // allows biases in MoE layers only with expert tensor parallelism 1
                    // (`TransformerConfig.__post_init__`, Megatron-LM `d98e8a6`).
                    return Err(shape_error(
                        &node.op,
                        format!(
                            "a bias after the row-split expert GEMM needs etp 1, not {etp} \
                             (the partial sums would each add it)"
                        ),
                    ));
                }
                biases.insert(source_of(node.inputs[1]), column);
                if column {
                    split.extend(node.results.iter().copied());
                }
            } else if node.inputs.iter().any(|t| split.contains(t))
                && !matches!(node.op, Op::MoeCombine { .. })
            {
                split.extend(node.results.iter().copied());
            }
        }
    }
    // The sharder's sequence gathers whose every use is in a layer (the layer now
    // reads the slices), and the splits of each combine's output (now the local
    // combine itself).
    let mut skip: BTreeSet<OpId> = BTreeSet::new();
    for l in &found {
        if tp <= 1 {
            continue;
        }
        for (&t, slice) in &l.boundary {
            if slice.is_some() && g.uses(t).iter().all(|u| l.region.contains(u)) {
                skip.insert(g.tensor(t).producer);
            }
        }
        let out = g.node(l.combine).results[0];
        for &u in g.uses(out) {
            if matches!(g.op(u), Op::TpSplit { axis: 1, parts } if *parts == tp) {
                skip.insert(u);
            }
        }
    }
    let combine_layer: BTreeMap<OpId, usize> = found
        .iter()
        .enumerate()
        .map(|(i, l)| (l.combine, i))
        .collect();

    let mut b = GraphBuilder::new(g.name());
    let mut map: Vec<Option<TensorId>> = vec![None; g.tensor_count()];
    // Per layer, in the new graph: the local input (once made) and the whole output
    // (once a reader outside the layer needs it).
    let mut local_in: BTreeMap<(usize, TensorId), TensorId> = BTreeMap::new();
    let mut whole_out: BTreeMap<usize, TensorId> = BTreeMap::new();
    let get = |map: &[Option<TensorId>], t: TensorId| -> TensorId {
        map[t.index()].expect("inputs are defined earlier")
    };
    for id in g.ops() {
        let node = g.node(id);
        b.set_block(node.block);
        b.set_phase(node.phase);
        if skip.contains(&id) {
            if let Op::TpSplit { .. } = node.op {
                // A split of a combine's output: the local combine stands for it.
                map[node.results[0].index()] = map[node.inputs[0].index()];
            }
            continue;
        }
        if node.op.is_source() {
            let t = node.results[0];
            let new = match weights.get(&t) {
                Some(&(column, tb)) => {
                    let ty = g.ty(t);
                    let mut dims = ty.shape.dims().to_vec();
                    if dims.len() != 3 {
                        return Err(shape_error(&node.op, "expert weights are [E, k, n]".into()));
                    }
                    dims[0] = split_dim(dims[0], ep)
                        .map_err(|m| shape_error(&node.op, format!("experts over ep {ep}: {m}")))?;
                    // Column split: the output channels n; row split: the inputs k.
                    let ax = if column != tb { 2 } else { 1 };
                    dims[ax] = split_dim(dims[ax], etp).map_err(|m| {
                        shape_error(&node.op, format!("expert channels over etp {etp}: {m}"))
                    })?;
                    b.source(
                        node.op.clone(),
                        TensorType::new(ty.dtype, dims),
                        g.tensor(t).role,
                    )
                }
                None => match biases.get(&t) {
                    Some(&column) => {
                        let ty = g.ty(t);
                        let mut dims = ty.shape.dims().to_vec();
                        if dims.len() != 2 {
                            return Err(shape_error(&node.op, "expert biases are [E, n]".into()));
                        }
                        dims[0] = split_dim(dims[0], ep).map_err(|m| {
                            shape_error(&node.op, format!("experts over ep {ep}: {m}"))
                        })?;
                        if column {
                            dims[1] = split_dim(dims[1], etp).map_err(|m| {
                                shape_error(
                                    &node.op,
                                    format!("expert channels over etp {etp}: {m}"),
                                )
                            })?;
                        }
                        b.source(
                            node.op.clone(),
                            TensorType::new(ty.dtype, dims),
                            g.tensor(t).role,
                        )
                    }
                    None => b.copy_op(g, id, &[])?[0],
                },
            };
            map[t.index()] = Some(new);
            continue;
        }
        if let Op::TpCopy { .. } = node.op {
            // The sharder marked a replicated operand of the layer (a dispatched row
            // block, an expert weight): each rank now holds its own, so its gradient
            // is not summed over the tensor-parallel group.
            let expert_weight =
                weights.contains_key(&node.inputs[0]) || biases.contains_key(&node.inputs[0]);
            if expert_weight || in_region.contains_key(&id) {
                map[node.results[0].index()] = map[node.inputs[0].index()];
                continue;
            }
        }
        let Some(&layer) = in_region.get(&id) else {
            // Outside every MoE layer: a reader of a combine's output (other than its
            // skipped split) reads it whole.
            let mut inputs = Vec::with_capacity(node.inputs.len());
            for &t in &node.inputs {
                let from = combine_layer.get(&g.tensor(t).producer).copied();
                match from {
                    Some(i) if tp > 1 => {
                        let whole = match whole_out.get(&i) {
                            Some(&w) => w,
                            None => {
                                let op = Op::TpGather { axis: 1, parts: tp };
                                let w = b.add1(op, &[get(&map, t)])?;
                                whole_out.insert(i, w);
                                w
                            }
                        };
                        inputs.push(whole);
                    }
                    _ => inputs.push(get(&map, t)),
                }
            }
            let r = b.copy_op(g, id, &inputs)?;
            for (&old, new) in node.results.iter().zip(r) {
                map[old.index()] = Some(new);
            }
            continue;
        };
        let l = &found[layer];
        let mut inputs = Vec::with_capacity(node.inputs.len());
        for (k, &t) in node.inputs.iter().enumerate() {
            let mut v = match l.boundary.get(&t) {
                Some(_) if tp <= 1 => get(&map, t),
                Some(Some(slice)) => get(&map, *slice),
                Some(None) => match local_in.get(&(layer, t)) {
                    Some(&s) => s,
                    None => {
                        let s = b.add1(Op::TpSplit { axis: 1, parts: tp }, &[get(&map, t)])?;
                        local_in.insert((layer, t), s);
                        s
                    }
                },
                None => get(&map, t),
            };
            if id == l.combine && k == 0 {
                // Expert outputs: partial sums over etp, then home over ep.
                if etp > 1 {
                    v = b.add1(
                        Op::ReduceScatter {
                            axis: 0,
                            parts: etp,
                        },
                        &[v],
                    )?;
                }
                if ep > 1 {
                    v = b.add1(exchange(ep), &[v])?;
                }
            }
            inputs.push(v);
        }
        let mut results = b.copy_op(g, id, &inputs)?;
        if id == l.dispatch {
            let mut rows = results[0];
            if ep > 1 {
                rows = b.add1(exchange(ep), &[rows])?;
            }
            if etp > 1 {
                rows = b.add1(
                    Op::AllGather {
                        axis: 0,
                        parts: etp,
                    },
                    &[rows],
                )?;
            }
            results[0] = rows;
        }
        for (&old, new) in node.results.iter().zip(results) {
            map[old.index()] = Some(new);
        }
    }
    Ok(b.finish())
}

/// The expert-parallel token exchange over `ep` ranks: rows split and concatenated on
/// axis 0.
fn exchange(ep: u32) -> Op {
    Op::AllToAll {
        split: 0,
        concat: 0,
        parts: ep,
    }
}
