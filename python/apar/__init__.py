"""apar: plans parallel training of deep-learning models, from Python.

The one line::

    import apar, torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("..."))
    plan = apar.auto(model, global_batch=64, seq=1024, cluster="moai-4xlarge", engine="hf")

captures the module with ``torch.export`` on the meta device (:func:`capture`), plans it
with the Rust core (:func:`plan`), prints the search log and returns a :class:`Plan`
whose ``export`` is the engine's configuration.

The pieces: :func:`capture` (module → IR graph), :func:`plan` / :func:`evaluate`
(graph, zoo name or ``config.json`` → :class:`Plan`), :func:`calibrate` (measured runs
→ :class:`Fit`), :meth:`Plan.export_for` (→ :class:`Export`), and the exceptions of
:mod:`apar.errors` (:class:`OutOfMemory` carries the :class:`OomReport`).
"""

from . import _apar
from .api import PINS, ProgressBar, auto, calibrate, clusters, evaluate, models, plan
from .capture import Captured, capture
from .errors import (
    ApError,
    ConfigError,
    ExportError,
    GraphError,
    ModelError,
    OutOfMemory,
    PlanFailed,
    UnsupportedModel,
    UnsupportedOp,
)
from .types import (
    Breakdown,
    Config,
    Evaluation,
    Export,
    Fit,
    Memory,
    OomReport,
    Plan,
    SearchStats,
    Stage,
    StageMemory,
    Suggestion,
)

__version__ = _apar.__version__

#: ``apar eval``'s name for :func:`evaluate`.
eval = evaluate  # noqa: A001

__all__ = [
    "auto", "plan", "evaluate", "calibrate", "capture", "clusters", "models",
    "Captured", "Plan", "Config", "Memory", "StageMemory", "Stage", "Breakdown",
    "SearchStats", "Evaluation", "Export", "OomReport", "Suggestion", "Fit",
    "ProgressBar", "PINS",
    "ApError", "ConfigError", "ModelError", "UnsupportedModel", "GraphError",
    "UnsupportedOp", "OutOfMemory", "PlanFailed", "ExportError",
]
