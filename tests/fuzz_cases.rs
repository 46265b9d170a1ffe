//! Fuzz inputs replayed as ordinary tests: the committed seeds of the `plan` target
//! (`fuzz/seeds/plan/`, each must reach a plan) and every crash kept under
//! `tests/fuzz/<target>/` (see `fuzz/README.md`), through the same checks the fuzz
//! targets run (`fuzz/checks.rs`).

#[path = "../fuzz/checks.rs"]
mod checks;

use std::fs;
use std::path::{Path, PathBuf};

/// The files of `dir` (relative to the crate root), sorted; none when it is absent.
fn files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut out: Vec<PathBuf> = fs::read_dir(&dir)
        .map(|rd| {
            rd.map(|e| e.expect("directory entry").path())
                .filter(|p| p.is_file() && p.extension().is_none_or(|x| x != "md"))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn read(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Short inputs plan: the empty input is the simplest graph on the default setting.
#[test]
fn the_empty_input_plans() {
    assert!(checks::plan_bytes(&[]));
}

#[test]
fn plan_seeds_reach_a_plan() {
    let seeds = files("fuzz/seeds/plan");
    assert!(!seeds.is_empty());
    for path in seeds {
        assert!(
            checks::plan_bytes(&read(&path)),
            "{}: no plan",
            path.display()
        );
    }
}

#[test]
fn kept_crashes_pass() {
    for path in files("tests/fuzz/parse") {
        checks::parse(&read(&path));
    }
    for path in files("tests/fuzz/roundtrip") {
        checks::roundtrip(&read(&path));
    }
    for path in files("tests/fuzz/plan") {
        checks::plan_bytes(&read(&path));
    }
}
