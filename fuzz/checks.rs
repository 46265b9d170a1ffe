//! What each fuzz target checks, as plain functions of the input bytes, shared by the
//! fuzz targets (`fuzz_targets/*.rs`) and by `tests/fuzz_cases.rs`, which replays the
//! seeds and every kept crash with a normal `cargo test`. Each function panics exactly
//! when the input shows a bug.

use apar::cluster::Cluster;
use apar::engine::Engine;
use apar::ir::gen::{self, ByteEntropy, Entropy, GenOptions};
use apar::ir::{codec, json, text, verify, Graph};
use apar::passes::candidates::Constraints;
use apar::passes::{Recompute, Schedule};
use apar::{plan, PlanError, PlanOptions};

/// `parse`: bytes → UTF-8 → `text::parse`. The parser must never panic; whatever it
/// accepts must verify without panicking, print, and parse back to the same graph.
pub fn parse(data: &[u8]) {
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
}

/// `roundtrip`: bytes → generated graph (valid by construction) → text, JSON and
/// binary round trips. The same bytes are also fed to the JSON and binary decoders,
/// which must reject or accept them without panicking.
pub fn roundtrip(data: &[u8]) {
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
}

/// One planning problem decoded from bytes.
pub struct PlanCase {
    /// The forward graph.
    pub graph: Graph,
    /// The cluster.
    pub cluster: Cluster,
    /// Batch, sequence, memory ratio and pins.
    pub options: PlanOptions,
}

/// Decodes a planning problem. One stream of choices ([`ByteEntropy`]: a byte per
/// choice, zeros once the bytes run out): the forward graph first, then the cluster
/// and options. Every zero choice is a default that plans (one node of 8 devices with
/// their full memory, global batch 8, sequence 64, nothing pinned), so the empty input
/// plans the simplest graph and each added byte varies the graph before the setting.
pub fn plan_case(data: &[u8]) -> PlanCase {
    let mut e = ByteEntropy::new(data);
    let gopts = GenOptions {
        max_layers: 3,
        max_units: 2,
        training: false,
        communication: false,
        arbitrary_floats: false,
    };
    let graph = gen::generate(&mut e, &gopts);
    let mut cluster = Cluster::resolve("dgx-a100-80g:1").expect("preset");
    cluster.devices_per_node = [8, 1, 2, 4][e.below(4) as usize];
    cluster.nodes = 1 + e.below(3) as u32;
    let shrink = e.below(24);
    cluster.device.memory_bytes >>= shrink;
    let batch = match e.below(16) {
        0 => 8,
        k => k,
    };
    let seq = [64, 8, 16, 32, 128][e.below(5) as usize];
    let mut options = PlanOptions::new(seq, batch);
    // The runtime's fixed bytes (context, NCCL buffers) shrink with the device: a real
    // GPU's context would not fit a device made 2^k times smaller for small graphs.
    let mut runtime = options.engine.runtime();
    runtime.context_bytes >>= shrink;
    runtime.nccl_bytes_per_communicator >>= shrink;
    options.runtime = Some(runtime);
    if let k @ 1.. = e.below(4) {
        options.memory_ratio = [0.5, 0.8, 1.0][k as usize - 1];
    }
    let pin = |e: &mut ByteEntropy, n: u64| (e.below(2) == 1).then(|| 1 << e.below(n));
    options.search.constraints = Constraints {
        tp: pin(&mut e, 3),
        pp: pin(&mut e, 3),
        recompute: [None, Some(Recompute::None), Some(Recompute::Full)][e.below(3) as usize],
        zero: [None, Some(0), Some(3)][e.below(3) as usize],
        schedule: [None, Some(Schedule::Gpipe), Some(Schedule::Interleaved(2))]
            [e.below(3) as usize],
        ..Constraints::default()
    };
    // Last, so that inputs written before engines existed keep their other choices.
    options.engine = Engine::ALL[e.below(4) as usize];
    PlanCase {
        graph,
        cluster,
        options,
    }
}

/// `plan`: bytes → [`plan_case`] → `apar::plan`: a plan that uses every device, keeps
/// the batch and fits its budget, or a typed error (an out-of-memory report must
/// request more than is available). Returns whether a plan was found.
pub fn plan_bytes(data: &[u8]) -> bool {
    let PlanCase {
        graph,
        cluster,
        options,
    } = plan_case(data);
    match plan(&graph, &cluster, &options) {
        Ok(p) => {
            assert_eq!(p.config.devices(), cluster.devices());
            assert_eq!(p.config.global_batch(), options.global_batch);
            assert!(p.memory.peak_bytes <= p.memory.budget_bytes);
            assert!(p.step_time_s.is_finite() && p.step_time_s > 0.0);
            assert_eq!(p.mesh.devices(), cluster.devices());
            true
        }
        Err(PlanError::OutOfMemory(r)) => {
            assert!(r.requested_bytes > r.available_bytes);
            false
        }
        Err(
            PlanError::EmptySpace(_) | PlanError::NothingCompiled { .. } | PlanError::Compile(_),
        ) => false,
        Err(other) => panic!("a generated graph and cluster gave {other:?}"),
    }
}
