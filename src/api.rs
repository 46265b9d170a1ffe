//! The one-call API: [`plan`] and the serializable [`Plan`].

use crate::cluster::Cluster;
use crate::ir::Graph;
use crate::lower::compile::{CompileError, Compiler, ModelSource, DEFAULT_MEMORY_RATIO};
use crate::models::ModelConfig;
use crate::passes::Config;
use crate::report::{EvalJson, OomReport};
use crate::search::{plan_with, SearchOptions, SearchStats};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What to plan for besides the model and the cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanOptions {
    /// Sequence length.
    pub seq: u64,
    /// Sequences per step.
    pub global_batch: u64,
    /// Fraction of device memory a plan may use.
    pub memory_ratio: f64,
    /// Pins, bounds and search switches.
    pub search: SearchOptions,
}

impl PlanOptions {
    /// Defaults for a sequence length and global batch: 0.8 of device memory, the
    /// whole candidate space, three runners-up.
    pub fn new(seq: u64, global_batch: u64) -> PlanOptions {
        PlanOptions {
            seq,
            global_batch,
            memory_ratio: DEFAULT_MEMORY_RATIO,
            search: SearchOptions {
                runners_up: 3,
                ..SearchOptions::default()
            },
        }
    }
}

/// A chosen plan: the configuration and everything needed to re-cost it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// The model (zoo name, file, or graph name).
    pub model: String,
    /// The cluster.
    pub cluster: Cluster,
    /// Sequence length.
    pub seq: u64,
    /// Sequences per step.
    pub global_batch: u64,
    /// Fraction of device memory used as the budget.
    pub memory_ratio: f64,
    /// The configuration.
    pub config: Config,
    /// Its evaluation (informative; `apar eval --plan` recomputes it).
    pub evaluation: EvalJson,
    /// The search that found it.
    pub search: SearchStats,
}

/// Why no plan was returned.
#[derive(Debug, Error)]
pub enum PlanError {
    /// Bad input (options, cluster, model).
    #[error(transparent)]
    Invalid(#[from] CompileError),
    /// No configuration satisfies the pins and bounds.
    #[error("no configuration satisfies the pins and bounds")]
    NoCandidates,
    /// Nothing fits; the report of the closest candidate.
    #[error("out of memory: {} bytes requested, {} available", .0.requested_bytes, .0.available_bytes)]
    OutOfMemory(Box<OomReport>),
    /// No candidate compiled.
    #[error("no candidate could be compiled: {0}")]
    NothingCompiled(String),
}

/// Plans `graph` (a forward graph) on `cluster`: the fastest configuration that fits.
pub fn plan(graph: &Graph, cluster: &Cluster, options: &PlanOptions) -> Result<Plan, PlanError> {
    run(
        graph.name().to_string(),
        ModelSource::Graph(graph.clone()),
        cluster,
        options,
    )
}

/// Plans a model configuration; compiles a two-layer template for all layers, which
/// is much faster than [`plan`] on the built graph and gives the same result.
pub fn plan_model(
    model: &ModelConfig,
    cluster: &Cluster,
    options: &PlanOptions,
) -> Result<Plan, PlanError> {
    run(
        model.name.clone(),
        ModelSource::Config(model.clone()),
        cluster,
        options,
    )
}

fn run(
    name: String,
    source: ModelSource,
    cluster: &Cluster,
    options: &PlanOptions,
) -> Result<Plan, PlanError> {
    let compiler = Compiler::new(
        source,
        cluster.clone(),
        options.seq,
        options.global_batch,
        options.memory_ratio,
    )?;
    let r = plan_with(&compiler, &options.search);
    if r.stats.candidates == 0 {
        return Err(PlanError::NoCandidates);
    }
    match (&r.best, &r.closest) {
        (Some(best), _) => Ok(Plan {
            model: name,
            cluster: cluster.clone(),
            seq: options.seq,
            global_batch: options.global_batch,
            memory_ratio: options.memory_ratio,
            config: best.config,
            evaluation: EvalJson::new(best),
            search: r.stats,
        }),
        (None, Some(closest)) => {
            let suggestions =
                crate::search::plan_suggestions(&compiler, &options.search, Some(&closest.config));
            Err(PlanError::OutOfMemory(Box::new(OomReport::new(
                closest,
                suggestions,
            ))))
        }
        (None, None) => {
            let reason = r
                .outcomes
                .iter()
                .find_map(|o| match &o.outcome {
                    crate::search::Outcome::Rejected { reason } => Some(reason.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            Err(PlanError::NothingCompiled(reason))
        }
    }
}
