"""Typed views of apar's JSON documents: plans, configurations, memory, OOM reports,
engine exports and calibration fits.

Each class is a dataclass built from the Rust library's serde form (``from_json``);
field names are the JSON's (README, "JSON"). Units are in the names: ``*_s`` seconds,
``*_bytes`` bytes per device, ``tokens_per_s`` tokens per second over the cluster,
``tflops_per_device`` model TFLOP/s per device. Nothing is computed here: the values
are the library's.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional

__all__ = [
    "Config",
    "StageMemory",
    "Memory",
    "Stage",
    "Breakdown",
    "SearchStats",
    "Evaluation",
    "Plan",
    "Suggestion",
    "OomReport",
    "Export",
    "Fit",
]


def _pick(cls, d: Dict[str, Any]) -> Dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclasses.dataclass(frozen=True)
class Config:
    """A parallel configuration.

    Attributes:
        dp, tp, pp: data-, tensor- and pipeline-parallel degrees.
        cp: context-parallel degree (sequence split across devices).
        micro_batch: sequences per micro-batch (``b``).
        num_micro_batches: micro-batches per step per data-parallel rank (``m``).
        sp: sequence parallelism (with ``tp > 1``).
        recompute: ``"none"``, ``"selective"`` or ``"full"``.
        recompute_layers: recompute only the first K layers of each stage.
        recompute_modules: Megatron-LM's selective module set, when not the default.
        zero: ZeRO stage 0–3.
        low_prec_shard: low-precision parameters sharded too.
        schedule: ``"gpipe"``, ``"1f1b"`` or ``"interleaved:V"``.
        ep, etp: expert-parallel and expert-tensor-parallel degrees (MoE models).
    """

    dp: int
    tp: int
    pp: int
    micro_batch: int
    num_micro_batches: int
    sp: bool
    recompute: str
    zero: int
    low_prec_shard: bool
    schedule: str
    cp: int = 1
    recompute_layers: Optional[int] = None
    recompute_modules: Optional[List[str]] = None
    ep: int = 1
    etp: int = 1
    raw: Dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Config":
        c = cls(**_pick(cls, d))
        object.__setattr__(c, "raw", dict(d))
        return c

    def to_json(self) -> Dict[str, Any]:
        """The library's form (what :func:`apar.evaluate` takes)."""
        if self.raw:
            # A plan's JSON leaves `etp` out when it is 1 with `ep` 1, where
            # `evaluate` would read a missing `etp` as the engine's default (`tp` for a
            # mixture of experts): say it.
            d = dict(self.raw)
            d.setdefault("etp", self.etp)
            return d
        d = dataclasses.asdict(self)
        d.pop("raw")
        return d

    def __str__(self) -> str:
        parts = [f"dp {self.dp}", f"tp {self.tp}", f"pp {self.pp}"]
        if self.cp != 1:
            parts.append(f"cp {self.cp}")
        if self.ep != 1:
            parts.append(f"ep {self.ep}")
        if self.etp != 1:
            parts.append(f"etp {self.etp}")
        parts += [f"b {self.micro_batch}", f"m {self.num_micro_batches}"]
        if self.sp:
            parts.append("sp")
        recompute = f"recompute {self.recompute}"
        if self.recompute_modules:
            recompute += f" [{','.join(self.recompute_modules)}]"
        if self.recompute_layers is not None:
            recompute += f" ({self.recompute_layers} layers/stage)"
        parts += [recompute, f"zero {self.zero}", self.schedule]
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Peak memory of one pipeline device and what it holds at that peak (bytes)."""

    stage: int
    peak_bytes: int
    params: int
    grads: int
    optimizer: int
    activations: int
    temporary: int
    buffers: int = 0
    runtime: int = 0


@dataclasses.dataclass(frozen=True)
class Memory:
    """Budget and peaks, bytes per device.

    Attributes:
        budget_bytes: device memory × the memory ratio.
        peak_bytes: the largest peak over pipeline devices.
        per_stage: each pipeline device's peak and breakdown.
    """

    budget_bytes: int
    peak_bytes: int
    per_stage: List[StageMemory]

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Memory":
        return cls(
            budget_bytes=d["budget_bytes"],
            peak_bytes=d["peak_bytes"],
            per_stage=[StageMemory(**_pick(StageMemory, s)) for s in d.get("per_stage", [])],
        )

    def __repr__(self) -> str:
        return f"Memory(peak {_gib(self.peak_bytes)} of {_gib(self.budget_bytes)}, {len(self.per_stage)} stage(s))"


@dataclasses.dataclass(frozen=True)
class Stage:
    """A virtual pipeline stage: its blocks (0 = embedding, inclusive range), the
    device stage running it, and its time per micro-batch (seconds)."""

    stage: int
    device_stage: int
    blocks: List[int]
    time_s: float


@dataclasses.dataclass(frozen=True)
class Breakdown:
    """Where the slowest device's step time goes (seconds)."""

    compute_s: float
    tp_comm_s: float
    dp_comm_s: float
    pp_comm_s: float
    bubble_s: float
    recompute_s: float
    optimizer_s: float


