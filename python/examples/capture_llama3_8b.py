#!/usr/bin/env python3
"""Measures the capture of Llama-3-8B's full configuration on the meta device: wall
time of ``torch.export`` and of the whole capture, and the process's peak resident
memory (``ru_maxrss``).

    python capture_llama3_8b.py [--plan]

The configuration is meta-llama/Meta-Llama-3-8B's ``config.json`` (Hugging Face Hub),
written out so that the script runs offline.
"""

import argparse
import resource
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import apar

LLAMA_3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--plan", action="store_true", help="also plan it on moai-4xlarge (hf engine)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA_3_8B), dtype=torch.bfloat16)
    built = time.perf_counter() - t0
    hf = sum(p.numel() for p in model.parameters())
    c = apar.capture(model)
    print(f"model built on meta: {built:.2f} s; {hf:,} parameters (Hugging Face)")
    print(f"capture: torch.export {c.export_s:.2f} s, total {c.capture_s:.2f} s; "
          f"{len(c.graph['ops'])} IR ops, {c.layers} layers, {c.params:,} parameters "
          f"({'equal' if c.params == hf else 'DIFFERENT'})")
    print(f"peak resident memory so far: {rss_gib():.2f} GiB")
    if a.plan:
        t = time.perf_counter()
        p = apar.plan(c, "moai-4xlarge", global_batch=64, seq=1024, engine="hf")
        print(f"plan: {time.perf_counter() - t:.2f} s: {p!r}")
        print(f"peak resident memory: {rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
