#!/usr/bin/env python3
"""Counts the parameters Hugging Face Transformers builds for each committed config.

Every `tests/data/hf/*.json` that Transformers reads is instantiated with
`AutoModelForCausalLM.from_config` on the meta device (no memory, no weights), and
`sum(p.numel() for p in model.parameters())` is written to
`tests/data/hf_param_counts.json` (`model.parameters()` yields a tied embedding once),
`total_params`. `active_params` is what one token uses: the total less `(E - k)/E` of
the routed experts' parameters (those named `.experts.`, not the shared experts) for a
mixture of experts of `E` routed experts choosing `k`; the total for a dense model.
`tests/models.rs` compares apar's `ModelConfig::param_count()` and the built graph's
parameter tensors with these numbers exactly.

Run with the pinned environment of `scripts/requirements-hf.txt`:

    python scripts/count_hf_params.py
"""

import json
import pathlib
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "data" / "hf"
OUT = ROOT / "tests" / "data" / "hf_param_counts.json"


def count(path: pathlib.Path):
    raw = json.loads(path.read_text())
    model_type = raw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = next((raw[k] for k in EXPERT_KEYS if raw.get(k)), 0)
    if not experts:
        return total, total
    k = raw["num_experts_per_tok"]
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert routed % experts == 0, (path.name, routed, experts)
    return total, total - routed // experts * (experts - k)


EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def main():
    counts = {}
    active = {}
    skipped = {}
    for path in sorted(CONFIGS.glob("*.json")):
        try:
            counts[path.name], active[path.name] = count(path)
        except Exception as e:  # a deliberately malformed fixture
            skipped[path.name] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    doc = {
        "_about": "Total parameters Hugging Face Transformers builds for each "
        "tests/data/hf config (scripts/count_hf_params.py, meta device).",
        "_versions": {"torch": torch.__version__.split("+")[0],
                      "transformers": transformers.__version__},
        "_skipped": skipped,
        "total_params": counts,
        "active_params": active,
    }
    OUT.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    for name, n in counts.items():
        print(f"{name:32} {n:>16,} {active[name]:>16,}")
    for name, why in skipped.items():
        print(f"{name:32} skipped: {why}", file=sys.stderr)


if __name__ == "__main__":
    main()
