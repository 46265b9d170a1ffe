//! The rewrite rules: named, directional, one algebraic law each.
//!
//! Notation: `p` is the tensor-parallel degree; `S_a(x)` is `shard(a, p, x)` (with a
//! superscript `g` for a grouped split), `AG_a` is `all_gather` along `a`, `AR` is
//! `all_reduce`, `RS_a` is `reduce_scatter` along `a`, `P(x)` is `partial(p, x)`.
//! `n`, `m`, `k` are a matmul's output column, row and contraction axes.
//!
//! Every rule states a law `lhs = rhs` and applies it left to right. Shape guards
//! (divisibility of heads, kv-heads, ffn, vocabulary and sequence by `p`; ranks; axes)
//! are not repeated in each rule: every term a rule builds goes through
//! [`Build`], which asks the layout table
//! ([`layout::infer`](super::layout::infer)) and refuses any operand layout the op
//! does not support, so a rule only fires where its law holds. There is no general
//! commutativity or associativity: the one reassociation (`partial-residual`) is
//! targeted at parallel-residual blocks.
//!
//! # Writing a rule
//!
//! 1. Write the law as a one-line comment in the notation above and pick a name of
//!    the form `what-it-does` (`shard-matmul-column`).
//! 2. Decide what it matches: the outer node kind (`root`), then look at the nodes of
//!    the child classes in the body (`b.nodes(child)`).
//! 3. Build the right-hand side with [`Build`]: [`Build::like`] re-applies the matched
//!    op to new operands given as [`Arg`]s (`Arg::Lay(x, layout)` shards a replicated
//!    `x`); the collectives have their own constructors. A constructor returns `None`
//!    when the layout table refuses the term, so guards come for free; add explicit
//!    guards only for conditions the table cannot see (e.g. "the operands are
//!    replicated" for an introduction rule).
//! 4. Return the built classes; the driver unions each with the matched class.
//! 5. Add the rule to [`RULES`] (`sp_only` for rules that belong to sequence
//!    parallelism) and, when it enables a new pattern, a test in `tests/shard.rs`
//!    that checks the extracted block.

use super::lang::{Arg, Build, NodeKind, ShardGraph, ShardNode};
use super::layout::{reshape_axis, Layout};
use crate::ir::{Op, OpKind};
use egg::{
    Applier, Id, Language, PatternAst, Rewrite, SearchMatches, Searcher, Subst, Symbol, Var,
};

/// The body of a rule: given the matched class and node, the classes equal to it.
type Body = fn(&mut Build, Id, &ShardNode) -> Vec<Id>;

/// One named rewrite rule.
pub struct Rule {
    /// The rule's name (reported by egg and in tests).
    pub name: &'static str,
    /// The law it applies, left to right.
    pub law: &'static str,
    /// The node kinds it is matched on.
    pub roots: &'static [NodeKind],
    /// Whether it belongs to sequence parallelism (enabled with `sp` only).
    pub sp_only: bool,
    body: Body,
}

const SHARD: &[NodeKind] = &[NodeKind::Shard];
const ALL_GATHER: &[NodeKind] = &[NodeKind::AllGather];
const ALL_REDUCE: &[NodeKind] = &[NodeKind::AllReduce];

/// Ops a collective can be pulled through (any op the layout table knows).
const PULLABLE: &[NodeKind] = &[
    NodeKind::Op(OpKind::Gelu),
    NodeKind::Op(OpKind::Silu),
    NodeKind::Op(OpKind::Scale),
    NodeKind::Op(OpKind::Cast),
    NodeKind::Op(OpKind::Softmax),
    NodeKind::Op(OpKind::Rotary),
    NodeKind::Op(OpKind::LayerNorm),
    NodeKind::Op(OpKind::RmsNorm),
    NodeKind::Op(OpKind::BiasAdd),
    NodeKind::Op(OpKind::Add),
    NodeKind::Op(OpKind::Mul),
    NodeKind::Op(OpKind::MatMul),
    NodeKind::Op(OpKind::Reshape),
    NodeKind::Op(OpKind::Transpose),
    NodeKind::Op(OpKind::Slice),
    NodeKind::Op(OpKind::Concat),
    NodeKind::Op(OpKind::Pad),
    NodeKind::Op(OpKind::Repeat),
    NodeKind::Op(OpKind::Broadcast),
    NodeKind::Op(OpKind::ReduceSum),
    NodeKind::Op(OpKind::Embedding),
    NodeKind::Op(OpKind::CrossEntropy),
    NodeKind::Op(OpKind::FlashAttention),
    NodeKind::Proj,
];

