//! `apar calibrate`: run files, the fit's round trip on runs apar generated with known
//! parameters, the refusal of fits with fewer runs than parameters or with parameters
//! no run depends on, and the warning for runs apar predicts do not fit.

use apar::calibrate::{self, parse_params, parse_runs, CalibrateError, Run};
use apar::cost::{calibration::builtin_named, Calibration, Param};
use apar::engine::memory::Precision;
use apar::models::Attention;
use apar::passes::{Recompute, RecomputeModules};

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
    assert!(
        stderr.contains("1 run(s) of distinct configurations cannot determine 2"),
        "{stderr}"
    );
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
    for bad in ["-2.0", "0", "1e300", "5e-324", "1e-300"] {
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

/// Run files are read by the `csv` crate: quoted cells carry commas, `#` lines are
/// comments, a byte-order mark is skipped, a column named twice is refused (it used to
/// be last-wins), and a short row names its line.
#[test]
fn csv_run_files_take_quotes_comments_and_a_bom() {
    let text = "\u{feff}# measured on our cluster\n\
model,cluster,seq,global_batch,dp,tp,recompute_modules,step_time_s\n\
# a comment between rows, with a \"quote\n\
llama2-7b,dgx-a100-80g:1,4096,16,2,4,\"core_attn,mlp\",1.5\n\
\n\
llama2-7b,dgx-a100-80g:1,4096,16,2,4,,1.5\n";
    let runs = parse_runs(text).unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].model, "llama2-7b");
    assert_eq!(
        runs[0].recompute_modules,
        Some("core_attn,mlp".parse::<RecomputeModules>().unwrap())
    );
    assert_eq!(runs[1].recompute_modules, None);
    assert_eq!(runs[1].recompute, Recompute::None);
    let twice = "model,cluster,seq,global_batch,dp,dp,step_time_s\ngpt2,x,1,8,1,2,1\n";
    let err = parse_runs(twice).unwrap_err();
    assert!(err.contains("`dp` appears twice"), "{err}");
    let short = "model,cluster,seq\n# c\ngpt2,x\n";
    let err = parse_runs(short).unwrap_err();
    assert!(err.contains("line 3: 2 cells for 3 columns"), "{err}");
    // An indented `#` is not a comment to the reader, and its line is named as such.
    let indented = "model,cluster,seq\n  # c\ngpt2,x,1\n";
    let err = parse_runs(indented).unwrap_err();
    assert!(err.contains("line 2"), "{err}");
    // A cell of the wrong type names its line and column.
    let typo = "model,cluster,seq,global_batch,dp,step_time_s\ngpt2,x,1,8,two,1\n";
    let err = parse_runs(typo).unwrap_err();
    assert!(err.contains("line 2") && err.contains("`dp`"), "{err}");
}

