//! The cost model against the numbers it was calibrated to: Korthikanti et al. 2022,
//! "Reducing Activation Recomputation in Large Transformer Models", Table 5 (iteration
//! times on DGX A100 80 GB, sequence 2048, vocabulary 51200, t = 8) and Table 4 (22B
//! per-layer times). Each must be within 10%.

use apar::cluster::Cluster;
use apar::engine::overlap::CommOverlap;
use apar::lower::compile::{Compiler, ModelSource};
use apar::models::zoo;
use apar::passes::{Config, Recompute, Schedule};

fn compiler(model: &str, nodes: u32, batch: u64) -> Compiler {
    let cluster = Cluster::resolve(&format!("dgx-a100-80g:{nodes}")).unwrap();
    Compiler::new(
        ModelSource::Config(zoo::lookup(model).unwrap()),
        cluster,
        2048,
        batch,
        1.0,
    )
    .unwrap()
    // Megatron-LM of 2022 had no tensor-parallel communication overlap.
    .with_comm_overlap(CommOverlap {
        tp_comm: false,
        ..CommOverlap::default()
    })
    .unwrap()
}

fn config(pp: u32, b: u32, m: u32, schedule: Schedule, recompute: Recompute, sp: bool) -> Config {
    Config {
        dp: 1,
        tp: 8,
        pp,
        cp: 1,
        ep: 1,
        etp: 1,
        micro_batch: b,
        num_micro_batches: m,
        sp,
        recompute,
        zero: 0,
        low_prec_shard: false,
        schedule,
        recompute_layers: None,
        recompute_modules: None,
    }
}

fn within(got: f64, paper: f64, what: &str) {
    let err = (got / paper - 1.0).abs();
    assert!(
        err < 0.10,
        "{what}: {got:.3} vs {paper} ({:+.1}%)",
        100.0 * (got / paper - 1.0)
    );
}

#[test]
fn table5_iteration_times() {
    // (model, t×p GPUs → p, global / micro batch, schedule, full recompute s, SP + selective s)
    let rows = [
        ("megatron-22b", 1, 4, 4, Schedule::OneFOneB, 1.42, 1.10),
        (
            "gpt3-175b",
            8,
            64,
            1,
            Schedule::Interleaved(3),
            18.13,
            13.75,
        ),
        (
            "mt-nlg-530b",
            35,
            280,
            1,
            Schedule::Interleaved(3),
            49.05,
            37.83,
        ),
        ("megatron-1t", 64, 512, 1, Schedule::OneFOneB, 94.42, 71.49),
    ];
    for (model, pp, batch, b, schedule, full, selective) in rows {
        let c = compiler(model, pp, batch);
        let m = (batch / u64::from(b)) as u32;
        let e = c
            .evaluate(&config(pp, b, m, schedule, Recompute::Full, false))
            .unwrap();
        within(e.step_time_s, full, &format!("{model} full recompute"));
        let e = c
            .evaluate(&config(pp, b, m, schedule, Recompute::Selective, true))
            .unwrap();
        within(e.step_time_s, selective, &format!("{model} SP + selective"));
    }
}

#[test]
fn table4_layer_times_of_the_22b_model() {
    let c = compiler("megatron-22b", 1, 4);
    for (recompute, fwd_ms, bwd_ms) in [
        (Recompute::None, 7.7, 11.9),
        (Recompute::Full, 7.7, 19.5),
        (Recompute::Selective, 7.7, 13.2),
    ] {
        let cfg = config(1, 4, 1, Schedule::OneFOneB, recompute, false);
        let p = c.profiles(&cfg);
        let layer = &p.as_ref().as_ref().unwrap().blocks.get(1);
        within(layer.fwd_s * 1e3, fwd_ms, &format!("{recompute} forward"));
        within(layer.bwd_s * 1e3, bwd_ms, &format!("{recompute} backward"));
    }
}
