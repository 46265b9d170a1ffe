//! Utilisation figures and per-step overheads (issue 10, items 2–3). Expected values
//! are derived by hand from the cited definitions, never copied from apar's output.

use apar::cluster::Cluster;
use apar::cost::overhead::KERNEL_LAUNCH_S;
use apar::lower::compile::{model_flops_per_token, Compiler, ModelSource};
use apar::models::zoo;
use apar::passes::{Config, Recompute, Schedule};

fn config(dp: u32, tp: u32, pp: u32, b: u32, m: u32, recompute: Recompute) -> Config {
    Config {
        dp,
        tp,
        pp,
        cp: 1,
        ep: 1,
        etp: 1,
        micro_batch: b,
        num_micro_batches: m,
        sp: false,
        recompute,
        zero: 1,
        low_prec_shard: false,
        schedule: Schedule::OneFOneB,
        recompute_layers: None,
        recompute_modules: None,
    }
}

fn compiler(model: &str, cluster: &str, seq: u64, batch: u64) -> Compiler {
    let cfg = zoo::lookup(model).unwrap();
    let cluster = Cluster::resolve(cluster).unwrap();
    Compiler::new(ModelSource::Config(cfg), cluster, seq, batch, 1.0).unwrap()
}

/// PaLM (Chowdhery et al. 2022, Appendix B): model FLOPs per token `6·N + 12·L·H·Q·T`.
/// Llama-2-7B (Touvron et al. 2023; HF config: h 4096, 32 layers, 32 heads of 128,
/// ffn 11008, vocab 32000, untied, RMSNorm): per layer 4h² + 3·h·ffn + 2h =
/// 67,108,864 + 135,266,304 + 8,192 = 202,383,360 parameters; 32 layers, the final
/// norm (4,096) and the output projection (32000 · 4096 = 131,072,000) give
/// N = 6,607,343,616 (the input table, a lookup, left out). At T = 4096:
/// 6N = 39,644,061,696 and 12·32·32·128·4096 = 6,442,450,944.
#[test]
fn mfu_is_palm_model_flops_over_peak() {
    let per_token = 39_644_061_696.0 + 6_442_450_944.0;
    let cfg = zoo::lookup("llama2-7b").unwrap();
    assert_eq!(model_flops_per_token(&cfg, 4096), per_token);
    let c = compiler("llama2-7b", "dgx-a100-80g:1", 4096, 16);
    let tokens = 16.0 * 4096.0;
    assert_eq!(c.model_flops_per_step(), per_token * tokens);
    let e = c.evaluate(&config(8, 1, 1, 1, 2, Recompute::None)).unwrap();
    // MFU = model FLOPs / (step · devices · peak); the A100's dense bf16 peak is
    // 312 TFLOP/s (NVIDIA A100 datasheet).
    let want = per_token * tokens / (e.step_time_s * 8.0 * 312e12);
    assert!((e.mfu - want).abs() / want < 1e-9, "{} vs {want}", e.mfu);
    assert!((e.tflops_per_device - want * 312.0).abs() / (want * 312.0) < 1e-9);
    // Executed FLOPs count every op the devices run (norms, softmax, the flash
    // backward's recomputed QKᵀ): the 6N matmuls whole, and of the attention the
    // causal half of the flash kernels' 2 forward + 5 backward products, 7/12 of the
    // 12·L·H·Q·T the model counts; never fewer than that.
    let executed_floor = 39_644_061_696.0 + 7.0 / 12.0 * 6_442_450_944.0;
    assert!(
        e.hfu >= e.mfu * executed_floor / per_token,
        "hfu {} mfu {}",
        e.hfu,
        e.mfu
    );
}

/// Full recomputation runs every layer's forward twice. A layer's forward is at least
/// 2/7 of its forward + backward (a matmul's backward is 2 of its forward, flash
/// attention's 5 products to 2), so the executed FLOPs grow by at least 2/7 of the
/// layers' share (here > 90% of the work): HFU · step grows by > 25%, while the model
/// FLOPs (MFU · step) do not change.
#[test]
fn recomputation_counts_in_hfu_not_in_mfu() {
    let c = compiler("llama2-7b", "dgx-a100-80g:1", 4096, 16);
    let none = c.evaluate(&config(8, 1, 1, 1, 2, Recompute::None)).unwrap();
    let full = c.evaluate(&config(8, 1, 1, 1, 2, Recompute::Full)).unwrap();
    let model = |e: &apar::lower::compile::Evaluation| e.mfu * e.step_time_s;
    let executed = |e: &apar::lower::compile::Evaluation| e.hfu * e.step_time_s;
    assert!((model(&none) - model(&full)).abs() / model(&none) < 1e-9);
    assert!(full.hfu > full.mfu);
    assert!(
        executed(&full) > 1.25 * executed(&none),
        "{} vs {}",
        executed(&full),
        executed(&none)
    );
}

