//! The JSON form of a graph, and the document type it shares with the binary codec.
//!
//! A [`GraphDoc`] is the graph's name and its ops in definition order. Each op lists
//! its operator (the serde form of [`Op`], tagged by `"op"`), its inputs as tensor
//! numbers, the type and role of each result, its block and its phase. Result numbers
//! are implicit: tensors are numbered in definition order, the results of op 0 first.
//!
//! ```json
//! { "name": "tiny",
//!   "ops": [
//!     { "op": {"op": "input", "name": "x"}, "inputs": [],
//!       "results": [{"type": {"dtype": "f32", "shape": ["b", 64]}, "role": "activation"}],
//!       "block": "embed", "phase": "fwd" },
//!     { "op": {"op": "gelu"}, "inputs": [0],
//!       "results": [{"type": {"dtype": "f32", "shape": ["b", 64]}, "role": "activation"}],
//!       "block": {"layer": 0}, "phase": "fwd" } ] }
//! ```
//!
//! Unlike the text format, JSON may reference tensors defined later (even cyclically):
//! such graphs load and the verifier reports them. An input that names no tensor at
//! all is a [`DocError`]. Round trip law: `from_json(&to_json(&g)) == Ok(g)` for every
//! graph whose float attributes are finite.
//!
//! Reading is strict: an op is named as in the op table (`matmul`, never the derive's
//! `mat_mul`), and a field the document's types do not have (in the graph, an op, its
//! attributes, a result or a tensor type) is an error, not silently dropped.
//!
//! In the binary codec ([`super::codec`]) the same document is written compactly: an
//! op as its name and `(attribute, value)` pairs, a type as its dtype and dimension
//! spellings.

use super::graph::{Block, Graph, OpId, Phase, TensorId};
use super::op::{AttrError, AttrValue, Op, OpKind};
use super::types::{DType, Dim, Role, Shape, TensorType};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

/// The serialized form of a [`Graph`] (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphDoc {
    /// The graph's name.
    pub name: String,
    /// Ops in definition order.
    pub ops: Vec<OpDoc>,
}

/// One op of a [`GraphDoc`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpDoc {
    /// The operator with its attributes.
    #[serde(with = "op_repr")]
    pub op: Op,
    /// Operands, as tensor numbers.
    pub inputs: Vec<TensorId>,
    /// Type and role of each result.
    pub results: Vec<ResultDoc>,
    /// Block tag.
    pub block: Block,
    /// Phase tag.
    pub phase: Phase,
}

/// One result of an [`OpDoc`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultDoc {
    /// The tensor type.
    #[serde(rename = "type", with = "type_repr")]
    pub ty: TensorType,
    /// The tensor role.
    pub role: Role,
}

/// A document that does not describe a graph.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DocError {
    /// An input names a tensor that no op defines.
    #[error(
        "{op} ({name}): input {index} is {tensor}, but the graph defines only {count} tensors"
    )]
    Dangling {
        /// The op, by position.
        op: OpId,
        /// Its name.
        name: &'static str,
        /// Input position.
        index: usize,
        /// The missing tensor.
        tensor: TensorId,
        /// Number of tensors the document defines.
        count: usize,
    },
    /// More ops or tensors than ids can number.
    #[error("the graph has more than 2^32 ops or tensors")]
    TooLarge,
}

