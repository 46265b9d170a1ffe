//! A reference interpreter: every op of the IR on the CPU, for tiny shapes, and `p`
//! devices of a tensor-parallel group simulated in lockstep (the collectives and the
//! rank-dependent ops read every device's tensors).
//!
//! It exists to check sharding: [`compare`] runs a forward graph's training step and
//! the training step of its sharded per-device graph on the same random inputs and
//! parameters, and measures how far the loss and every parameter gradient (assembled
//! from the devices' pieces) differ. Dtypes are ignored: every tensor holds [`F`]
//! values; casts are identities; optimizer ops are not run.
//!
//! Test support: built only with the `testing` cargo feature (the tests enable it).
//!
//! Elements are stored as `f64`, not in the graphs' f32/bf16: the sharded program sums
//! in a different order (partial products, then an all-reduce), and in f32 the rounding
//! of that reordering alone, amplified by ill-conditioned random graphs (layer norms
//! with ε = 10⁻¹²), exceeds a 10⁻⁴ tolerance. In f64 the two runs agree to ~10⁻¹², so
//! any difference the checks see is a semantic one.
//!
//! Dropout draws its keep mask from a hash of the forward op it implements and the
//! element's position in the *logical* tensor, so a sharded dropout keeps exactly the
//! elements the unsharded one keeps.

use super::layout::{Layout, Val};
use super::ShardedModel;
use crate::ir::{Env, Graph, Op, OpId, Phase, TensorId};
use std::collections::BTreeMap;
use thiserror::Error;

/// The interpreter's element type.
pub type F = f64;

/// A dense row-major tensor (integers are stored as exact values).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: Vec<F>,
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }

    fn numel(&self) -> usize {
        self.data.len()
    }
}

/// Why interpretation failed.
#[derive(Debug, Error)]
pub enum InterpError {
    /// An op could not be run.
    #[error("{op} ({name}): {why}")]
    Op {
        /// The op.
        op: OpId,
        /// Its name.
        name: &'static str,
        /// What went wrong.
        why: String,
    },
    /// A source has no feed.
    #[error("no value for source `{0}`")]
    Feed(String),
    /// A graph could not be prepared (no loss, training graph derivation failed).
    #[error("{0}")]
    Setup(String),
}

/// How one graph is run.
pub struct Run<'a> {
    /// The graph (forward or training).
    pub graph: &'a Graph,
    /// Devices in the group (1 for an unsharded graph).
    pub parts: u32,
    /// Binding of `b` and `s`.
    pub env: Env,
    /// Per tensor: logical type and layout, for the tensors that have them (the
    /// forward tensors of a sharded graph); none for an unsharded graph.
    pub layouts: &'a [Val],
    /// Per op: the unsharded op it implements (dropout draws are keyed by it).
    pub origins: &'a [Option<OpId>],
    /// Seed of the dropout draws.
    pub seed: u64,
}

/// Every tensor's value on every device: `[device][tensor]` (`None` for tensors of
/// ops that were not run).
pub type Values = Vec<Vec<Option<Tensor>>>;

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A uniform number in `[0, 1)` from a 64-bit hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for i in (0..shape.len()).rev() {
        if shape[i] > 0 {
            idx[i] = flat % shape[i];
            flat /= shape[i];
        }
    }
    idx
}

/// Device `rank`'s piece of a logical tensor under `layout`.
pub fn piece(global: &Tensor, layout: Layout, parts: u32, rank: usize) -> Tensor {
    match layout {
        Layout::Replicated => global.clone(),
        Layout::Partial => {
            let mut t = global.clone();
            let p = parts as F;
            t.data.iter_mut().for_each(|x| *x /= p);
            t
        }
        Layout::Sharded { axis, groups } => {
            let ax = axis as usize;
            let p = parts as usize;
            let g = groups as usize;
            let n = global.shape[ax];
            let group = n / g;
            let block = group / p;
            let mut shape = global.shape.clone();
            shape[ax] = n / p;
            let mut out = Tensor::zeros(&shape);
            let gs = strides(&global.shape);
            for (flat, v) in out.data.iter_mut().enumerate() {
                let mut idx = unravel(flat, &shape);
                let i = idx[ax];
                let (k, w) = (i / block, i % block);
                idx[ax] = k * group + rank * block + w;
                *v = global.data[idx.iter().zip(&gs).map(|(a, b)| a * b).sum::<usize>()];
            }
            out
        }
    }
}

/// Reassembles a logical tensor from the devices' pieces (a partial layout sums them).
pub fn assemble(pieces: &[&Tensor], layout: Layout) -> Tensor {
    match layout {
        Layout::Replicated => pieces[0].clone(),
        Layout::Partial => {
            let mut t = pieces[0].clone();
            for q in &pieces[1..] {
                t.data.iter_mut().zip(&q.data).for_each(|(a, b)| *a += b);
            }
            t
        }
        Layout::Sharded { axis, groups } => {
            let ax = axis as usize;
            let p = pieces.len();
            let g = groups as usize;
            let local = pieces[0].shape[ax];
            let block = local / g;
            let mut shape = pieces[0].shape.clone();
            shape[ax] = local * p;
            let group = block * p;
            let mut out = Tensor::zeros(&shape);
            let gs = strides(&shape);
            for (rank, q) in pieces.iter().enumerate() {
                for (flat, v) in q.data.iter().enumerate() {
                    let mut idx = unravel(flat, &q.shape);
                    let i = idx[ax];
                    let (k, w) = (i / block, i % block);
                    idx[ax] = k * group + rank * block + w;
                    out.data[idx.iter().zip(&gs).map(|(a, b)| a * b).sum::<usize>()] = *v;
                }
            }
            out
        }
    }
}

