"""Capture a ``torch.nn.Module`` as an apar IR graph (a GraphDoc JSON document).

:func:`capture` runs :func:`torch.export.export` on the meta device (no weights, no
GPU, no data) with dynamic batch and sequence dimensions, walks the ATen graph and
writes each ATen op as IR ops (the op list is ``ir-spec/README.md``):

* **Symbolic dimensions.** Every example input's dimension 0 is the micro-batch size
  and dimension 1 (when the input has one) the sequence length; they are exported as
  ``torch.export.Dim`` objects and every shape in the graph is a monomial
  ``c·b^i·s^j/d`` of them, written as apar's symbolic dims (``"b"``, ``"s"``,
  ``"b*s"``, ``"4*s"``...). A shape that is not a monomial (``s + 1``) is an
  :class:`~apar.errors.UnsupportedOp` naming the op.
* **Blocks.** The module path that ``torch.export`` records for each node
  (``node.meta["nn_module_stack"]``) decides its block: the ``ModuleList`` with the most
  numbered children holds the layers (``model.layers.3.mlp`` → ``{"layer": 3}``), ops
  before the first layer are the ``embed`` block, ops after the last the ``head``
  block. Repeated layers have the same structure, so apar compiles one template for
  all of them.
* **Constants.** Subgraphs that depend on neither a parameter nor the data of a user
  input (rotary ``cos``/``sin`` tables, causal masks, ``arange`` positions, buffers)
  are folded: each use becomes an IR ``constant`` of the folded tensor's type in the
  using block. A boolean mask that SDPA reads is evaluated on the CPU at the
  ``mask_seq`` length: a causal mask becomes ``sdpa {causal=true}`` (a sliding window
  ``window=w``) without a mask tensor, as PyTorch's kernel runs it; any other mask is
  passed as an additive mask constant.
* **Parameters** keep their PyTorch names (``model.layers.0.mlp.up_proj.weight``). A
  ``Linear`` weight only read by ``linear`` is declared ``[in, out]`` (the layout apar's
  own loaders use, the same elements); one also read elsewhere (a tied embedding) keeps
  ``[out, in]`` and the product transposes it.
* **Loss.** A module that returns a scalar loss (a Hugging Face model given
  ``labels``) is captured up to that loss. A module that returns logits gets apar's
  ``cross_entropy`` against an integer ``labels`` input appended in the ``head``
  block. Hugging Face's label shift (``pad`` + ``slice`` of the integer labels) keeps the
  labels' shape and is captured as the labels themselves.
* **Mixture of experts.** A Hugging Face sparse MoE block (the module holding a router
  that calls ``topk``, with experts whose weights are ``gate_up_proj[E, 2f, h]`` and
  ``down_proj[E, h, f]``, as Mixtral's) is lowered as a whole: router ``matmul``,
  ``moe_route {topk}``, ``moe_dispatch``, ``grouped_matmul`` (gate and up, split by two
  slices), ``silu``·``mul``, ``grouped_matmul`` (down), ``moe_combine``
  (dropless), the ops apar's own loader emits. Blocks with other parameters (shared
  experts, biases) are :class:`~apar.errors.UnsupportedOp`.
* **Unsupported ops** (data-dependent ops outside a recognized MoE block such as
  ``sort``/``nonzero``, ops the IR has no form for) raise
  :class:`~apar.errors.UnsupportedOp`, which lists every such op by ATen name with the
  module path where it occurs; nothing is dropped silently.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import ConfigError, UnsupportedOp

__all__ = ["Captured", "capture"]


@dataclasses.dataclass
class Captured:
    """A captured module: the IR graph and what was learned while capturing it.

    Attributes:
        name: the graph's name (the module's class name unless given).
        graph: the GraphDoc document (``{"name", "ops": [...]}``), as
            :func:`apar.plan` takes it; ``json.dumps(graph)`` is a file ``apar plan
            --model`` reads.
        params: parameter elements in the graph (every parameter the loss reads,
            counted once, tied weights once).
        module_params: ``sum(p.numel() for p in module.parameters())`` of the module.
        unused_params: names of module parameters the loss does not read.
        layers: the number of layer blocks.
        layer_container: the module path of the layer list (``model.layers``).
        hf_config: the module's Hugging Face configuration as ``config.json`` text, when
            it has one (for engine exports that build the model from its dimensions).
        notes: what the capture folded or assumed, one line each.
        export_s: seconds ``torch.export.export`` took.
        capture_s: seconds the whole capture took.
    """

    name: str
    graph: Dict[str, Any]
    params: int
    module_params: int
    unused_params: List[str]
    layers: int
    layer_container: Optional[str]
    hf_config: Optional[str]
    notes: List[str]
    export_s: float
    capture_s: float

    def to_json(self) -> str:
        """The GraphDoc as JSON text."""
        return json.dumps(self.graph)

    def save(self, path: str) -> None:
        """Writes the GraphDoc to ``path`` (readable by ``apar plan --model path``)."""
        with open(path, "w") as f:
            f.write(self.to_json())

    def __repr__(self) -> str:
        ops = len(self.graph["ops"])
        return (
            f"Captured({self.name!r}: {ops} IR ops, {self.layers} layers, "
            f"{self.params:,} parameters, export {self.export_s:.2f} s)"
        )


# ---------------------------------------------------------------------------------
# Symbolic dims

_DTYPES = None


def _dtype_name(dt) -> str:
    global _DTYPES
    import torch

    if _DTYPES is None:
        _DTYPES = {
            torch.float32: "f32",
            torch.bfloat16: "bf16",
            torch.float16: "f16",
            torch.int64: "i64",
            torch.int32: "i32",
            torch.uint8: "u8",
            torch.bool: "u8",
        }
        for name, ir in (("float8_e4m3fn", "f8e4m3"), ("float8_e5m2", "f8e5m2")):
            if hasattr(torch, name):
                _DTYPES[getattr(torch, name)] = ir
    if dt not in _DTYPES:
        raise KeyError(str(dt))
    return _DTYPES[dt]


class _Dims:
    """Maps the export's size symbols to apar's ``b`` and ``s``."""

    def __init__(self, symbols: Dict[Any, str], hints: Dict[str, int]):
        import sympy

        self.sympy = sympy
        self.B = sympy.Symbol("b", positive=True, integer=True)
        self.S = sympy.Symbol("s", positive=True, integer=True)
        self.subs = {sym: (self.B if v == "b" else self.S) for sym, v in symbols.items()}
        self.symbols = symbols
        self.hints = hints

    def expr(self, d):
        """A size (int or SymInt) as a sympy expression in b, s."""
        if isinstance(d, int):
            return self.sympy.Integer(d)
        node = getattr(d, "node", None)
        e = getattr(node, "expr", None)
        if e is None:
            return self.sympy.Integer(int(d))
        return self.sympy.sympify(e).xreplace(self.subs)

    def spell(self, d) -> Any:
        """A size as a GraphDoc dim: an int, or ``"b*s"``-style text; ``None`` if not a
        monomial in b and s."""
        return self.spell_sympy(self.expr(d))

    def spell_sympy(self, e) -> Any:
        """:meth:`spell` of a sympy expression in b and s."""
        if e.is_Integer:
            return int(e)
        try:
            poly = self.sympy.Poly(e, self.B, self.S)
        except Exception:
            return None
        terms = poly.terms()
        if len(terms) != 1:
            return None
        (i, j), c = terms[0]
        c = self.sympy.Rational(c)
        if c <= 0:
            return None
        parts = []
        if c.p != 1:
            parts.append(str(c.p))
        parts += ["b"] * i + ["s"] * j
        text = "*".join(parts) if parts else "1"
        if c.q != 1:
            text += f"/{c.q}"
        return text

    def concrete(self, d, env: Dict[str, int]) -> int:
        """A size at the given values of b and s."""
        e = self.expr(d)
        return int(e.subs({self.B: env["b"], self.S: env["s"]}))


# ---------------------------------------------------------------------------------
# The emitter


class _Unsupported(Exception):
    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


@dataclasses.dataclass
class _T:
    """An IR tensor: its number, dtype and shape (GraphDoc dims)."""

    id: int
    dtype: str
    shape: List[Any]


#: The id of an empty tensor (a zero-length slice), which only ``cat`` reads.
_EMPTY = -2
#: The id of a stand-in for an unsupported op's result (see ``_Builder._stand_in``).
_STAND_IN = -1


class _Poisoned(Exception):
    """An op reads a stand-in: it is not reported (its producer is)."""


class _Emitter:
    def __init__(self, name: str):
        self.name = name
        self.ops: List[Dict[str, Any]] = []
        self.count = 0
        self.block: Any = "embed"
        self.reshape_src: Dict[int, _T] = {}

    def emit(self, op: Dict[str, Any], inputs: Sequence[_T], results, role="activation"):
        if any(t.id == _STAND_IN for t in inputs):
            raise _Poisoned()
        if any(t.id < 0 for t in inputs):
            raise _Unsupported("reads an empty tensor")
        ids = []
        doc_results = []
        for dtype, shape in results:
            doc_results.append({"type": {"dtype": dtype, "shape": list(shape)}, "role": role})
            ids.append(_T(self.count, dtype, list(shape)))
            self.count += 1
        self.ops.append(
            {
                "op": op,
                "inputs": [t.id for t in inputs],
                "results": doc_results,
                "block": self.block,
                "phase": "fwd",
            }
        )
        return ids

    def one(self, op, inputs, dtype, shape, role="activation") -> _T:
        return self.emit(op, inputs, [(dtype, shape)], role)[0]

    # helpers that keep types right -------------------------------------------------

    def reshape(self, x: _T, shape: List[Any]) -> _T:
        if list(shape) == x.shape:
            return x
        src = self.reshape_src.get(x.id)
        if src is not None and src.shape == list(shape):
            return src
        y = self.one({"op": "reshape", "shape": list(shape)}, [x], x.dtype, shape)
        self.reshape_src[y.id] = x
        return y

    def cast(self, x: _T, dtype: str) -> _T:
        if x.dtype == dtype:
            return x
        return self.one({"op": "cast", "to": dtype}, [x], dtype, x.shape)

    def broadcast(self, x: _T, shape: List[Any]) -> _T:
        """Broadcasts ``x`` to ``shape`` with PyTorch's rules (align right; size-1 axes
        expand)."""
        shape = list(shape)
        if x.shape == shape:
            return x
        rank = len(shape)
        pad = rank - len(x.shape)
        if pad < 0:
            raise _Unsupported(f"cannot broadcast {x.shape} to {shape}")
        kept, axes = [], []
        for i in range(rank):
            j = i - pad
            if j >= 0 and x.shape[j] == shape[i]:
                kept.append(shape[i])
            elif j < 0 or x.shape[j] == 1:
                axes.append(i)
            else:
                raise _Unsupported(f"cannot broadcast {x.shape} to {shape}")
        x = self.reshape(x, kept)
        if not axes:
            return x
        return self.one({"op": "broadcast", "axes": axes, "shape": shape}, [x], x.dtype, shape)


# ---------------------------------------------------------------------------------
# The capture


_VIEW_OPS = {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "flatten", "unflatten"}
_IDENTITY_OPS = {"alias", "detach", "lift_fresh_copy", "_assert_tensor_metadata"}


def _aten_name(target) -> str:
    """``aten.mul.Tensor`` → ``mul``; Python operators by name."""
    name = getattr(target, "__name__", None) or str(target)
    if hasattr(target, "_schema"):
        name = target._schema.name.split("::")[-1]
    return name


def _full_name(target) -> str:
    if hasattr(target, "_schema"):
        s = target._schema
        return f"aten.{s.name.split('::')[-1]}.{s.overload_name or 'default'}"
    return getattr(target, "__name__", str(target))


def _module_path(node) -> str:
    st = node.meta.get("nn_module_stack")
    if not st:
        return ""
    return list(st.values())[-1][0]


def _hf_kwargs(module, example: Dict[str, Any]) -> Dict[str, Any]:
    """Adds ``use_cache=False`` and ``labels`` (= the input ids) for a Hugging Face model
    whose forward takes them and was not given them."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return example
    out = dict(example)
    if "use_cache" in params and "use_cache" not in out:
        out["use_cache"] = False
    if "labels" in params and "labels" not in out and "input_ids" in out:
        out["labels"] = out["input_ids"]
    return out


