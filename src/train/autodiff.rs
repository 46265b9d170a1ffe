//! Reverse-mode autodiff over the closed op set, plus mixed precision and AdamW.

use super::precision::Fp8Recipe;
use super::{TrainError, TrainOptions};
use crate::ir::{
    Dim, Graph, GraphBuilder, Op, OpId, Phase, Role, Saved, Shape, TensorId, TensorType,
};
use std::collections::{BTreeMap, BTreeSet};

/// Derives the training graph; see the [module docs](super).
///
/// # Errors
/// As [`derive_with_report`].
pub fn derive(fwd: &Graph, opts: &TrainOptions) -> Result<Graph, TrainError> {
    Ok(derive_with_report(fwd, opts)?.0)
}

/// Which forward tensors each derivative rule read (keyed by forward op id).
pub type SavedReport = BTreeMap<OpId, BTreeSet<Saved>>;

/// [`derive()`], also returning which forward tensors each rule read.
///
/// # Errors
/// [`TrainError::NotForward`] when `fwd` already has backward or optimizer ops,
/// [`TrainError::NoLoss`] when it has no single scalar float result without uses,
/// [`TrainError::NoRule`] or [`TrainError::Unsupported`] when an op on a gradient path has
/// no derivative rule for its configuration, and [`TrainError::Shape`] when a derived op
/// fails shape inference (an internal inconsistency).
pub fn derive_with_report(
    fwd: &Graph,
    opts: &TrainOptions,
) -> Result<(Graph, SavedReport), TrainError> {
    if fwd.ops().any(|o| fwd.node(o).phase != Phase::Fwd) {
        return Err(TrainError::NotForward);
    }
    let loss = find_loss(fwd)?;
    let mut d = Diff {
        fwd,
        b: GraphBuilder::new(fwd.name()),
        map: vec![None; fwd.tensor_count()],
        needs_grad: vec![false; fwd.tensor_count()],
        grads: vec![Vec::new(); fwd.tensor_count()],
        tiles: BTreeMap::new(),
        cur: None,
        read: BTreeSet::new(),
        regathered: BTreeMap::new(),
        fp8: opts.fp8,
        transposed: BTreeMap::new(),
    };
    d.copy_forward(opts)?;
    d.find_tilings();

    // Seed dL/dL = 1.
    let loss_op = fwd.tensor(loss).producer;
    d.b.set_block(fwd.node(loss_op).block);
    d.b.set_phase(Phase::Bwd);
    let seed = d.b.source(
        Op::Constant { value: 1.0 },
        fwd.ty(loss).clone(),
        Role::Temporary,
    );
    d.grads[loss.index()].push(seed);

    let mut report = SavedReport::new();
    let mut param_grads = Vec::new();
    for id in fwd.ops().rev() {
        let node = fwd.node(id);
        d.b.set_block(node.block);
        d.b.set_phase(Phase::Bwd);
        let mut dys = Vec::with_capacity(node.results.len());
        for &r in &node.results {
            dys.push(d.sum_grad(r)?);
        }
        if dys.iter().all(Option::is_none) {
            continue;
        }
        if let Op::Param { .. } = node.op {
            if let Some(mut g) = dys[0] {
                // The gradient is complete: it goes into the gradient buffer now (an
                // engine accumulates each weight gradient into its buffer as soon as it
                // is computed), so that no low-precision copy outlives its layer.
                if d.b.ty(g).dtype != opts.grad_dtype {
                    g = d.b.add1(
                        Op::Cast {
                            to: opts.grad_dtype,
                        },
                        &[g],
                    )?;
                }
                param_grads.push((id, g));
            }
            continue;
        }
        if node.op.is_source() {
            continue;
        }
        if !node.op.info().differentiable {
            return Err(TrainError::NoRule {
                op: id,
                name: node.op.name(),
            });
        }
        d.cur = Some(id);
        d.read.clear();
        let contributions = d.rule(id, &dys)?;
        report.insert(id, std::mem::take(&mut d.read));
        for (i, g) in contributions {
            let t = node.inputs[i];
            if d.needs_grad[t.index()] {
                d.grads[t.index()].push(g);
            }
        }
    }

    d.optimizer(opts, param_grads)?;
    Ok((d.b.finish(), report))
}

fn find_loss(fwd: &Graph) -> Result<TensorId, TrainError> {
    let losses: Vec<TensorId> = fwd
        .tensor_ids()
        .filter(|&t| {
            let ty = fwd.ty(t);
            ty.shape.rank() == 0
                && ty.dtype.is_float()
                && fwd.uses(t).is_empty()
                && !fwd.op(fwd.tensor(t).producer).is_source()
        })
        .collect();
    match losses.as_slice() {
        [one] => Ok(*one),
        other => Err(TrainError::NoLoss(other.len())),
    }
}

