//! Warnings: what apar assumed or could not do for a model, a job or a plan. They are
//! carried in the plan (`warnings` in the JSON) and printed by the CLI; they never
//! change a result.

use crate::engine::Engine;
use crate::ir::{Block, Graph, Op};
use crate::lower::compile::{Compiler, DeviceProgram, Evaluation, ModelSource};
use crate::models::hf::{ConfigNotes, IgnoredKind};
use crate::models::{ModelConfig, Position};
use crate::shard::Stop;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

pub use crate::engine::MEGATRON_VOCAB_DIVISOR;

/// Share of the step time spent in the pipeline bubble above which a plan is
/// reported as using more devices than its batch can feed.
pub const BUBBLE_WARNING_FRACTION: f64 = 0.5;

/// Fewest blocks a graph needs for pipeline parallelism to have a choice of cuts:
/// an embedding, a layer and a head.
pub const PIPELINE_MIN_BLOCKS: usize = 3;

/// Something apar assumed or could not do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Warning {
    /// The sharder left a block whole on every tensor-parallel rank.
    BlockReplicated {
        /// The block (`layer.0`).
        block: String,
        /// Tensor-parallel degree.
        tp: u32,
        /// Why: no split the rules know is valid for its shapes (e.g. heads not
        /// divisible by tp), or none was cheaper than replication.
        reason: String,
    },
    /// Layer weights as large as half the hidden size in both dimensions are left
    /// whole on every tensor-parallel rank: the sharder keeps them whole only when no
    /// split of them is valid (`crate::shard::cost::ShardCost::must_split`), while
    /// Megatron-LM's and torchtitan's tensor parallelism split every such weight by
    /// columns or rows, so the engine runs another program than the one priced.
    WeightsReplicated {
        /// The block (`layer.0`).
        block: String,
        /// Tensor-parallel degree.
        tp: u32,
        /// The replicated weights' names.
        weights: Vec<String>,
    },
    /// A sharding run stopped at its node or iteration limit, so its result may not be
    /// the best split.
    ShardingStopped {
        /// The block.
        block: String,
        /// Tensor-parallel degree.
        tp: u32,
        /// The limit that stopped it.
        stop: String,
    },
    /// The graph has too few blocks for pipeline cuts (no `embed` / `layer.N` / `head`
    /// labels): every plan has one pipeline stage.
    FewBlocks {
        /// Blocks in the graph.
        blocks: usize,
    },
    /// Megatron-LM pads the vocabulary: the plan holds and computes the padded rows
    /// (MFU counts the model's own vocabulary, HFU the padded one).
    VocabPadded {
        /// The model's vocabulary.
        vocab: u64,
        /// What Megatron-LM allocates at the plan's tensor-parallel degree.
        padded: u64,
    },
    /// Keys of the model's `config.json` that the plan does not use.
    ConfigKeysIgnored {
        /// Why they were ignored.
        kind: IgnoredKind,
        /// The keys.
        keys: Vec<String>,
    },
    /// Sliding-window attention is not modeled: attention over the whole sequence is
    /// planned, more FLOPs (and for eager attention more memory) than the window needs.
    SlidingWindowIgnored {
        /// The model's window, tokens.
        window: u64,
        /// The job's sequence length.
        seq: u64,
    },
    /// The sequence is longer than the rotary-position model was trained for (it runs,
    /// but the checkpoint has not seen these positions).
    SequenceBeyondTrained {
        /// The job's sequence length.
        seq: u64,
        /// `max_position_embeddings` of the configuration.
        trained_positions: u64,
    },
    /// The engine has no ready way to build this model (torchtitan trains the models it
    /// has a recipe for; Megatron-LM's GPT model has no parallel residual): the plan
    /// holds for the engine's parallelism and memory, but the model must be added to
    /// the engine first, and the export is refused.
    NoEngineRecipe {
        /// Why, as the export says it.
        reason: String,
    },
    /// The plan is priced with a gradient or optimizer dtype other than the engine's
    /// default, which apar's export cannot write (it sets the compute precision and
    /// the engine picks the rest): `--emit` refuses the plan.
    DtypeOverrideNotExported {
        /// The engine.
        engine: String,
    },
    /// The expert load imbalance asked for (`--moe-imbalance F`) is more than the plan's
    /// expert-parallel degree allows: the busiest of `ep` ranks receives at most every
    /// token's routes, `ep` times the mean (1 without expert parallelism), and the
    /// plan is priced at that.
    MoeImbalanceCapped {
        /// The factor asked for.
        asked: f64,
        /// The factor priced (`min(asked, ep)`).
        priced: f64,
    },
    /// No built-in cost table lists the cluster's device and no calibration was
    /// given: the default table (the A100's efficiencies) prices it.
    DefaultCostTable {
        /// The device's name.
        device: String,
    },
    /// The cost table in use (the device's built-in one, or the `--calibration` file,
    /// which keeps the built-in sources of the values it did not fit) holds values that
    /// are estimates, not measurements (their source says "estimate"): step times
    /// that depend on them are less certain.
    EstimatedCostValues {
        /// The device's name.
        device: String,
        /// The estimated parameters, by name.
        params: Vec<String>,
        /// Whether the table is a `--calibration` file (else the built-in table).
        #[serde(default)]
        calibration_file: bool,
    },
    /// The calibration given (`--calibration`) names other devices than the
    /// cluster's: its efficiencies were measured elsewhere.
    CalibrationForOtherDevice {
        /// The cluster's device.
        device: String,
        /// The devices the calibration file names.
        calibrated: Vec<String>,
    },
    /// Most of the step is pipeline bubble because the stages are unequal: the
    /// slowest (virtual) stage's time per micro-batch is over twice the fastest's
    /// (layers of unequal cost, e.g. dense first layers beside mixture-of-experts
    /// ones, that the cut cannot spread evenly over the stages).
    StagesUnbalanced {
        /// Bubble share of the step time.
        fraction: f64,
        /// Slowest stage's forward and backward per micro-batch, seconds.
        slowest_s: f64,
        /// Fastest stage's, seconds.
        fastest_s: f64,
    },
    /// Most of the step is pipeline bubble: the batch cannot feed this many devices.
    BubbleDominates {
        /// Bubble share of the step time.
        fraction: f64,
        /// Micro-batches per step.
        num_micro_batches: u32,
        /// Pipeline stages.
        pp: u32,
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::WeightsReplicated { block, tp, weights } => write!(
                f,
                "{block} keeps {} whole on every rank at tp {tp}: no split of them is valid at this tp (are the heads, kv heads and widths divisible by it?), and the engine's tensor parallelism splits these weights, so it runs another program than the one priced (or refuses it); check `tp_layout` in --json",
                weights.join(", ")
            ),
            Warning::BlockReplicated { block, tp, reason } => write!(
                f,
                "{block} is not split at tp {tp}: {reason}; every tensor-parallel rank runs all of it"
            ),
            Warning::ShardingStopped { block, tp, stop } => write!(
                f,
                "sharding {block} at tp {tp} stopped at its {stop}; the split found may not be the cheapest"
            ),
            Warning::FewBlocks { blocks } => write!(
                f,
                "the graph has {blocks} block(s); label ops `embed`, `layer.N` and `head` (see ir-spec) to allow pipeline cuts"
            ),
            Warning::VocabPadded { vocab, padded } => write!(
                f,
                "Megatron-LM pads the vocabulary from {vocab} to {padded} rows (--make-vocab-size-divisible-by {MEGATRON_VOCAB_DIVISOR} × tp); the plan holds and computes the padded rows"
            ),
            Warning::ConfigKeysIgnored { kind, keys } => {
                let keys = keys.join(", ");
                match kind {
                    IgnoredKind::MoeOnDense => write!(
                        f,
                        "mixture-of-experts keys ({keys}) on a dense architecture are ignored: the model is planned dense"
                    ),
                    IgnoredKind::Unknown => write!(f, "unknown config.json keys ignored: {keys}"),
                    IgnoredKind::RopeParametersReplaced => write!(
                        f,
                        "config.json has both rope_scaling and a different {keys}: {keys} is ignored, as Transformers' config loading replaces it with rope_scaling"
                    ),
                }
            }
            Warning::SlidingWindowIgnored { window, seq } => write!(
                f,
                "the model attends within a {window}-token window; apar plans attention over the whole {seq}-token sequence (an upper bound on attention time and memory)"
            ),
            Warning::SequenceBeyondTrained {
                seq,
                trained_positions,
            } => write!(
                f,
                "sequence {seq} is longer than the {trained_positions} positions the model was trained for"
            ),
            Warning::NoEngineRecipe { reason } => write!(
                f,
                "{reason}: the engine must be given this model before the plan can run (the export is refused)"
            ),
            Warning::MoeImbalanceCapped { asked, priced } => write!(
                f,
                "--moe-imbalance {asked} is priced as {priced}: the busiest of the plan's expert-parallel ranks can receive at most every token's routes (ep times the mean; 1 without expert parallelism)"
            ),
            Warning::DtypeOverrideNotExported { engine } => write!(
                f,
                "the gradient or optimizer dtype asked for is priced, but apar's {engine} export writes only the compute precision (the engine then picks its default dtypes), so --emit refuses this plan"
            ),
            Warning::DefaultCostTable { device } => write!(
                f,
                "no cost table for device `{device}`: priced with the default (A100) efficiencies; give measured runs to `apar calibrate` and pass its file with --calibration"
            ),
            Warning::EstimatedCostValues {
                device,
                params,
                calibration_file: false,
            } => write!(
                f,
                "the built-in cost table for `{device}` estimates {} (no public measurement found): give measured runs to `apar calibrate` and pass its file with --calibration",
                params.join(", ")
            ),
            Warning::EstimatedCostValues {
                device,
                params,
                calibration_file: true,
            } => write!(
                f,
                "the calibration file used for `{device}` keeps estimated values of {} (their source says \"estimate\": neither measured nor fitted): fit them with `apar calibrate --fit` to measured runs",
                params.join(", ")
            ),
            Warning::CalibrationForOtherDevice { device, calibrated } => write!(
                f,
                "the calibration is for {} but the cluster's device is `{device}`: its efficiencies (and GEMM shape model) were measured on other hardware",
                if calibrated.is_empty() {
                    "no named device".to_string()
                } else {
                    calibrated.join(", ")
                }
            ),
            Warning::StagesUnbalanced {
                fraction,
                slowest_s,
                fastest_s,
            } => write!(
                f,
                "{:.0}% of the step is pipeline bubble because the stages are unequal: the slowest takes {:.3} s per micro-batch, the fastest {:.3} s (the cut cannot divide the layers' time evenly at this pipeline degree)",
                100.0 * fraction,
                slowest_s,
                fastest_s
            ),
            Warning::BubbleDominates {
                fraction,
                num_micro_batches,
                pp,
            } => write!(
                f,
                "{:.0}% of the step is pipeline bubble ({num_micro_batches} micro-batches over {pp} stages): the global batch cannot keep this many devices busy",
                100.0 * fraction
            ),
        }
    }
}

