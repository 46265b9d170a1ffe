//! The cost model: roofline time per op, alpha-beta time per collective on the link a
//! group actually spans, point-to-point time for pipeline sends.
//!
//! The efficiencies (fractions of a peak a kernel class reaches) are per device type,
//! in a [`Calibration`] table ([`calibration`]): the built-in tables are
//! `calibration/*.json`, compiled in; a user's file replaces them (`--calibration`).
//! Matmul efficiency depends on the GEMM's shape ([`GemmModel`]). The A100 table was
//! fitted to Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
//! Transformer Models") Tables 4 and 5; the others come from public kernel benchmarks;
//! see the README's calibration section for what was fitted to what.

pub mod calibration;

pub use calibration::{Calibration, CalibrationError, GemmModel, Param};

use crate::cluster::{Cluster, Link};
use crate::ir::{DType, Env, Op, OpClass, TensorType};
use serde::Serialize;

/// Share of an attention op's counted FLOPs (every query against every key) that a
/// fused causal kernel executes: it skips the key blocks wholly above the diagonal, so
/// about half (FlashAttention-2, Dao 2023, section 3.1.1 "Causal masking": "about 1.7-1.8×
/// speedup"; its FLOP/s figures count causal attention at half the FLOPs). The
/// attention efficiencies of the tables are such FLOP/s figures.
pub const CAUSAL_WORK_FRACTION: f64 = 0.5;

/// A group of devices that communicate: its size and how it spans nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Group {
    /// Devices in the group.
    pub size: u32,
    /// Devices of the group on each node it touches (`size` when inside one node).
    pub per_node: u32,
}

impl Group {
    /// A group of one (no communication).
    pub const SINGLE: Group = Group {
        size: 1,
        per_node: 1,
    };

    /// Nodes the group spans.
    pub fn nodes(&self) -> u32 {
        self.size / self.per_node.max(1)
    }
}

/// Collective kinds priced by [`CostModel::collective_time`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collective {
    /// Sum to all.
    AllReduce,
    /// Concatenate to all; `bytes` is the gathered (output) size.
    AllGather,
    /// Sum and scatter; `bytes` is the input (unscattered) size.
    ReduceScatter,
    /// Personalized exchange; `bytes` is the per-device input size.
    AllToAll,
}

/// Prices ops and communication on one cluster.
#[derive(Clone, Debug)]
pub struct CostModel {
    /// The cluster.
    pub cluster: Cluster,
    /// The efficiencies in force: the device's built-in table, a user's calibration
    /// file, or the default table.
    pub eff: Calibration,
    /// Whether no built-in table lists the cluster's device and no calibration was
    /// given, so that [`Calibration::default_table`] prices it (plans warn).
    pub defaulted: bool,
}

impl CostModel {
    /// A cost model for `cluster` with its device's built-in table
    /// ([`Calibration::for_device`]), or the default table when there is none.
    pub fn new(cluster: Cluster) -> CostModel {
        let (eff, defaulted) = match Calibration::for_device(&cluster.device) {
            Some(c) => (c, false),
            None => (Calibration::default_table(), true),
        };
        CostModel {
            cluster,
            eff,
            defaulted,
        }
    }

    /// A cost model for `cluster` with a given calibration.
    pub fn with_calibration(cluster: Cluster, calibration: Calibration) -> CostModel {
        CostModel {
            cluster,
            eff: calibration,
            defaulted: false,
        }
    }

    fn link_time(&self, link: &Link, bytes: f64, steps: f64) -> f64 {
        bytes / (link.bandwidth * self.eff.link) + steps * link.latency_s
    }

    /// Time of a collective over `group` moving `bytes` (see [`Collective`]):
    /// ring algorithms inside a node, hierarchical (intra-node reduce-scatter,
    /// inter-node ring on `1/per_node` of the data, intra-node all-gather) across nodes.
    pub fn collective_time(&self, kind: Collective, bytes: f64, group: Group) -> f64 {
        let n = f64::from(group.size);
        if group.size <= 1 || bytes <= 0.0 {
            return 0.0;
        }
        let intra = &self.cluster.intra_node;
        let inter = &self.cluster.inter_node;
        let g = f64::from(group.per_node.max(1));
        let k = f64::from(group.nodes().max(1));
        // One ring pass: each device sends (n-1)/n of the data in n-1 steps.
        let ring = |link: &Link, ranks: f64, data: f64| {
            if ranks <= 1.0 {
                0.0
            } else {
                self.link_time(link, (ranks - 1.0) / ranks * data, ranks - 1.0)
            }
        };
        let passes = |data: f64, p: f64| -> f64 {
            if k <= 1.0 {
                p * ring(intra, g, data)
            } else {
                // Intra-node pass on the full data, inter-node pass on this device's
                // 1/g share, repeated `p` times (2 for all-reduce).
                p * (ring(intra, g, data) + ring(inter, k, data / g))
            }
        };
        match kind {
            Collective::AllReduce => passes(bytes, 2.0),
            Collective::AllGather | Collective::ReduceScatter => passes(bytes, 1.0),
            Collective::AllToAll => {
                let link = if k <= 1.0 { intra } else { inter };
                self.link_time(link, (n - 1.0) / n * bytes, n - 1.0)
            }
        }
    }

