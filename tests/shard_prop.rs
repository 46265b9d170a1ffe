//! Property tests: any verified forward graph gets a valid sharding (at worst the
//! replicated one) that the reference interpreter cannot tell from the original, loss
//! and gradients included; no graph makes the sharder panic.

use apar::cost::CostModel;
use apar::ir::gen::{generate, ByteEntropy, GenOptions};
use apar::ir::{verify, Env, Graph};
use apar::shard::{interp, ModelCost, ShardError, ShardOptions, Sharder};
use proptest::prelude::*;
use std::sync::OnceLock;

/// Interpreter-sized shapes: `b = 2`, `s = 8` (divisible by every tested degree).
const ENV: Env = Env { batch: 2, seq: 8 };

/// Makes compute dear and communication cheap (a slow device on a fast link), so that
/// tiny graphs shard.
fn compute_bound() -> &'static CostModel {
    static MODEL: OnceLock<CostModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let mut cluster = apar::cluster::Cluster::resolve("dgx-a100-80g:1").expect("preset");
        cluster.device.peak_bf16_flops = 1e9;
        cluster.device.peak_fp32_flops = 1e9;
        cluster.device.memory_bandwidth = 1e9;
        cluster.intra_node.bandwidth = 1e12;
        cluster.intra_node.latency_s = 1e-7;
        CostModel::new(cluster)
    })
}

fn forward(bytes: &[u8], communication: bool) -> Graph {
    let opts = GenOptions {
        max_layers: 2,
        max_units: 3,
        training: false,
        communication,
        arbitrary_floats: false,
    };
    generate(&mut ByteEntropy::new(bytes), &opts)
}

fn options(tp: u32, sp: bool) -> ShardOptions {
    ShardOptions {
        env: ENV,
        ..ShardOptions::new(tp, sp)
    }
}

/// Shards `g` and checks the result with the interpreter.
fn check(g: &Graph, tp: u32, sp: bool, seed: u64) -> Result<(), TestCaseError> {
    let cost = ModelCost::tensor_parallel(compute_bound(), tp);
    let m = Sharder::with_cost(options(tp, sp), &cost)
        .shard_model(g)
        .map_err(|e| TestCaseError::fail(format!("tp {tp} sp {sp}: {e}")))?;
    prop_assert!(verify(&m.graph).is_ok());
    let c = interp::compare(g, &m, ENV, seed)
        .map_err(|e| TestCaseError::fail(format!("tp {tp} sp {sp}: {e}")))?;
    let label = format!("tp {tp} sp {sp}: {c:?}");
    prop_assert!(c.loss_error < 1e-4, "{}", label);
    prop_assert!(c.grad_error < 1e-4, "{}", label);
    prop_assert!(c.replica_error < 1e-4, "{}", label);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn generated_graphs_shard_and_agree(
        bytes in proptest::collection::vec(any::<u8>(), 0..160),
        tp in prop::sample::select(vec![2u32, 4]),
        sp in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let g = forward(&bytes, false);
        prop_assume!(verify(&g).is_ok());
        check(&g, tp, sp, seed)?;
    }

    #[test]
    fn no_graph_makes_the_sharder_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..160),
        tp in 0u32..9,
        sp in any::<bool>(),
        training in any::<bool>(),
    ) {
        let opts = GenOptions {
            max_layers: 2,
            max_units: 3,
            training,
            communication: true,
            arbitrary_floats: true,
        };
        let g = generate(&mut ByteEntropy::new(&bytes), &opts);
        match Sharder::new(options(tp, sp)).shard_model(&g) {
            Ok(m) => prop_assert!(verify(&m.graph).is_ok()),
            Err(ShardError::Internal { why }) => prop_assert!(false, "internal error: {}", why),
            Err(_) => {}
        }
    }
}

/// The simplest generated graph (no input bytes), at every degree.
#[test]
fn the_simplest_graph_shards_and_agrees() {
    let g = forward(&[], false);
    for tp in [2, 4] {
        for sp in [false, true] {
            check(&g, tp, sp, 1).expect("agrees");
        }
    }
}