/// Runs `run.graph` on every device. `feeds` holds the *logical* value of every input
/// and parameter by name; each device gets its piece by the source's layout.
///
/// # Errors
/// [`InterpError::Feed`] when an input or parameter has no feed, and
/// [`InterpError::Op`] when an op cannot run on its values (shapes the interpreter does not
/// support, a fractional size).
pub fn execute(run: &Run, feeds: &BTreeMap<String, Tensor>) -> Result<Values, InterpError> {
    let g = run.graph;
    let p = run.parts.max(1) as usize;
    let mut vals: Values = vec![vec![None; g.tensor_count()]; p];
    for id in g.ops() {
        let node = g.node(id);
        if node.phase == Phase::Opt {
            continue;
        }
        let err = |why: String| InterpError::Op {
            op: id,
            name: node.op.name(),
            why,
        };
        let out_shapes: Vec<Vec<usize>> = node
            .results
            .iter()
            .map(|&t| {
                g.ty(t)
                    .shape
                    .dims()
                    .iter()
                    .map(|d| d.eval(run.env).map(|v| v as usize))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| err(format!("{} is fractional here", g.ty(t))))
            })
            .collect::<Result<_, _>>()?;
        let inputs = |d: usize| -> Result<Vec<&Tensor>, InterpError> {
            node.inputs
                .iter()
                .map(|&t| {
                    vals[d][t.index()]
                        .as_ref()
                        .ok_or_else(|| err(format!("input {t} was not computed")))
                })
                .collect()
        };
        let results: Vec<Vec<Tensor>> = match &node.op {
            Op::Input { name } | Op::Param { name } => {
                let t = node.results[0];
                let global = feeds
                    .get(name)
                    .ok_or_else(|| InterpError::Feed(name.clone()))?;
                let layout = run
                    .layouts
                    .get(t.index())
                    .map_or(Layout::Replicated, |v| v.layout);
                let out: Vec<Vec<Tensor>> = (0..p)
                    .map(|d| vec![piece(global, layout, run.parts, d)])
                    .collect();
                if out[0][0].shape != out_shapes[0] {
                    return Err(err(format!(
                        "feed `{name}` has shape {:?}, the graph wants {:?}",
                        global.shape, out_shapes[0]
                    )));
                }
                out
            }
            Op::Constant { value } => (0..p)
                .map(|_| {
                    let mut t = Tensor::zeros(&out_shapes[0]);
                    t.data.iter_mut().for_each(|x| *x = *value as F);
                    vec![t]
                })
                .collect(),
            Op::State { .. } => (0..p)
                .map(|_| vec![Tensor::zeros(&out_shapes[0])])
                .collect(),
            op if is_group_op(op) => {
                let all: Vec<Vec<&Tensor>> = (0..p).map(inputs).collect::<Result<_, _>>()?;
                group_op(op, &all, &out_shapes).map_err(err)?
            }
            op => {
                let mut out = Vec::with_capacity(p);
                for d in 0..p {
                    let ins = inputs(d)?;
                    let ctx = Ctx {
                        run,
                        op: id,
                        rank: d,
                    };
                    out.push(local_op(op, &ins, &out_shapes, &ctx).map_err(err)?);
                }
                out
            }
        };
        for (d, rs) in results.into_iter().enumerate() {
            for (&t, v) in node.results.iter().zip(rs) {
                vals[d][t.index()] = Some(v);
            }
        }
    }
    Ok(vals)
}

fn is_group_op(op: &Op) -> bool {
    op.is_collective()
        || matches!(
            op,
            Op::VocabParallelCrossEntropy { .. } | Op::VocabParallelCrossEntropyGrad { .. }
        )
}

struct Ctx<'a> {
    run: &'a Run<'a>,
    op: OpId,
    rank: usize,
}

type R<T> = Result<T, String>;

fn concat(parts: &[&Tensor], axis: usize) -> Tensor {
    let mut shape = parts[0].shape.clone();
    shape[axis] = parts.iter().map(|t| t.shape[axis]).sum();
    let outer: usize = shape[..axis].iter().product();
    let mut out = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for t in parts {
            let chunk: usize = t.shape[axis..].iter().product();
            out.extend_from_slice(&t.data[o * chunk..(o + 1) * chunk]);
        }
    }
    Tensor { shape, data: out }
}

fn slice(x: &Tensor, axis: usize, start: usize, len: usize) -> Tensor {
    let mut shape = x.shape.clone();
    shape[axis] = len;
    let outer: usize = x.shape[..axis].iter().product();
    let inner: usize = x.shape[axis + 1..].iter().product();
    let mut out = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        let base = o * x.shape[axis] * inner;
        out.extend_from_slice(&x.data[base + start * inner..base + (start + len) * inner]);
    }
    Tensor { shape, data: out }
}

fn group_op(op: &Op, all: &[Vec<&Tensor>], outs: &[Vec<usize>]) -> R<Vec<Vec<Tensor>>> {
    let p = all.len();
    let first = |d: usize| all[d][0];
    Ok(match op {
        Op::AllReduce { .. } => {
            let mut sum = first(0).clone();
            for d in 1..p {
                sum.data
                    .iter_mut()
                    .zip(&first(d).data)
                    .for_each(|(a, b)| *a += b);
            }
            (0..p).map(|_| vec![sum.clone()]).collect()
        }
        Op::AllGather { axis, .. } | Op::TpGather { axis, .. } => {
            let pieces: Vec<&Tensor> = (0..p).map(first).collect();
            let whole = concat(&pieces, *axis as usize);
            (0..p).map(|_| vec![whole.clone()]).collect()
        }
        Op::ReduceScatter { axis, .. } => {
            let mut sum = first(0).clone();
            for d in 1..p {
                sum.data
                    .iter_mut()
                    .zip(&first(d).data)
                    .for_each(|(a, b)| *a += b);
            }
            let n = sum.shape[*axis as usize] / p;
            (0..p)
                .map(|d| vec![slice(&sum, *axis as usize, d * n, n)])
                .collect()
        }
        Op::AllToAll {
            split, concat: c, ..
        } => {
            let (s, c) = (*split as usize, *c as usize);
            let n = first(0).shape[s] / p;
            (0..p)
                .map(|r| {
                    let pieces: Vec<Tensor> =
                        (0..p).map(|d| slice(first(d), s, r * n, n)).collect();
                    let refs: Vec<&Tensor> = pieces.iter().collect();
                    vec![concat(&refs, c)]
                })
                .collect()
        }
        Op::VocabParallelCrossEntropy { .. } | Op::VocabParallelCrossEntropyGrad { .. } => {
            let grad = matches!(op, Op::VocabParallelCrossEntropyGrad { .. });
            let (li, yi) = if grad { (1, 2) } else { (0, 1) };
            let local_v = *all[0][li].shape.last().ok_or("logits need a vocab axis")?;
            let tokens = all[0][yi].numel();
            // Per token: max, sum of exponentials, target logit over the whole group.
            let mut max = vec![F::NEG_INFINITY; tokens];
            for ins in all {
                for (t, m) in max.iter_mut().enumerate() {
                    let row = &ins[li].data[t * local_v..(t + 1) * local_v];
                    *m = row.iter().fold(*m, |a, &b| a.max(b));
                }
            }
            let mut sum = vec![0.0f64; tokens];
            let mut target = vec![0.0f64; tokens];
            for (d, ins) in all.iter().enumerate() {
                for t in 0..tokens {
                    let label = ins[yi].data[t] as usize;
                    for j in 0..local_v {
                        let z = ins[li].data[t * local_v + j];
                        sum[t] += (z - max[t]).exp();
                        if label == d * local_v + j {
                            target[t] = z;
                        }
                    }
                }
            }
            if !grad {
                let loss: f64 = (0..tokens)
                    .map(|t| sum[t].ln() + max[t] - target[t])
                    .sum::<f64>()
                    / tokens as f64;
                (0..p)
                    .map(|_| {
                        vec![Tensor {
                            shape: outs[0].clone(),
                            data: vec![loss as F],
                        }]
                    })
                    .collect()
            } else {
                (0..p)
                    .map(|d| {
                        let dl = all[d][0].data[0];
                        let mut out = Tensor::zeros(&outs[0]);
                        for t in 0..tokens {
                            let label = all[d][yi].data[t] as usize;
                            for j in 0..local_v {
                                let z = all[d][li].data[t * local_v + j];
                                let sm = ((z - max[t]).exp()) / sum[t];
                                let hot = if label == d * local_v + j { 1.0 } else { 0.0 };
                                out.data[t * local_v + j] = (dl * (sm - hot) / tokens as f64) as F;
                            }
                        }
                        vec![out]
                    })
                    .collect()
            }
        }
        other => return Err(format!("{} is not a group op", other.name())),
    })
}

