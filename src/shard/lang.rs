//! The sharding language: an egg [`Language`] over the IR's ops plus sharding and
//! collective nodes, and the analysis that gives every e-class its per-device [`Val`]s.
//!
//! A term denotes a *family* of per-device tensors (see [`super::layout`]). Nodes:
//!
//! | node | spelling | meaning |
//! |---|---|---|
//! | [`ShardNode::Leaf`] | `leaf.N` | a block input: parameter, data input, constant or a tensor of an earlier block, with the layout the block receives it in |
//! | [`ShardNode::Op`] | `(matmul a b)` | the IR op applied on every device to the devices' tensors (per-device attributes follow from the layouts, [`super::layout::infer`]) |
//! | [`ShardNode::Proj`] | `(proj.1 t)` | result `1` of a multi-result op |
//! | [`ShardNode::Shard`] | `(shard.2.8 x)` | `shard(axis, parts, x)`: each device keeps its block of replicated `x` (free for parameters and inputs, which are then stored split) |
//! | [`ShardNode::Partial`] | `(partial.8 x)` | `partial(parts, x)`: `x / parts` on every device, an unreduced sum of `x` |
//! | [`ShardNode::AllReduce`] | `(all_reduce.8 u)` | partial → replicated |
//! | [`ShardNode::AllGather`] | `(all_gather.1.8 y)` | split → replicated (the `gather` of `gather∘shard = id`) |
//! | [`ShardNode::ReduceScatter`] | `(reduce_scatter.1.8 u)` | partial → split |
//! | [`ShardNode::AllToAll`] | `(all_to_all.2.1.8 y)` | split on `concat` → split on `split` |
//! | [`ShardNode::Root`] | `(root o…)` | the block's outputs in their required layouts |
//!
//! Two terms are in one e-class only if every device holds the same tensor under both
//! (for partial values: the same sum, which is all any consumer observes).

use super::layout::{self, Layout, Val};
use crate::ir::{AttrValue, DType, Dim, Op, OpKind};
use egg::{Analysis, DidMerge, EGraph, Id, Language};
use std::collections::BTreeMap;
use std::fmt;

/// One e-node of the sharding language.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShardNode {
    /// Block input number `leaf` (see [`ShardAnalysis::leaves`]).
    Leaf {
        /// Index into the leaf table.
        leaf: u32,
    },
    /// An IR op; `op` indexes the op table, `tag` tells apart ops that must not be
    /// merged although equal (dropout draws: the template op index), 0 otherwise.
    Op {
        /// The op's kind (the discriminant egg indexes classes by).
        kind: OpKind,
        /// Index into [`ShardAnalysis::ops`].
        op: u32,
        /// Identity of a random draw; 0 for deterministic ops.
        tag: u32,
        /// Operands.
        args: Box<[Id]>,
    },
    /// Result `index` of a multi-result op.
    Proj {
        /// Result number.
        index: u32,
        /// The op.
        args: [Id; 1],
    },
    /// Each device keeps its block of a replicated value.
    Shard {
        /// Split axis.
        axis: u32,
        /// Devices.
        parts: u32,
        /// Equal groups of the axis split separately (1: a plain split).
        groups: u32,
        /// The replicated value.
        args: [Id; 1],
    },
    /// `x / parts` on every device.
    Partial {
        /// Devices.
        parts: u32,
        /// The replicated value.
        args: [Id; 1],
    },
    /// Sum over the devices.
    AllReduce {
        /// Devices.
        parts: u32,
        /// The partial value.
        args: [Id; 1],
    },
    /// Concatenation of the devices' blocks.
    AllGather {
        /// Split axis of the input.
        axis: u32,
        /// Devices.
        parts: u32,
        /// The split value.
        args: [Id; 1],
    },
    /// Sum over the devices, each keeping its block of `axis`.
    ReduceScatter {
        /// Axis of the result's split.
        axis: u32,
        /// Devices.
        parts: u32,
        /// The partial value.
        args: [Id; 1],
    },
    /// Re-split a value split on `concat` along `split`.
    AllToAll {
        /// The result's split axis.
        split: u32,
        /// The input's split axis.
        concat: u32,
        /// Devices.
        parts: u32,
        /// The split value.
        args: [Id; 1],
    },
    /// The block's outputs.
    Root {
        /// One class per output.
        args: Box<[Id]>,
    },
}

