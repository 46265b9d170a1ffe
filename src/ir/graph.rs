//! The operator graph: ops on a petgraph `DiGraph`, tensors in a side table, typed ids.
//!
//! Each op has ordered inputs (tensors defined by other ops) and one or more results.
//! A tensor is named by [`TensorId`] (`%7` in the text format), an op by [`OpId`].
//! Ops are stored in definition order; [`GraphBuilder`] only lets an op use tensors
//! defined before it, so a built graph is in topological order. Graphs read from
//! JSON may be in any order and even cyclic; the verifier reports that.

use super::op::{Op, ShapeError};
use super::types::{Env, Role, TensorType};
use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Identifies an op of a [`Graph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpId(u32);

impl OpId {
    /// The op's position in definition order.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The id of the op at position `i`.
    pub fn from_index(i: usize) -> OpId {
        OpId(u32::try_from(i).expect("graphs hold fewer than 2^32 ops"))
    }

    fn node(self) -> NodeIndex {
        NodeIndex::new(self.index())
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op{}", self.0)
    }
}

/// Identifies a tensor (an op result) of a [`Graph`]; printed `%n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TensorId(u32);

impl TensorId {
    /// The tensor's position in definition order.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The id of the tensor at position `i`.
    pub fn from_index(i: usize) -> TensorId {
        TensorId(u32::try_from(i).expect("graphs hold fewer than 2^32 tensors"))
    }
}

impl fmt::Display for TensorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

/// Which repeated unit of the model an op belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Block {
    /// Token (and position) embedding.
    Embed,
    /// Transformer layer `i`.
    Layer(u32),
    /// Final norm, output projection and loss.
    Head,
}

impl Block {
    /// Order of blocks in a model: embed, layers, head.
    pub fn ordinal(self) -> u64 {
        match self {
            Block::Embed => 0,
            Block::Layer(i) => 1 + u64::from(i),
            Block::Head => u64::MAX,
        }
    }

    /// Parses the text spelling (`embed`, `layer.3`, `head`).
    pub fn parse(s: &str) -> Option<Block> {
        match s {
            "embed" => Some(Block::Embed),
            "head" => Some(Block::Head),
            _ => {
                let n = s.strip_prefix("layer.")?;
                if n.is_empty() || !n.bytes().all(|c| c.is_ascii_digit()) {
                    return None;
                }
                n.parse().ok().map(Block::Layer)
            }
        }
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Block::Embed => f.write_str("embed"),
            Block::Layer(i) => write!(f, "layer.{i}"),
            Block::Head => f.write_str("head"),
        }
    }
}

/// Which part of a training step an op belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Forward pass.
    Fwd,
    /// Backward pass.
    Bwd,
    /// Optimizer step.
    Opt,
}

impl Phase {
    /// Text spelling.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Fwd => "fwd",
            Phase::Bwd => "bwd",
            Phase::Opt => "opt",
        }
    }

    /// Parses the text spelling.
    pub fn parse(s: &str) -> Option<Phase> {
        [Phase::Fwd, Phase::Bwd, Phase::Opt]
            .into_iter()
            .find(|p| p.name() == s)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An op with its operands and placement tags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpNode {
    /// The operator.
    pub op: Op,
    /// Operands, in order.
    pub inputs: Vec<TensorId>,
    /// Results, in order.
    pub results: Vec<TensorId>,
    /// The block the op belongs to.
    pub block: Block,
    /// The step phase the op belongs to.
    pub phase: Phase,
}

/// A tensor: its type, role and defining op.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tensor {
    /// Type.
    pub ty: TensorType,
    /// Role.
    pub role: Role,
    /// The op that defines it.
    pub producer: OpId,
}

/// An operator graph. See the module docs.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    name: String,
    dag: DiGraph<OpNode, ()>,
    tensors: Vec<Tensor>,
    /// Consumers of each tensor, in op order (an op using a tensor twice appears twice).
    uses: Vec<Vec<OpId>>,
}

