//! Typed attributes by name: what the text and JSON formats read and write.

use super::{Op, OpKind};
use crate::ir::types::{DType, Dim, Shape};
use std::collections::BTreeMap;
use std::fmt;
use thiserror::Error;

/// An attribute value as the text format spells it.
#[derive(Clone, Debug, PartialEq)]
pub enum AttrValue {
    /// `true` / `false`.
    Bool(bool),
    /// A non-negative integer.
    Int(u64),
    /// A float (integers are accepted where a float is expected).
    Float(f64),
    /// A quoted string.
    Str(String),
    /// A dtype token.
    DType(DType),
    /// A list of integers `[0,2,1]`.
    Ints(Vec<u64>),
    /// A shape `[b,s,4096]`.
    Shape(Shape),
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Int(n) => write!(f, "{n}"),
            AttrValue::Float(x) => {
                if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e15 {
                    write!(f, "{x:.1}")
                } else {
                    write!(f, "{x:e}")
                }
            }
            AttrValue::Str(s) => write!(f, "{s:?}"),
            AttrValue::DType(d) => write!(f, "{d}"),
            AttrValue::Ints(v) => {
                f.write_str("[")?;
                for (i, n) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{n}")?;
                }
                f.write_str("]")
            }
            AttrValue::Shape(s) => write!(f, "{s}"),
        }
    }
}

/// A problem building an op from named attributes.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum AttrError {
    /// The op name is not in the op table.
    #[error("unknown op `{0}`")]
    UnknownOp(String),
    /// An attribute the op does not have.
    #[error("op `{op}` has no attribute `{attr}`")]
    Unknown {
        /// Op name.
        op: &'static str,
        /// Attribute name.
        attr: String,
    },
    /// A required attribute is absent.
    #[error("op `{op}` needs attribute `{attr}`")]
    Missing {
        /// Op name.
        op: &'static str,
        /// Attribute name.
        attr: &'static str,
    },
    /// The attribute has the wrong kind of value.
    #[error("attribute `{attr}` of `{op}` must be {expected}")]
    Type {
        /// Op name.
        op: &'static str,
        /// Attribute name.
        attr: &'static str,
        /// What was expected.
        expected: &'static str,
    },
}

struct AttrReader<'a> {
    op: &'static str,
    attrs: &'a BTreeMap<String, AttrValue>,
}