/// Discriminant of a [`ShardNode`]: egg indexes e-classes by it and rules are keyed on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeKind {
    /// [`ShardNode::Leaf`].
    Leaf,
    /// [`ShardNode::Op`] of this kind.
    Op(OpKind),
    /// [`ShardNode::Proj`].
    Proj,
    /// [`ShardNode::Shard`].
    Shard,
    /// [`ShardNode::Partial`].
    Partial,
    /// [`ShardNode::AllReduce`].
    AllReduce,
    /// [`ShardNode::AllGather`].
    AllGather,
    /// [`ShardNode::ReduceScatter`].
    ReduceScatter,
    /// [`ShardNode::AllToAll`].
    AllToAll,
    /// [`ShardNode::Root`].
    Root,
}

impl ShardNode {
    /// The op a collective node lowers to; `None` for every other node.
    pub fn collective_op(&self) -> Option<OpKind> {
        match self {
            ShardNode::AllReduce { .. } => Some(OpKind::AllReduce),
            ShardNode::AllGather { .. } => Some(OpKind::AllGather),
            ShardNode::ReduceScatter { .. } => Some(OpKind::ReduceScatter),
            ShardNode::AllToAll { .. } => Some(OpKind::AllToAll),
            _ => None,
        }
    }

    /// Whether the rewrites inserted this node as a collective (a node that lowers to
    /// an op for which [`OpKind::is_collective`] holds). Ops of the input block are not
    /// counted, even collective ones: every extraction carries them alike.
    pub fn is_collective(&self) -> bool {
        self.collective_op().is_some_and(OpKind::is_collective)
    }

    /// The node's kind.
    pub fn kind(&self) -> NodeKind {
        match self {
            ShardNode::Leaf { .. } => NodeKind::Leaf,
            ShardNode::Op { kind, .. } => NodeKind::Op(*kind),
            ShardNode::Proj { .. } => NodeKind::Proj,
            ShardNode::Shard { .. } => NodeKind::Shard,
            ShardNode::Partial { .. } => NodeKind::Partial,
            ShardNode::AllReduce { .. } => NodeKind::AllReduce,
            ShardNode::AllGather { .. } => NodeKind::AllGather,
            ShardNode::ReduceScatter { .. } => NodeKind::ReduceScatter,
            ShardNode::AllToAll { .. } => NodeKind::AllToAll,
            ShardNode::Root { .. } => NodeKind::Root,
        }
    }

    /// The node with its children replaced (same non-child fields).
    fn attrs_eq(&self, other: &ShardNode) -> bool {
        use ShardNode as N;
        match (self, other) {
            (N::Leaf { leaf: a }, N::Leaf { leaf: b }) => a == b,
            (
                N::Op {
                    kind: k1,
                    op: o1,
                    tag: t1,
                    args: a1,
                },
                N::Op {
                    kind: k2,
                    op: o2,
                    tag: t2,
                    args: a2,
                },
            ) => k1 == k2 && o1 == o2 && t1 == t2 && a1.len() == a2.len(),
            (N::Proj { index: a, .. }, N::Proj { index: b, .. }) => a == b,
            (
                N::Shard {
                    axis: a1,
                    parts: p1,
                    groups: g1,
                    ..
                },
                N::Shard {
                    axis: a2,
                    parts: p2,
                    groups: g2,
                    ..
                },
            ) => a1 == a2 && p1 == p2 && g1 == g2,
            (N::Partial { parts: a, .. }, N::Partial { parts: b, .. })
            | (N::AllReduce { parts: a, .. }, N::AllReduce { parts: b, .. }) => a == b,
            (
                N::AllGather {
                    axis: a1,
                    parts: p1,
                    ..
                },
                N::AllGather {
                    axis: a2,
                    parts: p2,
                    ..
                },
            )
            | (
                N::ReduceScatter {
                    axis: a1,
                    parts: p1,
                    ..
                },
                N::ReduceScatter {
                    axis: a2,
                    parts: p2,
                    ..
                },
            ) => a1 == a2 && p1 == p2,
            (
                N::AllToAll {
                    split: s1,
                    concat: c1,
                    parts: p1,
                    ..
                },
                N::AllToAll {
                    split: s2,
                    concat: c2,
                    parts: p2,
                    ..
                },
            ) => s1 == s2 && c1 == c2 && p1 == p2,
            (N::Root { args: a }, N::Root { args: b }) => a.len() == b.len(),
            _ => false,
        }
    }
}