/// `recompute_modules` without `recompute` means selective recomputation, as
/// `--recompute-modules` does; it may be text or a list; a contradicting `recompute`
/// is refused; the engine's own default set is spelled as none.
#[test]
fn recompute_modules_imply_selective() {
    let mlp: RecomputeModules = "mlp".parse().unwrap();
    let both: RecomputeModules = "core_attn,mlp".parse().unwrap();
    let csv = "model,cluster,seq,global_batch,dp,tp,recompute_modules,step_time_s\n\
llama2-7b,dgx-a100-80g:1,4096,16,2,4,mlp,1.5\n";
    let runs = parse_runs(csv).unwrap();
    assert_eq!(runs[0].recompute, Recompute::Selective);
    assert_eq!(runs[0].recompute_modules, Some(mlp));
    let json = r#"[
        {"model": "gpt2", "cluster": "x", "seq": 1, "global_batch": 8, "dp": 8, "step_time_s": 1,
         "recompute_modules": "mlp"},
        {"model": "gpt2", "cluster": "x", "seq": 1, "global_batch": 8, "dp": 8, "step_time_s": 1,
         "recompute_modules": ["core_attn", "mlp"], "recompute": "selective"},
        {"model": "gpt2", "cluster": "x", "seq": 1, "global_batch": 8, "dp": 8, "step_time_s": 1,
         "recompute_modules": "core_attn"},
        {"model": "gpt2", "cluster": "x", "seq": 1, "global_batch": 8, "dp": 8, "step_time_s": 1,
         "recompute_modules": "core_attn", "engine": "deepspeed"}
    ]"#;
    let runs = parse_runs(json).unwrap();
    assert_eq!(runs[0].recompute_modules, Some(mlp));
    assert_eq!(runs[1].recompute_modules, Some(both));
    // Megatron-LM's default set is the plain selective policy.
    assert_eq!(runs[2].recompute_modules, None);
    assert_eq!(runs[2].recompute, Recompute::Selective);
    assert!(runs.iter().all(|r| r.recompute == Recompute::Selective));
    // Another engine keeps the set (the compiler says whether it takes one).
    assert_eq!(
        runs[3].recompute_modules,
        Some(RecomputeModules::core_attn())
    );
    // Written back and read again, the runs are the same.
    assert_eq!(
        parse_runs(&serde_json::to_string(&runs).unwrap()).unwrap(),
        runs
    );
    let full = "model,cluster,seq,global_batch,dp,recompute,recompute_modules,step_time_s\n\
gpt2,x,1,8,8,full,mlp,1\n";
    let err = parse_runs(full).unwrap_err();
    assert!(err.contains("needs recompute selective, not full"), "{err}");
    // The run compiles as the command line's `--recompute-modules mlp` does.
    let mut compiled = calibrate::compile_runs(&parse_runs(csv).unwrap(), None).unwrap();
    assert_eq!(compiled[0].config.recompute, Recompute::Selective);
    assert_eq!(compiled[0].config.recompute_modules, Some(mlp));
    assert!(calibrate::predict(&mut compiled, &builtin_named("a100").unwrap())[0].is_finite());
}

/// A degree or micro-batch of 0 says so, rather than talking about the global batch.
#[test]
fn zero_degrees_are_named() {
    for field in ["dp", "tp", "pp", "micro_batch"] {
        let text =
            format!("model,cluster,seq,global_batch,dp,{field},step_time_s\ngpt2,x,1,16,1,0,1\n")
                .replace(",dp,dp,", ",dp,")
                .replace(
                    ",1,0,1\n",
                    if field == "dp" { ",0,1\n" } else { ",1,0,1\n" },
                );
        let err = parse_runs(&text).unwrap_err();
        assert_eq!(err, format!("run 1: {field} must be at least 1"), "{text}");
    }
    let mut run = runs()[0].clone();
    run.dp = 0;
    let err = run.config().unwrap_err();
    assert_eq!(err, "dp must be at least 1");
}

