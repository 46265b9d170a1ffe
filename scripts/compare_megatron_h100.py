#!/usr/bin/env python3
"""Prices Megatron-LM's published H100 weak-scaling runs with `apar plan` and prints
apar's step time against the measured one. Nothing here is fitted to these runs.

Source: Megatron-LM README, "Performance Benchmarking" (images/model_table.png, added
2024-07-15 in commit f2e5db402c): GPT models with vocabulary 131,072 and sequence 4,096
on DGX H100, with `--overlap-grad-reduce`, `--overlap-param-gather` and
`--tp-comm-overlap`; each row gives hidden size, heads, layers, TP, PP, DP, global batch
and the per-GPU TFLOP/s. The models are GPT (LayerNorm, GeLU MLP of 4h, untied
embeddings: 12·L·h² + 2·V·h matches the table's sizes). The measured step time is
Megatron-LM's FLOPs per step at that commit (`num_floating_point_operations`, which
counts the whole s×s attention matrix) over GPUs × TFLOP/s. Micro-batch, recomputation
and schedule are not published: apar searches them at the row's pinned TP, PP and DP.

    python3 scripts/compare_megatron_h100.py [path/to/apar]
"""

import json
import pathlib
import subprocess
import sys
import tempfile

SEQ = 4096
VOCAB = 131072
# size, heads, hidden, layers, TP, PP, DP, global batch, measured TFLOP/s per GPU
ROWS = [
    ("1.7B", 16, 2048, 24, 1, 1, 48, 192, 408.8),
    ("7.1B", 32, 4096, 30, 2, 1, 48, 192, 465.9),
    ("16B", 48, 6144, 32, 4, 1, 48, 192, 489.1),
    ("32B", 56, 7168, 48, 8, 1, 48, 192, 459.6),
    ("70B", 64, 8192, 84, 8, 2, 48, 384, 419.7),
    ("119B", 80, 10240, 92, 8, 4, 48, 768, 420.5),
    ("177B", 96, 12288, 96, 8, 6, 48, 1152, 432.8),
    ("314B", 128, 16384, 96, 8, 8, 48, 1536, 474.4),
    ("462B", 144, 18432, 112, 8, 16, 48, 3072, 459.9),
]


def megatron_flops(batch, layers, hidden):
    """Megatron-LM's FLOPs per step at commit f2e5db402c (MHA, no SwiGLU, ffn 4h)."""
    return (
        12 * batch * SEQ * layers * hidden * hidden
        * ((1 + 1 + SEQ / hidden) + 4 + VOCAB / (2 * layers * hidden))
    )


def main():
    apar = sys.argv[1] if len(sys.argv) > 1 else "target/release/apar"
    errors = []
    with tempfile.TemporaryDirectory() as d:
        for size, heads, h, layers, tp, pp, dp, batch, tflops in ROWS:
            config = pathlib.Path(d) / f"{size}.json"
            config.write_text(json.dumps({
                "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "n_embd": h, "n_head": heads, "n_layer": layers, "vocab_size": VOCAB,
                "n_positions": SEQ, "activation_function": "gelu_new",
                "tie_word_embeddings": False, "layer_norm_epsilon": 1e-5,
            }))
            gpus = tp * pp * dp
            out = subprocess.run(
                [apar, "plan", "--model", str(config), "--cluster", f"dgx-h100:{gpus // 8}",
                 "--global-batch", str(batch), "--seq", str(SEQ), "--tp", str(tp),
                 "--pp", str(pp), "--dp", str(dp), "--json"],
                capture_output=True, text=True, check=True,
            ).stdout
            plan = json.loads(out)
            c = plan["config"]
            measured = megatron_flops(batch, layers, h) / (gpus * tflops * 1e12)
            predicted = plan["step_time_s"]
            err = 100 * (predicted / measured - 1)
            errors.append(err)
            print(f"{size:>5} tp{tp} pp{pp} dp{dp} gbs{batch:<5} measured {measured:7.3f} s"
                  f"  apar {predicted:7.3f} s ({err:+5.1f}%)  b{c['micro_batch']}"
                  f" {c['recompute']} {c['schedule']} zero {c['zero']}")
    mean = sum(abs(e) for e in errors) / len(errors)
    print(f"mean |error| {mean:.1f}%, largest {max(abs(e) for e in errors):.1f}%")


if __name__ == "__main__":
    main()