impl AttrReader<'_> {
    fn get(&self, attr: &'static str) -> Result<&AttrValue, AttrError> {
        self.attrs
            .get(attr)
            .ok_or(AttrError::Missing { op: self.op, attr })
    }
    fn ty(&self, attr: &'static str, expected: &'static str) -> AttrError {
        AttrError::Type {
            op: self.op,
            attr,
            expected,
        }
    }
    fn bool(&self, attr: &'static str) -> Result<bool, AttrError> {
        match self.get(attr)? {
            AttrValue::Bool(b) => Ok(*b),
            _ => Err(self.ty(attr, "a bool")),
        }
    }
    fn u64(&self, attr: &'static str) -> Result<u64, AttrError> {
        match self.get(attr)? {
            AttrValue::Int(n) => Ok(*n),
            _ => Err(self.ty(attr, "an integer")),
        }
    }
    /// The optional positive `window` of the attention ops.
    fn window(&self) -> Result<Option<u64>, AttrError> {
        const ATTR: &str = "window";
        match self.attrs.get(ATTR) {
            None => Ok(None),
            Some(AttrValue::Int(n)) if *n > 0 => Ok(Some(*n)),
            Some(_) => Err(self.ty(ATTR, "a positive integer")),
        }
    }
    /// An optional flag: absent is `false`.
    fn flag(&self, attr: &'static str) -> Result<bool, AttrError> {
        match self.attrs.get(attr) {
            None => Ok(false),
            Some(AttrValue::Bool(b)) => Ok(*b),
            Some(_) => Err(self.ty(attr, "a bool")),
        }
    }
    /// The optional finite bounds `min` and `max` of a clamp, at least one set and
    /// `min ≤ max` when both are.
    fn bounds(&self) -> Result<(Option<f64>, Option<f64>), AttrError> {
        let one = |attr: &'static str| match self.attrs.get(attr) {
            None => Ok(None),
            Some(AttrValue::Float(x)) if x.is_finite() => Ok(Some(*x)),
            Some(AttrValue::Int(n)) => Ok(Some(*n as f64)),
            Some(_) => Err(self.ty(attr, "a finite number")),
        };
        let (min, max) = (one("min")?, one("max")?);
        match (min, max) {
            (None, None) => Err(AttrError::Missing {
                op: self.op,
                attr: "min",
            }),
            (Some(lo), Some(hi)) if lo > hi => Err(self.ty("max", "at least `min`")),
            b => Ok(b),
        }
    }
    fn capacity(&self) -> Result<Option<f64>, AttrError> {
        const ATTR: &str = "capacity";
        match self.attrs.get(ATTR) {
            None => Ok(None),
            Some(AttrValue::Float(x)) if x.is_finite() && *x > 0.0 => Ok(Some(*x)),
            Some(AttrValue::Int(n)) if *n > 0 => Ok(Some(*n as f64)),
            Some(_) => Err(self.ty(ATTR, "a positive number")),
        }
    }
    fn u32(&self, attr: &'static str) -> Result<u32, AttrError> {
        u32::try_from(self.u64(attr)?).map_err(|_| self.ty(attr, "an integer below 2^32"))
    }
    fn f64(&self, attr: &'static str) -> Result<f64, AttrError> {
        match self.get(attr)? {
            AttrValue::Float(x) if x.is_finite() => Ok(*x),
            AttrValue::Int(n) => Ok(*n as f64),
            _ => Err(self.ty(attr, "a finite number")),
        }
    }
    fn string(&self, attr: &'static str) -> Result<String, AttrError> {
        match self.get(attr)? {
            AttrValue::Str(s) => Ok(s.clone()),
            _ => Err(self.ty(attr, "a string")),
        }
    }
    fn dtype(&self, attr: &'static str) -> Result<DType, AttrError> {
        match self.get(attr)? {
            AttrValue::DType(d) => Ok(*d),
            _ => Err(self.ty(attr, "a dtype")),
        }
    }
    fn u32s(&self, attr: &'static str) -> Result<Vec<u32>, AttrError> {
        match self.get(attr)? {
            AttrValue::Ints(v) => v
                .iter()
                .map(|&n| u32::try_from(n).map_err(|_| self.ty(attr, "a list of small integers")))
                .collect(),
            _ => Err(self.ty(attr, "a list of integers")),
        }
    }
    fn shape(&self, attr: &'static str) -> Result<Shape, AttrError> {
        match self.get(attr)? {
            AttrValue::Shape(s) => Ok(s.clone()),
            AttrValue::Ints(v) => Ok(Shape::new(v.iter().map(|&n| Dim::lit(n)))),
            _ => Err(self.ty(attr, "a shape")),
        }
    }
}

