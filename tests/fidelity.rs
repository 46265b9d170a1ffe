//! Fidelity: every calibration case of `calibration/fidelity/*.csv` (measured runs in
//! `apar calibrate`'s format) against apar's step time at the built-in cost tables,
//! and, for a case file with a fitted calibration beside it
//! (`NAME.calibration.json`), at that calibration, which must reproduce from the
//! committed command. `cargo run --release --example fidelity` prints the same table.

use apar::calibrate::{compile_runs, fit, predict, read_runs, CompiledRun};
use apar::cost::{calibration::builtin_named, Calibration, Param};
use std::path::{Path, PathBuf};

/// Largest |error| of each case file at the built-in tables, and at its fitted
/// calibration when it has one. The A100 table's `matmul` was fitted to Korthikanti
/// et al.'s Tables 4 and 5 (`cargo run --release --example calibrate`); torchtitan's
/// FSDP2 runs are priced at that table unfitted; both within issue 10's 10%. The A800
/// runs are in no built-in table: at the A100 table apar is 19-22% optimistic on them
/// (about 0.9 s of fixed per-step cost the measured pair shows and apar lacks, and 15%
/// on the per-micro-batch compute), so that bound is the current error rounded up, so
/// that a change that makes them worse fails; their own fit
/// (`megatron-a800.calibration.json`) is held to 10% like the others. The MI250-class
/// tables' `matmul` was fitted to Dash et al.'s Frontier runs (`frontier-mi250x.csv`,
/// `the_mi250_class_fit_reproduces_from_the_kernel_ceiling`).
const TOLERANCE: [(&str, f64, Option<f64>); 4] = [
    ("korthikanti-table5.csv", 0.10, None),
    ("megatron-a800.csv", 0.30, Some(0.10)),
    ("torchtitan-a100.csv", 0.10, None),
    ("frontier-mi250x.csv", 0.10, None),
];

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("calibration/fidelity")
}

fn fitted(file: &str) -> Option<Calibration> {
    let path = dir().join(file).with_extension("calibration.json");
    let text = std::fs::read_to_string(&path).ok()?;
    Some(Calibration::from_json(&text, &path.display().to_string()).unwrap())
}

fn errors(file: &str, compiled: &mut [CompiledRun], cal: &Calibration, bound: f64) -> Vec<String> {
    let predicted = predict(compiled, cal);
    compiled
        .iter()
        .zip(predicted)
        .filter_map(|(r, got)| {
            let err = got / r.run.step_time_s - 1.0;
            (err.abs() > bound).then(|| {
                format!(
                    "{file}: {} dp{} tp{} pp{} b{} gbs{} {}: apar {got:.3} s vs {:.3} s ({:+.1}%, bound {:.0}%)",
                    r.run.model,
                    r.run.dp,
                    r.run.tp,
                    r.run.pp,
                    r.run.micro_batch,
                    r.run.global_batch,
                    r.run.recompute,
                    r.run.step_time_s,
                    100.0 * err,
                    100.0 * bound
                )
            })
        })
        .collect()
}

#[test]
fn calibration_cases_are_within_their_tolerance() {
    let mut failures = Vec::new();
    for (file, builtin_bound, fitted_bound) in TOLERANCE {
        let runs = read_runs(&dir().join(file)).unwrap();
        let mut compiled = compile_runs(&runs, None).unwrap();
        let builtin = compiled[0].compiler.cost.eff.clone();
        failures.extend(errors(file, &mut compiled, &builtin, builtin_bound));
        match (fitted(file), fitted_bound) {
            (Some(cal), Some(bound)) => failures.extend(errors(file, &mut compiled, &cal, bound)),
            (None, None) => {}
            (cal, _) => failures.push(format!(
                "{file}: fitted calibration {} but a bound {}",
                if cal.is_some() { "present" } else { "missing" },
                if fitted_bound.is_some() {
                    "set"
                } else {
                    "unset"
                }
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Refits `file` from the built-in table of its runs' device and compares the fitted
/// `params` with the committed `NAME.calibration.json`.
fn refit_matches_committed(file: &str, params: &[Param]) {
    let runs = read_runs(&dir().join(file)).unwrap();
    let f = fit(&runs, None, params).unwrap();
    let committed = fitted(file).unwrap();
    for &p in params {
        let (got, want) = (p.get(&f.calibration), p.get(&committed));
        assert!(
            (got - want).abs() < 1e-3,
            "{file} {p}: refit {got} vs committed {want}"
        );
    }
}

/// The committed A800 calibration is what `apar calibrate
/// calibration/fidelity/megatron-a800.csv --fit matmul,link -o
/// calibration/fidelity/megatron-a800.calibration.json` writes, from the A800's
/// built-in (A100) table.
#[test]
fn the_a800_fit_reproduces_from_its_command() {
    refit_matches_committed("megatron-a800.csv", &[Param::Matmul, Param::Link]);
}

/// The MI250X table's `matmul` is what `apar calibrate
/// calibration/fidelity/frontier-mi250x.csv --fit matmul` fits from the kernel ceiling
/// its source names (0.738: the ROCm 6.2 matmul ceiling of one MI250X GCD at the A100
/// ratio), and the MI250 table carries the same value (the same die, fewer CUs).
#[test]
fn the_mi250_class_fit_reproduces_from_the_kernel_ceiling() {
    let runs = read_runs(&dir().join("frontier-mi250x.csv")).unwrap();
    let mut start = builtin_named("mi250x-gcd").unwrap();
    Param::Matmul.set(&mut start, 0.738);
    let f = fit(&runs, Some(&start), &[Param::Matmul]).unwrap();
    let committed = builtin_named("mi250x-gcd").unwrap().matmul;
    let got = Param::Matmul.get(&f.calibration);
    assert!(
        (got - committed).abs() < 1e-3,
        "refit {got} vs committed {committed}"
    );
    assert_eq!(builtin_named("mi250-gcd").unwrap().matmul, committed);
}
