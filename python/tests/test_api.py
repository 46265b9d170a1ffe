"""The Python API over the Rust library: plans, evaluations, errors, exports,
calibration and progress."""

import csv
import json
import os

import pytest

import apar

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_plan_of_a_zoo_model_is_the_reference_scenario():
    p = apar.plan("llama2-13b", "moai-4xlarge", global_batch=64, seq=1024)
    c = p.config
    assert c.dp * c.tp * c.pp * c.cp == 32
    assert c.dp * c.micro_batch * c.num_micro_batches == 64
    assert p.memory.peak_bytes <= p.memory.budget_bytes
    # The reference platform's 0.8 of the MoAI flavor's usable 68,702,699,520 bytes.
    assert p.memory.budget_bytes == int(0.8 * 68702699520)
    assert p.search is not None and p.search.candidates >= p.search.feasible > 0
    assert "[info] The number of candidates is" in p.log
    assert "Configuration for parallelism is selected." in p.log
    assert repr(p).startswith("Plan(dp ")
    # The plan round-trips through its JSON.
    again = apar.Plan.from_json(json.loads(p.to_json()))
    assert again.config == p.config and again.step_time_s == p.step_time_s


def test_pins_reach_the_search():
    p = apar.plan("llama2-13b", "moai-4xlarge", global_batch=64, seq=1024, tp=2, zero=1)
    assert p.config.tp == 2 and p.config.zero == 1


def test_out_of_memory_carries_the_report():
    with pytest.raises(apar.OutOfMemory) as err:
        apar.plan("llama2-13b", "mi250-gcd:1", global_batch=64, seq=1024, dp=8, zero=0, recompute="none")
    r = err.value.report
    assert isinstance(r, apar.OomReport)
    assert r.requested_bytes > r.available_bytes
    assert r.config.dp == 8 and r.config.zero == 0
    assert r.suggestions and all(s.peak_bytes <= r.available_bytes for s in r.suggestions if s.peak_bytes)
    assert "OUT_OF_MEMORY" in str(err.value)
    assert err.value.kind == "out_of_memory"


@pytest.mark.parametrize(
    "kwargs, cls, kind",
    [
        (dict(tp=3), apar.ConfigError, "empty_space"),
        (dict(engine="nope"), apar.ConfigError, "bad_json"),
        (dict(foo=1), apar.ConfigError, "options"),
        (dict(memory_ratio=1.5), apar.ConfigError, "compile"),
    ],
)
def test_errors_are_typed(kwargs, cls, kind):
    with pytest.raises(cls) as err:
        apar.plan("llama2-13b", "mi250-gcd:1", global_batch=64, seq=1024, **kwargs)
    assert err.value.kind == kind


def test_bad_model_and_cluster():
    with pytest.raises(apar.ModelError):
        apar.plan("/nonexistent/config.json", "mi250-gcd:1", global_batch=8, seq=128)
    with pytest.raises(apar.ConfigError) as err:
        apar.plan("tiny-gpt", "no-such-cluster:1", global_batch=8, seq=128)
    assert err.value.kind == "cluster"
    with pytest.raises(apar.GraphError):
        apar.plan({"name": "g", "ops": [{"op": {"op": "gelu"}, "inputs": [7], "results": [], "block": "embed", "phase": "fwd"}]},
                  "mi250-gcd:1", global_batch=8, seq=128)


def test_evaluate_a_given_configuration():
    best = apar.plan("tiny-gpt", "dgx-a100-80g:1", global_batch=128, seq=16)
    e = apar.evaluate("tiny-gpt", "dgx-a100-80g:1", best.config, global_batch=128, seq=16)
    assert e.config == best.config and e.step_time_s == best.step_time_s
    e2 = apar.evaluate("tiny-gpt", "dgx-a100-80g:1", {"dp": 2, "tp": 2, "pp": 2, "micro_batch": 4},
                       global_batch=128, seq=16)
    assert (e2.config.dp, e2.config.tp, e2.config.pp) == (2, 2, 2)
    assert e2.config.num_micro_batches == 128 // (2 * 4)
    assert e2.search is None


def test_exports():
    p = apar.plan("llama2-7b", "dgx-a100-80g:2", global_batch=64, seq=2048)
    for engine in ["megatron", "deepspeed", "torchtitan", "hf"]:
        try:
            e = p.export_for(engine)
        except apar.ExportError as err:
            assert err.message
            continue
        assert e.engine == engine and e.text
    m = p.export_for("megatron")
    assert f"--tensor-model-parallel-size {p.config.tp}" in m.text


