"""Capture of hand-written modules: loss appended to logits, constant folding, ops
without an IR form reported with their module path."""

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import apar  # noqa: E402


class Block(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.norm = nn.LayerNorm(h)
        self.up = nn.Linear(h, 4 * h)
        self.down = nn.Linear(4 * h, h)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x)), approximate="tanh"))


class Tiny(nn.Module):
    def __init__(self, vocab=512, h=64, layers=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, h)
        self.blocks = nn.ModuleList(Block(h) for _ in range(layers))
        self.head = nn.Linear(h, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        # Depends on the sequence length only: folded to a constant.
        pos = torch.arange(ids.shape[1], device=ids.device).to(x.dtype)
        x = x + pos.unsqueeze(-1) * 0.0
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def test_logits_get_a_cross_entropy_and_constants_fold():
    with torch.device("meta"):
        m = Tiny()
    ids = torch.zeros(2, 16, dtype=torch.long)
    c = apar.capture(m, (ids,))
    assert c.params == sum(p.numel() for p in m.parameters())
    kinds = [op["op"]["op"] for op in c.graph["ops"]]
    assert kinds[-1] == "cross_entropy"
    assert "arange" not in kinds and "constant" in kinds
    labels = [op for op in c.graph["ops"] if op["op"] == {"op": "input", "name": "labels"}]
    assert labels[0]["results"][0]["type"] == {"dtype": "i64", "shape": ["b", "s"]}
    assert c.layers == 3
    # fp32 modules are captured at bf16 (apar adds the fp32 masters itself).
    assert {op["results"][0]["type"]["dtype"] for op in c.graph["ops"] if op["op"]["op"] == "param"} == {"bf16"}
    p = apar.plan(c, "dgx-a100-80g:1", global_batch=64, seq=128)
    assert p.memory.peak_bytes <= p.memory.budget_bytes


class Sorting(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.mix = nn.Linear(32, 32)

    def forward(self, ids):
        x = self.mix(self.embed(ids))
        return torch.sort(x, dim=-1).values


def test_unsupported_ops_are_named_with_their_module():
    with torch.device("meta"):
        m = Sorting()
    with pytest.raises(apar.UnsupportedOp) as err:
        apar.capture(m, (torch.zeros(2, 8, dtype=torch.long),))
    assert any(op.startswith("aten.sort") for op, _, _ in err.value.ops)
    assert "aten.sort" in str(err.value)


def test_module_with_weights_is_not_modified():
    m = Tiny(layers=1)
    before = m.embed.weight.device
    c = apar.capture(m, (torch.zeros(1, 8, dtype=torch.long),))
    assert m.embed.weight.device == before and m.embed.weight.dtype == torch.float32
    assert c.params == sum(p.numel() for p in m.parameters())