/// Work tensor parallelism leaves replicated (norms, residual adds, an unsplit head)
/// runs on every rank of the group: it is executed (HFU) but never useful (MFU), whose
/// numerator is the model's FLOPs whatever the degrees.
#[test]
fn replicated_tensor_parallel_work_is_not_model_work() {
    let c = compiler("gpt2", "dgx-a100-80g:1", 1024, 8);
    let tp1 = c.evaluate(&config(8, 1, 1, 1, 1, Recompute::None)).unwrap();
    let tp4 = c.evaluate(&config(2, 4, 1, 1, 4, Recompute::None)).unwrap();
    let model = |e: &apar::lower::compile::Evaluation| e.mfu * e.step_time_s;
    let executed = |e: &apar::lower::compile::Evaluation| e.hfu * e.step_time_s;
    assert!((model(&tp1) - model(&tp4)).abs() / model(&tp1) < 1e-9);
    // Same devices, same tokens: the replicated work makes tp 4 execute more.
    assert!(executed(&tp4) > executed(&tp1));
}

/// The host issues one kernel per non-view op ([`KERNEL_LAUNCH_S`] each): a
/// host-bound model's step is at least `m` micro-batches × its blocks' kernels ×
/// the launch time, so the overhead grows with both the layers and the micro-batches.
#[test]
fn launch_overhead_scales_with_layers_and_micro_batches() {
    let bound = |layers: u32, m: u32| {
        let mut cfg = zoo::lookup("tiny-llama").unwrap();
        cfg.layers = layers;
        let cluster = Cluster::resolve("dgx-a100-80g:1").unwrap();
        let c = Compiler::new(
            ModelSource::Config(cfg),
            cluster,
            128,
            u64::from(8 * m),
            1.0,
        )
        .unwrap();
        let cfgm = config(8, 1, 1, 1, m, Recompute::None);
        let profiles = c.profiles(&cfgm);
        let set = profiles.as_ref().as_ref().unwrap();
        let kernels: u32 = set
            .blocks
            .iter()
            .map(|b| b.fwd_kernels + b.bwd_kernels)
            .sum();
        let layer_kernels = set.blocks.get(1).fwd_kernels;
        assert!(layer_kernels > 0);
        let e = c.evaluate(&cfgm).unwrap();
        let floor = f64::from(m) * f64::from(kernels) * KERNEL_LAUNCH_S;
        assert!(e.step_time_s >= floor, "{} < {floor}", e.step_time_s);
        (e.step_time_s, kernels)
    };
    let (t2, k2) = bound(2, 1);
    let (t8, k8) = bound(8, 1);
    let (t8m4, _) = bound(8, 4);
    assert!(k8 > k2);
    // Six more layers, each with at least one kernel's launch per pass.
    assert!(t8 - t2 >= f64::from(k8 - k2) * KERNEL_LAUNCH_S * 0.999);
    // Three more micro-batches through all blocks.
    assert!(t8m4 - t8 >= 3.0 * f64::from(k8) * KERNEL_LAUNCH_S * 0.999);
}

/// HFU counts the FLOPs the kernels execute: a causal flash-attention kernel skips the
/// key blocks above the diagonal, so it runs half of the rectangle MFU's PaLM
/// definition counts (`cost::CAUSAL_WORK_FRACTION`). At a million tokens attention is
/// most of the work, and the executed rate can then never exceed the peak, while the
/// rectangle-counting MFU may read high.
#[test]
fn hfu_counts_causal_attention_at_its_executed_half() {
    let c = compiler("llama3-8b", "dgx-h100:16", 1 << 20, 16);
    let cfg = Config {
        cp: 32,
        sp: true,
        zero: 3,
        ..config(2, 2, 1, 1, 8, Recompute::Full)
    };
    let e = c.evaluate(&cfg).unwrap();
    assert!(e.hfu > 0.0 && e.hfu < 1.0, "HFU {}", e.hfu);
    // Without recomputation nothing is executed twice, and half the attention
    // rectangle is skipped: fewer FLOPs executed than the model counts.
    let e = c
        .evaluate(&Config {
            recompute: Recompute::None,
            ..cfg
        })
        .unwrap();
    assert!(e.hfu < e.mfu, "HFU {} MFU {}", e.hfu, e.mfu);
}

/// Executed FLOPs per token do not depend on how many micro-batches a step has: a
/// step of 262,144 micro-batches (2^34 tokens a device) counts them as one of 2 does,
/// with no integer ceiling on the sum.
#[test]
fn executed_flops_do_not_saturate_on_long_steps() {
    let per_token = |batch: u64, m: u32| {
        let c = compiler("llama2-7b", "dgx-h100:2", 4096, batch);
        let e = c
            .evaluate(&config(16, 1, 1, 1, m, Recompute::Full))
            .unwrap();
        e.hfu * e.step_time_s / (batch as f64 * 4096.0)
    };
    let (short, long) = (per_token(32, 2), per_token(16 * 262_144, 262_144));
    assert!((short - long).abs() <= 1e-9 * short, "{short} vs {long}");
}