impl Language for ShardNode {
    type Discriminant = NodeKind;

    fn discriminant(&self) -> NodeKind {
        self.kind()
    }

    fn matches(&self, other: &Self) -> bool {
        self.attrs_eq(other)
    }

    fn children(&self) -> &[Id] {
        match self {
            ShardNode::Leaf { .. } => &[],
            ShardNode::Op { args, .. } | ShardNode::Root { args } => args,
            ShardNode::Proj { args, .. }
            | ShardNode::Shard { args, .. }
            | ShardNode::Partial { args, .. }
            | ShardNode::AllReduce { args, .. }
            | ShardNode::AllGather { args, .. }
            | ShardNode::ReduceScatter { args, .. }
            | ShardNode::AllToAll { args, .. } => args,
        }
    }

    fn children_mut(&mut self) -> &mut [Id] {
        match self {
            ShardNode::Leaf { .. } => &mut [],
            ShardNode::Op { args, .. } | ShardNode::Root { args } => args,
            ShardNode::Proj { args, .. }
            | ShardNode::Shard { args, .. }
            | ShardNode::Partial { args, .. }
            | ShardNode::AllReduce { args, .. }
            | ShardNode::AllGather { args, .. }
            | ShardNode::ReduceScatter { args, .. }
            | ShardNode::AllToAll { args, .. } => args,
        }
    }
}

impl fmt::Display for ShardNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardNode::Leaf { leaf } => write!(f, "leaf.{leaf}"),
            ShardNode::Op { kind, tag: 0, .. } => f.write_str(kind.name()),
            ShardNode::Op { kind, tag, .. } => write!(f, "{}#{tag}", kind.name()),
            ShardNode::Proj { index, .. } => write!(f, "proj.{index}"),
            ShardNode::Shard {
                axis,
                parts,
                groups: 1,
                ..
            } => write!(f, "shard.{axis}.{parts}"),
            ShardNode::Shard {
                axis,
                parts,
                groups,
                ..
            } => write!(f, "shard.{axis}.{parts}.g{groups}"),
            ShardNode::Partial { parts, .. } => write!(f, "partial.{parts}"),
            ShardNode::AllReduce { parts, .. } => write!(f, "all_reduce.{parts}"),
            ShardNode::AllGather { axis, parts, .. } => write!(f, "all_gather.{axis}.{parts}"),
            ShardNode::ReduceScatter { axis, parts, .. } => {
                write!(f, "reduce_scatter.{axis}.{parts}")
            }
            ShardNode::AllToAll {
                split,
                concat,
                parts,
                ..
            } => write!(f, "all_to_all.{split}.{concat}.{parts}"),
            ShardNode::Root { .. } => f.write_str("root"),
        }
    }
}

/// An attribute value in a hashable, totally ordered form (floats by their bits).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum AttrKey {
    Bool(bool),
    Int(u64),
    Float(u64),
    Str(String),
    DType(DType),
    Ints(Vec<u64>),
    Shape(Vec<Dim>),
}

/// A hashable, ordered identity of an op (kind and attributes).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct OpKey(OpKind, Vec<(&'static str, AttrKey)>);

