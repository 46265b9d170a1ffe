"""Shared fixtures: Hugging Face models built from configurations on the meta device.

The configurations keep each architecture's real per-layer dimensions (from the
public model cards' config.json: Llama-2-7B, Qwen2-7B, GPT-2 XL, Granite-3.0-8B) with
fewer layers, so that capture stays fast while the plans face real memory pressure.
"""

import functools
import json
import os

import pytest

if os.environ.get("APAR_REQUIRE_TORCH") == "1":
    # CI (ci.sh): a missing torch or transformers is a failure, not a skip.
    import torch
    import transformers
else:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

LAYERS = 4


def hf_configs():
    T = transformers
    return {
        # meta-llama/Llama-2-7b-hf
        "llama": T.LlamaConfig(
            hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
            num_key_value_heads=32, num_hidden_layers=LAYERS, vocab_size=32000,
            max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        ),
        # Qwen/Qwen2-7B
        "qwen2": T.Qwen2Config(
            hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
            num_key_value_heads=4, num_hidden_layers=LAYERS, vocab_size=152064,
            max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
            tie_word_embeddings=False,
        ),
        # openai-community/gpt2-xl (tied embeddings, learned positions, Conv1D, gelu_new)
        "gpt2": T.GPT2Config(n_embd=1600, n_layer=LAYERS, n_head=25, vocab_size=50257, n_positions=1024),
        # mistralai/Mixtral-8x7B-v0.1 (mixture of experts)
        "mixtral": T.MixtralConfig(
            hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
            num_key_value_heads=8, num_hidden_layers=2, vocab_size=32000,
            num_local_experts=8, num_experts_per_tok=2,
        ),
        # ibm-granite/granite-3.0-8b-base: no hand-written loader in apar
        "granite": T.GraniteConfig(
            hidden_size=4096, intermediate_size=12800, num_attention_heads=32,
            num_key_value_heads=8, num_hidden_layers=LAYERS, vocab_size=49155,
            max_position_embeddings=4096, embedding_multiplier=12.0,
            residual_multiplier=0.22, attention_multiplier=0.0078125,
            logits_scaling=16.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
        ),
    }


@functools.lru_cache(maxsize=None)
def hf_model(arch):
    """The model of ``arch`` built on the meta device in bf16 (no weights)."""
    cfg = hf_configs()[arch]
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


@functools.lru_cache(maxsize=None)
def captured(arch):
    import apar

    return apar.capture(hf_model(arch))


@pytest.fixture(scope="session")
def config_file(tmp_path_factory):
    """Writes an architecture's config.json (as Hugging Face saves it) and returns the
    path."""
    root = tmp_path_factory.mktemp("configs")

    def write(arch):
        path = os.path.join(str(root), f"{arch}.json")
        with open(path, "w") as f:
            f.write(hf_model(arch).config.to_json_string(use_diff=False))
        return path

    return write
