//! Stitching sharded blocks into one per-device forward graph.
//!
//! Blocks are sharded in model order (embed, layers, head), each through the template
//! cache; a block's program is instantiated with the block's own parameters and the
//! per-device tensors of earlier blocks. Before the graph is written, one pass settles
//! how gradients flow back through replicated tensors (Megatron-LM's regions):
//!
//! * a replicated tensor read by an op whose result is split or partial (a
//!   column-parallel matmul, a layer norm over sequence shards, ...) gets *partial*
//!   gradients from that use; a replicated tensor read by replicated compute gets
//!   whole gradients;
//! * where a tensor has partial uses, they read it through a `tp_copy` (identity
//!   forward, all-reduce backward), one per block, placed before the first such use —
//!   unless the tensor comes from an `all_gather` all of whose uses are partial: that
//!   gather's backward reduce-scatter already sums them (sequence parallelism);
//! * an `all_gather` with whole-gradient uses becomes a `tp_gather`, whose backward
//!   keeps this device's slice.

use super::layout::Val;
use super::run::{BlockProg, PKind};
use super::template::{self, LeafKind, TemplateKey};
use super::{ShardCost, ShardError, ShardOptions, ShardedModel, TemplateRun};
use crate::ir::{Block, Graph, GraphBuilder, Op, OpId, Phase, Role, TensorId};
use std::collections::{BTreeMap, HashMap};

/// A value of the model program: result `.1` of instruction `.0`.
type MRef = (usize, u32);

/// One instruction of the per-device model program.
#[derive(Clone, Debug)]
struct MInstr {
    op: Op,
    args: Vec<MRef>,
    vals: Vec<Val>,
    block: Block,
    origin: Option<OpId>,
    /// Role of a source's result.
    role: Role,
}

/// Template runs shared across calls: key → program.
#[derive(Default)]
pub(crate) struct Cache {
    index: HashMap<TemplateKey, usize>,
    pub runs: Vec<(BlockProg, Block)>,
}

