//! Recomputation insertion: clones forward ops into the backward pass so that the
//! backward reads recomputed tensors instead of saved ones.
//!
//! * **full** — every forward op of a selected layer is cloned right before the
//!   layer's first backward op; the layer's backward reads only clones, so the only
//!   forward tensor of the layer still kept is what later layers read (its output,
//!   the next layer's checkpoint).
//! * **selective** — the attention core (ops whose result has two sequence-length
//!   dimensions: `QKᵀ`, softmax, attention dropout) is cloned right before the first
//!   backward op that reads it (Korthikanti et al. 2022, Sec. 4.2).
//! * **selective by modules** — Megatron-LM's `--recompute-granularity selective
//!   --recompute-modules …` ([`RecomputeModules`]): each module's ops are cloned as one
//!   group right before the first backward op that reads one of them, so a module's
//!   recomputed tensors live only through its own backward:
//!   - `core_attn`: the attention core, as above;
//!   - `mlp`: the pre-MLP norm (Transformer Engine's `linear_fc1` fuses it, so
//!     Megatron-LM's MLP checkpoint starts at the norm's input) and every op that
//!     depends only on it and on weights: the sequence-parallel gather, the up/gate
//!     projections, the activation, the product, the down projection and its
//!     tensor-parallel reduction (not the dropout and residual add after it, Megatron's
//!     `mlp_bda`). Only the norm's input, the residual stream, stays saved;
//!   - `layernorm`: the layer's norm ops (`input_layernorm`, `pre_mlp_layernorm`),
//!     whose inputs stay saved and whose outputs are recomputed. An op two requested
//!     modules claim goes to the first of `core_attn`, `mlp`, `layernorm` (the pre-MLP
//!     norm is the MLP's with both).
//!
//!   The pre-MLP norm is the layer's last norm op, when the layer has two or more; a
//!   module that claims no op in any layer is reported in [`Recomputed::idle`].
//!
//! What "selective" saves is the engine's choice ([`Selective`]): Megatron-LM
//! recomputes the attention core unless given modules; torchtitan's per-op selective
//! checkpointing recomputes everything but every other linear layer and the attention
//! kernels.
//!
//! Embedding and head blocks are never recomputed.

use super::Recompute;
use crate::ir::{Block, Graph, GraphBuilder, Op, OpId, Phase, ShapeError, TensorId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// A submodule of Megatron-LM's `--recompute-modules` (`recompute_modules` in
/// `megatron/core/transformer/transformer_config.py`, `d98e8a6`).
///
/// apar recomputes the dense-model modules on the real graph (see [`apply_with`] for
/// which ops each one reruns); the mixture-of-experts and multi-latent-attention modules
/// are listed so that asking for them gets a clear refusal, not a parse error: apar has
/// no MoE or MLA layers yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RecomputeModule {
    /// `core_attn`: the attention core (`QKᵀ`, softmax, dropout, `·V`), checkpointed
    /// (`tensor_parallel.checkpoint` around `core_attention` in `attention.py`).
    CoreAttn,
    /// `mlp`: the whole dense MLP, checkpointed (`tensor_parallel.checkpoint` around
    /// `self.mlp` in `transformer_layer.py`); Transformer Engine's `linear_fc1` fuses the
    /// pre-MLP norm, so the norm and the sequence-parallel gather are rerun too.
    Mlp,
    /// `layernorm`: `input_layernorm` and `pre_mlp_layernorm` with an output-discarding
    /// checkpoint (`CheckpointWithoutOutput`): the norm's input is kept, its output
    /// dropped after the forward and recomputed in backward.
    Layernorm,
    /// `moe_act` (future: no MoE layers in apar).
    MoeAct,
    /// `moe` (future).
    Moe,
    /// `shared_experts` (future).
    SharedExperts,
    /// `mla_up_proj` (future: no multi-latent attention in apar).
    MlaUpProj,
}

