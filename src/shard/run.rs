//! One sharding run: a template's e-graph, saturation under the rules with explicit
//! limits, extraction by cost, and lowering of the chosen terms to a per-device
//! program.
//!
//! Extraction is a *tree-cost* extractor (a class's cost is its node's cost plus its
//! children's, shared subterms counted once per use), with deterministic tie-breaks
//! (cost, then term height, then the node's order). The chosen program is re-scored
//! as a DAG (each class once) for the [`StopReport`].

use super::cost::{Cost, ShardCost};
use super::lang::{ClassData, ShardAnalysis, ShardGraph, ShardNode};
use super::layout::{self, Layout, Val};
use super::rules;
use super::template::{LeafKind, Template};
use super::{ShardError, ShardOptions, Stop, StopReport};
use crate::ir::{Graph, Op};
use egg::{Id, Language, Runner, SimpleScheduler, StopReason};
use std::collections::BTreeMap;
use std::time::Duration;

/// A reference to result `.1` of instruction `.0` of a [`BlockProg`].
pub(crate) type PRef = (usize, u32);

/// What a program instruction does.
#[derive(Clone, Debug)]
pub(crate) enum PKind {
    /// Declares leaf `.0` in the instruction's layout (a parameter or input stored
    /// split, or a tensor from an earlier block).
    Leaf(u32),
    /// A per-device op; `origin` is the template op it implements (its index).
    Op { op: Op, origin: Option<u32> },
}

/// One instruction of a per-device block program.
#[derive(Clone, Debug)]
pub(crate) struct PInstr {
    pub kind: PKind,
    pub args: Vec<PRef>,
    pub vals: Vec<Val>,
}

/// The sharded block: per-device instructions and where its outputs are.
#[derive(Clone, Debug)]
pub(crate) struct BlockProg {
    pub instrs: Vec<PInstr>,
    pub outputs: Vec<PRef>,
    pub report: StopReport,
}

/// Builds the template's e-graph; returns it with the root class.
fn build_egraph(t: &Template, fwd: &Graph, parts: u32) -> Result<(ShardGraph, Id), ShardError> {
    let leaves = t.leaves.iter().map(|l| l.val.clone()).collect();
    let mut eg = ShardGraph::new(ShardAnalysis::new(parts, leaves));
    let internal = |why: String| ShardError::Internal { why };
    let mut value: BTreeMap<crate::ir::TensorId, Id> = BTreeMap::new();
    for (i, leaf) in t.leaves.iter().enumerate() {
        let id = eg.add(ShardNode::Leaf { leaf: i as u32 });
        // A block receives a split tensor; its ops see the whole (gathered) one.
        let id = match leaf.val.layout {
            Layout::Replicated => id,
            Layout::Sharded { axis, groups: 1 } => eg.add(ShardNode::AllGather {
                axis,
                parts,
                args: [id],
            }),
            other => return Err(internal(format!("block input in layout {other}"))),
        };
        value.insert(leaf.tensor, id);
    }
    for (i, &op_id) in t.ops.iter().enumerate() {
        let node = fwd.node(op_id);
        let args: Box<[Id]> = node.inputs.iter().map(|x| value[x]).collect();
        let op = eg.analysis.intern(&node.op);
        let id = eg.add(ShardNode::Op {
            kind: node.op.kind(),
            op,
            tag: i as u32 + 1,
            args,
        });
        if eg[id].data.0.is_none() {
            return Err(internal(format!("{op_id} has no per-device meaning")));
        }
        if node.results.len() == 1 {
            value.insert(node.results[0], id);
        } else {
            for (k, &r) in node.results.iter().enumerate() {
                let proj = eg.add(ShardNode::Proj {
                    index: k as u32,
                    args: [id],
                });
                value.insert(r, proj);
            }
        }
    }
    let mut outs = Vec::with_capacity(t.outputs.len());
    for &(tensor, layout) in &t.outputs {
        let id = value[&tensor];
        let id = match layout {
            Layout::Replicated => id,
            Layout::Sharded { axis, groups } => eg.add(ShardNode::Shard {
                axis,
                parts,
                groups,
                args: [id],
            }),
            Layout::Partial => return Err(internal("partial block output".into())),
        };
        if eg[id].data.0.is_none() {
            return Err(internal(format!("output {tensor} cannot take {layout}")));
        }
        outs.push(id);
    }
    let root = eg.add(ShardNode::Root { args: outs.into() });
    eg.rebuild();
    Ok((eg, root))
}