/// Shards every block of `fwd` and writes the per-device forward graph.
pub(crate) fn shard(
    fwd: &Graph,
    opts: &ShardOptions,
    cost: &dyn ShardCost,
    cache: &mut Cache,
) -> Result<ShardedModel, ShardError> {
    if opts.tp == 0 {
        return Err(ShardError::ZeroTp);
    }
    crate::ir::verify(fwd).map_err(ShardError::Invalid)?;
    if let Some(op) = fwd.ops().find(|&o| fwd.node(o).phase != Phase::Fwd) {
        return Err(ShardError::NotForward { op });
    }
    let sp = opts.sp && opts.tp > 1;
    let mut by_block: BTreeMap<Block, Vec<OpId>> = BTreeMap::new();
    for id in fwd.ops() {
        by_block.entry(fwd.node(id).block).or_default().push(id);
    }
    let mut given: BTreeMap<TensorId, Val> = BTreeMap::new();
    let mut at: BTreeMap<TensorId, MRef> = BTreeMap::new();
    let mut prog: Vec<MInstr> = Vec::new();
    let mut blocks = Vec::new();
    for (&block, ops) in &by_block {
        let (t, key) = template::build(fwd, block, ops, &given, opts.tp, sp)?;
        let (run, hit) = match cache.index.get(&key) {
            Some(&r) => (r, true),
            None => {
                let p = super::run::shard_template(&t, fwd, opts, cost)?;
                cache.runs.push((p, block));
                cache.index.insert(key, cache.runs.len() - 1);
                (cache.runs.len() - 1, false)
            }
        };
        blocks.push((block, run, hit));
        let bp = &cache.runs[run].0;
        // Instantiate: leaves are this block's sources or earlier tensors.
        let mut local: Vec<usize> = Vec::with_capacity(bp.instrs.len());
        for ins in &bp.instrs {
            let new = match &ins.kind {
                PKind::Leaf(l) => {
                    let leaf = &t.leaves[*l as usize];
                    if leaf.kind == LeafKind::Ext {
                        // Read through `resolve`, which looks the tensor up in `at`.
                        local.push(usize::MAX);
                        continue;
                    }
                    let src = fwd.tensor(leaf.tensor);
                    let node = fwd.node(src.producer);
                    prog.push(MInstr {
                        op: node.op.clone(),
                        args: vec![],
                        vals: ins.vals.clone(),
                        block,
                        origin: Some(src.producer),
                        role: src.role,
                    });
                    at.insert(leaf.tensor, (prog.len() - 1, 0));
                    given.insert(leaf.tensor, ins.vals[0].clone());
                    prog.len() - 1
                }
                PKind::Op { op, origin } => {
                    let args = ins
                        .args
                        .iter()
                        .map(|&(i, r)| resolve(&local, &bp.instrs, &t, &at, i, r))
                        .collect::<Result<Vec<_>, _>>()?;
                    prog.push(MInstr {
                        op: op.clone(),
                        args,
                        vals: ins.vals.clone(),
                        block,
                        origin: origin.map(|o| t.ops[o as usize]),
                        role: Role::Activation,
                    });
                    prog.len() - 1
                }
            };
            local.push(new);
        }
        for (k, &(tensor, _)) in t.outputs.iter().enumerate() {
            let (i, r) = bp.outputs[k];
            let m = resolve(&local, &bp.instrs, &t, &at, i, r)?;
            given.insert(tensor, prog[m.0].vals[m.1 as usize].clone());
            at.insert(tensor, m);
        }
    }
    let plan = gradient_regions(&prog, opts.tp);
    let (graph, layouts, origins) = emit(fwd, &prog, &plan, opts.tp)?;
    crate::ir::verify(&graph).map_err(|e| ShardError::Internal {
        why: format!("the sharded graph does not verify: {e}"),
    })?;
    let templates = cache
        .runs
        .iter()
        .map(|(p, b)| TemplateRun {
            first_block: *b,
            report: p.report.clone(),
        })
        .collect();
    Ok(ShardedModel {
        graph,
        tp: opts.tp,
        sp,
        layouts,
        origins,
        blocks: blocks
            .into_iter()
            .map(|(block, template, cached)| super::BlockRun {
                block,
                template,
                cached,
            })
            .collect(),
        templates,
    })
}

/// The model value of template reference `(i, r)`.
fn resolve(
    local: &[usize],
    instrs: &[super::run::PInstr],
    t: &super::template::Template,
    at: &BTreeMap<TensorId, MRef>,
    i: usize,
    r: u32,
) -> Result<MRef, ShardError> {
    match instrs[i].kind {
        PKind::Leaf(l) if t.leaves[l as usize].kind == LeafKind::Ext => {
            let leaf = &t.leaves[l as usize];
            at.get(&leaf.tensor).copied().ok_or(ShardError::Internal {
                why: format!("{} used before it is defined", leaf.tensor),
            })
        }
        _ => Ok((local[i], r)),
    }
}

/// Where `tp_copy`s go and which gathers become `tp_gather`s.
#[derive(Default)]
struct Regions {
    /// Instruction → copies to emit just before it: (value, block).
    before: BTreeMap<usize, Vec<(MRef, Block)>>,
    /// (consumer, operand) → the copy of (value, block) it reads.
    rewire: BTreeMap<(usize, usize), (MRef, Block)>,
    /// All-gathers whose backward keeps the local slice.
    tp_gathers: Vec<usize>,
}

fn is_region_op(op: &Op) -> bool {
    op.is_collective() || matches!(op, Op::TpCopy { .. } | Op::TpSplit { .. })
}