fn map1(x: &Tensor, f: impl Fn(F) -> F) -> Tensor {
    Tensor {
        shape: x.shape.clone(),
        data: x.data.iter().map(|&v| f(v)).collect(),
    }
}

fn zip2(a: &Tensor, b: &Tensor, f: impl Fn(F, F) -> F) -> R<Tensor> {
    if a.data.len() != b.data.len() {
        return Err(format!("shapes {:?} and {:?} differ", a.shape, b.shape));
    }
    Ok(Tensor {
        shape: a.shape.clone(),
        data: a.data.iter().zip(&b.data).map(|(&x, &y)| f(x, y)).collect(),
    })
}

const GELU_C: F = 0.797_884_6; // √(2/π)

fn gelu(x: F) -> F {
    0.5 * x * (1.0 + (GELU_C * (x + 0.044_715 * x * x * x)).tanh())
}

fn gelu_grad(x: F) -> F {
    let u = GELU_C * (x + 0.044_715 * x * x * x);
    let t = u.tanh();
    let du = GELU_C * (1.0 + 3.0 * 0.044_715 * x * x);
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
}

fn sigmoid(x: F) -> F {
    1.0 / (1.0 + (-x).exp())
}

/// Rows of the last axis: (row count, row length).
fn rows(x: &Tensor) -> (usize, usize) {
    let n = *x.shape.last().unwrap_or(&1);
    (x.numel() / n.max(1), n)
}