impl RecomputeModule {
    /// Every module, in the order Megatron-LM's documentation lists them.
    pub const ALL: [RecomputeModule; 7] = [
        RecomputeModule::CoreAttn,
        RecomputeModule::MoeAct,
        RecomputeModule::Layernorm,
        RecomputeModule::MlaUpProj,
        RecomputeModule::Mlp,
        RecomputeModule::Moe,
        RecomputeModule::SharedExperts,
    ];

    /// Megatron-LM's spelling.
    pub fn name(self) -> &'static str {
        match self {
            RecomputeModule::CoreAttn => "core_attn",
            RecomputeModule::Mlp => "mlp",
            RecomputeModule::Layernorm => "layernorm",
            RecomputeModule::MoeAct => "moe_act",
            RecomputeModule::Moe => "moe",
            RecomputeModule::SharedExperts => "shared_experts",
            RecomputeModule::MlaUpProj => "mla_up_proj",
        }
    }

    /// Whether apar models this module (a dense-model module); the others need MoE or
    /// multi-latent-attention layers.
    pub fn is_modelled(self) -> bool {
        matches!(
            self,
            RecomputeModule::CoreAttn | RecomputeModule::Mlp | RecomputeModule::Layernorm
        )
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for RecomputeModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A module name that is not one of Megatron-LM's `--recompute-modules` choices.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModulesError {
    /// An unknown name.
    #[error("unknown recompute module `{0}` (core_attn, mlp, layernorm; moe_act, moe, shared_experts, mla_up_proj are Megatron-LM's MoE/MLA modules)")]
    Unknown(String),
    /// An empty list.
    #[error("empty list of recompute modules (give at least one: core_attn or mlp; layernorm only where the engine keeps separate norm ops)")]
    Empty,
    /// A name given twice.
    #[error("recompute module `{0}` given twice")]
    Repeated(RecomputeModule),
}

impl FromStr for RecomputeModule {
    type Err = ModulesError;
    fn from_str(s: &str) -> Result<RecomputeModule, ModulesError> {
        RecomputeModule::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| ModulesError::Unknown(s.to_string()))
    }
}

/// A non-empty set of [`RecomputeModule`]s: the value of Megatron-LM's
/// `--recompute-modules`. Printed and serialized in Megatron-LM's documentation order
/// (`core_attn,layernorm,mlp`), as a comma-separated list ([`fmt::Display`],
/// [`FromStr`]) or a JSON array of names.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecomputeModules(u8);

impl RecomputeModules {
    /// The set of `modules` (`None` when empty).
    pub fn new(modules: impl IntoIterator<Item = RecomputeModule>) -> Option<RecomputeModules> {
        let bits = modules.into_iter().fold(0, |acc, m| acc | m.bit());
        (bits != 0).then_some(RecomputeModules(bits))
    }

    /// Whether `m` is in the set.
    pub fn contains(self, m: RecomputeModule) -> bool {
        self.0 & m.bit() != 0
    }

    /// The modules, in Megatron-LM's documentation order.
    pub fn iter(self) -> impl Iterator<Item = RecomputeModule> {
        RecomputeModule::ALL
            .into_iter()
            .filter(move |&m| self.contains(m))
    }

    /// Megatron-LM's default, `core_attn` (`recompute_modules = ["core_attn"]` when
    /// unset).
    pub fn core_attn() -> RecomputeModules {
        RecomputeModules(RecomputeModule::CoreAttn.bit())
    }
}

impl fmt::Debug for RecomputeModules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl fmt::Display for RecomputeModules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(RecomputeModule::name).collect();
        f.write_str(&names.join(","))
    }
}

impl FromStr for RecomputeModules {
    type Err = ModulesError;
    /// A comma-separated list (`core_attn,mlp`); every name once, at least one.
    fn from_str(s: &str) -> Result<RecomputeModules, ModulesError> {
        let mut bits = 0u8;
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let m: RecomputeModule = name.parse()?;
            if bits & m.bit() != 0 {
                return Err(ModulesError::Repeated(m));
            }
            bits |= m.bit();
        }
        (bits != 0)
            .then_some(RecomputeModules(bits))
            .ok_or(ModulesError::Empty)
    }
}

