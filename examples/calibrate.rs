//! The fit of the A100 table (`calibration/a100.json`): fits `matmul` to Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
//! Transformer Models") Table 4 (per-layer times of the 22B model) and Table 5
//! (iteration times on DGX A100 80 GB, sequence 2048, t = 8), minimizing the sum of
//! squared log errors by Nelder-Mead ([`apar::calibrate::minimize`], deterministic),
//! and prints every row at the fit.
//!
//! `cargo run --release --example calibrate` fits `matmul` from the built-in A100
//! table (memory and link efficiencies stay at their measured values, see the
//! table's sources); `-- --fit=matmul,memory,link` fits those; `-- --check` prints the
//! rows at the built-in table without fitting.
use apar::calibrate::minimize;
use apar::cluster::Cluster;
use apar::cost::{calibration::builtin_named, Calibration, Param};
use apar::engine::overlap::CommOverlap;
use apar::lower::compile::{Compiler, ModelSource};
use apar::models::zoo;
use apar::passes::{Config, Recompute, Schedule};

/// Table 5: (model, p, global batch, micro-batch, schedule, full recompute s,
/// SP + selective s).
const TABLE5: [(&str, u32, u64, u32, Schedule, f64, f64); 4] = [
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

/// Table 4, 22B model: (recompute, forward ms, backward ms).
const TABLE4: [(Recompute, f64, f64); 3] = [
    (Recompute::None, 7.7, 11.9),
    (Recompute::Full, 7.7, 19.5),
    (Recompute::Selective, 7.7, 13.2),
];

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
        recompute_layers: None,
        recompute_modules: None,
        zero: 0,
        low_prec_shard: false,
        schedule,
    }
}

/// Every case as (name, predicted, paper).
fn rows(compilers: &[Compiler], cal: &Calibration) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    for (c, (model, pp, gb, b, sched, full, sel)) in compilers.iter().zip(TABLE5) {
        let c = c.repriced(cal.clone());
        let m = (gb / u64::from(b)) as u32;
        for (rc, sp, want) in [
            (Recompute::Full, false, full),
            (Recompute::Selective, true, sel),
        ] {
            let e = c.evaluate(&config(pp, b, m, sched, rc, sp)).unwrap();
            out.push((format!("table5 {model} {rc} (s)"), e.step_time_s, want));
        }
        if model == "megatron-22b" {
            for (rc, fwd, bwd) in TABLE4 {
                let p = c.profiles(&config(1, 4, 1, Schedule::OneFOneB, rc, false));
                let l = p.as_ref().as_ref().unwrap().blocks.get(1);
                out.push((format!("table4 22b {rc} fwd (ms)"), l.fwd_s * 1e3, fwd));
                out.push((format!("table4 22b {rc} bwd (ms)"), l.bwd_s * 1e3, bwd));
            }
        }
    }
    out
}

fn main() {
    let check = std::env::args().any(|a| a == "--check");
    let start = builtin_named("a100").expect("built-in A100 table");
    let compilers: Vec<Compiler> = TABLE5
        .iter()
        .map(|(model, pp, gb, ..)| {
            Compiler::new(
                ModelSource::Config(zoo::lookup(model).unwrap()),
                Cluster::resolve(&format!("dgx-a100-80g:{pp}")).unwrap(),
                2048,
                *gb,
                1.0,
            )
            .unwrap()
            // Megatron-LM of 2022 had no tensor-parallel communication overlap.
            .with_comm_overlap(CommOverlap {
                tp_comm: false,
                ..CommOverlap::default()
            })
            .unwrap()
        })
        .collect();
    let fitted = if check {
        start.clone()
    } else {
        let free: Vec<Param> = std::env::args()
            .find_map(|a| a.strip_prefix("--fit=").map(str::to_string))
            .unwrap_or_else(|| "matmul".into())
            .split(',')
            .map(|p| Param::parse(p).expect("a parameter name"))
            .collect();
        let cost = |c: &Calibration| -> f64 {
            rows(&compilers, c)
                .iter()
                .map(|(_, got, want)| (got / want).ln().powi(2))
                .sum()
        };
        minimize(&start, &free, cost).expect("fit")
    };
    let mut worst: f64 = 0.0;
    for (name, got, want) in rows(&compilers, &fitted) {
        let err = got / want - 1.0;
        worst = worst.max(err.abs());
        println!(
            "{name:40} apar {got:8.2}  paper {want:8.2}  {:+6.1}%",
            100.0 * err
        );
    }
    println!(
        "matmul {:.3}  memory {:.3}  link {:.3}  (largest error {:.1}%)",
        fitted.matmul,
        fitted.memory,
        fitted.link,
        100.0 * worst
    );
}
