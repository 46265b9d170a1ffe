#!/usr/bin/env python3
"""Feeds apar's engine exports to the engines' own parsers and set-up checks.

Input: the JSON lines written by `cargo test --test exports write_check_matrix --
--ignored` (one row per case and engine: the export or apar's refusal, and the values
the export must mean). Output: a Markdown table (RESULTS.md) and exit status 1 if any
accepted export is rejected by its engine or read back differently.

Per engine, on CPU, without launching anything:

- Megatron-LM: `megatron.training.arguments.parse_args` on `pretrain_gpt.py` plus the
  export, with the export's environment, WORLD_SIZE = the plan's devices, then
  `validate_args` and `core_transformer_config_from_args` (the TransformerConfig
  checks of the pipeline layout, uneven stages and recomputation). No GPU is there to
  ask for its architecture: `get_device_arch_version` answers 9 (Hopper, the plans'
  H100; A100 is 8 and takes the same branches). The layers each (rank, virtual stage)
  builds are compared with the plan.
- DeepSpeed: `DeepSpeedConfig(ds_config, mpu)` with an mpu of the plan's data-parallel
  size (the batch identity check), the pipeline engine's ZeRO check
  (`zero_optimization_stage < ZeroStageEnum.gradients`) and its batch assertion
  against a `PipeModelDataParallelTopology(num_pp, num_mp, num_dp)`, and
  `PipelineModule._partition_layers` (DeepSpeed's own code, on a module object built
  without a process group) on [embedding, layers, head] to compare the cut.
- torchtitan: `ConfigManager().parse_args` on the export (recipe + overrides, with
  `Trainer.Config.__post_init__`), `ParallelDims.from_config(..., world_size)`
  (its `_validate`), the trainer's batch arithmetic, and the module names of
  `module_fqns_per_model_part` against the recipe's model built on the meta device.
- Hugging Face: `HfArgumentParser(TrainingArguments).parse_args_into_dataclasses` on
  the export (plus `--output_dir`; `is_torch_bf16_gpu_available` answers yes for the
  Ampere+ GPU the plan is for), reading back batch, accumulation, bf16, FSDP
  sharding and activation checkpointing.
"""

import argparse
import json
import multiprocessing as mp
import os
import shlex
import sys
import tempfile
import traceback


def shell_words(text):
    """The words a POSIX shell makes of `text` (backslash-newline joins lines)."""
    return shlex.split(text.replace("\\\n", " "))


def fail(msg):
    raise AssertionError(msg)


def expect_equal(what, got, want):
    if got != want:
        fail(f"{what}: engine reads {got!r}, plan has {want!r}")


# --------------------------------------------------------------------------- Megatron

# What every launch of pretrain_gpt.py adds to the export and apar does not decide
# (training length, learning rate, tokenizer, data): needed by validate_args.
MEGATRON_LAUNCH = [
    "--train-iters", "10",
    "--lr", "1e-4",
    "--tokenizer-type", "NullTokenizer",
    "--vocab-size", "32000",
    "--mock-data",
]
# What only this CPU check adds: Transformer Engine (CUDA only) is not installed here,
# and TransformerConfig refuses RoPE fusion without it.
MEGATRON_NO_TE = ["--no-rope-fusion"]