macro_rules! rule {
    ($name:literal, $law:literal, $roots:expr, $body:expr) => {
        Rule {
            name: $name,
            law: $law,
            roots: $roots,
            sp_only: false,
            body: $body,
        }
    };
    (sp $name:literal, $law:literal, $roots:expr, $body:expr) => {
        Rule {
            name: $name,
            law: $law,
            roots: $roots,
            sp_only: true,
            body: $body,
        }
    };
}

/// Every rule, in application order.
pub static RULES: &[Rule] = &[
    // ---- shards move toward the leaves ----
    rule!(
        "shard-elementwise",
        "S(f(x)) = f(S(x)) for gelu, silu, scale, cast, softmax, rotary, dropout",
        SHARD,
        shard_elementwise
    ),
    rule!(
        "shard-norm",
        "S_a(norm(x, γ, β)) = norm(S_a(x), γ, β), a not the normalized axis",
        SHARD,
        shard_norm
    ),
    rule!(
        "shard-bias",
        "S_last(x + b) = S_last(x) + S_0(b); S_a(x + b) = S_a(x) + b",
        SHARD,
        shard_bias
    ),
    rule!(
        "shard-binary",
        "S(x ⊙ y) = S(x) ⊙ S(y) for add, mul",
        SHARD,
        shard_binary
    ),
    rule!(
        "shard-matmul-column",
        "S_n(a·w) = a·S_n(w): a column-split weight gives a column-split output",
        SHARD,
        shard_matmul_column
    ),
    rule!(
        "shard-matmul-rows",
        "S_m(a·w) = S_m(a)·w; S_batch(a·b) = S_batch(a)·S_batch(b)",
        SHARD,
        shard_matmul_rows
    ),
    rule!(
        "shard-layout",
        "S_k(f(x)) = f'(S_j(x)) for reshape, transpose, broadcast, reduce_sum, pad, slice, concat, repeat (j the axis k comes from)",
        SHARD,
        shard_layout
    ),
    rule!(
        "shard-slice-tile",
        "S_a(slice_a(x, i·n, n)) = slice_a(S_a^(N/n)(x), i·n/p, n/p): a tile of a tensor split by groups",
        SHARD,
        shard_slice_tile
    ),
    rule!(
        "shard-repeat-gqa",
        "S_a(repeat_a(x, t)) = repeat_a(S_a(repeat_a(x, p/n)), t·n/p) for n = |x_a| < p: kv heads replicated so each device holds its group's head",
        SHARD,
        shard_repeat_gqa
    ),
    rule!(
        "shard-attention",
        "S_h(attn(q, k, v)) = attn(S_h(q), S_h(k'), S_h(v')), k' = k or repeat_h(k, p/kv) when kv < p",
        SHARD,
        shard_attention
    ),
    rule!(
        "shard-embedding",
        "S_last(embed(T, i)) = embed(S_1(T), i); S_a(embed(T, i)) = embed(T, S_a(i))",
        SHARD,
        shard_embedding
    ),
    rule!(
        "shard-all-reduce",
        "S_a(AR(u)) = RS_a(u)",
        SHARD,
        shard_all_reduce
    ),
    rule!(
        "shard-all-gather",
        "S_a(AG_a(y)) = y; S_b(AG_a(y)) = all_to_all(b, a, y)",
        SHARD,
        shard_all_gather
    ),
    // ---- introductions: where tensor parallelism starts ----
    rule!(
        "matmul-row-parallel",
        "a·w = AR(S_k(a)·S_k(w)): a column-split input times a row-split weight is a partial sum",
        &[NodeKind::Op(OpKind::MatMul)],
        matmul_row_parallel
    ),
    rule!(
        "embedding-vocab-parallel",
        "embed(T, i) = AR(embed(S_0(T), i)): each device looks up its vocabulary rows",
        &[NodeKind::Op(OpKind::Embedding)],
        embedding_vocab_parallel
    ),
    rule!(
        "cross-entropy-vocab-parallel",
        "ce(z, l) = ce(S_last(z), l): the loss from vocabulary-split logits, no gather",
        &[NodeKind::Op(OpKind::CrossEntropy)],
        cross_entropy_vocab_parallel
    ),
    rule!(
        "reduce-sum-partial",
        "Σ_A(x) = AR(Σ_A(S_j(x))) for j in A",
        &[NodeKind::Op(OpKind::ReduceSum)],
        reduce_sum_partial
    ),
    rule!(
        sp "all-reduce-sequence",
        "AR(u) = AG_s(RS_s(u)) for a sequence axis s (sequence parallelism)",
        ALL_REDUCE,
        all_reduce_sequence
    ),
    // ---- collectives move toward the outputs ----
    rule!(
        "gather-commute",
        "f(AG_a(y), z) = C(f(y, z)), C = AG_k / AR / id by the layout f(y, z) gets",
        PULLABLE,
        gather_commute
    ),
    rule!(
        "gather-bias-column",
        "AG_last(y) + b = AG_last(y + S_0(b))",
        &[NodeKind::Op(OpKind::BiasAdd)],
        gather_bias_column
    ),
    rule!(
        "gather-matmul-contract",
        "AG_k(y)·w = AR(y·S_k(w))",
        &[NodeKind::Op(OpKind::MatMul)],
        gather_matmul_contract
    ),
    rule!(
        "gather-shard",
        "AG_a(S_a(x)) = x",
        ALL_GATHER,
        gather_shard
    ),
    rule!(
        "partial-commute",
        "f(AR(u), z) = AR(f(u, z)) for f linear in u; AR(u) + AR(v) = AR(u + v)",
        PULLABLE,
        partial_commute
    ),
    rule!(
        "partial-bias",
        "AR(u) + b = AR(u + P(b))",
        &[NodeKind::Op(OpKind::BiasAdd)],
        partial_bias
    ),
    rule!(
        "partial-residual",
        "(x + AR(u)) + AR(v) = x + AR(u + v)",
        &[NodeKind::Op(OpKind::Add)],
        partial_residual
    ),
];

