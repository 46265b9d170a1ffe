//! Fidelity: every calibration case of `calibration/fidelity/*.csv` (measured runs in
//! `apar calibrate`'s format) against apar's step time at the built-in cost tables.
//! `cargo run --release --example fidelity` prints the same table.

use apar::calibrate::{compile_runs, predict, read_runs};
use std::path::Path;

/// Largest |error| of each case file. The A100 table's `matmul` was fitted to
/// Korthikanti et al.'s Tables 4 and 5, its `overlap_slowdown` to Table 5 and
/// torchtitan's FSDP2 runs (`calibration/a100.json`'s sources give the commands),
/// within issue 10's 10%. The A800 runs were not fitted: apar is 19-22% optimistic on
/// them (about 1.1 s of fixed per-step cost the measured pair shows and apar lacks,
/// and 14% on the per-micro-batch compute), so their bound is the current error rounded
/// up, so that a change that makes them worse fails.
const TOLERANCE: [(&str, f64); 3] = [
    ("korthikanti-table5.csv", 0.10),
    ("megatron-a800.csv", 0.30),
    ("torchtitan-a100.csv", 0.10),
];

#[test]
fn calibration_cases_are_within_their_tolerance() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration/fidelity");
    let mut failures = Vec::new();
    for (file, tolerance) in TOLERANCE {
        let runs = read_runs(&dir.join(file)).unwrap();
        let mut compiled = compile_runs(&runs, None).unwrap();
        let cal = compiled[0].compiler.cost.eff.clone();
        let predicted = predict(&mut compiled, &cal);
        for (r, got) in compiled.iter().zip(predicted) {
            let err = got / r.run.step_time_s - 1.0;
            if err.abs() > tolerance {
                failures.push(format!(
                    "{file}: {} dp{} tp{} pp{} b{} gbs{} {}: apar {got:.3} s vs {:.3} s ({:+.1}%)",
                    r.run.model,
                    r.run.dp,
                    r.run.tp,
                    r.run.pp,
                    r.run.micro_batch,
                    r.run.global_batch,
                    r.run.recompute,
                    r.run.step_time_s,
                    100.0 * err
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
