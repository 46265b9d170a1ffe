"""Planning from Python: :func:`plan`, :func:`evaluate`, :func:`auto`, :func:`calibrate`.

Every function is a thin call into the Rust library (``apar._apar``): the model, the
cluster and the options go in as text or JSON, the library's plan document comes back
and is wrapped in :class:`apar.Plan`. Errors are the classes of :mod:`apar.errors`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence, Union

from . import _apar
from .errors import ConfigError
from .types import Config, Export, Fit, Plan

__all__ = ["plan", "evaluate", "auto", "calibrate", "clusters", "models", "ProgressBar"]

#: Pins and bounds :func:`plan` accepts as keyword arguments (the CLI's options):
#: degrees ``tp``, ``pp``, ``dp``, ``cp``, ``ep``, ``etp``; bounds ``max_tp``,
#: ``max_stages``, ``max_cp``, ``max_ep``, ``max_chunks``; ``micro_batch``, ``sp``, ``recompute`` (``"none"``,
#: ``"selective"``, ``"full"``), ``recompute_layers``, ``recompute_modules``, ``zero``
#: (0–3), ``low_prec_shard``, ``schedule`` (``"gpipe"``, ``"1f1b"``,
#: ``"interleaved:V"``).
PINS = (
    "tp",
    "pp",
    "dp",
    "cp",
    "max_cp",
    "ep",
    "max_ep",
    "etp",
    "max_stages",
    "max_tp",
    "micro_batch",
    "sp",
    "recompute",
    "recompute_layers",
    "recompute_modules",
    "zero",
    "low_prec_shard",
    "schedule",
    "max_chunks",
)


class ProgressBar:
    """A text progress bar on stderr for the candidate search: called with ``(done,
    total)`` candidates; it draws nothing for searches shorter than ``delay_s``
    seconds, nor when the stream is neither a terminal nor a notebook's."""

    def __init__(self, stream=None, width: int = 30, delay_s: float = 0.3):
        self.stream = stream or sys.stderr
        self.width = width
        self.delay_s = delay_s
        self.start = time.perf_counter()
        self.drawn = False
        # A terminal or a notebook; not a log file.
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.interactive = bool(isatty()) or "ipykernel" in sys.modules

    def __call__(self, done: int, total: int) -> None:
        if not self.interactive:
            return
        elapsed = time.perf_counter() - self.start
        if not self.drawn and elapsed < self.delay_s and done < total:
            return
        if not self.drawn and done >= total:
            return
        self.drawn = True
        # Workers report out of order: show the furthest point reached.
        done = self.done = max(done, getattr(self, "done", 0))
        frac = done / total if total else 1.0
        fill = int(frac * self.width)
        bar = "#" * fill + "." * (self.width - fill)
        self.stream.write(f"\r[apar] compiling candidates [{bar}] {done}/{total} {elapsed:.1f} s")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def _model_args(model) -> Dict[str, Any]:
    """``model`` as the Rust call's ``model``, ``graph`` and ``hf_config`` arguments."""
    from .capture import Captured

    if isinstance(model, Captured):
        return {"model": model.name, "graph": model.to_json(), "hf_config": model.hf_config}
    if isinstance(model, dict) and "ops" in model:
        return {"model": model.get("name", "graph"), "graph": json.dumps(model), "hf_config": None}
    if isinstance(model, str):
        return {"model": model, "graph": None, "hf_config": None}
    try:
        import torch

        if isinstance(model, torch.nn.Module):
            from .capture import capture

            return _model_args(capture(model))
    except ImportError:
        pass
    raise ConfigError(
        f"model must be a zoo name, a file path, a GraphDoc dict, a Captured graph or a "
        f"torch.nn.Module, not {type(model).__name__}",
        "model_type",
    )


def _overrides(layers: Optional[int], attention: Optional[str]) -> Optional[str]:
    if layers is None and attention is None:
        return None
    return json.dumps({"layers": layers, "attention": attention})


def _options(
    engine: Optional[str],
    memory_ratio: Optional[float],
    calibration: Optional[Union[str, Dict[str, Any]]],
    runners_up: Optional[int],
    options: Optional[Dict[str, Any]],
    pins: Dict[str, Any],
) -> str:
    unknown = sorted(k for k in pins if k not in PINS)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} (pins and bounds: {', '.join(PINS)})",
            "options",
        )
    o: Dict[str, Any] = dict(options or {})
    if engine is not None:
        o["engine"] = engine
    if memory_ratio is not None:
        o["memory_ratio"] = memory_ratio
    if calibration is not None:
        if isinstance(calibration, str):
            with open(calibration) as f:
                calibration = json.load(f)
        o["calibration"] = calibration
    search = dict(o.get("search", {}))
    if runners_up is not None:
        search["runners_up"] = runners_up
    cons = dict(search.get("constraints", {}))
    cons.update({k: v for k, v in pins.items() if v is not None})
    if cons:
        search["constraints"] = cons
    if search:
        o["search"] = search
    return json.dumps(o)


