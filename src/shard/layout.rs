//! Layouts of per-device values and the sharding semantics of every op.
//!
//! A value of the sharding language is a *family* of per-device tensors, one per device
//! of a tensor-parallel group of `p` devices. Its [`Layout`] says how the family relates
//! to one *logical* tensor (the tensor of the unsharded graph):
//!
//! * [`Layout::Replicated`] — every device holds the logical tensor;
//! * [`Layout::Sharded`] — device `d` holds block `d` of `axis` (with `groups > 1`, the
//!   axis is first cut into `groups` equal groups and device `d` holds block `d` of every
//!   group, concatenated: the layout of a fused QKV projection split by heads);
//! * [`Layout::Partial`] — the logical tensor is the sum of the per-device tensors (an
//!   unreduced sum).
//!
//! [`infer`] is the semantics table: for an op applied to every device's tensors, which
//! input layouts are meaningful, what the result layouts are, and which per-device op
//! (with per-device attributes) a device runs. Rewrite rules may only build terms that
//! this table accepts, and every rule's two sides must get equal [`Val`]s (the analysis
//! checks it).

use crate::ir::{split_dim, Dim, Env, Op, TensorType};
use serde::Serialize;
use std::fmt;

/// How a per-device family of tensors represents a logical tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Layout {
    /// Every device holds the whole tensor.
    Replicated,
    /// Device `d` holds block `d` of `axis` (of every one of `groups` equal groups).
    Sharded {
        /// The split axis.
        axis: u32,
        /// Equal groups the axis is cut into before splitting (1: a plain split).
        groups: u32,
    },
    /// The tensor is the sum of the devices' tensors.
    Partial,
}

impl Layout {
    /// A plain split of `axis`.
    pub const fn split(axis: u32) -> Layout {
        Layout::Sharded { axis, groups: 1 }
    }

    /// Whether every device holds the whole tensor.
    pub fn is_replicated(self) -> bool {
        self == Layout::Replicated
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layout::Replicated => f.write_str("replicated"),
            Layout::Sharded { axis, groups: 1 } => write!(f, "split({axis})"),
            Layout::Sharded { axis, groups } => write!(f, "split({axis}, groups {groups})"),
            Layout::Partial => f.write_str("partial"),
        }
    }
}

/// A per-device value: the logical tensor type, its layout and the per-device type.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Val {
    /// Type of the logical (unsharded) tensor.
    pub logical: TensorType,
    /// How the devices hold it.
    pub layout: Layout,
    /// Type of one device's tensor.
    pub local: TensorType,
}

impl Val {
    /// A replicated value.
    pub fn replicated(ty: TensorType) -> Val {
        Val {
            local: ty.clone(),
            logical: ty,
            layout: Layout::Replicated,
        }
    }

    /// `logical` under `layout` over `p` devices, if the layout fits the type.
    pub fn new(logical: TensorType, layout: Layout, p: u32) -> Option<Val> {
        let local = local_type(&logical, layout, p)?;
        Some(Val {
            logical,
            layout,
            local,
        })
    }
}

/// Whether a dimension can be split evenly into `p` blocks for every binding of the
/// symbols that a tensor-parallel run allows: literal dims must divide; symbolic dims may
/// mention the sequence length `s` (sequence parallelism needs `s` divisible by `p`) but
/// not the micro-batch size `b`, which tensor parallelism never splits.
pub fn divisible(dim: Dim, p: u32) -> bool {
    if p == 0 {
        return false;
    }
    match dim.as_lit() {
        Some(n) => n % u64::from(p) == 0,
        None => {
            // `b` appears iff the value changes with the batch size.
            let one = dim.eval(Env::new(1, 1 << 20));
            let two = dim.eval(Env::new(2, 1 << 20));
            one.is_some() && one == two
        }
    }
}

/// Whether `dim` is the plain sequence length `s` (the axis sequence parallelism splits).
pub fn is_sequence(dim: Dim) -> bool {
    dim == Dim::seq()
}

/// The per-device type of `logical` under `layout`.
pub fn local_type(logical: &TensorType, layout: Layout, p: u32) -> Option<TensorType> {
    match layout {
        Layout::Replicated => Some(logical.clone()),
        Layout::Partial => logical.dtype.is_float().then(|| logical.clone()),
        Layout::Sharded { axis, groups } => {
            let ax = axis as usize;
            let dim = *logical.shape.dims().get(ax)?;
            if groups == 0 {
                return None;
            }
            if groups > 1 {
                let n = dim.as_lit()?;
                let g = u64::from(groups);
                if n % g != 0 || (n / g) % u64::from(p) != 0 {
                    return None;
                }
            } else if !divisible(dim, p) {
                return None;
            }
            let mut t = logical.clone();
            t.shape.0[ax] = split_dim(dim, p).ok()?;
            Some(t)
        }
    }
}

