//! Mixture-of-experts invariants on generated small configurations.

use apar::ir::{Dim, Env, Op};
use apar::models::{build_forward, zoo, ModelConfig, Moe};
use proptest::prelude::*;

fn small(experts: u64, topk: u64, capacity: Option<f64>) -> ModelConfig {
    let mut cfg = zoo::llama("moe-test", 2, 64, 4, 2, 128, 256, 10_000.0);
    cfg.moe = Some(Box::new(Moe {
        experts,
        topk,
        expert_ffn: 32,
        shared_ffn: 0,
        shared_gate: false,
        scoring: Default::default(),
        first_dense: 0,
        sparse_step: 1,
        dense_layers: Vec::new(),
        capacity_factor: capacity,
        ..Default::default()
    }));
    cfg
}

proptest! {
    /// Tokens are conserved through dispatch and combine: the dispatch buffer holds
    /// `c·k·T` rows (`E` experts of `c·k·T/E`); with `c ≥ E/k` each expert's buffer
    /// holds all `T` tokens, so none can be dropped; dropless holds exactly `k·T`; the
    /// combine returns one row per token.
    #[test]
    fn tokens_are_conserved(e in 1u64..16, k in 1u64..4, b in 1u64..4, s in 1u64..64, slack in 0u64..3) {
        prop_assume!(k <= e);
        let env = Env::new(b, s);
        let t = b * s;
        let c = e as f64 / k as f64 + slack as f64;
        let c = (c * 1000.0).ceil() / 1000.0;
        for cap in [None, Some(c)] {
            let g = build_forward(&small(e, k, cap)).unwrap();
            for o in g.ops() {
                let node = g.node(o);
                match g.op(o) {
                    Op::MoeDispatch { .. } => {
                        let rows = g.ty(node.results[0]).shape.dims()[0];
                        let rows = rows.eval_ceil(env).unwrap();
                        match cap {
                            None => prop_assert_eq!(rows, k * t),
                            // Per expert ≥ T: no token dropped.
                            Some(_) => prop_assert!(rows >= e * t, "{} < {}", rows, e * t),
                        }
                    }
                    Op::MoeCombine { .. } => {
                        let x = g.ty(node.results[0]).shape.numel_at(env).unwrap();
                        prop_assert_eq!(x, t * 64);
                    }
                    _ => {}
                }
            }
        }
    }

    /// FLOPs of a dropless top-k MoE layer's feed-forward are k experts' worth plus
    /// the router: per token the router is `2·h·E`, each chosen expert's SwiGLU is
    /// `2·h·f` (gate) + `2·h·f` (up) + `2·f·h` (down) = `6·h·f`, so the grouped matmuls
    /// sum to `6·h·f·k·T` and the router's matmul to `2·h·E·T`.
    #[test]
    fn moe_flops_are_k_experts_plus_router(e in 1u64..16, k in 1u64..4, s in 1u64..32) {
        prop_assume!(k <= e);
        let env = Env::new(1, s);
        let (h, f, t) = (64u64, 32u64, s);
        let g = build_forward(&small(e, k, None)).unwrap();
        let (mut experts, mut router) = (0u64, 0u64);
        for o in g.ops() {
            let node = g.node(o);
            let ins: Vec<_> = node.inputs.iter().map(|&i| g.ty(i)).collect();
            let outs: Vec<_> = node.results.iter().map(|&r| g.ty(r)).collect();
            let cost = g.op(o).cost(&ins, &outs, env).unwrap();
            match g.op(o) {
                Op::GroupedMatMul { .. } => experts += cost.flops,
                Op::MatMul { .. } if outs[0].shape.last() == Some(Dim::lit(e))
                    && matches!(node.block, apar::ir::Block::Layer(_)) => {
                    router += cost.flops
                }
                _ => {}
            }
        }
        prop_assert_eq!(experts, 2 * 6 * h * f * k * t);
        prop_assert_eq!(router, 2 * 2 * h * e * t);
    }
}
