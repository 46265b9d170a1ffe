//! The IR file formats: round trips of generated graphs through text, JSON and the
//! binary codec, and a table of malformed inputs, each rejected with its own error.
//!
//! Malformed text files (`tests/malformed/*.apir`) carry the expected message fragment
//! in a comment on the offending line (`# error: undefined value %9`); the reported
//! line, of a parse error or of the op a verifier error points at, must be that line.
//! Malformed JSON files are listed in [`JSON_CASES`] with their expected fragment.

use apar::ir::gen::{self, GenOptions, SplitMix64};
use apar::ir::{codec, json, text, verify, Graph};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

fn malformed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/malformed")
}

fn files(ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(malformed_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

/// The line (1-based) and message fragment of the file's `# error:` marker.
fn marker(src: &str) -> (u32, String) {
    let marks: Vec<(u32, String)> = src
        .lines()
        .enumerate()
        .filter_map(|(i, l)| {
            l.find("# error: ")
                .map(|at| (i as u32 + 1, l[at + "# error: ".len()..].trim().to_string()))
        })
        .collect();
    assert_eq!(marks.len(), 1, "exactly one `# error:` marker per file");
    marks.into_iter().next().unwrap()
}

/// Rejects the file and returns the message, checking fragment and line.
fn reject_text(path: &Path) -> String {
    let name = path.file_name().unwrap().to_string_lossy();
    let src = fs::read_to_string(path).unwrap();
    let (line, fragment) = marker(&src);
    match text::parse_with_positions(&src) {
        Err(e) => {
            assert!(
                e.to_string().contains(&fragment),
                "{name}: parse error `{e}` lacks `{fragment}`"
            );
            assert_eq!(e.line, line, "{name}: parse error `{e}` on the wrong line");
            e.kind.to_string()
        }
        Ok((g, positions)) => {
            let errs = match verify(&g) {
                Err(errs) => errs.0,
                Ok(()) => panic!("{name}: parses and verifies, but should be rejected"),
            };
            assert_eq!(
                errs.len(),
                1,
                "{name}: expected one verifier error: {errs:?}"
            );
            let e = &errs[0];
            assert!(
                e.to_string().contains(&fragment),
                "{name}: verifier error `{e}` lacks `{fragment}`"
            );
            let op = e.op().expect("verifier error points at an op");
            assert_eq!(
                positions[op.index()].line,
                line,
                "{name}: verifier error `{e}` points at the wrong line"
            );
            e.to_string()
        }
    }
}

/// Malformed JSON documents and the fragment of their error (load or verifier).
const JSON_CASES: &[(&str, &str)] = &[
    ("cycle.json", "lies on a cycle"),
    (
        "dangling.json",
        "op1 (gelu): input 0 is %7, but the graph defines only 2 tensors",
    ),
    ("truncated.json", "EOF while parsing"),
    ("unknown_op.json", "unknown op `frobnicate`"),
    ("use_before_def.json", "input %1 is defined later, by op1"),
];

fn reject_json(path: &Path, fragment: &str) -> String {
    let name = path.file_name().unwrap().to_string_lossy();
    let src = fs::read_to_string(path).unwrap();
    let msg = match json::from_json(&src) {
        Err(e) => e.to_string(),
        Ok(g) => match verify(&g) {
            Err(errs) => {
                assert_eq!(
                    errs.0.len(),
                    1,
                    "{name}: expected one verifier error: {errs}"
                );
                errs.0[0].to_string()
            }
            Ok(()) => panic!("{name}: loads and verifies, but should be rejected"),
        },
    };
    assert!(msg.contains(fragment), "{name}: `{msg}` lacks `{fragment}`");
    msg
}

#[test]
fn malformed_inputs_are_rejected_with_distinct_errors() {
    let mut messages: BTreeMap<String, String> = BTreeMap::new();
    let mut record = |file: String, msg: String| {
        if let Some(other) = messages.insert(msg.clone(), file.clone()) {
            panic!("{file} and {other} give the same error: {msg}");
        }
    };
    let text_files = files("apir");
    for path in &text_files {
        record(path.display().to_string(), reject_text(path));
    }
    let json_files = files("json");
    let listed: Vec<&str> = JSON_CASES.iter().map(|(f, _)| *f).collect();
    let present: Vec<String> = json_files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        present, listed,
        "JSON_CASES must list every malformed JSON file"
    );
    for (file, fragment) in JSON_CASES {
        record(
            file.to_string(),
            reject_json(&malformed_dir().join(file), fragment),
        );
    }
    assert!(text_files.len() + json_files.len() >= 15);
}

fn sample() -> Graph {
    gen::from_seed(3)
}

#[test]
fn codec_rejects_bad_magic_version_and_truncation() {
    let bytes = codec::encode_graph(&sample());
    let mut bad = bytes.clone();
    bad[..4].copy_from_slice(b"APIX");
    assert!(matches!(
        codec::decode_graph(&bad),
        Err(codec::CodecError::BadMagic { .. })
    ));
    let mut bad = bytes.clone();
    bad[4..6].copy_from_slice(&(codec::FORMAT_VERSION + 1).to_le_bytes());
    assert!(matches!(
        codec::decode_graph(&bad),
        Err(codec::CodecError::UnsupportedVersion { .. })
    ));
    assert!(matches!(
        codec::decode_graph(b"AP"),
        Err(codec::CodecError::TruncatedHeader { len: 2 })
    ));
    for cut in codec::HEADER_LEN..bytes.len() {
        assert!(
            matches!(
                codec::decode_graph(&bytes[..cut]),
                Err(codec::CodecError::Truncated(_)) | Err(codec::CodecError::Corrupt(_))
            ),
            "prefix of {cut} bytes"
        );
    }
    let mut long = bytes.clone();
    long.extend_from_slice(&[1, 2, 3]);
    assert!(matches!(
        codec::decode_graph(&long),
        Err(codec::CodecError::TrailingBytes { extra: 3 })
    ));
    // Other kinds of documents are told apart by their magic.
    let plan = codec::encode(*b"APPL", &vec![1u32, 2, 3]).unwrap();
    assert!(matches!(
        codec::decode_graph(&plan),
        Err(codec::CodecError::BadMagic { .. })
    ));
    let back: Vec<u32> = codec::decode(*b"APPL", &plan).unwrap();
    assert_eq!(back, vec![1, 2, 3]);
}

#[test]
fn codec_survives_corrupted_bytes() {
    let bytes = codec::encode_graph(&sample());
    let mut rng = SplitMix64::new(11);
    for _ in 0..2000 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.next_u64() % 4 {
            let i = codec::HEADER_LEN + (rng.next_u64() as usize) % (b.len() - codec::HEADER_LEN);
            b[i] = rng.next_u64() as u8;
        }
        if let Ok(g) = codec::decode_graph(&b) {
            // Whatever decodes is a graph the verifier can judge without panicking.
            let _ = verify(&g);
            let _ = text::print(&g);
        }
    }
}

fn assert_round_trips(g: &Graph, with_json: bool) -> Result<(), TestCaseError> {
    verify(g).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let printed = text::print(g);
    let parsed = text::parse(&printed).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&parsed, g, "text round trip");
    prop_assert_eq!(text::print(&parsed), printed);
    if with_json {
        let back =
            json::from_json(&json::to_json(g)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, g, "JSON round trip");
    }
    let back = codec::decode_graph(&codec::encode_graph(g))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&back, g, "codec round trip");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn generated_graphs_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        assert_round_trips(&gen::from_bytes(&bytes), true)?;
    }

    #[test]
    fn arbitrary_floats_round_trip_through_text_and_codec(seed in any::<u64>()) {
        let opts = GenOptions { arbitrary_floats: true, ..GenOptions::default() };
        let g = gen::generate(&mut SplitMix64::new(seed), &opts);
        assert_round_trips(&g, false)?;
    }
}