fn local_op(op: &Op, ins: &[&Tensor], outs: &[Vec<usize>], ctx: &Ctx) -> R<Vec<Tensor>> {
    let x = ins.first().copied();
    let x0 = || x.ok_or_else(|| "missing input".to_string());
    let one = |t: Tensor| Ok(vec![t]);
    let rank = ctx.rank;
    let parts = ctx.run.parts.max(1) as usize;
    match op {
        Op::Input { .. }
        | Op::Param { .. }
        | Op::State { .. }
        | Op::Constant { .. }
        | Op::Recv { .. }
        | Op::Send { .. }
        | Op::AdamW { .. } => Err(format!("{} is not interpreted here", op.name())),
        Op::MatMul { ta, tb } => one(matmul(ins[0], ins[1], *ta, *tb, &outs[0])?),
        Op::Add => one(zip2(ins[0], ins[1], |a, b| a + b)?),
        Op::Mul => one(zip2(ins[0], ins[1], |a, b| a * b)?),
        Op::Scale { factor } => one(map1(x0()?, |v| v * *factor as F)),
        Op::BiasAdd => {
            let (a, b) = (ins[0], ins[1]);
            let n = b.numel();
            let mut t = a.clone();
            t.data
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v += b.data[i % n]);
            one(t)
        }
        Op::Gelu => one(map1(x0()?, gelu)),
        Op::Pow { exponent } => one(map1(x0()?, |v| v.powf(*exponent))),
        Op::Tanh => one(map1(x0()?, F::tanh)),
        Op::Rsqrt => one(map1(x0()?, |v| 1.0 / v.sqrt())),
        Op::Shift { value } => one(map1(x0()?, |v| v + value)),
        Op::Contiguous => one(x0()?.clone()),
        Op::GeluGrad => one(zip2(ins[0], ins[1], |dy, x| dy * gelu_grad(x))?),
        Op::Silu => one(map1(x0()?, |v| v * sigmoid(v))),
        Op::SiluGrad => one(zip2(ins[0], ins[1], |dy, x| {
            let s = sigmoid(x);
            dy * s * (1.0 + x * (1.0 - s))
        })?),
        Op::Softmax { causal, scale } => {
            let x = x0()?;
            let (r, n) = rows(x);
            let q_len = if x.shape.len() >= 2 {
                x.shape[x.shape.len() - 2]
            } else {
                1
            };
            let mut t = x.clone();
            for row in 0..r {
                let qi = row % q_len;
                let s = &mut t.data[row * n..(row + 1) * n];
                let mut m = F::NEG_INFINITY;
                for (j, v) in s.iter_mut().enumerate() {
                    *v = if *causal && j > qi {
                        F::NEG_INFINITY
                    } else {
                        *v * *scale as F
                    };
                    m = m.max(*v);
                }
                let mut sum = 0.0f64;
                for v in s.iter_mut() {
                    *v = (*v - m).exp();
                    sum += *v;
                }
                s.iter_mut().for_each(|v| *v = ((*v) / sum) as F);
            }
            one(t)
        }
        Op::SoftmaxGrad { scale } => {
            let (dy, y) = (ins[0], ins[1]);
            let (r, n) = rows(y);
            let mut t = dy.clone();
            for row in 0..r {
                let sl = row * n..(row + 1) * n;
                let dot: f64 = dy.data[sl.clone()]
                    .iter()
                    .zip(&y.data[sl.clone()])
                    .map(|(a, b)| (*a) * (*b))
                    .sum();
                for j in sl {
                    t.data[j] = (*scale as F) * y.data[j] * (dy.data[j] - dot as F);
                }
            }
            one(t)
        }
        Op::Dropout { p } => {
            let x = x0()?;
            let keep_p = 1.0 - p;
            let t = ctx.run.graph.node(ctx.op).inputs[0];
            let val = ctx.run.layouts.get(t.index());
            let origin = ctx
                .run
                .origins
                .get(ctx.op.index())
                .copied()
                .flatten()
                .unwrap_or(ctx.op);
            let logical: Vec<usize> = match val {
                Some(v) => v
                    .logical
                    .shape
                    .dims()
                    .iter()
                    .map(|d| d.eval(ctx.run.env).map(|n| n as usize))
                    .collect::<Option<_>>()
                    .ok_or("fractional logical shape")?,
                None => x.shape.clone(),
            };
            let layout = val.map_or(Layout::Replicated, |v| v.layout);
            if layout == Layout::Partial {
                return Err("dropout of a partial sum".into());
            }
            let ls = strides(&logical);
            let mut y = x.clone();
            let mut mask = Tensor::zeros(&x.shape);
            for flat in 0..x.numel() {
                let mut idx = unravel(flat, &x.shape);
                if let Layout::Sharded { axis, groups } = layout {
                    let ax = axis as usize;
                    let block = x.shape[ax] / groups as usize;
                    let (k, w) = (idx[ax] / block, idx[ax] % block);
                    idx[ax] = k * block * parts + rank * block + w;
                }
                let gflat: usize = idx.iter().zip(&ls).map(|(a, b)| a * b).sum();
                let h = splitmix(
                    ctx.run.seed ^ splitmix(origin.index() as u64) ^ splitmix(gflat as u64 + 1),
                );
                let keep = unit(h) < keep_p;
                mask.data[flat] = if keep { 1.0 } else { 0.0 };
                y.data[flat] = if keep {
                    x.data[flat] / keep_p as F
                } else {
                    0.0
                };
            }
            Ok(vec![y, mask])
        }
        Op::DropoutGrad { p } => {
            let keep = (1.0 - p) as F;
            one(zip2(ins[0], ins[1], |dy, m| dy * m / keep)?)
        }
        Op::LayerNorm { eps } | Op::RmsNorm { eps } => {
            let ln = matches!(op, Op::LayerNorm { .. });
            let x = x0()?;
            let (r, n) = rows(x);
            let mut t = x.clone();
            for row in 0..r {
                let s = &x.data[row * n..(row + 1) * n];
                let mean = if ln {
                    s.iter().sum::<f64>() / n as f64
                } else {
                    0.0
                };
                let var = s.iter().map(|&v| (v - mean).powi(2)).sum::<f64>() / n as f64;
                let inv = 1.0 / (var + eps).sqrt();
                for (j, &sj) in s.iter().enumerate() {
                    let xh = (sj - mean) * inv;
                    let mut v = xh * ins[1].data[j];
                    if ln {
                        v += ins[2].data[j];
                    }
                    t.data[row * n + j] = v as F;
                }
            }
            one(t)
        }
        Op::LayerNormGrad { eps } | Op::RmsNormGrad { eps } => {
            let ln = matches!(op, Op::LayerNormGrad { .. });
            let (dy, x, gamma) = (ins[0], ins[1], ins[2]);
            let (r, n) = rows(x);
            let mut dx = x.clone();
            let mut dg = vec![0.0f64; n];
            let mut db = vec![0.0f64; n];
            for row in 0..r {
                let s = &x.data[row * n..(row + 1) * n];
                let d = &dy.data[row * n..(row + 1) * n];
                let mean = if ln {
                    s.iter().sum::<f64>() / n as f64
                } else {
                    0.0
                };
                let var = s.iter().map(|&v| (v - mean).powi(2)).sum::<f64>() / n as f64;
                let inv = 1.0 / (var + eps).sqrt();
                let xh: Vec<f64> = s.iter().map(|&v| (v - mean) * inv).collect();
                let dxh: Vec<f64> = (0..n).map(|j| d[j] * gamma.data[j]).collect();
                let m1 = if ln {
                    dxh.iter().sum::<f64>() / n as f64
                } else {
                    0.0
                };
                let m2 = dxh.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / n as f64;
                for j in 0..n {
                    dx.data[row * n + j] = (inv * (dxh[j] - m1 - xh[j] * m2)) as F;
                    dg[j] += d[j] * xh[j];
                    db[j] += d[j];
                }
            }
            let vec_t = |v: Vec<f64>| Tensor {
                shape: vec![n],
                data: v.into_iter().map(|x| x as F).collect(),
            };
            let mut out = vec![dx, vec_t(dg)];
            if ln {
                out.push(vec_t(db));
            }
            Ok(out)
        }
        Op::Rotary { dims, theta } | Op::RotaryGrad { dims, theta } => {
            let sign = if matches!(op, Op::Rotary { .. }) {
                1.0
            } else {
                -1.0
            };
            let x = x0()?;
            let d = *x.shape.last().ok_or("rank")?;
            let seq = x.shape[1];
            let inner: usize = x.shape[2..].iter().product();
            let half = (*dims / 2) as usize;
            let mut t = x.clone();
            for flat in (0..x.numel()).step_by(d) {
                let pos = (flat / inner) % seq;
                for i in 0..half {
                    let freq = theta.powf(-2.0 * i as f64 / *dims as f64);
                    let (sn, cs) = (sign * pos as f64 * freq).sin_cos();
                    let (a, b) = ((x.data[flat + i]), (x.data[flat + i + half]));
                    t.data[flat + i] = (a * cs - b * sn) as F;
                    t.data[flat + i + half] = (a * sn + b * cs) as F;
                }
            }
            one(t)
        }
        Op::Embedding | Op::VocabParallelEmbedding { .. } => {
            let (table, ids) = (ins[0], ins[1]);
            let (v, h) = (table.shape[0], table.shape[1]);
            let offset = if matches!(op, Op::Embedding) {
                0
            } else {
                rank * v
            };
            let mut t = Tensor::zeros(&outs[0]);
            for (i, &id) in ids.data.iter().enumerate() {
                let id = id as usize;
                if (offset..offset + v).contains(&id) {
                    let row = id - offset;
                    t.data[i * h..(i + 1) * h].copy_from_slice(&table.data[row * h..(row + 1) * h]);
                }
            }
            one(t)
        }
        Op::EmbeddingGrad { .. } | Op::VocabParallelEmbeddingGrad { .. } => {
            let (dy, ids) = (ins[0], ins[1]);
            let (v, h) = (outs[0][0], outs[0][1]);
            let offset = if matches!(op, Op::EmbeddingGrad { .. }) {
                0
            } else {
                rank * v
            };
            let mut acc = vec![0.0f64; v * h];
            for (i, &id) in ids.data.iter().enumerate() {
                let id = id as usize;
                if (offset..offset + v).contains(&id) {
                    for j in 0..h {
                        acc[(id - offset) * h + j] += dy.data[i * h + j];
                    }
                }
            }
            one(Tensor {
                shape: outs[0].clone(),
                data: acc.into_iter().map(|v| v as F).collect(),
            })
        }
        Op::Reshape { .. } | Op::Cast { .. } | Op::TpCopy { .. } => one(Tensor {
            shape: outs[0].clone(),
            data: x0()?.data.clone(),
        }),
        Op::Transpose { perm } => {
            let x = x0()?;
            let xs = strides(&x.shape);
            let mut t = Tensor::zeros(&outs[0]);
            for (flat, v) in t.data.iter_mut().enumerate() {
                let idx = unravel(flat, &outs[0]);
                let src: usize = perm
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| idx[i] * xs[p as usize])
                    .sum();
                *v = x.data[src];
            }
            one(t)
        }
        Op::Slice { axis, start, len } => {
            one(slice(x0()?, *axis as usize, *start as usize, *len as usize))
        }
        Op::TpSplit { axis, .. } => {
            let x = x0()?;
            let n = x.shape[*axis as usize] / parts;
            one(slice(x, *axis as usize, rank * n, n))
        }
        Op::Concat { axis } => one(concat(ins, *axis as usize)),
        Op::Pad { axis, before, .. } => {
            let x = x0()?;
            let ax = *axis as usize;
            let mut t = Tensor::zeros(&outs[0]);
            let ts = strides(&outs[0]);
            for flat in 0..x.numel() {
                let mut idx = unravel(flat, &x.shape);
                idx[ax] += *before as usize;
                t.data[idx.iter().zip(&ts).map(|(a, b)| a * b).sum::<usize>()] = x.data[flat];
            }
            one(t)
        }
        Op::Repeat { axis, times } => {
            let x = x0()?;
            let ax = *axis as usize;
            let xs = strides(&x.shape);
            let mut t = Tensor::zeros(&outs[0]);
            for (flat, v) in t.data.iter_mut().enumerate() {
                let mut idx = unravel(flat, &outs[0]);
                idx[ax] /= *times as usize;
                *v = x.data[idx.iter().zip(&xs).map(|(a, b)| a * b).sum::<usize>()];
            }
            one(t)
        }
        Op::Broadcast { axes, .. } => {
            let x = x0()?;
            let xs = strides(&x.shape);
            let mut t = Tensor::zeros(&outs[0]);
            for (flat, v) in t.data.iter_mut().enumerate() {
                let idx = unravel(flat, &outs[0]);
                let kept = idx
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !axes.contains(&(*i as u32)));
                *v = x.data[kept.zip(&xs).map(|((_, a), b)| a * b).sum::<usize>()];
            }
            one(t)
        }
        Op::ReduceSum { axes } => {
            let x = x0()?;
            let os = strides(&outs[0]);
            let mut acc = vec![0.0f64; outs[0].iter().product()];
            for flat in 0..x.numel() {
                let idx = unravel(flat, &x.shape);
                let kept = idx
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !axes.contains(&(*i as u32)));
                acc[kept.zip(&os).map(|((_, a), b)| a * b).sum::<usize>()] += x.data[flat];
            }
            one(Tensor {
                shape: outs[0].clone(),
                data: acc.into_iter().map(|v| v as F).collect(),
            })
        }
        Op::CrossEntropy | Op::CrossEntropyGrad => {
            let grad = matches!(op, Op::CrossEntropyGrad);
            let (z, y) = if grad {
                (ins[1], ins[2])
            } else {
                (ins[0], ins[1])
            };
            let (r, n) = rows(z);
            let mut loss = 0.0f64;
            let mut dz = Tensor::zeros(&z.shape);
            let dl = if grad { ins[0].data[0] } else { 0.0 };
            for row in 0..r {
                let s = &z.data[row * n..(row + 1) * n];
                let m = s.iter().fold(F::NEG_INFINITY, |a, &b| a.max(b));
                let sum: f64 = s.iter().map(|&v| (v - m).exp()).sum();
                let label = y.data[row] as usize;
                loss += sum.ln() + m - (s[label.min(n - 1)]);
                for (j, &sj) in s.iter().enumerate() {
                    let sm = (sj - m).exp() / sum;
                    let hot = if j == label { 1.0 } else { 0.0 };
                    dz.data[row * n + j] = (dl * (sm - hot) / r as f64) as F;
                }
            }
            if grad {
                one(dz)
            } else {
                one(Tensor {
                    shape: outs[0].clone(),
                    data: vec![(loss / r as f64) as F],
                })
            }
        }
        Op::FlashAttention {
            causal,
            scale,
            window,
            sinks,
        } => {
            let mask = Mask::new(*causal, *window);
            let sk = sinks.then(|| ins[3]);
            let (o, _) = attention(ins[0], ins[1], ins[2], None, sk, mask, *scale)?;
            one(o)
        }
        Op::FlashAttentionGrad {
            causal,
            scale,
            window,
            sinks,
        } => {
            let mask = Mask::new(*causal, *window);
            let sk = sinks.then(|| ins[5]);
            let (_, grads) = attention(ins[1], ins[2], ins[3], Some(ins[0]), sk, mask, *scale)?;
            grad_results(grads, *sinks)
        }
        Op::Sdpa {
            causal,
            scale,
            window,
            sinks,
        } => {
            let mask = Mask::new(*causal, *window);
            if ins.len() > 3 + usize::from(*sinks) {
                return Err("the interpreter runs sdpa without a mask tensor".into());
            }
            let sk = sinks.then(|| ins[3]);
            let (o, _) = attention(ins[0], ins[1], ins[2], None, sk, mask, *scale)?;
            Ok(vec![o, log_sum_exp(ins[0], ins[1], sk, mask, *scale)])
        }
        Op::SdpaGrad {
            causal,
            scale,
            window,
            sinks,
        } => {
            let mask = Mask::new(*causal, *window);
            if ins.len() > 6 + usize::from(*sinks) {
                return Err("the interpreter runs sdpa without a mask tensor".into());
            }
            let sk = sinks.then(|| ins[6]);
            let (_, grads) = attention(ins[1], ins[2], ins[3], Some(ins[0]), sk, mask, *scale)?;
            grad_results(grads, *sinks)
        }
        Op::Clamp { min, max } => one(map1(x0()?, |v| clamp(v, *min, *max))),
        Op::ClampGrad { min, max } => one(zip2(ins[0], ins[1], |dy, x| {
            if clamp(x, *min, *max) == x {
                dy
            } else {
                0.0
            }
        })?),
        Op::GroupedBiasAdd => one(grouped_bias(ins[0], ins[1])?),
        Op::GroupedBiasAddGrad { experts } => {
            let e = usize::try_from(*experts).map_err(|_| "too many experts".to_string())?;
            one(grouped_bias_grad(x0()?, e)?)
        }
        Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::ReduceScatter { .. }
        | Op::AllToAll { .. }
        | Op::TpGather { .. }
        | Op::VocabParallelCrossEntropy { .. }
        | Op::VocabParallelCrossEntropyGrad { .. } => Err("a group op run on one device".into()),
        // Routing depends on the values; the interpreter checks sharding, which the
        // rules leave replicated around these ops.
        Op::MoeRoute { .. }
        | Op::MoeRouteGrad { .. }
        | Op::MoeDispatch { .. }
        | Op::MoeDispatchGrad { .. }
        | Op::GroupedMatMul { .. }
        | Op::GroupedMatMulWgrad { .. }
        | Op::MoeCombine { .. }
        | Op::MoeCombineGrad { .. } => {
            Err("the interpreter does not run mixture-of-experts routing".into())
        }
    }
}

