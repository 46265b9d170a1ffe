//! FP8 compute (`--precision fp8`): GEMM time at the device's FP8 peak, the saved
//! activations and weight copies each engine's FP8 recipe implies (read off the
//! training graph's tensors), and the refusals.
//!
//! Shapes used below: Llama-2-7B has h = 4096, ffn = 11008, 32 layers (Touvron et al.
//! 2023, Table 1 and the released `config.json`: `hidden_size` 4096,
//! `intermediate_size` 11008, `num_hidden_layers` 32).

use apar::cluster::Cluster;
use apar::cost::{CostModel, Group};
use apar::engine::memory::{Precision, PrecisionError, PrecisionOptions};
use apar::engine::Engine;
use apar::ir::{DType, Dim, Env, Graph, Op, TensorType};
use apar::lower::compile::{CompileError, Compiler, ModelSource};
use apar::models::{build_forward, zoo, Attention};
use apar::passes::{Config, Recompute, Schedule};
use apar::train::precision::{self, Fp8Recipe, TORCHAO_FP8, TRANSFORMER_ENGINE_FP8};
use apar::train::{training_graph, Stats, TrainOptions};

const H: u64 = 4096;
const FFN: u64 = 11008;
const LAYERS: u64 = 32;

fn fp8() -> PrecisionOptions {
    PrecisionOptions {
        compute: Precision::Fp8,
        ..PrecisionOptions::default()
    }
}

/// Llama-2-7B with flash attention (the attention core Megatron-LM and torchtitan
/// run), trained at bf16 or with an FP8 recipe; stats at micro-batch 1, sequence `s`.
fn stats(recipe: Option<Fp8Recipe>, s: u64) -> Stats {
    let mut m = zoo::lookup("llama2-7b").unwrap();
    m.attention = Attention::Flash;
    let fwd = build_forward(&m).unwrap();
    let mut fwd: Graph = precision::apply(&fwd, DType::Bf16, DType::F32).unwrap();
    if let Some(r) = &recipe {
        fwd = precision::apply_fp8(&fwd, r).unwrap();
        apar::ir::verify(&fwd).unwrap();
    }
    let opts = TrainOptions {
        fp8: recipe,
        ..TrainOptions::default()
    };
    let g = training_graph(&fwd, &opts).unwrap();
    apar::ir::verify(&g).unwrap();
    Stats::of_training_graph(&g, Env::new(1, s)).unwrap()
}

/// A matmul of FP8 operands runs at the FP8 peak: on H100 (989 dense bf16, 1,979 dense
/// FP8 TFLOP/s, NVIDIA H100 datasheet) a compute-bound GEMM takes 989/1979 of its
/// bf16 time (the same efficiency applies to both).
#[test]
fn fp8_gemm_runs_at_the_fp8_peak() {
    let cost = CostModel::new(Cluster::resolve("dgx-h100:1").unwrap());
    let n = 8192;
    let time = |a: DType, b: DType| {
        let ta = TensorType::new(a, [Dim::lit(n), Dim::lit(n)]);
        let tb = TensorType::new(b, [Dim::lit(n), Dim::lit(n)]);
        let op = Op::MatMul {
            ta: false,
            tb: false,
        };
        let out = op.infer(&[&ta, &tb]).unwrap().unwrap();
        assert_eq!(out[0].dtype, DType::Bf16);
        cost.op_time(&op, &[&ta, &tb], &[&out[0]], Env::new(1, 1), Group::SINGLE)
    };
    let bf16 = time(DType::Bf16, DType::Bf16);
    let f8 = time(DType::F8E4M3, DType::F8E4M3);
    // Backward GEMMs of the hybrid recipe mix E5M2 gradients with E4M3 operands.
    let mixed = time(DType::F8E5M2, DType::F8E4M3);
    assert!((f8 / bf16 - 989.0 / 1979.0).abs() < 1e-9, "{f8} vs {bf16}");
    assert_eq!(f8, mixed);
}

/// Per layer, Transformer Engine saves the FP8 cast of each linear's input instead of
/// the bf16 input (`_Linear.forward` saves `inputmat` after `cast_to_fp8`). In a
/// Llama layer (flash attention) the linear inputs are the normalised input of the
/// QKV projection [b·s, h], the attention output before the output projection [b·s, h],
/// the normalised input of gate/up [b·s, h] and the SwiGLU product before the down
/// projection [b·s, ffn]. The norms save their inputs, SiLU and the product save their
/// operands, so the two normalised inputs and the SwiGLU product were saved only by
/// their linears: 2 → 1 byte each. The attention output stays saved in bf16 by the
/// flash-attention backward (it reads `O`) and its FP8 copy is saved beside it: +1
/// byte. Net change per layer: −b·s·(h + h + ffn) + b·s·h = −b·s·(h + ffn) bytes.
/// torchao saves the bf16 operands (`ctx.save_for_backward(input_hp, weight_hp_t)`):
/// no change.
#[test]
fn saved_activations_drop_by_the_linear_inputs() {
    let s = 1024;
    let bf16 = stats(None, s).activation_bytes_per_layer;
    let te = stats(Some(TRANSFORMER_ENGINE_FP8), s).activation_bytes_per_layer;
    let ao = stats(Some(TORCHAO_FP8), s).activation_bytes_per_layer;
    assert_eq!(bf16 - te, s * (H + FFN));
    assert_eq!(ao, bf16);
}

