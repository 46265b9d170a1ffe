//! Arbitrary bytes → UTF-8 → `text::parse`. The parser must never panic; whatever it
//! accepts must verify without panicking, print, and parse back to the same graph.
#![no_main]

use apar::ir::{text, verify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(g) = text::parse(src) else {
        return;
    };
    let _ = verify(&g);
    let printed = text::print(&g);
    let again = match text::parse(&printed) {
        Ok(again) => again,
        Err(e) => panic!("printed graph does not parse: {e}\n{printed}"),
    };
    assert!(again == g, "print/parse changed the graph:\n{printed}");
    assert_eq!(text::print(&again), printed);
});
