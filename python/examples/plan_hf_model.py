#!/usr/bin/env python3
"""Plans a Hugging Face model that apar has no hand-written loader for, in one line.

The model is IBM's Granite-3.0-8B (``model_type: granite``; apar's config.json loader
reads llama, mistral, qwen2/3, phi3, olmo2, gemma 1-3, starcoder2, gpt2, gpt_neox,
falcon, mixtral and qwen2/3-moe, not granite). It is built from its configuration on
the meta device — no weights are downloaded or allocated — captured with
``torch.export``, planned for 32 MI250 GCDs (the reference platform's ``moai-4xlarge``)
at global batch 64 and sequence 1024 for Hugging Face Transformers with FSDP, and the
plan's ``TrainingArguments`` are printed.

    python plan_hf_model.py                       # Granite-3.0-8B (config below)
    python plan_hf_model.py --config config.json  # any causal LM's config.json
    python plan_hf_model.py --engine megatron     # Megatron-LM (needs a loader-readable config)

The configuration below is ibm-granite/granite-3.0-8b-base's ``config.json`` (Hugging
Face Hub), written out so that the script runs offline.
"""

import argparse
import json
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GraniteConfig

import apar

GRANITE_3_0_8B = dict(
    hidden_size=4096,
    intermediate_size=12800,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=49155,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    hidden_act="silu",
    tie_word_embeddings=True,
    embedding_multiplier=12.0,
    residual_multiplier=0.22,
    attention_multiplier=0.0078125,
    logits_scaling=16.0,
    attention_bias=False,
    mlp_bias=False,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a Hugging Face config.json (default: Granite-3.0-8B)")
    ap.add_argument("--cluster", default="moai-4xlarge")
    ap.add_argument("--engine", default="hf", choices=["megatron", "deepspeed", "torchtitan", "hf"])
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--save-plan", help="write the plan JSON here (apar eval --plan reads it)")
    a = ap.parse_args()

    if a.config:
        with open(a.config) as f:
            d = json.load(f)
        config = AutoConfig.for_model(d.pop("model_type"), **d)
    else:
        config = GraniteConfig(**GRANITE_3_0_8B)

    # No weights: every parameter is a meta tensor (shape and dtype only).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    hf_params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {hf_params:,} parameters (Hugging Face's count)")

    # The one line: capture, plan, print the log, export for the engine.
    try:
        plan = apar.auto(model, global_batch=a.global_batch, seq=a.seq, cluster=a.cluster, engine=a.engine)
    except apar.OutOfMemory as e:
        print(e.report.text if e.report else e, file=sys.stderr)
        return 1
    except apar.UnsupportedOp as e:
        print(e, file=sys.stderr)
        return 2

    print(plan)
    if a.save_plan:
        plan.save(a.save_plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