/// A JSON text that does not describe a graph.
#[derive(Debug, Error)]
pub enum JsonError {
    /// Not JSON, or not the document's shape (serde's message gives line and column).
    #[error("bad graph JSON: {0}")]
    Syntax(#[from] serde_json::Error),
    /// Well-formed, but not a graph.
    #[error(transparent)]
    Doc(#[from] DocError),
}

impl GraphDoc {
    /// The document of a graph.
    pub fn from_graph(g: &Graph) -> GraphDoc {
        let ops = g
            .ops()
            .map(|id| {
                let node = g.node(id);
                OpDoc {
                    op: node.op.clone(),
                    inputs: node.inputs.clone(),
                    results: node
                        .results
                        .iter()
                        .filter_map(|&r| g.get_tensor(r))
                        .map(|t| ResultDoc {
                            ty: t.ty.clone(),
                            role: t.role,
                        })
                        .collect(),
                    block: node.block,
                    phase: node.phase,
                }
            })
            .collect();
        GraphDoc {
            name: g.name().to_string(),
            ops,
        }
    }

    /// Builds the graph, numbering results in definition order and linking uses.
    /// Inputs may name tensors of later ops; inputs naming no tensor are an error.
    ///
    /// # Errors
    /// [`DocError::Dangling`] when an input names a tensor that no op defines, and
    /// [`DocError::TooLarge`] when the ops or tensors outnumber the ids.
    pub fn into_graph(self) -> Result<Graph, DocError> {
        let limit = u32::MAX as usize;
        let count = self
            .ops
            .iter()
            .try_fold(0usize, |n, op| n.checked_add(op.results.len()))
            .filter(|&n| n <= limit)
            .ok_or(DocError::TooLarge)?;
        if self.ops.len() > limit {
            return Err(DocError::TooLarge);
        }
        for (i, op) in self.ops.iter().enumerate() {
            if let Some((index, &tensor)) = op
                .inputs
                .iter()
                .enumerate()
                .find(|(_, t)| t.index() >= count)
            {
                return Err(DocError::Dangling {
                    op: OpId::from_index(i),
                    name: op.op.name(),
                    index,
                    tensor,
                    count,
                });
            }
        }
        let mut g = Graph::new(self.name);
        for op in self.ops {
            let results = op.results.into_iter().map(|r| (r.ty, r.role)).collect();
            g.push_unchecked(op.op, op.inputs, results, op.block, op.phase);
        }
        match g.link() {
            Ok(()) => Ok(g),
            // Unreachable: every input was checked above.
            Err((op, tensor)) => Err(DocError::Dangling {
                op,
                name: g.op(op).name(),
                index: 0,
                tensor,
                count,
            }),
        }
    }
}

/// The graph as pretty-printed JSON (see the module docs).
///
/// Non-finite float attributes (which only unchecked construction can make) are
/// written as `null` and do not load back.
pub fn to_json(g: &Graph) -> String {
    match serde_json::to_string_pretty(&GraphDoc::from_graph(g)) {
        Ok(s) => s,
        // The document has string keys only and no failing `Serialize` impl.
        Err(e) => unreachable!("graph documents always serialize: {e}"),
    }
}

/// Reads a graph from JSON. Does not verify.
///
/// # Errors
///
/// [`JsonError::Syntax`] for text that is not JSON or not the document's shape,
/// including an unknown op name and any field the document's types do not have;
/// [`JsonError::Doc`] for a document that does not describe a graph.
pub fn from_json(src: &str) -> Result<Graph, JsonError> {
    let doc: GraphDoc = serde_json::from_str(src)?;
    Ok(doc.into_graph()?)
}

/// The binary (not human-readable) form of an op: its name and named attributes.
#[derive(Serialize, Deserialize)]
struct BinOp {
    kind: String,
    attrs: Vec<(String, BinAttr)>,
}

#[derive(Serialize, Deserialize)]
enum BinAttr {
    Bool(bool),
    Int(u64),
    Float(f64),
    Str(String),
    DType(DType),
    Ints(Vec<u64>),
    Shape(Vec<String>),
}

fn dims_to_text(shape: &Shape) -> Vec<String> {
    shape.dims().iter().map(Dim::to_string).collect()
}

fn dims_from_text(dims: &[String]) -> Result<Vec<Dim>, String> {
    dims.iter()
        .map(|t| Dim::parse(t).ok_or_else(|| format!("bad dimension `{t}`")))
        .collect()
}

impl BinOp {
    fn from_op(op: &Op) -> BinOp {
        let attrs = op
            .attrs()
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    AttrValue::Bool(b) => BinAttr::Bool(b),
                    AttrValue::Int(n) => BinAttr::Int(n),
                    AttrValue::Float(x) => BinAttr::Float(x),
                    AttrValue::Str(s) => BinAttr::Str(s),
                    AttrValue::DType(d) => BinAttr::DType(d),
                    AttrValue::Ints(v) => BinAttr::Ints(v),
                    AttrValue::Shape(s) => BinAttr::Shape(dims_to_text(&s)),
                };
                (k.to_string(), v)
            })
            .collect();
        BinOp {
            kind: op.name().to_string(),
            attrs,
        }
    }

    fn into_op(self) -> Result<Op, String> {
        let kind = OpKind::from_name(&self.kind)
            .ok_or_else(|| AttrError::UnknownOp(self.kind.clone()).to_string())?;
        let mut attrs = BTreeMap::new();
        for (k, v) in self.attrs {
            let v = match v {
                BinAttr::Bool(b) => AttrValue::Bool(b),
                BinAttr::Int(n) => AttrValue::Int(n),
                BinAttr::Float(x) => AttrValue::Float(x),
                BinAttr::Str(s) => AttrValue::Str(s),
                BinAttr::DType(d) => AttrValue::DType(d),
                BinAttr::Ints(v) => AttrValue::Ints(v),
                BinAttr::Shape(dims) => AttrValue::Shape(Shape::new(dims_from_text(&dims)?)),
            };
            if attrs.insert(k.clone(), v).is_some() {
                return Err(format!("duplicate attribute `{k}` of `{}`", self.kind));
            }
        }
        Op::from_attrs(kind, &attrs).map_err(|e| e.to_string())
    }
}

