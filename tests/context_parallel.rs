//! Context parallelism: the per-device program at `s / cp` tokens with ring attention.
//! CP never changes the FLOPs of a step (summed over the CP ranks), divides the
//! activation memory of every layer (attention's included) by the degree, and the
//! published Llama 3 405B long-context layout evaluates and fits.

use apar::cluster::Cluster;
use apar::lower::compile::{Compiler, ModelSource};
use apar::models::{zoo, Attention};
use apar::passes::{Config, Recompute};
use proptest::prelude::*;

fn compiler(model: &str, layers: u32, seq: u64, devices_node: &str, gb: u64) -> Compiler {
    let mut cfg = zoo::lookup(model).unwrap();
    cfg.layers = layers;
    cfg.attention = Attention::Flash;
    let cluster = Cluster::resolve(devices_node).unwrap();
    Compiler::new(ModelSource::Config(cfg), cluster, seq, gb, 0.8).unwrap()
}

fn config(dp: u32, tp: u32, cp: u32, recompute: Recompute) -> Config {
    Config {
        cp,
        recompute,
        sp: tp > 1,
        ..Config::new(dp, tp, 1, 1, 1)
    }
}

/// Per-micro-batch FLOPs and saved bytes of each block on one device.
fn per_block(c: &Compiler, cfg: &Config) -> Vec<(f64, f64, u64)> {
    let p = c.profiles(cfg);
    let set = p.as_ref().as_ref().unwrap();
    set.blocks
        .iter()
        .map(|b| (b.flops, b.recompute_flops, b.saved))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Summed over the `cp` ranks, every block's FLOPs (recomputation included) are
    /// those of cp = 1, and every block's saved activations are `1 / cp` of cp = 1's
    /// on each rank.
    #[test]
    fn cp_conserves_flops_and_divides_activations(
        model in prop::sample::select(vec!["llama3-8b", "llama2-7b", "qwen2-7b"]),
        cp in prop::sample::select(vec![2u32, 4, 8]),
        tp in prop::sample::select(vec![1u32, 2]),
        seq_k in 1u64..=4,
        rc in prop::sample::select(vec![Recompute::None, Recompute::Full]),
    ) {
        let seq = 2048 * seq_k;
        let devices = u64::from(cp * tp);
        let c = compiler(model, 2, seq, &format!("dgx-h100:{}", devices.div_ceil(8)), 8);
        let dp = (c.cluster.devices() / devices) as u32;
        let one = per_block(&c, &config(dp * cp, tp, 1, rc));
        let many = per_block(&c, &config(dp, tp, cp, rc));
        prop_assert_eq!(one.len(), many.len());
        for (i, (a, b)) in one.iter().zip(&many).enumerate() {
            let n = u64::from(cp);
            for (x, y, what) in [(a.0, b.0, "flops"), (a.1, b.1, "recompute flops")] {
                let sum = y * n as f64;
                // Integer division of the attention ops' FLOPs loses < cp per op.
                prop_assert!((x - sum).abs() <= 64.0 * n as f64, "block {i} {what}: {x} vs {sum}");
            }
            prop_assert_eq!(a.2, b.2 * n, "block {} saved bytes", i);
        }
    }
}

/// The ring's K/V traffic is priced on a CP layer, and none without CP.
#[test]
fn ring_attention_prices_its_transfers() {
    let c = compiler("llama3-8b", 2, 16384, "dgx-h100:1", 8);
    let p = c.profiles(&config(1, 2, 4, Recompute::None));
    let set = p.as_ref().as_ref().unwrap();
    let layer = set.blocks.get(1);
    assert!(layer.cp_comm_s > 0.0);
    assert!(layer.cp_exposed_s <= layer.cp_comm_s);
    let p1 = c.profiles(&config(4, 2, 1, Recompute::None));
    let one = p1.as_ref().as_ref().unwrap().blocks.get(1);
    assert_eq!(one.cp_comm_s, 0.0);
}

/// Llama 3 405B at 131,072 tokens on 16,384 H100 with TP 8, CP 16, PP 16, DP 8 (Dubey
/// et al. 2024, Table 4; 16M tokens a step = 128 sequences), Megatron's full
/// recomputation and distributed optimizer: it evaluates and fits 80 GB.
#[test]
fn llama3_405b_long_context_fits() {
    let cfg = zoo::lookup("llama3-405b").unwrap();
    let cluster = Cluster::resolve("dgx-h100:2048").unwrap();
    let c = Compiler::new(ModelSource::Config(cfg), cluster, 131_072, 128, 0.8).unwrap();
    let config = Config {
        cp: 16,
        sp: true,
        zero: 1,
        recompute: Recompute::Full,
        ..Config::new(8, 8, 16, 1, 16)
    };
    assert_eq!(config.devices(), 16_384);
    let e = c.evaluate_with(&config, false).unwrap();
    assert!(e.fits, "peak {} of {}", e.peak_bytes, e.budget_bytes);
    assert!(e.peak_bytes < 80_000_000_000);
    assert!(e.tflops_per_device > 100.0, "{}", e.tflops_per_device);
    // Without recomputation the activations do not fit.
    let none = c
        .evaluate_with(
            &Config {
                recompute: Recompute::None,
                ..config
            },
            false,
        )
        .unwrap();
    assert!(!none.fits);
}

/// torchtitan's context parallelism (PyTorch's `context_parallel`, all-gather rotate
/// method) gathers every rank's keys and values once, hidden only behind the local
/// block, and holds all of them; Megatron-LM's ring passes one block a step and holds
/// two. The FLOPs and the compute are the same.
#[test]
fn torchtitan_gathers_keys_and_values_once() {
    use apar::cost::{Collective, CostModel, Group};
    use apar::ir::{Env, Op};
    use apar::lower::profile::{ring_attention, CpMethod};
    let mut cfg = zoo::lookup("llama3-8b").unwrap();
    cfg.layers = 1;
    cfg.attention = Attention::Flash;
    let g = apar::models::build_forward(&cfg).unwrap();
    let id = g
        .ops()
        .find(|&o| matches!(g.op(o), Op::FlashAttention { .. }))
        .unwrap();
    let cost = CostModel::new(Cluster::resolve("dgx-h100:1").unwrap());
    let cp = Group {
        size: 4,
        per_node: 4,
    };
    let env = Env::new(1, 8192);
    let ring = ring_attention(&g, id, env, &cost, Group::SINGLE, cp, CpMethod::Ring).unwrap();
    let gather =
        ring_attention(&g, id, env, &cost, Group::SINGLE, cp, CpMethod::AllGather).unwrap();
    assert_eq!(ring.flops, gather.flops);
    assert_eq!(ring.compute_s, gather.compute_s);
    // K and V of one rank: 8192 tokens × 8 KV heads × 128 channels × 2 bytes, each.
    let kv = 2 * 8192 * 8 * 128 * 2u64;
    assert_eq!(ring.buffer_bytes, 2 * kv);
    assert_eq!(gather.buffer_bytes, 4 * kv);
    let all_gather = cost.collective_time(Collective::AllGather, (4 * kv) as f64, cp);
    assert!((gather.comm_s - all_gather).abs() < 1e-12);
    let step = gather.compute_s / 4.0;
    assert!((gather.exposed_s - (all_gather - step).max(0.0)).abs() < 1e-12);
    assert!((ring.comm_s - 3.0 * cost.p2p_time(kv as f64, false)).abs() < 1e-12);
}
