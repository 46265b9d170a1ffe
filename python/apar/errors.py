"""The exceptions apar raises, carrying apar's typed reasons.

Every exception is an :class:`ApError` with ``message`` (the library's text), ``kind``
(the library's error variant, e.g. ``"empty_space"``, ``"verify"``, ``"cluster"``) and
``detail`` (a parsed JSON document or ``None``). The Rust core raises them by class name
(``apar._apar`` imports this module), so the classes below are the whole list.
"""

from __future__ import annotations

import json
from typing import Any, List, Optional, Sequence, Tuple

from .types import OomReport

__all__ = [
    "ApError",
    "ConfigError",
    "ModelError",
    "UnsupportedModel",
    "GraphError",
    "UnsupportedOp",
    "OutOfMemory",
    "PlanFailed",
    "ExportError",
]


class ApError(Exception):
    """Base class of apar's errors.

    Attributes:
        message: what went wrong, in apar's words.
        kind: the library's error variant (snake case).
        detail: a JSON document with the typed payload, or ``None``.
    """

    def __init__(self, message: str, kind: str = "error", detail: Any = None):
        super().__init__(message)
        self.message = message
        self.kind = kind
        if isinstance(detail, str):
            try:
                detail = json.loads(detail)
            except ValueError:
                pass
        self.detail = detail

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind}: {self.message})"


class ConfigError(ApError):
    """Bad input that is not the model: the cluster, the job (sequence, batch, memory
    ratio), pins that leave no configuration (``kind == "empty_space"``), an unknown
    engine, a calibration, a malformed options or plan document, or a failed
    ``torch.export``."""


class ModelError(ApError):
    """The model could not be loaded (unknown zoo name, malformed ``config.json``)."""


class UnsupportedModel(ModelError):
    """A ``config.json`` of an architecture apar's loader does not read (capture the
    module with :func:`apar.capture` instead)."""


class GraphError(ApError):
    """An IR graph that does not parse or verify (the verifier's errors name op ids)."""


class UnsupportedOp(ApError):
    """Captured ops with no IR form.

    Attributes:
        ops: ``(aten_op, module_path, why)`` per distinct op and module path, in graph
            order (``("aten.topk.default", "model.layers.0.mlp.gate", "no IR form")``).
    """

    def __init__(self, message: str, kind: str = "unsupported_op", detail: Any = None):
        super().__init__(message, kind, detail)
        self.ops: List[Tuple[str, str, str]] = [tuple(o) for o in (detail or [])]

    @classmethod
    def of(cls, ops: Sequence[Tuple[str, str, str]]) -> "UnsupportedOp":
        seen = []
        for o in ops:
            if o not in seen:
                seen.append(o)
        lines = [f"  {op} at {path or '<root>'}: {why}" for op, path, why in seen[:40]]
        more = f"\n  ... and {len(seen) - 40} more" if len(seen) > 40 else ""
        names = sorted({op for op, _, _ in seen})
        msg = (
            f"{len(seen)} captured op(s) have no apar IR form ({', '.join(names)}):\n"
            + "\n".join(lines)
            + more
        )
        return cls(msg, "unsupported_op", [list(o) for o in seen])


class OutOfMemory(ApError):
    """Nothing fits device memory.

    Attributes:
        report: the :class:`apar.OomReport` of the closest candidate, with suggestions
            (each checked to fit).
    """

    def __init__(self, message: str, kind: str = "out_of_memory", detail: Any = None):
        super().__init__(message, kind, detail)
        self.report: Optional[OomReport] = (
            OomReport.from_json(self.detail) if isinstance(self.detail, dict) else None
        )

    def __str__(self) -> str:
        if self.report is not None and self.report.text:
            return self.report.text
        return self.message


class PlanFailed(ApError):
    """No candidate could be compiled (the most common reason is in the message)."""


class ExportError(ApError):
    """The engine cannot run the plan as decided, or needs model dimensions the plan
    lacks."""
