//! Distribution of model states over the data-parallel group (ZeRO stages 1–3 and
//! sharding of the low-precision parameter copy), as a graph transform that adds the
//! collectives it implies.
//!
//! Per parameter with `n` elements, over `dp` ranks (`n` padded to a multiple of `dp`):
//!
//! | stage | gradient reduction | optimizer runs on | low-precision copy |
//! |---|---|---|---|
//! | 0 | `all_reduce` once per step | whole tensor | whole, persistent |
//! | 1 | `reduce_scatter` once per step | `n/dp` shard | `all_gather` after the step |
//! | 2 | `reduce_scatter` every micro-batch | `n/dp` shard | `all_gather` after the step |
//! | 3 | as 2 | shard | `n/dp` shard; `all_gather` before each forward and backward use |
//!
//! `low_prec_shard` gives any stage the stage-3 treatment of the low-precision copy.
//! Model states then come out as the ZeRO paper's Table 1: `4Ψ + 12Ψ/N`, `2Ψ + 14Ψ/N`
//! and `16Ψ/N` bytes for stages 1, 2 and 3.

use super::Config;
use crate::ir::{
    Dim, Graph, GraphBuilder, Op, OpId, Phase, Role, Shape, ShapeError, TensorId, TensorType,
};
use std::collections::{BTreeMap, BTreeSet};

/// A distributed graph and the data-parallel collectives in it.
#[derive(Clone, Debug)]
pub struct Distributed {
    /// The per-device graph.
    pub graph: Graph,
    /// Collectives over the data-parallel group (the rest run on the tensor-parallel group).
    pub dp_ops: BTreeSet<OpId>,
    /// Collectives over the expert-data-parallel group (routed-expert states, reduced
    /// and sharded over [`Config::expert_dp`] ranks); a subset of `dp_ops`.
    pub edp_ops: BTreeSet<OpId>,
}

struct ParamInfo {
    /// Forward (low-precision) parameter source.
    lowp: TensorId,
    /// Elements of the parameter.
    numel: u64,
    /// Padded shard length.
    shard: u64,
    /// Parameter shape.
    shape: Shape,
    /// Ranks the parameter's states are reduced and sharded over: the data-parallel
    /// degree, or the expert-data-parallel degree for a routed expert's weights.
    parts: u64,
    /// ZeRO stage for this parameter (0 when it has no replica to shard over).
    zero: u8,
    /// Its low-precision copy is sharded.
    shard_lowp: bool,
    /// A routed expert's weight (collectives on the expert-data-parallel group).
    expert: bool,
}

/// Applies `cfg`'s distribution (zero, low_prec_shard) for `cfg.dp` ranks, keeping a
/// persistent low-precision parameter copy (ZeRO, Megatron-LM).
///
/// # Errors
///
/// A [`ShapeError`] when an added op rejects its inputs (an internal inconsistency).
pub fn apply(g: &Graph, cfg: &Config) -> Result<Distributed, ShapeError> {
    apply_with(g, cfg, false)
}

