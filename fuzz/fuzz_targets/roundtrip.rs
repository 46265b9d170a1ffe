//! Bytes → generated graph (valid by construction) → text, JSON and binary round
//! trips. The same bytes are also fed to the JSON and binary decoders, which must
//! reject or accept them without panicking.
#![no_main]

use apar::ir::gen::{self, ByteEntropy, GenOptions};
use apar::ir::{codec, json, text, verify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = codec::decode_graph(data) {
        let _ = verify(&g);
    }
    if let Ok(Ok(g)) = std::str::from_utf8(data).map(json::from_json) {
        let _ = verify(&g);
    }

    let opts = GenOptions {
        arbitrary_floats: true,
        ..GenOptions::default()
    };
    let g = gen::generate(&mut ByteEntropy::new(data), &opts);
    if let Err(e) = verify(&g) {
        panic!("generated graph is invalid: {e}\n{}", text::print(&g));
    }
    let printed = text::print(&g);
    match text::parse(&printed) {
        Ok(back) => assert!(back == g, "text round trip changed the graph:\n{printed}"),
        Err(e) => panic!("printed graph does not parse: {e}\n{printed}"),
    }
    match json::from_json(&json::to_json(&g)) {
        Ok(back) => assert!(back == g, "JSON round trip changed the graph:\n{printed}"),
        Err(e) => panic!("JSON does not load: {e}"),
    }
    match codec::decode_graph(&codec::encode_graph(&g)) {
        Ok(back) => assert!(back == g, "codec round trip changed the graph:\n{printed}"),
        Err(e) => panic!("encoding does not decode: {e}"),
    }
});