/// Transformer Engine keeps an FP8 copy of each linear weight and its FP8 transpose
/// (`weight_fp8`, `weight_t_fp8`): 2 bytes per linear-weight element beside the bf16
/// copy, fp32 master and moments. A Llama layer's linears hold 4·h² (q, k, v, o with
/// 32 KV heads) + 3·h·ffn (gate, up, down) elements; the embedding and the output
/// layer stay bf16. torchao casts the weights at each use: no persistent copy.
#[test]
fn weight_memory_rises_by_the_fp8_copies() {
    let bf16 = stats(None, 16).model_state_bytes;
    let te = stats(Some(TRANSFORMER_ENGINE_FP8), 16).model_state_bytes;
    let ao = stats(Some(TORCHAO_FP8), 16).model_state_bytes;
    let linear = LAYERS * (4 * H * H + 3 * H * FFN);
    assert_eq!(te.low_prec_params - bf16.low_prec_params, 2 * linear);
    assert_eq!(
        (te.params_fp32, te.grads, te.optimizer),
        (bf16.params_fp32, bf16.grads, bf16.optimizer)
    );
    assert_eq!(ao, bf16);
}

fn compiler(cluster: &str, engine: Engine) -> Compiler {
    let mut m = zoo::lookup("llama2-7b").unwrap();
    m.attention = Attention::Flash;
    Compiler::new(
        ModelSource::Config(m),
        Cluster::resolve(cluster).unwrap(),
        4096,
        64,
        1.0,
    )
    .unwrap()
    .with_engine(engine)
}

/// Megatron-LM on one DGX H100: the same configuration runs faster with FP8 (the
/// GEMMs, most of a 7B layer's FLOPs at s = 4096, run at twice the peak), and its
/// low-precision parameter bytes on the device grow by the FP8 weight copies (ZeRO-1
/// leaves them whole on every rank).
#[test]
fn fp8_raises_throughput_on_h100() {
    let c = Config {
        dp: 8,
        tp: 1,
        pp: 1,
        cp: 1,
        ep: 1,
        etp: 1,
        micro_batch: 1,
        num_micro_batches: 8,
        sp: false,
        recompute: Recompute::Full,
        zero: 1,
        low_prec_shard: false,
        schedule: Schedule::OneFOneB,
        recompute_layers: None,
        recompute_modules: None,
    };
    let bf16 = compiler("dgx-h100:1", Engine::Megatron)
        .evaluate(&c)
        .unwrap();
    let f8 = compiler("dgx-h100:1", Engine::Megatron)
        .with_precision(fp8())
        .unwrap()
        .evaluate(&c)
        .unwrap();
    assert!(
        f8.step_time_s < 0.8 * bf16.step_time_s,
        "{} vs {}",
        f8.step_time_s,
        bf16.step_time_s
    );
}

/// A device without FP8 tensor cores (A100: the datasheet lists no FP8), DeepSpeed and
/// Hugging Face (no FP8 option) refuse FP8 with typed reasons naming the device or
/// the engine; H200 and MI300X accept it.
#[test]
fn fp8_refusals() {
    match compiler("dgx-a100-80g:1", Engine::Megatron).with_precision(fp8()) {
        Err(CompileError::Precision(PrecisionError::Fp8Device { device })) => {
            assert_eq!(device, "A100-SXM4-80GB")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("A100 accepted fp8"),
    }
    for engine in [Engine::DeepSpeed, Engine::Hf] {
        match compiler("dgx-h100:1", engine).with_precision(fp8()) {
            Err(CompileError::Precision(e @ PrecisionError::Fp8Engine { .. })) => {
                assert!(e.to_string().contains(engine.name()), "{e}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("{engine} accepted fp8"),
        }
    }
    for cluster in ["dgx-h200:1", "mi300x:1"] {
        for engine in [Engine::Megatron, Engine::Torchtitan] {
            assert!(compiler(cluster, engine).with_precision(fp8()).is_ok());
        }
    }
}
