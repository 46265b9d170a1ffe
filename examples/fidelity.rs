//! Fidelity report: for every calibration case in `calibration/fidelity/*.csv` (run
//! files in `apar calibrate`'s format), apar's step time at the built-in cost tables
//! against the measured one, and the error. `tests/fidelity.rs` keeps each within
//! [`TOLERANCE`].
//!
//! `cargo run --release --example fidelity`
use apar::calibrate::{compile_runs, predict, read_runs};
use std::path::Path;

/// The largest accepted |error| of a case.
const TOLERANCE: f64 = 0.10;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration/fidelity");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        .collect();
    files.sort();
    let (mut sum, mut n, mut worst) = (0.0, 0, 0.0f64);
    for f in files {
        println!("{}", f.file_name().unwrap().to_string_lossy());
        let runs = read_runs(&f).unwrap();
        let mut compiled = compile_runs(&runs, None).unwrap();
        let cal = compiled[0].compiler.cost.eff.clone();
        let predicted = predict(&mut compiled, &cal);
        for (r, got) in compiled.iter().zip(predicted) {
            let run = &r.run;
            let want = run.step_time_s;
            let err = got / want - 1.0;
            let tokens_per_gpu =
                |t: f64| (run.global_batch * run.seq) as f64 / t / r.config.devices() as f64;
            let what = format!(
                "{} {} dp{} tp{} pp{} b{} gbs{} {}{}{} zero{}",
                run.model,
                run.engine,
                run.dp,
                run.tp,
                run.pp,
                run.micro_batch,
                run.global_batch,
                run.recompute,
                run.recompute_layers
                    .map_or(String::new(), |k| format!(":{k}")),
                if run.sp { "+sp" } else { "" },
                run.zero
            );
            println!(
                "  {what:62} measured {want:7.3} s ({:6.0} tok/s/GPU)  apar {got:7.3} s ({:6.0})  {:+6.1}%{}",
                tokens_per_gpu(want),
                tokens_per_gpu(got),
                100.0 * err,
                if err.abs() > TOLERANCE { "  OUT" } else { "" }
            );
            sum += err.abs();
            n += 1;
            worst = worst.max(err.abs());
        }
    }
    println!(
        "{n} cases: mean |error| {:.1}%, largest {:.1}% (tolerance {:.0}%)",
        100.0 * sum / f64::from(n),
        100.0 * worst,
        100.0 * TOLERANCE
    );
}
