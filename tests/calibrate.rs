//! `apar calibrate`: run files, the fit's round trip on runs apar generated with known
//! parameters, and the refusal of fits with fewer runs than parameters.

use apar::calibrate::{self, parse_runs, CalibrateError, Run};
use apar::cost::{calibration::builtin_named, Calibration, Param};
use apar::passes::Recompute;

/// Eight configurations of GPT-2 on one DGX A100 that load compute, memory-bound
/// kernels and links differently.
fn runs() -> Vec<Run> {
    let csv = "\
model,cluster,seq,global_batch,dp,tp,pp,micro_batch,sp,recompute,zero,schedule,step_time_s
gpt2,dgx-a100-80g:1,1024,64,8,1,1,4,false,none,0,1f1b,1
gpt2,dgx-a100-80g:1,1024,64,8,1,1,8,false,full,1,1f1b,1
gpt2,dgx-a100-80g:1,1024,64,4,2,1,4,true,none,0,1f1b,1
gpt2,dgx-a100-80g:1,1024,64,2,4,1,8,false,none,0,1f1b,1
gpt2,dgx-a100-80g:1,1024,64,8,1,1,2,false,none,3,1f1b,1
gpt2,dgx-a100-80g:1,1024,64,2,2,2,2,false,none,0,1f1b,1
gpt2,dgx-a100-80g:1,1024,64,4,1,2,4,false,none,1,1f1b,1
gpt2,dgx-a100-80g:1,1024,64,1,4,2,4,true,full,0,1f1b,1
";
    parse_runs(csv).unwrap()
}

/// The A100 table with `matmul`, `memory` and `link` moved off their values.
fn truth() -> Calibration {
    let mut c = builtin_named("a100").unwrap();
    c.matmul *= 0.9;
    c.memory *= 0.93;
    c.link *= 0.85;
    c
}

#[test]
fn csv_and_json_run_files_read_the_same() {
    let csv = runs();
    assert_eq!(csv.len(), 8);
    assert_eq!(csv[1].recompute, Recompute::Full);
    assert!(csv[2].sp);
    let json = serde_json::to_string(&csv).unwrap();
    assert_eq!(parse_runs(&json).unwrap(), csv);
    // Unknown fields and short rows are errors that name the line.
    let bad = "model,cluster,seq,global_batch,dp,step_time_s,colour\ngpt2,x,1,1,1,1,red\n";
    assert!(parse_runs(bad).unwrap_err().contains("colour"));
    let short = "model,cluster,seq\ngpt2,x\n";
    assert!(parse_runs(short).unwrap_err().contains("line 2"));
}

#[test]
fn fit_recovers_the_parameters_runs_were_made_with() {
    let truth = truth();
    let mut runs = runs();
    let mut compiled = calibrate::compile_runs(&runs, Some(&truth)).unwrap();
    for (r, t) in runs
        .iter_mut()
        .zip(calibrate::predict(&mut compiled, &truth))
    {
        r.step_time_s = t;
    }
    let free = [Param::Matmul, Param::Memory, Param::Link];
    let fit = calibrate::fit(&runs, None, &free).unwrap();
    for p in free {
        let (got, want) = (p.get(&fit.calibration), p.get(&truth));
        assert!(
            (got / want - 1.0).abs() < 0.02,
            "{p}: fitted {got:.4}, made with {want:.4}"
        );
    }
    for r in &fit.residuals {
        assert!(r.error().abs() < 0.01, "{r:?}");
    }
    // The fitted file reads back and prices the runs as the fit did.
    let text = fit.calibration.to_json();
    let back = Calibration::from_json(&text, "fit.json").unwrap();
    assert_eq!(back, fit.calibration);
}

#[test]
fn a_fit_with_fewer_runs_than_parameters_is_refused() {
    let runs = runs()[..2].to_vec();
    let free = [Param::Matmul, Param::Memory, Param::Link];
    match calibrate::fit(&runs, None, &free) {
        Err(CalibrateError::TooFewRuns { runs, params, .. }) => {
            assert_eq!((runs, params), (2, 3));
        }
        other => panic!("expected too few runs, got {:?}", other.map(|f| f.params)),
    }
    assert!(matches!(
        calibrate::fit(&runs, None, &[]),
        Err(CalibrateError::NoParams)
    ));
}
