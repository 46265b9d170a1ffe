//! Collectives and point-to-point sends as NCCL runs them: alpha-beta time of the ring
//! and of the double binary tree, and NCCL's own choice between them.
//!
//! **Transfer (beta) terms.** A ring pass moves `(n-1)/n` of the data through every
//! device (Thakur et al. 2005, "Optimization of Collective Communication Operations in
//! MPICH"). NCCL runs one ring per channel, and across nodes each channel's ring leaves
//! the node through its own NIC (one NIC per GPU, so `g` channels for `g` devices of
//! the group per node): each NIC carries `1/g` of the pass, `(n-1)/n · S/g`, while each
//! device's NVLink carries the `(g-1)/g` of the channels it forwards inside the node.
//! The chunks are pipelined, so both links move their shares at once and the slower
//! one sets the time: a pass costs
//! `(n-1)/n · S · max((g-1)/g / B_intra, 1/(g · B_inter))` for `g` devices per node
//! (NCCL's own tuning model prices a multi-node ring at `nChannels ·` the inter-node
//! bandwidth per channel, `src/graph/tuning.cc`). Measured: two or three nodes of 8 ×
//! A100 with 4 × HDR NICs (100 GB/s per node) reach an all-reduce bus bandwidth of
//! 84.8–96 GB/s (NVIDIA/nccl-tests issue #119; NVIDIA/nccl issue #1048: 86 GB/s), the
//! node's NIC bandwidth at 0.85–0.96 efficiency, which this form gives and a sum of an
//! intra- and an inter-node term would halve. All-reduce is two passes
//! (reduce-scatter then all-gather). The tree all-reduce moves the same bytes, the
//! intra-node chain and the inter-node tree pipelined likewise, but NCCL models it at
//! 0.9 of the ring's bus bandwidth ([`nccl::TREE_BW_FRACTION`]).
//!
//! **Latency (alpha) terms**, as NCCL's tuning model (`src/graph/tuning.cc`,
//! `ncclTopoTuneModel`) counts them, with the cluster's per-step link latencies
//! `α_intra`, `α_inter`:
//!
//! - ring: `nsteps` steps, `nsteps = 2(n-1)` for all-reduce and `n-1` for all-gather
//!   and reduce-scatter, of which `2(k-1)` (resp. `k-1`) cross nodes:
//!   `(nsteps - ninter)·α_intra + ninter·α_inter`. It grows linearly with the ranks:
//!   at 1,024 ranks on 128 nodes an all-reduce pays 2,046 steps.
//! - tree (all-reduce only; NCCL has no tree for the others): a chain inside each node
//!   and a double binary tree across nodes, up and down:
//!   `2·((g-1)·α_intra + log2(k)·α_inter)` (Sanders et al. 2009, "Two-tree algorithms
//!   for full bandwidth broadcast, reduction and scan"; NVIDIA, "Massively Scale Your
//!   Deep Learning Training with NCCL 2.4", 2019: "latency … logarithmic" in the
//!   number of nodes).
//!
//! NCCL predicts both times and runs the faster (`ncclTopoGetAlgoTime`, the minimum
//! over algorithms): the ring for large messages on few nodes, the tree for small
//! messages and many nodes. Inside one node (`k = 1`) the tree's latency equals the
//! ring's and its bandwidth is lower, so the ring always wins there.

use super::{Collective, CostModel, Group};
use crate::cluster::Link;
use crate::ir::{Env, Op, TensorType};

/// NCCL's tuning-model constants (NCCL `src/graph/tuning.cc`, `ncclTopoTuneModel`).
pub mod nccl {
    /// Tree bus bandwidth as a fraction of the ring's: `busBw = min(busBw*.9,
    /// maxTreeBw)` for the tree algorithm.
    pub const TREE_BW_FRACTION: f64 = 0.9;
    /// Extra link latencies a point-to-point transfer pays beyond its one message: the
    /// receiver posts its buffer and returns a credit before the sender's data flows
    /// (NCCL's p2p protocol is a rendezvous on a connection's FIFO: the sender waits
    /// for the receiver's ready signal, `src/transport/p2p.cc` / `net.cc` `sendProxy`
    /// waiting on `recvTail`), one link latency.
    pub const P2P_HANDSHAKE_LATENCIES: f64 = 1.0;
}

/// Which algorithm NCCL runs a collective with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Ring (every collective).
    Ring,
    /// Double binary tree (all-reduce across nodes).
    Tree,
}

/// The time of one collective, split into its alpha and beta terms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CollectiveCost {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Latency term, seconds (does not depend on the message size).
    pub latency_s: f64,
    /// Transfer term, seconds (proportional to the message size).
    pub transfer_s: f64,
}