/// The first key of `input` (a path such as `shape.dims`) that `canonical`, the same
/// value read and written back, lacks: a field the reader ignored. Keys are compared
/// in objects at every depth; arrays element by element.
fn unknown_key(input: &serde_json::Value, canonical: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match (input, canonical) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| match b.get(k) {
            None => Some(k.clone()),
            Some(w) => unknown_key(v, w).map(|inner| format!("{k}.{inner}")),
        }),
        (Value::Array(a), Value::Array(b)) => a.iter().zip(b).find_map(|(v, w)| unknown_key(v, w)),
        _ => None,
    }
}

/// Reads a `T` from a human-readable deserializer and refuses fields `T` would
/// silently ignore (its derive does not deny unknown fields).
fn strict<'de, T, D>(d: D, what: &str) -> Result<T, D::Error>
where
    T: Serialize + serde::de::DeserializeOwned,
    D: serde::Deserializer<'de>,
{
    use serde::de::Error as _;
    let input = serde_json::Value::deserialize(d)?;
    let value = T::deserialize(&input).map_err(D::Error::custom)?;
    let canonical = serde_json::to_value(&value).map_err(D::Error::custom)?;
    match unknown_key(&input, &canonical) {
        Some(k) => Err(D::Error::custom(format!("unknown field `{k}` in {what}"))),
        None => Ok(value),
    }
}

/// The tag the `Op` derive gives each kind: serde's `snake_case` of the variant name
/// (`MatMul` → `mat_mul`), which differs from the op table's name for a few ops
/// (`matmul`). JSON is written and read with the table's names, as `ir-spec/` says;
/// the `ir_spec` test checks this map against the derive.
fn serde_tag(kind: OpKind) -> &'static str {
    static TAGS: std::sync::OnceLock<BTreeMap<OpKind, String>> = std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        OpKind::ALL
            .iter()
            .map(|&k| {
                let mut tag = String::new();
                for (i, c) in format!("{k:?}").chars().enumerate() {
                    if c.is_ascii_uppercase() && i > 0 {
                        tag.push('_');
                    }
                    tag.push(c.to_ascii_lowercase());
                }
                (k, tag)
            })
            .collect()
    });
    tags.get(&kind).map_or("", String::as_str)
}

/// `Op` in human-readable formats: its serde form with the op table's name as the
/// `op` tag and unknown fields refused; [`BinOp`] otherwise.
mod op_repr {
    use super::{serde_tag, strict, BinOp, Op, OpKind};
    use serde::de::Error as _;
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(op: &Op, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            let mut v = serde_json::to_value(op).map_err(S::Error::custom)?;
            if let Some(tag) = v.get_mut("op") {
                *tag = op.name().into();
            }
            v.serialize(s)
        } else {
            BinOp::from_op(op).serialize(s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Op, D::Error> {
        if d.is_human_readable() {
            let mut v = serde_json::Value::deserialize(d)?;
            match v.get_mut("op") {
                Some(tag @ serde_json::Value::String(_)) => {
                    let name = tag.as_str().unwrap_or_default();
                    let kind = OpKind::from_name(name)
                        .ok_or_else(|| D::Error::custom(format!("unknown op `{name}`")))?;
                    *tag = serde_tag(kind).into();
                }
                _ => return Err(D::Error::custom("an op needs an `op` name")),
            }
            strict(v, "an op").map_err(D::Error::custom)
        } else {
            BinOp::deserialize(d)?.into_op().map_err(D::Error::custom)
        }
    }
}

/// `TensorType` as its own serde form in human-readable formats, as a dtype and
/// dimension spellings otherwise.
mod type_repr {
    use super::{dims_from_text, dims_to_text, strict, DType, TensorType};
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct BinType {
        dtype: DType,
        dims: Vec<String>,
    }

    pub fn serialize<S: Serializer>(ty: &TensorType, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            ty.serialize(s)
        } else {
            BinType {
                dtype: ty.dtype,
                dims: dims_to_text(&ty.shape),
            }
            .serialize(s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TensorType, D::Error> {
        if d.is_human_readable() {
            strict(d, "a tensor type")
        } else {
            let b = BinType::deserialize(d)?;
            let dims = dims_from_text(&b.dims).map_err(D::Error::custom)?;
            Ok(TensorType::new(b.dtype, dims))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::text;

    #[test]
    fn json_round_trips_and_names_dangling_ops() {
        let src = "graph \"g\" {\n embed fwd {\n %0 = input {name=\"x\"} : f32[b,64]\n }\n layer.0 fwd {\n %1 = reshape(%0) {shape=[b*s/8,64]} : f32[b,64]\n }\n}\n";
        let g = text::parse(src).unwrap();
        let json = to_json(&g);
        assert_eq!(from_json(&json).unwrap(), g);
        let bad = json.replace(
            "\"inputs\": [\n        0\n      ]",
            "\"inputs\": [\n        5\n      ]",
        );
        assert_ne!(bad, json);
        let e = from_json(&bad).unwrap_err();
        assert!(
            e.to_string().contains("op1 (reshape): input 0 is %5"),
            "{e}"
        );
    }
}