impl OpKey {
    /// The key of `op`; `strip_names` blanks source names (parameter and input names
    /// do not make two blocks different).
    pub(crate) fn of(op: &Op, strip_names: bool) -> OpKey {
        let attrs = op
            .attrs()
            .into_iter()
            .map(|(name, v)| {
                let k = match v {
                    AttrValue::Bool(b) => AttrKey::Bool(b),
                    AttrValue::Int(n) => AttrKey::Int(n),
                    AttrValue::Float(x) => AttrKey::Float(x.to_bits()),
                    AttrValue::Str(_) if strip_names => AttrKey::Str(String::new()),
                    AttrValue::Str(s) => AttrKey::Str(s),
                    AttrValue::DType(d) => AttrKey::DType(d),
                    AttrValue::Ints(v) => AttrKey::Ints(v),
                    AttrValue::Shape(s) => AttrKey::Shape(s.0),
                };
                (name, k)
            })
            .collect();
        OpKey(op.kind(), attrs)
    }
}

/// The per-class data: the values of the class (one per result; several for the tuple
/// of a multi-result op), or `None` for a term that no layout rule accepts (never
/// built by the rules; kept so that a bug shows as an unextractable class, not a panic).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassData(pub Option<Vec<Val>>);

impl ClassData {
    /// The single value of a one-result class.
    pub fn val(&self) -> Option<&Val> {
        match &self.0 {
            Some(v) if v.len() == 1 => v.first(),
            _ => None,
        }
    }
}

/// The e-graph analysis: the tensor-parallel degree, the op table and the leaves.
#[derive(Clone, Debug, Default)]
pub struct ShardAnalysis {
    /// Devices in the tensor-parallel group.
    pub parts: u32,
    /// Interned ops (logical attributes).
    pub ops: Vec<Op>,
    index: BTreeMap<OpKey, u32>,
    /// The block inputs, with the layouts the block receives them in.
    pub leaves: Vec<Val>,
}

impl ShardAnalysis {
    /// An analysis for `parts` devices and the given leaves.
    pub fn new(parts: u32, leaves: Vec<Val>) -> ShardAnalysis {
        ShardAnalysis {
            parts,
            ops: Vec::new(),
            index: BTreeMap::new(),
            leaves,
        }
    }

    /// The op table index of `op`, adding it if new.
    pub fn intern(&mut self, op: &Op) -> u32 {
        let key = OpKey::of(op, false);
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        let i = u32::try_from(self.ops.len()).expect("fewer than 2^32 distinct ops");
        self.ops.push(op.clone());
        self.index.insert(key, i);
        i
    }

    /// The values a node denotes, given its children's data.
    pub fn node_vals<'a>(
        &'a self,
        node: &ShardNode,
        data: impl Fn(Id) -> &'a ClassData,
    ) -> Option<Vec<Val>> {
        let p = self.parts;
        let one = |id: Id| data(id).val();
        match node {
            ShardNode::Leaf { leaf } => Some(vec![self.leaves.get(*leaf as usize)?.clone()]),
            ShardNode::Op { op, args, .. } => {
                let vals: Vec<&Val> = args.iter().map(|&a| one(a)).collect::<Option<_>>()?;
                let op = self.ops.get(*op as usize)?;
                layout::infer(op, &vals, p).map(|(v, _)| v)
            }
            ShardNode::Proj { index, args } => {
                let all = data(args[0]).0.as_ref()?;
                Some(vec![all.get(*index as usize)?.clone()])
            }
            ShardNode::Shard {
                axis,
                parts,
                groups,
                args,
            } => {
                let x = one(args[0])?;
                (x.layout.is_replicated() && *parts == p).then_some(())?;
                let layout = Layout::Sharded {
                    axis: *axis,
                    groups: *groups,
                };
                Some(vec![Val::new(x.logical.clone(), layout, p)?])
            }
            ShardNode::Partial { parts, args } => {
                let x = one(args[0])?;
                let ok = x.layout.is_replicated() && x.logical.dtype.is_float() && *parts == p;
                ok.then_some(())?;
                Some(vec![Val::new(x.logical.clone(), Layout::Partial, p)?])
            }
            ShardNode::AllReduce { parts, args } => {
                let u = one(args[0])?;
                (u.layout == Layout::Partial && *parts == p).then_some(())?;
                Some(vec![Val::replicated(u.logical.clone())])
            }
            ShardNode::AllGather { axis, parts, args } => {
                let y = one(args[0])?;
                (y.layout == Layout::split(*axis) && *parts == p).then_some(())?;
                Some(vec![Val::replicated(y.logical.clone())])
            }
            ShardNode::ReduceScatter { axis, parts, args } => {
                let u = one(args[0])?;
                (u.layout == Layout::Partial && *parts == p).then_some(())?;
                Some(vec![Val::new(u.logical.clone(), Layout::split(*axis), p)?])
            }
            ShardNode::AllToAll {
                split,
                concat,
                parts,
                args,
            } => {
                let y = one(args[0])?;
                let ok = y.layout == Layout::split(*concat) && split != concat && *parts == p;
                ok.then_some(())?;
                Some(vec![Val::new(y.logical.clone(), Layout::split(*split), p)?])
            }
            ShardNode::Root { args } => {
                let mut out = Vec::with_capacity(args.len());
                for &a in args.iter() {
                    out.push(one(a)?.clone());
                }
                Some(out)
            }
        }
    }
}