def plan(
    model,
    cluster: str,
    *,
    global_batch: int,
    seq: int,
    engine: Optional[str] = None,
    memory_ratio: Optional[float] = None,
    calibration: Optional[Union[str, Dict[str, Any]]] = None,
    runners_up: Optional[int] = None,
    options: Optional[Dict[str, Any]] = None,
    progress: Union[bool, Callable[[int, int], None], None] = None,
    layers: Optional[int] = None,
    attention: Optional[str] = None,
    **pins: Any,
) -> Plan:
    """Plans ``model`` on ``cluster``: the fastest configuration that fits.

    Args:
        model: a zoo name (:func:`models`), a Hugging Face ``config.json`` path, an IR
            file (``.apir``/``.json``), a GraphDoc dict, a :class:`apar.Captured` graph,
            or a ``torch.nn.Module`` (captured with :func:`apar.capture` first).
        cluster: a preset with a node count (``"dgx-h100:2"``, ``"moai-4xlarge"``; see
            :func:`clusters`) or a cluster JSON file.
        global_batch: sequences per step.
        seq: sequence length, tokens.
        engine: ``"megatron"`` (default), ``"deepspeed"``, ``"torchtitan"`` or ``"hf"``.
        memory_ratio: fraction of device memory a plan may use (default 0.8).
        calibration: a calibration JSON file or document (:func:`calibrate`).
        runners_up: how many next-fastest configurations to keep (default 3).
        options: further ``PlanOptions`` fields as the library's JSON (``precision``,
            ``runtime``, ``search``), merged over the defaults.
        progress: ``True`` for a progress bar on stderr (drawn for searches longer
            than 0.3 s), a callable ``(done, total)``, or ``False``/``None`` for none.
        layers: override the layer count of a zoo or ``config.json`` model.
        attention: override its attention form: ``"flash"`` (SDPA / fused kernels) or
            ``"eager"`` (Hugging Face's ``attn_implementation="eager"``).
        **pins: pins and bounds (:data:`PINS`), e.g. ``tp=2, max_stages=4``.

    Returns:
        the :class:`apar.Plan`, with its AP-style search log in ``.log``.

    Raises:
        OutOfMemory: nothing fits (``.report`` is the :class:`apar.OomReport`).
        ConfigError: a bad cluster, job, pin, engine or option; pins that empty the
            candidate space (``kind == "empty_space"``).
        ModelError, UnsupportedModel: the model cannot be loaded.
        GraphError: the graph does not verify.
        PlanFailed: no candidate compiled.
    """
    m = _model_args(model)
    opts = _options(engine, memory_ratio, calibration, runners_up, options, pins)
    cb = ProgressBar() if progress is True else (progress or None)
    text = _apar.plan(
        m["model"],
        cluster,
        _count("seq", seq),
        _count("global_batch", global_batch),
        opts,
        m["graph"],
        m["hf_config"],
        cb,
        _overrides(layers, attention),
    )
    p = Plan.from_json(json.loads(text))
    p.log = _apar.plan_log(text)
    return p


