//! The cost model: roofline time per op, alpha-beta time per collective on the link a
//! group actually spans, point-to-point time for pipeline sends.
//!
//! Every efficiency is a named constant ([`eff`]). The values were fitted to Korthikanti
//! et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") Table 4
//! (per-layer forward/backward times of the 22B model on DGX A100) and Table 5
//! (iteration times); see the README's calibration section for what was fitted to what.

pub mod collective;
pub mod overhead;

use crate::cluster::Cluster;
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
            OpClass::Collective => match collective::collective_of(op, inputs, results, env) {
                Some((kind, bytes)) => self.collective_time(kind, bytes, tp_group),
                None => 0.0,
            },
            OpClass::P2p => self.p2p_time(in_bytes().max(out_bytes()), false),
        }
    }
}