/// Warnings about the model and job, before any plan.
pub(super) fn of_model(
    compiler: &Compiler,
    config: Option<&ModelConfig>,
    notes: &ConfigNotes,
) -> Vec<Warning> {
    let mut out: Vec<Warning> = Vec::new();
    if compiler.cost.defaulted {
        out.push(Warning::DefaultCostTable {
            device: compiler.cluster.device.name.clone(),
        });
    } else {
        let params: Vec<String> = compiler
            .cost
            .eff
            .sources
            .iter()
            .filter(|(_, why)| why.starts_with("estimate"))
            .map(|(p, _)| p.clone())
            .collect();
        if !params.is_empty() {
            out.push(Warning::EstimatedCostValues {
                device: compiler.cluster.device.name.clone(),
                params,
                calibration_file: compiler.calibration.is_some(),
            });
        }
    }
    if let Some(c) = &compiler.calibration {
        let device = &compiler.cluster.device.name;
        if !c.devices.contains(device) {
            out.push(Warning::CalibrationForOtherDevice {
                device: device.clone(),
                calibrated: c.devices.clone(),
            });
        }
    }
    out.extend(
        notes
            .ignored
            .iter()
            .map(|(kind, keys)| Warning::ConfigKeysIgnored {
                kind: *kind,
                keys: keys.clone(),
            }),
    );
    if let Some(window) = notes.sliding_window.filter(|&w| compiler.seq > w) {
        out.push(Warning::SlidingWindowIgnored {
            window,
            seq: compiler.seq,
        });
    }
    if let Some(Err(e)) = config.map(|cfg| {
        crate::engine::export::model_supported(compiler.engine, cfg, compiler.precision.compute)
    }) {
        out.push(Warning::NoEngineRecipe {
            reason: e.to_string(),
        });
    }
    // A precision the engine cannot run at all failed the compile already; what is
    // left is a dtype override the export cannot write.
    if crate::engine::export::precision_exportable(compiler.engine, &compiler.precision).is_err() {
        out.push(Warning::DtypeOverrideNotExported {
            engine: compiler.engine.to_string(),
        });
    }
    let rotary = config.is_some_and(|c| matches!(c.position, Position::Rotary { .. }));
    if let Some(trained) = notes
        .trained_positions
        .filter(|&p| rotary && compiler.seq > p)
    {
        out.push(Warning::SequenceBeyondTrained {
            seq: compiler.seq,
            trained_positions: trained,
        });
    }
    if let ModelSource::Graph(g) = compiler.source() {
        let blocks = block_count(g);
        if blocks < PIPELINE_MIN_BLOCKS {
            out.push(Warning::FewBlocks { blocks });
        }
    }
    out
}

