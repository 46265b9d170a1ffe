//! Costs outside the training graph's ops: the host's kernel launches and the
//! gradient-norm clipping before the optimizer step.
//!
//! - **Kernel launches.** Engines run eagerly: the host issues every kernel through
//!   the framework's dispatcher and `cudaLaunchKernel`, one after another, so a kernel
//!   shorter than a launch waits for the next launch: every kernel takes at least
//!   [`KERNEL_LAUNCH_S`] (applied per op in `crate::lower::profile`). Kernels are the
//!   graph's ops that are neither views, sources nor collectives (the collectives are
//!   priced with their own latency). Large kernels are device-bound and unaffected;
//!   small models, small micro-batches and thin tensor-parallel shards become
//!   host-bound, and the overhead grows with the layers and the micro-batches.
//! - **Gradient clipping** (Megatron-LM `clip_grad_norm_fp32`, DeepSpeed
//!   `gradient_clipping`, torchtitan `clip_grad_norm_`, all on by default at 1.0):
//!   each rank reads the gradients its optimizer updates once to take their norm
//!   (memory-bound), then all-reduces one fp32 scalar over the ranks holding the rest
//!   of the gradients — a latency-bound collective
//!   ([`CostModel::grad_clip_time`]).

use super::{Collective, CostModel, Group};

/// Host time to issue one kernel, seconds: 5 µs. CUDA's launch overhead is a few
/// microseconds per kernel (NVIDIA, "Getting Started with CUDA Graphs", 2019: a
/// kernel launch "of the order of a few microseconds"; the brief of issue 10), and
/// PyTorch's eager dispatch adds its own microseconds per op.
pub const KERNEL_LAUNCH_S: f64 = 5e-6;

/// Bytes of the all-reduced norm: one fp32 scalar (the squared norm).
pub const GRAD_NORM_BYTES: f64 = 4.0;

impl CostModel {
    /// Host time to launch `kernels` kernels ([`KERNEL_LAUNCH_S`] each).
    pub fn launch_time(&self, kernels: u32) -> f64 {
        f64::from(kernels) * KERNEL_LAUNCH_S
    }

    /// Gradient clipping on one device: a read of `grad_bytes` (the gradients its
    /// optimizer updates) at the memory-bound efficiency, then an all-reduce of the
    /// squared norm ([`GRAD_NORM_BYTES`]) over `group`.
    pub fn grad_clip_time(&self, grad_bytes: f64, group: Group) -> f64 {
        let read = grad_bytes / (self.cluster.device.memory_bandwidth * self.eff.memory);
        read + self.collective_time(Collective::AllReduce, GRAD_NORM_BYTES, group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;

    #[test]
    fn clipping_reads_the_gradients_once_and_all_reduces_a_scalar() {
        let c = Cluster::resolve("dgx-a100-80g:1").unwrap();
        let m = CostModel::new(c.clone());
        let bytes = 4e9;
        let alone = m.grad_clip_time(bytes, Group::SINGLE);
        let read = bytes / (c.device.memory_bandwidth * m.eff.memory);
        assert!((alone - read).abs() / read < 1e-12);
        // Over 8 GPUs of a node: plus a ring all-reduce of 4 bytes, 2(n-1) = 14
        // intra-node latencies (NCCL tuning.cc) and a negligible transfer.
        let group = Group {
            size: 8,
            per_node: 8,
        };
        let with = m.grad_clip_time(bytes, group);
        let lat = 14.0 * c.intra_node.latency_s;
        assert!(with - alone >= lat && with - alone < lat * 1.001);
        assert!((m.launch_time(100) - 100.0 * KERNEL_LAUNCH_S).abs() < 1e-15);
    }
}