def capture(
    module,
    example_inputs: Any = None,
    *,
    name: Optional[str] = None,
    batch: int = 2,
    seq: int = 16,
    mask_seq: int = 4096,
    dims: Optional[Dict[str, Tuple[Optional[str], ...]]] = None,
    dtype: Any = "auto",
) -> Captured:
    """Captures ``module`` with ``torch.export`` on the meta device as an apar IR graph.

    Args:
        module: a ``torch.nn.Module``. Build it under ``torch.device("meta")`` (for a
            Hugging Face model: ``AutoModelForCausalLM.from_config(config)`` inside
            ``with torch.device("meta"):``). A module with real weights is copied to the
            meta device first (its weights are not read, but the copy costs the
            module's memory once).
        example_inputs: a dict of keyword arguments, a tuple of positional arguments,
            or ``None`` for token ids ``input_ids`` of ``int64[batch, seq]`` (what a
            causal language model takes). Tensors may be on any device; only their
            shapes and dtypes are used. For a Hugging Face model, ``use_cache=False``
            and ``labels`` (= ``input_ids``) are added when its forward takes them.
            Leave out ``attention_mask``: a padding mask is data, and the ops that
            read it have no IR form (without it the model's causal mask is folded).
        name: the graph's name (default: the module's class name).
        batch, seq: the example sizes used when ``example_inputs`` is ``None``; the
            captured graph is symbolic in both (planning picks the real ones).
        mask_seq: the sequence length (tokens) at which constant attention masks are
            evaluated to recognize causal and sliding-window masks; a window wider than
            this is seen as plain causal.
        dims: per input name, the symbolic name (``"b"``, ``"s"`` or ``None``) of each
            dimension; default: dimension 0 is ``b``, dimension 1 is ``s``.
        dtype: the parameter dtype to capture at. ``"auto"``: bfloat16 when the module's
            floating-point parameters are float32 (apar plans mixed-precision training:
            bf16 compute with fp32 master weights, which it adds itself), else the
            module's own; ``None``: the module's own; or a ``torch.dtype``.

    Returns:
        a :class:`Captured` with the GraphDoc in ``.graph``.

    Raises:
        UnsupportedOp: ATen ops without an IR form, each with its module path, or a
            shape that is not a monomial in ``b`` and ``s``.
        ConfigError: ``torch.export`` failed (the message carries PyTorch's reason).
    """
    import time

    import torch

    t0 = time.perf_counter()
    module = _on_meta(module, dtype)
    example = _example(module, example_inputs, batch, seq)
    args, kwargs = (), {}
    if isinstance(example, dict):
        kwargs = _hf_kwargs(module, example)
    else:
        args = tuple(example)

    # Symbolic batch and sequence dims for every tensor input.
    symbol_of: Dict[Tuple[str, int], str] = {}
    b_dim = torch.export.Dim("b", min=1, max=1 << 20)
    s_dim = torch.export.Dim("s", min=2, max=1 << 22)

    def dyn_for(key: str, t) -> Optional[Dict[int, Any]]:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        spec = (dims or {}).get(key)
        if spec is None:
            spec = ("b", "s")[: t.dim()]
        out = {}
        for i, sym in enumerate(spec):
            if sym == "b":
                out[i] = b_dim
            elif sym == "s":
                out[i] = s_dim
            if sym:
                symbol_of[(key, i)] = sym
        return out or None

    def widened(t, dyn):
        # torch.export specializes sizes 0 and 1: symbolic dims get at least 2.
        # Inputs sharing a tensor object (labels = input_ids) become separate inputs.
        if not isinstance(t, torch.Tensor):
            return t
        shape = [max(d, 2) if dyn and i in dyn else d for i, d in enumerate(t.shape)]
        return torch.empty(shape, dtype=t.dtype, device="meta")

    if kwargs:
        dynamic = {k: dyn_for(k, v) for k, v in kwargs.items()}
        kwargs = {k: widened(v, dynamic[k]) for k, v in kwargs.items()}
    else:
        dynamic = tuple(dyn_for(f"arg{i}", v) for i, v in enumerate(args))
        args = tuple(widened(v, d) for v, d in zip(args, dynamic))

    te = time.perf_counter()
    try:
        ep = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # PyTorch raises many types; keep its message
        raise ConfigError(
            f"torch.export.export failed on {type(module).__name__}: {type(e).__name__}: {e}",
            "export",
        ) from e
    export_s = time.perf_counter() - te

    gname = name or type(module).__name__
    builder = _Builder(ep, gname, symbol_of, mask_seq)
    graph, params, used = builder.run()
    module_params = sum(p.numel() for p in module.parameters())
    # Tied parameters have several names; one is used when any of them is.
    aliases: Dict[int, List[str]] = {}
    for pname, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(pname)
    unused = [ns[0] for ns in aliases.values() if not any(x in used for x in ns)]
    hf_config = None
    cfg = getattr(module, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        try:
            hf_config = cfg.to_json_string(use_diff=False)
        except Exception:
            hf_config = None
    return Captured(
        name=gname,
        graph=graph,
        params=params,
        module_params=module_params,
        unused_params=unused,
        layers=builder.layer_count,
        layer_container=builder.container,
        hf_config=hf_config,
        notes=builder.notes,
        export_s=export_s,
        capture_s=time.perf_counter() - t0,
    )


def _on_meta(module, dtype):
    import torch

    params = list(module.parameters())
    on_meta = all(p.device.type == "meta" for p in params)
    floats = {p.dtype for p in params if p.is_floating_point()}
    target = None
    if dtype == "auto":
        if floats == {torch.float32}:
            target = torch.bfloat16
    elif dtype is not None:
        target = dtype
    if on_meta and target is None:
        return module
    m = copy.deepcopy(module) if on_meta else _meta_copy(module)
    if target is not None:
        m = m.to(target)
    return m


def _meta_copy(module):
    import torch

    m = copy.deepcopy(module)
    return m.to(torch.device("meta"))


def _example(module, example_inputs, batch, seq):
    import torch

    if example_inputs is None:
        return {"input_ids": torch.zeros(batch, seq, dtype=torch.long, device="meta")}

    def meta(v):
        if isinstance(v, torch.Tensor) and v.device.type != "meta":
            return torch.empty_like(v, device="meta")
        return v

    if isinstance(example_inputs, dict):
        return {k: meta(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, torch.Tensor):
        return (meta(example_inputs),)
    return tuple(meta(v) for v in example_inputs)


class _Builder:
    """Walks an ExportedProgram's graph and writes GraphDoc ops."""

    def __init__(self, ep, name: str, symbol_of, mask_seq: int):
        import torch

        self.torch = torch
        self.ep = ep
        self.gm = ep.graph_module
        self.e = _Emitter(name)
        self.notes: List[str] = []
        self.mask_seq = mask_seq
        sig = ep.graph_signature
        self.param_of = dict(sig.inputs_to_parameters)
        self.buffer_of = dict(getattr(sig, "inputs_to_buffers", {}) or {})
        self.const_of = dict(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
        self.user_inputs = list(sig.user_inputs)
        nodes = list(self.gm.graph.nodes)
        self.nodes = nodes
        # Size symbols of user inputs.
        symbols: Dict[Any, str] = {}
        hints: Dict[str, int] = {}
        placeholders = [n for n in nodes if n.op == "placeholder"]
        user_nodes = [n for n in placeholders if n.name in self.user_inputs]
        keys = self._user_keys(user_nodes)
        for n, key in zip(user_nodes, keys):
            val = n.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            for i, d in enumerate(val.shape):
                sym = symbol_of.get((key, i))
                expr = getattr(getattr(d, "node", None), "expr", None)
                if sym and expr is not None and getattr(expr, "is_Symbol", False):
                    symbols[expr] = sym
                    hint = getattr(d.node, "hint", None)
                    if hint is not None:
                        hints[sym] = int(hint)
        self.user_key = dict(zip([n.name for n in user_nodes], keys))
        self.dims = _Dims(symbols, hints)
        self.env: Dict[Any, Any] = {}  # fx node -> _T, python value, or _Const
        self.const_ir: Dict[Tuple[str, str], _T] = {}
        self.layer_count = 0
        self.container: Optional[str] = None
        self.unsupported: List[Tuple[str, str, str]] = []
        self.param_used: Dict[str, _T] = {}
        self.inputs: Dict[str, _T] = {}
        self.pads: Dict[int, _T] = {}
        self.transposed: Dict[int, Tuple[_T, List[int]]] = {}
        self.sdpa_out: Dict[int, bool] = {}
        self.small_values: Dict[Any, Any] = {}
        self.mask_kinds: Dict[Any, Tuple[str, Optional[int]]] = {}
        self.const_memo: Dict[Any, bool] = {}
        self.params = 0

    def _user_keys(self, user_nodes) -> List[str]:
        # The user inputs in the order of the exported call: kwargs by name, positional
        # args as arg<i>.
        try:
            spec = self.ep.call_spec.in_spec
            kids = spec.children() if hasattr(spec, "children") else spec.children_specs
            nargs = kids[0].num_children
            keys = [f"arg{i}" for i in range(nargs)] + list(kids[1].context or [])
            if len(keys) >= len(user_nodes):
                return keys[: len(user_nodes)]
        except Exception:
            pass
        return [n.name for n in user_nodes]

    # blocks ----------------------------------------------------------------------

    def _assign_blocks(self, live) -> Dict[Any, Any]:
        rx = re.compile(r"^(.*?)\.(\d+)(?:\.|$)")
        counts: Dict[str, set] = {}
        node_layer: Dict[Any, Tuple[str, int]] = {}
        for n in self.nodes:
            if n.op != "call_function":
                continue
            m = rx.match(_module_path(n))
            if m:
                counts.setdefault(m.group(1), set()).add(int(m.group(2)))
                node_layer[n] = (m.group(1), int(m.group(2)))
        if counts:
            self.container = max(sorted(counts), key=lambda k: len(counts[k]))
        indices = sorted(counts.get(self.container, ()))
        renumber = {i: k for k, i in enumerate(indices)}
        self.layer_count = len(indices)
        blocks: Dict[Any, Any] = {}
        order = [n for n in self.nodes if n.op == "call_function" and n in live]
        layer_pos = [
            k
            for k, n in enumerate(order)
            if node_layer.get(n, ("", 0))[0] == self.container and n in node_layer
        ]
        first = layer_pos[0] if layer_pos else len(order)
        last = layer_pos[-1] if layer_pos else -1
        current: Any = "embed"
        for k, n in enumerate(order):
            nl = node_layer.get(n)
            if nl and nl[0] == self.container:
                current = {"layer": renumber[nl[1]]}
            elif k < first:
                current = "embed"
            elif k > last:
                current = "head"
            blocks[n] = current
        return blocks

    # constants -------------------------------------------------------------------

    def _is_const(self, n, memo) -> bool:
        if n in memo:
            return memo[n]
        if n.op == "placeholder":
            r = n.name in self.buffer_of or n.name in self.const_of
        elif n.op == "get_attr":
            r = True
        elif n.op == "call_function":
            name = _aten_name(n.target)
            if name in ("sym_size", "sym_numel", "sym_stride", "size"):
                r = True
            else:
                ins = [a for a in n.all_input_nodes]
                r = all(self._is_const(a, memo) for a in ins)
        else:
            r = False
        memo[n] = r
        return r

    def _eval_const(self, n, env_sizes, cache):
        """The node's value at concrete sizes, computed on the CPU (``None`` when it
        reads a weight-less buffer or fails)."""
        torch = self.torch
        if n in cache:
            return cache[n]
        val = None
        try:
            if n.op == "placeholder":
                val = None
            elif n.op == "call_function":
                name = _aten_name(n.target)
                if name == "sym_size":
                    t = n.args[0].meta["val"]
                    val = self.dims.concrete(t.shape[n.args[1]], env_sizes)
                else:
                    fail = []

                    def conv(a):
                        if isinstance(a, torch.fx.Node):
                            v = self._eval_const(a, env_sizes, cache)
                            if v is None and a.meta.get("val") is not None:
                                fail.append(a)
                            return v
                        if isinstance(a, torch.device):
                            return torch.device("cpu")
                        if isinstance(a, (list, tuple)):
                            return type(a)(conv(x) for x in a)
                        return a

                    args = conv(n.args)
                    kwargs = {k: conv(v) for k, v in n.kwargs.items()}
                    if "device" in kwargs:
                        kwargs["device"] = torch.device("cpu")
                    if not fail:
                        val = n.target(*args, **kwargs)
        except Exception:
            val = None
        cache[n] = val
        return val

    def _const(self, n) -> _T:
        """The IR constant for folded node ``n`` in the current block."""
        key = (n.name, json.dumps(self.e.block))
        if key in self.const_ir:
            return self.const_ir[key]
        val = n.meta.get("val")
        dtype, shape = self._type_of(n, val)
        fill = 0.0
        v = self._eval_small(n)
        if v is not None and v.numel() > 0:
            try:
                lo, hi = v.min().item(), v.max().item()
                if lo == hi and math.isfinite(float(lo)):
                    fill = float(lo)
            except Exception:
                pass
        t = self.e.one({"op": "constant", "value": fill}, [], dtype, shape)
        self.const_ir[key] = t
        return t

    def _eval_small(self, n):
        return self._eval_const(n, {"b": 1, "s": 8}, self.small_values)

    # types -----------------------------------------------------------------------

    def _shape(self, shape, what: str) -> List[Any]:
        out = []
        for d in shape:
            s = self.dims.spell(d)
            if s is None:
                raise _Unsupported(f"{what}: dimension `{d}` is not a monomial in b and s")
            out.append(s)
        return out

    def _type_of(self, n, val) -> Tuple[str, List[Any]]:
        torch = self.torch
        if not isinstance(val, torch.Tensor):
            raise _Unsupported(f"{n.name} is not a tensor")
        try:
            dt = _dtype_name(val.dtype)
        except KeyError:
            raise _Unsupported(f"dtype {val.dtype} has no IR form")
        return dt, self._shape(val.shape, n.name)

    # the walk --------------------------------------------------------------------

    def run(self):
        torch = self.torch
        out_node = [n for n in self.nodes if n.op == "output"][0]
        outputs = list(torch.utils._pytree.tree_leaves(out_node.args[0]))
        loss = None
        for o in outputs:
            if isinstance(o, torch.fx.Node):
                v = o.meta.get("val")
                if isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point():
                    loss = o
                    break
        logits = None
        if loss is None:
            for o in outputs:
                if isinstance(o, torch.fx.Node):
                    v = o.meta.get("val")
                    if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.is_floating_point():
                        logits = o
                        break
            if logits is None:
                raise UnsupportedOp(
                    "the module returns neither a scalar loss nor logits", "output", []
                )
        root = loss if loss is not None else logits
        live = set()
        stack = [root]
        while stack:
            n = stack.pop()
            if n in live:
                continue
            live.add(n)
            stack.extend(n.all_input_nodes)
        memo = self.const_memo
        # In graph order, so that every query finds its inputs answered (no deep
        # recursion along the residual stream).
        for n in self.nodes:
            if n.op == "placeholder":
                self._placeholder(n, memo)
            self._is_const(n, memo)
        blocks = self._assign_blocks(live)
        regions = self._moe_regions(live, memo)
        for n in self.nodes:
            if n not in live:
                continue
            if n in regions:
                region = regions[n]
                if n is region["output"]:
                    self.e.block = blocks.get(n, "head")
                    try:
                        self.env[n] = self._moe(region)
                    except _Unsupported as u:
                        self.unsupported.append(("mixture of experts", region["path"], u.why))
                        self.env[n] = self._stand_in(n)
                    except _Poisoned:
                        self.env[n] = self._stand_in(n)
                    except _Skip:
                        self.env[n] = None
                else:
                    self.env[n] = None
                continue
            if n.op != "call_function":
                continue
            if self._is_const(n, memo):
                self.env[n] = ("const", n)
                continue
            self.e.block = blocks.get(n, "head")
            try:
                self.env[n] = self._call(n)
            except _Unsupported as u:
                self.unsupported.append((_full_name(n.target), _module_path(n), u.why))
                self.env[n] = self._stand_in(n)
            except _Poisoned:
                self.env[n] = self._stand_in(n)
            except _Skip:
                self.env[n] = None
        if self.unsupported:
            raise UnsupportedOp.of(self.unsupported)
        if loss is None:
            self.e.block = "head"
            x = self.env[logits]
            labels = self.e.one({"op": "input", "name": "labels"}, [], "i64", x.shape[:-1])
            self.e.one({"op": "cross_entropy"}, [x, labels], "f32", [])
            self.notes.append("appended cross_entropy against an i64 `labels` input")
        params = 0
        for t in self.param_used.values():
            k = 1
            for d in t.shape:
                k *= d
            params += k
        graph = {"name": self.e.name, "ops": _dead_code_removed(self.e.ops)}
        return graph, params, set(self.param_used)

    def _stand_in(self, n):
        """A tensor of ``n``'s type that is never written: the walk goes on past an
        unsupported op so that every unsupported op is reported (the capture then
        fails)."""
        try:
            dtype, shape = self._out_type(n)
        except _Unsupported:
            return None
        return _T(_STAND_IN, dtype, shape)

    def _placeholder(self, n, memo):
        torch = self.torch
        if n.name in self.param_of:
            self.env[n] = ("param", n)
        elif n.name in self.buffer_of or n.name in self.const_of:
            memo[n] = True
            self.env[n] = ("const", n)
        else:
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor):
                self.env[n] = ("input", n)
            else:
                self.env[n] = val

    def _param(self, n, transposed: bool = False) -> _T:
        """The IR param for placeholder ``n`` (declared ``[in, out]`` when
        ``transposed``), emitted once in the block of its first use."""
        fqn = self.param_of[n.name]
        if fqn in self.param_used:
            return self.param_used[fqn]
        dtype, shape = self._type_of(n, n.meta.get("val"))
        if transposed:
            shape = [shape[1], shape[0]]
        t = self.e.one({"op": "param", "name": fqn}, [], dtype, shape, role="param")
        self.param_used[fqn] = t
        return t

    def _input(self, n) -> _T:
        """The IR input for user input ``n`` (``input_ids`` is named ``tokens``), emitted
        once in the block of its first use."""
        key = self.user_key.get(n.name, n.name)
        if key in self.inputs:
            return self.inputs[key]
        dtype, shape = self._type_of(n, n.meta.get("val"))
        name = {"input_ids": "tokens"}.get(key, key)
        t = self.e.one({"op": "input", "name": name}, [], dtype, shape)
        self.inputs[key] = t
        return t

    def value(self, a, *, transposed: bool = False):
        """An argument: an IR tensor for tensor nodes, a python value otherwise."""
        torch = self.torch
        if isinstance(a, torch.fx.Node):
            v = self.env.get(a)
            if isinstance(v, tuple) and len(v) == 2 and v[0] in ("param", "input", "const"):
                kind, node = v
                if kind == "param":
                    return self._param(node, transposed)
                if kind == "input":
                    return self._input(node)
                val = node.meta.get("val")
                if isinstance(val, torch.Tensor):
                    return self._const(node)
                # A folded size (SymInt): its symbolic value.
                return val
            if v is None:
                raise _Skip()
            return v
        if isinstance(a, (list, tuple)):
            return type(a)(self.value(x) for x in a)
        return a

    def _scalar(self, a) -> Optional[float]:
        """A python number, or a folded 0-dim constant's value; else None."""
        torch = self.torch
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            return float(a)
        if isinstance(a, torch.fx.Node):
            v = self.env.get(a)
            if isinstance(v, tuple) and v[0] == "const":
                val = a.meta.get("val")
                if isinstance(val, torch.Tensor) and val.numel() == 1 and val.dim() <= 1:
                    c = self._eval_small(a)
                    if c is not None:
                        return float(c.reshape(()).item())
        return None

    def _out_type(self, n) -> Tuple[str, List[Any]]:
        val = n.meta.get("val")
        if isinstance(val, (list, tuple)):
            val = val[0]
        return self._type_of(n, val)

    # mixture of experts ------------------------------------------------------------

    def _moe_regions(self, live, memo) -> Dict[Any, Dict[str, Any]]:
        """Hugging Face's sparse MoE blocks (router with ``topk`` + experts with
        grouped GEMMs): node → region, for the module holding the router."""
        torch = self.torch
        regions: Dict[Any, Dict[str, Any]] = {}
        for n in self.nodes:
            if n not in live or n.op != "call_function" or _aten_name(n.target) != "topk":
                continue
            stack = list((n.meta.get("nn_module_stack") or {}).values())
            if len(stack) < 2:
                continue
            root, kind = stack[-2][0], stack[-2][1]
            k = n.args[1]

            def inside(m, root=root):
                path = _module_path(m)
                return path == root or path.startswith(root + ".")

            nodes = [
                m
                for m in self.nodes
                if m in live and m.op == "call_function" and inside(m) and not self._is_const(m, memo)
            ]
            members = set(nodes)
            ins, outs, params = [], [], []
            for m in nodes:
                for a in m.all_input_nodes:
                    if a in members:
                        continue
                    if a.op == "placeholder" and a.name in self.param_of:
                        if a not in params:
                            params.append(a)
                    elif not self._is_const(a, memo) and a not in ins:
                        ins.append(a)
                if any(u not in members and u in live for u in m.users):
                    outs.append(m)
            region = {
                "path": root,
                "kind": str(kind).split(".")[-1],
                "topk": k,
                "inputs": ins,
                "outputs": outs,
                "params": params,
                "output": outs[-1] if outs else None,
                "sigmoid": any(_aten_name(m.target) == "sigmoid" for m in nodes),
            }
            for m in nodes:
                regions[m] = region
        del torch
        return regions

    def _moe(self, r: Dict[str, Any]) -> _T:
        """The IR of a sparse MoE block: router matmul, ``moe_route``,
        ``moe_dispatch``, grouped GEMMs, ``moe_combine``."""
        if len(r["inputs"]) != 1 or len(r["outputs"]) != 1:
            raise _Unsupported(
                f"{r['kind']}: expected one input and one output tensor, got "
                f"{len(r['inputs'])} and {len(r['outputs'])}"
            )
        if not isinstance(r["topk"], int):
            raise _Unsupported("top-k is not a number")
        x = self.value(r["inputs"][0])
        h = x.shape[-1]
        router = [p for p in r["params"] if len(p.meta["val"].shape) == 2]
        experts = [p for p in r["params"] if len(p.meta["val"].shape) == 3]
        other = [p for p in r["params"] if p not in router and p not in experts]
        if len(router) != 1 or len(experts) != 2 or other:
            names = [self.param_of[p.name] for p in r["params"]]
            raise _Unsupported(
                f"{r['kind']}: a router weight and fused gate_up/down expert weights "
                f"expected, got {names} (shared experts and biases are not captured)"
            )
        e, hr = (int(d) for d in router[0].meta["val"].shape)
        if hr != h:
            raise _Unsupported(f"{r['kind']}: router weight is not [experts, {h}]")
        gate_up = next((p for p in experts if int(p.meta["val"].shape[2]) == h), None)
        down = next((p for p in experts if p is not gate_up), None)
        if gate_up is None or down is None:
            raise _Unsupported(f"{r['kind']}: expert weights are not [E, 2f, h] and [E, h, f]")
        two_f = int(gate_up.meta["val"].shape[1])
        f = two_f // 2
        if tuple(int(d) for d in down.meta["val"].shape) != (e, h, f):
            raise _Unsupported(f"{r['kind']}: down_proj is not [{e}, {h}, {f}]")
        wr = self._param(router[0], transposed=True)
        lead = x.shape[:-1]
        logits = self.e.one({"op": "matmul", "ta": False, "tb": False}, [x, wr], x.dtype, lead + [e])
        k = r["topk"]
        weights, _probs, idx = self.e.emit(
            {"op": "moe_route", "topk": k, "sigmoid": bool(r["sigmoid"])},
            [logits],
            [(x.dtype, lead + [k]), ("f32", lead + [e]), ("i64", lead + [k])],
        )
        tokens = self.dims.sympy.Integer(1)
        for d in lead:
            tokens = tokens * self.dims.sympy.sympify(d)
        rows_dim = self._spell_expr(tokens * k)
        rows = self.e.one({"op": "moe_dispatch", "experts": e}, [x, idx], x.dtype, [rows_dim, h])
        wgu = self._param(gate_up)
        gu = self.e.one({"op": "grouped_matmul", "tb": True}, [rows, wgu], x.dtype, [rows_dim, two_f])
        g = self.e.one({"op": "slice", "axis": 1, "start": 0, "len": f}, [gu], x.dtype, [rows_dim, f])
        u = self.e.one({"op": "slice", "axis": 1, "start": f, "len": f}, [gu], x.dtype, [rows_dim, f])
        a = self.e.one({"op": "silu"}, [g], x.dtype, [rows_dim, f])
        y = self.e.one({"op": "mul"}, [a, u], x.dtype, [rows_dim, f])
        wd = self._param(down)
        y = self.e.one({"op": "grouped_matmul", "tb": True}, [y, wd], x.dtype, [rows_dim, h])
        out = self.e.one({"op": "moe_combine", "experts": e}, [y, weights, idx], x.dtype, lead + [h])
        self.notes.append(
            f"{r['kind']} captured as moe_route(top-{k}) / moe_dispatch / grouped_matmul / moe_combine (dropless)"
        )
        return out

    def _spell_expr(self, e) -> Any:
        B, S = self.dims.B, self.dims.S
        e = self.dims.sympy.sympify(e).subs({self.dims.sympy.Symbol("b"): B, self.dims.sympy.Symbol("s"): S})
        text = self.dims.spell_sympy(e)
        if text is None:
            raise _Unsupported(f"routed rows {e} are not a monomial in b and s")
        return text

    # ops -------------------------------------------------------------------------

    def _call(self, n):
        name = _aten_name(n.target)
        handler = getattr(self, f"op_{name}", None)
        if name in _IDENTITY_OPS:
            if name == "_assert_tensor_metadata":
                raise _Skip()
            return self.value(n.args[0])
        if name in _VIEW_OPS:
            x = self.value(n.args[0])
            _, shape = self._out_type(n)
            return self.e.reshape(x, shape)
        if handler is None:
            raise _Unsupported("no IR form")
        return handler(n)

    def _elementwise(self, n, op_name: str):
        a, b = n.args[0], n.args[1]
        dtype, shape = self._out_type(n)
        sa, sb = self._scalar(a), self._scalar(b)
        torch = self.torch

        def is_t(v, c):
            return isinstance(v, torch.fx.Node) and c is None

        alpha = n.kwargs.get("alpha", 1)
        if op_name == "sub":
            alpha = -alpha
        if is_t(a, sa) and is_t(b, sb):
            x = self.e.broadcast(self.e.cast(self.value(a), dtype), shape)
            y = self.e.broadcast(self.e.cast(self.value(b), dtype), shape)
            if op_name in ("add", "sub"):
                if alpha != 1:
                    y = self.e.one({"op": "scale", "factor": float(alpha)}, [y], dtype, shape)
                return self.e.one({"op": "add"}, [x, y], dtype, shape)
            if op_name == "mul":
                return self.e.one({"op": "mul"}, [x, y], dtype, shape)
            raise _Unsupported("division of two tensors has no IR form")
        # One tensor, one scalar.
        if is_t(a, sa):
            t, c, t_first = a, sb, True
        else:
            t, c, t_first = b, sa, False
        if c is None:
            raise _Unsupported("operand is neither a tensor nor a number")
        x = self.e.broadcast(self.e.cast(self.value(t), dtype), shape)
        if op_name == "add":
            if t_first:
                return x if c == 0 else self.e.one({"op": "shift", "value": c * alpha}, [x], dtype, shape)
            return self._shift_scaled(x, alpha, c, dtype, shape)
        if op_name == "sub":
            if t_first:
                return self.e.one({"op": "shift", "value": -c * n.kwargs.get("alpha", 1)}, [x], dtype, shape)
            y = self.e.one({"op": "scale", "factor": -float(n.kwargs.get("alpha", 1))}, [x], dtype, shape)
            return self.e.one({"op": "shift", "value": c}, [y], dtype, shape)
        if op_name == "mul":
            if c == 1:
                return x
            return self.e.one({"op": "scale", "factor": c}, [x], dtype, shape)
        if op_name == "div":
            if not t_first:
                raise _Unsupported("a number divided by a tensor has no IR form")
            return self.e.one({"op": "scale", "factor": 1.0 / c}, [x], dtype, shape)
        raise _Unsupported("no IR form")

    def _shift_scaled(self, x, alpha, c, dtype, shape):
        if alpha != 1:
            x = self.e.one({"op": "scale", "factor": float(alpha)}, [x], dtype, shape)
        return self.e.one({"op": "shift", "value": c}, [x], dtype, shape)

    def op_add(self, n):
        return self._elementwise(n, "add")

    def op_sub(self, n):
        return self._elementwise(n, "sub")

    def op_mul(self, n):
        return self._elementwise(n, "mul")

    def op_div(self, n):
        if n.kwargs.get("rounding_mode"):
            raise _Unsupported("rounding division has no IR form")
        return self._elementwise(n, "div")

    def op_neg(self, n):
        x = self.value(n.args[0])
        return self.e.one({"op": "scale", "factor": -1.0}, [x], x.dtype, x.shape)

    def _unary(self, n, op):
        x = self.value(n.args[0])
        dtype, shape = self._out_type(n)
        return self.e.one(op, [self.e.cast(x, dtype)], dtype, shape)

    def op_silu(self, n):
        return self._unary(n, {"op": "silu"})

    def op_gelu(self, n):
        return self._unary(n, {"op": "gelu"})

    def op_tanh(self, n):
        return self._unary(n, {"op": "tanh"})

    def op_rsqrt(self, n):
        return self._unary(n, {"op": "rsqrt"})

    def op_pow(self, n):
        e = self._scalar(n.args[1])
        if e is None or not isinstance(n.args[0], self.torch.fx.Node):
            raise _Unsupported("only tensor ** number has an IR form")
        return self._unary(n, {"op": "pow", "exponent": e})

    def op_sqrt(self, n):
        return self._unary(n, {"op": "pow", "exponent": 0.5})

    def op_to(self, n):
        x = self.value(n.args[0])
        dtype, _ = self._out_type(n)
        return self.e.cast(x, dtype)

    op__to_copy = op_to

    def op_type_as(self, n):
        return self.op_to(n)

    def op_contiguous(self, n):
        x = self.value(n.args[0])
        if self.sdpa_out.get(x.id) is False:
            # SDPA's flash kernel lays its output out like `q`; for a `q` in the
            # projection's `[b, s, heads, d]` layout, `transpose(1, 2).contiguous()`
            # copies nothing.
            return x
        return self.e.one({"op": "contiguous"}, [x], x.dtype, x.shape)

    op_clone = op_contiguous

    def op_dropout(self, n):
        x = self.value(n.args[0])
        p = float(n.args[1]) if len(n.args) > 1 else 0.5
        train = n.args[2] if len(n.args) > 2 else True
        if p == 0.0 or not train:
            return x
        return self.e.emit({"op": "dropout", "p": p}, [x], [(x.dtype, x.shape), ("u8", x.shape)])[0]

    def op_transpose(self, n):
        x = self.value(n.args[0])
        r = len(x.shape)
        d0, d1 = n.args[1] % r, n.args[2] % r
        perm = list(range(r))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        return self._transpose(x, perm)

    def _transpose(self, x, perm):
        if perm == list(range(len(perm))):
            return x
        prev = self.transposed.get(x.id)
        if prev is not None and all(prev[1][p] == i for i, p in enumerate(perm)):
            return prev[0]
        shape = [x.shape[p] for p in perm]
        y = self.e.one({"op": "transpose", "perm": perm}, [x], x.dtype, shape)
        self.transposed[y.id] = (x, perm)
        return y

    def op_permute(self, n):
        x = self.value(n.args[0])
        r = len(x.shape)
        return self._transpose(x, [p % r for p in n.args[1]])

    def op_t(self, n):
        x = self.value(n.args[0])
        return self._transpose(x, [1, 0]) if len(x.shape) == 2 else x

    def op_expand(self, n):
        x = self.value(n.args[0])
        _, shape = self._out_type(n)
        return self.e.broadcast(x, shape)

    def op_slice(self, n):
        x = self.value(n.args[0])
        r = len(x.shape)
        axis = (n.args[1] if len(n.args) > 1 else 0) % r
        dtype, shape = self._out_type(n)
        if shape == x.shape:
            return x
        size = x.shape[axis]
        start = n.args[2] if len(n.args) > 2 else 0
        step = n.args[4] if len(n.args) > 4 else 1
        if isinstance(size, int) and isinstance(start, int) and isinstance(step, int) and step > 1:
            return self._strided_slice(x, axis, start, step, shape, dtype)
        if not isinstance(size, int) or not isinstance(start, int) or step != 1:
            # The label shift of a causal LM: pad by one then slice back.
            src = self.pads.get(x.id)
            if src is not None and src.shape == shape:
                return src
            raise _Unsupported("slice of a symbolic axis")
        if start is None:
            start = 0
        if start < 0:
            start += size
        length = shape[axis]
        if length == 0:
            # An empty slice (`x[..., d:]` of a d-wide axis): only a concatenation may
            # read it, which drops it.
            return _T(_EMPTY, dtype, shape)
        return self.e.one({"op": "slice", "axis": axis, "start": int(start), "len": int(length)}, [x], dtype, shape)

    def _strided_slice(self, x, axis, start, step, shape, dtype):
        """``x[..., start::step, ...]`` on a literal axis: the axis split into
        ``[size/step, step]``, one column kept (the interleaved rotary of GPT-J and
        Cohere)."""
        size = x.shape[axis]
        if size % step or start >= step:
            raise _Unsupported(f"strided slice {start}::{step} of an axis of {size}")
        split = x.shape[:axis] + [size // step, step] + x.shape[axis + 1 :]
        y = self.e.reshape(x, split)
        col = split[: axis + 1] + [1] + split[axis + 2 :]
        y = self.e.one({"op": "slice", "axis": axis + 1, "start": start, "len": 1}, [y], dtype, col)
        return self.e.reshape(y, shape)

    def op_select(self, n):
        x = self.value(n.args[0])
        r = len(x.shape)
        axis = n.args[1] % r
        size = x.shape[axis]
        index = n.args[2]
        if not isinstance(size, int) or not isinstance(index, int):
            raise _Unsupported("select on a symbolic axis")
        index %= size
        dtype, shape = self._out_type(n)
        kept = x.shape[:axis] + [1] + x.shape[axis + 1 :]
        y = self.e.one({"op": "slice", "axis": axis, "start": index, "len": 1}, [x], dtype, kept)
        return self.e.reshape(y, shape)

    def op_stack(self, n):
        xs = [self.value(a) for a in n.args[0]]
        dtype, shape = self._out_type(n)
        axis = (n.args[1] if len(n.args) > 1 else 0) % len(shape)
        parts = []
        for x in xs:
            x = self.e.cast(x, dtype)
            parts.append(self.e.reshape(x, x.shape[:axis] + [1] + x.shape[axis:]))
        if len(parts) == 1:
            return parts[0]
        return self.e.one({"op": "concat", "axis": axis}, parts, dtype, shape)

    def op_square(self, n):
        return self._unary(n, {"op": "pow", "exponent": 2.0})

    def op_pad(self, n):
        x = self.value(n.args[0])
        if x.dtype not in ("i64", "i32"):
            raise _Unsupported("padding of float tensors has no IR form here")
        # Integer labels: recorded so that the slice back to the original shape reads
        # the labels themselves (the shift changes values, not sizes).
        fake = _T(x.id, x.dtype, list(x.shape))
        self.pads[x.id] = x
        self.notes.append("label shift (pad + slice of integer labels) captured as the labels")
        return fake

    def op_cat(self, n):
        xs = [x for x in (self.value(a) for a in n.args[0]) if x.id != _EMPTY]
        dtype, shape = self._out_type(n)
        axis = (n.args[1] if len(n.args) > 1 else 0) % len(shape)
        xs = [self.e.cast(x, dtype) for x in xs]
        if len(xs) == 1:
            return xs[0]
        return self.e.one({"op": "concat", "axis": axis}, xs, dtype, shape)

    def op_embedding(self, n):
        w = self.value(n.args[0])
        ids = self.value(n.args[1])
        dtype, shape = self._out_type(n)
        return self.e.one({"op": "embedding"}, [w, ids], dtype, shape)

    def _weight_only_linear(self, wnode) -> bool:
        return all(
            u.op == "call_function" and _aten_name(u.target) == "linear" and u.args[1] is wnode
            for u in wnode.users
        )

    def op_linear(self, n):
        x = self.value(n.args[0])
        wnode = n.args[1]
        is_param = isinstance(self.env.get(wnode), tuple) and self.env[wnode][0] == "param"
        transposed = is_param and self._weight_only_linear(wnode)
        w = self.value(wnode, transposed=transposed)
        dtype, shape = self._out_type(n)
        y = self.e.one({"op": "matmul", "ta": False, "tb": not transposed}, [x, w], dtype, shape)
        if len(n.args) > 2 and n.args[2] is not None:
            b = self.value(n.args[2])
            y = self.e.one({"op": "bias_add"}, [y, b], dtype, shape)
        return y

    def op_addmm(self, n):
        bias, x, w = (self.value(a) for a in n.args[:3])
        dtype, shape = self._out_type(n)
        y = self.e.one({"op": "matmul", "ta": False, "tb": False}, [x, w], dtype, shape)
        return self.e.one({"op": "bias_add"}, [y, bias], dtype, shape)

    def op_mm(self, n):
        x, w = self.value(n.args[0]), self.value(n.args[1])
        dtype, shape = self._out_type(n)
        return self.e.one({"op": "matmul", "ta": False, "tb": False}, [x, w], dtype, shape)

    op_matmul = op_mm
    op_bmm = op_mm

    def op_mean(self, n):
        x = self.value(n.args[0])
        r = len(x.shape)
        axes = sorted(a % r for a in (n.args[1] if len(n.args) > 1 else range(r)))
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        count = 1
        for a in axes:
            if not isinstance(x.shape[a], int):
                raise _Unsupported("mean over a symbolic axis")
            count *= x.shape[a]
        red = [d for i, d in enumerate(x.shape) if i not in axes]
        y = self.e.one({"op": "reduce_sum", "axes": axes}, [x], x.dtype, red)
        y = self.e.one({"op": "scale", "factor": 1.0 / count}, [y], x.dtype, red)
        if keep:
            y = self.e.reshape(y, [1 if i in axes else d for i, d in enumerate(x.shape)])
        return y

    def op_sum(self, n):
        x = self.value(n.args[0])
        r = len(x.shape)
        axes = sorted(a % r for a in (n.args[1] if len(n.args) > 1 and n.args[1] is not None else range(r)))
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        red = [d for i, d in enumerate(x.shape) if i not in axes]
        y = self.e.one({"op": "reduce_sum", "axes": axes}, [x], x.dtype, red)
        if keep:
            y = self.e.reshape(y, [1 if i in axes else d for i, d in enumerate(x.shape)])
        return y

    def op_softmax(self, n):
        x = self.value(n.args[0])
        dim = n.args[1] % len(x.shape)
        if dim != len(x.shape) - 1:
            raise _Unsupported("softmax over an axis other than the last")
        dtype, shape = self._out_type(n)
        x = self.e.cast(x, dtype)
        return self.e.one({"op": "softmax", "causal": False, "scale": 1.0}, [x], dtype, shape)

    op__softmax = op_softmax

    def op_layer_norm(self, n):
        x = self.value(n.args[0])
        w = self.value(n.args[2]) if len(n.args) > 2 and n.args[2] is not None else None
        b = self.value(n.args[3]) if len(n.args) > 3 and n.args[3] is not None else None
        eps = float(n.args[4]) if len(n.args) > 4 else 1e-5
        dtype, shape = self._out_type(n)
        h = x.shape[-1]
        if w is None:
            w = self.e.one({"op": "constant", "value": 1.0}, [], x.dtype, [h])
        if b is None:
            b = self.e.one({"op": "constant", "value": 0.0}, [], x.dtype, [h])
        return self.e.one({"op": "layernorm", "eps": eps}, [x, w, b], dtype, shape)

    def op_rms_norm(self, n):
        x = self.value(n.args[0])
        w = self.value(n.args[2]) if len(n.args) > 2 and n.args[2] is not None else None
        eps = n.args[3] if len(n.args) > 3 and n.args[3] is not None else 1e-6
        dtype, shape = self._out_type(n)
        if w is None:
            w = self.e.one({"op": "constant", "value": 1.0}, [], x.dtype, [x.shape[-1]])
        return self.e.one({"op": "rmsnorm", "eps": float(eps)}, [x, w], dtype, shape)

    def op_cross_entropy_loss(self, n):
        logits = self.value(n.args[0])
        labels = self.value(n.args[1])
        reduction = n.args[3] if len(n.args) > 3 else n.kwargs.get("reduction", 1)
        if reduction != 1:
            raise _Unsupported("only the mean cross-entropy has an IR form")
        return self.e.one({"op": "cross_entropy"}, [logits, labels], "f32", [])

    def op_scaled_dot_product_attention(self, n):
        torch = self.torch
        q, k, v = (self.value(a) for a in n.args[:3])
        args = list(n.args) + [None] * 8
        mask_node = args[3] if args[3] is not None else n.kwargs.get("attn_mask")
        dropout = args[4] if args[4] is not None else n.kwargs.get("dropout_p", 0.0)
        causal = args[5] if args[5] is not None else n.kwargs.get("is_causal", False)
        scale = n.kwargs.get("scale", args[6])
        if dropout:
            # The flash kernel keeps its random state, not a mask: the memory of
            # attention without dropout (as apar's own Hugging Face model code).
            self.notes.append("attention dropout inside SDPA captured as SDPA (the kernel saves no mask)")
        d = q.shape[-1]
        if scale is None:
            scale = 1.0 / math.sqrt(d)
        window = None
        mask = None
        if mask_node is not None:
            kind, w = self._mask_kind(mask_node)
            if kind == "causal":
                causal, window = True, w
            elif kind == "none":
                pass
            else:
                m = self.value(mask_node)
                mask = m
        # PyTorch: [b, heads, s, d]; apar: [b, s, heads, d].
        perm = [0, 2, 1, 3]
        if len(q.shape) != 4:
            raise _Unsupported("SDPA on tensors of rank other than 4")
        q2, k2, v2 = (self._transpose(t, perm) for t in (q, k, v))
        ins = [q2, k2, v2]
        if mask is not None:
            b, s, t = q2.shape[0], q2.shape[1], k2.shape[1]
            if mask.dtype == "u8":
                raise _Unsupported("a boolean attention mask that is not causal")
            mask = self.e.cast(mask, q2.dtype)
            mask = self.e.broadcast(mask, [b, 1, s, t]) if len(mask.shape) < 4 else mask
            if mask.shape[1] != 1:
                raise _Unsupported("a per-head attention mask")
            mask = self.e.broadcast(mask, [b, 1, s, t])
            mask = self.e.reshape(mask, [b, s, t])
            ins.append(mask)
        op = {"op": "sdpa", "causal": bool(causal), "scale": float(scale)}
        if window is not None:
            op["window"] = int(window)
        b, s, a = q2.shape[0], q2.shape[1], q2.shape[2]
        o, _lse = self.e.emit(op, ins, [(q2.dtype, q2.shape), ("f32", [b, s, a])])
        del torch
        self.sdpa_out[o.id] = self._heads_first(n.args[0])
        return self._transpose(o, perm)

    def _heads_first(self, q) -> bool:
        """Whether PyTorch's ``q`` (``[b, heads, s, d]``) is laid out heads-first in
        memory: elementwise ops keep their input's layout, a transpose of the
        projection's ``[b, s, heads, d]`` is not, a concatenation or a copy is."""
        torch = self.torch
        keep = {"mul", "add", "sub", "neg", "to", "_to_copy", "type_as", "alias", "div"}
        n = q
        for _ in range(64):
            if not isinstance(n, torch.fx.Node) or n.op != "call_function":
                return True
            name = _aten_name(n.target)
            if name in ("transpose", "permute"):
                return False
            if name not in keep:
                return True
            shape = tuple(n.meta["val"].shape)
            nxt = None
            for a in n.args:
                if isinstance(a, torch.fx.Node) and not self._is_const(a, self.const_memo):
                    v = a.meta.get("val")
                    if isinstance(v, torch.Tensor) and tuple(v.shape) == shape:
                        nxt = a
                        break
            n = nxt
        return True

    def _mask_kind(self, node) -> Tuple[str, Optional[int]]:
        """Evaluates a folded attention mask at ``mask_seq``: ``("causal", window)``,
        ``("none", None)`` for an all-true mask, ``("other", None)`` otherwise (once
        per mask: the layers share it)."""
        if node not in self.mask_kinds:
            self.mask_kinds[node] = self._mask_kind_uncached(node)
        return self.mask_kinds[node]

    def _mask_kind_uncached(self, node) -> Tuple[str, Optional[int]]:
        torch = self.torch
        if not (isinstance(self.env.get(node), tuple) and self.env[node][0] == "const"):
            return ("other", None)
        cache: Dict[Any, Any] = {}
        s = self.mask_seq
        m = self._eval_const(node, {"b": 1, "s": s}, cache)
        if m is None:
            return ("other", None)
        m = m.reshape(-1, m.shape[-2], m.shape[-1])
        if m.dtype != torch.bool:
            allowed = m == 0
        else:
            allowed = m
        first = allowed[0]
        if not bool((allowed == first).all()):
            return ("other", None)
        if bool(first.all()):
            return ("none", None)
        rows, cols = first.shape
        i = torch.arange(rows).unsqueeze(1)
        j = torch.arange(cols).unsqueeze(0)
        causal = j <= i
        if bool((first == causal).all()):
            self.notes.append("causal attention mask folded into sdpa {causal=true}")
            return ("causal", None)
        width = int(first.sum(dim=1).max().item())
        windowed = causal & (j > i - width)
        if bool((first == windowed).all()):
            self.notes.append(f"sliding-window mask folded into sdpa {{causal=true, window={width}}}")
            return ("causal", width)
        return ("other", None)

    def op_repeat_interleave(self, n):
        x = self.value(n.args[0])
        times = n.args[1]
        if not isinstance(times, int):
            raise _Unsupported("repeat_interleave with tensor repeats")
        dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else None)
        if dim is None:
            raise _Unsupported("repeat_interleave without a dim")
        dtype, shape = self._out_type(n)
        return self.e.one({"op": "repeat", "axis": dim % len(x.shape), "times": times}, [x], dtype, shape)

    def op_split(self, n):
        x = self.value(n.args[0])
        axis = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % len(x.shape)
        return self._split(x, axis, n.args[1])

    op_split_with_sizes = op_split

    def op_chunk(self, n):
        x = self.value(n.args[0])
        axis = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % len(x.shape)
        size = x.shape[axis]
        if not isinstance(size, int):
            raise _Unsupported("chunk of a symbolic axis")
        return self._split(x, axis, -(-size // n.args[1]))

    def _split(self, x: _T, axis: int, sizes) -> List[_T]:
        """``torch.split(x, sizes, axis)`` as slices (views)."""
        size = x.shape[axis]
        if not isinstance(size, int):
            raise _Unsupported("split of a symbolic axis")
        if isinstance(sizes, int):
            sizes = [sizes] * (size // sizes) + ([size % sizes] if size % sizes else [])
        outs, start = [], 0
        for k in sizes:
            shape = list(x.shape)
            shape[axis] = k
            outs.append(self.e.one({"op": "slice", "axis": axis, "start": start, "len": k}, [x], x.dtype, shape))
            start += k
        return outs

    def op_getitem(self, n):
        v = self.value(n.args[0])
        if isinstance(v, (list, tuple)):
            return v[n.args[1]]
        raise _Unsupported("indexing a non-tuple")


class _Skip(Exception):
    pass


def _dead_code_removed(ops: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The ops the last op (the loss) reads, transitively, with tensors renumbered.
    Helper ops whose results nothing reads (a reshape a later broadcast bypassed) go."""
    first = []
    k = 0
    for op in ops:
        first.append(k)
        k += len(op["results"])
    owner = {}
    for i, op in enumerate(ops):
        for r in range(len(op["results"])):
            owner[first[i] + r] = i
    keep = [False] * len(ops)
    keep[-1] = True
    for i in range(len(ops) - 1, -1, -1):
        if keep[i]:
            for t in ops[i]["inputs"]:
                keep[owner[t]] = True
    renum = {}
    out = []
    k = 0
    for i, op in enumerate(ops):
        if not keep[i]:
            continue
        for r in range(len(op["results"])):
            renum[first[i] + r] = k
            k += 1
        out.append(op)
    for op in out:
        op["inputs"] = [renum[t] for t in op["inputs"]]
    return out

