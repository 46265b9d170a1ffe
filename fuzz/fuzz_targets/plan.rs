//! Bytes → forward graph, cluster, batch, sequence and pins → `apar::plan` → a plan
//! that satisfies its invariants, or a typed error. Never a panic.
#![no_main]

use apar::cluster::Cluster;
use apar::ir::gen::{self, ByteEntropy, Entropy, GenOptions};
use apar::passes::candidates::Constraints;
use apar::passes::{Recompute, Schedule};
use apar::{plan, PlanError, PlanOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head, rest) = data.split_at(data.len().min(12));
    let mut e = ByteEntropy::new(head);
    let mut cluster = Cluster::resolve("dgx-a100-80g:1").expect("preset");
    cluster.devices_per_node = 1 << e.below(4);
    cluster.nodes = 1 + e.below(3) as u32;
    cluster.device.memory_bytes = 1 << (16 + e.below(24));
    let batch = 1 + e.below(16);
    let seq = 1 << (3 + e.below(5));
    let mut opts = PlanOptions::new(seq, batch);
    opts.memory_ratio = [0.5, 0.8, 1.0][e.below(3) as usize];
    let pin = |e: &mut ByteEntropy, n: u64| (e.below(2) == 1).then(|| 1 << e.below(n));
    opts.search.constraints = Constraints {
        tp: pin(&mut e, 3),
        pp: pin(&mut e, 3),
        recompute: [None, Some(Recompute::None), Some(Recompute::Full)][e.below(3) as usize],
        zero: [None, Some(0), Some(3)][e.below(3) as usize],
        schedule: [None, Some(Schedule::Gpipe), Some(Schedule::Interleaved(2))][e.below(3) as usize],
        ..Constraints::default()
    };
    let gopts = GenOptions {
        max_layers: 3,
        max_units: 2,
        training: false,
        communication: false,
        arbitrary_floats: false,
    };
    let g = gen::generate(&mut ByteEntropy::new(rest), &gopts);
    match plan(&g, &cluster, &opts) {
        Ok(p) => {
            assert_eq!(p.config.devices(), cluster.devices());
            assert_eq!(p.config.global_batch(), batch);
            assert!(p.evaluation.memory.peak_bytes <= p.evaluation.memory.budget_bytes);
            assert!(p.evaluation.step_time_s.is_finite() && p.evaluation.step_time_s > 0.0);
        }
        Err(PlanError::OutOfMemory(r)) => assert!(r.requested_bytes > r.available_bytes),
        Err(PlanError::NoCandidates | PlanError::NothingCompiled(_) | PlanError::Invalid(_)) => {}
    }
});