def check_megatron(row, src):
    exp = row["export"]
    want = row["expected"]
    for k, v in exp["env"]:
        os.environ[k] = v
    os.environ["WORLD_SIZE"] = str(row["devices"])
    os.environ["RANK"] = "0"
    os.environ["LOCAL_RANK"] = "0"
    sys.path.insert(0, src)
    import megatron.training.arguments as A

    A.get_device_arch_version = lambda: 9
    # `--moe-grouped-gemm` asks the GPU for compute capability 8 or above.
    import torch

    torch.cuda.get_device_capability = lambda *_a, **_k: (9, 0)
    words = shell_words(exp["text"])
    sys.argv = ["pretrain_gpt.py"] + words + MEGATRON_LAUNCH + MEGATRON_NO_TE
    args = A.parse_args()
    A.validate_args(args, {})
    from megatron.training.argument_utils import core_transformer_config_from_args

    cfg = core_transformer_config_from_args(args)
    expect_equal("data_parallel_size", args.data_parallel_size, want["dp"])
    expect_equal("tensor_model_parallel_size", args.tensor_model_parallel_size, want["tp"])
    expect_equal("pipeline_model_parallel_size", args.pipeline_model_parallel_size, want["pp"])
    expect_equal("context_parallel_size", args.context_parallel_size, want.get("cp", 1))
    expect_equal("micro_batch_size", args.micro_batch_size, want["micro_batch"])
    expect_equal(
        "micro-batches",
        args.global_batch_size // (args.data_parallel_size * args.micro_batch_size),
        want["num_micro_batches"],
    )
    expect_equal("sequence_parallel", bool(args.sequence_parallel), want["sp"])
    rc = {None: "none"}.get(args.recompute_granularity, args.recompute_granularity)
    expect_equal("recompute_granularity", rc, want["recompute"])
    if rc == "full":
        k = args.recompute_num_layers if args.recompute_method == "block" else None
        expect_equal("recompute block layers", k, want["recompute_layers"])
    if rc == "selective":
        want_modules = want.get("recompute_modules") or ["core_attn"]
        expect_equal("recompute_modules", sorted(cfg.recompute_modules), sorted(want_modules))
    # FP8 compute: Transformer Engine's recipe in the model config (`--fp8-format`).
    expect_equal("fp8 format", cfg.fp8 is not None, bool(want.get("fp8")))
    # Mixture of experts: the router and the expert layers the model builds.
    moe = want.get("moe")
    expect_equal("num_moe_experts", cfg.num_moe_experts, moe and moe["experts"])
    if moe:
        expect_equal("moe_router_topk", cfg.moe_router_topk, moe["topk"])
        expect_equal("moe_ffn_hidden_size", cfg.moe_ffn_hidden_size, moe["expert_ffn"])
        expect_equal("moe_router_score_function", cfg.moe_router_score_function, moe["scoring"])
        expect_equal(
            "moe_shared_expert_intermediate_size",
            cfg.moe_shared_expert_intermediate_size or 0,
            moe.get("shared_ffn", 0),
        )
        expect_equal("expert_model_parallel_size", args.expert_model_parallel_size, want.get("ep", 1))
        expect_equal("expert_tensor_parallel_size", args.expert_tensor_parallel_size, want.get("etp", 1))
        expect_equal("moe_expert_capacity_factor", cfg.moe_expert_capacity_factor, moe.get("capacity_factor"))
        freq = cfg.moe_layer_freq
        pattern = freq if isinstance(freq, list) else [int(i % freq == 0) for i in range(cfg.num_layers)]
        dense = [i for i, e in enumerate(pattern) if not e]
        expect_equal("dense layers (moe_layer_freq)", dense, moe.get("dense_layers", []))
        # DeepSeek routing (branch `mla`): scaling, group-limited choice, expert bias.
        expect_equal("moe_router_topk_scaling_factor", cfg.moe_router_topk_scaling_factor, moe.get("routed_scale"))
        groups = moe.get("group_limit") or {}
        expect_equal("moe_router_num_groups", cfg.moe_router_num_groups, groups.get("groups"))
        expect_equal("moe_router_group_topk", cfg.moe_router_group_topk, groups.get("topk_groups"))
        expect_equal("moe_router_enable_expert_bias", cfg.moe_router_enable_expert_bias, bool(moe.get("expert_bias")))
        expect_equal("moe_router_pre_softmax", cfg.moe_router_pre_softmax, bool(moe.get("pre_softmax")))
    scaling = row.get("rope_scaling") or {}
    # Multi-latent attention (branch `mla`): MLATransformerConfig's ranks and head dims.
    mla = want.get("mla")
    expect_equal("multi_latent_attention", bool(cfg.multi_latent_attention), mla is not None)
    if mla:
        expect_equal("config class", type(cfg).__name__, "MLATransformerConfig")
        expect_equal("q_lora_rank", cfg.q_lora_rank, mla["q_lora_rank"])
        expect_equal("kv_lora_rank", cfg.kv_lora_rank, mla["kv_lora_rank"])
        expect_equal("qk_head_dim", cfg.qk_head_dim, mla["qk_nope_head_dim"])
        expect_equal("qk_pos_emb_head_dim", cfg.qk_pos_emb_head_dim, mla["qk_rope_head_dim"])
        expect_equal("v_head_dim", cfg.v_head_dim, mla["v_head_dim"])
        # The model's rotary scaling (its config.json): YaRN is MLA's own rope type
        # with its factor and mscales; anything else runs plain rotary positions.
        yarn = scaling.get("rope_type") == "yarn"
        expect_equal("rope_type", cfg.rope_type, "yarn" if yarn else "rope")
        if yarn:
            expect_equal("rotary_scaling_factor", cfg.rotary_scaling_factor, scaling["factor"])
            expect_equal("mscale", cfg.mscale, scaling.get("mscale") or 1.0)
            expect_equal("mscale_all_dim", cfg.mscale_all_dim, scaling.get("mscale_all_dim") or 0.0)
    # Llama 3.1's rotary scaling is Megatron-LM's --use-rope-scaling with its factor.
    if scaling.get("rope_type") == "llama3":
        expect_equal("use_rope_scaling", bool(args.use_rope_scaling), True)
        expect_equal("rope_scaling_factor", args.rope_scaling_factor, scaling["factor"])
    zero = 0
    if getattr(args, "use_megatron_fsdp", False):
        zero = {"optim_grads": 2, "optim_grads_params": 3}[args.data_parallel_sharding_strategy]
    elif args.use_distributed_optimizer:
        zero = 1
    expect_equal("ZeRO stage", zero, want["zero"])
    pp = args.pipeline_model_parallel_size
    if pp > 1:
        vp = args.virtual_pipeline_model_parallel_size or 1
        want_chunks = len(want["stages"]) // pp
        expect_equal("virtual stages per rank", vp, want_chunks)
        from megatron.core.transformer.enums import LayerType
        from megatron.core.transformer.transformer_block import get_num_layers_to_build

        got = []
        for chunk in range(vp):
            for rank in range(pp):
                if cfg.pipeline_model_parallel_layout is not None:
                    stage = cfg.pipeline_model_parallel_layout.layout[rank][chunk]
                    got.append(sum(1 for t in stage if t == LayerType.decoder))
                else:
                    got.append(
                        get_num_layers_to_build(cfg, vp_stage=chunk if vp > 1 else None, pp_rank=rank)
                    )
        expect_equal("layers per virtual stage", got, [s["layers"] for s in want["stages"]])
    return "parse_args + validate_args + TransformerConfig (layers per rank and virtual stage)"


