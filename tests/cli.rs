//! The command line: exit codes and messages on good and bad input.

use std::process::Command;

fn apar(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_apar"))
        .args(args)
        .output()
        .expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const REF: [&str; 8] = [
    "--model",
    "llama2-13b",
    "--cluster",
    "moai-4xlarge",
    "--global-batch",
    "64",
    "--seq",
    "1024",
];

fn eval(extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["eval"];
    args.extend(REF);
    args.extend(extra);
    apar(&args)
}

#[test]
fn eval_exit_codes() {
    let (code, out, _) = eval(&["--dp", "16", "--pp", "2", "--zero", "1"]);
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = eval(&["--dp", "32", "--micro-batch", "2", "--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"], "out_of_memory");
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