/// PyTorch's `clamp` with optional bounds.
fn clamp(v: F, min: Option<f64>, max: Option<f64>) -> F {
    let v = min.map_or(v, |lo| v.max(lo));
    max.map_or(v, |hi| v.min(hi))
}

/// Rows per expert of a grouped op's `r` rows over `e` experts (equal groups).
fn expert_rows(r: usize, e: usize) -> R<usize> {
    if e == 0 || r % e != 0 {
        return Err(format!("{r} rows do not split into {e} expert groups"));
    }
    Ok(r / e)
}

/// `rows[R, n] + bias[E, n]`, expert `e`'s bias on the `e`-th of `E` equal row groups.
fn grouped_bias(x: &Tensor, bias: &Tensor) -> R<Tensor> {
    let (e, n) = (bias.shape[0], bias.shape[1]);
    let per = expert_rows(x.shape[0], e)?;
    let mut t = x.clone();
    t.data
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v += bias.data[(i / n / per) * n + i % n]);
    Ok(t)
}

/// `dy[R, n] → dbias[E, n]`: each of the `E` equal row groups summed.
fn grouped_bias_grad(dy: &Tensor, e: usize) -> R<Tensor> {
    let (r, n) = (dy.shape[0], dy.shape[1]);
    let per = expert_rows(r, e)?;
    let mut t = Tensor::zeros(&[e, n]);
    for (i, v) in dy.data.iter().enumerate() {
        t.data[(i / n / per) * n + i % n] += v;
    }
    Ok(t)
}