impl Analysis<ShardNode> for ShardAnalysis {
    type Data = ClassData;

    fn make(egraph: &mut EGraph<ShardNode, Self>, enode: &ShardNode) -> ClassData {
        let an = &egraph.analysis;
        ClassData(an.node_vals(enode, |id| &egraph[id].data))
    }

    fn merge(&mut self, a: &mut ClassData, b: ClassData) -> DidMerge {
        if *a == b {
            return DidMerge(false, false);
        }
        // Sound rules only merge terms with equal values; an invalid term never joins a
        // class with a valid one. Keep the valid side deterministically.
        debug_assert!(
            a.0.is_none() || b.0.is_none(),
            "merged classes disagree: {a:?} vs {b:?}"
        );
        if a.0.is_none() {
            *a = b;
            DidMerge(true, false)
        } else {
            DidMerge(false, true)
        }
    }
}

/// The e-graph of one block.
pub type ShardGraph = EGraph<ShardNode, ShardAnalysis>;

/// An operand for [`Build::op_with`]: an existing class, or a replicated class taken
/// to a layout (`shard` or `partial`; the class itself when it already has it).
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// This class.
    Id(Id),
    /// This replicated class in this layout.
    Lay(Id, Layout),
}

/// Builds checked terms: every constructor computes the new node's values first and
/// refuses (returns `None`) a node the layout rules do not accept.
pub struct Build<'a> {
    /// The e-graph.
    pub eg: &'a mut ShardGraph,
}

