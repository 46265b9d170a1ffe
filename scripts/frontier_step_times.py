#!/usr/bin/env python3
"""Step times of the Frontier runs of Dash et al. 2023, for `apar calibrate`.

Dash, Lyngaas, Yin, Wang, Egele, Cong, Wang, Balaprakash, "Optimizing Distributed
Training on Frontier for Large Language Models" (arXiv 2312.12705, ISC 2024) report
"GPU throughput" of 38.38%, 36.14% and 31.96% of peak for GPT models of 22B, 175B and
1T parameters on MI250X GCDs of Frontier (Megatron-DeepSpeed, ROCm 5.7). The
configurations below are those of the authors' launch scripts
(github.com/sajal-vt/Megatron-DeepSpeed-ORNL, branch FA2 at 03325d437c96,
`launch_gpt22b_bf16.slurm`, `launch_gpt175b_bf16.slurm`, `launch_gpt1T_bf16.slurm`,
with their DeepSpeed configs `ds_config_16N_175B.json` and
`ds_config_128N_1T_fp16.json`: fp16 on, ZeRO stage 1).

The percentages are read as the fork's logged TFLOP/s per GCD over the GCD's peak
(191.5 TFLOP/s fp16, half of the MI250X's 383). The fork logs TFLOP/s from the
Narayanan et al. 2021 count (arXiv 2104.04473, eq. 3) in `megatron/utils.py`
(`throughput_calculator`): 24·f·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)) FLOPs per step,
with f = 4 passes when activations are checkpointed (the scripts pass
`--checkpoint-activations`), B the global batch, V the padded vocabulary (GPT-2's
50,257 rounded up to a multiple of 128·tp). The step time is then that count over
(GCDs × fraction × peak). The paper's headline scales (1,024 and 3,072 GCDs) are weak
scalings of these per-replica layouts at 100% efficiency, so the per-GCD rate is
the scripts' rate at their own scale.

Usage: python3 scripts/frontier_step_times.py  (prints the CSV rows of
calibration/fidelity/frontier-mi250x.csv's step_time_s column).
"""

PEAK_FP16_PER_GCD = 191.5e12  # MI250X: 383 TFLOP/s fp16/bf16 dense per package, 2 GCDs
GPT2_VOCAB = 50257
MAKE_VOCAB_DIVISIBLE_BY = 128  # Megatron's --make-vocab-size-divisible-by default

# name, layers, hidden, seq, global batch, tp, gcds, reported fraction of peak
RUNS = [
    ("22b", 48, 6144, 2048, 640, 1, 16, 0.3838),
    ("175b", 96, 12288, 4096, 640, 4, 128, 0.3614),
    ("1t", 128, 25600, 2048, 1024, 4, 1024, 0.3196),
]


def padded_vocab(tp):
    m = MAKE_VOCAB_DIVISIBLE_BY * tp
    return (GPT2_VOCAB + m - 1) // m * m


def step_time(layers, hidden, seq, batch, tp, gcds, fraction, passes=4):
    v = padded_vocab(tp)
    flops = (
        24 * passes * batch * seq * layers * hidden**2
        * (1 + seq / (6 * hidden) + v / (16 * layers * hidden))
    )
    return flops / (gcds * fraction * PEAK_FP16_PER_GCD)


def main():
    for name, l, h, s, b, tp, n, frac in RUNS:
        t = step_time(l, h, s, b, tp, n, frac)
        print(f"{name}: {n} GCDs, {frac:.2%} of peak -> step_time_s {t:.1f}")


if __name__ == "__main__":
    main()
