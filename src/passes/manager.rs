//! The pass trait and the manager that runs passes: it verifies the graph each pass
//! returns, times the passes and names the pass in every failure, so that a pipeline
//! reads as the list of its passes.
//!
//! ```
//! use apar::models::{build_forward, zoo};
//! use apar::passes::manager::{Autodiff, PassManager, RecomputeLayers};
//! use apar::passes::recompute::Selective;
//! use apar::passes::Recompute;
//! use apar::train::TrainOptions;
//!
//! let fwd = build_forward(&zoo::lookup("tiny-llama")?)?;
//! let pm = PassManager::verifying();
//! let train = pm.run(&Autodiff(TrainOptions::default()), &fwd)?;
//! let recomputed = pm.run(&RecomputeLayers(Recompute::Full, Selective::default()), &train)?;
//! assert!(!recomputed.clones.is_empty());
//! assert_eq!(pm.timings().len(), 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use super::distribute::{self, Distributed};
use super::recompute::{self, Recomputed, Selective};
use super::{Config, Recompute};
use crate::cost::{CostModel, Group};
use crate::ir::{DType, Env, Graph, ShapeError, VerifyErrors};
use crate::shard::{ShardError, ShardOptions, ShardedModel, Sharder};
use crate::train::{training_graph, TrainError, TrainOptions};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use thiserror::Error;

/// A graph-to-graph pass: reads a graph, returns a new one (with any side table),
/// never mutates its input.
pub trait Pass {
    /// The new graph and whatever the pass reports beside it.
    type Output: Transformed;
    /// Why the pass can fail.
    type Error: std::error::Error + 'static;
    /// Name in failures and timings.
    fn name(&self) -> &'static str;
    /// Runs the pass on `g`.
    ///
    /// # Errors
    ///
    /// The pass's own error when it cannot transform `g`.
    fn run(&self, g: &Graph) -> Result<Self::Output, Self::Error>;
}

/// A pass result that carries the transformed graph.
pub trait Transformed {
    /// The transformed graph.
    fn graph(&self) -> &Graph;
}

impl Transformed for Graph {
    fn graph(&self) -> &Graph {
        self
    }
}

impl Transformed for Recomputed {
    fn graph(&self) -> &Graph {
        &self.graph
    }
}

impl Transformed for Distributed {
    fn graph(&self) -> &Graph {
        &self.graph
    }
}

/// Why a pass run by the manager failed.
#[derive(Debug, Error)]
pub enum PassError<E: std::error::Error + 'static> {
    /// The pass refused its input.
    #[error("{pass}: {source}")]
    Failed {
        /// The pass.
        pass: &'static str,
        /// Its error.
        #[source]
        source: E,
    },
    /// The pass returned a graph that does not verify (a bug in the pass).
    #[error("{pass} returned a graph that does not verify: {errors}")]
    Verify {
        /// The pass.
        pass: &'static str,
        /// What the verifier found.
        errors: VerifyErrors,
    },
}

/// Time spent in one pass over a manager's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassTiming {
    /// The pass.
    pub pass: &'static str,
    /// Times it ran.
    pub runs: u32,
    /// Total wall time.
    pub total: Duration,
}

/// Runs passes: verification of each result (see [`PassManager::verify`]) and timings.
/// Shared by threads (`&self`).
#[derive(Debug, Default)]
pub struct PassManager {
    /// Verify the graph each pass returns.
    pub verify: bool,
    timings: Mutex<Vec<PassTiming>>,
}

impl PassManager {
    /// A manager that verifies after every pass.
    pub fn verifying() -> PassManager {
        PassManager {
            verify: true,
            timings: Mutex::default(),
        }
    }

    /// A manager that verifies in debug and test builds only (the compiler's choice:
    /// its passes are covered by the verifying tests, and the search runs them
    /// thousands of times).
    pub fn debug_verifying() -> PassManager {
        PassManager {
            verify: cfg!(debug_assertions),
            timings: Mutex::default(),
        }
    }

    /// Runs `pass` on `g`, then verifies its graph.
    ///
    /// # Errors
    ///
    /// [`PassError::Failed`] with the pass's error, [`PassError::Verify`] when the
    /// result does not verify.
    pub fn run<P: Pass>(&self, pass: &P, g: &Graph) -> Result<P::Output, PassError<P::Error>> {
        let start = Instant::now();
        let out = pass.run(g).map_err(|source| PassError::Failed {
            pass: pass.name(),
            source,
        })?;
        self.record(pass.name(), start.elapsed());
        if self.verify {
            crate::ir::verify(out.graph()).map_err(|errors| PassError::Verify {
                pass: pass.name(),
                errors,
            })?;
        }
        Ok(out)
    }

    fn record(&self, pass: &'static str, took: Duration) {
        let mut t = self.timings.lock().expect("timings lock");
        match t.iter_mut().find(|x| x.pass == pass) {
            Some(x) => {
                x.runs += 1;
                x.total += took;
            }
            None => t.push(PassTiming {
                pass,
                runs: 1,
                total: took,
            }),
        }
    }

    /// Time per pass so far, in the order the passes first ran.
    pub fn timings(&self) -> Vec<PassTiming> {
        self.timings.lock().expect("timings lock").clone()
    }
}

/// Reverse-mode autodiff with mixed precision and the optimizer step
/// ([`crate::train`]).
#[derive(Clone, Copy, Debug)]
pub struct Autodiff(pub TrainOptions);

impl Pass for Autodiff {
    type Output = Graph;
    type Error = TrainError;
    fn name(&self) -> &'static str {
        "autodiff"
    }
    fn run(&self, g: &Graph) -> Result<Graph, TrainError> {
        training_graph(g, &self.0)
    }
}

