//! What extraction minimizes: per-device compute time plus collective time on the link
//! the tensor-parallel group spans, behind the [`ShardCost`] trait.
//!
//! [`ModelCost`] plugs in the crate's calibrated [`CostModel`], the one cost model of
//! the crate; where no model is given, sharding is priced on [`DEFAULT_CLUSTER`]. It
//! prices one device: a replicated op costs its full time on every device, a split op
//! its share.

use crate::cluster::Cluster;
use crate::cost::{CostModel, Group};
use crate::ir::{Env, Op, TensorType};
use serde::Serialize;
use std::fmt;
use std::iter::Sum;
use std::ops::Add;
use std::sync::OnceLock;

/// A time in picoseconds with saturating arithmetic; [`Cost::INFEASIBLE`] is the value
/// of what cannot run (an overflowing size, a fractional dimension).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Cost(u64);

impl Cost {
    /// Nothing.
    pub const ZERO: Cost = Cost(0);
    /// Cannot run; larger than every feasible cost, and absorbing under addition.
    pub const INFEASIBLE: Cost = Cost(u64::MAX);

    /// A duration in seconds (negative and NaN give zero, infinite gives infeasible).
    pub fn from_secs(s: f64) -> Cost {
        if s.is_nan() || s <= 0.0 {
            Cost::ZERO
        } else {
            let ps = (s * 1e12).round();
            if ps >= u64::MAX as f64 {
                Cost::INFEASIBLE
            } else {
                Cost(ps as u64)
            }
        }
    }

    /// Picoseconds.
    pub fn picos(self) -> u64 {
        self.0
    }

    /// Seconds (infinite when infeasible).
    pub fn secs(self) -> f64 {
        if self.is_feasible() {
            self.0 as f64 * 1e-12
        } else {
            f64::INFINITY
        }
    }

    /// Whether the cost is finite.
    pub fn is_feasible(self) -> bool {
        self != Cost::INFEASIBLE
    }
}

impl Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost(self.0.saturating_add(o.0))
    }
}

impl Sum for Cost {
    fn sum<I: Iterator<Item = Cost>>(iter: I) -> Cost {
        iter.fold(Cost::ZERO, Add::add)
    }
}

impl fmt::Display for Cost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_feasible() {
            write!(f, "{:.3} µs", self.0 as f64 * 1e-6)
        } else {
            f.write_str("infeasible")
        }
    }
}

/// Prices the per-device program a sharding lowers to.
pub trait ShardCost {
    /// Time one device spends on `op` with these per-device types; collectives carry
    /// their group size in `parts`.
    fn op_cost(&self, op: &Op, inputs: &[&TensorType], results: &[&TensorType], env: Env) -> Cost;

    /// Time one device spends per step on a parameter of per-device type `ty` beyond its
    /// uses (its optimizer update); this is what makes splitting a weight pay even where
    /// the op using it is cheap.
    fn param_cost(&self, ty: &TensorType, env: Env) -> Cost;

    /// Whether a parameter of (whole) type `full` must be split over the
    /// tensor-parallel ranks: a program that keeps it whole on every rank is not one
    /// the engines run (their tensor parallelism splits every projection weight), so
    /// extraction treats it as infeasible. None by default.
    fn must_split(&self, full: &TensorType) -> bool {
        let _ = full;
        false
    }
}

/// Bytes an optimizer step touches per parameter element: the `2 + 2 + 12` bytes of
/// mixed-precision Adam's model states (Rajbhandari et al. 2020, Sec. 3.1).
pub const OPTIMIZER_BYTES_PER_PARAM: f64 = 16.0;

/// The cluster preset whose calibrated [`CostModel`] prices sharding when no cost model
/// is given ([`Sharder::new`](super::Sharder::new), [`shard_model`](super::shard_model)):
/// one DGX A100 80GB node, the platform the cost model's efficiencies were fitted on
/// (Korthikanti et al. 2022, Tables 4 and 5).
pub const DEFAULT_CLUSTER: &str = "dgx-a100-80g:1";