impl Serialize for RecomputeModules {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // A list of known length: the binary codec (bincode) refuses a sequence whose
        // iterator cannot say how long it is.
        let names: Vec<&str> = self.iter().map(RecomputeModule::name).collect();
        names.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RecomputeModules {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RecomputeModules, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        names.join(",").parse().map_err(serde::de::Error::custom)
    }
}

/// Which forward ops selective recomputation reruns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Selective {
    /// The attention core (ops with an `s×s` result), cloned before the first
    /// backward op that reads it: Megatron-LM's `--recompute-granularity selective`
    /// (Korthikanti et al. 2022, Sec. 4.2).
    #[default]
    AttentionCore,
    /// torchtitan's per-op selective checkpointing (`SelectiveAC` with the op policy,
    /// `torchtitan/distributed/activation_checkpoint.py`): the outputs of attention
    /// kernels, of batched matmuls, of reduce-scatters and of every odd-numbered
    /// linear layer of a block are saved, every even-numbered linear layer and every
    /// other op is recomputed before the layer's backward. (apar's fused QKV
    /// projection counts as one linear layer where torchtitan's Llama has three.)
    PerOp,
    /// Megatron-LM's `--recompute-modules` (see the module documentation for the ops
    /// of each module).
    Modules(RecomputeModules),
}

/// Whether a tensor type is `s×s`-shaped (two dimensions mention the sequence length).
fn is_quadratic(g: &Graph, t: TensorId) -> bool {
    let dims = g.ty(t).shape.dims();
    dims.iter().filter(|d| d.has_seq()).count() >= 2
}

/// A graph with recomputation and the clone ops it added.
#[derive(Clone, Debug)]
pub struct Recomputed {
    /// The transformed graph.
    pub graph: Graph,
    /// The backward-phase clones of forward ops.
    pub clones: BTreeSet<OpId>,
    /// With [`Selective::Modules`], the requested modules that claimed no op in any
    /// recomputed layer (they would recompute nothing); `None` when there are none or
    /// without modules.
    pub idle: Option<RecomputeModules>,
}

/// Applies `policy` to the layers for which `select` returns true, with Megatron-LM's
/// selective policy ([`Selective::AttentionCore`]).
///
/// # Errors
///
/// A [`ShapeError`] when a cloned op rejects its inputs (an internal inconsistency).
pub fn apply(
    g: &Graph,
    policy: Recompute,
    select: impl Fn(u32) -> bool,
) -> Result<Recomputed, ShapeError> {
    apply_with(g, policy, Selective::AttentionCore, select)
}

/// Whether op `id` reads a parameter directly (a linear layer's matmul).
fn reads_param(g: &Graph, id: OpId) -> bool {
    g.node(id)
        .inputs
        .iter()
        .any(|&t| matches!(g.op(g.tensor(t).producer), Op::Param { .. }))
}

fn is_norm(op: &Op) -> bool {
    matches!(op, Op::RmsNorm { .. } | Op::LayerNorm { .. })
}

