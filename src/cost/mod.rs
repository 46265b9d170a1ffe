//! The cost model: roofline time per op, alpha-beta time per collective on the link a
//! group actually spans, point-to-point time for pipeline sends.
//!
//! Every efficiency is a named constant ([`eff`]). The values were fitted to Korthikanti
//! et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") Table 4
//! (per-layer forward/backward times of the 22B model on DGX A100) and Table 5
//! (iteration times); see the README's calibration section for what was fitted to what.

use crate::cluster::{Cluster, Link};
use crate::ir::{DType, Env, Op, OpClass, TensorType};
use serde::Serialize;

/// Efficiency constants (fraction of a peak a kernel class reaches).
///
/// `MATMUL`, `MEMORY` and `LINK` were fitted together, by a coarse grid search
/// (`cargo run --release --example calibrate -- MATMUL MEMORY LINK`), to Korthikanti et
/// al. 2022 Table 4 (22B per-layer forward 7.7 ms, backward 11.9 ms, 19.5 ms with full
/// and 13.2 ms with selective recomputation) and Table 5 (eight iteration times on DGX
/// A100, t = 8), minimizing the largest relative error (4.9% at these values; see
/// `tests/calibration.rs`). Nothing else was fitted.
pub mod eff {
    /// Dense bf16 matmuls: fraction of peak tensor FLOP/s (fitted).
    pub const MATMUL: f64 = 0.75;
    /// Fused attention kernels: fraction of peak tensor FLOP/s. Not fitted (the
    /// calibration models use decomposed attention); FlashAttention-2 (Dao 2023) reports
    /// 50–73% of A100 peak forward, we take the low end.
    pub const ATTENTION: f64 = 0.5;
    /// Memory-bound kernels (elementwise, norms, softmax, layout copies, optimizer):
    /// fraction of HBM bandwidth (fitted).
    pub const MEMORY: f64 = 0.8;
    /// Collectives and point-to-point: fraction of link bandwidth (fitted).
    pub const LINK: f64 = 0.85;
}

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

/// The efficiencies a cost model uses; [`Efficiencies::CALIBRATED`] holds the
/// constants of [`eff`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Efficiencies {
    /// See [`eff::MATMUL`].
    pub matmul: f64,
    /// See [`eff::ATTENTION`].
    pub attention: f64,
    /// See [`eff::MEMORY`].
    pub memory: f64,
    /// See [`eff::LINK`].
    pub link: f64,
}

impl Efficiencies {
    /// The calibrated constants.
    pub const CALIBRATED: Efficiencies = Efficiencies {
        matmul: eff::MATMUL,
        attention: eff::ATTENTION,
        memory: eff::MEMORY,
        link: eff::LINK,
    };
}

/// Prices ops and communication on one cluster.
#[derive(Clone, Debug)]
pub struct CostModel {
    /// The cluster.
    pub cluster: Cluster,
    /// The efficiencies (calibrated unless a calibration run varies them).
    pub eff: Efficiencies,
}

impl CostModel {
    /// A cost model for `cluster` with the calibrated efficiencies.
    pub fn new(cluster: Cluster) -> CostModel {
        CostModel {
            cluster,
            eff: Efficiencies::CALIBRATED,
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
        // FP8 operands run at the device's FP8 tensor peak (a device without one runs
        // them at its bf16 peak; the engine rules refuse FP8 on such devices).
        let fp8 = inputs.len() >= 2 && inputs.iter().take(2).all(|t| t.dtype.is_fp8());
        let tensor_peak = if fp32 {
            dev.peak_fp32_flops
        } else if fp8 {
            dev.peak_fp8_flops.unwrap_or(dev.peak_bf16_flops)
        } else {
            dev.peak_bf16_flops
        };
        match op.info().class {
            OpClass::Source => 0.0,
            OpClass::MatMul => (flops / (tensor_peak * e.matmul)).max(mem),
            OpClass::Attention => (flops / (tensor_peak * e.attention)).max(mem),
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
        let expected = 2.0 * 7.0 / 8.0 * bytes / (c.intra_node.bandwidth * eff::LINK)
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