/// The calibrated [`CostModel`] on [`DEFAULT_CLUSTER`], built once.
pub fn default_cost_model() -> &'static CostModel {
    static MODEL: OnceLock<CostModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        // A built-in preset name always resolves (a unit test checks it).
        let cluster = Cluster::resolve(DEFAULT_CLUSTER).expect("DEFAULT_CLUSTER is a preset");
        CostModel::new(cluster)
    })
}

/// The calibrated [`CostModel`] on the group the tensor-parallel devices span.
#[derive(Clone, Copy, Debug)]
pub struct ModelCost<'a> {
    /// The cost model (its cluster gives device and link speeds).
    pub model: &'a CostModel,
    /// The tensor-parallel group.
    pub group: Group,
    /// Matrices at least this large in both dimensions must be split
    /// ([`ShardCost::must_split`]); `None`: any layout. The planner gives half the
    /// model's hidden size: the attention and MLP projections and the embedding and
    /// output layer, which Megatron-LM's, torchtitan's, DeepSpeed's and Hugging
    /// Face's tensor parallelism split, and not the routers or multi-head latent
    /// attention's down-projections, which Megatron-LM keeps whole.
    pub min_split_dim: Option<u64>,
}

impl<'a> ModelCost<'a> {
    /// `model` on a tensor-parallel group of `tp` devices inside one node (what the
    /// planner prices sharding with).
    pub fn tensor_parallel(model: &'a CostModel, tp: u32) -> ModelCost<'a> {
        ModelCost {
            model,
            group: Group {
                size: tp,
                per_node: tp,
            },
            min_split_dim: None,
        }
    }
}

impl ShardCost for ModelCost<'_> {
    fn op_cost(&self, op: &Op, inputs: &[&TensorType], results: &[&TensorType], env: Env) -> Cost {
        Cost::from_secs(
            self.model
                .op_time_unshaped(op, inputs, results, env, self.group),
        )
    }

    fn must_split(&self, full: &TensorType) -> bool {
        let (Some(min), [a, b]) = (self.min_split_dim, full.shape.dims()) else {
            return false;
        };
        matches!((a.as_lit(), b.as_lit()), (Some(a), Some(b)) if a >= min && b >= min)
    }

    fn param_cost(&self, ty: &TensorType, env: Env) -> Cost {
        let dev = &self.model.cluster.device;
        match ty.shape.numel_at(env) {
            Some(n) => Cost::from_secs(
                n as f64 * OPTIMIZER_BYTES_PER_PARAM
                    / (dev.memory_bandwidth * self.model.eff.memory),
            ),
            None => Cost::INFEASIBLE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{DType, Dim};

    #[test]
    fn cost_saturates_and_orders() {
        assert_eq!(Cost::INFEASIBLE + Cost::from_secs(1.0), Cost::INFEASIBLE);
        assert!(Cost::from_secs(1e-6) < Cost::from_secs(2e-6));
        assert_eq!(Cost::from_secs(f64::INFINITY), Cost::INFEASIBLE);
        assert_eq!(Cost::from_secs(-1.0), Cost::ZERO);
    }

    #[test]
    fn the_default_cluster_is_a_preset() {
        let m = default_cost_model();
        assert_eq!(m.cluster.devices(), 8);
    }

    #[test]
    fn ring_all_reduce_is_twice_a_reduce_scatter() {
        let mut cluster = default_cost_model().cluster.clone();
        cluster.intra_node.latency_s = 0.0;
        let model = CostModel::new(cluster);
        let c = ModelCost::tensor_parallel(&model, 8);
        let t = TensorType::new(DType::Bf16, [Dim::lit(8), Dim::lit(1 << 20)]);
        let env = Env::new(1, 1);
        let ar = c.op_cost(&Op::AllReduce { parts: 8 }, &[&t], &[&t], env);
        let half = TensorType::new(DType::Bf16, [Dim::lit(1), Dim::lit(1 << 20)]);
        let rs = c.op_cost(
            &Op::ReduceScatter { axis: 0, parts: 8 },
            &[&t],
            &[&half],
            env,
        );
        assert!(ar.picos().abs_diff(2 * rs.picos()) <= 2, "{ar:?} vs {rs:?}");
    }
}