impl Op {
    /// Attributes as `(name, value)` pairs in table order.
    pub fn attrs(&self) -> Vec<(&'static str, AttrValue)> {
        use AttrValue as V;
        let ints = |v: &[u32]| V::Ints(v.iter().map(|&n| u64::from(n)).collect());
        match self {
            Op::Input { name } | Op::Param { name } | Op::State { name } => {
                vec![("name", V::Str(name.clone()))]
            }
            Op::Constant { value } => vec![("value", V::Float(*value))],
            Op::Recv { peer } | Op::Send { peer } => vec![("peer", V::Int(u64::from(*peer)))],
            Op::MatMul { ta, tb } => vec![("ta", V::Bool(*ta)), ("tb", V::Bool(*tb))],
            Op::Add
            | Op::Mul
            | Op::BiasAdd
            | Op::Gelu
            | Op::Silu
            | Op::Embedding
            | Op::CrossEntropy
            | Op::GeluGrad
            | Op::SiluGrad
            | Op::CrossEntropyGrad
            | Op::Tanh
            | Op::Rsqrt
            | Op::Contiguous => vec![],
            Op::Pow { exponent } => vec![("exponent", V::Float(*exponent))],
            Op::Shift { value } => vec![("value", V::Float(*value))],
            Op::Scale { factor } => vec![("factor", V::Float(*factor))],
            Op::Softmax { causal, scale } => {
                vec![("causal", V::Bool(*causal)), ("scale", V::Float(*scale))]
            }
            Op::FlashAttention {
                causal,
                scale,
                window,
                sinks,
            }
            | Op::FlashAttentionGrad {
                causal,
                scale,
                window,
                sinks,
            }
            | Op::Sdpa {
                causal,
                scale,
                window,
                sinks,
            }
            | Op::SdpaGrad {
                causal,
                scale,
                window,
                sinks,
            } => {
                let mut v = vec![("causal", V::Bool(*causal)), ("scale", V::Float(*scale))];
                if let Some(w) = window {
                    v.push(("window", V::Int(*w)));
                }
                if *sinks {
                    v.push(("sinks", V::Bool(true)));
                }
                v
            }
            Op::Clamp { min, max } | Op::ClampGrad { min, max } => {
                let mut v = Vec::new();
                if let Some(lo) = min {
                    v.push(("min", V::Float(*lo)));
                }
                if let Some(hi) = max {
                    v.push(("max", V::Float(*hi)));
                }
                v
            }
            Op::GroupedBiasAdd => vec![],
            Op::GroupedBiasAddGrad { experts } => vec![("experts", V::Int(*experts))],
            Op::Dropout { p } | Op::DropoutGrad { p } => vec![("p", V::Float(*p))],
            Op::LayerNorm { eps }
            | Op::RmsNorm { eps }
            | Op::LayerNormGrad { eps }
            | Op::RmsNormGrad { eps } => vec![("eps", V::Float(*eps))],
            Op::Rotary { dims, theta } | Op::RotaryGrad { dims, theta } => {
                vec![("dims", V::Int(*dims)), ("theta", V::Float(*theta))]
            }
            Op::Reshape { shape } => vec![("shape", V::Shape(shape.clone()))],
            Op::Transpose { perm } => vec![("perm", ints(perm))],
            Op::Slice { axis, start, len } => vec![
                ("axis", V::Int(u64::from(*axis))),
                ("start", V::Int(*start)),
                ("len", V::Int(*len)),
            ],
            Op::Concat { axis } => vec![("axis", V::Int(u64::from(*axis)))],
            Op::Pad {
                axis,
                before,
                after,
            } => vec![
                ("axis", V::Int(u64::from(*axis))),
                ("before", V::Int(*before)),
                ("after", V::Int(*after)),
            ],
            Op::Repeat { axis, times } => {
                vec![
                    ("axis", V::Int(u64::from(*axis))),
                    ("times", V::Int(*times)),
                ]
            }
            Op::Broadcast { axes, shape } => {
                vec![("axes", ints(axes)), ("shape", V::Shape(shape.clone()))]
            }
            Op::ReduceSum { axes } => vec![("axes", ints(axes))],
            Op::Cast { to } => vec![("to", V::DType(*to))],
            Op::SoftmaxGrad { scale } => vec![("scale", V::Float(*scale))],
            Op::EmbeddingGrad { vocab } => vec![("vocab", V::Int(*vocab))],
            Op::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => vec![
                ("lr", V::Float(*lr)),
                ("beta1", V::Float(*beta1)),
                ("beta2", V::Float(*beta2)),
                ("eps", V::Float(*eps)),
                ("weight_decay", V::Float(*weight_decay)),
            ],
            Op::AllReduce { parts }
            | Op::TpCopy { parts }
            | Op::VocabParallelEmbedding { parts }
            | Op::VocabParallelCrossEntropy { parts }
            | Op::VocabParallelCrossEntropyGrad { parts } => {
                vec![("parts", V::Int(u64::from(*parts)))]
            }
            Op::VocabParallelEmbeddingGrad { vocab, parts } => vec![
                ("vocab", V::Int(*vocab)),
                ("parts", V::Int(u64::from(*parts))),
            ],
            Op::AllGather { axis, parts }
            | Op::ReduceScatter { axis, parts }
            | Op::TpSplit { axis, parts }
            | Op::TpGather { axis, parts } => vec![
                ("axis", V::Int(u64::from(*axis))),
                ("parts", V::Int(u64::from(*parts))),
            ],
            Op::AllToAll {
                split,
                concat,
                parts,
            } => vec![
                ("split", V::Int(u64::from(*split))),
                ("concat", V::Int(u64::from(*concat))),
                ("parts", V::Int(u64::from(*parts))),
            ],
            Op::MoeRoute { topk, sigmoid } | Op::MoeRouteGrad { topk, sigmoid } => {
                vec![("topk", V::Int(*topk)), ("sigmoid", V::Bool(*sigmoid))]
            }
            Op::MoeDispatch { experts, capacity }
            | Op::MoeDispatchGrad { experts, capacity }
            | Op::MoeCombine { experts, capacity }
            | Op::MoeCombineGrad { experts, capacity } => {
                let mut v = vec![("experts", V::Int(*experts))];
                if let Some(c) = capacity {
                    v.push(("capacity", V::Float(*c)));
                }
                v
            }
            Op::GroupedMatMul { tb } => vec![("tb", V::Bool(*tb))],
            Op::GroupedMatMulWgrad { experts, tb } => {
                vec![("experts", V::Int(*experts)), ("tb", V::Bool(*tb))]
            }
        }
    }

