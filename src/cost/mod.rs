//! The cost model: roofline time per op, alpha-beta time per collective on the link a
//! group actually spans, point-to-point time for pipeline sends.
//!
//! The efficiencies (fractions of a peak a kernel class reaches) are per device type,
//! in a [`Calibration`] table ([`calibration`]): the built-in tables are
//! `calibration/*.json`, compiled in; a user's file replaces them (`--calibration`).
//! Matmul efficiency depends on the GEMM's shape ([`GemmModel`]). The A100 table's
//! `matmul` was fitted to Korthikanti et al. 2022 ("Reducing Activation Recomputation
//! in Large Transformer Models") Tables 4 and 5; the other values come from public
//! kernel benchmarks and measurements (the compute slowdown beside an overlapped
//! collective from Lee et al. 2025); see the README's calibration section for what
//! was fitted to what.

pub mod calibration;

pub use calibration::{Calibration, CalibrationError, GemmModel, Param};

pub mod collective;
pub mod overhead;

use crate::cluster::Cluster;
use crate::ir::{DType, Env, Op, OpClass, TensorType};
use serde::Serialize;

/// Share of an attention op's counted FLOPs (every query against every key) that a
/// fused causal kernel executes: it skips the key blocks wholly above the diagonal, so
/// about half (FlashAttention-2, Dao 2023, section 3.1.1 "Causal masking": "about 1.7-1.8×
/// speedup"; its FLOP/s figures count causal attention at half the FLOPs). The
/// attention efficiencies of the tables are such FLOP/s figures.
pub const CAUSAL_WORK_FRACTION: f64 = 0.5;

/// Share of `op`'s counted FLOPs ([`crate::ir::Op::cost`]) that its kernel executes:
/// [`CAUSAL_WORK_FRACTION`] for causal attention, whole for everything else. HFU counts
/// FLOPs at this share, and the time model prices them.
pub fn executed_share(op: &Op) -> f64 {
    let causal = matches!(
        op,
        Op::FlashAttention { causal: true, .. }
            | Op::FlashAttentionGrad { causal: true, .. }
            | Op::Sdpa { causal: true, .. }
            | Op::SdpaGrad { causal: true, .. }
    );
    if causal {
        CAUSAL_WORK_FRACTION
    } else {
        1.0
    }
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
            OpClass::MatMul => {
                let eff = match op.gemm(inputs, env) {
                    Some(g) if gemm_shapes => e.matmul_efficiency(g),
                    _ => e.matmul,
                };
                (flops / (tensor_peak * eff)).max(mem)
            }
            OpClass::Attention => {
                let grad = matches!(op, Op::FlashAttentionGrad { .. } | Op::SdpaGrad { .. });
                let eff = if grad { e.attention_bwd } else { e.attention };
                (executed_share(op) * flops / (tensor_peak * eff)).max(mem)
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
            OpClass::Collective => match collective::collective_of(op, inputs, results, env) {
                Some((kind, bytes)) => self.collective_time(kind, bytes, tp_group),
                None => 0.0,
            },
            OpClass::P2p => self.p2p_time(in_bytes().max(out_bytes()), false),
        }
    }
}
