//! Arbitrary bytes → UTF-8 → `text::parse` (see `checks::parse`). Never a panic.
#![no_main]

#[allow(dead_code)] // each target uses one check
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::parse(data));
