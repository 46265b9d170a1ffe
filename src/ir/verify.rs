//! The verifier: the one place that decides whether a [`Graph`] is valid.
//!
//! Invariants, each reported with the op id, the op and the types involved:
//!
//! 1. **Defined inputs.** Every input names a tensor of the graph.
//! 2. **Acyclic.** The use graph has no cycle.
//! 3. **Definition order.** Every input is defined by an earlier op, so passes can
//!    walk ops in storage order.
//! 4. **Arity and results.** Input and result counts match the op table.
//! 5. **Types.** For every non-source op the result types equal the types inferred
//!    from its inputs and attributes (dtype, shape and attribute rules of the op table).
//! 6. **No zero dims.** No tensor and no shape attribute has a zero-sized dimension.
//! 7. **Representable sizes.** Every tensor's byte size fits in 64 bits when `b` and `s`
//!    are bound to [`VerifyOptions::env`] (fractional per-device dimensions such as
//!    `s/8` rounded up: they are whole once the sequence length divides).
//! 8. **Phases flow forward.** A forward op reads no backward or optimizer result; a
//!    backward op reads no optimizer result.
//! 9. **Blocks flow forward.** A forward op reads no forward result of a later block.
//! 10. **Unique names.** Parameter, input and state names are unique.
//! 11. **Consistent records.** Each tensor's producer lists it among its results.
//!
//! [`verify`] collects every violation instead of stopping at the first.

use super::graph::{Graph, OpId, Phase, TensorId};
use super::types::Env;
use super::Op;
use std::collections::BTreeMap;
use std::fmt;
use thiserror::Error;

/// One violated invariant.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum VerifyError {
    /// An input names no tensor.
    #[error("{op} ({name}): input {index} is {tensor}, which is not defined")]
    Dangling {
        /// Offending op.
        op: OpId,
        /// Its name.
        name: &'static str,
        /// Input position.
        index: usize,
        /// The missing tensor.
        tensor: TensorId,
    },
    /// The graph has a cycle through this op.
    #[error("{op} ({name}): lies on a cycle")]
    Cycle {
        /// An op on the cycle.
        op: OpId,
        /// Its name.
        name: &'static str,
    },
    /// An input defined by a later op.
    #[error("{op} ({name}): input {tensor} is defined later, by {producer}")]
    UseBeforeDef {
        /// Offending op.
        op: OpId,
        /// Its name.
        name: &'static str,
        /// The input.
        tensor: TensorId,
        /// Its producer.
        producer: OpId,
    },
    /// Wrong number of results.
    #[error("{op} ({name}): has {got} results, the op table says {expected}")]
    ResultCount {
        /// Offending op.
        op: OpId,
        /// Its name.
        name: &'static str,
        /// Count found.
        got: usize,
        /// Count expected.
        expected: usize,
    },
    /// Shape, dtype or attribute rule broken (arity included).
    #[error("{op}: {source}")]
    Shape {
        /// Offending op.
        op: OpId,
        /// What the op's rules say.
        source: super::op::ShapeError,
    },
    /// Declared result type differs from the inferred one.
    #[error(
        "{op} ({name}): result {tensor} is declared {declared} but its inputs give {inferred}"
    )]
    TypeMismatch {
        /// Offending op.
        op: OpId,
        /// Its name.
        name: &'static str,
        /// The result.
        tensor: TensorId,
        /// Declared type.
        declared: String,
        /// Inferred type.
        inferred: String,
    },
    /// A zero-sized dimension.
    #[error("{op} ({name}): {what} has a zero-sized dimension: {ty}")]
    ZeroDim {
        /// Offending op.
        op: OpId,
        /// Its name.
        name: &'static str,
        /// Which tensor or attribute.
        what: String,
        /// The type or shape.
        ty: String,
    },
    /// A tensor whose byte size overflows 64 bits.
    #[error("{op} ({name}): result {tensor} of type {ty} is too large to count in bytes at b={}, s={}", env.batch, env.seq)]
    Overflow {
        /// Offending op.
        op: OpId,
        /// Its name.
        name: &'static str,
        /// The tensor.
        tensor: TensorId,
        /// Its type.
        ty: String,
        /// The environment used.
        env: Env,
    },
    /// A use against the phase or block order.
    #[error("{op} ({name}, {phase} {block}): reads {tensor} from a later {what} ({other})")]
    Order {
        /// Offending op.
        op: OpId,
        /// Its name.
        name: &'static str,
        /// The op's phase.
        phase: Phase,
        /// The op's block.
        block: String,
        /// The input.
        tensor: TensorId,
        /// "phase" or "block".
        what: &'static str,
        /// The producer's phase or block.
        other: String,
    },
    /// Two sources share a name.
    #[error("{op} ({name}): name {source_name:?} is already defined by {first}")]
    DuplicateName {
        /// Offending op.
        op: OpId,
        /// Its name.
        name: &'static str,
        /// The duplicated name.
        source_name: String,
        /// First definition.
        first: OpId,
    },
    /// Internal tables disagree.
    #[error("{tensor}: producer {producer} does not list it as a result")]
    Inconsistent {
        /// The tensor.
        tensor: TensorId,
        /// Its recorded producer.
        producer: OpId,
    },
}

impl VerifyError {
    /// The op the error points at, if any.
    pub fn op(&self) -> Option<OpId> {
        match self {
            VerifyError::Dangling { op, .. }
            | VerifyError::Cycle { op, .. }
            | VerifyError::UseBeforeDef { op, .. }
            | VerifyError::ResultCount { op, .. }
            | VerifyError::Shape { op, .. }
            | VerifyError::TypeMismatch { op, .. }
            | VerifyError::ZeroDim { op, .. }
            | VerifyError::Overflow { op, .. }
            | VerifyError::Order { op, .. }
            | VerifyError::DuplicateName { op, .. } => Some(*op),
            VerifyError::Inconsistent { producer, .. } => Some(*producer),
        }
    }
}

