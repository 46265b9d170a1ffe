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

fn apar(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_apar"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("apar-calibrate-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `apar calibrate` writes a file that `eval --calibration` prices with, and refuses
/// a fit with fewer runs than parameters (exit 2).
#[test]
fn cli_calibrate_writes_a_file_eval_accepts() {
    let dir = temp_dir("cli");
    let truth = truth();
    let mut runs = runs();
    let mut compiled = calibrate::compile_runs(&runs, Some(&truth)).unwrap();
    for (r, t) in runs
        .iter_mut()
        .zip(calibrate::predict(&mut compiled, &truth))
    {
        r.step_time_s = t;
    }
    let file = dir.join("runs.json");
    std::fs::write(&file, serde_json::to_string(&runs).unwrap()).unwrap();
    let out = dir.join("fit.json");
    let (code, stdout, stderr) = apar(&[
        "calibrate",
        file.to_str().unwrap(),
        "--fit",
        "matmul,memory,link",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("rms log error"), "{stdout}");
    let fitted = Calibration::from_json_file(&out).unwrap();
    assert!((fitted.matmul / truth.matmul - 1.0).abs() < 0.02);
    // eval with the file prices the first run as measured.
    let r = &runs[0];
    let (code, stdout, stderr) = apar(&[
        "eval",
        "--model",
        &r.model,
        "--cluster",
        &r.cluster,
        "--seq",
        &r.seq.to_string(),
        "--global-batch",
        &r.global_batch.to_string(),
        "--dp",
        &r.dp.to_string(),
        "--micro-batch",
        &r.micro_batch.to_string(),
        "--memory-ratio",
        "1.0",
        "--calibration",
        out.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let t = v["step_time_s"].as_f64().unwrap();
    assert!(
        (t / r.step_time_s - 1.0).abs() < 0.01,
        "{t} vs {}",
        r.step_time_s
    );
    assert_eq!(v["calibration"]["matmul"].as_f64(), Some(fitted.matmul));
    // Too few runs.
    std::fs::write(&file, serde_json::to_string(&runs[..1]).unwrap()).unwrap();
    let (code, _, stderr) = apar(&["calibrate", file.to_str().unwrap(), "--fit", "matmul,link"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("1 run(s) cannot determine 2"), "{stderr}");
    // A bad calibration file is bad input.
    std::fs::write(&out, "{\"version\": 1}").unwrap();
    let (code, _, stderr) = apar(&["plan", "--calibration", out.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device no built-in table lists is priced with the default table, and the plan
/// says so.
#[test]
fn a_device_without_a_table_warns() {
    let dir = temp_dir("default");
    let mut cluster = apar::cluster::Cluster::resolve("dgx-a100-80g:1").unwrap();
    cluster.device.name = "Some-Accelerator".into();
    let file = dir.join("cluster.json");
    std::fs::write(&file, serde_json::to_string(&cluster).unwrap()).unwrap();
    let (code, stdout, stderr) = apar(&[
        "plan",
        "--model",
        "gpt2",
        "--cluster",
        file.to_str().unwrap(),
        "--global-batch",
        "16",
        "--seq",
        "1024",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let warnings = v["warnings"].to_string();
    assert!(warnings.contains("default_cost_table"), "{warnings}");
    assert!(warnings.contains("Some-Accelerator"), "{warnings}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Measured step times that are no time (zero, negative, beyond a day) are refused
/// with the run named, as is a single JSON object where an array of runs belongs.
#[test]
fn unusable_measurements_are_refused() {
    let header = "model,cluster,seq,global_batch,dp,step_time_s\n";
    for bad in ["-2.0", "0", "1e300"] {
        let text = format!("{header}llama2-7b,dgx-h100:1,4096,16,8,{bad}\n");
        let err = apar::calibrate::parse_runs(&text).unwrap_err();
        assert!(err.contains("run 1: step_time_s"), "{bad}: {err}");
    }
    assert!(apar::calibrate::parse_runs("{}").is_err());
}

/// A calibration with an efficiency below 1% of a peak is refused where it is used
/// (a saved plan's stored calibration goes through the same options), not priced.
#[test]
fn a_calibration_below_one_percent_is_refused() {
    let model = apar::models::zoo::lookup("tiny-llama").unwrap();
    let cluster = apar::cluster::Cluster::resolve("dgx-a100-80g:1").unwrap();
    let mut cal = apar::cost::calibration::builtin_named("a100").unwrap();
    cal.matmul = 0.0;
    let mut opts = apar::PlanOptions::new(128, 16);
    opts.calibration = Some(cal);
    let err = apar::plan_model(&model, &cluster, &opts).unwrap_err();
    assert!(err.to_string().contains("matmul"), "{err}");
}