impl PartialEq for Graph {
    fn eq(&self, other: &Graph) -> bool {
        self.name == other.name
            && self.tensors == other.tensors
            && self.dag.node_count() == other.dag.node_count()
            && self
                .ops()
                .zip(other.ops())
                .all(|(a, b)| self.node(a) == other.node(b))
    }
}

impl Graph {
    /// An empty graph.
    pub fn new(name: impl Into<String>) -> Graph {
        Graph {
            name: name.into(),
            ..Graph::default()
        }
    }

    /// The graph's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renames the graph.
    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = name.into();
    }

    /// Number of ops.
    pub fn op_count(&self) -> usize {
        self.dag.node_count()
    }

    /// Number of tensors.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// Op ids in definition order.
    pub fn ops(&self) -> impl DoubleEndedIterator<Item = OpId> + ExactSizeIterator + '_ {
        (0..self.dag.node_count()).map(OpId::from_index)
    }

    /// Tensor ids in definition order.
    pub fn tensor_ids(&self) -> impl DoubleEndedIterator<Item = TensorId> + ExactSizeIterator + '_ {
        (0..self.tensors.len()).map(TensorId::from_index)
    }

    /// The op node.
    ///
    /// # Panics
    /// If `id` is not an op of this graph.
    pub fn node(&self, id: OpId) -> &OpNode {
        &self.dag[id.node()]
    }

    /// The operator of op `id`.
    pub fn op(&self, id: OpId) -> &Op {
        &self.node(id).op
    }

    /// The tensor record.
    ///
    /// # Panics
    /// If `id` is not a tensor of this graph.
    pub fn tensor(&self, id: TensorId) -> &Tensor {
        &self.tensors[id.index()]
    }

    /// The tensor record, if `id` belongs to this graph.
    pub fn get_tensor(&self, id: TensorId) -> Option<&Tensor> {
        self.tensors.get(id.index())
    }

    /// The type of tensor `id`.
    pub fn ty(&self, id: TensorId) -> &TensorType {
        &self.tensor(id).ty
    }

    /// Ops that read tensor `id`, in op order.
    pub fn uses(&self, id: TensorId) -> &[OpId] {
        &self.uses[id.index()]
    }

    /// Changes the role of a tensor (passes tag tensors as they derive them).
    pub fn set_role(&mut self, id: TensorId, role: Role) {
        self.tensors[id.index()].role = role;
    }

    /// The underlying petgraph (an edge `a → b` for each use of an `a` result by `b`).
    pub fn dag(&self) -> &DiGraph<OpNode, ()> {
        &self.dag
    }

    /// Ops in a topological order, or the id of an op on a cycle.
    ///
    /// # Errors
    /// The id of an op on a cycle, when the graph has one.
    pub fn topo_order(&self) -> Result<Vec<OpId>, OpId> {
        petgraph::algo::toposort(&self.dag, None)
            .map(|v| v.into_iter().map(|n| OpId::from_index(n.index())).collect())
            .map_err(|c| OpId::from_index(c.node_id().index()))
    }

    /// Appends an op without checking its inputs or result types. `results` gives the
    /// type and role of each result. Inputs may name tensors not yet defined (they must
    /// be defined before the graph is used); call [`Graph::link`] once all ops are in.
    pub fn push_unchecked(
        &mut self,
        op: Op,
        inputs: Vec<TensorId>,
        results: Vec<(TensorType, Role)>,
        block: Block,
        phase: Phase,
    ) -> OpId {
        let id = OpId::from_index(self.dag.node_count());
        let first = self.tensors.len();
        for (ty, role) in results {
            self.tensors.push(Tensor {
                ty,
                role,
                producer: id,
            });
            self.uses.push(Vec::new());
        }
        let results = (first..self.tensors.len())
            .map(TensorId::from_index)
            .collect();
        self.dag.add_node(OpNode {
            op,
            inputs,
            results,
            block,
            phase,
        });
        id
    }

    /// Rebuilds the use lists and the petgraph edges from the ops' inputs. Returns the
    /// first input that names no tensor, if any (that op keeps no edge for it).
    ///
    /// # Errors
    /// The first `(op, input)` whose input names no tensor of the graph; the other inputs'
    /// links are rebuilt all the same.
    pub fn link(&mut self) -> Result<(), (OpId, TensorId)> {
        self.dag.clear_edges();
        for u in &mut self.uses {
            u.clear();
        }
        let mut dangling = None;
        for i in 0..self.dag.node_count() {
            let id = OpId::from_index(i);
            for k in 0..self.dag[id.node()].inputs.len() {
                let t = self.dag[id.node()].inputs[k];
                match self.tensors.get(t.index()) {
                    Some(tensor) => {
                        let from = tensor.producer.node();
                        self.dag.update_edge(from, id.node(), ());
                        self.uses[t.index()].push(id);
                    }
                    None => {
                        dangling.get_or_insert((id, t));
                    }
                }
            }
        }
        dangling.map_or(Ok(()), Err)
    }

    /// Input types of op `id`.
    ///
    /// # Panics
    /// If an input is dangling (the verifier reports those first).
    pub fn input_types(&self, id: OpId) -> Vec<&TensorType> {
        self.node(id).inputs.iter().map(|&t| self.ty(t)).collect()
    }

    /// Result types of op `id`.
    pub fn result_types(&self, id: OpId) -> Vec<&TensorType> {
        self.node(id).results.iter().map(|&t| self.ty(t)).collect()
    }

    /// FLOPs and bytes of op `id` under `env` (`None` on overflow).
    pub fn op_cost(&self, id: OpId, env: Env) -> Option<super::op::OpCost> {
        self.op(id)
            .cost(&self.input_types(id), &self.result_types(id), env)
    }

    /// Total FLOPs of the graph under `env`.
    pub fn total_flops(&self, env: Env) -> Option<u64> {
        self.ops().try_fold(0u64, |acc, id| {
            acc.checked_add(self.op_cost(id, env)?.flops)
        })
    }

    /// Finds the op that defines the parameter, input or state called `name`.
    pub fn find_source(&self, name: &str) -> Option<OpId> {
        self.ops().find(|&id| match self.op(id) {
            Op::Param { name: n } | Op::Input { name: n } | Op::State { name: n } => n == name,
            _ => false,
        })
    }
}