def test_progress_reports_every_candidate():
    calls = []
    p = apar.plan("llama2-13b", "moai-4xlarge", global_batch=64, seq=1024, progress=lambda d, t: calls.append((d, t)))
    assert calls, "no progress reported"
    total = calls[0][1]
    assert total > 0 and all(t == total for _, t in calls)
    assert max(d for d, _ in calls) == total
    # Reports are throttled to one per percent (workers report out of order, so the
    # percentages are distinct, not necessarily in order).
    pct = [d * 100 // t for d, t in calls]
    assert len(pct) == len(set(pct)) <= 100
    assert p.search.candidates >= 1


def test_calibrate_recovers_a_known_matmul_efficiency(tmp_path):
    # Runs priced by apar with a known calibration, then fitted from the built-in one.
    with open(os.path.join(ROOT, "calibration", "a100.json")) as f:
        truth = json.load(f)
    truth["matmul"] = round(truth["matmul"] * 0.9, 6)
    rows = []
    for dp, tp, pp, b in [(8, 1, 1, 4), (4, 2, 1, 4), (2, 2, 2, 2), (2, 4, 1, 8)]:
        e = apar.evaluate("gpt2", "dgx-a100-80g:1", {"dp": dp, "tp": tp, "pp": pp, "micro_batch": b},
                          global_batch=64, seq=1024, calibration=truth)
        rows.append(dict(model="gpt2", cluster="dgx-a100-80g:1", seq=1024, global_batch=64, dp=dp, tp=tp, pp=pp,
                         micro_batch=b, sp="false", recompute="none", zero=0, schedule="1f1b",
                         step_time_s=e.step_time_s))
    path = tmp_path / "runs.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fit = apar.calibrate(str(path), "matmul")
    assert isinstance(fit, apar.Fit)
    assert abs(fit.calibration["matmul"] - truth["matmul"]) < 0.01
    assert fit.rms_log_error < 0.01
    assert "matmul" in repr(fit)


def test_listings():
    assert "moai-4xlarge" in apar.clusters()
    assert "llama2-13b" in apar.models()


def test_progress_bar_draws_on_a_terminal_only():
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, log = Tty(), io.StringIO()
    for stream in (tty, log):
        bar = apar.ProgressBar(stream=stream, delay_s=0.0)
        for d in range(1, 5):
            bar(d, 4)
    assert "4/4" in tty.getvalue() and tty.getvalue().endswith("\n")
    assert log.getvalue() == ""


def test_malformed_documents_raise_typed_errors_not_panics():
    from apar import _apar

    with pytest.raises(apar.ConfigError):
        _apar.plan("tiny-gpt", "dgx-a100-80g:1", 16, 128, "not json")
    with pytest.raises(apar.ConfigError):
        _apar.plan("tiny-gpt", "dgx-a100-80g:1", 16, 128, '{"search": {"constraints": {"tp": "two"}}}')
    with pytest.raises(apar.ConfigError):
        _apar.export("{}")
    with pytest.raises(apar.ConfigError):
        _apar.plan_log('{"config": 3}')
    with pytest.raises(apar.GraphError):
        _apar.check_graph("[]")
    with pytest.raises(apar.GraphError):
        _apar.plan("g", "dgx-a100-80g:1", 16, 128, "{}", '{"name": "g", "ops": [{"op": {"op": "nope"}}]}')
    with pytest.raises(apar.ConfigError):
        _apar.evaluate("tiny-gpt", "dgx-a100-80g:1", 16, 128, '{"dp": 1}')
    with pytest.raises(apar.ConfigError):
        _apar.plan("tiny-gpt", "dgx-a100-80g:1", 0, 128)
    with pytest.raises(apar.ConfigError):
        apar.calibrate("/nonexistent/runs.csv", "matmul")


@pytest.mark.parametrize("value", [-1, 0, 2**64, 64.5, "64"])
def test_counts_are_checked_before_the_core(value):
    with pytest.raises(apar.ConfigError):
        apar.plan("tiny-gpt", cluster="dgx-a100-80g:1", global_batch=value, seq=128,
                  progress=False)


def test_unknown_configuration_fields_are_refused():
    with pytest.raises(apar.ConfigError) as e:
        apar.evaluate("tiny-gpt", "dgx-a100-80g:1", dict(dp=8, tp=1, pp=1, micro_batch=1, foo=3),
                      global_batch=16, seq=128)
    assert "foo" in str(e.value)


def test_expert_parallel_pins_and_default_expert_tensor_degree():
    # The CLI's `eval` takes etp = tp for a mixture-of-experts model (Megatron-LM's
    # default); so does evaluate, and `ep` pins the search.
    cfg = dict(dp=4, tp=2, pp=2, ep=4, micro_batch=1, sp=True, recompute="full", zero=1)
    p = apar.evaluate("mixtral-8x7b", "dgx-h100:2", cfg, global_batch=64, seq=4096)
    assert p.config.etp == 2 and "etp 2" in str(p.config)
    q = apar.plan("mixtral-8x7b", cluster="dgx-h100:2", global_batch=64, seq=4096, ep=2,
                  progress=False)
    assert q.config.ep == 2
    # A plan's configuration with etp 1 beside tp 2 (its JSON leaves etp out) evaluates
    # as itself, not at the default etp = tp.
    r = apar.evaluate("mixtral-8x7b", "dgx-h100:2", dict(cfg, ep=1, etp=1), global_batch=64,
                      seq=4096, layers=2)
    assert r.config.etp == 1 and "etp" not in r.config.raw
    s = apar.evaluate("mixtral-8x7b", "dgx-h100:2", r.config, global_batch=64, seq=4096,
                      layers=2)
    assert s.config.etp == 1 and s.step_time_s == r.step_time_s