impl CollectiveCost {
    /// No communication.
    pub const ZERO: CollectiveCost = CollectiveCost {
        algorithm: Algorithm::Ring,
        latency_s: 0.0,
        transfer_s: 0.0,
    };

    /// Latency plus transfer.
    pub fn total(&self) -> f64 {
        self.latency_s + self.transfer_s
    }
}

/// The collective an op runs and the bytes its time is priced on ([`Collective`]
/// spells out which size), or `None` for an op that communicates nothing.
///
/// `tp_gather` (Megatron-LM's "gather from tensor-parallel region") is an all-gather
/// of its gathered output; its backward is a local split (`tp_split`, no
/// communication).
pub fn collective_of(
    op: &Op,
    inputs: &[&TensorType],
    results: &[&TensorType],
    env: Env,
) -> Option<(Collective, f64)> {
    let in_bytes = || inputs.first().and_then(|t| t.bytes_at(env)).unwrap_or(0) as f64;
    let out_bytes = || results.first().and_then(|t| t.bytes_at(env)).unwrap_or(0) as f64;
    match op {
        Op::AllReduce { .. } => Some((Collective::AllReduce, in_bytes())),
        Op::AllGather { .. } | Op::TpGather { .. } => Some((Collective::AllGather, out_bytes())),
        Op::ReduceScatter { .. } => Some((Collective::ReduceScatter, in_bytes())),
        Op::AllToAll { .. } => Some((Collective::AllToAll, in_bytes())),
        _ => None,
    }
}

impl CostModel {
    fn transfer(&self, link: &Link, bytes: f64) -> f64 {
        bytes / (link.bandwidth * self.eff.link)
    }

    /// The ring algorithm's cost (see the module doc).
    pub fn ring_cost(&self, kind: Collective, bytes: f64, group: Group) -> CollectiveCost {
        if group.size <= 1 || bytes <= 0.0 {
            return CollectiveCost::ZERO;
        }
        let intra = &self.cluster.intra_node;
        let inter = &self.cluster.inter_node;
        let n = f64::from(group.size);
        let g = f64::from(group.per_node.max(1)).min(n);
        let k = f64::from(group.nodes().max(1));
        if kind == Collective::AllToAll {
            // Personalized exchange: each rank sends S/n to each of its n-1 peers
            // (NCCL runs it as grouped point-to-point sends, nccl-tests `alltoall.cu`,
            // bus bandwidth = algorithm bandwidth · (n-1)/n, nccl-tests
            // `doc/PERFORMANCE.md`). Of the n-1 messages, g-1 stay on the node's
            // links and n-g leave through the rank's own NIC; both links move their
            // share at once, so the slower share sets the time
            // (`max((g-1)/n · S/B_intra, (n-g)/n · S/B_inter)`; inside one node,
            // `(n-1)/n · S/B_intra`). Latency: n-1 messages on the slowest link the
            // group spans.
            let link = if k <= 1.0 { intra } else { inter };
            let transfer = self
                .transfer(intra, (g - 1.0) / n * bytes)
                .max(self.transfer(inter, (n - g) / n * bytes));
            return CollectiveCost {
                algorithm: Algorithm::Ring,
                latency_s: (n - 1.0) * link.latency_s,
                transfer_s: transfer,
            };
        }
        let passes = if kind == Collective::AllReduce {
            2.0
        } else {
            1.0
        };
        // One pass: (n-1)/n of the bytes; inside one node all of it on the intra-node
        // link, across nodes the larger of each device's NVLink share and its NIC's.
        let pass = (n - 1.0) / n * bytes;
        let transfer = if k > 1.0 {
            self.transfer(intra, (g - 1.0) / g * pass)
                .max(self.transfer(inter, pass / g))
        } else {
            self.transfer(intra, pass)
        };
        let steps = passes * (n - 1.0);
        let inter_steps = passes * (k - 1.0);
        CollectiveCost {
            algorithm: Algorithm::Ring,
            latency_s: (steps - inter_steps) * intra.latency_s + inter_steps * inter.latency_s,
            transfer_s: passes * transfer,
        }
    }

    /// The double binary tree's cost for an all-reduce across nodes; `None` for
    /// other collectives and inside one node (NCCL runs the ring there).
    pub fn tree_cost(&self, kind: Collective, bytes: f64, group: Group) -> Option<CollectiveCost> {
        if kind != Collective::AllReduce || group.nodes() <= 1 || bytes <= 0.0 {
            return None;
        }
        let intra = &self.cluster.intra_node;
        let inter = &self.cluster.inter_node;
        let g = f64::from(group.per_node.max(1));
        let k = group.nodes();
        // NCCL's `log2i`: the floor of the base-2 logarithm.
        let log2k = f64::from(31 - k.leading_zeros());
        let transfer = self
            .transfer(intra, (g - 1.0) / g * bytes)
            .max(self.transfer(inter, bytes / g));
        Some(CollectiveCost {
            algorithm: Algorithm::Tree,
            latency_s: 2.0 * ((g - 1.0) * intra.latency_s + log2k * inter.latency_s),
            transfer_s: 2.0 * transfer / nccl::TREE_BW_FRACTION,
        })
    }

