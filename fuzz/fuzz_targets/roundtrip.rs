//! Bytes → generated graph → text, JSON and binary round trips, and the bytes fed to
//! the decoders (see `checks::roundtrip`). Never a panic.
#![no_main]

#[allow(dead_code)] // each target uses one check
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::roundtrip(data));
