#!/usr/bin/env python3
"""Measures the bytes that Hugging Face Transformers' model code saves for backward, per
decoder layer, for apar's `hf` model code (issue 9).

Setup (venv outside the repository):

    python3 -m venv /work/venv-hf
    /work/venv-hf/bin/pip install -r scripts/requirements-hf.txt
    /work/venv-hf/bin/python scripts/measure_hf_saved.py > tests/data/hf_saved_bytes.json

Method. Each model is built from a config (bf16, 3 layers, hidden 256, 8 heads, dropout 0,
`use_cache=False`, training mode) and runs one forward pass on tokens of batch 2 and
sequence 128 on the CPU. While the middle layer (`layers[1]`) runs, a
`torch.autograd.graph.saved_tensors_hooks` pack hook records every tensor autograd saves
for backward. The layer's count is the sum of the distinct storages among them
(deduplicated by `untyped_storage().data_ptr()`, each counted at the storage's full size:
a view keeps its whole base alive), except:

* parameters (and views of them, such as `weight.t()`): model state, not activations;
* the storages of the layer's position embeddings (`cos`, `sin`) and attention mask: the
  model computes them once and every layer reads the same tensors, so they are not a
  per-layer cost.

The layer's input hidden state *is* counted when the layer saves it (GPT-2's first
LayerNorm does): in steady state that is the previous layer's output, saved by this
layer, and equals this layer's output saved by the next one — which is how apar books it
(by the block that produced the tensor).

Each saved tensor is named by the autograd node that saved it (found by walking the
graph from the layer's output and matching the node's `_saved_*` attributes) and listed
with its shape, dtype and bytes. The reference check of the brief holds: a Llama MHA
layer gives 4,556,800 bytes eager and 2,992,128 sdpa.

On the CPU, `attn_implementation="sdpa"` runs torch's CPU flash kernel
(`_scaled_dot_product_flash_attention_for_cpu`, shown as the saving node's name): it saves
q, k, v, the output and the fp32 log-sum-exp `[b, heads, s]`, as the CUDA flash kernel
does. The numbers therefore also describe sdpa's flash path on a GPU; the efficient and
math paths differ.
"""

import json
import platform
import sys

