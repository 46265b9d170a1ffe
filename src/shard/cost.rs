//! What extraction minimizes: per-device compute time plus collective time on the link
//! the tensor-parallel group spans, behind the [`ShardCost`] trait.
//!
//! [`PlaceholderCost`] is a plain roofline with named constants (A100-class numbers,
//! sources below); [`ModelCost`] plugs in the crate's calibrated
//! [`CostModel`]. Both price one device: a replicated op costs
//! its full time on every device, a split op its share.

use crate::cost::{CostModel, Group};
use crate::ir::{Env, Op, TensorType};
use serde::Serialize;
use std::fmt;
use std::iter::Sum;
use std::ops::Add;

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
}

/// Constants of [`PlaceholderCost`]: placeholders until the sharder is wired to the
/// calibrated cost model ([`ModelCost`]), chosen so that extraction has the right
/// orders of magnitude.
pub mod placeholder {
    /// Dense bf16 FLOP/s of an A100 (NVIDIA A100 datasheet: 312 TFLOP/s).
    pub const PEAK_FLOPS: f64 = 312e12;
    /// HBM bandwidth of an A100-80GB, bytes/s (NVIDIA A100 datasheet: 2,039 GB/s).
    pub const MEMORY_BANDWIDTH: f64 = 2.039e12;
    /// NVLink 3 bandwidth per direction, bytes/s (A100 datasheet: 600 GB/s total).
    pub const LINK_BANDWIDTH: f64 = 300e9;
    /// Latency of one ring step, seconds (order of NCCL's intra-node step latency).
    pub const LINK_LATENCY_S: f64 = 5e-6;
    /// Bytes an optimizer step touches per parameter element: the `2 + 2 + 12` bytes of
    /// mixed-precision Adam's model states (Rajbhandari et al. 2020, Sec. 3.1).
    pub const PARAM_BYTES_PER_ELEMENT: f64 = 16.0;
}

/// A roofline for compute (`max(flops / peak, bytes / bandwidth)`, views free) and
/// ring alpha-beta times for collectives (Thakur et al. 2005).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PlaceholderCost {
    /// Peak FLOP/s.
    pub peak_flops: f64,
    /// Memory bandwidth, bytes/s.
    pub memory_bandwidth: f64,
    /// Link bandwidth per direction, bytes/s.
    pub link_bandwidth: f64,
    /// Latency per ring step, seconds.
    pub link_latency_s: f64,
    /// Optimizer-step bytes per parameter element.
    pub param_bytes_per_element: f64,
}

impl Default for PlaceholderCost {
    fn default() -> PlaceholderCost {
        PlaceholderCost {
            peak_flops: placeholder::PEAK_FLOPS,
            memory_bandwidth: placeholder::MEMORY_BANDWIDTH,
            link_bandwidth: placeholder::LINK_BANDWIDTH,
            link_latency_s: placeholder::LINK_LATENCY_S,
            param_bytes_per_element: placeholder::PARAM_BYTES_PER_ELEMENT,
        }
    }
}

impl PlaceholderCost {
    /// Ring time for `steps` steps moving `bytes` per device in total.
    fn ring(&self, bytes: f64, steps: f64) -> f64 {
        bytes / self.link_bandwidth + steps * self.link_latency_s
    }
}

impl ShardCost for PlaceholderCost {
    fn op_cost(&self, op: &Op, inputs: &[&TensorType], results: &[&TensorType], env: Env) -> Cost {
        let Some(c) = op.cost(inputs, results, env) else {
            return Cost::INFEASIBLE;
        };
        let bytes = |ts: &[&TensorType]| -> f64 {
            ts.first()
                .and_then(|t| t.bytes_at(env))
                .map_or(0.0, |b| b as f64)
        };
        let steps = |parts: u32| f64::from(parts.saturating_sub(1));
        let frac = |parts: u32| steps(parts) / f64::from(parts.max(1));
        let secs = match op {
            Op::AllReduce { parts } => {
                self.ring(2.0 * frac(*parts) * bytes(inputs), 2.0 * steps(*parts))
            }
            Op::AllGather { parts, .. } | Op::TpGather { parts, .. } => {
                self.ring(frac(*parts) * bytes(results), steps(*parts))
            }
            Op::ReduceScatter { parts, .. } | Op::AllToAll { parts, .. } => {
                self.ring(frac(*parts) * bytes(inputs), steps(*parts))
            }
            _ if op.is_view() => 0.0,
            _ => (c.flops as f64 / self.peak_flops).max(c.bytes as f64 / self.memory_bandwidth),
        };
        Cost::from_secs(secs)
    }

    fn param_cost(&self, ty: &TensorType, env: Env) -> Cost {
        match ty.shape.numel_at(env) {
            Some(n) => {
                Cost::from_secs(n as f64 * self.param_bytes_per_element / self.memory_bandwidth)
            }
            None => Cost::INFEASIBLE,
        }
    }
}

/// The calibrated [`CostModel`] on the group the tensor-parallel devices span.
#[derive(Clone, Copy, Debug)]
pub struct ModelCost<'a> {
    /// The cost model (its cluster gives device and link speeds).
    pub model: &'a CostModel,
    /// The tensor-parallel group.
    pub group: Group,
}

impl ShardCost for ModelCost<'_> {
    fn op_cost(&self, op: &Op, inputs: &[&TensorType], results: &[&TensorType], env: Env) -> Cost {
        Cost::from_secs(self.model.op_time(op, inputs, results, env, self.group))
    }

    fn param_cost(&self, ty: &TensorType, env: Env) -> Cost {
        let dev = &self.model.cluster.device;
        match ty.shape.numel_at(env) {
            Some(n) => Cost::from_secs(
                n as f64 * placeholder::PARAM_BYTES_PER_ELEMENT
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
    fn ring_all_reduce_is_twice_a_reduce_scatter() {
        let c = PlaceholderCost {
            link_latency_s: 0.0,
            ..PlaceholderCost::default()
        };
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
