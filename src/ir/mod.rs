//! The operator-level IR: tensor types, the closed op set, the graph, the verifier,
//! and the text, JSON and binary formats.
//!
//! # Semantics
//!
//! A [`Graph`] is one training step (or its forward part) of one model replica, or,
//! after sharding, of one device. Each op reads tensors and defines one or more new
//! tensors; nothing is mutated except by [`Op::AdamW`], whose results are the updated
//! parameter and moments. Shapes may mention the symbols `b` (micro-batch size) and
//! `s` (sequence length); an [`Env`] binds them to compute sizes, FLOPs and bytes.
//!
//! A graph is **valid** when the [`verify`](mod@verify) invariants hold: acyclic, every input
//! defined, arities and attributes as in the op table, every result type equal to the
//! type inferred from its inputs, no zero-sized dimension, every tensor's byte size
//! representable, and blocks/phases ordered.

pub mod codec;
#[cfg(feature = "testing")]
pub mod gen;
mod graph;
pub mod json;
mod op;
pub mod text;
mod types;
pub mod verify;

pub use graph::{Block, Graph, GraphBuilder, OpId, OpNode, Phase, Tensor, TensorId};
pub use op::{
    attention_pairs, flops_per_element, moe_rows, split_dim, Arity, AttrError, AttrValue, Gemm, Op,
    OpClass, OpCost, OpInfo, OpKind, Saved, ShapeError, FP8_GEMM_OUT,
};
pub use types::{DType, Dim, Env, Role, Shape, TensorType};
pub use verify::{verify, verify_with, VerifyError, VerifyErrors, VerifyOptions};