# -------------------------------------------------------------------------- DeepSpeed


class Mpu:
    """The model-parallel unit DeepSpeedConfig reads the data-parallel size from."""

    def __init__(self, dp, tp, pp):
        self.dp, self.tp, self.pp = dp, tp, pp

    def get_data_parallel_world_size(self):
        return self.dp

    def get_model_parallel_world_size(self):
        return self.tp

    def get_data_parallel_rank(self):
        return 0

    def get_model_parallel_rank(self):
        return 0


def check_deepspeed(row, _src):
    import torch.nn as nn
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import ZeroStageEnum

    exp = row["export"]
    want = row["expected"]
    cfg = json.loads(exp["text"])
    # DeepSpeedConfig asks deepspeed.comm for the rank first and, without a process
    # group, ignores the mpu: a one-process gloo group on the loopback address.
    # (Its torch backend would JIT-compile a CPU shared-memory all-reduce op, which
    # configuration parsing never calls: it is left out.)
    import datetime
    import socket

    import deepspeed.comm.comm as comm
    import importlib

    # (`import deepspeed.comm.torch as …` would bind the `torch` that deepspeed.comm imports.)
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    import torch.distributed

    comm_torch.build_shm_op = lambda: None

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    comm.cdb = comm_torch.TorchBackend("gloo", datetime.timedelta(minutes=1), None)
    ds = DeepSpeedConfig(cfg, mpu=Mpu(want["dp"], want["tp"], want["pp"]))
    expect_equal("train_micro_batch_size_per_gpu", ds.train_micro_batch_size_per_gpu, want["micro_batch"])
    expect_equal("gradient_accumulation_steps", ds.gradient_accumulation_steps, want["num_micro_batches"])
    expect_equal("zero stage", int(ds.zero_optimization_stage), want["zero"])
    expect_equal("bf16", ds.bfloat16_config.enabled if hasattr(ds, "bfloat16_config") else ds.bfloat16_enabled, True)
    done = "DeepSpeedConfig with mpu"
    if want["pp"] == 1 and want["tp"] > 1:
        expect_equal("tensor_parallel.autotp_size", ds.tensor_parallel_config.autotp_size, want["tp"])
    if want["pp"] > 1:
        from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        # PipelineEngine.__init__'s checks, on its inputs.
        if not ds.zero_optimization_stage < ZeroStageEnum.gradients:
            fail("ZeRO-2 and ZeRO-3 are incompatible with pipeline parallelism")
        topo = PipeModelDataParallelTopology(num_pp=want["pp"], num_mp=want["tp"], num_dp=want["dp"])
        expect_equal("topology world", topo.world_size(), row["devices"])
        data = topo.get_dim("data")
        if ds.train_batch_size != ds.train_micro_batch_size_per_gpu * ds.gradient_accumulation_steps * data:
            fail("train_batch_size != micro batch x micro batches x grid data-parallel size")
        expect_equal(
            "pipeline.activation_checkpoint_interval > 0",
            ds.pipeline["activation_checkpoint_interval"] > 0,
            want["recompute"] == "full",
        )

        class EmbeddingPipe(nn.Module):
            pass

        class ParallelTransformerLayerPipe(nn.Module):
            pass

        class LMHeadPipe(nn.Module):
            pass

        layers = cfg["apar"]["num_layers"]
        specs = [LayerSpec(EmbeddingPipe)] + [LayerSpec(ParallelTransformerLayerPipe)] * layers + [LayerSpec(LMHeadPipe)]
        # A PipelineModule without a process group: the fields _partition_layers reads.
        module = PipelineModule.__new__(PipelineModule)
        nn.Module.__init__(module)
        module._layer_specs = specs
        module._topo = topo
        module.num_stages = want["pp"]
        module.global_rank = 1  # not 0: no partition printout
        module.loss_fn = None
        module._partition_layers(method=ds.pipeline["partition"])
        parts = module.parts
        got = []
        for a, b in zip(parts, parts[1:]):
            got.append(
                {
                    "embedding": a == 0 and b > 0,
                    "layers": sum(1 for i in range(a, b) if 1 <= i <= layers),
                    "head": a <= layers + 1 < b,
                }
            )
        expect_equal("pipeline stages (PipelineModule._partition_layers)", got, want["stages"])
        done += " + PipelineEngine checks + PipelineModule partition"
    return done


