//! The fit of the A100 table (`calibration/a100.json`): fits `matmul` to Korthikanti et
//! al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") Table 4
//! (per-layer times of the 22B model, below) and Table 5 (iteration times on DGX A100
//! 80 GB, sequence 2048, t = 8: the runs of `calibration/fidelity/korthikanti-table5.csv`),
//! minimizing the sum of squared log errors by Nelder-Mead
//! ([`apar::calibrate::minimize`], deterministic), and prints every row at the fit.
//!
//! `cargo run --release --example calibrate` fits `matmul` from the built-in A100
//! table (memory and link efficiencies stay at their measured values, see the
//! table's sources); `-- --fit=matmul,memory,link` fits those; `-- --check` prints the
//! rows at the built-in table without fitting.
use apar::calibrate::{minimize, read_runs, Run};
use apar::cluster::Cluster;
use apar::cost::{calibration::builtin_named, Calibration, Param};
use apar::lower::compile::{Compiler, ModelSource};
use apar::models::zoo;
use apar::passes::{Config, Recompute};
use std::path::Path;

/// Table 5's runs, as `apar calibrate` reads them.
const TABLE5: &str = "calibration/fidelity/korthikanti-table5.csv";

/// Table 4, 22B model (one layer, micro-batch 4, t = 8): (recompute, forward ms,
/// backward ms).
const TABLE4: [(Recompute, f64, f64); 3] = [
    (Recompute::None, 7.7, 11.9),
    (Recompute::Full, 7.7, 19.5),
    (Recompute::Selective, 7.7, 13.2),
];

/// Every case as (name, predicted, paper).
fn rows(runs: &[(Run, Compiler)], cal: &Calibration) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    let mut table4 = false;
    for (run, c) in runs {
        let c = c.repriced(cal.clone()).expect("a valid calibration");
        let config = run.config().expect("a valid run");
        let e = c.evaluate(&config).unwrap();
        let rc = run.recompute;
        out.push((
            format!("table5 {} {rc} (s)", run.model),
            e.step_time_s,
            run.step_time_s,
        ));
        if run.model == "megatron-22b" && !table4 {
            table4 = true;
            for (rc, fwd, bwd) in TABLE4 {
                let layer = Config {
                    recompute: rc,
                    sp: false,
                    ..Config::new(1, 8, 1, 4, 1)
                };
                let p = c.profiles(&layer);
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
    let runs: Vec<(Run, Compiler)> = read_runs(Path::new(TABLE5))
        .expect("the Table 5 runs")
        .into_iter()
        .map(|run| {
            let c = Compiler::new(
                ModelSource::Config(zoo::lookup(&run.model).unwrap()),
                Cluster::resolve(&run.cluster).unwrap(),
                run.seq,
                run.global_batch,
                1.0,
            )
            .unwrap()
            .with_comm_overlap(run.comm_overlap())
            .unwrap();
            (run, c)
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
            rows(&runs, c)
                .iter()
                .map(|(_, got, want)| (got / want).ln().powi(2))
                .sum()
        };
        minimize(&start, &free, cost).expect("fit")
    };
    let mut worst: f64 = 0.0;
    for (name, got, want) in rows(&runs, &fitted) {
        let err = got / want - 1.0;
        worst = worst.max(err.abs());
        println!(
            "{name:40} apar {got:8.2}  paper {want:8.2}  {:+6.1}%",
            100.0 * err
        );
    }
    println!(
        "matmul {:.4}  memory {:.3}  link {:.3}  (largest error {:.1}%)",
        fitted.matmul,
        fitted.memory,
        fitted.link,
        100.0 * worst
    );
}