/// Builds a graph op by op, inferring result types; the usual way to make graphs.
#[derive(Debug)]
pub struct GraphBuilder {
    graph: Graph,
    block: Block,
    phase: Phase,
}

impl GraphBuilder {
    /// Starts an empty graph.
    pub fn new(name: impl Into<String>) -> GraphBuilder {
        GraphBuilder {
            graph: Graph::new(name),
            block: Block::Embed,
            phase: Phase::Fwd,
        }
    }

    /// Continues building on an existing graph (tagging new ops with the given block).
    pub fn extend(graph: Graph) -> GraphBuilder {
        GraphBuilder {
            graph,
            block: Block::Embed,
            phase: Phase::Fwd,
        }
    }

    /// Tags the following ops with `block`.
    pub fn set_block(&mut self, block: Block) {
        self.block = block;
    }

    /// Tags the following ops with `phase`.
    pub fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
    }

    /// The current block tag.
    pub fn block(&self) -> Block {
        self.block
    }

    /// The graph so far.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The type of a tensor built so far.
    pub fn ty(&self, t: TensorId) -> &TensorType {
        self.graph.ty(t)
    }

    /// Adds a source op (input, param, state, constant, recv) with a declared type.
    pub fn source(&mut self, op: Op, ty: TensorType, role: Role) -> TensorId {
        debug_assert!(op.is_source());
        let id = self
            .graph
            .push_unchecked(op, vec![], vec![(ty, role)], self.block, self.phase);
        self.graph.node(id).results[0]
    }

    /// A data input (role: activation).
    pub fn input(&mut self, name: &str, ty: TensorType) -> TensorId {
        self.source(
            Op::Input {
                name: name.to_string(),
            },
            ty,
            Role::Activation,
        )
    }

    /// A parameter (role: param).
    pub fn param(&mut self, name: &str, ty: TensorType) -> TensorId {
        self.source(
            Op::Param {
                name: name.to_string(),
            },
            ty,
            Role::Param,
        )
    }

    /// Adds an op, inferring its result types; results take `role`.
    ///
    /// # Panics
    /// If an input is not a tensor of this graph (a builder bug, not an input error).
    ///
    /// # Errors
    /// A [`ShapeError`] when `op` rejects the input types (see [`Op::infer`]); nothing is
    /// added then.
    pub fn add_with_role(
        &mut self,
        op: Op,
        inputs: &[TensorId],
        role: Role,
    ) -> Result<Vec<TensorId>, ShapeError> {
        let types: Vec<&TensorType> = inputs.iter().map(|&t| self.graph.ty(t)).collect();
        let results = op.infer(&types)?.unwrap_or_default();
        let id = self.graph.push_unchecked(
            op,
            inputs.to_vec(),
            results.into_iter().map(|t| (t, role)).collect(),
            self.block,
            self.phase,
        );
        for &t in inputs {
            let from = self.graph.tensor(t).producer.node();
            self.graph.dag.update_edge(from, id.node(), ());
            self.graph.uses[t.index()].push(id);
        }
        Ok(self.graph.node(id).results.clone())
    }

    /// Adds an op whose results are activations (forward) or temporaries (backward).
    ///
    /// # Errors
    /// As [`add_with_role`](Self::add_with_role).
    pub fn add(&mut self, op: Op, inputs: &[TensorId]) -> Result<Vec<TensorId>, ShapeError> {
        let role = match self.phase {
            Phase::Fwd => Role::Activation,
            Phase::Bwd | Phase::Opt => Role::Temporary,
        };
        self.add_with_role(op, inputs, role)
    }

    /// Adds a single-result op and returns its result.
    ///
    /// # Errors
    /// As [`add`](Self::add), and a [`ShapeError`] when the op has no result (the op stays
    /// in the graph).
    pub fn add1(&mut self, op: Op, inputs: &[TensorId]) -> Result<TensorId, ShapeError> {
        let name = op.name();
        let r = self.add(op, inputs)?;
        r.first().copied().ok_or_else(|| ShapeError {
            op: name,
            inputs: vec![],
            reason: "has no result".into(),
        })
    }

    /// Changes the role of a tensor.
    pub fn set_role(&mut self, t: TensorId, role: Role) {
        self.graph.set_role(t, role);
    }

    /// Copies op `id` of `src` with new `inputs` (tensors of this builder), keeping its
    /// result types and roles, under the builder's current block and phase tags.
    /// Sources keep their declared types; other ops re-infer theirs.
    ///
    /// # Errors
    /// A [`ShapeError`] when a non-source op rejects the types of `inputs`.
    pub fn copy_op(
        &mut self,
        src: &Graph,
        id: OpId,
        inputs: &[TensorId],
    ) -> Result<Vec<TensorId>, ShapeError> {
        let node = src.node(id);
        let results = if node.op.is_source() {
            let t = node.results[0];
            vec![self.source(node.op.clone(), src.ty(t).clone(), src.tensor(t).role)]
        } else {
            self.add_with_role(node.op.clone(), inputs, Role::Activation)?
        };
        for (&new, &old) in results.iter().zip(&node.results) {
            self.graph.set_role(new, src.tensor(old).role);
        }
        Ok(results)
    }

    /// Finishes the graph.
    pub fn finish(self) -> Graph {
        self.graph
    }
}