/// The module each forward op of one layer belongs to (`None`: no requested module),
/// for the forward ops `ops` of the layer in graph order.
fn claim_modules(
    g: &Graph,
    ops: &[OpId],
    modules: RecomputeModules,
) -> BTreeMap<OpId, RecomputeModule> {
    use RecomputeModule::{CoreAttn, Layernorm, Mlp};
    let mut out = BTreeMap::new();
    // Tensors computed from weights alone (parameters, states, constants and ops of
    // this layer on them only: tensor-parallel copies, FP8 weight casts).
    let mut weight_like: BTreeSet<TensorId> = BTreeSet::new();
    for &id in ops {
        let node = g.node(id);
        let from_weights = match node.op {
            Op::Param { .. } | Op::State { .. } | Op::Constant { .. } => true,
            Op::Input { .. } | Op::Recv { .. } => false,
            _ => {
                !node.inputs.is_empty()
                    && node.inputs.iter().all(|t| {
                        weight_like.contains(t)
                            || matches!(
                                g.op(g.tensor(*t).producer),
                                Op::Param { .. } | Op::State { .. } | Op::Constant { .. }
                            )
                    })
            }
        };
        if from_weights {
            weight_like.extend(node.results.iter().copied());
        }
    }
    let is_weight = |t: &TensorId| {
        weight_like.contains(t)
            || matches!(
                g.op(g.tensor(*t).producer),
                Op::Param { .. } | Op::State { .. } | Op::Constant { .. }
            )
    };
    if modules.contains(CoreAttn) {
        for &id in ops {
            if g.node(id).results.iter().any(|&r| is_quadratic(g, r)) {
                out.insert(id, CoreAttn);
            }
        }
    }
    let norms: Vec<OpId> = ops
        .iter()
        .copied()
        .filter(|&id| is_norm(g.op(id)))
        .collect();
    // Megatron-LM checkpoints `self.mlp` for `mlp` only in dense layers
    // (`transformer_layer.py`: `if "mlp" in recompute_modules: if not
    // self.is_moe_layer`); a mixture-of-experts layer has its own modules (`moe`,
    // `moe_act`), which apar does not offer.
    let moe_layer = ops.iter().any(|&id| {
        matches!(
            g.op(id),
            Op::MoeRoute { .. } | Op::MoeDispatch { .. } | Op::GroupedMatMul { .. }
        )
    });
    if modules.contains(Mlp) && norms.len() >= 2 && !moe_layer {
        let root = norms[norms.len() - 1];
        let mut mlp_tensors: BTreeSet<TensorId> = BTreeSet::new();
        for &id in ops.iter().skip_while(|&&id| id != root) {
            let node = g.node(id);
            let joins = id == root
                || (!matches!(node.op, Op::Dropout { .. })
                    && node.inputs.iter().any(|t| mlp_tensors.contains(t))
                    && node
                        .inputs
                        .iter()
                        .all(|t| mlp_tensors.contains(t) || is_weight(t)));
            if joins {
                mlp_tensors.extend(node.results.iter().copied());
                out.entry(id).or_insert(Mlp);
            }
        }
    }
    if modules.contains(Layernorm) {
        for &id in &norms {
            out.entry(id).or_insert(Layernorm);
        }
    }
    out
}