/// The results of an attention gradient op: `dq, dk, dv` and, with sinks, `dsinks`.
fn grad_results(grads: Grads, sinks: bool) -> R<Vec<Tensor>> {
    let (dq, dk, dv, ds) = grads.ok_or("no gradients")?;
    let mut out = vec![dq, dk, dv];
    if sinks {
        out.push(ds);
    }
    Ok(out)
}

fn matmul(a: &Tensor, b: &Tensor, ta: bool, tb: bool, out: &[usize]) -> R<Tensor> {
    let (ra, rb) = (a.shape.len(), b.shape.len());
    let (m, k) = if ta {
        (a.shape[ra - 1], a.shape[ra - 2])
    } else {
        (a.shape[ra - 2], a.shape[ra - 1])
    };
    let n = if tb { b.shape[rb - 2] } else { b.shape[rb - 1] };
    let batch: usize = a.shape[..ra - 2].iter().product();
    let b_batched = rb > 2;
    let mut t = Tensor::zeros(out);
    for bi in 0..batch {
        let ab = bi * m * k;
        let bb = if b_batched { bi * k * n } else { 0 };
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f64;
                for l in 0..k {
                    let av = if ta {
                        a.data[ab + l * m + i]
                    } else {
                        a.data[ab + i * k + l]
                    };
                    let bv = if tb {
                        b.data[bb + j * k + l]
                    } else {
                        b.data[bb + l * n + j]
                    };
                    acc += av * bv;
                }
                t.data[bi * m * n + i * n + j] = acc as F;
            }
        }
    }
    Ok(t)
}

type Grads = Option<(Tensor, Tensor, Tensor, Tensor)>;

/// Attention on `q[b,s,a,d]`, `k, v[b,t,kv,d]`; with `d_o`, also the gradients.
/// The row log-sum-exp `[b, s, a]` of the scaled (and causally masked) scores, as
/// [`Op::Sdpa`] returns it.
fn log_sum_exp(q: &Tensor, k: &Tensor, sinks: Option<&Tensor>, mask: Mask, scale: f64) -> Tensor {
    let (b, s, a, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (t, kv) = (k.shape[1], k.shape[2]);
    let group = (a / kv.max(1)).max(1);
    let mut out = Tensor::zeros(&[b, s, a]);
    for bi in 0..b {
        for i in 0..s {
            for h in 0..a {
                let hk = h / group;
                let dots: Vec<f64> = (0..t)
                    .filter(|&j| !mask.hides(i, j))
                    .map(|j| {
                        let dot: f64 = (0..d)
                            .map(|c| {
                                q.data[((bi * s + i) * a + h) * d + c]
                                    * k.data[((bi * t + j) * kv + hk) * d + c]
                            })
                            .sum();
                        dot * scale
                    })
                    .collect();
                let sink = sinks.map(|t| t.data[h]);
                let m = dots
                    .iter()
                    .copied()
                    .chain(sink)
                    .fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = dots.iter().chain(&sink).map(|&x| (x - m).exp()).sum();
                out.data[(bi * s + i) * a + h] = (m + sum.ln()) as F;
            }
        }
    }
    out
}

/// Which keys a query may not see: later ones (causal) and those `window` or more
/// positions back.
#[derive(Clone, Copy)]
struct Mask {
    causal: bool,
    window: Option<u64>,
}

impl Mask {
    fn new(causal: bool, window: Option<u64>) -> Mask {
        Mask { causal, window }
    }

    /// Whether query `i` does not see key `j`.
    fn hides(self, i: usize, j: usize) -> bool {
        let far = self
            .window
            .is_some_and(|w| (j as u64).saturating_add(w) <= i as u64);
        (self.causal && j > i) || far
    }
}

fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    d_o: Option<&Tensor>,
    sinks: Option<&Tensor>,
    mask: Mask,
    scale: f64,
) -> R<(Tensor, Grads)> {
    let (b, s, a, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (t, kv) = (k.shape[1], k.shape[2]);
    if kv == 0 || a % kv != 0 {
        return Err("query heads must be a multiple of kv heads".into());
    }
    let group = a / kv;
    let qi = |bi: usize, i: usize, h: usize, c: usize| ((bi * s + i) * a + h) * d + c;
    let ki = |bi: usize, j: usize, h: usize, c: usize| ((bi * t + j) * kv + h) * d + c;
    let mut o = Tensor::zeros(&q.shape);
    let mut dq = Tensor::zeros(&q.shape);
    let mut dk = Tensor::zeros(&k.shape);
    let mut dv = Tensor::zeros(&v.shape);
    let mut ds = Tensor::zeros(&[a]);
    if sinks.is_some_and(|t| t.data.len() != a) {
        return Err("sinks must have one value per query head".into());
    }
    for bi in 0..b {
        for h in 0..a {
            let hk = h / group;
            for i in 0..s {
                let mut p = vec![0.0f64; t];
                let mut m = f64::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate() {
                    if mask.hides(i, j) {
                        *pj = f64::NEG_INFINITY;
                        continue;
                    }
                    let dot: f64 = (0..d)
                        .map(|c| (q.data[qi(bi, i, h, c)]) * (k.data[ki(bi, j, hk, c)]))
                        .sum();
                    *pj = dot * scale;
                    m = m.max(*pj);
                }
                // A sink is one more logit in the denominator, with no value.
                let sink = sinks.map(|t| t.data[h]);
                if let Some(z) = sink {
                    m = m.max(z);
                }
                let sum: f64 = p.iter().map(|&x| (x - m).exp()).sum::<f64>()
                    + sink.map_or(0.0, |z| (z - m).exp());
                let p_sink = sink.map_or(0.0, |z| (z - m).exp() / sum);
                p.iter_mut().for_each(|x| *x = (*x - m).exp() / sum);
                for c in 0..d {
                    let val: f64 = (0..t).map(|j| p[j] * (v.data[ki(bi, j, hk, c)])).sum();
                    o.data[qi(bi, i, h, c)] = val as F;
                }
                if let Some(g) = d_o {
                    // dP_j = do · v_j; dS = P ⊙ (dP − Σ P dP).
                    let dp: Vec<f64> = (0..t)
                        .map(|j| {
                            (0..d)
                                .map(|c| (g.data[qi(bi, i, h, c)]) * (v.data[ki(bi, j, hk, c)]))
                                .sum()
                        })
                        .collect();
                    let dot: f64 = (0..t).map(|j| p[j] * dp[j]).sum();
                    // The sink's dP is 0: dsink = P_sink · (0 − Σ P dP).
                    ds.data[h] -= (p_sink * dot) as F;
                    for j in 0..t {
                        let ds = p[j] * (dp[j] - dot) * scale;
                        for c in 0..d {
                            dq.data[qi(bi, i, h, c)] += (ds * (k.data[ki(bi, j, hk, c)])) as F;
                            dk.data[ki(bi, j, hk, c)] += (ds * (q.data[qi(bi, i, h, c)])) as F;
                            dv.data[ki(bi, j, hk, c)] += (p[j] * (g.data[qi(bi, i, h, c)])) as F;
                        }
                    }
                }
            }
        }
    }
    Ok((o, d_o.map(|_| (dq, dk, dv, ds))))
}

/// How far a sharded training step is from the unsharded one.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// The unsharded loss.
    pub loss: F,
    /// `|sharded − unsharded|` of the loss, relative to `max(1, |loss|)`.
    pub loss_error: F,
    /// Largest gradient error over all parameters, relative to `max(1, max |grad|)`.
    pub grad_error: F,
    /// The parameter with the largest gradient error.
    pub worst_param: String,
    /// Parameters compared.
    pub params: usize,
    /// Largest difference between devices' copies of a replicated gradient.
    pub replica_error: F,
}

