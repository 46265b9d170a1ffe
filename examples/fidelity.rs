//! Fidelity report: for every calibration case in `calibration/fidelity/*.csv` (run
//! files in `apar calibrate`'s format), apar's step time at the built-in cost tables
//! against the measured one, and the error. A case file with a fitted calibration
//! beside it (`NAME.calibration.json`, written by `apar calibrate NAME.csv ... -o`)
//! is also priced with that calibration. `tests/fidelity.rs` keeps each within its
//! tolerance.
//!
//! `cargo run --release --example fidelity`
use apar::calibrate::{compile_runs, predict, read_runs};
use apar::cost::Calibration;
use std::path::Path;

/// The largest accepted |error| of a case (at its fitted calibration when it has one).
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
        let fitted_file = f.with_extension("calibration.json");
        let fitted = fitted_file.exists().then(|| {
            let text = std::fs::read_to_string(&fitted_file).unwrap();
            Calibration::from_json(&text, &fitted_file.display().to_string()).unwrap()
        });
        println!(
            "{}{}",
            f.file_name().unwrap().to_string_lossy(),
            if fitted.is_some() {
                format!(
                    " (and fitted: {})",
                    fitted_file.file_name().unwrap().to_string_lossy()
                )
            } else {
                String::new()
            }
        );
        let runs = read_runs(&f).unwrap();
        let mut compiled = compile_runs(&runs, None).unwrap();
        let builtin = compiled[0].compiler.cost.eff.clone();
        let predicted = predict(&mut compiled, &builtin);
        let refitted = fitted.as_ref().map(|c| predict(&mut compiled, c));
        for (i, (r, got)) in compiled.iter().zip(predicted).enumerate() {
            let run = &r.run;
            let want = run.step_time_s;
            let tokens_per_gpu =
                |t: f64| (run.global_batch * run.seq) as f64 / t / r.config.devices() as f64;
            let what = format!(
                "{} {} dp{} tp{} pp{} b{} gbs{} {}{}{} zero{}",
                run.model_name(),
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
            let err = got / want - 1.0;
            let mut line = format!(
                "  {what:62} measured {want:7.3} s ({:6.0} tok/s/GPU)  apar {got:7.3} s ({:6.0})  {:+6.1}%",
                tokens_per_gpu(want),
                tokens_per_gpu(got),
                100.0 * err,
            );
            // The error the tolerance applies to: at the fitted calibration if any.
            let judged = match &refitted {
                Some(p) => {
                    let e = p[i] / want - 1.0;
                    line.push_str(&format!("  fitted {:7.3} s {:+6.1}%", p[i], 100.0 * e));
                    e
                }
                None => err,
            };
            if judged.abs() > TOLERANCE {
                line.push_str("  OUT");
            }
            println!("{line}");
            sum += judged.abs();
            n += 1;
            worst = worst.max(judged.abs());
        }
    }
    println!(
        "{n} cases: mean |error| {:.1}%, largest {:.1}% (tolerance {:.0}%; fitted calibration where a case has one)",
        100.0 * sum / f64::from(n),
        100.0 * worst,
        100.0 * TOLERANCE
    );
}