/// [`apply`] with the engine's meaning of selective recomputation.
///
/// # Errors
///
/// As [`apply`].
pub fn apply_with(
    g: &Graph,
    policy: Recompute,
    selective: Selective,
    select: impl Fn(u32) -> bool,
) -> Result<Recomputed, ShapeError> {
    let per_op = policy == Recompute::Selective && selective == Selective::PerOp;
    let modules = match (policy, selective) {
        (Recompute::Selective, Selective::Modules(m)) => Some(m),
        _ => None,
    };
    if policy == Recompute::None {
        return Ok(Recomputed {
            graph: g.clone(),
            clones: BTreeSet::new(),
            idle: None,
        });
    }
    let mut clones = BTreeSet::new();
    // The clone group of each forward op to clone (`Some(0)` for full and per-op
    // recomputation and the attention core; the module's index with modules).
    let mut group: Vec<Option<u8>> = vec![None; g.op_count()];
    // Linear layers seen so far in each layer (per-op policy).
    let mut linears: BTreeMap<u32, u32> = Default::default();
    // Forward ops of each selected layer, in graph order (module policy).
    let mut layer_ops: BTreeMap<u32, Vec<OpId>> = Default::default();
    for id in g.ops() {
        let node = g.node(id);
        let Block::Layer(i) = node.block else {
            continue;
        };
        if node.phase != Phase::Fwd || !select(i) {
            continue;
        }
        if modules.is_some() {
            layer_ops.entry(i).or_default().push(id);
            continue;
        }
        if node.op.is_source() {
            continue;
        }
        let cloned = match policy {
            Recompute::None => false,
            Recompute::Full => true,
            Recompute::Selective if per_op => match node.op {
                Op::MatMul { .. } if reads_param(g, id) => {
                    let n = linears.entry(i).or_default();
                    *n += 1;
                    *n % 2 == 0
                }
                Op::MatMul { .. }
                | Op::FlashAttention { .. }
                | Op::ReduceScatter { .. }
                | Op::AllToAll { .. } => false,
                _ => true,
            },
            Recompute::Selective => node.results.iter().any(|&r| is_quadratic(g, r)),
        };
        if cloned {
            group[id.index()] = Some(0);
        }
    }
    let mut idle = None;
    if let Some(m) = modules {
        let mut used = BTreeSet::new();
        for ops in layer_ops.values() {
            for (id, module) in claim_modules(g, ops, m) {
                if !g.op(id).is_source() {
                    group[id.index()] = Some(module as u8);
                    used.insert(module);
                }
            }
        }
        idle = RecomputeModules::new(m.iter().filter(|x| !used.contains(x)));
    }
    let mut by_group: BTreeMap<(Block, u8), Vec<OpId>> = Default::default();
    for id in g.ops() {
        if let Some(k) = group[id.index()] {
            by_group.entry((g.node(id).block, k)).or_default().push(id);
        }
    }
    // Where each group's clones go: before its layer's first backward op that reads one
    // of the group's tensors (selective) or before the layer's first backward op (full,
    // per-op).
    let mut insert_before: BTreeMap<OpId, Vec<(Block, u8)>> = BTreeMap::new();
    let mut placed = BTreeSet::new();
    for id in g.ops() {
        let node = g.node(id);
        if node.phase != Phase::Bwd || !matches!(node.block, Block::Layer(_)) {
            continue;
        }
        for (&key, _) in by_group.range((node.block, 0)..=(node.block, u8::MAX)) {
            if placed.contains(&key) {
                continue;
            }
            let trigger = policy == Recompute::Full
                || per_op
                || node
                    .inputs
                    .iter()
                    .any(|&t| group[g.tensor(t).producer.index()] == Some(key.1));
            if trigger {
                insert_before.entry(id).or_default().push(key);
                placed.insert(key);
            }
        }
    }

    let mut b = GraphBuilder::new(g.name());
    let mut map: Vec<Option<TensorId>> = vec![None; g.tensor_count()];
    let mut clone_of: Vec<Option<TensorId>> = vec![None; g.tensor_count()];
    let get = |map: &[Option<TensorId>], t: TensorId| map[t.index()].expect("defined earlier");
    for id in g.ops() {
        let node = g.node(id);
        for key in insert_before.get(&id).map_or(&[][..], Vec::as_slice) {
            b.set_block(node.block);
            b.set_phase(Phase::Bwd);
            for &src in by_group.get(key).map_or(&[][..], Vec::as_slice) {
                let inputs: Vec<TensorId> = g
                    .node(src)
                    .inputs
                    .iter()
                    .map(|&t| clone_of[t.index()].unwrap_or_else(|| get(&map, t)))
                    .collect();
                let results = b.copy_op(g, src, &inputs)?;
                if let Some(&r) = results.first() {
                    clones.insert(b.graph().tensor(r).producer);
                }
                for (&old, new) in g.node(src).results.iter().zip(results) {
                    clone_of[old.index()] = Some(new);
                }
            }
        }
        b.set_block(node.block);
        b.set_phase(node.phase);
        let use_clones = node.phase == Phase::Bwd;
        let inputs: Vec<TensorId> = node
            .inputs
            .iter()
            .map(|&t| {
                let same_block = g.node(g.tensor(t).producer).block == node.block;
                match clone_of[t.index()] {
                    Some(c) if use_clones && same_block => c,
                    _ => get(&map, t),
                }
            })
            .collect();
        let results = b.copy_op(g, id, &inputs)?;
        for (&old, new) in node.results.iter().zip(results) {
            map[old.index()] = Some(new);
        }
    }
    Ok(Recomputed {
        graph: b.finish(),
        clones,
        idle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{verify, Env};
    use crate::models::{build_forward, zoo, Attention};
    use crate::train::memory::saved_activation_bytes;
    use crate::train::{training_graph, TrainOptions};

    fn gpt3_like_one_layer() -> Graph {
        // GPT-3 175B dimensions (Brown et al. 2020), one layer is enough per layer.
        let mut cfg = zoo::gpt("g", 96, 12288, 96, 51200, 2048, 0.1, Attention::Eager);
        cfg.layers = 2;
        training_graph(&build_forward(&cfg).unwrap(), &TrainOptions::default()).unwrap()
    }

    /// Korthikanti et al. 2022, Table 2: with selective recomputation and no
    /// parallelism the per-layer activations are 34·s·b·h; with full recomputation
    /// only the layer input, 2·s·b·h, is kept.
    #[test]
    fn recompute_policies_match_korthikanti_table2() {
        let g = gpt3_like_one_layer();
        let (s, b, h) = (2048.0, 1.0, 12288.0);
        let env = Env::new(1, 2048);
        for (policy, expected) in [
            (Recompute::Selective, s * b * h * 34.0),
            (Recompute::Full, s * b * h * 2.0),
        ] {
            let r = apply(&g, policy, |_| true).unwrap().graph;
            verify(&r).unwrap();
            let saved = saved_activation_bytes(&r, env).unwrap();
            let got = saved[&Block::Layer(0)] as f64;
            assert!(
                (got - expected).abs() / expected < 0.01,
                "{policy}: {got} vs {expected}"
            );
            // Recomputation adds forward work to the step.
            assert!(r.total_flops(env).unwrap() > g.total_flops(env).unwrap());
        }
    }

    fn modules(s: &str) -> Selective {
        Selective::Modules(s.parse().unwrap())
    }

    /// Per-layer saved bytes and total FLOPs of `g` under `selective`.
    fn layer0(g: &Graph, selective: Selective, env: Env) -> (u64, u64, Option<RecomputeModules>) {
        let r = apply_with(g, Recompute::Selective, selective, |_| true).unwrap();
        verify(&r.graph).unwrap();
        let saved = saved_activation_bytes(&r.graph, env).unwrap()[&Block::Layer(0)];
        (saved, r.graph.total_flops(env).unwrap(), r.idle)
    }

    /// A Llama layer with flash attention (Llama-2-7B: h 4096, ffn f 11008, no TP,
    /// b 1, s 2048, bf16). The MLP's backward reads, besides the norm's input `y`
    /// (kept: it is the residual stream and the pre-MLP norm's saved input):
    ///
    /// * the norm's output, input of the gate and up projections: `2sbh` bytes;
    /// * the gate projection's output (SiLU's input): `2sbf`;
    /// * SiLU's output and the up projection's output (the product's inputs): `4sbf`;
    /// * the product (the down projection's input): `2sbf`;
    ///
    /// so `mlp` saves `2sbh + 8sbf` bytes per layer, and reruns the MLP's forward in
    /// backward: three `s·b·h × h·f` GEMMs, `6sbhf` FLOPs, plus the norm, SiLU and the
    /// product (elementwise, under 0.1% here). `layernorm` drops the two norm outputs
    /// (`4sbh`) and keeps their inputs. With flash attention `core_attn` claims no op.
    #[test]
    fn megatron_modules_on_a_llama_layer() {
        let mut cfg = zoo::llama("l", 2, 4096, 32, 32, 11008, 32000, 1e4);
        cfg.attention = Attention::Flash;
        let g = training_graph(&build_forward(&cfg).unwrap(), &TrainOptions::default()).unwrap();
        let (s, b, h, f) = (2048u64, 1u64, 4096u64, 11008u64);
        let env = Env::new(b, s);
        let none = apply(&g, Recompute::None, |_| true).unwrap().graph;
        let saved_none = saved_activation_bytes(&none, env).unwrap()[&Block::Layer(0)];
        let flops_none = none.total_flops(env).unwrap();

        let (saved, flops, idle) = layer0(&g, modules("mlp"), env);
        assert_eq!(idle, None);
        assert_eq!(saved_none - saved, 2 * s * b * h + 8 * s * b * f);
        // Both layers rerun their MLP.
        let gemms = 2 * 6 * s * b * h * f;
        let extra = flops - flops_none;
        assert!(
            extra >= gemms && (extra - gemms) as f64 / (gemms as f64) < 1e-3,
            "{extra} vs {gemms}"
        );

        let (saved, _, idle) = layer0(&g, modules("layernorm"), env);
        assert_eq!(idle, None);
        assert_eq!(saved_none - saved, 4 * s * b * h);
        // The pre-MLP norm is the MLP's: the two sets drop their union.
        let (saved, _, _) = layer0(&g, modules("layernorm,mlp"), env);
        assert_eq!(saved_none - saved, 4 * s * b * h + 8 * s * b * f);

        let (saved, flops, idle) = layer0(&g, modules("core_attn,mlp"), env);
        assert_eq!(idle, Some(RecomputeModules::core_attn()));
        assert_eq!(saved_none - saved, 2 * s * b * h + 8 * s * b * f);
        assert_eq!(flops - flops_none, extra);
    }

    /// Korthikanti et al. 2022's GPT layer (Table 2): selective recomputation keeps
    /// `34sbh` bytes; the MLP holds `18sbh` of them (the second layer norm's output
    /// `2sbh`, the first linear's output `8sbh` read by GeLU, GeLU's output `8sbh` read
    /// by the second linear). Its dropout mask (`sbh`) belongs to Megatron-LM's
    /// bias-dropout-add, outside the checkpoint, and stays: `core_attn,mlp` keeps
    /// `16sbh`, `mlp` alone keeps the attention core too.
    #[test]
    fn megatron_modules_on_korthikantis_layer() {
        let g = gpt3_like_one_layer();
        let (s, b, h) = (2048.0, 1.0, 12288.0);
        let env = Env::new(1, 2048);
        let (core, _, idle) = layer0(&g, modules("core_attn"), env);
        assert_eq!(idle, None);
        let (default, _, _) = layer0(&g, Selective::AttentionCore, env);
        assert_eq!(core, default);
        let (both, _, _) = layer0(&g, modules("core_attn,mlp"), env);
        let (mlp, _, _) = layer0(&g, modules("mlp"), env);
        for (got, expected) in [
            (core, 34.0 * s * b * h),
            (both, 16.0 * s * b * h),
            (core - both, 18.0 * s * b * h),
        ] {
            let got = got as f64;
            assert!(
                (got - expected).abs() / expected < 0.01,
                "{got} vs {expected}"
            );
        }
        assert!(mlp > core, "mlp alone keeps the s×s scores");
    }

    #[test]
    fn module_sets_parse_print_and_serialize() {
        let m: RecomputeModules = "mlp, core_attn".parse().unwrap();
        assert_eq!(m.to_string(), "core_attn,mlp");
        assert_eq!(serde_json::to_string(&m).unwrap(), r#"["core_attn","mlp"]"#);
        let back: RecomputeModules = serde_json::from_str(r#"["mlp","core_attn"]"#).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            "mlp,attn".parse::<RecomputeModules>(),
            Err(ModulesError::Unknown("attn".into()))
        );
        assert_eq!("".parse::<RecomputeModules>(), Err(ModulesError::Empty));
        assert_eq!(
            "mlp,mlp".parse::<RecomputeModules>(),
            Err(ModulesError::Repeated(RecomputeModule::Mlp))
        );
        assert!(serde_json::from_str::<RecomputeModules>(r#"["bogus"]"#).is_err());
        let moe: RecomputeModules = "moe,shared_experts".parse().unwrap();
        assert!(moe.iter().all(|x| !x.is_modelled()));
    }
}