// ---------------------------------------------------------------------------------
// Helpers.

/// `(axis, groups, x)` of a shard node.
fn shard_parts(node: &ShardNode) -> Option<(u32, u32, Id)> {
    match node {
        ShardNode::Shard {
            axis, groups, args, ..
        } => Some((*axis, *groups, args[0])),
        _ => None,
    }
}

/// The op nodes of class `id` whose kind is in `kinds`, with their ops.
fn ops_in(b: &Build, id: Id, kinds: &[OpKind]) -> Vec<(ShardNode, Op)> {
    b.nodes(id)
        .into_iter()
        .filter_map(|n| match &n {
            ShardNode::Op { kind, op, .. } if kinds.contains(kind) => {
                let op = b.op(*op).clone();
                Some((n, op))
            }
            _ => None,
        })
        .collect()
}

fn args_of(node: &ShardNode) -> &[Id] {
    match node {
        ShardNode::Op { args, .. } => args,
        _ => &[],
    }
}

fn rank(b: &Build, id: Id) -> Option<u32> {
    Some(b.val(id)?.logical.shape.rank() as u32)
}

fn split(axis: u32, groups: u32) -> Layout {
    Layout::Sharded { axis, groups }
}

fn replicated(b: &Build, ids: &[Id]) -> bool {
    ids.iter()
        .all(|&i| b.val(i).is_some_and(|v| v.layout.is_replicated()))
}

/// Wraps a value in the collective that makes it replicated again.
fn collect(b: &mut Build, id: Id) -> Option<Id> {
    match b.val(id)?.layout {
        Layout::Replicated => Some(id),
        Layout::Sharded { axis, groups: 1 } => b.all_gather(id, axis),
        Layout::Partial => b.all_reduce(id),
        Layout::Sharded { .. } => None,
    }
}

// ---------------------------------------------------------------------------------
// Shards move toward the leaves.

fn shard_elementwise(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    use OpKind as K;
    let Some((axis, groups, x)) = shard_parts(node) else {
        return vec![];
    };
    let s = split(axis, groups);
    let mut out = Vec::new();
    let kinds = [K::Gelu, K::Silu, K::Scale, K::Cast, K::Softmax, K::Rotary];
    for (inner, _) in ops_in(b, x, &kinds) {
        out.extend(b.like(&inner, &[Arg::Lay(args_of(&inner)[0], s)]));
    }
    for n in b.nodes(x) {
        let ShardNode::Proj { index, args } = n else {
            continue;
        };
        for (drop, _) in ops_in(b, args[0], &[K::Dropout]) {
            if let Some(d) = b.like(&drop, &[Arg::Lay(args_of(&drop)[0], s)]) {
                out.extend(b.proj(index, d));
            }
        }
    }
    out
}

fn shard_norm(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let Some((axis, groups, x)) = shard_parts(node) else {
        return vec![];
    };
    let mut out = Vec::new();
    for (inner, _) in ops_in(b, x, &[OpKind::LayerNorm, OpKind::RmsNorm]) {
        let a = args_of(&inner);
        let mut args = vec![Arg::Lay(a[0], split(axis, groups))];
        args.extend(a[1..].iter().map(|&w| Arg::Id(w)));
        out.extend(b.like(&inner, &args));
    }
    out
}

