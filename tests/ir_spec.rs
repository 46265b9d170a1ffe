//! Keeps `ir-spec/` and the code in agreement: the README's op table against
//! `OpKind::info()`, its `apir` snippets and every example file against the parser,
//! the verifier and all three formats.

use apar::ir::{codec, json, text, verify, OpKind};
use std::collections::BTreeSet;
use std::fs;

const README: &str = include_str!("../ir-spec/README.md");

/// One row of the README's op table, as written.
#[derive(Debug)]
struct Row {
    name: String,
    inputs: String,
    results: String,
    attrs: Vec<String>,
    saves: String,
}

/// The text between backticks, in order.
fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_string())
        .collect()
}

fn op_table() -> Vec<Row> {
    let start = README
        .find("<!-- op-table:start -->")
        .expect("README marks the op table start");
    let end = README
        .find("<!-- op-table:end -->")
        .expect("README marks the op table end");
    let mut rows = Vec::new();
    for line in README[start..end].lines() {
        let line = line.trim();
        if !line.starts_with('|') || line.starts_with("|---") || line.starts_with("| op ") {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        assert_eq!(cells.len(), 8, "op table row needs 8 cells: {line}");
        let name = backticked(cells[0]);
        assert_eq!(name.len(), 1, "first cell names one op: {line}");
        rows.push(Row {
            name: name[0].clone(),
            inputs: cells[1].to_string(),
            results: cells[2].to_string(),
            attrs: backticked(cells[3]),
            saves: cells[7].to_string(),
        });
    }
    rows
}

#[test]
fn op_table_matches_the_code_in_both_directions() {
    let rows = op_table();
    let doc_names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    let code_names: Vec<&str> = OpKind::ALL.iter().map(|k| k.name()).collect();
    let doc_set: BTreeSet<&str> = doc_names.iter().copied().collect();
    let code_set: BTreeSet<&str> = code_names.iter().copied().collect();
    let undocumented: Vec<_> = code_set.difference(&doc_set).collect();
    let unknown: Vec<_> = doc_set.difference(&code_set).collect();
    assert!(
        undocumented.is_empty(),
        "ops missing from the README: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "README rows for unknown ops: {unknown:?}"
    );
    assert_eq!(doc_names.len(), doc_set.len(), "README lists an op twice");
    assert_eq!(
        doc_names, code_names,
        "README rows are not in op-table order"
    );

    for row in &rows {
        let info = OpKind::from_name(&row.name).unwrap().info();
        assert_eq!(row.inputs, info.arity.to_string(), "{}: inputs", row.name);
        assert_eq!(
            row.results,
            info.results.to_string(),
            "{}: results",
            row.name
        );
        let attrs: Vec<&str> = row.attrs.iter().map(String::as_str).collect();
        assert_eq!(attrs, info.attrs, "{}: attributes", row.name);
        let saves = if info.saves.is_empty() {
            "—".to_string()
        } else {
            info.saves
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        assert_eq!(row.saves, saves, "{}: saves", row.name);
    }
}

/// The source without its whole-line comments: the canonical print of a canonical file.
fn without_comment_lines(src: &str) -> String {
    src.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn check_all_formats(name: &str, src: &str) -> String {
    let g = text::parse(src).unwrap_or_else(|e| panic!("{name}: {e}"));
    verify(&g).unwrap_or_else(|e| panic!("{name}: {e}"));
    let printed = text::print(&g);
    assert_eq!(text::parse(&printed).unwrap(), g, "{name}: text round trip");
    assert_eq!(
        json::from_json(&json::to_json(&g)).unwrap(),
        g,
        "{name}: JSON round trip"
    );
    assert_eq!(
        codec::decode_graph(&codec::encode_graph(&g)).unwrap(),
        g,
        "{name}: codec round trip"
    );
    printed
}

#[test]
fn examples_parse_verify_and_round_trip() {
    let mut seen = BTreeSet::new();
    insta::glob!("../ir-spec/examples", "*.apir", |path| {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let src = fs::read_to_string(path).unwrap();
        let printed = check_all_formats(&name, &src);
        assert_eq!(
            printed,
            without_comment_lines(&src),
            "{name}: the example is not in canonical form"
        );
        insta::assert_snapshot!(printed);
        seen.insert(name);
    });
    for required in [
        "tiny_mlp.apir",
        "gpt2_block.apir",
        "llama_block.apir",
        "parallel_residual_block.apir",
    ] {
        assert!(seen.contains(required), "missing example {required}");
    }
}

#[test]
fn readme_snippets_parse_and_verify() {
    let mut count = 0;
    let mut rest = README;
    while let Some(start) = rest.find("```apir\n") {
        let body = &rest[start + "```apir\n".len()..];
        let end = body.find("```").expect("closed code block");
        check_all_formats(&format!("README snippet {count}"), &body[..end]);
        count += 1;
        rest = &body[end + 3..];
    }
    assert!(count >= 1, "the README shows at least one apir snippet");
}

/// JSON names ops by the op table too (`{"op": "matmul"}`, as the README says), not by
/// the `Op` derive's own tags (`mat_mul`): every table name is read as that op, every
/// written op carries its table name, and names outside the table are refused.
#[test]
fn json_op_names_match_the_op_table() {
    let code: BTreeSet<&str> = OpKind::ALL.iter().map(|k| k.name()).collect();
    for name in &code {
        let doc = format!(
            r#"{{"name": "g", "ops": [{{"op": {{"op": "{name}"}}, "inputs": [], "results": [], "block": "embed", "phase": "fwd"}}]}}"#
        );
        // The op is found (an op without attributes loads; others miss a field).
        if let Err(e) = json::from_json(&doc) {
            let e = e.to_string();
            assert!(e.contains("missing field"), "{name}: {e}");
        }
    }
    for bad in ["mat_mul", "layer_norm", "frobnicate"] {
        let doc = format!(
            r#"{{"name": "g", "ops": [{{"op": {{"op": "{bad}"}}, "inputs": [], "results": [], "block": "embed", "phase": "fwd"}}]}}"#
        );
        let e = json::from_json(&doc).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(&format!("unknown op `{bad}`")), "{bad}: {e}");
    }
    // Every op of the examples is written with its table name.
    for entry in fs::read_dir("ir-spec/examples").unwrap() {
        let path = entry.unwrap().path();
        let g = text::parse(&fs::read_to_string(&path).unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json::to_json(&g)).unwrap();
        for (op, id) in v["ops"].as_array().unwrap().iter().zip(g.ops()) {
            assert_eq!(op["op"]["op"], g.node(id).op.name(), "{}", path.display());
        }
    }
}