/// A cost model with no weight that must be split ([`ShardCost::must_split`]): what a
/// block falls back to when no split of its weights is valid (its heads or widths do
/// not divide by the tensor-parallel degree), and what its replicated program costs.
struct AnyLayout<'a>(&'a dyn ShardCost);

impl ShardCost for AnyLayout<'_> {
    fn op_cost(
        &self,
        op: &Op,
        inputs: &[&crate::ir::TensorType],
        results: &[&crate::ir::TensorType],
        env: crate::ir::Env,
    ) -> Cost {
        self.0.op_cost(op, inputs, results, env)
    }

    fn param_cost(&self, ty: &crate::ir::TensorType, env: crate::ir::Env) -> Cost {
        self.0.param_cost(ty, env)
    }
}

/// Runs the rules on a template and lowers the cheapest per-device program.
pub(crate) fn shard_template(
    t: &Template,
    fwd: &Graph,
    opts: &ShardOptions,
    cost: &dyn ShardCost,
) -> Result<BlockProg, ShardError> {
    let parts = opts.tp;
    let sp = opts.sp && parts > 1;
    let (eg, root) = build_egraph(t, fwd, parts)?;
    let any_layout = AnyLayout(cost);
    let x = Extractor::new(&eg, t, &any_layout, opts, root);
    let replicated_cost = x.dag_cost(root);
    let rewrites = if parts > 1 {
        rules::rewrites(sp)
    } else {
        vec![]
    };
    let runner: Runner<ShardNode, ShardAnalysis, ()> = Runner::new(ShardAnalysis::default())
        .with_egraph(eg)
        .with_scheduler(SimpleScheduler)
        .with_iter_limit(opts.limits.iterations)
        .with_node_limit(opts.limits.nodes)
        // No wall-clock budget: results must not depend on the machine's speed.
        .with_time_limit(Duration::from_secs(u64::from(u32::MAX)))
        .run(&rewrites);
    let stop = match runner.stop_reason {
        Some(StopReason::Saturated) | None => Stop::Saturated,
        Some(StopReason::IterationLimit(n)) => Stop::IterationLimit { iterations: n },
        Some(StopReason::NodeLimit(n)) => Stop::NodeLimit { enodes: n },
        Some(StopReason::TimeLimit(_)) => Stop::Other {
            why: "time limit".into(),
        },
        Some(StopReason::Other(why)) => Stop::Other { why },
    };
    let eg = runner.egraph;
    let root = eg.find(root);
    let x = Extractor::new(&eg, t, cost, opts, root);
    // No program splits every weight that must be split: the block runs whole, as
    // the replicated program (reported as such, `replicated_cost_ps`).
    let x = if x.best.contains_key(&root) {
        x
    } else {
        Extractor::new(&eg, t, &any_layout, opts, root)
    };
    if !x.best.contains_key(&root) {
        return Err(ShardError::Unpriceable);
    }
    let report = StopReport {
        stop,
        iterations: runner.iterations.len(),
        enodes: eg.total_number_of_nodes(),
        eclasses: eg.number_of_classes(),
        cost_ps: x.dag_cost(root).picos(),
        replicated_cost_ps: replicated_cost.picos(),
    };
    let mut lower = Lower {
        x: &x,
        memo: BTreeMap::new(),
        instrs: Vec::new(),
    };
    let outputs = match x.best[&root].clone() {
        ShardNode::Root { args } => args
            .iter()
            .map(|&a| lower.value(a))
            .collect::<Result<Vec<_>, _>>()?,
        _ => {
            return Err(ShardError::Internal {
                why: "the root class lost its root node".into(),
            })
        }
    };
    let instrs = declare_leaves(lower.instrs, t, parts)?;
    Ok(BlockProg {
        instrs: instrs.0,
        outputs: outputs
            .iter()
            .map(|r| instrs.1[r.0].map_or(*r, |i| (i, r.1)))
            .collect(),
        report,
    })
}