    /// Time to send `bytes` to one peer, on the intra- or inter-node link.
    pub fn p2p_time(&self, bytes: f64, cross_node: bool) -> f64 {
        let link = if cross_node {
            &self.cluster.inter_node
        } else {
            &self.cluster.intra_node
        };
        self.link_time(link, bytes, 1.0)
    }

    /// Time of one op on one device (collectives over `tp_group`), in seconds.
    pub fn op_time(
        &self,
        op: &Op,
        inputs: &[&TensorType],
        results: &[&TensorType],
        env: Env,
        tp_group: Group,
    ) -> f64 {
        self.op_time_at(op, inputs, results, env, tp_group, true)
    }

    /// [`CostModel::op_time`] with every matmul at the large-GEMM efficiency (no
    /// [`GemmModel`] penalty): what the sharder compares layouts with. It prices a
    /// block at one sequence per micro-batch, where tile and wave quantization would
    /// make every split of a small GEMM look free or worthless; the chosen layout is
    /// then priced with the shape model at the micro-batch it runs at.
    pub fn op_time_unshaped(
        &self,
        op: &Op,
        inputs: &[&TensorType],
        results: &[&TensorType],
        env: Env,
        tp_group: Group,
    ) -> f64 {
        self.op_time_at(op, inputs, results, env, tp_group, false)
    }

    fn op_time_at(
        &self,
        op: &Op,
        inputs: &[&TensorType],
        results: &[&TensorType],
        env: Env,
        tp_group: Group,
        gemm_shapes: bool,
    ) -> f64 {
        let Some(c) = op.cost(inputs, results, env) else {
            return f64::INFINITY;
        };
        let dev = &self.cluster.device;
        let (flops, bytes) = (c.flops as f64, c.bytes as f64);
        let e = &self.eff;
        let mem = bytes / (dev.memory_bandwidth * e.memory);
        let in_bytes = || inputs.first().and_then(|t| t.bytes_at(env)).unwrap_or(0) as f64;
        let out_bytes = || results.first().and_then(|t| t.bytes_at(env)).unwrap_or(0) as f64;
        // fp32 matmuls run on the fp32 pipes: PyTorch disallows TF32 for matmuls by
        // default since 1.12 (`torch.backends.cuda.matmul.allow_tf32 = False`, "CUDA
        // semantics", TensorFloat-32 section); bf16 and fp16 ones on the tensor cores.
        let fp32 = inputs.first().is_some_and(|t| t.dtype == DType::F32);
        let tensor_peak = if fp32 {
            dev.peak_fp32_flops
        } else {
            dev.peak_bf16_flops
        };
        match op.info().class {
            OpClass::Source => 0.0,
            OpClass::MatMul => {
                let eff = match op.gemm(inputs, env) {
                    Some(g) if gemm_shapes => e.matmul_efficiency(g),
                    _ => e.matmul,
                };
                (flops / (tensor_peak * eff)).max(mem)
            }
            OpClass::Attention => {
                let grad = matches!(op, Op::FlashAttentionGrad { .. } | Op::SdpaGrad { .. });
                let causal = matches!(
                    op,
                    Op::FlashAttention { causal: true, .. }
                        | Op::FlashAttentionGrad { causal: true, .. }
                        | Op::Sdpa { causal: true, .. }
                        | Op::SdpaGrad { causal: true, .. }
                );
                let eff = if grad { e.attention_bwd } else { e.attention };
                let work = if causal { CAUSAL_WORK_FRACTION } else { 1.0 };
                (work * flops / (tensor_peak * eff)).max(mem)
            }
            OpClass::Elementwise | OpClass::Reduction | OpClass::Optimizer => {
                mem.max(flops / dev.peak_fp32_flops)
            }
            OpClass::Layout => {
                if op.is_view() {
                    0.0
                } else {
                    mem
                }
            }
            OpClass::Collective => match op {
                Op::AllReduce { .. } => {
                    self.collective_time(Collective::AllReduce, in_bytes(), tp_group)
                }
                Op::AllGather { .. } => {
                    self.collective_time(Collective::AllGather, out_bytes(), tp_group)
                }
                Op::ReduceScatter { .. } => {
                    self.collective_time(Collective::ReduceScatter, in_bytes(), tp_group)
                }
                _ => self.collective_time(Collective::AllToAll, in_bytes(), tp_group),
            },
            OpClass::P2p => self.p2p_time(in_bytes().max(out_bytes()), false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;

    #[test]
    fn ring_all_reduce_follows_the_alpha_beta_formula() {
        let c = Cluster::resolve("dgx-a100-80g:1").unwrap();
        let m = CostModel::new(c.clone());
        let bytes = 1e9;
        let t = m.collective_time(
            Collective::AllReduce,
            bytes,
            Group {
                size: 8,
                per_node: 8,
            },
        );
        // Ring all-reduce: 2(n-1)/n · S / (B·eff) + 2(n-1)·α (Thakur et al. 2005).
        let expected = 2.0 * 7.0 / 8.0 * bytes / (c.intra_node.bandwidth * m.eff.link)
            + 14.0 * c.intra_node.latency_s;
        assert!((t - expected).abs() / expected < 1e-12);
        // Across nodes the inter-node share dominates and the time grows.
        let across = m.collective_time(
            Collective::AllReduce,
            bytes,
            Group {
                size: 64,
                per_node: 8,
            },
        );
        assert!(across > t);
        assert_eq!(
            m.collective_time(Collective::AllReduce, bytes, Group::SINGLE),
            0.0
        );
    }
}
