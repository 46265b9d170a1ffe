//! End-to-end evaluation of single configurations.

use apar::cluster::Cluster;
use apar::lower::compile::{Compiler, ModelSource, DEFAULT_MEMORY_RATIO};
use apar::models::zoo;
use apar::passes::{Config, Recompute, Schedule};

fn config(dp: u32, tp: u32, pp: u32, b: u32, m: u32, zero: u8) -> Config {
    Config {
        dp,
        tp,
        pp,
        micro_batch: b,
        num_micro_batches: m,
        sp: false,
        recompute: Recompute::None,
        zero,
        low_prec_shard: false,
        schedule: Schedule::OneFOneB,
    }
}

fn llama2_13b() -> apar::models::ModelConfig {
    // Llama-2-13B (Touvron et al. 2023, HF config): 40 layers, h 5120, 40 heads, ffn 13824.
    zoo::llama("llama2-13b", 40, 5120, 40, 40, 13824, 32000, 10000.0)
}

/// The reference platform's documented scenario: Llama-2-13B, global batch 64, seq 1024,
/// 32 MI250 GCDs. Plain data parallelism runs out of memory; the configuration the
/// platform selected (2 stages, 4 micro-batches of 1, parameters distributed) fits.
#[test]
fn reference_scenario() {
    let cluster = Cluster::resolve("moai-4xlarge").unwrap();
    let c = Compiler::new(
        ModelSource::Config(llama2_13b()),
        cluster,
        1024,
        64,
        DEFAULT_MEMORY_RATIO,
    )
    .unwrap();
    let plain = c.evaluate(&config(32, 1, 1, 2, 1, 0)).unwrap();
    assert!(!plain.fits, "plain DP peak {}", plain.peak_bytes);
    let chosen = c.evaluate(&config(16, 1, 2, 1, 4, 1)).unwrap();
    eprintln!("{:#?}", chosen.sim.memory);
    eprintln!("step {} s, mfu {}", chosen.step_time_s, chosen.mfu);
    assert!(
        chosen.fits,
        "chosen peak {} > {}",
        chosen.peak_bytes, chosen.budget_bytes
    );
}