/// Where a `p`-way split of axis `a` of shape `from` appears in shape `to` (both shapes
/// of one reshape, in either direction): the axis `b` of `to` whose `p` contiguous blocks
/// hold exactly the elements of `from`'s blocks.
pub fn reshape_axis(from: &[Dim], to: &[Dim], a: usize, p: u32) -> Option<usize> {
    let prefix = |dims: &[Dim], n: usize| {
        dims[..n]
            .iter()
            .try_fold(Dim::lit(1), |acc, d| acc.checked_mul(*d))
    };
    let product = |dims: &[Dim]| {
        dims.iter()
            .try_fold(Dim::lit(1), |acc, d| acc.checked_mul(*d))
    };
    let size = *from.get(a)?;
    if !divisible(size, p) {
        return None;
    }
    let before = prefix(from, a)?;
    for b in 0..to.len() {
        if prefix(to, b)? != before || to[b] == Dim::lit(1) {
            continue;
        }
        if to[b] == size {
            return Some(b);
        }
        // `to[b]` is the outer factor of `size`: `size = to[b] · to[b+1] · …`.
        for end in b + 2..=to.len() {
            if product(&to[b..end])? == size {
                return divisible(to[b], p).then_some(b);
            }
        }
        // `to[b]` merges `size` with the axes after it: `to[b] = size · from[a+1] · …`.
        for end in a + 2..=from.len() {
            if product(&from[a..end])? == to[b] {
                return Some(b);
            }
        }
        return None;
    }
    None
}

/// The result values of `op` applied on every device to `args`, and the op each device
/// runs (attributes in per-device terms), or `None` when the layouts do not fit the op.
pub fn infer(op: &Op, args: &[&Val], p: u32) -> Option<(Vec<Val>, Op)> {
    let logical: Vec<&TensorType> = args.iter().map(|v| &v.logical).collect();
    let local: Vec<&TensorType> = args.iter().map(|v| &v.local).collect();
    let outs = op.infer(&logical).ok()??;
    if args.iter().all(|v| v.layout.is_replicated()) {
        let vals = outs.into_iter().map(Val::replicated).collect();
        return Some((vals, op.clone()));
    }
    let (layout, local_op) = sharded(op, args, p)?;
    let local_outs = local_op.infer(&local).ok()??;
    let mut vals = Vec::with_capacity(outs.len());
    for (logical, local) in outs.into_iter().zip(local_outs) {
        let val = Val::new(logical, layout, p)?;
        if val.local != local {
            return None;
        }
        vals.push(val);
    }
    Some((vals, local_op))
}