import torch
import transformers
from transformers import (
    AutoModel,
    FalconConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

B, S, H, HEADS, FFN, LAYERS, VOCAB = 2, 128, 256, 8, 688, 3, 1000
MIDDLE = 1


def llama_like(cls, kv_heads, **extra):
    return cls(
        vocab_size=VOCAB,
        hidden_size=H,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        attention_dropout=0.0,
        use_cache=False,
        tie_word_embeddings=False,
        **extra,
    )


def variants():
    """(name, architecture, config, layer list getter, notes)."""
    layers_model = lambda m: m.layers  # noqa: E731
    layers_h = lambda m: m.h  # noqa: E731
    for kv in (HEADS, 2):
        tag = "mha" if kv == HEADS else f"gqa{kv}"
        yield f"llama_{tag}", "llama", llama_like(LlamaConfig, kv), layers_model, f"ffn {FFN}, kv heads {kv}"
        yield (
            f"mistral_{tag}",
            "mistral",
            llama_like(MistralConfig, kv, sliding_window=None),
            layers_model,
            f"ffn {FFN}, kv heads {kv}, no sliding window",
        )
        yield (
            f"qwen2_{tag}",
            "qwen2",
            llama_like(Qwen2Config, kv, use_sliding_window=False),
            layers_model,
            f"ffn {FFN}, kv heads {kv}, qkv bias",
        )
    gpt2 = GPT2Config(
        vocab_size=VOCAB,
        n_positions=512,
        n_embd=H,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=4 * H,
        activation_function="gelu_new",
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    yield "gpt2", "gpt2", gpt2, layers_h, "ffn 4h = 1024, gelu_new"
    for pct in (0.25, 1.0):
        neox = GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=H,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=4 * H,
            hidden_act="gelu",
            rotary_pct=pct,
            max_position_embeddings=512,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            use_parallel_residual=True,
            use_cache=False,
            tie_word_embeddings=False,
        )
        name = "gpt_neox" if pct == 0.25 else "gpt_neox_full_rotary"
        yield name, "gpt_neox", neox, layers_model, f"ffn 4h = 1024, exact gelu, rotary_pct {pct}, parallel residual"
    falcons = [
        ("falcon", dict(multi_query=True, parallel_attn=True, new_decoder_architecture=False),
         "falcon-7b style: multi-query (1 kv head), parallel attention, no bias"),
        ("falcon_new_decoder", dict(new_decoder_architecture=True, num_kv_heads=2),
         "falcon-40b style: new decoder architecture, 2 kv heads (two layernorms), no bias"),
        ("falcon_sequential", dict(multi_query=False, parallel_attn=False, new_decoder_architecture=False),
         "sequential attention then MLP, 8 kv heads, no bias"),
    ]
    for name, extra, note in falcons:
        cfg = FalconConfig(
            vocab_size=VOCAB,
            hidden_size=H,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            ffn_hidden_size=4 * H,
            bias=False,
            alibi=False,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            max_position_embeddings=512,
            use_cache=False,
            **extra,
        )
        yield name, "falcon", cfg, layers_h, f"ffn 4h = 1024, exact gelu; {note}"


def key(t):
    """Identifies a saved tensor by what it is, not by its Python object."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def measure(cfg, get_layers, impl):
    torch.manual_seed(0)
    model = AutoModel.from_config(cfg, attn_implementation=impl, dtype=torch.bfloat16)
    model.train()
    layer = get_layers(model)[MIDDLE]
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    state = {"on": False, "saved": [], "excluded": set(), "out": None}

    def pre_hook(_mod, args, kwargs):
        state["on"] = True
        for key in ("position_embeddings", "attention_mask", "alibi", "position_ids"):
            v = kwargs.get(key)
            for t in v if isinstance(v, (tuple, list)) else [v]:
                if isinstance(t, torch.Tensor):
                    state["excluded"].add(t.untyped_storage().data_ptr())

    def post_hook(_mod, _args, _kwargs, out):
        state["on"] = False
        state["out"] = out[0] if isinstance(out, (tuple, list)) else out

    layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    layer.register_forward_hook(post_hook, with_kwargs=True)

    def pack(t):
        if state["on"]:
            state["saved"].append(t)
        return t

    ids = torch.randint(0, VOCAB, (B, S))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False)

    # Name each saved tensor by the autograd node that saved it.
    names = {}
    seen = set()
    stack = [state["out"].grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                try:
                    v = getattr(node, attr)
                except Exception:
                    continue
                for t in v if isinstance(v, (tuple, list)) else [v]:
                    if isinstance(t, torch.Tensor):
                        names.setdefault(key(t), []).append(f"{node.name()}.{attr[len('_saved_'):]}")
        stack.extend(n for n, _ in node.next_functions)

    tensors, storages = [], {}
    for t in state["saved"]:
        ptr = t.untyped_storage().data_ptr()
        if ptr in param_ptrs:
            kind = "parameter"
        elif ptr in state["excluded"]:
            kind = "shared layer input"
        elif ptr in storages:
            kind = "duplicate storage"
        else:
            kind = "counted"
            storages[ptr] = t.untyped_storage().nbytes()
        tensors.append(
            {
                "saved_by": sorted(set(names.get(key(t), ["?"]))),
                "shape": list(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
                "storage_bytes": t.untyped_storage().nbytes(),
                "kind": kind,
            }
        )
    return sum(storages.values()), tensors


def main():
    out = {
        "about": "Bytes saved for backward per decoder layer by Hugging Face Transformers model code; "
        "see scripts/measure_hf_saved.py for the method.",
        "command": "/work/venv-hf/bin/python scripts/measure_hf_saved.py > tests/data/hf_saved_bytes.json",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "device": "cpu",
        "shape": {"batch": B, "seq": S, "hidden": H, "heads": HEADS, "layers": LAYERS, "vocab": VOCAB,
                  "measured_layer": MIDDLE, "dtype": "bfloat16"},
        "models": {},
    }
    for name, arch, cfg, get_layers, note in variants():
        entry = {"architecture": arch, "config": note, "hf_config": cfg.to_diff_dict()}
        for impl in ("eager", "sdpa"):
            total, tensors = measure(cfg, get_layers, impl)
            entry[impl] = {"saved_bytes": total, "tensors": tensors}
            print(f"{name:24} {impl:5} {total:>10}", file=sys.stderr)
        out["models"][name] = entry
    json.dump(out, sys.stdout, indent=1, default=str)
    print()


if __name__ == "__main__":
    main()