/// `--fit` names each parameter once: duplicates and empty items are refused, by the
/// parser, by `fit` and by the command (bad input, exit 2).
#[test]
fn fit_lists_name_each_parameter_once() {
    assert_eq!(
        parse_params("matmul, overlap_slowdown").unwrap(),
        [Param::Matmul, Param::Overlap]
    );
    let err = parse_params("matmul,matmul").unwrap_err().to_string();
    assert_eq!(err, "--fit `matmul,matmul`: `matmul` is named twice");
    let err = parse_params("matmul,").unwrap_err().to_string();
    assert_eq!(err, "--fit `matmul,`: item 2 is empty");
    let err = parse_params(",,memory").unwrap_err().to_string();
    assert!(err.contains("item 1 is empty"), "{err}");
    let err = parse_params("matmul,flops").unwrap_err().to_string();
    assert!(err.contains("`flops` is not one of matmul"), "{err}");
    assert!(matches!(parse_params(" "), Err(CalibrateError::NoParams)));
    assert!(matches!(
        calibrate::fit(&runs(), None, &[Param::Link, Param::Link]),
        Err(CalibrateError::FitList { .. })
    ));
    let dir = temp_dir("fitlist");
    let file = dir.join("runs.json");
    std::fs::write(&file, serde_json::to_string(&runs()).unwrap()).unwrap();
    for list in ["matmul,matmul", "matmul,"] {
        let (code, _, stderr) = apar(&["calibrate", file.to_str().unwrap(), "--fit", list]);
        assert_eq!(code, Some(2), "{list}: {stderr}");
        assert!(stderr.contains(&format!("--fit `{list}`")), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A parameter no run depends on (overlap slowdown with no data-parallel runs) is
/// reported as undetermined, not returned unmoved as if fitted.
#[test]
fn a_parameter_no_run_depends_on_is_refused() {
    let csv = "\
model,cluster,seq,global_batch,dp,tp,pp,micro_batch,sp,recompute,step_time_s
gpt2,dgx-a100-80g:1,1024,64,1,4,2,4,true,full,1
gpt2,dgx-a100-80g:1,1024,64,1,2,4,2,false,none,1.2
gpt2,dgx-a100-80g:1,1024,64,1,4,2,8,false,none,1.1
";
    let runs = parse_runs(csv).unwrap();
    let err = calibrate::fit(&runs, None, &[Param::Matmul, Param::Overlap]).unwrap_err();
    assert!(
        matches!(
            err,
            CalibrateError::Undetermined {
                param: Param::Overlap,
                ..
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.starts_with("the runs cannot determine `overlap_slowdown`"),
        "{text}"
    );
    // The runs do determine matmul.
    assert!(calibrate::fit(&runs, None, &[Param::Matmul]).is_ok());
}

/// A run apar predicts does not fit in device memory ran all the same: the fit warns
/// (stderr, and `warnings` in `--json`) and goes on.
#[test]
fn runs_apar_predicts_out_of_memory_are_warned_about() {
    let csv = "\
model,cluster,seq,global_batch,dp,micro_batch,step_time_s
gpt2,dgx-a100-80g:1,1024,64,8,4,1
gpt2,dgx-a100-80g:1,1024,1024,8,128,3
";
    let runs = parse_runs(csv).unwrap();
    let fit = calibrate::fit(&runs, None, &[Param::Matmul]).unwrap();
    assert_eq!(fit.warnings.len(), 1, "{:?}", fit.warnings);
    let r = &fit.residuals[1];
    assert!(r.predicted_peak_bytes > r.device_memory_bytes);
    let w = &fit.warnings[0];
    assert!(w.starts_with("run 2: apar predicts "), "{w}");
    assert!(
        w.ends_with(" GiB on 80 GiB devices, but it ran: apar's memory model or the run's description is wrong"),
        "{w}"
    );
    let dir = temp_dir("oom");
    let file = dir.join("runs.csv");
    std::fs::write(&file, csv).unwrap();
    let (code, stdout, stderr) = apar(&[
        "calibrate",
        file.to_str().unwrap(),
        "--fit",
        "matmul",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains(&format!("warning: {w}")), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["warnings"], serde_json::json!([w]));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs name their precision (bf16 by default): FP8 runs are compiled with FP8
/// GEMMs, where the device has them.
#[test]
fn runs_carry_their_precision() {
    let csv = "\
model,cluster,seq,global_batch,dp,micro_batch,precision,step_time_s
gpt2,dgx-h100:1,1024,64,8,4,,1
gpt2,dgx-h100:1,1024,64,8,4,fp8,1
gpt2,dgx-a100-80g:1,1024,64,8,4,fp8,1
";
    let runs = parse_runs(csv).unwrap();
    assert_eq!(runs[0].precision, Precision::Bf16);
    assert_eq!(runs[1].precision, Precision::Fp8);
    let mut compiled = calibrate::compile_runs(&runs[..2], None).unwrap();
    let h100 = builtin_named("h100").unwrap();
    let t = calibrate::predict(&mut compiled, &h100);
    assert!(t[1] < t[0], "fp8 {} s vs bf16 {} s", t[1], t[0]);
    let err = calibrate::compile_runs(&runs[2..], None).err().unwrap();
    assert!(err.to_string().contains("FP8"), "{err}");
    let bad = "model,cluster,seq,global_batch,dp,precision,step_time_s\ngpt2,x,1,8,8,fp4,1\n";
    let err = parse_runs(bad).unwrap_err();
    assert!(err.contains("`precision`") || err.contains("fp4"), "{err}");
}

/// A fit keeps each parameter inside the range a calibration file may hold
/// (`Param::bounds`: an efficiency in [0.01, 1], `overlap_slowdown` in [0, 0.9]) and
/// says when it stops at an end; as many runs as parameters is fitted, with a warning
/// that the residuals cannot check it.
#[test]
fn fits_stay_in_range_and_say_when_they_stop_at_an_end() {
    // A step a thousand times longer than any matmul efficiency in range explains.
    let csv = "\
model,cluster,seq,global_batch,dp,micro_batch,step_time_s
gpt2,dgx-a100-80g:1,1024,64,8,4,1000
";
    let runs = parse_runs(csv).unwrap();
    let fit = calibrate::fit(&runs, None, &[Param::Matmul]).unwrap();
    let m = fit.calibration.matmul;
    assert!((0.01..=0.0101).contains(&m), "{m}");
    fit.calibration.validate().unwrap();
    assert!(
        fit.warnings
            .iter()
            .any(|w| w.starts_with("`matmul` stopped at the end of its range [0.01, 1]")),
        "{:?}",
        fit.warnings
    );
    assert!(
        fit.warnings
            .iter()
            .any(|w| w
                .starts_with("1 run(s) for 1 parameter(s): the fit can pass through every run")),
        "{:?}",
        fit.warnings
    );
    // The overlap slowdown's range ends at 0.9, below the efficiencies' 1.
    let start = fit.calibration.clone();
    assert_eq!(Param::Overlap.bounds(&start), (0.0, 0.9));
    assert_eq!(Param::Link.bounds(&start), (0.01, 1.0));
}

/// Attention's backward efficiency keeps its ratio to the forward one, so a fit that
/// drives attention to the bottom of its range stops where the backward value is
/// still a valid efficiency: the written file loads back.
#[test]
fn a_fit_at_attentions_lower_end_loads_back() {
    let csv = "\
model,cluster,seq,global_batch,dp,micro_batch,step_time_s
llama2-7b,dgx-a100-80g:1,8192,8,8,1,5000
";
    let runs = parse_runs(csv).unwrap();
    let fit = calibrate::fit(&runs, None, &[Param::Attention]).unwrap();
    let c = &fit.calibration;
    c.validate().unwrap();
    assert!(c.attention_bwd >= 0.01 && c.attention_bwd < 0.0101, "{c:?}");
    let text = serde_json::to_string(c).unwrap();
    apar::cost::Calibration::from_json(&text, "fit").unwrap();
}

/// A fit is for the runs' device: the file names it whatever table the fit started
/// from (a device with no built-in table included), and a start made for another
/// device is warned about; a file with no runs is refused as such.
#[test]
fn a_fit_names_the_runs_device() {
    let csv = "\
model,cluster,seq,global_batch,dp,micro_batch,step_time_s
gpt2,dgx-a100-80g:1,1024,64,8,4,1
gpt2,dgx-a100-80g:1,1024,128,8,4,2
";
    let runs = parse_runs(csv).unwrap();
    let fit = calibrate::fit(&runs, None, &[Param::Matmul]).unwrap();
    assert_eq!(fit.calibration.devices, vec!["A100-SXM4-80GB".to_string()]);
    assert!(fit
        .warnings
        .iter()
        .all(|w| !w.contains("starting calibration")));
    let h100 = apar::cost::calibration::builtin_named("h100").unwrap();
    let fit = calibrate::fit(&runs, Some(&h100), &[Param::Matmul]).unwrap();
    assert_eq!(fit.calibration.devices, vec!["A100-SXM4-80GB".to_string()]);
    assert!(
        fit.warnings.iter().any(|w| w.starts_with(
            "the starting calibration is for H100-SXM5-80GB, H800-SXM5-80GB, the runs ran on A100-SXM4-80GB"
        )),
        "{:?}",
        fit.warnings
    );
    let none = parse_runs("model,cluster,seq,global_batch,dp,step_time_s\n").unwrap();
    let err = calibrate::fit(&none, None, &[Param::Matmul]).unwrap_err();
    assert!(err.to_string().starts_with("no runs to fit"), "{err}");
}

/// Runs describe context and expert parallelism as the command line does (`cp`, `ep`,
/// `etp`, `moe_imbalance`): an unset `etp` is the engine's default for the model (`tp`
/// for Megatron-LM with routed experts), and a busier expert rank makes the predicted
/// step longer.
#[test]
fn runs_carry_context_and_expert_parallelism() {
    let csv = "\
model,cluster,seq,global_batch,dp,tp,cp,ep,etp,moe_imbalance,sp,step_time_s
mixtral-8x7b,dgx-h100:2,1024,16,8,2,,8,,1,true,1
mixtral-8x7b,dgx-h100:2,1024,16,8,2,,8,1,1,true,1
mixtral-8x7b,dgx-h100:2,1024,16,8,2,,8,1,1.5,true,1
tiny-llama,dgx-h100:1,1024,8,2,2,2,,,,false,1
";
    let runs = parse_runs(csv).unwrap();
    let compiled = calibrate::compile_runs(&runs, None).unwrap();
    let degrees: Vec<(u32, u32, u32)> = compiled
        .iter()
        .map(|r| (r.config.cp, r.config.ep, r.config.etp))
        .collect();
    assert_eq!(degrees, vec![(1, 8, 2), (1, 8, 1), (1, 8, 1), (2, 1, 1)]);
    let mut compiled = compiled;
    let cal = builtin_named("h100").unwrap();
    let t = calibrate::predict(&mut compiled, &cal);
    assert!(t.iter().all(|x| x.is_finite() && *x > 0.0), "{t:?}");
    assert!(t[2] > t[1], "imbalance 1.5 {} vs balanced {}", t[2], t[1]);
    let zero =
        "model,cluster,seq,global_batch,dp,ep,step_time_s\nmixtral-8x7b,dgx-h100:1,1024,8,8,0,1\n";
    let err = parse_runs(zero).unwrap_err();
    assert!(err.contains("ep must be at least 1"), "{err}");
}

/// Every built-in table carries the compute slowdown derived from published
/// measurements of overlapped collectives, not a fitted value: Lee et al.'s averages
/// (arXiv 2507.03114) for the devices they measured, Agrawal et al.'s MI300X
/// measurement (arXiv 2412.14335) for the MI300X.
#[test]
fn built_in_tables_carry_the_measured_overlap_slowdown() {
    use apar::cost::calibration::{
        overlap_slowdown_from, BUILTIN_FILES, LEE_COMPUTE_SLOWDOWN, LEE_SERIAL_OVER_OVERLAPPED,
        MEASURED_MAX_OVERLAP_SLOWDOWN,
    };
    let lee = overlap_slowdown_from(LEE_COMPUTE_SLOWDOWN, LEE_SERIAL_OVER_OVERLAPPED);
    assert!((lee - 0.609).abs() < 1e-3, "{lee}");
    for (name, _) in BUILTIN_FILES {
        let c = builtin_named(name).unwrap();
        let (want, paper) = if name == "mi300x" {
            (MEASURED_MAX_OVERLAP_SLOWDOWN, "2412.14335")
        } else {
            (lee, "2507.03114")
        };
        assert!(
            (c.overlap_slowdown - want).abs() < 0.005,
            "{name}: {}",
            c.overlap_slowdown
        );
        assert!(c.sources["overlap_slowdown"].contains(paper), "{name}");
    }
}

/// Runs that apar made with an overlap slowdown of 0.88, above the largest measured
/// (0.79), are fitted back, and the fit says the value is beyond what was measured.
#[test]
fn a_fit_above_the_measured_overlap_slowdown_says_so() {
    let mut truth = builtin_named("a100").unwrap();
    truth.overlap_slowdown = 0.88;
    // ZeRO-3 over 8 ranks: every micro-batch's gathers and reductions overlap compute.
    let csv = "\
model,cluster,seq,global_batch,dp,micro_batch,zero,step_time_s
gpt2,dgx-a100-80g:1,1024,64,8,2,3,1
gpt2,dgx-a100-80g:1,1024,64,8,4,3,1
";
    let mut runs = parse_runs(csv).unwrap();
    let mut compiled = calibrate::compile_runs(&runs, Some(&truth)).unwrap();
    for (r, t) in runs
        .iter_mut()
        .zip(calibrate::predict(&mut compiled, &truth))
    {
        r.step_time_s = t;
    }
    let fit = calibrate::fit(&runs, None, &[Param::Overlap]).unwrap();
    let got = fit.calibration.overlap_slowdown;
    assert!((got - 0.88).abs() < 0.02, "{got}");
    assert!(
        fit.warnings
            .iter()
            .any(|w| w.starts_with("`overlap_slowdown` fitted to")
                && w.contains("above the largest slowdown measured")),
        "{:?}",
        fit.warnings
    );
}

/// Repeated measurements of one configuration count once toward the parameters they
/// can determine, and the fit names them.
#[test]
fn repeated_configurations_count_once() {
    let csv = "\
model,cluster,seq,global_batch,dp,micro_batch,zero,step_time_s
gpt2,dgx-a100-80g:1,1024,64,8,2,1,1.0
gpt2,dgx-a100-80g:1,1024,64,8,2,1,1.2
gpt2,dgx-a100-80g:1,1024,64,8,4,1,1.1
";
    let runs = parse_runs(csv).unwrap();
    assert_one_repeat(&runs, "run 2 repeats the configuration of run 1");
}

/// `runs` hold two distinct configurations, which cannot fit three parameters, and a
/// fit of one names the repeat `repeat`.
fn assert_one_repeat(runs: &[Run], repeat: &str) {
    let three = [Param::Matmul, Param::Memory, Param::Link];
    match calibrate::fit(runs, None, &three) {
        Err(CalibrateError::TooFewRuns {
            runs: 2, params: 3, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let fit = calibrate::fit(runs, None, &[Param::Matmul]).unwrap();
    assert!(
        fit.warnings.iter().any(|w| w.starts_with(repeat)),
        "{:?}",
        fit.warnings
    );
}

/// A run's `attention` column prices the run at that attention (`megatron-22b` is an
/// eager model: FlashAttention runs it faster), and spelling out the model's own
/// attention is the same configuration as leaving the cell empty.
#[test]
fn runs_carry_their_attention() {
    let csv = "\
model,attention,cluster,seq,global_batch,dp,tp,micro_batch,recompute,step_time_s
megatron-22b,,dgx-a100-80g:1,2048,8,1,8,1,full,2.0
megatron-22b,flash,dgx-a100-80g:1,2048,8,1,8,1,full,2.0
megatron-22b,eager,dgx-a100-80g:1,2048,8,1,8,1,full,2.0
";
    let runs = parse_runs(csv).unwrap();
    assert_eq!(runs[0].attention, None);
    assert_eq!(runs[1].attention, Some(Attention::Flash));
    let mut compiled = calibrate::compile_runs(&runs, None).unwrap();
    assert_eq!(compiled[0].run.attention, Some(Attention::Eager));
    let cal = compiled[0].compiler.cost.eff.clone();
    let t = calibrate::predict(&mut compiled, &cal);
    assert!(t[1] < 0.95 * t[0], "flash {} vs eager {}", t[1], t[0]);
    assert_eq!(t[2], t[0]);
    // Runs 1 and 3 are one configuration.
    assert_one_repeat(&runs, "run 3 repeats the configuration of run 1");
}

/// A JSON run file's error names the run and the field, also for a value of the
/// wrong type, which serde_json's own message does not place.
#[test]
fn json_run_errors_name_the_run_and_field() {
    let run = r#"{"model": "gpt2", "cluster": "dgx-a100-80g:1", "seq": 1024, "global_batch": 64, "dp": 8, "step_time_s": 1.0"#;
    let err = parse_runs(&format!("[{run}}}, {run}, \"attention\": 1}}]")).unwrap_err();
    assert!(err.starts_with("run 2, `attention`: "), "{err}");
    let err = parse_runs(&format!("[{run}, \"attention\": \"sdpa\"}}]")).unwrap_err();
    assert!(
        err.starts_with("run 1, `attention`: unknown variant `sdpa`"),
        "{err}"
    );
    assert!(parse_runs(&format!("[{run}, \"attention\": \"flash\"}}]")).is_ok());
}

/// A CSV cell with an unknown name in an enumerated column names its column (the
/// reader itself does not say where), and a column no run has is the header's fault.
#[test]
fn csv_errors_name_the_column_and_the_header() {
    let head = "model,attention,cluster,engine,seq,global_batch,dp,step_time_s";
    let row = |attention: &str, engine: &str| {
        format!("{head}\ngpt2,{attention},dgx-a100-80g:1,{engine},1024,64,8,1.0\n")
    };
    let err = parse_runs(&row("Flash", "megatron")).unwrap_err();
    assert!(
        err.starts_with("line 2: `attention`: unknown variant `Flash`"),
        "{err}"
    );
    let err = parse_runs(&row("flash", "megatronx")).unwrap_err();
    assert!(
        err.starts_with("line 2: `engine`: unknown variant"),
        "{err}"
    );
    let err = parse_runs(&format!(
        "# runs\n{}",
        row("flash", "megatron").replace("attention", "Attention")
    ))
    .unwrap_err();
    assert!(
        err.starts_with("line 2 (header): `Attention`: unknown field"),
        "{err}"
    );
}

/// GEMM shape models outside what any device has are refused, not priced.
#[test]
fn absurd_gemm_shape_models_are_refused() {
    let base = builtin_named("a100").unwrap();
    let mut c = base.clone();
    c.gemm.tiles = vec![[u32::MAX, u32::MAX]];
    assert!(c.validate().unwrap_err().to_string().contains("gemm.tiles"));
    let mut c = base.clone();
    c.gemm.compute_units = u32::MAX;
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("gemm.compute_units"));
    let mut c = base;
    c.gemm.k_half = 1e6;
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("gemm.k_half"));
}

/// A saved plan is re-costed at a calibration given with `--plan` (a fit made after
/// the plan), not only at the one it was saved with.
#[test]
fn a_saved_plan_is_recosted_at_a_given_calibration() {
    let dir = temp_dir("recost");
    let plan = dir.join("plan.json");
    let (code, _, err) = apar(&[
        "eval",
        "--model",
        "gpt2",
        "--cluster",
        "dgx-a100-80g:1",
        "--seq",
        "1024",
        "--global-batch",
        "64",
        "--dp",
        "8",
        "--micro-batch",
        "2",
        "--save",
        plan.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let mut slow = builtin_named("a100").unwrap();
    slow.matmul *= 0.5;
    let cal = dir.join("slow.json");
    std::fs::write(&cal, slow.to_json()).unwrap();
    let step = |args: &[&str]| -> f64 {
        let (code, out, err) = apar(args);
        assert_eq!(code, Some(0), "{err}");
        let line = out.lines().find(|l| l.starts_with("step time")).unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    let saved = step(&["eval", "--plan", plan.to_str().unwrap()]);
    let slower = step(&[
        "eval",
        "--plan",
        plan.to_str().unwrap(),
        "--calibration",
        cal.to_str().unwrap(),
    ]);
    assert!(slower > saved * 1.1, "{saved} -> {slower}");
}

/// A built-in table whose sources call a value an estimate (the MI250's attention and
/// link values) makes every plan on that device say so; a measured table (the H100's)
/// and a user calibration do not.
#[test]
fn estimated_table_values_are_warned_about() {
    let warnings = |cluster: &str, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            "gpt2",
            "--cluster",
            cluster,
            "--global-batch",
            "16",
            "--seq",
            "1024",
            "--dp",
            "8",
            "--json",
        ];
        args.extend(extra);
        let (code, stdout, stderr) = apar(&args);
        assert_eq!(code, Some(0), "{stderr}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        v["warnings"].to_string()
    };
    let mi250 = warnings("mi250-gcd:1", &[]);
    assert!(mi250.contains("estimated_cost_values"), "{mi250}");
    assert!(
        mi250.contains("attention") && mi250.contains("link"),
        "{mi250}"
    );
    let h100 = warnings("dgx-h100:1", &[]);
    assert!(!h100.contains("estimated_cost_values"), "{h100}");
    let dir = temp_dir("estimated");
    // A verbatim copy of the built-in table still says which values are estimates.
    let copy = dir.join("mi250-copy.json");
    std::fs::write(&copy, builtin_named("mi250-gcd").unwrap().to_json()).unwrap();
    let copied = warnings("mi250-gcd:1", &["--calibration", copy.to_str().unwrap()]);
    assert!(copied.contains("estimated_cost_values"), "{copied}");
    assert!(copied.contains("\"calibration_file\":true"), "{copied}");
    assert!(
        copied.contains("attention") && copied.contains("link"),
        "{copied}"
    );
    let file = dir.join("mi250.json");
    let mut own = builtin_named("mi250-gcd").unwrap();
    own.sources.clear();
    std::fs::write(&file, own.to_json()).unwrap();
    let given = warnings("mi250-gcd:1", &["--calibration", file.to_str().unwrap()]);
    assert!(!given.contains("estimated_cost_values"), "{given}");
    let _ = std::fs::remove_dir_all(&dir);
}