fn block_count(g: &Graph) -> usize {
    let mut blocks: Vec<Block> = g.ops().map(|o| g.node(o).block).collect();
    blocks.sort();
    blocks.dedup();
    blocks.len()
}

/// Warnings about a chosen plan.
pub(super) fn of_plan(
    compiler: &Compiler,
    e: &Evaluation,
    program: &DeviceProgram,
    config: Option<&ModelConfig>,
) -> Vec<Warning> {
    let mut out = Vec::new();
    let c = &e.config;
    let most = f64::from(c.ep);
    if compiler.moe_imbalance > most {
        out.push(Warning::MoeImbalanceCapped {
            asked: compiler.moe_imbalance,
            priced: most,
        });
    }
    if let Some(s) = &program.sharded {
        // A block that uses parameters none of which is split is replicated. A block's
        // parameters are the ones its ops read, its own and another block's (a head
        // tied to the embedding reads the embedding's vocabulary-split weight).
        let mut split: BTreeMap<Block, (bool, bool)> = BTreeMap::new();
        for id in s.graph.ops() {
            let node = s.graph.node(id);
            if let Op::Param { .. } = s.graph.op(id) {
                split.entry(node.block).or_default().0 = true;
                continue;
            }
            for &t in &node.inputs {
                let producer = s.graph.tensor(t).producer;
                if !matches!(s.graph.op(producer), Op::Param { .. }) {
                    continue;
                }
                let entry = split.entry(node.block).or_default();
                entry.0 = true;
                // Split where declared split, or by a `tp_split` of a whole declaration.
                if matches!(node.op, Op::TpSplit { .. })
                    || s.layouts
                        .get(t.index())
                        .is_some_and(|v| !v.layout.is_replicated())
                {
                    entry.1 = true;
                }
            }
        }
        // Weights at least half the hidden size in both dimensions (attention and
        // MLP projections; not routers, latents or norms) that stay whole.
        if let (Some(cfg), Engine::Megatron | Engine::Torchtitan) = (config, compiler.engine) {
            let half = cfg.tp_split_dim();
            let mut whole: BTreeMap<Block, Vec<String>> = BTreeMap::new();
            for id in s.graph.ops() {
                let node = s.graph.node(id);
                let (Op::Param { name }, Block::Layer(_)) = (s.graph.op(id), node.block) else {
                    continue;
                };
                let Some(&r) = node.results.first() else {
                    continue;
                };
                let dims: Vec<u64> = s
                    .graph
                    .ty(r)
                    .shape
                    .dims()
                    .iter()
                    .filter_map(|d| d.as_lit())
                    .collect();
                let large = dims.len() == 2 && dims.iter().all(|&d| d >= half);
                let replicated = s
                    .layouts
                    .get(r.index())
                    .is_some_and(|v| v.layout.is_replicated());
                if large && replicated {
                    whole.entry(node.block).or_default().push(name.to_string());
                }
            }
            for t in &s.templates {
                let Some(weights) = whole.remove(&t.first_block) else {
                    continue;
                };
                if !matches!(split.get(&t.first_block), Some((true, true))) {
                    continue;
                }
                out.push(Warning::WeightsReplicated {
                    block: format!("{} (and every layer built like it)", t.first_block),
                    tp: c.tp,
                    weights,
                });
            }
        }
        for (i, t) in s.templates.iter().enumerate() {
            let users: Vec<Block> = s
                .blocks
                .iter()
                .filter(|b| b.template == i)
                .map(|b| b.block)
                .collect();
            let block = match users.len() {
                0 | 1 => t.first_block.to_string(),
                n => format!("{} (and {} more blocks like it)", t.first_block, n - 1),
            };
            let report = &t.report;
            if users
                .iter()
                .any(|b| matches!(split.get(b), Some((true, false))))
            {
                let reason = if report.cost_ps >= report.replicated_cost_ps {
                    "no valid split was cheaper than replication (are its heads, kv heads, widths and vocabulary divisible by tp?)"
                } else {
                    "no parameter split is valid for its shapes"
                };
                out.push(Warning::BlockReplicated {
                    block: block.clone(),
                    tp: c.tp,
                    reason: reason.to_string(),
                });
            }
            match &report.stop {
                Stop::NodeLimit { enodes } => out.push(Warning::ShardingStopped {
                    block,
                    tp: c.tp,
                    stop: format!("e-node limit ({enodes} e-nodes)"),
                }),
                Stop::IterationLimit { iterations } => out.push(Warning::ShardingStopped {
                    block,
                    tp: c.tp,
                    stop: format!("iteration limit ({iterations} iterations)"),
                }),
                Stop::Saturated | Stop::Other { .. } => {}
            }
        }
    }
    if let Some(cfg) = config {
        let padded = compiler.engine.padded_vocab(cfg.vocab, c.tp);
        if padded != cfg.vocab {
            out.push(Warning::VocabPadded {
                vocab: cfg.vocab,
                padded,
            });
        }
    }
    let bubble = e.sim.breakdown.bubble_s / e.step_time_s.max(f64::MIN_POSITIVE);
    if c.pp > 1 && bubble > BUBBLE_WARNING_FRACTION {
        // The schedule's own idle share with equal stages: (p − 1) of the
        // v·m + p − 1 slots of a (virtual) stage. Far below the simulated share, the
        // stages are unequal rather than the batch too small.
        let v = f64::from(c.schedule.chunks().max(1));
        let p = f64::from(c.pp);
        let ideal = (p - 1.0) / (v * f64::from(c.num_micro_batches) + p - 1.0);
        let times = &e.sim.stage_time_s;
        let slowest = times.iter().copied().fold(0.0, f64::max);
        let fastest = times.iter().copied().fold(f64::INFINITY, f64::min);
        if ideal < BUBBLE_WARNING_FRACTION / 2.0 && fastest.is_finite() && slowest > 2.0 * fastest {
            out.push(Warning::StagesUnbalanced {
                fraction: bubble,
                slowest_s: slowest,
                fastest_s: fastest,
            });
        } else {
            out.push(Warning::BubbleDominates {
                fraction: bubble,
                num_micro_batches: c.num_micro_batches,
                pp: c.pp,
            });
        }
    }
    out
}