fn gradient_regions(prog: &[MInstr], parts: u32) -> Regions {
    let mut regions = Regions::default();
    if parts <= 1 {
        return regions;
    }
    let mut uses: BTreeMap<MRef, Vec<(usize, usize)>> = BTreeMap::new();
    for (j, ins) in prog.iter().enumerate() {
        for (k, &a) in ins.args.iter().enumerate() {
            uses.entry(a).or_default().push((j, k));
        }
    }
    for (v, us) in &uses {
        let val = &prog[v.0].vals[v.1 as usize];
        if !val.layout.is_replicated() || !val.logical.dtype.is_float() {
            continue;
        }
        let partial_use = |&(j, _): &(usize, usize)| {
            let c = &prog[j];
            !is_region_op(&c.op) && c.vals.first().is_some_and(|r| !r.layout.is_replicated())
        };
        let partial: Vec<(usize, usize)> = us.iter().copied().filter(partial_use).collect();
        let gather = matches!(prog[v.0].op, Op::AllGather { .. });
        if gather {
            if partial.len() == us.len() {
                continue;
            }
            regions.tp_gathers.push(v.0);
        }
        let mut first: BTreeMap<Block, usize> = BTreeMap::new();
        for &(j, k) in &partial {
            let b = prog[j].block;
            let e = first.entry(b).or_insert(j);
            *e = (*e).min(j);
            regions.rewire.insert((j, k), (*v, b));
        }
        for (b, j) in first {
            regions.before.entry(j).or_default().push((*v, b));
        }
    }
    regions
}

type Emitted = (Graph, Vec<Val>, Vec<Option<OpId>>);

fn emit(
    fwd: &Graph,
    prog: &[MInstr],
    regions: &Regions,
    parts: u32,
) -> Result<Emitted, ShardError> {
    let mut b = GraphBuilder::new(fwd.name());
    b.set_phase(Phase::Fwd);
    let mut at: Vec<Vec<TensorId>> = Vec::with_capacity(prog.len());
    let mut copies: BTreeMap<(MRef, Block), TensorId> = BTreeMap::new();
    let mut layouts: Vec<Val> = Vec::new();
    let mut origins: Vec<Option<OpId>> = Vec::new();
    let internal = |why: String| ShardError::Internal { why };
    for (j, ins) in prog.iter().enumerate() {
        for &(v, block) in regions.before.get(&j).map(Vec::as_slice).unwrap_or(&[]) {
            b.set_block(block);
            let src = at[v.0][v.1 as usize];
            let t = b
                .add1(Op::TpCopy { parts }, &[src])
                .map_err(|e| internal(e.to_string()))?;
            layouts.push(prog[v.0].vals[v.1 as usize].clone());
            origins.push(None);
            copies.insert((v, block), t);
        }
        b.set_block(ins.block);
        let results = if ins.op.is_source() {
            vec![b.source(ins.op.clone(), ins.vals[0].local.clone(), ins.role)]
        } else {
            let args: Vec<TensorId> = ins
                .args
                .iter()
                .enumerate()
                .map(|(k, &(i, r))| match regions.rewire.get(&(j, k)) {
                    Some(key) => copies[key],
                    None => at[i][r as usize],
                })
                .collect();
            let op = if regions.tp_gathers.contains(&j) {
                match ins.op {
                    Op::AllGather { axis, parts } => Op::TpGather { axis, parts },
                    ref other => other.clone(),
                }
            } else {
                ins.op.clone()
            };
            let rs = b
                .add_with_role(op, &args, Role::Activation)
                .map_err(|e| internal(e.to_string()))?;
            for (t, v) in rs.iter().zip(&ins.vals) {
                if *b.ty(*t) != v.local {
                    return Err(internal(format!(
                        "{} gives {} where the layout says {}",
                        ins.op.name(),
                        b.ty(*t),
                        v.local
                    )));
                }
            }
            rs
        };
        layouts.extend(ins.vals.iter().cloned());
        origins.push(ins.origin);
        at.push(results);
    }
    let g = b.finish();
    // One origin per op, one layout per tensor.
    debug_assert_eq!(origins.len(), g.op_count());
    debug_assert_eq!(layouts.len(), g.tensor_count());
    Ok((g, layouts, origins))
}