/// All violations of one graph.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub struct VerifyErrors(pub Vec<VerifyError>);

impl fmt::Display for VerifyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} verifier error(s)", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// Options of the verifier.
#[derive(Clone, Copy, Debug)]
pub struct VerifyOptions {
    /// Binding of `b` and `s` under which byte sizes must be representable.
    pub env: Env,
}

impl Default for VerifyOptions {
    fn default() -> VerifyOptions {
        VerifyOptions {
            env: Env::new(1, 1),
        }
    }
}

/// Checks every invariant of the module docs with default options.
///
/// # Errors
/// As [`verify_with`].
pub fn verify(g: &Graph) -> Result<(), VerifyErrors> {
    verify_with(g, VerifyOptions::default())
}

/// Checks every invariant of the module docs.
///
/// # Errors
/// [`VerifyErrors`] listing every broken invariant, each with the op or tensor it is
/// about.
pub fn verify_with(g: &Graph, opts: VerifyOptions) -> Result<(), VerifyErrors> {
    let mut errs = Vec::new();
    let mut dangling = false;

    for id in g.ops() {
        let node = g.node(id);
        let name = node.op.name();
        for (index, &t) in node.inputs.iter().enumerate() {
            if g.get_tensor(t).is_none() {
                errs.push(VerifyError::Dangling {
                    op: id,
                    name,
                    index,
                    tensor: t,
                });
                dangling = true;
            }
        }
    }
    for t in g.tensor_ids() {
        let producer = g.tensor(t).producer;
        if producer.index() >= g.op_count() || !g.node(producer).results.contains(&t) {
            errs.push(VerifyError::Inconsistent {
                tensor: t,
                producer,
            });
            dangling = true;
        }
    }
    if dangling {
        return Err(VerifyErrors(errs));
    }

    let cyclic = match g.topo_order() {
        Ok(_) => false,
        Err(op) => {
            errs.push(VerifyError::Cycle {
                op,
                name: g.op(op).name(),
            });
            true
        }
    };

    let mut names: BTreeMap<&str, OpId> = BTreeMap::new();
    for id in g.ops() {
        let node = g.node(id);
        let name = node.op.name();

        if !cyclic {
            for &t in &node.inputs {
                let producer = g.tensor(t).producer;
                if producer >= id {
                    errs.push(VerifyError::UseBeforeDef {
                        op: id,
                        name,
                        tensor: t,
                        producer,
                    });
                }
            }
        }

        if node.results.len() != node.op.result_count() {
            errs.push(VerifyError::ResultCount {
                op: id,
                name,
                got: node.results.len(),
                expected: node.op.result_count(),
            });
        }

        let inputs = g.input_types(id);
        match node.op.infer(&inputs) {
            Err(source) => errs.push(VerifyError::Shape { op: id, source }),
            Ok(Some(inferred)) => {
                for (&t, inf) in node.results.iter().zip(&inferred) {
                    if g.ty(t) != inf {
                        errs.push(VerifyError::TypeMismatch {
                            op: id,
                            name,
                            tensor: t,
                            declared: g.ty(t).to_string(),
                            inferred: inf.to_string(),
                        });
                    }
                }
            }
            Ok(None) => {}
        }

        let shape_attr = match &node.op {
            Op::Reshape { shape } | Op::Broadcast { shape, .. } => Some(shape),
            _ => None,
        };
        if let Some(shape) = shape_attr.filter(|s| s.dims().iter().any(|d| d.is_zero())) {
            errs.push(VerifyError::ZeroDim {
                op: id,
                name,
                what: "attribute `shape`".into(),
                ty: shape.to_string(),
            });
        }
        for &t in &node.results {
            let ty = g.ty(t);
            if ty.shape.dims().iter().any(|d| d.is_zero()) {
                errs.push(VerifyError::ZeroDim {
                    op: id,
                    name,
                    what: format!("result {t}"),
                    ty: ty.to_string(),
                });
            } else if ty.bytes_at_ceil(opts.env).is_none() {
                errs.push(VerifyError::Overflow {
                    op: id,
                    name,
                    tensor: t,
                    ty: ty.to_string(),
                    env: opts.env,
                });
            }
        }

        for &t in &node.inputs {
            let p = g.node(g.tensor(t).producer);
            if p.phase > node.phase {
                errs.push(VerifyError::Order {
                    op: id,
                    name,
                    phase: node.phase,
                    block: node.block.to_string(),
                    tensor: t,
                    what: "phase",
                    other: p.phase.to_string(),
                });
            } else if node.phase == Phase::Fwd
                && p.phase == Phase::Fwd
                && p.block.ordinal() > node.block.ordinal()
            {
                errs.push(VerifyError::Order {
                    op: id,
                    name,
                    phase: node.phase,
                    block: node.block.to_string(),
                    tensor: t,
                    what: "block",
                    other: p.block.to_string(),
                });
            }
        }

        if let Op::Param { name: n } | Op::Input { name: n } | Op::State { name: n } = &node.op {
            match names.get(n.as_str()) {
                Some(&first) => errs.push(VerifyError::DuplicateName {
                    op: id,
                    name,
                    source_name: n.clone(),
                    first,
                }),
                None => {
                    names.insert(n, id);
                }
            }
        }
    }

    if errs.is_empty() {
        Ok(())
    } else {
        Err(VerifyErrors(errs))
    }
}