fn shard_bias(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let Some((axis, groups, x)) = shard_parts(node) else {
        return vec![];
    };
    let mut out = Vec::new();
    for (inner, _) in ops_in(b, x, &[OpKind::BiasAdd]) {
        let (y, bias) = (args_of(&inner)[0], args_of(&inner)[1]);
        let Some(r) = rank(b, y) else { continue };
        let bias = if axis + 1 == r {
            Arg::Lay(bias, split(0, groups))
        } else {
            Arg::Id(bias)
        };
        out.extend(b.like(&inner, &[Arg::Lay(y, split(axis, groups)), bias]));
    }
    out
}

fn shard_binary(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let Some((axis, groups, x)) = shard_parts(node) else {
        return vec![];
    };
    let s = split(axis, groups);
    let mut out = Vec::new();
    for (inner, _) in ops_in(b, x, &[OpKind::Add, OpKind::Mul]) {
        let a = args_of(&inner);
        out.extend(b.like(&inner, &[Arg::Lay(a[0], s), Arg::Lay(a[1], s)]));
    }
    out
}

fn shard_matmul_column(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let Some((axis, groups, x)) = shard_parts(node) else {
        return vec![];
    };
    let mut out = Vec::new();
    for (inner, op) in ops_in(b, x, &[OpKind::MatMul]) {
        let Op::MatMul { tb, .. } = op else { continue };
        let (a, w) = (args_of(&inner)[0], args_of(&inner)[1]);
        let (Some(ra), Some(rb)) = (rank(b, a), rank(b, w)) else {
            continue;
        };
        if axis + 1 != ra {
            continue;
        }
        let n = if tb { rb - 2 } else { rb - 1 };
        out.extend(b.like(&inner, &[Arg::Id(a), Arg::Lay(w, split(n, groups))]));
    }
    out
}

fn shard_matmul_rows(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let Some((axis, groups, x)) = shard_parts(node) else {
        return vec![];
    };
    let mut out = Vec::new();
    for (inner, op) in ops_in(b, x, &[OpKind::MatMul]) {
        let Op::MatMul { ta, .. } = op else { continue };
        let (a, w) = (args_of(&inner)[0], args_of(&inner)[1]);
        let (Some(ra), Some(rb)) = (rank(b, a), rank(b, w)) else {
            continue;
        };
        let args = if axis + 2 == ra {
            let m = if ta { ra - 1 } else { ra - 2 };
            [Arg::Lay(a, split(m, groups)), Arg::Id(w)]
        } else if axis + 2 < ra && groups == 1 {
            let w = if rb == 2 {
                Arg::Id(w)
            } else {
                Arg::Lay(w, split(axis, 1))
            };
            [Arg::Lay(a, split(axis, 1)), w]
        } else {
            continue;
        };
        out.extend(b.like(&inner, &args));
    }
    out
}

/// The input axis a split of output axis `axis` comes from, for single-input layout ops.
fn source_axis(b: &Build, op: &Op, x: Id, axis: u32, groups: u32) -> Option<u32> {
    let p = b.parts();
    let input = b.val(x)?.logical;
    match op {
        Op::Reshape { shape } if groups == 1 => {
            reshape_axis(shape.dims(), input.shape.dims(), axis as usize, p).map(|j| j as u32)
        }
        Op::Transpose { perm } => perm.get(axis as usize).copied(),
        Op::Broadcast { axes, .. } => (!axes.contains(&axis))
            .then(|| axis - axes.iter().filter(|&&a| a < axis).count() as u32),
        Op::ReduceSum { axes } => (0..input.shape.rank() as u32)
            .filter(|i| !axes.contains(i))
            .nth(axis as usize),
        Op::Pad { axis: a, .. } | Op::Slice { axis: a, .. } => (*a != axis).then_some(axis),
        Op::Repeat { axis: a, .. } => {
            let ok = *a != axis
                || (groups == 1
                    && b.val(x).is_some_and(|v| {
                        super::layout::divisible(v.logical.shape.dims()[axis as usize], p)
                    }));
            ok.then_some(axis)
        }
        _ => None,
    }
}

