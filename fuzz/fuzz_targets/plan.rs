//! Bytes → forward graph, cluster, batch, sequence and pins → `apar::plan` → a plan
//! that satisfies its invariants, or a typed error (see `checks::plan_bytes`). Never a
//! panic.
#![no_main]

#[allow(dead_code)] // each target uses one check
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::plan_bytes(data);
});