/// [`apply`] for an engine's [`States`](crate::engine::memory::States): with
/// `params_in_master` (FSDP), a sharded parameter has no low-precision copy at all —
/// its master shard is cast to the compute dtype before each all-gather
/// (`MixedPrecisionPolicy(param_dtype=bf16)` casts the shard, then gathers) — and each
/// gathered parameter is copied out of the all-gather's flat buffer before use
/// (FSDP2's copy-out, an [`Op::Contiguous`]).
///
/// Also handled whatever the engine: an optimizer that reads gradients in another
/// dtype than the gradient buffers (an optimizer-phase cast, Megatron-LM's fp32 main
/// gradients) gets the reduced gradient cast, on the shard when sharded; and a
/// parameter that is its own master (fp32 or bf16-optimizer runs) is updated through
/// a view of its shard and all-gathered after the step, as Megatron-LM's distributed
/// optimizer does, instead of being sharded.
///
/// # Errors
///
/// As [`apply`].
pub fn apply_with(
    g: &Graph,
    cfg: &Config,
    params_in_master: bool,
) -> Result<Distributed, ShapeError> {
    let dense_dp = u64::from(cfg.dp.max(1));
    // Routed-expert weights: reduced and sharded over the expert-data-parallel ranks.
    let experts = super::expert::expert_param_names(g);
    let expert_dp = u64::from(cfg.expert_dp().max(1));
    let degrees = |expert: bool| {
        let dp = if expert { expert_dp } else { dense_dp };
        let zero = if dp == 1 { 0 } else { cfg.zero };
        (dp, zero, dp > 1 && cfg.shards_low_prec())
    };

    // Find each AdamW op's parameter: inputs (master, grad, m, v).
    let mut adam_of_grad: BTreeMap<TensorId, OpId> = BTreeMap::new();
    let mut params: BTreeMap<OpId, ParamInfo> = BTreeMap::new();
    let mut sharded_sources: BTreeSet<TensorId> = BTreeSet::new();
    let mut refresh: BTreeMap<OpId, OpId> = BTreeMap::new();
    // Optimizer-phase casts of a gradient into the optimizer's dtype, by AdamW op.
    let mut main_cast: BTreeMap<OpId, OpId> = BTreeMap::new();
    // Master copy of each low-precision parameter that has one.
    let mut master_of_lowp: BTreeMap<TensorId, TensorId> = BTreeMap::new();
    // The AdamW op reading each master, moment and gradient tensor (the first, as a
    // scan in op order would find).
    let mut adam_of_input: BTreeMap<TensorId, OpId> = BTreeMap::new();
    // Parameter sources by name (the first of a name, as `Graph::find_source`); one
    // pass, so that finding every parameter's copy is not quadratic in the graph.
    let mut source_by_name: BTreeMap<&str, OpId> = BTreeMap::new();
    for id in g.ops() {
        if let Op::Param { name } | Op::Input { name } | Op::State { name } = g.op(id) {
            source_by_name.entry(name.as_str()).or_insert(id);
        }
    }
    for id in g.ops() {
        let node = g.node(id);
        if !matches!(node.op, Op::AdamW { .. }) {
            continue;
        }
        let master = node.inputs[0];
        let Op::Param { name } = g.op(g.tensor(master).producer) else {
            continue;
        };
        let lowp_name = name.strip_suffix(".master").unwrap_or(name);
        let lowp = source_by_name
            .get(lowp_name)
            .map(|&o| g.node(o).results[0])
            .unwrap_or(master);
        let shape = g.ty(lowp).shape.clone();
        let numel = shape.numel_at(crate::ir::Env::new(1, 1)).unwrap_or(0);
        let expert = experts.contains(lowp_name);
        let (dp, zero, shard_lowp) = degrees(expert);
        params.insert(
            id,
            ParamInfo {
                lowp,
                numel,
                shard: numel.div_ceil(dp),
                shape,
                parts: dp,
                zero,
                shard_lowp,
                expert,
            },
        );
        // The gradient buffer: the optimizer's input, or the input of the
        // optimizer-phase cast that copies it into a main gradient.
        let grad_in = node.inputs[1];
        let cast = g.tensor(grad_in).producer;
        let model_grad =
            if g.node(cast).phase == Phase::Opt && matches!(g.op(cast), Op::Cast { .. }) {
                main_cast.insert(cast, id);
                g.node(cast).inputs[0]
            } else {
                grad_in
            };
        adam_of_grad.insert(model_grad, id);
        for &t in &node.inputs {
            adam_of_input.entry(t).or_insert(id);
        }
        if lowp != master {
            master_of_lowp.insert(lowp, master);
        }
        if zero >= 1 {
            // A parameter that is its own master stays whole unless the
            // low-precision copy is sharded (it is that copy).
            if lowp != master || shard_lowp {
                sharded_sources.insert(master);
            }
            sharded_sources.extend([node.inputs[2], node.inputs[3]]);
        }
        if let Some(&u) = g
            .uses(node.results[0])
            .iter()
            .find(|&&u| matches!(g.op(u), Op::Cast { .. }) && g.node(u).phase == Phase::Opt)
        {
            refresh.insert(u, id);
        }
    }
    let lowp_of: BTreeMap<TensorId, OpId> = params.iter().map(|(&a, p)| (p.lowp, a)).collect();
    let master_shape = |p: &ParamInfo| Shape::new([Dim::lit(p.shard)]);

    let mut b = GraphBuilder::new(g.name());
    let mut dp_ops = BTreeSet::new();
    let mut edp_ops = BTreeSet::new();
    let mut map: Vec<Option<TensorId>> = vec![None; g.tensor_count()];
    // Gathered low-precision parameters for forward and backward uses.
    let mut gathered: BTreeMap<(TensorId, Phase), TensorId> = BTreeMap::new();
    // Reduced gradient per AdamW op.
    let mut reduced: BTreeMap<OpId, TensorId> = BTreeMap::new();

    let mut collective = |b: &mut GraphBuilder, op: Op, x: TensorId, role: Role, p: &ParamInfo| {
        if p.parts <= 1 {
            // No replica: nothing to reduce or gather.
            return Ok::<TensorId, ShapeError>(x);
        }
        let r = b.add_with_role(op, &[x], role)?;
        let producer = b.graph().tensor(r[0]).producer;
        dp_ops.insert(producer);
        if p.expert {
            edp_ops.insert(producer);
        }
        Ok::<TensorId, ShapeError>(r[0])
    };
    // Flatten to [n], pad to dp·shard.
    let flat = |b: &mut GraphBuilder, x: TensorId, p: &ParamInfo| -> Result<TensorId, ShapeError> {
        let dp = p.parts;
        let f = b.add1(
            Op::Reshape {
                shape: Shape::new([Dim::lit(p.numel)]),
            },
            &[x],
        )?;
        if p.shard * dp == p.numel {
            Ok(f)
        } else {
            let pad = Op::Pad {
                axis: 0,
                before: 0,
                after: p.shard * dp - p.numel,
            };
            b.add1(pad, &[f])
        }
    };
    // [dp·shard] → unpadded → parameter shape.
    let unflat =
        |b: &mut GraphBuilder, x: TensorId, p: &ParamInfo| -> Result<TensorId, ShapeError> {
            let dp = p.parts;
            let x = if p.shard * dp == p.numel {
                x
            } else {
                b.add1(
                    Op::Slice {
                        axis: 0,
                        start: 0,
                        len: p.numel,
                    },
                    &[x],
                )?
            };
            b.add1(
                Op::Reshape {
                    shape: p.shape.clone(),
                },
                &[x],
            )
        };

    for id in g.ops() {
        let node = g.node(id);
        b.set_block(node.block);
        b.set_phase(node.phase);

        // Sources that shrink to shards.
        if node.op.is_source() {
            let t = node.results[0];
            let fsdp_lowp = params_in_master
                && master_of_lowp.contains_key(&t)
                && lowp_of.get(&t).is_some_and(|a| params[a].shard_lowp);
            if fsdp_lowp {
                // No low-precision copy: the master shard, declared where the
                // parameter was, stands for it.
                let master = master_of_lowp[&t];
                let p = &params[&lowp_of[&t]];
                let ty = TensorType {
                    dtype: g.ty(master).dtype,
                    shape: master_shape(p),
                };
                let op = g.op(g.tensor(master).producer).clone();
                let new = b.source(op, ty, Role::Param);
                map[t.index()] = Some(new);
                map[master.index()] = Some(new);
                continue;
            }
            if map[t.index()].is_some() {
                // A master already declared at its parameter's place.
                continue;
            }
            let sharded_lowp = lowp_of.get(&t).is_some_and(|a| params[a].shard_lowp);
            let new = if sharded_sources.contains(&t) || sharded_lowp {
                let adam = lowp_of
                    .get(&t)
                    .copied()
                    .or_else(|| adam_of_input.get(&t).copied());
                let p = &params[&adam.expect("sharded sources belong to an AdamW op")];
                let ty = TensorType {
                    dtype: g.ty(t).dtype,
                    shape: master_shape(p),
                };
                b.source(node.op.clone(), ty, g.tensor(t).role)
            } else {
                b.copy_op(g, id, &[])?[0]
            };
            map[t.index()] = Some(new);
            continue;
        }

        // The copy of a gradient into the optimizer's dtype runs on the reduced
        // gradient (its shard when sharded).
        if let Some(&adam) = main_cast.get(&id) {
            let p = &params[&adam];
            let gr = map[node.inputs[0].index()].expect("grad defined");
            let parts = p.parts as u32;
            let reduced_grad = match (reduced.get(&adam).copied(), p.zero) {
                (Some(r), _) => r,
                (None, 0) => collective(&mut b, Op::AllReduce { parts }, gr, Role::Grad, p)?,
                (None, _) => {
                    let f = flat(&mut b, gr, p)?;
                    let rs = Op::ReduceScatter { axis: 0, parts };
                    collective(&mut b, rs, f, Role::Temporary, p)?
                }
            };
            let role = g.tensor(node.results[0]).role;
            let main = b.add_with_role(node.op.clone(), &[reduced_grad], role)?[0];
            map[node.results[0].index()] = Some(main);
            reduced.insert(adam, main);
            continue;
        }

        // Optimizer step on shards.
        if let Some(p) = params.get(&id) {
            let grad = reduced.get(&id).copied();
            let parts = p.parts as u32;
            let grad = match (grad, p.zero) {
                (Some(r), _) => r,
                (None, 0) => {
                    let gr = map[node.inputs[1].index()].expect("grad defined");
                    // In place: the result shares the gradient buffer.
                    collective(&mut b, Op::AllReduce { parts }, gr, Role::Grad, p)?
                }
                (None, _) => {
                    let gr = map[node.inputs[1].index()].expect("grad defined");
                    let f = flat(&mut b, gr, p)?;
                    // Stage 1 reduces in place into the persistent full-size buffer.
                    let rs = Op::ReduceScatter { axis: 0, parts };
                    collective(&mut b, rs, f, Role::Temporary, p)?
                }
            };
            let mut ins: Vec<TensorId> = [node.inputs[0], node.inputs[2], node.inputs[3]]
                .iter()
                .map(|&t| map[t.index()].expect("defined"))
                .collect();
            // A parameter that is its own master and stays whole: the step updates
            // this rank's shard through a view of it.
            let whole_master = p.zero >= 1 && p.lowp == node.inputs[0] && !p.shard_lowp;
            if whole_master {
                let f = b.add1(
                    Op::Reshape {
                        shape: Shape::new([Dim::lit(p.numel)]),
                    },
                    &[ins[0]],
                )?;
                ins[0] = b.add1(
                    Op::Slice {
                        axis: 0,
                        start: 0,
                        len: p.shard,
                    },
                    &[f],
                )?;
            }
            let r = b.add_with_role(
                node.op.clone(),
                &[ins[0], grad, ins[1], ins[2]],
                Role::Param,
            )?;
            b.set_role(r[1], Role::OptimizerState);
            b.set_role(r[2], Role::OptimizerState);
            if whole_master {
                // The updated shards are all-gathered back into the parameter.
                let ag = Op::AllGather { axis: 0, parts };
                collective(&mut b, ag, r[0], Role::Temporary, p)?;
            }
            for (&old, &new) in node.results.iter().zip(&r) {
                map[old.index()] = Some(new);
            }
            continue;
        }

        // The cast that refreshes the low-precision copy after the step.
        if let Some(&adam) = refresh.get(&id) {
            let p = &params[&adam];
            if params_in_master && p.shard_lowp {
                // No low-precision copy to refresh.
                continue;
            }
            let x = map[node.inputs[0].index()].expect("defined");
            let cast = b.add_with_role(node.op.clone(), &[x], Role::LowPrecParam)?[0];
            let out = if p.zero >= 1 && !p.shard_lowp {
                b.set_role(cast, Role::Temporary);
                let ag = Op::AllGather {
                    axis: 0,
                    parts: p.parts as u32,
                };
                let full = collective(&mut b, ag, cast, Role::Temporary, p)?;
                let full = unflat(&mut b, full, p)?;
                b.set_role(full, Role::LowPrecParam);
                full
            } else {
                cast
            };
            map[node.results[0].index()] = Some(out);
            continue;
        }

        // Regular op: gather sharded low-precision parameters before use.
        let mut inputs = Vec::with_capacity(node.inputs.len());
        for &t in &node.inputs {
            let mapped = map[t.index()].expect("inputs are defined earlier");
            let use_gathered = lowp_of.get(&t).is_some_and(|a| params[a].shard_lowp);
            if use_gathered {
                let key = (t, node.phase);
                let gt = match gathered.get(&key) {
                    Some(&x) => x,
                    None => {
                        let p = &params[&lowp_of[&t]];
                        let ag = Op::AllGather {
                            axis: 0,
                            parts: p.parts as u32,
                        };
                        let shard = if params_in_master && b.ty(mapped).dtype != g.ty(t).dtype {
                            let to = g.ty(t).dtype;
                            b.add_with_role(Op::Cast { to }, &[mapped], Role::Temporary)?[0]
                        } else {
                            mapped
                        };
                        let full = collective(&mut b, ag, shard, Role::Temporary, p)?;
                        let mut x = unflat(&mut b, full, p)?;
                        if params_in_master {
                            // FSDP2 gathers into one flat buffer per unit, then copies
                            // each parameter out of it on the compute stream
                            // (`foreach_all_gather_copy_out`: `split_with_sizes_copy`
                            // after waiting for the all-gather's event,
                            // `torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py`).
                            x = b.add_with_role(Op::Contiguous, &[x], Role::Temporary)?[0];
                        }
                        b.set_role(x, Role::Temporary);
                        gathered.insert(key, x);
                        x
                    }
                };
                inputs.push(gt);
            } else {
                inputs.push(mapped);
            }
        }
        let results = b.copy_op(g, id, &inputs)?;
        for (&old, &new) in node.results.iter().zip(&results) {
            map[old.index()] = Some(new);
        }

        // Gradient reduction every micro-batch (stages 2 and 3).
        for &old in &node.results {
            if let Some(&adam) = adam_of_grad.get(&old) {
                let p = &params[&adam];
                if p.zero >= 2 {
                    let gnew = map[old.index()].expect("just defined");
                    b.set_role(gnew, Role::Temporary);
                    let f = flat(&mut b, gnew, p)?;
                    let rs = Op::ReduceScatter {
                        axis: 0,
                        parts: p.parts as u32,
                    };
                    let r = collective(&mut b, rs, f, Role::Grad, p)?;
                    reduced.insert(adam, r);
                }
            }
        }
    }
    Ok(Distributed {
        graph: b.finish(),
        dp_ops,
        edp_ops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{verify, Env};
    use crate::models::{build_forward, zoo};
    use crate::passes::{Recompute, Schedule};
    use crate::train::memory::model_state_bytes;
    use crate::train::{training_graph, TrainOptions};

    fn cfg(dp: u32, zero: u8) -> Config {
        Config {
            dp,
            tp: 1,
            pp: 1,
            cp: 1,
            ep: 1,
            etp: 1,
            micro_batch: 1,
            num_micro_batches: 1,
            sp: false,
            recompute: Recompute::None,
            zero,
            low_prec_shard: false,
            schedule: Schedule::OneFOneB,
            recompute_layers: None,
            recompute_modules: None,
        }
    }

    /// Rajbhandari et al. 2020 (ZeRO), Table 1 / Sec. 5: per-device model states with
    /// Ψ parameters on N ranks are 4Ψ + 12Ψ/N (P_os), 2Ψ + 14Ψ/N (P_os+g), 16Ψ/N
    /// (P_os+g+p) bytes.
    #[test]
    fn zero_stages_match_the_zero_paper() {
        let model = zoo::lookup("tiny-gpt").unwrap();
        let psi = model.param_count() as f64;
        let g = training_graph(&build_forward(&model).unwrap(), &TrainOptions::default()).unwrap();
        let n = 8.0;
        let env = Env::new(1, 16);
        for (zero, expected) in [
            (0u8, 16.0 * psi),
            (1, 4.0 * psi + 12.0 * psi / n),
            (2, 2.0 * psi + 14.0 * psi / n),
            (3, 16.0 * psi / n),
        ] {
            let d = apply(&g, &cfg(8, zero)).unwrap();
            verify(&d.graph).unwrap();
            let got = model_state_bytes(&d.graph, env).unwrap().total() as f64;
            // Padding each tensor to a multiple of N adds at most N-1 elements per tensor.
            assert!(
                (got - expected).abs() / expected < 0.01,
                "zero {zero}: {got} vs {expected}"
            );
        }
    }
}
