//! Calibration helper: prints apar's figures for Korthikanti et al. 2022 Tables 4 and 5
//! at given efficiencies (`cargo run --release --example calib -- MATMUL MEMORY LINK`).
use apar::cluster::Cluster;
use apar::cost::Efficiencies;
use apar::lower::compile::{Compiler, ModelSource};
use apar::models::zoo;
use apar::passes::{Config, Recompute, Schedule};

fn main() {
    let args: Vec<f64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let mut eff = Efficiencies::CALIBRATED;
    if args.len() == 3 {
        (eff.matmul, eff.memory, eff.link) = (args[0], args[1], args[2]);
    }
    let rows = [
        (
            "megatron-22b",
            1u32,
            4u64,
            4u32,
            Schedule::OneFOneB,
            1.42,
            1.10,
        ),
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
    let mut worst: f64 = 0.0;
    for (m, pp, gb, b, sched, full, sel) in rows {
        let c = Compiler::new(
            ModelSource::Config(zoo::lookup(m).unwrap()),
            Cluster::resolve(&format!("dgx-a100-80g:{pp}")).unwrap(),
            2048,
            gb,
            1.0,
        )
        .unwrap()
        .with_efficiencies(eff);
        for (rc, sp, want) in [
            (Recompute::Full, false, full),
            (Recompute::Selective, true, sel),
        ] {
            let cfg = Config {
                dp: 1,
                tp: 8,
                pp,
                micro_batch: b,
                num_micro_batches: (gb / u64::from(b)) as u32,
                sp,
                recompute: rc,
                zero: 0,
                low_prec_shard: false,
                schedule: sched,
                recompute_layers: None,
                recompute_modules: None,
            };
            let e = c.evaluate(&cfg).unwrap();
            worst = worst.max((e.step_time_s / want - 1.0).abs());
            println!(
                "table5 {m} {rc}: {:.2} s (paper {want}) {:+.1}%",
                e.step_time_s,
                100.0 * (e.step_time_s / want - 1.0)
            );
        }
        if m == "megatron-22b" {
            for (rc, sp, fwd, bwd) in [
                (Recompute::None, false, 7.7, 11.9),
                (Recompute::Full, false, 7.7, 19.5),
                (Recompute::Selective, false, 7.7, 13.2),
            ] {
                let cfg = Config {
                    dp: 1,
                    tp: 8,
                    pp: 1,
                    micro_batch: 4,
                    num_micro_batches: 1,
                    sp,
                    recompute: rc,
                    zero: 0,
                    low_prec_shard: false,
                    schedule: Schedule::OneFOneB,
                    recompute_layers: None,
                    recompute_modules: None,
                };
                let p = c.profiles(&cfg);
                let l = &p.as_ref().as_ref().unwrap().blocks.get(1);
                let (f, bw) = (l.fwd_s * 1e3, l.bwd_s * 1e3);
                worst = worst.max((f / fwd - 1.0).abs()).max((bw / bwd - 1.0).abs());
                println!(
                    "table4 22b {rc}: fwd {f:.2} ms (paper {fwd}) bwd {bw:.2} ms (paper {bwd})"
                );
            }
        }
    }
    println!("worst relative error {:.1}% at {eff:?}", 100.0 * worst);
}
