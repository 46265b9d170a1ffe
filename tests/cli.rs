//! The command line: exit codes and messages on good and bad input.

use std::process::Command;

mod common;

use common::apar;

/// `apar eval --model M --cluster C --global-batch B --seq S` followed by `extra`.
fn eval_on(
    (model, cluster, batch, seq): (&str, &str, &str, &str),
    extra: &[&str],
) -> (i32, String, String) {
    let mut a = vec![
        "eval",
        "--model",
        model,
        "--cluster",
        cluster,
        "--global-batch",
        batch,
        "--seq",
        seq,
    ];
    a.extend(extra);
    apar(&a)
}

/// `apar eval` on the reference scenario (Llama-2-13B, moai-4xlarge, 64 × 1024).
fn eval(extra: &[&str]) -> (i32, String, String) {
    eval_on(("llama2-13b", "moai-4xlarge", "64", "1024"), extra)
}

#[test]
fn eval_exit_codes() {
    // ZeRO-1 with bf16 gradients (DeepSpeed, like the reference platform) fits; with
    // Megatron-LM's fp32 main gradients the same configuration does not.
    let (code, out, _) = eval(&[
        "--dp",
        "16",
        "--pp",
        "2",
        "--zero",
        "1",
        "--engine",
        "deepspeed",
    ]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = eval(&["--dp", "32", "--micro-batch", "2", "--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"], "out_of_memory");
    assert_eq!(v["engine"], "megatron");
    assert!(v["requested_bytes"].as_u64().unwrap() > v["available_bytes"].as_u64().unwrap());
    assert!(!v["suggestions"].as_array().unwrap().is_empty());
}

#[test]
fn bad_input_exits_2_with_a_message() {
    let dir = std::env::temp_dir().join(format!("apar-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad_cluster = dir.join("cluster.json");
    std::fs::write(&bad_cluster, r#"{"name": "x", "nodes": 2}"#).unwrap();
    let bad_cluster = bad_cluster.to_str().unwrap().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--dp", "15", "--pp", "2"], "not divisible"),
        (vec!["--dp", "8", "--pp", "2"], "devices"),
        (vec!["--dp", "32", "--zero", "5"], "ZeRO"),
        (vec!["--dp", "32", "--schedule", "zigzag"], "zigzag"),
        (vec!["--dp", "32", "--sp"], "sequence parallelism"),
    ];
    for (extra, needle) in cases {
        let (code, _, err) = eval(&extra);
        assert_eq!(code, 2, "{extra:?}: {err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, _, err) = apar(&[
        "eval",
        "--model",
        "tiny-gpt",
        "--cluster",
        &bad_cluster,
        "--global-batch",
        "8",
        "--seq",
        "64",
        "--dp",
        "8",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("cluster.json"), "{err}");
    // 8 pipeline stages, but tiny-gpt has 4 blocks (embedding, 2 layers, head).
    let (code, _, err) = apar(&[
        "eval",
        "--model",
        "tiny-gpt",
        "--cluster",
        "dgx-a100-80g:1",
        "--global-batch",
        "8",
        "--seq",
        "64",
        "--dp",
        "1",
        "--pp",
        "8",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("blocks"), "{err}");
    let (code, _, err) = apar(&["stats", "--model", "no-such-model", "--seq", "8"]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown model"), "{err}");
}

/// `apar ir` output of every zoo model passes `apar check` (forward and training).
#[test]
fn ir_output_of_every_zoo_model_checks() {
    let dir = std::env::temp_dir().join(format!("apar-ir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in apar::models::zoo::ZOO {
        for train in [false, true] {
            let mut args = vec!["ir", "--model", entry.name];
            if train {
                args.push("--train");
            }
            let (code, out, err) = apar(&args);
            assert_eq!(code, 0, "{}: {err}", entry.name);
            let file = dir.join(format!("{}-{train}.apir", entry.name));
            std::fs::write(&file, out).unwrap();
            let (code, _, err) = apar(&["check", file.to_str().unwrap()]);
            assert_eq!(code, 0, "{} train={train}: {err}", entry.name);
        }
    }
}

/// Every malformed input of the table is rejected by `apar check` with exit 2 and a
/// message, never a panic.
#[test]
fn check_rejects_every_malformed_file_with_exit_2() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/malformed");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let (code, _, err) = apar(&["check", path.to_str().unwrap()]);
        assert_eq!(code, 2, "{}: {err}", path.display());
        assert!(err.starts_with("error: "), "{}: {err}", path.display());
        assert!(!err.contains("panicked"), "{err}");
        n += 1;
    }
    assert!(n >= 15, "only {n} malformed inputs");
}

fn without_timings(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(s) = v.get_mut("search").and_then(|s| s.as_object_mut()) {
        s.remove("compile_ms");
        s.remove("cost_ms");
    }
    v
}

/// `RAYON_NUM_THREADS=1` and `=2` give the same plan JSON apart from timings.
#[test]
fn plan_json_does_not_depend_on_the_thread_count() {
    let run = |threads: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_apar"))
            .args(["plan", "--json"])
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        without_timings(serde_json::from_slice(&out.stdout).unwrap())
    };
    assert_eq!(run("1"), run("2"));
}

/// When nothing fits, every suggestion in the report fits when followed.
#[test]
fn oom_suggestions_fit_when_followed() {
    // 80 GB devices: on 40 GB ones no single change fits once the runtime overhead
    // and Megatron-LM's fp32 gradients are counted.
    let (model, cluster, batch, seq) = ("llama2-13b", "dgx-a100-80g:1", "64", "4096");
    let (code, out, _) = apar(&[
        "plan",
        "--model",
        model,
        "--cluster",
        cluster,
        "--global-batch",
        batch,
        "--seq",
        seq,
        "--tp",
        "1",
        "--pp",
        "1",
        "--zero",
        "0",
        "--json",
    ]);
    assert_eq!(code, 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let suggestions = report["suggestions"].as_array().unwrap();
    assert!(!suggestions.is_empty());
    for s in suggestions {
        let cfg = &s["config"];
        let nodes = s["devices"].as_u64().map_or(1, |d| d / 8).to_string();
        let gb = s["global_batch"]
            .as_u64()
            .map_or(batch.to_string(), |b| b.to_string());
        let cluster = format!("dgx-a100-80g:{nodes}");
        let num = |k: &str| cfg[k].as_u64().unwrap().to_string();
        let mut args = vec![
            "eval".to_string(),
            "--model".into(),
            model.into(),
            "--cluster".into(),
            cluster,
            "--global-batch".into(),
            gb,
            "--seq".into(),
            seq.into(),
            "--dp".into(),
            num("dp"),
            "--tp".into(),
            num("tp"),
            "--pp".into(),
            num("pp"),
            "--micro-batch".into(),
            num("micro_batch"),
            "--zero".into(),
            num("zero"),
            "--recompute".into(),
            cfg["recompute"].as_str().unwrap().into(),
            "--schedule".into(),
            cfg["schedule"].as_str().unwrap().into(),
        ];
        if cfg["sp"] == true {
            args.push("--sp".into());
        }
        if let Some(m) = cfg["recompute_modules"].as_array() {
            let names: Vec<&str> = m.iter().filter_map(|n| n.as_str()).collect();
            args.push("--recompute-modules".into());
            args.push(names.join(","));
        }
        if cfg["low_prec_shard"] == true {
            args.push("--low-prec-shard".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = apar(&args);
        assert_eq!(
            code, 0,
            "suggestion {} does not fit: {out}{err}",
            s["change"]
        );
    }
}

/// `--no-overlap-grad-reduce` prices a Megatron-LM run made at its defaults: slower
/// than the overlapped plan (every reduction exposed), exported without the overlap
/// flags, saved and re-costed with the switch; other engines refuse it.
#[test]
fn megatron_runs_without_data_parallel_overlap() {
    let pins = [
        "--dp", "8", "--tp", "2", "--pp", "2", "--zero", "1", "--json",
    ];
    let step = |extra: &[&str]| {
        let mut a = pins.to_vec();
        a.extend(extra);
        let (code, out, err) = eval(&a);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["step_time_s"].as_f64().unwrap()
    };
    let on = step(&[]);
    let off = step(&["--no-overlap-grad-reduce"]);
    assert!(off > on, "{off} vs {on}");
    let (code, out, err) = eval(&[
        "--dp", "8", "--tp", "2", "--pp", "2", "--zero", "1", "--emit",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("--overlap-grad-reduce") && out.contains("--overlap-param-gather"));
    let (code, out, err) = eval(&[
        "--dp",
        "8",
        "--tp",
        "2",
        "--pp",
        "2",
        "--zero",
        "1",
        "--emit",
        "--no-overlap-grad-reduce",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("--overlap-grad-reduce") && !out.contains("--overlap-param-gather"),
        "{out}"
    );
    let (code, _, err) = eval(&[
        "--dp",
        "16",
        "--pp",
        "2",
        "--engine",
        "torchtitan",
        "--no-overlap-grad-reduce",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("megatron"), "{err}");
}

/// `--tp-comm-overlap` (Transformer Engine userbuffers, on NVIDIA devices with
/// sequence parallelism): the tensor-parallel collectives hide behind their GEMMs, so
/// the step is shorter and its exposed TP time smaller than with
/// `--no-tp-comm-overlap`; an AMD device, or a plan without sequence parallelism, is
/// priced the same either way.
#[test]
fn tensor_parallel_communication_overlaps_its_gemms() {
    // One configuration; `last` is `--json` (priced) or `--emit` (exported).
    let apar_on = |cluster: &str, extra: &[&str], last: &str| {
        let mut a = vec![
            "--tp",
            "8",
            "--pp",
            "1",
            "--dp",
            "1",
            "--micro-batch",
            "1",
            "--recompute",
            "none",
            last,
        ];
        a.extend(extra);
        let (code, out, err) = eval_on(("llama2-13b", cluster, "16", "4096"), &a);
        assert_eq!(code, 0, "{err}");
        out
    };
    let run = |cluster: &str, extra: &[&str]| {
        let v: serde_json::Value =
            serde_json::from_str(&apar_on(cluster, extra, "--json")).unwrap();
        let tp: f64 = v["breakdown"]["tp_comm_s"].as_f64().unwrap_or(f64::NAN);
        (v["step_time_s"].as_f64().unwrap(), tp)
    };
    let (on, tp_on) = run("dgx-h100:1", &["--sp"]);
    let (off, tp_off) = run("dgx-h100:1", &["--sp", "--no-tp-comm-overlap"]);
    assert!(on < off, "{on} vs {off}");
    assert!(tp_on < tp_off, "{tp_on} vs {tp_off}");
    let (amd_on, _) = run("mi300x:1", &["--sp"]);
    let (amd_off, _) = run("mi300x:1", &["--sp", "--no-tp-comm-overlap"]);
    assert_eq!(amd_on, amd_off);
    // Priced without it there, the plan says so and its export leaves the switch out.
    let emit = |cluster: &str| apar_on(cluster, &["--sp"], "--emit").contains("--tp-comm-overlap");
    assert!(emit("dgx-h100:1"));
    assert!(!emit("mi300x:1"));
    let (no_sp_on, _) = run("dgx-h100:1", &[]);
    let (no_sp_off, _) = run("dgx-h100:1", &["--no-tp-comm-overlap"]);
    assert_eq!(no_sp_on, no_sp_off);
}

/// At long sequences the sharder may keep layer projections whole and split their
/// GEMMs by sequence, which Megatron-LM's tensor parallelism does not run: the plan
/// says so. At 2,048 tokens the projections are split and nothing is said.
#[test]
fn weights_left_whole_under_tensor_parallelism_are_reported() {
    let run = |seq: &str| {
        let (code, out, err) = apar(&[
            "eval",
            "--model",
            "llama2-7b",
            "--cluster",
            "dgx-h100:1",
            "--global-batch",
            "8",
            "--seq",
            seq,
            "--tp",
            "4",
            "--pp",
            "2",
            "--dp",
            "1",
            "--zero",
            "1",
            "--sp",
            "--recompute",
            "full",
            "--memory-ratio",
            "1",
            "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let replicated = v["tensors"].as_array().unwrap().iter().any(|t| {
            t["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("qkv.weight"))
                && t["tp_layout"] == "replicated"
        });
        let warned = v["warnings"].to_string().contains("weights_replicated");
        (replicated, warned)
    };
    assert_eq!(run("2048"), (false, false));
    let (replicated, warned) = run("16384");
    assert_eq!(warned, replicated, "the warning follows the layout");
}

/// Under `--emit` standard output is the engine configuration a script captures: an
/// out-of-memory report goes to standard error (exit 1), leaving standard output empty.
#[test]
fn emit_keeps_an_out_of_memory_report_off_standard_output() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_apar"))
        .args([
            "eval",
            "--model",
            "llama2-70b",
            "--cluster",
            "dgx-a100-80g:1",
            "--seq",
            "4096",
            "--global-batch",
            "8",
            "--dp",
            "8",
            "--emit",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("OUT_OF_MEMORY"));
}

/// Two outputs named to one file are refused before anything is written, and
/// `--emit` (the engine's configuration) and `--json` (the report) do not combine.
#[test]
fn outputs_to_one_file_and_emit_with_json_are_refused() {
    let run = |extra: &[&str]| {
        let mut args = vec![
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
        ];
        args.extend(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_apar"))
            .args(&args)
            .output()
            .unwrap()
    };
    let same = std::env::temp_dir().join(format!("apar-same-{}.json", std::process::id()));
    let same = same.to_str().unwrap();
    let out = run(&["--save", same, "--trace", same]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--save and --trace both write"));
    assert!(!std::path::Path::new(same).exists());
    let out = run(&["--emit", "--json"]);
    assert_eq!(out.status.code(), Some(2));
}

/// Fixes from a new user's report: each refusal names what is wrong, and a MoE plan's
/// printed configuration can be given back to `eval` as printed.
#[test]
fn new_user_reports_stay_fixed() {
    let dir = std::env::temp_dir().join(format!("apar-newuser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // An output over an input file is refused and the input left as it was.
    let model = dir.join("config.json");
    std::fs::copy("tests/data/hf/llama-3.1-8b.json", &model).unwrap();
    let before = std::fs::read(&model).unwrap();
    let m = model.to_str().unwrap();
    let (code, _, err) = apar(&[
        "plan",
        "--model",
        m,
        "--cluster",
        "dgx-h100:1",
        "--global-batch",
        "8",
        "--seq",
        "1024",
        "--save",
        m,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("input files"), "{err}");
    assert_eq!(std::fs::read(&model).unwrap(), before);
    // Nor through a hard link, nor by `plan --detailed-log`.
    let hard = dir.join("hard.json");
    let _ = std::fs::remove_file(&hard);
    std::fs::hard_link(&model, &hard).unwrap();
    for out in [["--save", hard.to_str().unwrap()], ["--detailed-log", m]] {
        let (code, _, err) = apar(
            &[
                &[
                    "plan",
                    "--model",
                    m,
                    "--cluster",
                    "dgx-h100:1",
                    "--global-batch",
                    "8",
                    "--seq",
                    "1024",
                ][..],
                &out[..],
            ]
            .concat(),
        );
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("input files"), "{err}");
    }
    assert_eq!(std::fs::read(&model).unwrap(), before);
    // Two spellings of one file are one file.
    let save = dir.join("same.json");
    let dotted = dir.join(".").join("same.json");
    let (code, _, err) = eval_on(
        ("gpt2", "dgx-a100-80g:1", "64", "1024"),
        &[
            "--dp",
            "8",
            "--save",
            save.to_str().unwrap(),
            "--trace",
            dotted.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("both write"), "{err}");
    // A missing cluster file is a missing file, not an unknown preset.
    let (code, _, err) = apar(&["plan", "--cluster", "no/such/cluster.json"]);
    assert_eq!(code, 2);
    assert!(err.contains("no such file"), "{err}");
    // Negative numbers reach the range check instead of clap's "unexpected argument".
    let (code, _, err) = apar(&["plan", "--memory-ratio", "-1"]);
    assert_eq!(code, 2);
    assert!(err.contains("memory ratio -1"), "{err}");
    // The interleaved schedule's refusal names the condition that fails.
    let (code, _, err) = eval_on(
        ("llama2-7b", "dgx-h100:2", "64", "4096"),
        &["--dp", "16", "--schedule", "interleaved:2", "--zero", "1"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("pp is 1"), "{err}");
    // An expert imbalance means nothing without experts.
    let (code, _, err) = eval_on(
        ("llama2-7b", "dgx-h100:1", "8", "1024"),
        &["--dp", "8", "--moe-imbalance", "5"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("without mixture-of-experts"), "{err}");
    // `shard` refuses a tensor-parallel degree the heads do not divide, as `eval` does,
    // and `plan` names ZeRO's range.
    let (code, _, err) = apar(&["shard", "--model", "tiny-gpt", "--tp", "3"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("tp 3 does not divide the 4 attention heads"),
        "{err}"
    );
    let (code, _, err) = apar(&["plan", "--zero", "4"]);
    assert_eq!(code, 2);
    assert!(err.contains("0..=3"), "{err}");
    // `stats` refuses what `plan` refuses: a sequence past a learned position table.
    let (code, _, err) = apar(&["stats", "--model", "gpt2", "--seq", "2048"]);
    assert_eq!(code, 2);
    assert!(err.contains("exceeds the 1024 positions"), "{err}");
    // and warns as `plan` does past a rotary model's trained positions (Llama 3: 8,192).
    let (code, _, err) = apar(&["stats", "--model", "llama3-8b", "--seq", "16384"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("the 8192 positions the model was trained for"),
        "{err}"
    );
    // A plan whose export the engine would refuse says so when it is made.
    let (code, out, err) = apar(&[
        "plan",
        "--model",
        "mixtral-8x7b",
        "--cluster",
        "dgx-h100:4",
        "--global-batch",
        "64",
        "--seq",
        "4096",
        "--engine",
        "deepspeed",
    ]);
    assert_eq!(code, 0, "{err}");
    let all = format!("{out}{err}");
    assert!(
        all.contains("mixture-of-experts layers") && all.contains("the export is refused"),
        "{all}"
    );
    // A MoE plan prints `etp` with `ep`, so its line is a valid `eval` configuration
    // (`--etp` defaults to `tp`).
    let (code, out, err) = apar(&[
        "plan",
        "--model",
        "mixtral-8x7b",
        "--cluster",
        "dgx-h100:2",
        "--global-batch",
        "64",
        "--seq",
        "4096",
    ]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("configuration:"))
        .unwrap();
    assert!(line.contains(" ep 8 etp 1 "), "{line}");
}

/// Megatron-LM's default selective recomputation (`core_attn`) on a flash-attention
/// model recomputes nothing: `eval` refuses it with exit 2 and names what would
/// recompute something, which then runs.
#[test]
fn core_attn_on_a_flash_model_points_at_mlp_and_full() {
    let pins = ["--dp", "8", "--tp", "2", "--pp", "2", "--zero", "1"];
    for refused in [
        ["--recompute", "selective"],
        ["--recompute-modules", "core_attn"],
    ] {
        let mut a = pins.to_vec();
        a.extend(refused);
        let (code, _, err) = eval(&a);
        assert_eq!(code, 2, "{refused:?}: {err}");
        for needle in [
            "flash attention",
            "--recompute-modules mlp",
            "--recompute full",
        ] {
            assert!(err.contains(needle), "{refused:?}: {err}");
        }
    }
    for suggested in [["--recompute-modules", "mlp"], ["--recompute", "full"]] {
        let mut a = pins.to_vec();
        a.extend(suggested);
        let (code, out, err) = eval(&a);
        assert_eq!(code, 0, "{suggested:?}: {out}{err}");
    }
}

/// `--json` writes `etp` whenever `ep` is above 1, even at 1 (its command-line default
/// for a mixture of experts is `tp`), and neither for a dense model.
#[test]
fn json_config_writes_etp_with_expert_parallelism() {
    let config = |model: &str, extra: &[&str]| {
        let mut a = vec!["--dp", "8", "--tp", "2", "--pp", "4", "--sp", "--json"];
        a.extend(extra);
        let (code, out, err) = eval_on((model, "dgx-h100:8", "64", "4096"), &a);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["config"].clone()
    };
    let moe = config("mixtral-8x7b", &["--ep", "8", "--etp", "1"]);
    assert_eq!(
        (moe["ep"].as_u64(), moe["etp"].as_u64()),
        (Some(8), Some(1)),
        "{moe}"
    );
    let dense = config("llama2-13b", &[]);
    assert!(
        dense.get("ep").is_none() && dense.get("etp").is_none(),
        "{dense}"
    );
}

/// torchtitan's Llama calls `scaled_dot_product_attention` (or FlexAttention): an eager
/// attention asked of it is refused, not priced as flash; a layout it has no model
/// code for keeps the override.
#[test]
fn torchtitan_refuses_eager_attention_on_its_llama() {
    let job = ("llama2-7b", "dgx-a100-80g:2", "64", "2048");
    let args = [
        "--dp",
        "16",
        "--engine",
        "torchtitan",
        "--attention",
        "eager",
    ];
    let (code, _, err) = eval_on(job, &args);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`attention` is eager") && err.contains("scaled_dot_product_attention"),
        "{err}"
    );
    let zero3 = [&args[..], &["--zero", "3", "--recompute", "full"]].concat();
    let (code, _, err) = eval_on(("megatron-22b", "dgx-a100-80g:2", "64", "2048"), &zero3);
    assert_eq!(code, 0, "{err}");
}

/// A plan its engine cannot run is refused before the search (torchtitan has no fp16
/// mixed precision: `training.mixed_precision_param` takes bfloat16 or float32), and a
/// dtype override the export cannot write is priced with a warning that `--emit`
/// refuses it.
#[test]
fn precision_the_export_cannot_write_is_refused_or_warned() {
    let job = ("llama3-8b", "dgx-h100:2", "64", "2048");
    let (code, _, err) = eval_on(
        job,
        &[
            "--dp",
            "16",
            "--engine",
            "torchtitan",
            "--precision",
            "fp16",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("mixed_precision_param"), "{err}");
    let (code, out, err) = eval_on(
        job,
        &[
            "--dp",
            "8",
            "--tp",
            "2",
            "--optimizer-dtype",
            "bf16",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["warnings"]
            .to_string()
            .contains("dtype_override_not_exported"),
        "{out}"
    );
    let (code, out, _) = eval_on(job, &["--dp", "8", "--tp", "2", "--zero", "1", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        !v["warnings"]
            .to_string()
            .contains("dtype_override_not_exported"),
        "{out}"
    );
}

/// A sequence so long that every per-device program's time overflows is bad input
/// (exit 2) named as such, not an internal error.
#[test]
fn an_overflowing_sequence_is_named_not_internal() {
    let (code, _, err) = eval_on(
        ("llama2-13b", "moai-4xlarge", "1", "134217728"),
        &[
            "--dp",
            "1",
            "--tp",
            "8",
            "--pp",
            "4",
            "--recompute",
            "full",
            "--sp",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("overflow") && !err.contains("internal"),
        "{err}"
    );
}

/// `--moe-imbalance` above the expert-parallel degree is priced at `ep` (the busiest
/// rank receives at most every token's routes) and says so.
#[test]
fn moe_imbalance_above_ep_is_capped_with_a_warning() {
    let job = ("mixtral-8x7b", "dgx-h100:4", "64", "1024");
    let pins = [
        "--dp", "16", "--pp", "2", "--ep", "8", "--etp", "1", "--zero", "1", "--json",
    ];
    let run = |f: &str| {
        let mut a = pins.to_vec();
        a.extend(["--moe-imbalance", f]);
        let (code, out, err) = eval_on(job, &a);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let (at_ep, above) = (run("8"), run("100"));
    assert_eq!(at_ep["step_time_s"], above["step_time_s"]);
    assert!(!at_ep["warnings"]
        .to_string()
        .contains("moe_imbalance_capped"));
    let w = above["warnings"].to_string();
    assert!(
        w.contains("moe_imbalance_capped") && w.contains("\"priced\":8.0"),
        "{w}"
    );
}

/// An IR file's learned position table bounds the sequence as a zoo model's does.
#[test]
fn an_ir_model_refuses_a_sequence_past_its_position_table() {
    let dir = std::env::temp_dir().join(format!("apar-cli-ir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gpt2.apir");
    let (code, ir, err) = apar(&["ir", "--model", "gpt2"]);
    assert_eq!(code, 0, "{err}");
    std::fs::write(&file, ir).unwrap();
    let model = file.to_str().unwrap();
    for (seq, expected) in [("1024", 0), ("2048", 2)] {
        let (code, _, err) = eval_on((model, "dgx-h100:1", "8", seq), &["--dp", "8"]);
        assert_eq!(code, expected, "seq {seq}: {err}");
        if expected == 2 {
            assert!(err.contains("1024 positions"), "{err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Megatron-LM's `--rotary-base` is an integer: a config whose `rope_theta` rounds
/// below 1 is planned with a warning and its export refused (exit 2), not written as 0.
#[test]
fn a_rotary_base_below_one_is_not_exported() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf_rope_precedence.json");
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut config = recorded["cases"][0]["config"].clone();
    let m = config.as_object_mut().unwrap();
    m.remove("rope_parameters");
    m.insert("rope_theta".into(), serde_json::json!(0.3));
    let dir = std::env::temp_dir().join(format!("apar-cli-theta-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("config.json");
    std::fs::write(&file, config.to_string()).unwrap();
    let model = file.to_str().unwrap();
    let (code, out, err) = eval_on((model, "dgx-h100:1", "8", "64"), &["--dp", "8"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("--rotary-base takes a positive integer"),
        "{out}"
    );
    let (code, out, err) = eval_on((model, "dgx-h100:1", "8", "64"), &["--dp", "8", "--emit"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.is_empty() && err.contains("rotary base 3e-1"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An input that never ends (a device, here `/dev/zero`) is read up to apar's bound
/// and refused (exit 2), not read until memory runs out.
#[cfg(unix)]
#[test]
fn an_endless_input_file_is_refused() {
    for flag in ["--cluster", "--model"] {
        let (code, _, err) = apar(&["plan", flag, "/dev/zero"]);
        assert_eq!(code, 2, "{flag}: {err}");
        assert!(err.contains("larger than the 512 MiB"), "{flag}: {err}");
    }
}

/// Small refusals a user meets: `--max-ep 0` on a dense model (no configuration), and
/// `calibrate -o` into a folder that does not exist (refused before the fit).
#[test]
fn zero_max_ep_and_a_missing_output_folder_are_refused() {
    let (code, _, err) = apar(&["plan", "--max-ep", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-ep 0"), "{err}");
    let runs = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/calibration/fidelity/megatron-a800.csv"
    );
    let (code, _, err) = apar(&[
        "calibrate",
        runs,
        "--fit",
        "matmul",
        "-o",
        "/nonexistent-apar-dir/x.json",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("does not exist") && !err.contains("fitted"),
        "{err}"
    );
}