# ------------------------------------------------------------------------- torchtitan


def check_torchtitan(row, _src):
    import torchtitan.components.quantization.float8 as float8
    from torchtitan.config.manager import ConfigManager
    from torchtitan.distributed.parallel_dims import ParallelDims

    # No GPU here: answer the float8 converter's hardware check for the Hopper-class
    # GPU an fp8 plan is for (apar refuses fp8 on devices without FP8 tensor cores).
    float8.has_cuda_capability = lambda *_a, **_k: True

    exp = row["export"]
    want = row["expected"]
    words = shell_words(exp["text"])
    cfg = ConfigManager().parse_args(words)
    par = cfg.parallelism
    dims = ParallelDims.from_config(par, row["devices"])
    dp = par.data_parallel_replicate_degree * par.data_parallel_shard_degree
    expect_equal("data-parallel degree", dp, want["dp"])
    expect_equal("tensor_parallel_degree", par.tensor_parallel_degree, want["tp"])
    expect_equal("pipeline_parallel_degree", par.pipeline_parallel_degree, want["pp"])
    expect_equal("context_parallel_degree", par.context_parallel_degree, want.get("cp", 1))
    expect_equal("expert_parallel_degree", par.expert_parallel_degree, want.get("ep", 1))
    if want["tp"] > 1:
        expect_equal("enable_sequence_parallel", par.enable_sequence_parallel, want["sp"])
    t = cfg.training
    if t.global_batch_size % (t.local_batch_size * dp) != 0:
        fail("global batch size must be multiple of local batch size times data-parallel degree")
    accumulation = t.global_batch_size // (t.local_batch_size * dp)
    if par.pipeline_parallel_degree > 1:
        expect_equal("microbatch size", par.pipeline_parallel_microbatch_size, want["micro_batch"])
        expect_equal(
            "pipeline micro-batches x accumulation",
            t.local_batch_size // par.pipeline_parallel_microbatch_size * accumulation,
            want["num_micro_batches"],
        )
    else:
        expect_equal("local_batch_size", t.local_batch_size, want["micro_batch"])
        expect_equal("gradient accumulation", accumulation, want["num_micro_batches"])
    ac = type(cfg.activation_checkpoint).__qualname__ if cfg.activation_checkpoint is not None else None
    want_ac = {"none": None, "full": "FullAC.Config", "selective": "SelectiveAC.Config"}[want["recompute"]]
    expect_equal("activation_checkpoint", ac, want_ac)
    zero = {"never": 2, "always": 3}.get(par.fsdp_reshard_after_forward, 0)
    expect_equal("ZeRO stage (FSDP reshard policy)", zero, want["zero"])
    done = "ConfigManager + Trainer.Config + ParallelDims"
    if want.get("fp8"):
        import torch

        with torch.device("meta"):
            model = cfg.model_spec.model.build()
        fp8 = sum(1 for m in model.modules() if type(m).__name__ == "Float8Linear")
        if fp8 == 0:
            fail("the plan computes in fp8 but the recipe's model has no Float8Linear")
        done += f" + {fp8} Float8Linear modules on the meta-device model"
    if want["pp"] > 1:
        parts = par.module_fqns_per_model_part
        expect_equal("model parts", len(parts), len(want["stages"]))
        got = [
            {
                "embedding": "tok_embeddings" in p,
                "layers": sum(1 for n in p if n.startswith("layers.")),
                "head": "lm_head" in p,
            }
            for p in parts
        ]
        expect_equal("layers per model part", got, want["stages"])
        import torch

        with torch.device("meta"):
            model = cfg.model_spec.model.build()
        names = {n for n, _ in model.named_modules()}
        missing = sorted({n for p in parts for n in p} - names)
        if missing:
            fail(f"module_fqns_per_model_part names modules the model lacks: {missing[:5]}")
        expect_equal("disable_cuda_graphs", t.disable_cuda_graphs, True)
        done += " + module names on the meta-device model"
    return done