fn shard_layout(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    use OpKind as K;
    let Some((axis, groups, x)) = shard_parts(node) else {
        return vec![];
    };
    let mut out = Vec::new();
    let kinds = [
        K::Reshape,
        K::Transpose,
        K::Broadcast,
        K::ReduceSum,
        K::Pad,
        K::Slice,
        K::Repeat,
    ];
    for (inner, op) in ops_in(b, x, &kinds) {
        let y = args_of(&inner)[0];
        if let Some(j) = source_axis(b, &op, y, axis, groups) {
            out.extend(b.like(&inner, &[Arg::Lay(y, split(j, groups))]));
        }
    }
    for (inner, op) in ops_in(b, x, &[K::Concat]) {
        let Op::Concat { axis: c } = op else { continue };
        let ins = args_of(&inner);
        let args: Vec<Arg> = if c != axis {
            ins.iter()
                .map(|&i| Arg::Lay(i, split(axis, groups)))
                .collect()
        } else if groups as usize == ins.len() {
            // One group per input: each device concatenates its blocks.
            ins.iter().map(|&i| Arg::Lay(i, split(axis, 1))).collect()
        } else {
            continue;
        };
        out.extend(b.like(&inner, &args));
    }
    out
}

fn shard_slice_tile(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let Some((axis, 1, x)) = shard_parts(node) else {
        return vec![];
    };
    let mut out = Vec::new();
    for (inner, op) in ops_in(b, x, &[OpKind::Slice]) {
        let Op::Slice {
            axis: a,
            start,
            len,
        } = op
        else {
            continue;
        };
        let y = args_of(&inner)[0];
        let Some(n) = b
            .val(y)
            .and_then(|v| v.logical.shape.dims()[a as usize].as_lit())
        else {
            continue;
        };
        if a != axis || n % len != 0 || start % len != 0 {
            continue;
        }
        let Ok(groups) = u32::try_from(n / len) else {
            continue;
        };
        out.extend(b.like(&inner, &[Arg::Lay(y, split(axis, groups))]));
    }
    out
}

fn shard_repeat_gqa(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let Some((axis, 1, x)) = shard_parts(node) else {
        return vec![];
    };
    let p = u64::from(b.parts());
    let mut out = Vec::new();
    for (inner, op) in ops_in(b, x, &[OpKind::Repeat]) {
        let Op::Repeat { axis: a, times } = op else {
            continue;
        };
        let y = args_of(&inner)[0];
        let Some(n) = b
            .val(y)
            .and_then(|v| v.logical.shape.dims()[a as usize].as_lit())
        else {
            continue;
        };
        if a != axis || n == 0 || n >= p || p % n != 0 || times % (p / n) != 0 {
            continue;
        }
        let spread = Op::Repeat { axis, times: p / n };
        let rest = Op::Repeat {
            axis,
            times: times / (p / n),
        };
        let Some(r) = b.apply(&spread, 0, &[y]) else {
            continue;
        };
        let idx = b.eg.analysis.intern(&rest);
        out.extend(b.op_with(idx, 0, &[Arg::Lay(r, split(axis, 1))]));
    }
    out
}

fn shard_attention(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let Some((axis, 1, x)) = shard_parts(node) else {
        return vec![];
    };
    let p = u64::from(b.parts());
    let mut out = Vec::new();
    for (inner, _) in ops_in(b, x, &[OpKind::FlashAttention]) {
        let a = args_of(&inner);
        let (q, mut k, mut v) = (a[0], a[1], a[2]);
        let s = split(axis, 1);
        if axis == 2 {
            let heads = |id: Id| b.val(id).and_then(|v| v.logical.shape.dims()[2].as_lit());
            let (Some(qh), Some(kv)) = (heads(q), heads(k)) else {
                continue;
            };
            if qh % p != 0 {
                continue;
            }
            if kv % p != 0 {
                if p % kv != 0 {
                    continue;
                }
                let spread = Op::Repeat {
                    axis: 2,
                    times: p / kv,
                };
                let (Some(kr), Some(vr)) = (b.apply(&spread, 0, &[k]), b.apply(&spread, 0, &[v]))
                else {
                    continue;
                };
                (k, v) = (kr, vr);
            }
        } else if axis != 0 {
            continue;
        }
        let mut args = vec![Arg::Lay(q, s), Arg::Lay(k, s), Arg::Lay(v, s)];
        if let Some(&sinks) = a.get(3) {
            // One sink per query head: split with the heads, whole with the batch.
            args.push(if axis == 2 {
                Arg::Lay(sinks, split(0, 1))
            } else {
                Arg::Id(sinks)
            });
        }
        out.extend(b.like(&inner, &args));
    }
    out
}