impl Build<'_> {
    /// Devices in the group.
    pub fn parts(&self) -> u32 {
        self.eg.analysis.parts
    }

    /// The single value of class `id`.
    pub fn val(&self, id: Id) -> Option<Val> {
        self.eg[id].data.val().cloned()
    }

    /// The nodes of class `id` (a snapshot).
    pub fn nodes(&self, id: Id) -> Vec<ShardNode> {
        self.eg[id].nodes.clone()
    }

    /// The interned op of an op node.
    pub fn op(&self, index: u32) -> &Op {
        &self.eg.analysis.ops[index as usize]
    }

    /// Adds `node` if its values are well defined.
    pub fn add(&mut self, node: ShardNode) -> Option<Id> {
        let node = node.map_children(|c| self.eg.find(c));
        let eg = &*self.eg;
        eg.analysis.node_vals(&node, |id| &eg[id].data)?;
        Some(self.eg.add(node))
    }

    /// The value `arg` would have (without adding anything).
    pub fn arg_val(&self, arg: Arg) -> Option<Val> {
        match arg {
            Arg::Id(id) => self.val(id),
            Arg::Lay(x, layout) => {
                let v = self.val(x)?;
                if layout == v.layout {
                    return Some(v);
                }
                if !v.layout.is_replicated() {
                    return None;
                }
                if layout == Layout::Partial && !v.logical.dtype.is_float() {
                    return None;
                }
                Val::new(v.logical, layout, self.parts())
            }
        }
    }

    /// Materializes `arg`.
    pub fn arg(&mut self, arg: Arg) -> Option<Id> {
        match arg {
            Arg::Id(id) => Some(id),
            Arg::Lay(x, layout) => {
                if self.val(x)?.layout == layout {
                    Some(x)
                } else {
                    self.to_layout(x, layout)
                }
            }
        }
    }

    /// `op(args)` (op table index `op`, draw `tag`), built only if the layout rules
    /// accept the operands: nothing is added for a refused term.
    pub fn op_with(&mut self, op: u32, tag: u32, args: &[Arg]) -> Option<Id> {
        let vals: Vec<Val> = args
            .iter()
            .map(|&a| self.arg_val(a))
            .collect::<Option<_>>()?;
        let refs: Vec<&Val> = vals.iter().collect();
        let the_op = self.eg.analysis.ops.get(op as usize)?;
        layout::infer(the_op, &refs, self.parts())?;
        let kind = the_op.kind();
        let ids: Vec<Id> = args.iter().map(|&a| self.arg(a)).collect::<Option<_>>()?;
        self.add(ShardNode::Op {
            kind,
            op,
            tag,
            args: ids.into(),
        })
    }

    /// An op node like `like` (same op and tag) on new operands, checked first.
    pub fn like(&mut self, like: &ShardNode, args: &[Arg]) -> Option<Id> {
        match like {
            ShardNode::Op { op, tag, .. } => self.op_with(*op, *tag, args),
            _ => None,
        }
    }

    /// `op(args)` with a draw tag.
    pub fn apply(&mut self, op: &Op, tag: u32, args: &[Id]) -> Option<Id> {
        let index = self.eg.analysis.intern(op);
        self.add(ShardNode::Op {
            kind: op.kind(),
            op: index,
            tag,
            args: args.into(),
        })
    }

    /// `proj(index, t)`.
    pub fn proj(&mut self, index: u32, t: Id) -> Option<Id> {
        self.add(ShardNode::Proj { index, args: [t] })
    }

    /// `shard(axis, p, x)` with `groups` groups.
    pub fn shard_groups(&mut self, x: Id, axis: u32, groups: u32) -> Option<Id> {
        let parts = self.parts();
        self.add(ShardNode::Shard {
            axis,
            parts,
            groups,
            args: [x],
        })
    }

    /// `shard` to an arbitrary split layout, or `x` itself when replicated is asked.
    pub fn to_layout(&mut self, x: Id, layout: Layout) -> Option<Id> {
        match layout {
            Layout::Replicated => Some(x),
            Layout::Sharded { axis, groups } => self.shard_groups(x, axis, groups),
            Layout::Partial => self.partial(x),
        }
    }

    /// `partial(p, x)`.
    pub fn partial(&mut self, x: Id) -> Option<Id> {
        let parts = self.parts();
        self.add(ShardNode::Partial { parts, args: [x] })
    }

    /// `all_reduce(p, u)`.
    pub fn all_reduce(&mut self, u: Id) -> Option<Id> {
        let parts = self.parts();
        self.add(ShardNode::AllReduce { parts, args: [u] })
    }

    /// `all_gather(axis, p, y)`.
    pub fn all_gather(&mut self, y: Id, axis: u32) -> Option<Id> {
        let parts = self.parts();
        self.add(ShardNode::AllGather {
            axis,
            parts,
            args: [y],
        })
    }

    /// `reduce_scatter(axis, p, u)`.
    pub fn reduce_scatter(&mut self, u: Id, axis: u32) -> Option<Id> {
        let parts = self.parts();
        self.add(ShardNode::ReduceScatter {
            axis,
            parts,
            args: [u],
        })
    }

    /// `all_to_all(split, concat, p, y)`.
    pub fn all_to_all(&mut self, y: Id, split: u32, concat: u32) -> Option<Id> {
        let parts = self.parts();
        self.add(ShardNode::AllToAll {
            split,
            concat,
            parts,
            args: [y],
        })
    }
}