@dataclasses.dataclass(frozen=True)
class SearchStats:
    """The search: candidates enumerated, feasible ones, pruned ones, wall-clock
    milliseconds to compile and to cost them."""

    candidates: int
    feasible: int
    pruned: int = 0
    compile_ms: float = 0.0
    cost_ms: float = 0.0


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A configuration with its step time and memory (a runner-up)."""

    config: Config
    step_time_s: float
    tokens_per_s: float
    tflops_per_device: float
    mfu: float
    memory: Memory

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Evaluation":
        return cls(
            config=Config.from_json(d["config"]),
            step_time_s=d["step_time_s"],
            tokens_per_s=d["tokens_per_s"],
            tflops_per_device=d["tflops_per_device"],
            mfu=d["mfu"],
            memory=Memory.from_json(d["memory"]),
        )

    def __repr__(self) -> str:
        return f"Evaluation({self.config}: {self.step_time_s:.4f} s/step, peak {_gib(self.memory.peak_bytes)})"


@dataclasses.dataclass
class Export:
    """An engine's configuration for a plan.

    Attributes:
        engine: ``"megatron"``, ``"deepspeed"``, ``"torchtitan"`` or ``"hf"``.
        text: the arguments (shell words) or the file (DeepSpeed's JSON).
        env: environment variables the engine needs, as ``(name, value)``.
        env_prefix: the environment as a shell prefix.
        notes: what the user must know to launch it.
    """

    engine: str
    text: str
    env: List[List[str]]
    env_prefix: str
    notes: List[str]

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Export":
        return cls(**_pick(cls, d))

    def __repr__(self) -> str:
        first = self.text.strip().splitlines()[0] if self.text.strip() else ""
        return f"Export({self.engine}: {len(self.text.splitlines())} lines, {first!r}...)"

    def __str__(self) -> str:
        return self.text


@dataclasses.dataclass
class Plan:
    """A plan: the chosen configuration, its time and memory, and the raw document.

    Attributes:
        config: the configuration.
        step_time_s: seconds per training step.
        tokens_per_s: tokens per second over the cluster.
        tflops_per_device: model TFLOP/s per device (PaLM's model FLOPs).
        mfu, hfu: model and hardware FLOPs utilization (fractions of bf16 peak).
        memory: budget, peak and per-stage breakdown (bytes per device).
        stages: virtual pipeline stages in model order.
        breakdown: where the step time goes.
        search: the search that chose it (``None`` for an evaluation).
        runners_up: the next fastest fitting configurations.
        warnings: what apar assumed (library documents).
        engine: the engine the plan is for.
        cluster: the cluster's name.
        seq: sequence length (tokens); global_batch: sequences per step.
        export: the engine export, when one was asked for (:func:`apar.auto`).
        log: the AP-style search log.
        export_error: why :func:`apar.auto` has no export (an
            :class:`apar.ExportError`), else ``None``.
        raw: the whole JSON document (mesh, tensors, programs, trace...).
    """

    config: Config
    step_time_s: float
    tokens_per_s: float
    tflops_per_device: float
    mfu: float
    hfu: float
    memory: Memory
    stages: List[Stage]
    breakdown: Breakdown
    search: Optional[SearchStats]
    runners_up: List[Evaluation]
    warnings: List[Any]
    engine: str
    cluster: str
    seq: int
    global_batch: int
    raw: Dict[str, Any] = dataclasses.field(repr=False)
    export: Optional[Export] = None
    log: str = dataclasses.field(default="", repr=False)
    export_error: Optional[Exception] = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Plan":
        s = d.get("search")
        return cls(
            config=Config.from_json(d["config"]),
            step_time_s=d["step_time_s"],
            tokens_per_s=d["tokens_per_s"],
            tflops_per_device=d["tflops_per_device"],
            mfu=d["mfu"],
            hfu=d.get("hfu", 0.0),
            memory=Memory.from_json(d["memory"]),
            stages=[Stage(**_pick(Stage, x)) for x in d["stages"]],
            breakdown=Breakdown(**_pick(Breakdown, d["breakdown"])),
            search=SearchStats(**_pick(SearchStats, s)) if s else None,
            runners_up=[Evaluation.from_json(r) for r in d.get("runners_up", [])],
            warnings=list(d.get("warnings", [])),
            engine=d.get("engine", "megatron"),
            cluster=d["cluster"]["name"],
            seq=d["seq"],
            global_batch=d["global_batch"],
            raw=d,
        )

    def to_json(self) -> str:
        """The plan document (``apar plan --json``), loadable by ``apar eval --plan``."""
        return json.dumps(self.raw)

    def save(self, path: str) -> None:
        """Writes :meth:`to_json` to ``path``."""
        with open(path, "w") as f:
            f.write(self.to_json())

    def text(self) -> str:
        """The human-readable evaluation (configuration, step time, memory by stage)."""
        from . import _apar

        return _apar.plan_text(self.to_json())

    def export_for(self, engine: Optional[str] = None) -> Export:
        """The configuration of ``engine`` (default: the plan's) for this plan.

        Raises:
            ExportError: the engine cannot run the plan as decided, or needs model
                dimensions that a plan of a captured graph without a readable Hugging
                Face configuration lacks (Megatron-LM).
        """
        from . import _apar

        return Export.from_json(json.loads(_apar.export(self.to_json(), engine)))

    def chrome_trace(self) -> Dict[str, Any]:
        """The simulated step as a Chrome/Perfetto trace (open in ui.perfetto.dev)."""
        from . import _apar

        return json.loads(_apar.plan_trace(self.to_json())[0])

    def memory_svg(self) -> str:
        """An SVG plot of each pipeline device's memory over the step."""
        from . import _apar

        return _apar.plan_trace(self.to_json())[1]

    def __repr__(self) -> str:
        return (
            f"Plan({self.config} on {self.cluster} [{self.engine}]: "
            f"{self.step_time_s:.4f} s/step, {self.tokens_per_s:,.0f} tokens/s, "
            f"MFU {self.mfu:.1%}, peak {_gib(self.memory.peak_bytes)} of {_gib(self.memory.budget_bytes)})"
        )


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """A change that fits, checked by compiling it.

    Attributes:
        change: what to change, in words (``"drop --dp"``, ``"48 devices ..."``).
        config: the configuration that fits with it.
        peak_bytes: its peak memory per device.
        step_time_s: its step time.
        raw: the library's document (``devices``, ``global_batch`` where given).
    """

    change: str
    config: Optional[Config]
    peak_bytes: Optional[int]
    step_time_s: Optional[float]
    raw: Dict[str, Any] = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Suggestion":
        c = d.get("config")
        return cls(
            change=str(d.get("change", "")),
            config=Config.from_json(c) if isinstance(c, dict) else None,
            peak_bytes=d.get("peak_bytes"),
            step_time_s=d.get("step_time_s"),
            raw=d,
        )

    def __repr__(self) -> str:
        extra = f", peak {_gib(self.peak_bytes)}" if self.peak_bytes is not None else ""
        step = f", {self.step_time_s:.3f} s/step" if self.step_time_s is not None else ""
        return f"Suggestion({self.change}{extra}{step})"


@dataclasses.dataclass
class OomReport:
    """Nothing fits: the closest candidate's memory and changes that would fit.

    Attributes:
        requested_bytes: peak bytes of the worst device.
        available_bytes: budget per device.
        stage: the worst pipeline stage.
        dominant: what dominates its memory (``"activations"``, ``"optimizer"``...).
        breakdown: its memory by role (bytes).
        config: the closest candidate's configuration.
        engine: the engine whose rules were applied.
        suggestions: changes that fit.
        text: the report as ``apar plan`` prints it.
    """

    requested_bytes: int
    available_bytes: int
    stage: int
    dominant: str
    breakdown: Dict[str, Any]
    config: Config
    engine: str
    suggestions: List[Suggestion]
    text: str = dataclasses.field(default="", repr=False)

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "OomReport":
        sug = [Suggestion.from_json(x) for x in d.get("suggestions", []) if isinstance(x, dict)]
        return cls(
            requested_bytes=d["requested_bytes"],
            available_bytes=d["available_bytes"],
            stage=d.get("stage", 0),
            dominant=d.get("dominant", ""),
            breakdown=d.get("breakdown", {}),
            config=Config.from_json(d["config"]),
            engine=d.get("engine", ""),
            suggestions=sug,
            text=d.get("text", ""),
        )

    def __repr__(self) -> str:
        return (
            f"OomReport({self.config}: {_gib(self.requested_bytes)} requested, "
            f"{_gib(self.available_bytes)} available; {len(self.suggestions)} suggestion(s))"
        )


@dataclasses.dataclass
class Fit:
    """A calibration fit.

    Attributes:
        calibration: the fitted calibration document (pass as
            ``apar.plan(..., calibration=fit.calibration)``).
        params: ``(name, start, fitted)`` per free parameter.
        rms_log_error: root mean square of the log errors of the step times.
        iterations: Nelder-Mead iterations.
        residuals: per run, measured and predicted step time (seconds).
        warnings: runs apar does not believe.
    """

    calibration: Dict[str, Any]
    params: List[List[Any]]
    rms_log_error: float
    iterations: int
    residuals: List[Dict[str, Any]]
    warnings: List[str]

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Fit":
        return cls(**_pick(cls, d))

    def __repr__(self) -> str:
        ps = ", ".join(f"{p[0]} {p[1]:.3g}→{p[2]:.3g}" for p in self.params)
        return f"Fit({ps}; rms log error {self.rms_log_error:.3g}, {len(self.residuals)} run(s))"