    /// The cost of a collective over `group` moving `bytes` (see [`Collective`]) with
    /// the algorithm NCCL picks: the faster of ring and tree.
    pub fn collective_cost(&self, kind: Collective, bytes: f64, group: Group) -> CollectiveCost {
        let ring = self.ring_cost(kind, bytes, group);
        match self.tree_cost(kind, bytes, group) {
            Some(tree) if tree.total() < ring.total() => tree,
            _ => ring,
        }
    }

    /// Time of a collective over `group` moving `bytes` ([`CostModel::collective_cost`]).
    pub fn collective_time(&self, kind: Collective, bytes: f64, group: Group) -> f64 {
        self.collective_cost(kind, bytes, group).total()
    }

    /// Time to send `bytes` to one peer, on the intra- or inter-node link: the
    /// transfer, the message's latency and the receiver's handshake
    /// ([`nccl::P2P_HANDSHAKE_LATENCIES`]).
    pub fn p2p_time(&self, bytes: f64, cross_node: bool) -> f64 {
        let link = if cross_node {
            &self.cluster.inter_node
        } else {
            &self.cluster.intra_node
        };
        if bytes <= 0.0 {
            return 0.0;
        }
        self.transfer(link, bytes) + (1.0 + nccl::P2P_HANDSHAKE_LATENCIES) * link.latency_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;

    fn group(size: u32, per_node: u32) -> Group {
        Group { size, per_node }
    }

    #[test]
    fn ring_all_reduce_follows_the_alpha_beta_formula() {
        let c = Cluster::resolve("dgx-a100-80g:1").unwrap();
        let m = CostModel::new(c.clone());
        let bytes = 1e9;
        let t = m.collective_time(Collective::AllReduce, bytes, group(8, 8));
        // Ring all-reduce: 2(n-1)/n · S / (B·eff) + 2(n-1)·α (Thakur et al. 2005).
        let expected = 2.0 * 7.0 / 8.0 * bytes / (c.intra_node.bandwidth * m.eff.link)
            + 14.0 * c.intra_node.latency_s;
        assert!((t - expected).abs() / expected < 1e-12);
        // Across nodes the inter-node share dominates and the time grows.
        assert!(m.collective_time(Collective::AllReduce, bytes, group(64, 8)) > t);
        assert_eq!(
            m.collective_time(Collective::AllReduce, bytes, Group::SINGLE),
            0.0
        );
    }

    #[test]
    fn multi_node_ring_runs_at_the_node_nic_bandwidth_as_nccl_tests_measure() {
        // Two nodes of 8 × A100 with 4 × HDR InfiniBand (200 Gb/s) each: 100 GB/s per
        // node, 12.5 GB/s per GPU. nccl-tests all_reduce_perf measured a bus bandwidth
        // of 86 GB/s there (NVIDIA/nccl issue #1048), and 84.8 GB/s average, 96 GB/s
        // peak on three such nodes (NVIDIA/nccl-tests issue #119).
        let mut c = Cluster::resolve("dgx-a100-40g:2").unwrap();
        c.inter_node.bandwidth = 4.0 * 25e9 / 8.0;
        let m = CostModel::new(c);
        let bytes = 4e9;
        let g = group(16, 8);
        let t = m.ring_cost(Collective::AllReduce, bytes, g).total();
        // nccl-tests' bus bandwidth: algbw · 2(n-1)/n.
        let busbw = bytes / t * 2.0 * 15.0 / 16.0;
        assert!(
            (0.85..=1.15).contains(&(busbw / 86e9)),
            "bus bandwidth {busbw:e}"
        );
        // The three-node run.
        let t3 = m
            .ring_cost(Collective::AllReduce, bytes, group(24, 8))
            .total();
        let busbw3 = bytes / t3 * 2.0 * 23.0 / 24.0;
        assert!(
            (0.85..=1.15).contains(&(busbw3 / 84.8e9)),
            "bus bandwidth {busbw3:e}"
        );
    }

    #[test]
    fn ring_latency_counts_nccl_steps_and_tree_latency_is_logarithmic() {
        let c = Cluster::resolve("dgx-a100-80g:128").unwrap();
        let m = CostModel::new(c.clone());
        let (ai, an) = (c.intra_node.latency_s, c.inter_node.latency_s);
        // 1,024 ranks, 8 per node on 128 nodes. NCCL tuning.cc: ring all-reduce has
        // 2(n-1) = 2046 steps of which 2(k-1) = 254 cross nodes.
        let g = group(1024, 8);
        let ring = m.ring_cost(Collective::AllReduce, 1e6, g);
        let want = (2046.0 - 254.0) * ai + 254.0 * an;
        assert!((ring.latency_s - want).abs() < 1e-12);
        // All-gather: n-1 = 1023 steps, k-1 = 127 across nodes.
        let ag = m.ring_cost(Collective::AllGather, 1e6, g);
        assert!((ag.latency_s - ((1023.0 - 127.0) * ai + 127.0 * an)).abs() < 1e-12);
        // Tree: 2((g-1)·α_intra + log2(k)·α_inter) = 2(7·α_intra + 7·α_inter).
        let tree = m.tree_cost(Collective::AllReduce, 1e6, g).unwrap();
        assert!((tree.latency_s - 2.0 * (7.0 * ai + 7.0 * an)).abs() < 1e-12);
        // Its transfer is the ring's at n → ∞ over NCCL's 0.9 bandwidth factor: the
        // intra-node chain and the inter-node tree pipelined, the slower link setting it.
        let beta = 2.0
            * (7.0 / 8.0 * 1e6 / (c.intra_node.bandwidth * m.eff.link))
                .max(1e6 / 8.0 / (c.inter_node.bandwidth * m.eff.link))
            / 0.9;
        assert!((tree.transfer_s - beta).abs() / beta < 1e-12);
        // No tree for all-gather, nor inside one node.
        assert!(m.tree_cost(Collective::AllGather, 1e6, g).is_none());
        assert!(m
            .tree_cost(Collective::AllReduce, 1e6, group(8, 8))
            .is_none());
    }

    #[test]
    fn nccl_picks_the_tree_for_small_messages_on_many_nodes_and_the_ring_for_large() {
        let c = Cluster::resolve("dgx-a100-80g:128").unwrap();
        let m = CostModel::new(c);
        let g = group(1024, 8);
        // 1 MB across 128 nodes: the ring's ~2,000 latencies dominate.
        let small = m.collective_cost(Collective::AllReduce, 1e6, g);
        assert_eq!(small.algorithm, Algorithm::Tree);
        // 4 GB on 2 nodes: log2(2) = 1 = k-1, so the tree only loses bandwidth.
        let large = m.collective_cost(Collective::AllReduce, 4e9, group(16, 8));
        assert_eq!(large.algorithm, Algorithm::Ring);
        // The choice is the minimum of the two.
        let ring = m.ring_cost(Collective::AllReduce, 1e6, g).total();
        assert!(small.total() <= ring);
    }

    #[test]
    fn all_to_all_moves_each_peer_share_on_its_link() {
        let c = Cluster::resolve("dgx-h100:2").unwrap();
        let m = CostModel::new(c.clone());
        let s = 1e9;
        let bw = |l: &crate::cluster::Link| l.bandwidth * m.eff.link;
        // Inside a node: (n-1)/n of the bytes over NVLink.
        let one = m.ring_cost(Collective::AllToAll, s, group(8, 8));
        assert!((one.transfer_s - 7.0 / 8.0 * s / bw(&c.intra_node)).abs() < 1e-12);
        // Two nodes: 7 of 16 shares on NVLink, 8 of 16 through the NIC, concurrently.
        let two = m.ring_cost(Collective::AllToAll, s, group(16, 8));
        let want = (7.0 / 16.0 * s / bw(&c.intra_node)).max(8.0 / 16.0 * s / bw(&c.inter_node));
        assert!((two.transfer_s - want).abs() / want < 1e-12);
        assert!(two.total() > one.total());
    }

    #[test]
    fn tp_gather_is_priced_as_an_all_gather_of_its_output() {
        use crate::ir::{DType, Dim};
        let c = Cluster::resolve("dgx-a100-80g:1").unwrap();
        let m = CostModel::new(c.clone());
        let t = |dims: &[&str]| {
            TensorType::new(DType::Bf16, dims.iter().map(|d| Dim::parse(d).unwrap()))
        };
        // A [1, 1024, 4096] bf16 shard gathered over t = 8 into [1, 1024, 32768].
        let (piece, whole) = (t(&["1", "1024", "4096"]), t(&["1", "1024", "32768"]));
        let op = Op::TpGather { axis: 2, parts: 8 };
        let env = Env::new(1, 1024);
        let time = m.op_time(&op, &[&piece], &[&whole], env, group(8, 8));
        // Ring all-gather of S = 1024·32768·2 bytes: (n-1)/n · S / (B·eff) + (n-1)·α.
        let s = 1024.0 * 32768.0 * 2.0;
        let want =
            7.0 / 8.0 * s / (c.intra_node.bandwidth * m.eff.link) + 7.0 * c.intra_node.latency_s;
        assert!((time - want).abs() / want < 1e-12, "{time} vs {want}");
    }
}