fn shard_embedding(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let Some((axis, groups, x)) = shard_parts(node) else {
        return vec![];
    };
    let mut out = Vec::new();
    for (inner, _) in ops_in(b, x, &[OpKind::Embedding]) {
        let (table, ids) = (args_of(&inner)[0], args_of(&inner)[1]);
        let Some(r) = rank(b, ids) else { continue };
        let args = if axis == r {
            [Arg::Lay(table, split(1, groups)), Arg::Id(ids)]
        } else {
            [Arg::Id(table), Arg::Lay(ids, split(axis, groups))]
        };
        out.extend(b.like(&inner, &args));
    }
    out
}

fn shard_all_reduce(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let Some((axis, 1, x)) = shard_parts(node) else {
        return vec![];
    };
    let mut out = Vec::new();
    for n in b.nodes(x) {
        if let ShardNode::AllReduce { args, .. } = n {
            out.extend(b.reduce_scatter(args[0], axis));
        }
    }
    out
}

fn shard_all_gather(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let Some((axis, 1, x)) = shard_parts(node) else {
        return vec![];
    };
    let mut out = Vec::new();
    for n in b.nodes(x) {
        if let ShardNode::AllGather { axis: a, args, .. } = n {
            if a == axis {
                out.push(args[0]);
            } else {
                out.extend(b.all_to_all(args[0], axis, a));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Introductions.

fn matmul_axes(b: &Build, node: &ShardNode) -> Option<(u32, u32, u32)> {
    let ShardNode::Op { op, args, .. } = node else {
        return None;
    };
    let Op::MatMul { ta, tb } = *b.op(*op) else {
        return None;
    };
    let (ra, rb) = (rank(b, args[0])?, rank(b, args[1])?);
    let k_a = if ta { ra - 2 } else { ra - 1 };
    let (k_b, n_b) = if tb {
        (rb - 1, rb - 2)
    } else {
        (rb - 2, rb - 1)
    };
    Some((k_a, k_b, n_b))
}

fn matmul_row_parallel(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let (a, w) = (args_of(node)[0], args_of(node)[1]);
    if !replicated(b, &[a, w]) {
        return vec![];
    }
    let Some((k_a, k_b, _)) = matmul_axes(b, node) else {
        return vec![];
    };
    let part = b.like(
        node,
        &[Arg::Lay(a, split(k_a, 1)), Arg::Lay(w, split(k_b, 1))],
    );
    part.and_then(|u| b.all_reduce(u)).into_iter().collect()
}

fn embedding_vocab_parallel(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let (table, ids) = (args_of(node)[0], args_of(node)[1]);
    if !replicated(b, &[table, ids]) {
        return vec![];
    }
    let part = b.like(node, &[Arg::Lay(table, split(0, 1)), Arg::Id(ids)]);
    part.and_then(|u| b.all_reduce(u)).into_iter().collect()
}

fn cross_entropy_vocab_parallel(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let (logits, labels) = (args_of(node)[0], args_of(node)[1]);
    if !replicated(b, &[logits, labels]) {
        return vec![];
    }
    let Some(r) = rank(b, logits) else {
        return vec![];
    };
    let args = [Arg::Lay(logits, split(r - 1, 1)), Arg::Id(labels)];
    b.like(node, &args).into_iter().collect()
}

fn reduce_sum_partial(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let x = args_of(node)[0];
    let ShardNode::Op { op, .. } = node else {
        return vec![];
    };
    let Op::ReduceSum { axes } = b.op(*op).clone() else {
        return vec![];
    };
    if !replicated(b, &[x]) {
        return vec![];
    }
    let mut out = Vec::new();
    for j in axes {
        if let Some(u) = b.like(node, &[Arg::Lay(x, split(j, 1))]) {
            out.extend(b.all_reduce(u));
        }
    }
    out
}

fn all_reduce_sequence(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let ShardNode::AllReduce { args, .. } = node else {
        return vec![];
    };
    let u = args[0];
    let Some(v) = b.val(u) else {
        return vec![];
    };
    let mut out = Vec::new();
    for (a, d) in v.logical.shape.dims().iter().enumerate() {
        if super::layout::is_sequence(*d) {
            if let Some(rs) = b.reduce_scatter(u, a as u32) {
                out.extend(b.all_gather(rs, a as u32));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Collectives move toward the outputs.

/// `f(…, C(y_i), …) = C'(f(…, y_i, …))` for the operands `pick` recognizes as a
/// collective of `y_i`: each such operand alone, then all of them together.
fn pull(b: &mut Build, node: &ShardNode, pick: fn(&Build, Id) -> Vec<(Id, u32)>) -> Vec<Id> {
    let mut out = Vec::new();
    let (ops_node, proj) = match node {
        ShardNode::Op { .. } => (vec![node.clone()], None),
        // A multi-result op (dropout): pull through its projection.
        ShardNode::Proj { index, args } => (
            ops_in(b, args[0], &[OpKind::Dropout])
                .into_iter()
                .map(|(n, _)| n)
                .collect(),
            Some(*index),
        ),
        _ => return out,
    };
    for op_node in ops_node {
        let ins: Vec<Id> = args_of(&op_node).to_vec();
        let picks: Vec<Vec<(Id, u32)>> = ins.iter().map(|&i| pick(b, i)).collect();
        let mut tries: Vec<Vec<Option<Id>>> = Vec::new();
        for (i, found) in picks.iter().enumerate() {
            for &(y, _) in found {
                let mut t = vec![None; ins.len()];
                t[i] = Some(y);
                tries.push(t);
            }
        }
        // All operands under the same collective (same axis) together.
        if ins.len() > 1 {
            if let Some(&(_, key)) = picks.first().and_then(|f| f.first()) {
                let all: Option<Vec<Option<Id>>> = picks
                    .iter()
                    .map(|f| f.iter().find(|(_, k)| *k == key).map(|&(y, _)| Some(y)))
                    .collect();
                tries.extend(all);
            }
        }
        for t in tries {
            let args: Vec<Arg> = t
                .iter()
                .zip(&ins)
                .map(|(y, &i)| Arg::Id(y.unwrap_or(i)))
                .collect();
            let Some(inner) = b.like(&op_node, &args) else {
                continue;
            };
            let inner = match proj {
                Some(index) => match b.proj(index, inner) {
                    Some(x) => x,
                    None => continue,
                },
                None => inner,
            };
            out.extend(collect(b, inner));
        }
    }
    out
}

fn gathered(b: &Build, id: Id) -> Vec<(Id, u32)> {
    b.nodes(id)
        .into_iter()
        .filter_map(|n| match n {
            ShardNode::AllGather { axis, args, .. } => Some((args[0], axis)),
            _ => None,
        })
        .collect()
}

fn reduced(b: &Build, id: Id) -> Vec<(Id, u32)> {
    b.nodes(id)
        .into_iter()
        .filter_map(|n| match n {
            ShardNode::AllReduce { args, .. } => Some((args[0], 0)),
            _ => None,
        })
        .collect()
}

fn gather_commute(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    pull(b, node, gathered)
}

fn partial_commute(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    // Only a partial result is a sum the all-reduce can move past.
    let mut out = Vec::new();
    for id in pull(b, node, reduced) {
        if b.nodes(id)
            .iter()
            .any(|n| matches!(n, ShardNode::AllReduce { .. }))
        {
            out.push(id);
        }
    }
    out
}

fn gather_bias_column(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let (x, bias) = (args_of(node)[0], args_of(node)[1]);
    let Some(r) = rank(b, x) else {
        return vec![];
    };
    let mut out = Vec::new();
    for (y, axis) in gathered(b, x) {
        if axis + 1 == r {
            let inner = b.like(node, &[Arg::Id(y), Arg::Lay(bias, split(0, 1))]);
            out.extend(inner.and_then(|i| b.all_gather(i, axis)));
        }
    }
    out
}

fn gather_matmul_contract(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let (a, w) = (args_of(node)[0], args_of(node)[1]);
    let Some((k_a, k_b, _)) = matmul_axes(b, node) else {
        return vec![];
    };
    let mut out = Vec::new();
    for (y, axis) in gathered(b, a) {
        if axis == k_a {
            let part = b.like(node, &[Arg::Id(y), Arg::Lay(w, split(k_b, 1))]);
            out.extend(part.and_then(|u| b.all_reduce(u)));
        }
    }
    out
}

fn gather_shard(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let ShardNode::AllGather { axis, args, .. } = node else {
        return vec![];
    };
    b.nodes(args[0])
        .into_iter()
        .filter_map(|n| match n {
            ShardNode::Shard {
                axis: a,
                groups: 1,
                args,
                ..
            } if a == *axis => Some(args[0]),
            _ => None,
        })
        .collect()
}

fn partial_bias(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let (x, bias) = (args_of(node)[0], args_of(node)[1]);
    let mut out = Vec::new();
    for (u, _) in reduced(b, x) {
        let inner = b.like(node, &[Arg::Id(u), Arg::Lay(bias, Layout::Partial)]);
        out.extend(inner.and_then(|i| b.all_reduce(i)));
    }
    out
}

/// Whether some term of class `from` reads class `to` (through any node).
fn reaches(b: &Build, from: Id, to: Id) -> bool {
    let to = b.eg.find(to);
    let mut seen = std::collections::BTreeSet::new();
    let mut stack = vec![b.eg.find(from)];
    while let Some(c) = stack.pop() {
        if c == to {
            return true;
        }
        if !seen.insert(c) {
            continue;
        }
        for n in &b.eg[c].nodes {
            stack.extend(n.children().iter().map(|&ch| b.eg.find(ch)));
        }
    }
    false
}

fn partial_residual(b: &mut Build, _: Id, node: &ShardNode) -> Vec<Id> {
    let (l, r) = (args_of(node)[0], args_of(node)[1]);
    let mut out = Vec::new();
    for (v, _) in reduced(b, r) {
        // Parallel branches only: in a sequential block the second branch reads the
        // first residual sum, which then has to exist anyway.
        if reaches(b, v, l) {
            continue;
        }
        for (inner, _) in ops_in(b, l, &[OpKind::Add]) {
            let (x, y) = (args_of(&inner)[0], args_of(&inner)[1]);
            for (keep, summed) in [(x, y), (y, x)] {
                for (u, _) in reduced(b, summed) {
                    let Some(uv) = b.like(node, &[Arg::Id(u), Arg::Id(v)]) else {
                        continue;
                    };
                    let Some(ar) = b.all_reduce(uv) else { continue };
                    out.extend(b.like(node, &[Arg::Id(keep), Arg::Id(ar)]));
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// egg plumbing: a rule is a searcher over its root kinds and an applier running its body.

struct KindSearcher {
    roots: &'static [NodeKind],
}

impl Searcher<ShardNode, super::lang::ShardAnalysis> for KindSearcher {
    fn search_eclass_with_limit(
        &self,
        egraph: &ShardGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<SearchMatches<'_, ShardNode>> {
        let hit = egraph[eclass]
            .nodes
            .iter()
            .any(|n| self.roots.contains(&n.kind()));
        (hit && limit > 0).then(|| SearchMatches {
            eclass,
            substs: vec![Subst::default()],
            ast: None,
        })
    }

    fn search_with_limit(
        &self,
        egraph: &ShardGraph,
        limit: usize,
    ) -> Vec<SearchMatches<'_, ShardNode>> {
        let mut classes: Vec<Id> = self
            .roots
            .iter()
            .filter_map(|k| egraph.classes_for_op(k))
            .flatten()
            .collect();
        classes.sort_unstable();
        classes.dedup();
        classes
            .into_iter()
            .take(limit)
            .map(|eclass| SearchMatches {
                eclass,
                substs: vec![Subst::default()],
                ast: None,
            })
            .collect()
    }

    fn vars(&self) -> Vec<Var> {
        vec![]
    }
}

struct BodyApplier {
    roots: &'static [NodeKind],
    body: Body,
}

impl Applier<ShardNode, super::lang::ShardAnalysis> for BodyApplier {
    fn apply_matches(
        &self,
        egraph: &mut ShardGraph,
        matches: &[SearchMatches<ShardNode>],
        _rule: Symbol,
    ) -> Vec<Id> {
        let mut changed = Vec::new();
        for m in matches {
            let class = egraph.find(m.eclass);
            let nodes: Vec<ShardNode> = egraph[class]
                .nodes
                .iter()
                .filter(|n| self.roots.contains(&n.kind()))
                .cloned()
                .collect();
            for node in nodes {
                let class = egraph.find(class);
                let rhs = (self.body)(&mut Build { eg: egraph }, class, &node);
                for id in rhs {
                    if egraph.union(class, id) {
                        changed.push(egraph.find(class));
                    }
                }
            }
        }
        changed
    }

    fn apply_one(
        &self,
        _: &mut ShardGraph,
        _: Id,
        _: &Subst,
        _: Option<&PatternAst<ShardNode>>,
        _: Symbol,
    ) -> Vec<Id> {
        // `apply_matches` does the work; egg calls this only through it.
        vec![]
    }
}

/// The egg rewrites for a run: every rule, without the sequence-parallel ones unless
/// `sp` is set.
pub fn rewrites(sp: bool) -> Vec<Rewrite<ShardNode, super::lang::ShardAnalysis>> {
    RULES
        .iter()
        .filter(|r| sp || !r.sp_only)
        .map(|r| {
            Rewrite::new(
                r.name,
                KindSearcher { roots: r.roots },
                BodyApplier {
                    roots: r.roots,
                    body: r.body,
                },
            )
            .expect("rules bind no pattern variables")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_have_unique_names_and_laws() {
        let mut names: Vec<&str> = RULES.iter().map(|r| r.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate rule names");
        assert!(RULES.iter().all(|r| r.law.contains('=')));
    }
}