/// The result layout and per-device op for an op with at least one non-replicated input.
fn sharded(op: &Op, args: &[&Val], p: u32) -> Option<(Layout, Op)> {
    use Layout::{Partial, Replicated as R, Sharded};
    let lay = |i: usize| args.get(i).map(|v| v.layout);
    let rank = |i: usize| args.get(i).map_or(0, |v| v.logical.shape.rank() as u32);
    let same = |l: Layout| Some((l, op.clone()));
    let x = lay(0)?;
    match op {
        Op::Gelu | Op::Silu | Op::Clamp { .. } | Op::Dropout { .. } | Op::Cast { .. } => match x {
            Sharded { .. } => same(x),
            _ => None,
        },
        Op::Scale { .. } => same(x),
        Op::Softmax { causal, .. } => match x {
            Sharded { axis, .. } if axis + if *causal { 2 } else { 1 } < rank(0) => same(x),
            _ => None,
        },
        Op::Rotary { .. } => match x {
            // Positions run along axis 1 and rotation pairs along the last axis.
            Sharded { axis, .. } if axis != 1 && axis + 1 < rank(0) => same(x),
            _ => None,
        },
        Op::LayerNorm { .. } | Op::RmsNorm { .. } => match x {
            Sharded { axis, .. }
                if axis + 1 < rank(0) && args[1..].iter().all(|v| v.layout == R) =>
            {
                same(x)
            }
            _ => None,
        },
        Op::Add => match (x, lay(1)?) {
            (a, b) if a == b => same(a),
            _ => None,
        },
        Op::Mul => match (x, lay(1)?) {
            (Partial, R) | (R, Partial) => same(Partial),
            (a, b) if a == b && a != Partial => same(a),
            _ => None,
        },
        Op::BiasAdd => match (x, lay(1)?) {
            (Sharded { axis, groups }, Sharded { axis: 0, groups: g })
                if axis + 1 == rank(0) && g == groups =>
            {
                same(x)
            }
            (Sharded { axis, .. }, R) if axis + 1 < rank(0) => same(x),
            (Partial, Partial) => same(Partial),
            _ => None,
        },
        Op::MatMul { ta, tb } => matmul(*ta, *tb, args).map(|l| (l, op.clone())),
        Op::Reshape { shape } => match x {
            Partial => same(Partial),
            Sharded { axis, groups: 1 } => {
                let k = reshape_axis(args[0].logical.shape.dims(), shape.dims(), axis as usize, p)?;
                let mut local = shape.clone();
                local.0[k] = split_dim(local.0[k], p).ok()?;
                Some((Layout::split(k as u32), Op::Reshape { shape: local }))
            }
            _ => None,
        },
        Op::Transpose { perm } => match x {
            Partial => same(Partial),
            Sharded { axis, groups } => {
                let k = perm.iter().position(|&q| q == axis)?;
                same(Sharded {
                    axis: k as u32,
                    groups,
                })
            }
            R => None,
        },
        Op::Slice { axis, start, len } => match x {
            Partial => same(Partial),
            Sharded { axis: a, .. } if a != *axis => same(x),
            Sharded { groups, .. } => {
                // Whole groups only: each device keeps its block of every kept group.
                let n = args[0].logical.shape.dims()[*axis as usize].as_lit()?;
                let group = n / u64::from(groups);
                let pp = u64::from(p);
                if group == 0 || start % group != 0 || len % group != 0 || group % pp != 0 {
                    return None;
                }
                let kept = u32::try_from(len / group).ok()?;
                let local = Op::Slice {
                    axis: *axis,
                    start: start / pp,
                    len: len / pp,
                };
                Some((
                    Sharded {
                        axis: *axis,
                        groups: kept,
                    },
                    local,
                ))
            }
            R => None,
        },
        Op::Concat { axis } => {
            if args.iter().all(|v| v.layout == Partial) {
                return same(Partial);
            }
            let Sharded { axis: a, groups } = x else {
                return None;
            };
            if a != *axis {
                return args.iter().all(|v| v.layout == x).then(|| (x, op.clone()));
            }
            // Concatenating split tensors along the split axis: equal group sizes.
            let mut total = 0u32;
            let mut size = None;
            for v in args {
                let Sharded { axis: b, groups: g } = v.layout else {
                    return None;
                };
                let n = v.logical.shape.dims()[*axis as usize].as_lit()?;
                let group = n / u64::from(g);
                if b != a || *size.get_or_insert(group) != group {
                    return None;
                }
                total = total.checked_add(g)?;
            }
            let _ = groups;
            same(Sharded {
                axis: a,
                groups: total,
            })
        }
        Op::Pad { axis, .. } => match x {
            Partial => same(Partial),
            Sharded { axis: a, .. } if a != *axis => same(x),
            _ => None,
        },
        Op::Repeat { axis, .. } => match x {
            Partial => same(Partial),
            Sharded { axis: a, groups } if a != *axis || groups == 1 => same(x),
            _ => None,
        },
        Op::Broadcast { axes, shape } => match x {
            Partial => same(Partial),
            Sharded { axis, groups } => {
                let k = (0..shape.rank() as u32)
                    .filter(|i| !axes.contains(i))
                    .nth(axis as usize)?;
                let mut local = shape.clone();
                local.0[k as usize] = split_dim(local.0[k as usize], p).ok()?;
                Some((
                    Sharded { axis: k, groups },
                    Op::Broadcast {
                        axes: axes.clone(),
                        shape: local,
                    },
                ))
            }
            R => None,
        },
        Op::ReduceSum { axes } => match x {
            Partial => same(Partial),
            Sharded { axis, .. } if axes.contains(&axis) => same(Partial),
            Sharded { axis, groups } => {
                let removed = axes.iter().filter(|&&q| q < axis).count() as u32;
                same(Sharded {
                    axis: axis - removed,
                    groups,
                })
            }
            R => None,
        },
        Op::Embedding => match (x, lay(1)?) {
            // Vocabulary-parallel table: each device looks up its rows, the sum is whole.
            (Sharded { axis: 0, groups: 1 }, R) => {
                Some((Partial, Op::VocabParallelEmbedding { parts: p }))
            }
            (Sharded { axis: 1, groups }, R) => same(Sharded {
                axis: rank(1),
                groups,
            }),
            (R, ids @ Sharded { .. }) => same(ids),
            _ => None,
        },
        Op::CrossEntropy => match (x, lay(1)?) {
            (Sharded { axis, groups: 1 }, R) if axis + 1 == rank(0) => {
                Some((R, Op::VocabParallelCrossEntropy { parts: p }))
            }
            _ => None,
        },
        Op::FlashAttention { sinks, .. } => {
            let (k, v) = (lay(1)?, lay(2)?);
            // Sinks (one per query head) split with the heads and stay whole with a
            // batch split.
            let sinks_fit = |heads_split: bool| {
                !*sinks
                    || lay(3)
                        == Some(if heads_split {
                            Sharded { axis: 0, groups: 1 }
                        } else {
                            R
                        })
            };
            match x {
                // Heads (GQA groups stay aligned: see the `shard-flash` rule) or batch.
                Sharded {
                    axis: a @ (0 | 2),
                    groups: 1,
                } if k == x && v == x && sinks_fit(a == 2) => same(x),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Result layout of a matmul with at least one non-replicated operand.
fn matmul(ta: bool, tb: bool, args: &[&Val]) -> Option<Layout> {
    use Layout::{Partial, Replicated as R, Sharded};
    let (a, b) = (args[0], args[1]);
    let (ra, rb) = (a.logical.shape.rank() as u32, b.logical.shape.rank() as u32);
    let (a_m, a_k) = if ta {
        (ra - 1, ra - 2)
    } else {
        (ra - 2, ra - 1)
    };
    let (b_k, b_n) = if tb {
        (rb - 1, rb - 2)
    } else {
        (rb - 2, rb - 1)
    };
    match (a.layout, b.layout) {
        (Partial, R) | (R, Partial) => Some(Partial),
        (Sharded { axis, groups: 1 }, bl) if axis + 2 < ra => {
            // A batch axis: a broadcast weight stays whole, a batched one splits alike.
            let ok = if rb == 2 { bl == R } else { bl == a.layout };
            ok.then_some(a.layout)
        }
        (Sharded { axis, groups }, R) if axis == a_m => Some(Sharded {
            axis: ra - 2,
            groups,
        }),
        (R, Sharded { axis, groups }) if axis == b_n => Some(Sharded {
            axis: ra - 1,
            groups,
        }),
        (Sharded { axis: x, groups: 1 }, Sharded { axis: y, groups: 1 })
            if x == a_k && y == b_k =>
        {
            Some(Partial)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::DType;

    fn dims(s: &[&str]) -> Vec<Dim> {
        s.iter().map(|d| Dim::parse(d).unwrap()).collect()
    }

    #[test]
    fn reshape_axes_follow_contiguous_blocks() {
        let heads = dims(&["b", "s", "64", "128"]);
        let flat = dims(&["b", "s", "8192"]);
        assert_eq!(reshape_axis(&heads, &flat, 2, 8), Some(2));
        assert_eq!(reshape_axis(&flat, &heads, 2, 8), Some(2));
        // The head dim is not the outer factor of the hidden axis.
        assert_eq!(reshape_axis(&heads, &flat, 3, 8), None);
        // Splitting `s` inside flattened tokens is not contiguous.
        let tokens = dims(&["b*s", "8192"]);
        assert_eq!(reshape_axis(&flat, &tokens, 1, 8), None);
        // 4 heads of 16 split 8 ways: the head axis does not divide.
        assert_eq!(
            reshape_axis(
                &dims(&["b", "s", "64"]),
                &dims(&["b", "s", "4", "16"]),
                2,
                8
            ),
            None
        );
    }

    #[test]
    fn divisibility_allows_sequence_but_not_batch() {
        assert!(divisible(Dim::seq(), 8));
        assert!(!divisible(Dim::batch(), 2));
        assert!(!divisible(Dim::parse("b*s").unwrap(), 2));
        assert!(divisible(Dim::lit(96), 8));
        assert!(!divisible(Dim::lit(12), 5));
    }

    #[test]
    fn matmul_layouts() {
        let p = 4;
        let x = Val::replicated(TensorType::new(DType::F32, dims(&["b", "s", "64"])));
        let w = TensorType::new(DType::F32, dims(&["64", "256"]));
        let col = Val::new(w.clone(), Layout::split(1), p).unwrap();
        let mm = Op::MatMul {
            ta: false,
            tb: false,
        };
        let (out, _) = infer(&mm, &[&x, &col], p).unwrap();
        assert_eq!(out[0].layout, Layout::split(2));
        assert_eq!(out[0].local.to_string(), "f32[b,s,64]");
        let xs = Val::new(x.logical.clone(), Layout::split(2), p).unwrap();
        let row = Val::new(w, Layout::split(0), p).unwrap();
        let (out, _) = infer(&mm, &[&xs, &row], p).unwrap();
        assert_eq!(out[0].layout, Layout::Partial);
        assert!(infer(&mm, &[&xs, &col], p).is_none());
    }
}