def _count(name: str, value: Any) -> int:
    """A positive whole number that fits apar's unsigned 64-bit counts, or a
    :class:`ConfigError` naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{name} must be a whole number, not {value!r}", name)
    if not 0 < value < 2**64:
        raise ConfigError(f"{name} must be between 1 and 2^64 - 1, not {value}", name)
    return value


#: The fields of a configuration dict (:class:`apar.Config`'s).
CONFIG_FIELDS = (
    "dp", "tp", "pp", "cp", "ep", "etp", "micro_batch", "num_micro_batches", "sp",
    "recompute", "recompute_layers", "recompute_modules", "zero", "low_prec_shard",
    "schedule",
)


def evaluate(
    model,
    cluster: str,
    config: Union[Config, Dict[str, Any]],
    *,
    global_batch: int,
    seq: int,
    engine: Optional[str] = None,
    memory_ratio: Optional[float] = None,
    calibration: Optional[Union[str, Dict[str, Any]]] = None,
    options: Optional[Dict[str, Any]] = None,
    layers: Optional[int] = None,
    attention: Optional[str] = None,
) -> Plan:
    """Evaluates one configuration of ``model`` (``apar eval``): its step time and
    memory, whether or not it fits (compare ``plan.memory.peak_bytes`` with
    ``budget_bytes``).

    Args:
        config: a :class:`apar.Config`, or a dict with at least ``dp``, ``tp``, ``pp``,
            ``micro_batch`` (the library's ``Config`` fields; ``num_micro_batches`` is
            derived from the global batch when 0).
        Others: as :func:`plan`.

    Raises:
        ConfigError: the configuration does not match the cluster or the batch.
        ConfigError: also for a field a configuration does not have.
        OutOfMemory: the configuration does not fit (its report has the changes that
            fit).
        Others: as :func:`plan`.
    """
    m = _model_args(model)
    opts = _options(engine, memory_ratio, calibration, None, options, {})
    if isinstance(config, Config):
        cfg = config.to_json()
    else:
        cfg = {
            "cp": 1,
            "num_micro_batches": 0,
            "sp": False,
            "recompute": "none",
            "recompute_layers": None,
            "zero": 0,
            "low_prec_shard": False,
            "schedule": "1f1b",
        }
        if not isinstance(config, dict):
            raise ConfigError(
                f"config must be an apar.Config or a dict of its fields, not {type(config).__name__}",
                "config",
            )
        unknown = sorted(k for k in config if k not in CONFIG_FIELDS)
        if unknown:
            raise ConfigError(
                f"unknown configuration field(s) {', '.join(unknown)} (fields: {', '.join(CONFIG_FIELDS)})",
                "config",
            )
        cfg.update(config)
    text = _apar.evaluate(
        m["model"],
        cluster,
        _count("seq", seq),
        _count("global_batch", global_batch),
        json.dumps(cfg),
        opts,
        m["graph"],
        m["hf_config"],
        _overrides(layers, attention),
    )
    p = Plan.from_json(json.loads(text))
    p.log = p.text()
    return p


def auto(
    model,
    *,
    global_batch: int,
    seq: int,
    cluster: str,
    engine: str = "megatron",
    example_inputs: Any = None,
    verbose: bool = True,
    progress: bool = True,
    **kwargs: Any,
) -> Plan:
    """The one line: captures ``model`` (a ``torch.nn.Module``, built on the meta
    device), plans it, prints the AP-style log and returns the plan with its engine
    export in ``plan.export``.

    Args:
        model: a ``torch.nn.Module`` (or anything :func:`plan` takes).
        global_batch: sequences per step.
        seq: sequence length, tokens.
        cluster: a cluster preset with a node count or a cluster JSON file.
        engine: ``"megatron"``, ``"deepspeed"``, ``"torchtitan"`` or ``"hf"``.
        example_inputs: inputs for :func:`apar.capture` (default: token ids).
        verbose: print the capture summary and the search log (stdout).
        progress: a progress bar on stderr for searches longer than 0.3 s.
        **kwargs: pins, bounds and options of :func:`plan`.

    Returns:
        the :class:`apar.Plan`; ``plan.export`` is the engine's
        :class:`apar.Export`, or ``None`` with the reason in ``plan.export_error``
        when the engine cannot run the plan.

    Raises:
        As :func:`apar.capture` and :func:`plan`.
    """
    from .capture import Captured, capture

    target = model
    try:
        import torch

        if isinstance(model, torch.nn.Module):
            # Masks are evaluated at the planned length, up to 8192 tokens (64 MiB).
            target = capture(model, example_inputs, mask_seq=min(max(int(seq), 16), 8192))
    except ImportError:
        pass
    if verbose and isinstance(target, Captured):
        print(
            f"[info] Captured {target.name} with torch.export in {target.capture_s:.1f} s: "
            f"{len(target.graph['ops'])} IR ops, {target.layers} layers, {target.params:,} parameters"
        )
        for n in sorted(set(target.notes)):
            print(f"[info]   {n}")
        if target.unused_params:
            print(f"[warn] {len(target.unused_params)} parameter(s) unused by the loss: {target.unused_params[:5]}")
    p = plan(
        target,
        cluster,
        global_batch=global_batch,
        seq=seq,
        engine=engine,
        progress=progress,
        **kwargs,
    )
    from .errors import ExportError

    try:
        p.export = p.export_for(engine)
    except ExportError as e:
        p.export = None
        p.export_error = e
    if verbose:
        print(p.log.rstrip())
        if p.export is not None:
            print(f"[info] {p.export.engine} configuration:")
            print(p.export.text.rstrip())
        else:
            print(f"[warn] no {engine} export: {p.export_error}")
    return p


def calibrate(
    runs: Union[str, Sequence[str]],
    fit: str,
    calibration: Optional[str] = None,
) -> Fit:
    """Fits cost parameters to measured runs (``apar calibrate``).

    Args:
        runs: run files (CSV or JSON, as ``apar calibrate --runs``), one or several.
        fit: the free parameters, comma-separated (``"matmul_eff,collective_eff"``).
        calibration: a calibration JSON file to start from (default: the device's
            built-in table).

    Returns:
        the :class:`apar.Fit`; ``fit.calibration`` can be passed to :func:`plan`.

    Raises:
        ConfigError: unreadable runs, unknown parameters, too few runs.
    """
    files = [runs] if isinstance(runs, str) else list(runs)
    return Fit.from_json(json.loads(_apar.calibrate_runs(files, fit, calibration)))


def clusters() -> Dict[str, str]:
    """Cluster presets: spec → description."""
    return dict(_apar.clusters())


def models() -> Dict[str, str]:
    """Built-in models: name → description (with sources)."""
    return dict(_apar.models())


_ = Export