    /// Builds an op from its kind and named attributes; rejects unknown, missing and
    /// ill-typed attributes.
    ///
    /// # Errors
    /// [`AttrError::Unknown`] for an attribute the op does not have,
    /// [`AttrError::Missing`] for one it needs that is absent, and [`AttrError::Type`] for a
    /// value of the wrong kind.
    pub fn from_attrs(kind: OpKind, attrs: &BTreeMap<String, AttrValue>) -> Result<Op, AttrError> {
        let info = kind.info();
        if let Some(extra) = attrs.keys().find(|k| !info.attrs.contains(&k.as_str())) {
            return Err(AttrError::Unknown {
                op: info.name,
                attr: extra.clone(),
            });
        }
        let r = AttrReader {
            op: info.name,
            attrs,
        };
        Ok(match kind {
            OpKind::Input => Op::Input {
                name: r.string("name")?,
            },
            OpKind::Param => Op::Param {
                name: r.string("name")?,
            },
            OpKind::State => Op::State {
                name: r.string("name")?,
            },
            OpKind::Constant => Op::Constant {
                value: r.f64("value")?,
            },
            OpKind::Recv => Op::Recv {
                peer: r.u32("peer")?,
            },
            OpKind::MatMul => Op::MatMul {
                ta: r.bool("ta")?,
                tb: r.bool("tb")?,
            },
            OpKind::Add => Op::Add,
            OpKind::Mul => Op::Mul,
            OpKind::Scale => Op::Scale {
                factor: r.f64("factor")?,
            },
            OpKind::BiasAdd => Op::BiasAdd,
            OpKind::Gelu => Op::Gelu,
            OpKind::Silu => Op::Silu,
            OpKind::Softmax => Op::Softmax {
                causal: r.bool("causal")?,
                scale: r.f64("scale")?,
            },
            OpKind::Dropout => Op::Dropout { p: r.f64("p")? },
            OpKind::LayerNorm => Op::LayerNorm { eps: r.f64("eps")? },
            OpKind::RmsNorm => Op::RmsNorm { eps: r.f64("eps")? },
            OpKind::Rotary => Op::Rotary {
                dims: r.u64("dims")?,
                theta: r.f64("theta")?,
            },
            OpKind::Embedding => Op::Embedding,
            OpKind::Reshape => Op::Reshape {
                shape: r.shape("shape")?,
            },
            OpKind::Transpose => Op::Transpose {
                perm: r.u32s("perm")?,
            },
            OpKind::Slice => Op::Slice {
                axis: r.u32("axis")?,
                start: r.u64("start")?,
                len: r.u64("len")?,
            },
            OpKind::Concat => Op::Concat {
                axis: r.u32("axis")?,
            },
            OpKind::Pad => Op::Pad {
                axis: r.u32("axis")?,
                before: r.u64("before")?,
                after: r.u64("after")?,
            },
            OpKind::Repeat => Op::Repeat {
                axis: r.u32("axis")?,
                times: r.u64("times")?,
            },
            OpKind::Broadcast => Op::Broadcast {
                axes: r.u32s("axes")?,
                shape: r.shape("shape")?,
            },
            OpKind::ReduceSum => Op::ReduceSum {
                axes: r.u32s("axes")?,
            },
            OpKind::Cast => Op::Cast { to: r.dtype("to")? },
            OpKind::Pow => Op::Pow {
                exponent: r.f64("exponent")?,
            },
            OpKind::Clamp => {
                let (min, max) = r.bounds()?;
                Op::Clamp { min, max }
            }
            OpKind::Tanh => Op::Tanh,
            OpKind::Rsqrt => Op::Rsqrt,
            OpKind::Shift => Op::Shift {
                value: r.f64("value")?,
            },
            OpKind::Contiguous => Op::Contiguous,
            OpKind::CrossEntropy => Op::CrossEntropy,
            OpKind::Sdpa => Op::Sdpa {
                causal: r.bool("causal")?,
                scale: r.f64("scale")?,
                window: r.window()?,
                sinks: r.flag("sinks")?,
            },
            OpKind::SdpaGrad => Op::SdpaGrad {
                causal: r.bool("causal")?,
                scale: r.f64("scale")?,
                window: r.window()?,
                sinks: r.flag("sinks")?,
            },
            OpKind::FlashAttention => Op::FlashAttention {
                causal: r.bool("causal")?,
                scale: r.f64("scale")?,
                window: r.window()?,
                sinks: r.flag("sinks")?,
            },
            OpKind::GeluGrad => Op::GeluGrad,
            OpKind::SiluGrad => Op::SiluGrad,
            OpKind::ClampGrad => {
                let (min, max) = r.bounds()?;
                Op::ClampGrad { min, max }
            }
            OpKind::SoftmaxGrad => Op::SoftmaxGrad {
                scale: r.f64("scale")?,
            },
            OpKind::DropoutGrad => Op::DropoutGrad { p: r.f64("p")? },
            OpKind::LayerNormGrad => Op::LayerNormGrad { eps: r.f64("eps")? },
            OpKind::RmsNormGrad => Op::RmsNormGrad { eps: r.f64("eps")? },
            OpKind::RotaryGrad => Op::RotaryGrad {
                dims: r.u64("dims")?,
                theta: r.f64("theta")?,
            },
            OpKind::EmbeddingGrad => Op::EmbeddingGrad {
                vocab: r.u64("vocab")?,
            },
            OpKind::CrossEntropyGrad => Op::CrossEntropyGrad,
            OpKind::FlashAttentionGrad => Op::FlashAttentionGrad {
                causal: r.bool("causal")?,
                scale: r.f64("scale")?,
                window: r.window()?,
                sinks: r.flag("sinks")?,
            },
            OpKind::AdamW => Op::AdamW {
                lr: r.f64("lr")?,
                beta1: r.f64("beta1")?,
                beta2: r.f64("beta2")?,
                eps: r.f64("eps")?,
                weight_decay: r.f64("weight_decay")?,
            },
            OpKind::AllReduce => Op::AllReduce {
                parts: r.u32("parts")?,
            },
            OpKind::AllGather => Op::AllGather {
                axis: r.u32("axis")?,
                parts: r.u32("parts")?,
            },
            OpKind::ReduceScatter => Op::ReduceScatter {
                axis: r.u32("axis")?,
                parts: r.u32("parts")?,
            },
            OpKind::AllToAll => Op::AllToAll {
                split: r.u32("split")?,
                concat: r.u32("concat")?,
                parts: r.u32("parts")?,
            },
            OpKind::Send => Op::Send {
                peer: r.u32("peer")?,
            },
            OpKind::TpCopy => Op::TpCopy {
                parts: r.u32("parts")?,
            },
            OpKind::TpSplit => Op::TpSplit {
                axis: r.u32("axis")?,
                parts: r.u32("parts")?,
            },
            OpKind::TpGather => Op::TpGather {
                axis: r.u32("axis")?,
                parts: r.u32("parts")?,
            },
            OpKind::VocabParallelEmbedding => Op::VocabParallelEmbedding {
                parts: r.u32("parts")?,
            },
            OpKind::VocabParallelEmbeddingGrad => Op::VocabParallelEmbeddingGrad {
                vocab: r.u64("vocab")?,
                parts: r.u32("parts")?,
            },
            OpKind::VocabParallelCrossEntropy => Op::VocabParallelCrossEntropy {
                parts: r.u32("parts")?,
            },
            OpKind::VocabParallelCrossEntropyGrad => Op::VocabParallelCrossEntropyGrad {
                parts: r.u32("parts")?,
            },
            OpKind::MoeRoute => Op::MoeRoute {
                topk: r.u64("topk")?,
                sigmoid: r.bool("sigmoid")?,
            },
            OpKind::MoeRouteGrad => Op::MoeRouteGrad {
                topk: r.u64("topk")?,
                sigmoid: r.bool("sigmoid")?,
            },
            OpKind::MoeDispatch => Op::MoeDispatch {
                experts: r.u64("experts")?,
                capacity: r.capacity()?,
            },
            OpKind::MoeDispatchGrad => Op::MoeDispatchGrad {
                experts: r.u64("experts")?,
                capacity: r.capacity()?,
            },
            OpKind::GroupedMatMul => Op::GroupedMatMul { tb: r.bool("tb")? },
            OpKind::GroupedMatMulWgrad => Op::GroupedMatMulWgrad {
                experts: r.u64("experts")?,
                tb: r.bool("tb")?,
            },
            OpKind::GroupedBiasAdd => Op::GroupedBiasAdd,
            OpKind::GroupedBiasAddGrad => Op::GroupedBiasAddGrad {
                experts: r.u64("experts")?,
            },
            OpKind::MoeCombine => Op::MoeCombine {
                experts: r.u64("experts")?,
                capacity: r.capacity()?,
            },
            OpKind::MoeCombineGrad => Op::MoeCombineGrad {
                experts: r.u64("experts")?,
                capacity: r.capacity()?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_round_trip_through_from_attrs() {
        let ops = [
            Op::Softmax {
                causal: true,
                scale: 0.125,
            },
            Op::Reshape {
                shape: Shape::new([Dim::batch(), Dim::seq(), Dim::lit(4), Dim::lit(16)]),
            },
            Op::AllToAll {
                split: 1,
                concat: 2,
                parts: 4,
            },
        ];
        for op in ops {
            let attrs: BTreeMap<String, AttrValue> = op
                .attrs()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            assert_eq!(Op::from_attrs(op.kind(), &attrs).unwrap(), op);
        }
    }
}