/// Recomputation insertion with one policy for every layer, selective recomputation
/// as the engine defines it ([`recompute::apply_with`]).
#[derive(Clone, Copy, Debug)]
pub struct RecomputeLayers(pub Recompute, pub Selective);

impl Pass for RecomputeLayers {
    type Output = Recomputed;
    type Error = ShapeError;
    fn name(&self) -> &'static str {
        "recompute"
    }
    fn run(&self, g: &Graph) -> Result<Recomputed, ShapeError> {
        recompute::apply_with(g, self.0, self.1, |_| true)
    }
}

/// ZeRO-style distribution of model states over the data-parallel group
/// ([`distribute::apply_with`]); the flag says whether parameters are their own fp32
/// masters (FSDP with fp32 sharded parameters, fp32 training).
#[derive(Clone, Copy, Debug)]
pub struct Distribute(pub Config, pub bool);

impl Pass for Distribute {
    type Output = Distributed;
    type Error = ShapeError;
    fn name(&self) -> &'static str {
        "distribute"
    }
    fn run(&self, g: &Graph) -> Result<Distributed, ShapeError> {
        distribute::apply_with(g, &self.0, self.1)
    }
}

/// Lays out mixture-of-experts layers for expert (and expert-tensor) parallelism
/// ([`crate::passes::expert::apply`]).
pub struct ExpertParallel(pub crate::passes::expert::ExpertLayout);

impl Pass for ExpertParallel {
    type Output = Graph;
    type Error = ShapeError;
    fn name(&self) -> &'static str {
        "expert"
    }
    fn run(&self, g: &Graph) -> Result<Graph, ShapeError> {
        crate::passes::expert::apply(g, self.0)
    }
}

/// The forward graph at the engine's compute dtype, with the logits in `.1` before the
/// loss ([`crate::train::precision::apply`]).
#[derive(Clone, Copy, Debug)]
pub struct MixedPrecision(pub DType, pub DType);

impl Pass for MixedPrecision {
    type Output = Graph;
    type Error = ShapeError;
    fn name(&self) -> &'static str {
        "precision"
    }
    fn run(&self, g: &Graph) -> Result<Graph, ShapeError> {
        crate::train::precision::apply(g, self.0, self.1)
    }
}

/// FP8 linear layers in a forward graph's transformer blocks, as the recipe runs them
/// ([`crate::train::precision::apply_fp8`]).
#[derive(Clone, Copy, Debug)]
pub struct Fp8Linears(pub crate::train::precision::Fp8Recipe);

impl Pass for Fp8Linears {
    type Output = Graph;
    type Error = ShapeError;
    fn name(&self) -> &'static str {
        "fp8"
    }
    fn run(&self, g: &Graph) -> Result<Graph, ShapeError> {
        crate::train::precision::apply_fp8(g, &self.0)
    }
}

/// Tensor-parallel sharding of a forward graph at degree `tp` ([`crate::shard`]), its
/// extraction priced by `cost` on a `tp`-device group at `env`.
#[derive(Clone, Copy)]
pub struct TensorParallel<'a> {
    /// Tensor-parallel degree (> 1).
    pub tp: u32,
    /// Sequence parallelism.
    pub sp: bool,
    /// The cost model the split is priced by.
    pub cost: &'a CostModel,
    /// The binding of micro-batch and sequence the split is priced at.
    pub env: Env,
    /// Matrices at least this large in both dimensions are split, never kept whole
    /// ([`crate::shard::cost::ModelCost::min_split_dim`]).
    pub min_split_dim: Option<u64>,
}

impl Transformed for ShardedModel {
    fn graph(&self) -> &Graph {
        &self.graph
    }
}

impl Pass for TensorParallel<'_> {
    type Output = ShardedModel;
    type Error = ShardError;
    fn name(&self) -> &'static str {
        "shard"
    }
    fn run(&self, g: &Graph) -> Result<ShardedModel, ShardError> {
        let price = crate::shard::cost::ModelCost {
            model: self.cost,
            group: Group {
                size: self.tp,
                per_node: self.tp,
            },
            min_split_dim: self.min_split_dim,
        };
        let mut opts = ShardOptions::new(self.tp, self.sp);
        opts.env = self.env;
        Sharder::with_cost(opts, &price).shard_model(g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DType, Dim, GraphBuilder, TensorType};

    /// A pass that breaks its graph: the manager must catch it and name it.
    struct Breaks;

    impl Pass for Breaks {
        type Output = Graph;
        type Error = ShapeError;
        fn name(&self) -> &'static str {
            "breaks"
        }
        fn run(&self, _: &Graph) -> Result<Graph, ShapeError> {
            // Two sources with one name: the verifier refuses the second.
            let mut b = GraphBuilder::new("broken");
            let ty = TensorType::new(DType::Bf16, [Dim::lit(4)]);
            b.param("w", ty.clone());
            b.param("w", ty);
            Ok(b.finish())
        }
    }

    #[test]
    fn a_pass_that_breaks_its_graph_is_named() {
        let fwd =
            crate::models::build_forward(&crate::models::zoo::lookup("tiny-gpt").unwrap()).unwrap();
        let pm = PassManager::verifying();
        match pm.run(&Breaks, &fwd) {
            Err(PassError::Verify { pass, errors }) => {
                assert_eq!(pass, "breaks");
                assert!(!errors.0.is_empty());
            }
            other => panic!("expected a verify failure, got {other:?}"),
        }
        // The manager that does not verify lets it through (release compiler).
        let quiet = PassManager::default();
        assert!(quiet.run(&Breaks, &fwd).is_ok());
        assert_eq!(quiet.timings()[0].pass, "breaks");
    }
}