struct Diff<'a> {
    fwd: &'a Graph,
    b: GraphBuilder,
    /// Forward tensor → its copy in the training graph.
    map: Vec<Option<TensorId>>,
    /// Whether a forward tensor depends on a parameter through float ops.
    needs_grad: Vec<bool>,
    /// Gradient contributions per forward tensor (training-graph ids).
    grads: Vec<Vec<TensorId>>,
    /// Tensors whose uses are slices that exactly tile one axis: (axis, slices by start).
    tiles: BTreeMap<TensorId, (u32, BTreeMap<u64, Option<TensorId>>)>,
    /// The forward op whose rule is running, and the forward tensors it read.
    cur: Option<OpId>,
    read: BTreeSet<Saved>,
    /// Forward all-gather results re-gathered in backward (see [`Diff::input`]).
    regathered: BTreeMap<TensorId, TensorId>,
    /// The FP8 recipe of the forward graph's FP8 GEMMs.
    fp8: Option<Fp8Recipe>,
    /// Forward FP8 weight casts → their transposed FP8 copies (see [`Diff::fp8_rule`]).
    transposed: BTreeMap<TensorId, TensorId>,
}

type R<T> = Result<T, TrainError>;

impl Diff<'_> {
    fn copy_forward(&mut self, opts: &TrainOptions) -> R<()> {
        let fwd = self.fwd;
        for id in fwd.ops() {
            let node = fwd.node(id);
            self.b.set_block(node.block);
            self.b.set_phase(Phase::Fwd);
            let new = if node.op.is_source() {
                let t = node.results[0];
                let ty = fwd.ty(t).clone();
                let role = match node.op {
                    Op::Param { .. } if ty.dtype == opts.master_dtype => Role::Param,
                    Op::Param { .. } => Role::LowPrecParam,
                    _ => fwd.tensor(t).role,
                };
                if let Op::Param { .. } = node.op {
                    self.needs_grad[t.index()] = ty.dtype.is_float();
                }
                vec![self.b.source(node.op.clone(), ty, role)]
            } else {
                let inputs: Vec<TensorId> = node.inputs.iter().map(|&t| self.mapped(t)).collect();
                for &r in &node.results {
                    self.needs_grad[r.index()] = fwd.ty(r).dtype.is_float()
                        && node.inputs.iter().any(|t| self.needs_grad[t.index()]);
                }
                let r = self
                    .b
                    .add_with_role(node.op.clone(), &inputs, Role::Activation)?;
                // A forward FP8 weight cache keeps its role ([`super::precision::apply_fp8`]).
                for (&old, &new) in node.results.iter().zip(&r) {
                    if fwd.tensor(old).role == Role::LowPrecParam {
                        self.b.set_role(new, Role::LowPrecParam);
                    }
                }
                r
            };
            for (&old, new) in node.results.iter().zip(new) {
                self.map[old.index()] = Some(new);
            }
        }
        Ok(())
    }

    fn mapped(&self, t: TensorId) -> TensorId {
        self.map[t.index()].expect("forward tensors are copied in definition order")
    }

    /// Finds tensors all of whose uses are slices that exactly tile one axis (the
    /// fused QKV projection); their gradient is the concatenation of the slices'.
    fn find_tilings(&mut self) {
        let fwd = self.fwd;
        for t in fwd.tensor_ids() {
            let uses = fwd.uses(t);
            if uses.len() < 2 || !self.needs_grad[t.index()] {
                continue;
            }
            let mut axis = None;
            let mut pieces = BTreeMap::new();
            let all_slices = uses.iter().all(|&u| match fwd.op(u) {
                Op::Slice {
                    axis: a,
                    start,
                    len,
                } if axis.is_none_or(|x| x == *a) => {
                    axis = Some(*a);
                    pieces.insert(*start, *len).is_none()
                }
                _ => false,
            });
            let Some(axis) = axis.filter(|_| all_slices) else {
                continue;
            };
            let size = fwd.ty(t).shape.dims()[axis as usize].as_lit();
            let mut end = 0;
            let contiguous = pieces.iter().all(|(&s, &l)| {
                let ok = s == end;
                end = s + l;
                ok
            });
            if contiguous && Some(end) == size {
                let slots = pieces.keys().map(|&s| (s, None)).collect();
                self.tiles.insert(t, (axis, slots));
            }
        }
    }

    /// The summed gradient of forward tensor `t`, or `None` if nothing flows into it.
    fn sum_grad(&mut self, t: TensorId) -> R<Option<TensorId>> {
        if let Some((axis, slots)) = self.tiles.remove(&t) {
            if slots.values().any(Option::is_some) {
                let pieces: Vec<TensorId> = if slots.values().all(Option::is_some) {
                    slots.values().flatten().copied().collect()
                } else {
                    Vec::new()
                };
                if !pieces.is_empty() {
                    let g = self.b.add1(Op::Concat { axis }, &pieces)?;
                    self.grads[t.index()].push(g);
                } else {
                    // Some slices have no gradient: pad the others back to full size.
                    let n = self.fwd.ty(t).shape.dims()[axis as usize]
                        .as_lit()
                        .unwrap_or(0);
                    let mut starts: Vec<u64> = slots.keys().copied().collect();
                    starts.push(n);
                    for (w, g) in starts.windows(2).zip(slots.values()) {
                        if let Some(g) = g {
                            let pad = Op::Pad {
                                axis,
                                before: w[0],
                                after: n - w[1],
                            };
                            let p = self.b.add1(pad, &[*g])?;
                            self.grads[t.index()].push(p);
                        }
                    }
                }
            }
        }
        let contributions = std::mem::take(&mut self.grads[t.index()]);
        let mut it = contributions.into_iter();
        let Some(mut acc) = it.next() else {
            return Ok(None);
        };
        for g in it {
            acc = self.b.add1(Op::Add, &[acc, g])?;
        }
        Ok(Some(acc))
    }

    /// Forward input `i` of the current op, recorded as saved.
    ///
    /// Sequence parallelism (Korthikanti et al. 2022, Sec. 4.2.2, as Megatron-LM does
    /// it): when the input is the result of a forward all-gather, the rule keeps the
    /// gather's sharded input instead and gathers it again in backward, once per
    /// gathered tensor.
    fn input(&mut self, i: usize) -> TensorId {
        self.read.insert(Saved::Input(i));
        let op = self.cur.expect("rule running");
        let t = self.fwd.node(op).inputs[i];
        let gather = self.fwd.node(self.fwd.tensor(t).producer);
        if !matches!(gather.op, Op::AllGather { .. } | Op::TpGather { .. }) {
            return self.mapped(t);
        }
        if let Some(&g) = self.regathered.get(&t) {
            return g;
        }
        let full = self.mapped(t);
        let shard = self.mapped(gather.inputs[0]);
        // Same op on the same input type as in forward: inference cannot fail.
        let g = self.b.add1(gather.op.clone(), &[shard]).unwrap_or(full);
        self.regathered.insert(t, g);
        g
    }

    /// Forward result `i` of the current op, recorded as saved.
    fn result(&mut self, i: usize) -> TensorId {
        self.read.insert(Saved::Result(i));
        let op = self.cur.expect("rule running");
        self.mapped(self.fwd.node(op).results[i])
    }

    /// Whether forward input `i` of the current op needs a gradient.
    fn wants(&self, i: usize) -> bool {
        let op = self.cur.expect("rule running");
        self.needs_grad[self.fwd.node(op).inputs[i].index()]
    }

    fn in_ty(&self, i: usize) -> TensorType {
        let op = self.cur.expect("rule running");
        self.fwd.ty(self.fwd.node(op).inputs[i]).clone()
    }

    fn unsupported(&self, why: String) -> TrainError {
        let op = self.cur.expect("rule running");
        TrainError::Unsupported {
            op,
            name: self.fwd.op(op).name(),
            why,
        }
    }

    /// `[.., m, k]` → `[(..)·m, k]`.
    fn flatten(&mut self, t: TensorId) -> R<TensorId> {
        let ty = self.b.ty(t).clone();
        let dims = ty.shape.dims();
        if dims.len() <= 2 {
            return Ok(t);
        }
        let rows = dims[..dims.len() - 1]
            .iter()
            .try_fold(Dim::lit(1), |a, d| a.checked_mul(*d))
            .ok_or_else(|| self.unsupported("row count overflows".into()))?;
        let shape = Shape::new([rows, dims[dims.len() - 1]]);
        Ok(self.b.add1(Op::Reshape { shape }, &[t])?)
    }

    /// FP8 operand `i` of the current GEMM as its backward reads it: the forward cast
    /// itself when the recipe saves FP8 tensors; otherwise the bf16 tensor under the
    /// cast (under the cast and a sequence-parallel gather), saved, and cast (and
    /// gathered) again.
    fn fp8_operand(&mut self, i: usize, recipe: &Fp8Recipe) -> R<TensorId> {
        if recipe.saves_fp8 {
            return Ok(self.input(i));
        }
        let fwd = self.fwd;
        let op = self.cur.expect("rule running");
        let t = fwd.node(op).inputs[i];
        let mut node = fwd.node(fwd.tensor(t).producer);
        let gather = match node.op {
            Op::AllGather { .. } | Op::TpGather { .. } => {
                let g = node.op.clone();
                node = fwd.node(fwd.tensor(node.inputs[0]).producer);
                Some(g)
            }
            _ => None,
        };
        let Op::Cast { to } = node.op else {
            return Ok(self.input(i));
        };
        self.read.insert(Saved::Input(i));
        let hp = self.mapped(node.inputs[0]);
        let mut x = self.b.add1(Op::Cast { to }, &[hp])?;
        if let Some(g) = gather {
            x = self.b.add1(g, &[x])?;
        }
        Ok(x)
    }

    /// The backward of a linear layer's FP8 GEMM `y = x · w` (`w` transposed when
    /// `tb`): the output gradient is cast to the recipe's backward dtype once, then the
    /// data gradient `dx = dy · wᵀ` and the weight gradient `dw = xᵀ · dy` run as FP8
    /// GEMMs, both writing bf16. With a weight cache, the data-gradient GEMM reads a
    /// transposed FP8 copy of the weight, made once per weight from the bf16 weight and
    /// kept through the step (role `lowp`: Transformer Engine's `weight_t_fp8`).
    fn fp8_rule(&mut self, tb: bool, dy: TensorId) -> R<Vec<(usize, TensorId)>> {
        let recipe = self
            .fp8
            .ok_or_else(|| self.unsupported("an FP8 GEMM without an FP8 recipe".into()))?;
        let dy8 = self.b.add1(
            Op::Cast {
                to: recipe.backward,
            },
            &[dy],
        )?;
        let mut out = Vec::new();
        if self.wants(0) {
            let fwd = self.fwd;
            let w8 = fwd.node(self.cur.expect("rule running")).inputs[1];
            let cast = fwd.node(fwd.tensor(w8).producer);
            let da = if recipe.weight_cache && matches!(cast.op, Op::Cast { .. }) {
                let wt = match self.transposed.get(&w8) {
                    Some(&wt) => wt,
                    None => {
                        let w = self.mapped(cast.inputs[0]);
                        let view = self.b.add1(Op::Transpose { perm: vec![1, 0] }, &[w])?;
                        let to = fwd.ty(w8).dtype;
                        let wt = self.b.add1(Op::Cast { to }, &[view])?;
                        self.b.set_role(wt, Role::LowPrecParam);
                        self.transposed.insert(w8, wt);
                        wt
                    }
                };
                self.b.add1(Op::MatMul { ta: false, tb }, &[dy8, wt])?
            } else {
                let bm = self.fp8_operand(1, &recipe)?;
                self.b.add1(Op::MatMul { ta: false, tb: !tb }, &[dy8, bm])?
            };
            out.push((0, da));
        }
        if self.wants(1) {
            let am = self.fp8_operand(0, &recipe)?;
            let (am, dy8) = (self.flatten(am)?, self.flatten(dy8)?);
            let db = if !tb {
                self.b.add1(
                    Op::MatMul {
                        ta: true,
                        tb: false,
                    },
                    &[am, dy8],
                )?
            } else {
                self.b.add1(
                    Op::MatMul {
                        ta: true,
                        tb: false,
                    },
                    &[dy8, am],
                )?
            };
            out.push((1, db));
        }
        Ok(out)
    }

    fn rule(&mut self, id: OpId, dys: &[Option<TensorId>]) -> R<Vec<(usize, TensorId)>> {
        let fwd = self.fwd;
        let op = fwd.op(id).clone();
        let Some(dy) = dys[0] else {
            return Ok(vec![]);
        };
        let mut out = Vec::new();
        match op {
            Op::Input { .. }
            | Op::Param { .. }
            | Op::State { .. }
            | Op::Constant { .. }
            | Op::Recv { .. } => {}
            Op::MatMul { ta: false, tb }
                if self.in_ty(0).dtype.is_fp8() && self.in_ty(1).dtype.is_fp8() =>
            {
                return self.fp8_rule(tb, dy);
            }
            Op::MatMul { ta, tb } => {
                let (ra, rb) = (self.in_ty(0).shape.rank(), self.in_ty(1).shape.rank());
                if self.wants(0) {
                    let bm = self.input(1);
                    let da = if !ta {
                        self.b.add1(Op::MatMul { ta: false, tb: !tb }, &[dy, bm])?
                    } else if rb == ra {
                        self.b.add1(Op::MatMul { ta: tb, tb: true }, &[bm, dy])?
                    } else {
                        return Err(self.unsupported(
                            "gradient of a transposed batched operand against a broadcast weight"
                                .into(),
                        ));
                    };
                    out.push((0, da));
                }
                if self.wants(1) {
                    let am = self.input(0);
                    let (am, dy) = if rb == 2 && ra > 2 {
                        if ta {
                            return Err(self.unsupported(
                                "weight gradient with a transposed batched left operand".into(),
                            ));
                        }
                        (self.flatten(am)?, self.flatten(dy)?)
                    } else {
                        (am, dy)
                    };
                    let db = if !tb {
                        self.b.add1(Op::MatMul { ta: !ta, tb: false }, &[am, dy])?
                    } else {
                        self.b.add1(Op::MatMul { ta: true, tb: ta }, &[dy, am])?
                    };
                    out.push((1, db));
                }
            }
            Op::Add => {
                out.push((0, dy));
                out.push((1, dy));
            }
            Op::Mul => {
                if self.wants(0) {
                    let bm = self.input(1);
                    out.push((0, self.b.add1(Op::Mul, &[dy, bm])?));
                }
                if self.wants(1) {
                    let am = self.input(0);
                    out.push((1, self.b.add1(Op::Mul, &[dy, am])?));
                }
            }
            Op::Scale { factor } => out.push((0, self.b.add1(Op::Scale { factor }, &[dy])?)),
            Op::BiasAdd => {
                out.push((0, dy));
                if self.wants(1) {
                    let rank = self.in_ty(0).shape.rank() as u32;
                    let axes = (0..rank - 1).collect();
                    out.push((1, self.b.add1(Op::ReduceSum { axes }, &[dy])?));
                }
            }
            Op::Gelu => {
                let x = self.input(0);
                out.push((0, self.b.add1(Op::GeluGrad, &[dy, x])?));
            }
            Op::Silu => {
                let x = self.input(0);
                out.push((0, self.b.add1(Op::SiluGrad, &[dy, x])?));
            }
            Op::Clamp { min, max } => {
                // dy where min ≤ x ≤ max, 0 outside (PyTorch's `clamp_backward`).
                let x = self.input(0);
                out.push((0, self.b.add1(Op::ClampGrad { min, max }, &[dy, x])?));
            }
            Op::GroupedBiasAdd => {
                out.push((0, dy));
                if self.wants(1) {
                    let experts = self.in_ty(1).shape.dims()[0]
                        .as_lit()
                        .ok_or_else(|| self.unsupported("symbolic expert count".into()))?;
                    let grad = Op::GroupedBiasAddGrad { experts };
                    out.push((1, self.b.add1(grad, &[dy])?));
                }
            }
            Op::Softmax { scale, .. } => {
                let y = self.result(0);
                out.push((0, self.b.add1(Op::SoftmaxGrad { scale }, &[dy, y])?));
            }
            Op::Dropout { p } => {
                let mask = self.result(1);
                out.push((0, self.b.add1(Op::DropoutGrad { p }, &[dy, mask])?));
            }
            Op::LayerNorm { eps } => {
                let x = self.input(0);
                let g = self.input(1);
                let r = self.b.add(Op::LayerNormGrad { eps }, &[dy, x, g])?;
                out.extend([(0, r[0]), (1, r[1]), (2, r[2])]);
            }
            Op::RmsNorm { eps } => {
                let x = self.input(0);
                let g = self.input(1);
                let r = self.b.add(Op::RmsNormGrad { eps }, &[dy, x, g])?;
                out.extend([(0, r[0]), (1, r[1])]);
            }
            Op::Rotary { dims, theta } => {
                out.push((0, self.b.add1(Op::RotaryGrad { dims, theta }, &[dy])?));
            }
            Op::Embedding => {
                if self.wants(0) {
                    let ids = self.input(1);
                    let vocab = self.in_ty(0).shape.dims()[0]
                        .as_lit()
                        .ok_or_else(|| self.unsupported("symbolic vocabulary".into()))?;
                    out.push((0, self.b.add1(Op::EmbeddingGrad { vocab }, &[dy, ids])?));
                }
            }
            Op::Reshape { .. } => {
                let shape = self.in_ty(0).shape;
                out.push((0, self.b.add1(Op::Reshape { shape }, &[dy])?));
            }
            Op::Transpose { perm } => {
                let mut inv = vec![0u32; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inv[p as usize] = i as u32;
                }
                out.push((0, self.b.add1(Op::Transpose { perm: inv }, &[dy])?));
            }
            Op::Slice { axis, start, len } => {
                let x = fwd.node(id).inputs[0];
                if let Some((_, slots)) = self.tiles.get_mut(&x) {
                    slots.insert(start, Some(dy));
                } else {
                    let n = self.in_ty(0).shape.dims()[axis as usize]
                        .as_lit()
                        .ok_or_else(|| self.unsupported("slice of a symbolic axis".into()))?;
                    let pad = Op::Pad {
                        axis,
                        before: start,
                        after: n - start - len,
                    };
                    out.push((0, self.b.add1(pad, &[dy])?));
                }
            }
            Op::Concat { axis } => {
                let mut start = 0;
                for i in 0..fwd.node(id).inputs.len() {
                    let len = self.in_ty(i).shape.dims()[axis as usize]
                        .as_lit()
                        .ok_or_else(|| self.unsupported("concat of a symbolic axis".into()))?;
                    if self.wants(i) {
                        out.push((i, self.b.add1(Op::Slice { axis, start, len }, &[dy])?));
                    }
                    start += len;
                }
            }
            Op::Pad { axis, before, .. } => {
                let len = self.in_ty(0).shape.dims()[axis as usize]
                    .as_lit()
                    .ok_or_else(|| self.unsupported("pad of a symbolic axis".into()))?;
                let slice = Op::Slice {
                    axis,
                    start: before,
                    len,
                };
                out.push((0, self.b.add1(slice, &[dy])?));
            }
            Op::Repeat { axis, times } => {
                let x = self.in_ty(0);
                let mut dims = x.shape.dims().to_vec();
                dims.insert(axis as usize + 1, Dim::lit(times));
                let split = self.b.add1(
                    Op::Reshape {
                        shape: Shape::new(dims),
                    },
                    &[dy],
                )?;
                let sum = Op::ReduceSum {
                    axes: vec![axis + 1],
                };
                out.push((0, self.b.add1(sum, &[split])?));
            }
            Op::Broadcast { axes, .. } => {
                out.push((0, self.b.add1(Op::ReduceSum { axes }, &[dy])?));
            }
            Op::ReduceSum { axes } => {
                let shape = self.in_ty(0).shape;
                out.push((0, self.b.add1(Op::Broadcast { axes, shape }, &[dy])?));
            }
            Op::Cast { .. } => {
                // The gradient of an FP8 cast arrives in the GEMM's output dtype.
                let to = self.in_ty(0).dtype;
                if self.b.ty(dy).dtype == to {
                    out.push((0, dy));
                } else {
                    out.push((0, self.b.add1(Op::Cast { to }, &[dy])?));
                }
            }
            Op::Pow { exponent } => {
                // d(x^p) = p·x^(p-1)·dy.
                let x = self.input(0);
                let xp = self.b.add1(
                    Op::Pow {
                        exponent: exponent - 1.0,
                    },
                    &[x],
                )?;
                let dx = self.b.add1(Op::Mul, &[dy, xp])?;
                out.push((0, self.b.add1(Op::Scale { factor: exponent }, &[dx])?));
            }
            Op::Tanh => {
                // d tanh = (1 - t²)·dy = dy - dy·t·t.
                let t = self.result(0);
                let dyt = self.b.add1(Op::Mul, &[dy, t])?;
                let dytt = self.b.add1(Op::Mul, &[dyt, t])?;
                let neg = self.b.add1(Op::Scale { factor: -1.0 }, &[dytt])?;
                out.push((0, self.b.add1(Op::Add, &[dy, neg])?));
            }
            Op::Rsqrt => {
                // d x^(-1/2) = -½·r³·dy.
                let r = self.result(0);
                let mut g = dy;
                for _ in 0..3 {
                    g = self.b.add1(Op::Mul, &[g, r])?;
                }
                out.push((0, self.b.add1(Op::Scale { factor: -0.5 }, &[g])?));
            }
            Op::Shift { .. } | Op::Contiguous => out.push((0, dy)),
            Op::Sdpa {
                causal,
                scale,
                window,
                sinks,
            } => {
                let n = fwd.node(id).inputs.len();
                let mut ins = vec![dy, self.input(0), self.input(1), self.input(2)];
                ins.push(self.result(0));
                ins.push(self.result(1));
                if n > 3 + usize::from(sinks) {
                    if self.wants(3) {
                        return Err(self.unsupported("gradient of an attention mask".into()));
                    }
                    ins.push(self.input(3));
                }
                if sinks {
                    ins.push(self.input(n - 1));
                }
                let r = self.b.add(
                    Op::SdpaGrad {
                        causal,
                        scale,
                        window,
                        sinks,
                    },
                    &ins,
                )?;
                out.extend([(0, r[0]), (1, r[1]), (2, r[2])]);
                if sinks {
                    out.push((n - 1, r[3]));
                }
            }
            Op::CrossEntropy => {
                let logits = self.input(0);
                let labels = self.input(1);
                out.push((0, self.b.add1(Op::CrossEntropyGrad, &[dy, logits, labels])?));
            }
            Op::FlashAttention {
                causal,
                scale,
                window,
                sinks,
            } => {
                let q = self.input(0);
                let k = self.input(1);
                let v = self.input(2);
                let o = self.result(0);
                let mut ins = vec![dy, q, k, v, o];
                if sinks {
                    ins.push(self.input(3));
                }
                let r = self.b.add(
                    Op::FlashAttentionGrad {
                        causal,
                        scale,
                        window,
                        sinks,
                    },
                    &ins,
                )?;
                out.extend([(0, r[0]), (1, r[1]), (2, r[2])]);
                if sinks {
                    out.push((3, r[3]));
                }
            }
            // Collectives: the conjugate collective (a per-device sum's derivative is
            // the identity, a gather's is a reduce-scatter, and so on).
            Op::AllReduce { .. } => out.push((0, dy)),
            Op::AllGather { axis, parts } => {
                out.push((0, self.b.add1(Op::ReduceScatter { axis, parts }, &[dy])?));
            }
            Op::ReduceScatter { axis, parts } => {
                out.push((0, self.b.add1(Op::AllGather { axis, parts }, &[dy])?));
            }
            Op::AllToAll {
                split,
                concat,
                parts,
            } => {
                let back = Op::AllToAll {
                    split: concat,
                    concat: split,
                    parts,
                };
                out.push((0, self.b.add1(back, &[dy])?));
            }
            Op::TpCopy { parts } => out.push((0, self.b.add1(Op::AllReduce { parts }, &[dy])?)),
            Op::TpSplit { axis, parts } => {
                out.push((0, self.b.add1(Op::AllGather { axis, parts }, &[dy])?));
            }
            Op::TpGather { axis, parts } => {
                out.push((0, self.b.add1(Op::TpSplit { axis, parts }, &[dy])?));
            }
            Op::VocabParallelEmbedding { parts } => {
                if self.wants(0) {
                    let ids = self.input(1);
                    let vocab = self.in_ty(0).shape.dims()[0]
                        .as_lit()
                        .ok_or_else(|| self.unsupported("symbolic vocabulary".into()))?;
                    let grad = Op::VocabParallelEmbeddingGrad { vocab, parts };
                    out.push((0, self.b.add1(grad, &[dy, ids])?));
                }
            }
            Op::VocabParallelCrossEntropy { parts } => {
                let logits = self.input(0);
                let labels = self.input(1);
                let grad = Op::VocabParallelCrossEntropyGrad { parts };
                out.push((0, self.b.add1(grad, &[dy, logits, labels])?));
            }
            Op::MoeRoute { topk, sigmoid } => {
                // dweights scattered into the chosen experts' scores, through the
                // softmax (or sigmoid) of all E: reads the scores and the choices.
                let probs = self.result(1);
                let idx = self.result(2);
                let grad = Op::MoeRouteGrad { topk, sigmoid };
                out.push((0, self.b.add1(grad, &[dy, probs, idx])?));
            }
            Op::MoeDispatch { experts, capacity } => {
                if self.wants(0) {
                    let idx = self.input(1);
                    let grad = Op::MoeDispatchGrad { experts, capacity };
                    out.push((0, self.b.add1(grad, &[dy, idx])?));
                }
            }
            Op::GroupedMatMul { tb } => {
                if self.wants(0) {
                    let w = self.input(1);
                    out.push((0, self.b.add1(Op::GroupedMatMul { tb: !tb }, &[dy, w])?));
                }
                if self.wants(1) {
                    let a = self.input(0);
                    let experts = self.in_ty(1).shape.dims()[0]
                        .as_lit()
                        .ok_or_else(|| self.unsupported("symbolic expert count".into()))?;
                    let grad = Op::GroupedMatMulWgrad { experts, tb };
                    out.push((1, self.b.add1(grad, &[a, dy])?));
                }
            }
            Op::MoeCombine { experts, capacity } => {
                let y = self.input(0);
                let w = self.input(1);
                let idx = self.input(2);
                let grad = Op::MoeCombineGrad { experts, capacity };
                let r = self.b.add(grad, &[dy, y, w, idx])?;
                out.extend([(0, r[0]), (1, r[1])]);
            }
            Op::GeluGrad
            | Op::SiluGrad
            | Op::SoftmaxGrad { .. }
            | Op::DropoutGrad { .. }
            | Op::LayerNormGrad { .. }
            | Op::RmsNormGrad { .. }
            | Op::RotaryGrad { .. }
            | Op::EmbeddingGrad { .. }
            | Op::CrossEntropyGrad
            | Op::FlashAttentionGrad { .. }
            | Op::SdpaGrad { .. }
            | Op::AdamW { .. }
            | Op::VocabParallelEmbeddingGrad { .. }
            | Op::VocabParallelCrossEntropyGrad { .. }
            | Op::MoeRouteGrad { .. }
            | Op::MoeDispatchGrad { .. }
            | Op::GroupedMatMulWgrad { .. }
            | Op::ClampGrad { .. }
            | Op::GroupedBiasAddGrad { .. }
            | Op::MoeCombineGrad { .. }
            | Op::Send { .. } => {
                return Err(TrainError::NoRule {
                    op: id,
                    name: op.name(),
                })
            }
        }
        Ok(out)
    }

    /// Gradient casts, master parameters, moments and the AdamW step per parameter.
    fn optimizer(&mut self, opts: &TrainOptions, mut grads: Vec<(OpId, TensorId)>) -> R<()> {
        grads.sort();
        let mut finals = Vec::with_capacity(grads.len());
        for (pid, g) in grads {
            self.b.set_block(self.fwd.node(pid).block);
            self.b.set_phase(Phase::Bwd);
            let g = if self.b.ty(g).dtype != opts.grad_dtype {
                let cast = Op::Cast {
                    to: opts.grad_dtype,
                };
                self.b.add1(cast, &[g])?
            } else {
                g
            };
            self.b.set_role(g, Role::Grad);
            finals.push((pid, g));
        }
        // The optimizer's copies of the gradients, all made before the first update
        // (Megatron-LM's `_copy_model_grads_to_main_grads`, DeepSpeed's fp32 partition
        // gradient of a parameter group).
        if opts.main_grad_dtype != opts.grad_dtype {
            let role = if opts.main_grad_transient {
                Role::Temporary
            } else {
                Role::Grad
            };
            for (pid, g) in finals.iter_mut() {
                self.b.set_block(self.fwd.node(*pid).block);
                self.b.set_phase(Phase::Opt);
                let to = opts.main_grad_dtype;
                *g = self.b.add1(Op::Cast { to }, &[*g])?;
                self.b.set_role(*g, role);
            }
        }
        for (pid, g) in finals {
            let node = self.fwd.node(pid);
            let Op::Param { name } = &node.op else {
                continue;
            };
            self.b.set_block(node.block);
            self.b.set_phase(Phase::Opt);
            let lowp_ty = self.fwd.ty(node.results[0]).clone();
            let master_ty = lowp_ty.with_dtype(opts.master_dtype);
            let has_copy = lowp_ty.dtype != opts.master_dtype;
            let master = if has_copy {
                let master = Op::Param {
                    name: format!("{name}.master"),
                };
                self.b.source(master, master_ty.clone(), Role::Param)
            } else {
                self.mapped(node.results[0])
            };
            let mut state = |what: &str| {
                let op = Op::State {
                    name: format!("{name}.{what}"),
                };
                self.b.source(op, master_ty.clone(), Role::OptimizerState)
            };
            let m = state("exp_avg");
            let v = state("exp_avg_sq");
            let adam = Op::AdamW {
                lr: opts.lr,
                beta1: opts.beta1,
                beta2: opts.beta2,
                eps: opts.eps,
                weight_decay: opts.weight_decay,
            };
            let r = self.b.add(adam, &[master, g, m, v])?;
            self.b.set_role(r[0], Role::Param);
            self.b.set_role(r[1], Role::OptimizerState);
            self.b.set_role(r[2], Role::OptimizerState);
            if has_copy {
                let cast = self.b.add1(Op::Cast { to: lowp_ty.dtype }, &[r[0]])?;
                self.b.set_role(cast, Role::LowPrecParam);
            }
        }
        Ok(())
    }
}