/// Passes of DAG refinement after tree extraction (each pass tries every alternative
/// node of every chosen class once; a pass without improvement ends it earlier).
pub const REFINE_PASSES: usize = 4;

/// One candidate node of a class, priced.
struct Cand {
    node: ShardNode,
    /// Own cost (parameter storage excluded for DAG pricing, see [`Cand::param`]).
    own: Cost,
    /// Children classes (dense indices), unless the node declares a split source.
    kids: Vec<usize>,
    /// Whether the node is a collective.
    collective: bool,
    /// A parameter leaf this node declares, in this layout.
    param: Option<(u32, Layout, Cost)>,
}

/// The chosen node of every class: tree-cost extraction, then DAG refinement.
struct Extractor<'a> {
    eg: &'a ShardGraph,
    t: &'a Template,
    cost: &'a dyn ShardCost,
    env: crate::ir::Env,
    /// Dense class index → the class id (canonical).
    ids: Vec<Id>,
    /// Per dense class: candidates, cheapest-first tie order irrelevant.
    cands: Vec<Vec<Cand>>,
    /// Per dense class: the chosen candidate.
    choice: Vec<Option<usize>>,
    /// Chosen node per class id (what lowering reads).
    best: BTreeMap<Id, ShardNode>,
}

impl<'a> Extractor<'a> {
    fn new(
        eg: &'a ShardGraph,
        t: &'a Template,
        cost: &'a dyn ShardCost,
        opts: &ShardOptions,
        root: Id,
    ) -> Extractor<'a> {
        let mut ids: Vec<Id> = eg.classes().map(|c| c.id).collect();
        ids.sort_unstable();
        let dense: BTreeMap<Id, usize> = ids.iter().enumerate().map(|(i, &c)| (c, i)).collect();
        let mut x = Extractor {
            eg,
            t,
            cost,
            env: super::pricing_env(opts),
            cands: Vec::with_capacity(ids.len()),
            choice: vec![None; ids.len()],
            best: BTreeMap::new(),
            ids,
        };
        for k in 0..x.ids.len() {
            let c = x.ids[k];
            let mut cands = Vec::new();
            for n in &eg[c].nodes {
                let (own, declared, param) = x.own_cost(n);
                if !own.is_feasible() {
                    continue;
                }
                let kids = if declared {
                    vec![]
                } else {
                    n.children().iter().map(|&ch| dense[&eg.find(ch)]).collect()
                };
                let collective = n.is_collective();
                cands.push(Cand {
                    node: n.clone(),
                    own,
                    kids,
                    collective,
                    param,
                });
            }
            x.cands.push(cands);
        }
        x.tree();
        if let Some(&r) = dense.get(&eg.find(root)) {
            x.refine(r);
        }
        for (k, ch) in x.choice.iter().enumerate() {
            if let Some(i) = ch {
                x.best.insert(x.ids[k], x.cands[k][*i].node.clone());
            }
        }
        x
    }

    /// Tree-cost extraction: per class the candidate minimizing (cost, collectives,
    /// height, node), to a fixpoint.
    fn tree(&mut self) {
        let n = self.ids.len();
        let mut best: Vec<Option<(Cost, u32, u32)>> = vec![None; n];
        loop {
            let mut changed = false;
            for k in 0..n {
                for (i, cand) in self.cands[k].iter().enumerate() {
                    let own = cand.param.map_or(cand.own, |(_, _, c)| cand.own + c);
                    let mut key = (own, u32::from(cand.collective), 0u32);
                    let mut ready = true;
                    for &ch in &cand.kids {
                        match best[ch] {
                            Some((c, colls, h)) => {
                                key = (key.0 + c, key.1 + colls, key.2.max(h));
                            }
                            None => {
                                ready = false;
                                break;
                            }
                        }
                    }
                    if !ready || !key.0.is_feasible() {
                        continue;
                    }
                    key.2 += 1;
                    let better = match (best[k], self.choice[k]) {
                        (Some(old), Some(j)) => (key, &cand.node) < (old, &self.cands[k][j].node),
                        _ => true,
                    };
                    if better {
                        best[k] = Some(key);
                        self.choice[k] = Some(i);
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
    }

    /// DAG cost and collective count of the current choice under class `root`: each
    /// class once, parameters priced by how they end up declared (one split layout:
    /// that split; several: replicated plus a `tp_split` per split use). `None` on a
    /// cycle or an unchosen class.
    fn dag(&self, root: usize) -> Option<(Cost, u32)> {
        // 0 unseen, 1 on the stack, 2 done.
        let mut mark = vec![0u8; self.ids.len()];
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        let mut total = Cost::ZERO;
        let mut colls = 0u32;
        let mut params: BTreeMap<u32, Vec<(Layout, Cost)>> = BTreeMap::new();
        mark[root] = 1;
        while let Some(&mut (k, ref mut next)) = stack.last_mut() {
            let cand = &self.cands[k][self.choice[k]?];
            if *next < cand.kids.len() {
                let ch = cand.kids[*next];
                *next += 1;
                match mark[ch] {
                    0 => {
                        mark[ch] = 1;
                        stack.push((ch, 0));
                    }
                    1 => return None,
                    _ => {}
                }
                continue;
            }
            stack.pop();
            mark[k] = 2;
            total = total + cand.own;
            colls += u32::from(cand.collective);
            if let Some((leaf, layout, c)) = cand.param {
                let e = params.entry(leaf).or_default();
                if !e.iter().any(|(l, _)| *l == layout) {
                    e.push((layout, c));
                }
            }
        }
        for (leaf, uses) in params {
            match uses.as_slice() {
                [(_, c)] => total = total + *c,
                _ => {
                    let full = &self.t.leaves[leaf as usize].val.logical;
                    // Declared whole (and split per use): a weight the engines always
                    // split is not kept whole.
                    if self.cost.must_split(full) {
                        return Some((Cost::INFEASIBLE, colls));
                    }
                    total = total + self.cost.param_cost(full, self.env);
                    for (layout, _) in &uses {
                        if let Layout::Sharded { axis, .. } = layout {
                            let p = self.eg.analysis.parts;
                            let local = layout::local_type(full, *layout, p)?;
                            let split = Op::TpSplit {
                                axis: *axis,
                                parts: p,
                            };
                            total = total + self.cost.op_cost(&split, &[full], &[&local], self.env);
                        }
                    }
                }
            }
        }
        Some((total, colls))
    }

    /// Hill-climbs the choice on DAG cost: switch one class's node at a time, keep the
    /// switch when (cost, collectives) strictly drops.
    fn refine(&mut self, root: usize) {
        let Some(mut cur) = self.dag(root) else {
            return;
        };
        for _ in 0..REFINE_PASSES {
            let mut improved = false;
            for k in self.reachable(root) {
                let Some(old) = self.choice[k] else { continue };
                for i in 0..self.cands[k].len() {
                    if i == old || self.choice[k] != Some(old) {
                        continue;
                    }
                    if self.cands[k][i]
                        .kids
                        .iter()
                        .any(|&ch| self.choice[ch].is_none())
                    {
                        continue;
                    }
                    self.choice[k] = Some(i);
                    match self.dag(root) {
                        Some(v) if v < cur => {
                            cur = v;
                            improved = true;
                            break;
                        }
                        _ => self.choice[k] = Some(old),
                    }
                }
            }
            if !improved {
                break;
            }
        }
    }

    /// Classes of the chosen program under `root`, ascending.
    fn reachable(&self, root: usize) -> Vec<usize> {
        let mut seen = vec![false; self.ids.len()];
        let mut stack = vec![root];
        let mut out = Vec::new();
        while let Some(k) = stack.pop() {
            if std::mem::replace(&mut seen[k], true) {
                continue;
            }
            out.push(k);
            if let Some(i) = self.choice[k] {
                stack.extend(self.cands[k][i].kids.iter().copied());
            }
        }
        out.sort_unstable();
        out
    }

    /// DAG cost of the chosen program under `root`.
    fn dag_cost(&self, root: Id) -> Cost {
        let k = self.ids.binary_search(&self.eg.find(root)).ok();
        k.and_then(|k| self.dag(k))
            .map_or(Cost::INFEASIBLE, |(c, _)| c)
    }

    fn data(&self, id: Id) -> &ClassData {
        &self.eg[id].data
    }

    /// The leaf a class declares, if it holds a source leaf (parameter, input, constant).
    fn source_leaf(&self, id: Id) -> Option<u32> {
        self.eg[id].nodes.iter().find_map(|n| match n {
            ShardNode::Leaf { leaf } => {
                let kind = self.t.leaves[*leaf as usize].kind;
                matches!(kind, LeafKind::Param | LeafKind::Input | LeafKind::Constant)
                    .then_some(*leaf)
            }
            _ => None,
        })
    }

    /// The per-device op a node runs (none for leaves, projections and the root).
    fn node_op(&self, node: &ShardNode) -> Option<Op> {
        let p = self.eg.analysis.parts;
        let one = |id: Id| self.data(id).val();
        Some(match node {
            ShardNode::Op { op, args, .. } => {
                let vals: Vec<&Val> = args.iter().map(|&a| one(a)).collect::<Option<_>>()?;
                layout::infer(&self.eg.analysis.ops[*op as usize], &vals, p)?.1
            }
            ShardNode::Shard { axis, .. } => Op::TpSplit {
                axis: *axis,
                parts: p,
            },
            ShardNode::Partial { .. } => Op::Scale {
                factor: 1.0 / f64::from(p),
            },
            ShardNode::AllReduce { .. } => Op::AllReduce { parts: p },
            ShardNode::AllGather { axis, .. } => Op::AllGather {
                axis: *axis,
                parts: p,
            },
            ShardNode::ReduceScatter { axis, .. } => Op::ReduceScatter {
                axis: *axis,
                parts: p,
            },
            ShardNode::AllToAll { split, concat, .. } => Op::AllToAll {
                split: *split,
                concat: *concat,
                parts: p,
            },
            ShardNode::Leaf { .. } | ShardNode::Proj { .. } | ShardNode::Root { .. } => {
                return None
            }
        })
    }

    /// A node's own cost without parameter storage, whether it declares a split source
    /// (its children are then not computed: a split parameter is stored split), and
    /// the parameter it declares with that storage's cost.
    fn own_cost(&self, node: &ShardNode) -> (Cost, bool, Option<(u32, Layout, Cost)>) {
        let env = self.env;
        match node {
            ShardNode::Leaf { leaf } => {
                let l = &self.t.leaves[*leaf as usize];
                let param = (l.kind == LeafKind::Param).then(|| {
                    let c = self.cost.param_cost(&l.val.local, env);
                    (*leaf, l.val.layout, c)
                });
                // A weight the engines always split, used whole: not a program they run.
                if param.is_some()
                    && l.val.layout.is_replicated()
                    && self.cost.must_split(&l.val.logical)
                {
                    return (Cost::INFEASIBLE, false, param);
                }
                (Cost::ZERO, false, param)
            }
            ShardNode::Shard { args, .. } if self.source_leaf(args[0]).is_some() => {
                let leaf = self.source_leaf(args[0]).unwrap_or(0);
                let Some(val) = self.data_of(node).and_then(|v| v.into_iter().next()) else {
                    return (Cost::INFEASIBLE, true, None);
                };
                let param = (self.t.leaves[leaf as usize].kind == LeafKind::Param)
                    .then(|| (leaf, val.layout, self.cost.param_cost(&val.local, env)));
                (Cost::ZERO, true, param)
            }
            ShardNode::Proj { .. } | ShardNode::Root { .. } => (Cost::ZERO, false, None),
            _ => {
                let Some(op) = self.node_op(node) else {
                    return (Cost::INFEASIBLE, false, None);
                };
                let ins: Vec<&crate::ir::TensorType> = node
                    .children()
                    .iter()
                    .filter_map(|&c| self.data(c).val().map(|v| &v.local))
                    .collect();
                let Some(outs) = self.data_of(node) else {
                    return (Cost::INFEASIBLE, false, None);
                };
                let outs: Vec<&crate::ir::TensorType> = outs.iter().map(|v| &v.local).collect();
                (self.cost.op_cost(&op, &ins, &outs, env), false, None)
            }
        }
    }

    fn data_of(&self, node: &ShardNode) -> Option<Vec<Val>> {
        self.eg.analysis.node_vals(node, |id| self.data(id))
    }
}

/// Lowers the chosen terms to instructions, each class once.
struct Lower<'a, 'b> {
    x: &'b Extractor<'a>,
    memo: BTreeMap<Id, usize>,
    instrs: Vec<PInstr>,
}

impl Lower<'_, '_> {
    fn push(&mut self, kind: PKind, args: Vec<PRef>, vals: Vec<Val>) -> usize {
        self.instrs.push(PInstr { kind, args, vals });
        self.instrs.len() - 1
    }

    /// The single value of class `id`.
    fn value(&mut self, id: Id) -> Result<PRef, ShardError> {
        let id = self.x.eg.find(id);
        if let Some(ShardNode::Proj { index, args }) = self.x.best.get(&id) {
            let (index, tuple) = (*index, args[0]);
            let i = self.class(tuple)?;
            return Ok((i, index));
        }
        Ok((self.class(id)?, 0))
    }

    /// The instruction computing class `id`.
    fn class(&mut self, id: Id) -> Result<usize, ShardError> {
        let id = self.x.eg.find(id);
        if let Some(&i) = self.memo.get(&id) {
            return Ok(i);
        }
        let internal = |why: &str| ShardError::Internal { why: why.into() };
        let node = self
            .x
            .best
            .get(&id)
            .cloned()
            .ok_or_else(|| internal("unextracted class"))?;
        let vals = self
            .x
            .data(id)
            .0
            .clone()
            .ok_or_else(|| internal("invalid class"))?;
        let i = match &node {
            ShardNode::Leaf { leaf } => self.push(PKind::Leaf(*leaf), vec![], vals),
            ShardNode::Shard { args, .. } if self.x.source_leaf(args[0]).is_some() => {
                let leaf = self.x.source_leaf(args[0]).unwrap_or(0);
                self.push(PKind::Leaf(leaf), vec![], vals)
            }
            ShardNode::Shard {
                axis, groups, args, ..
            } if *groups > 1 => {
                let src = self.value(args[0])?;
                let p = self.x.eg.analysis.parts;
                split_into(&mut self.instrs, src, *axis, *groups, p)?.0
            }
            ShardNode::Proj { .. } => return Err(internal("projection as a tensor")),
            ShardNode::Root { .. } => return Err(internal("root as a tensor")),
            _ => {
                let args = node
                    .children()
                    .iter()
                    .map(|&c| self.value(c))
                    .collect::<Result<Vec<_>, _>>()?;
                let op = self
                    .x
                    .node_op(&node)
                    .ok_or_else(|| internal("node without a per-device op"))?;
                let origin = match &node {
                    ShardNode::Op { tag, .. } if *tag > 0 => Some(tag - 1),
                    _ => None,
                };
                self.push(PKind::Op { op, origin }, args, vals)
            }
        };
        self.memo.insert(id, i);
        Ok(i)
    }
}

fn op_kind(op: Op) -> PKind {
    PKind::Op { op, origin: None }
}

/// Appends the instructions that take replicated value `src` to its split along `axis`
/// in `groups` groups: a `tp_split`, or for several groups a slice per group, a
/// `tp_split` of each and their concatenation.
fn split_into(
    instrs: &mut Vec<PInstr>,
    src: PRef,
    axis: u32,
    groups: u32,
    p: u32,
) -> Result<PRef, ShardError> {
    let internal = |why: &str| ShardError::Internal { why: why.into() };
    let whole = instrs[src.0].vals[src.1 as usize].clone();
    let layout = Layout::Sharded { axis, groups };
    let out = Val::new(whole.logical.clone(), layout, p).ok_or_else(|| internal("bad split"))?;
    let mut push = |kind: PKind, args: Vec<PRef>, val: Val| {
        instrs.push(PInstr {
            kind,
            args,
            vals: vec![val],
        });
        (instrs.len() - 1, 0)
    };
    let split = Op::TpSplit { axis, parts: p };
    if groups == 1 {
        return Ok(push(op_kind(split), vec![src], out));
    }
    let n = whole.local.shape.dims()[axis as usize]
        .as_lit()
        .ok_or_else(|| internal("grouped split of a symbolic axis"))?;
    let g = u64::from(groups);
    let mut pieces = Vec::new();
    for k in 0..g {
        let slice = Op::Slice {
            axis,
            start: k * (n / g),
            len: n / g,
        };
        let sv = simple_val(&slice, &whole, p)?;
        let s = push(op_kind(slice), vec![src], sv.clone());
        let pv = Val::new(sv.logical.clone(), Layout::split(axis), p)
            .ok_or_else(|| internal("bad group split"))?;
        pieces.push(push(op_kind(split.clone()), vec![s], pv));
    }
    Ok(push(op_kind(Op::Concat { axis }), pieces, out))
}

/// The value of a single-input op on a replicated value (used for group slices).
fn simple_val(op: &Op, x: &Val, p: u32) -> Result<Val, ShardError> {
    let (vals, _) = layout::infer(op, &[x], p).ok_or(ShardError::Internal {
        why: format!("{} refused its operand", op.name()),
    })?;
    vals.into_iter().next().ok_or(ShardError::Internal {
        why: "op without result".into(),
    })
}

/// Settles how every source leaf is declared: in its only layout when the program uses
/// it in one, else replicated with `tp_split`s for the split uses; unused sources are
/// declared replicated so later blocks can use them. Returns the new instructions and
/// the old → new index map.
fn declare_leaves(
    instrs: Vec<PInstr>,
    t: &Template,
    parts: u32,
) -> Result<(Vec<PInstr>, Vec<Option<usize>>), ShardError> {
    let mut layouts: BTreeMap<u32, Vec<Layout>> = BTreeMap::new();
    for ins in &instrs {
        if let PKind::Leaf(l) = ins.kind {
            let e = layouts.entry(l).or_default();
            if !e.contains(&ins.vals[0].layout) {
                e.push(ins.vals[0].layout);
            }
        }
    }
    let mut out: Vec<PInstr> = Vec::new();
    let mut decl: BTreeMap<u32, usize> = BTreeMap::new();
    // Every source leaf first, in leaf order: a single layout or replicated.
    for (i, leaf) in t.leaves.iter().enumerate() {
        let i = i as u32;
        if leaf.kind == LeafKind::Ext {
            continue;
        }
        let used = layouts.get(&i);
        // Later blocks receive a shared source whole or plainly split, never grouped.
        let fits = |l: &Layout| {
            !leaf.shared || !matches!(l, Layout::Sharded { groups, .. } if *groups > 1)
        };
        let val = match used.map(Vec::as_slice) {
            Some([only])
                if fits(only)
                    && matches!(
                        leaf.kind,
                        LeafKind::Param | LeafKind::Input | LeafKind::Constant
                    ) =>
            {
                Val::new(leaf.val.logical.clone(), *only, parts).ok_or(ShardError::Internal {
                    why: "bad leaf layout".into(),
                })?
            }
            _ => leaf.val.clone(),
        };
        decl.insert(i, out.len());
        out.push(PInstr {
            kind: PKind::Leaf(i),
            args: vec![],
            vals: vec![val],
        });
    }
    let mut map = vec![None; instrs.len()];
    for (k, ins) in instrs.into_iter().enumerate() {
        let remap = |r: &PRef, map: &[Option<usize>]| -> PRef { (map[r.0].unwrap_or(r.0), r.1) };
        match ins.kind {
            PKind::Leaf(l) => {
                let Some(&d) = decl.get(&l) else {
                    // An earlier block's tensor: declared where first used.
                    map[k] = Some(out.len());
                    out.push(ins);
                    continue;
                };
                let have = out[d].vals[0].layout;
                let want = ins.vals[0].layout;
                if have == want {
                    map[k] = Some(d);
                } else {
                    // Replicated declaration, split for this use.
                    let Layout::Sharded { axis, groups } = want else {
                        return Err(ShardError::Internal {
                            why: format!("source used as {want} besides {have}"),
                        });
                    };
                    let r = split_into(&mut out, (d, 0), axis, groups, parts)?;
                    map[k] = Some(r.0);
                }
            }
            PKind::Op { .. } => {
                let args = ins.args.iter().map(|r| remap(r, &map)).collect();
                map[k] = Some(out.len());
                out.push(PInstr { args, ..ins });
            }
        }
    }
    Ok((out, map))
}