# ----------------------------------------------------------------------- Hugging Face


def check_hf(row, _src):
    import transformers.training_args as T
    from transformers import HfArgumentParser, TrainingArguments

    # No GPU here: answer for the Ampere+ GPU the plan is for (bf16 is checked against it).
    T.is_torch_bf16_gpu_available = lambda: True

    exp = row["export"]
    want = row["expected"]
    words = shell_words(exp["text"])
    with tempfile.TemporaryDirectory() as out:
        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            args=words + ["--output_dir", out]
        )
    expect_equal("per_device_train_batch_size", args.per_device_train_batch_size, want["micro_batch"])
    expect_equal("gradient_accumulation_steps", args.gradient_accumulation_steps, want["num_micro_batches"])
    expect_equal("bf16", args.bf16, True)
    fsdp = bool(args.fsdp)
    fsdp_config = args.fsdp_config or {}
    zero = 0
    if fsdp:
        zero = 3 if fsdp_config.get("reshard_after_forward", True) in (True, "true") else 2
    expect_equal("ZeRO stage (FSDP)", zero, want["zero"])
    ac = bool(args.activation_checkpointing) or str(fsdp_config.get("activation_checkpointing", False)).lower() == "true"
    expect_equal("activation checkpointing", ac, want["recompute"] == "full")
    return "HfArgumentParser(TrainingArguments)"