/// Deterministic random feeds for `fwd`: parameters uniform in `[-scale, scale)`,
/// integer inputs uniform below the vocabulary of the op that reads them (embedding
/// rows, cross-entropy classes), float inputs uniform in `[-1, 1)`.
///
/// # Errors
/// [`InterpError::Setup`] when a size of `fwd` is fractional at `env`.
pub fn random_feeds(
    fwd: &Graph,
    env: Env,
    seed: u64,
) -> Result<BTreeMap<String, Tensor>, InterpError> {
    let mut feeds = BTreeMap::new();
    let mut k = seed;
    for id in fwd.ops() {
        let node = fwd.node(id);
        let (Op::Param { name } | Op::Input { name }) = &node.op else {
            continue;
        };
        let t = node.results[0];
        let ty = fwd.ty(t);
        let shape: Vec<usize> = ty
            .shape
            .dims()
            .iter()
            .map(|d| d.eval(env).map(|v| v as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| InterpError::Setup(format!("`{name}` is fractional at this size")))?;
        let n: usize = shape.iter().product();
        let bound = if ty.dtype.is_float() {
            None
        } else {
            let mut b = 2u64;
            for &u in fwd.uses(t) {
                let un = fwd.node(u);
                match un.op {
                    Op::Embedding => {
                        b = fwd.ty(un.inputs[0]).shape.dims()[0].eval(env).unwrap_or(2);
                    }
                    Op::CrossEntropy => {
                        b = fwd
                            .ty(un.inputs[0])
                            .shape
                            .last()
                            .and_then(|d| d.eval(env))
                            .unwrap_or(2);
                    }
                    _ => {}
                }
            }
            Some(b)
        };
        let scale = if matches!(node.op, Op::Param { .. }) {
            0.5
        } else {
            1.0
        };
        let data = (0..n)
            .map(|_| {
                k = splitmix(k);
                match bound {
                    Some(b) => (k % b) as F,
                    None => ((unit(k) * 2.0 - 1.0) * scale) as F,
                }
            })
            .collect();
        feeds.insert(name.clone(), Tensor { shape, data });
    }
    Ok(feeds)
}

/// The loss of a forward or training graph: the one scalar float result nothing reads.
fn loss_of(g: &Graph) -> Option<TensorId> {
    g.tensor_ids().find(|&t| {
        let ty = g.ty(t);
        let node = g.node(g.tensor(t).producer);
        ty.shape.rank() == 0
            && ty.dtype.is_float()
            && node.phase == Phase::Fwd
            && !node.op.is_source()
            && g.uses(t).iter().all(|&u| g.node(u).phase != Phase::Fwd)
    })
}

/// Parameter name → its gradient in a training graph (the `adamw` op's input 1).
fn grads_of(g: &Graph) -> BTreeMap<String, TensorId> {
    let mut out = BTreeMap::new();
    for id in g.ops() {
        let node = g.node(id);
        if !matches!(node.op, Op::AdamW { .. }) {
            continue;
        }
        if let Op::Param { name } = g.op(g.tensor(node.inputs[0]).producer) {
            let name = name.strip_suffix(".master").unwrap_or(name).to_string();
            out.insert(name, node.inputs[1]);
        }
    }
    out
}

/// Runs the training step of `fwd` and of its sharding `sharded` on the same random
/// feeds and compares the loss and every parameter gradient.
///
/// # Errors
/// [`InterpError::Setup`] when a training graph cannot be derived or the two runs cannot
/// be matched up, and the errors of [`random_feeds`] and [`execute`].
pub fn compare(
    fwd: &Graph,
    sharded: &ShardedModel,
    env: Env,
    seed: u64,
) -> Result<Comparison, InterpError> {
    let opts = crate::train::TrainOptions::default();
    let setup = |e: String| InterpError::Setup(e);
    let train = crate::train::training_graph(fwd, &opts).map_err(|e| setup(e.to_string()))?;
    let strain = sharded
        .training_graph(&opts)
        .map_err(|e| setup(e.to_string()))?;
    let feeds = random_feeds(fwd, env, seed)?;
    let ids: Vec<Option<OpId>> = (0..train.op_count())
        .map(|i| Some(OpId::from_index(i)))
        .collect();
    let base = execute(
        &Run {
            graph: &train,
            parts: 1,
            env,
            layouts: &[],
            origins: &ids,
            seed,
        },
        &feeds,
    )?;
    let p = sharded.tp.max(1);
    let shard = execute(
        &Run {
            graph: &strain,
            parts: p,
            env,
            layouts: &sharded.layouts,
            origins: &sharded.origins,
            seed,
        },
        &feeds,
    )?;
    let get = |vals: &Values, d: usize, t: TensorId| -> Result<Tensor, InterpError> {
        vals[d][t.index()]
            .clone()
            .ok_or_else(|| setup(format!("{t} was not computed")))
    };
    let (l0, l1) = (
        loss_of(&train).ok_or_else(|| setup("no loss".into()))?,
        loss_of(&strain).ok_or_else(|| setup("no sharded loss".into()))?,
    );
    let loss = get(&base, 0, l0)?.data[0];
    let mut loss_error: F = 0.0;
    for d in 0..p as usize {
        let l = get(&shard, d, l1)?.data[0];
        loss_error = loss_error.max((l - loss).abs() / loss.abs().max(1.0));
    }
    let g0 = grads_of(&train);
    let g1 = grads_of(&strain);
    let mut grad_error: F = 0.0;
    let mut replica_error: F = 0.0;
    let mut worst = String::new();
    for (name, &t0) in &g0 {
        let &t1 = g1
            .get(name)
            .ok_or_else(|| setup(format!("no sharded gradient for `{name}`")))?;
        let param = strain
            .find_source(name)
            .ok_or_else(|| setup(format!("no sharded parameter `{name}`")))?;
        let layout = sharded.layouts[strain.node(param).results[0].index()].layout;
        let pieces: Vec<Tensor> = (0..p as usize)
            .map(|d| get(&shard, d, t1))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&Tensor> = pieces.iter().collect();
        if layout == Layout::Replicated {
            for q in &refs[1..] {
                let e = max_diff(q, refs[0]);
                replica_error = replica_error.max(e);
            }
        }
        let whole = assemble(&refs, layout);
        let want = get(&base, 0, t0)?;
        if whole.shape != want.shape {
            return Err(setup(format!(
                "`{name}`: gradient shapes {:?} vs {:?}",
                whole.shape, want.shape
            )));
        }
        let scale = want.data.iter().fold(1.0 as F, |a, b| a.max(b.abs()));
        let e = max_diff(&whole, &want) / scale;
        if e >= grad_error {
            grad_error = e;
            worst = name.clone();
        }
    }
    Ok(Comparison {
        loss,
        loss_error,
        grad_error,
        worst_param: worst,
        params: g0.len(),
        replica_error,
    })
}

fn max_diff(a: &Tensor, b: &Tensor) -> F {
    a.data
        .iter()
        .zip(&b.data)
        .fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_and_assembly_invert() {
        let t = Tensor {
            shape: vec![2, 12],
            data: (0..24).map(|v| v as F).collect(),
        };
        for layout in [
            Layout::split(0),
            Layout::split(1),
            Layout::Sharded { axis: 1, groups: 3 },
        ] {
            let pieces: Vec<Tensor> = (0..2).map(|r| piece(&t, layout, 2, r)).collect();
            let refs: Vec<&Tensor> = pieces.iter().collect();
            assert_eq!(assemble(&refs, layout), t, "{layout}");
        }
        // Grouped: device 0 holds the first half of each of the 3 groups.
        let p0 = piece(&t, Layout::Sharded { axis: 1, groups: 3 }, 2, 0);
        assert_eq!(&p0.data[..6], &[0.0, 1.0, 4.0, 5.0, 8.0, 9.0]);
    }

    fn filled(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor {
            shape: shape.to_vec(),
            data: (0..n as u64)
                .map(|i| unit(splitmix(seed * 1_000_003 + i)) * 2.0 - 1.0)
                .collect(),
        }
    }

    /// `L = Σ dO ⊙ O`, the scalar whose gradients the attention rule returns for `dO`.
    fn loss(q: &Tensor, k: &Tensor, v: &Tensor, d_o: &Tensor, sinks: &Tensor) -> f64 {
        let mask = Mask::new(true, Some(2));
        let (o, _) = attention(q, k, v, None, Some(sinks), mask, 0.5).unwrap();
        o.data.iter().zip(&d_o.data).map(|(a, b)| a * b).sum()
    }

    /// Attention with sinks against the definition (one more logit per head in the
    /// softmax denominator, no value) and its sink and query gradients against central
    /// differences.
    #[test]
    fn attention_sinks_match_the_definition_and_their_gradients() {
        let (b, s, a, kv, d) = (1, 4, 2, 1, 3);
        let q = filled(&[b, s, a, d], 1);
        let k = filled(&[b, s, kv, d], 2);
        let v = filled(&[b, s, kv, d], 3);
        let d_o = filled(&[b, s, a, d], 4);
        let sinks = filled(&[a], 5);
        // Definition, for query 3 of head 1 (window 2: keys 2 and 3).
        let (i, h) = (3, 1);
        let logit = |j: usize| {
            (0..d)
                .map(|c| q.data[(i * a + h) * d + c] * k.data[j * d + c])
                .sum::<f64>()
                * 0.5
        };
        let z = logit(2).exp() + logit(3).exp() + sinks.data[h].exp();
        let want: Vec<f64> = (0..d)
            .map(|c| (logit(2).exp() * v.data[2 * d + c] + logit(3).exp() * v.data[3 * d + c]) / z)
            .collect();
        let mask = Mask::new(true, Some(2));
        let (o, grads) = attention(&q, &k, &v, Some(&d_o), Some(&sinks), mask, 0.5).unwrap();
        for (c, w) in want.iter().enumerate() {
            assert!((o.data[(i * a + h) * d + c] - w).abs() < 1e-12);
        }
        let (dq, _, _, ds) = grads.unwrap();
        let eps = 1e-6;
        for hh in 0..a {
            let (mut up, mut down) = (sinks.clone(), sinks.clone());
            up.data[hh] += eps;
            down.data[hh] -= eps;
            let fd = (loss(&q, &k, &v, &d_o, &up) - loss(&q, &k, &v, &d_o, &down)) / (2.0 * eps);
            assert!(
                (fd - ds.data[hh]).abs() < 1e-7,
                "dsinks[{hh}]: {fd} vs {}",
                ds.data[hh]
            );
        }
        for idx in [0, 7, 17, 23] {
            let (mut up, mut down) = (q.clone(), q.clone());
            up.data[idx] += eps;
            down.data[idx] -= eps;
            let fd =
                (loss(&up, &k, &v, &d_o, &sinks) - loss(&down, &k, &v, &d_o, &sinks)) / (2.0 * eps);
            assert!((fd - dq.data[idx]).abs() < 1e-7, "dq[{idx}]");
        }
        // The log-sum-exp sdpa returns includes the sink's term.
        let lse = log_sum_exp(&q, &k, Some(&sinks), mask, 0.5);
        assert!((lse.data[i * a + h] - z.ln()).abs() < 1e-12);
    }

    /// `grouped_bias_add` adds expert `e`'s row to the `e`-th group of rows; its
    /// gradient sums each group.
    #[test]
    fn grouped_bias_adds_per_expert_and_sums_back() {
        let x = Tensor::zeros(&[6, 2]);
        let bias = Tensor {
            shape: vec![3, 2],
            data: vec![1.0, 2.0, 10.0, 20.0, 100.0, 200.0],
        };
        let y = grouped_bias(&x, &bias).unwrap();
        assert_eq!(
            y.data,
            [1.0, 2.0, 1.0, 2.0, 10.0, 20.0, 10.0, 20.0, 100.0, 200.0, 100.0, 200.0]
        );
        let dy = Tensor {
            shape: vec![6, 2],
            data: (0..12).map(|v| v as F).collect(),
        };
        let db = grouped_bias_grad(&dy, 3).unwrap();
        assert_eq!(db.data, [2.0, 4.0, 10.0, 12.0, 18.0, 20.0]);
        assert!(grouped_bias_grad(&dy, 4).is_err());
    }
}
