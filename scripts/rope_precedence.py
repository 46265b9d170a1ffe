#!/usr/bin/env python3
"""Records which rotary settings Hugging Face Transformers keeps when a config.json
spells them more than one way.

A config may carry the legacy `rope_scaling`, the newer `rope_parameters`, a top-level
`rope_theta`, or several of them. For each case below a small Llama config is loaded
with `AutoConfig.from_pretrained` and the resulting `config.rope_parameters` (its
`rope_type`, `factor` and `rope_theta`) is written to
`tests/data/hf_rope_precedence.json`. `tests/models.rs` loads the same files with
apar's loader and compares the rotary base and scaling it plans with.

Run with the pinned environment of `scripts/requirements-hf.txt`:

    python scripts/rope_precedence.py
"""

import json
import pathlib
import tempfile

import transformers
from transformers import AutoConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "hf_rope_precedence.json"

BASE = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}

CASES = {
    "nested_theta_over_top_level": {
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    },
    "rope_scaling_replaces_rope_parameters": {
        "rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    },
    "replaced_rope_parameters_theta_is_lost": {
        "rope_theta": 123.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    },
    "empty_rope_scaling_keeps_rope_parameters": {
        "rope_theta": 123.0,
        "rope_scaling": {},
        "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 500000.0},
    },
    "same_dict_twice": {
        "rope_scaling": {"rope_type": "linear", "factor": 3.0, "rope_theta": 20000.0},
        "rope_parameters": {"rope_type": "linear", "factor": 3.0, "rope_theta": 20000.0},
    },
}


def main():
    cases = []
    for name, extra in CASES.items():
        config = {**BASE, **extra}
        with tempfile.TemporaryDirectory() as d:
            path = pathlib.Path(d) / "config.json"
            path.write_text(json.dumps(config))
            rope = AutoConfig.from_pretrained(d).rope_parameters
        cases.append(
            {
                "name": name,
                "config": config,
                "rope_type": rope["rope_type"],
                "factor": rope.get("factor"),
                "rope_theta": rope["rope_theta"],
            }
        )
    OUT.write_text(
        json.dumps(
            {"transformers": transformers.__version__, "cases": cases}, indent=1
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