CHECKS = {
    "megatron": check_megatron,
    "deepspeed": check_deepspeed,
    "torchtitan": check_torchtitan,
    "hf": check_hf,
}


def run_one(job):
    row, src = job
    try:
        import io
        import contextlib

        sink = io.StringIO()
        with contextlib.redirect_stdout(sink):
            what = CHECKS[row["engine"]](row, src)
        return ("pass", what)
    except BaseException as e:  # noqa: BLE001 - the engine's SystemExit/AssertionError is the result
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return ("FAIL", tb[:300])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("matrix", help="JSON lines from write_check_matrix")
    ap.add_argument("--megatron-src", required=True, help="Megatron-LM source tree at the pinned commit")
    ap.add_argument("--results", required=True, help="Markdown table to write")
    ap.add_argument("--versions", default="", help="line naming the pinned versions, for the table")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    rows = [json.loads(line) for line in open(a.matrix)]
    todo = [(r, a.megatron_src) for r in rows if r["export"] is not None]
    # One fresh process per export: Megatron keeps global state, env vars differ.
    ctx = mp.get_context("spawn")
    with ctx.Pool(a.jobs, maxtasksperchild=1) as pool:
        results = pool.map(run_one, todo, chunksize=1)
    by_key = {(r["case"], r["engine"]): res for (r, _), res in zip(todo, results)}
    engines = ["megatron", "deepspeed", "torchtitan", "hf"]
    lines = [
        "# Engine checks of apar's exports",
        "",
        "Written by `scripts/check_exports/run.sh` (do not edit by hand).",
        "",
        a.versions,
        "",
        "`pass`: the engine's own parser and set-up checks accepted the export and read back the plan's values;",
        "`refused`: apar refuses the plan for that engine with a typed error (the reason names the missing option);",
        "`FAIL`: the engine rejected the export or read it differently.",
        "",
        "| case | plan | " + " | ".join(engines) + " |",
        "|---|---|" + "---|" * len(engines),
    ]
    cases = []
    for r in rows:
        if r["case"] not in [c[0] for c in cases]:
            cases.append((r["case"], f'{r["model"]}: {r["plan"]}'))
    failures = 0
    counts = {e: [0, 0, 0] for e in engines}
    notes = []
    for case, plan in cases:
        cells = []
        for e in engines:
            row = next(r for r in rows if r["case"] == case and r["engine"] == e)
            if row["export"] is None:
                cells.append("refused")
                counts[e][1] += 1
                notes.append(f"- {case} / {e}: {row['refused']}")
            else:
                status, what = by_key[(case, e)]
                cells.append(status)
                if status == "pass":
                    counts[e][0] += 1
                else:
                    counts[e][2] += 1
                    failures += 1
                    notes.append(f"- **{case} / {e} FAILED**: {what}")
        lines.append(f"| {case} | {plan} | " + " | ".join(cells) + " |")
    lines += ["", "| engine | pass | refused | FAIL |", "|---|---|---|---|"]
    for e in engines:
        p, r, f = counts[e]
        lines.append(f"| {e} | {p} | {r} | {f} |")
    lines += ["", "## What each check ran", ""]
    seen = set()
    for (case, e), (status, what) in by_key.items():
        if status == "pass" and (e, what) not in seen:
            seen.add((e, what))
            lines.append(f"- {e}: {what}")
    lines += ["", "## Refusals and failures", ""] + notes
    with open(a.results, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[10:]))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
