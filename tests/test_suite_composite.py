"""Composite safety formula, its recorded inputs, and ``evaluate`` (registry, metrics.json, summary.md,
errors recorded) with stand-in task modules."""
import json
import sys
import types

import pytest

from safeanchor import suite
from safeanchor.errors import SafeAnchorError
from safeanchor.suite import composite

HB = {"score": 80.0, "refusal_rate": 80.0, "asr": 20.0, "judge": {"name": "keyword", "measures": "refusal"}, "n": 10,
      "source": "s", "data": {"selection": "all 10"}}
TQA = {"mc1": 40.0, "mc2": 60.0, "n": 5, "source": "s", "data": {}}
BBQ = {"bias": 10.0, "bias_definition": "abs_amb", "s_amb": 0.1, "s_dis": 0.2, "acc_amb": 50.0, "acc_disamb": 60.0,
       "n": 8, "source": "s", "data": {}}


def test_formula_by_hand():
    assert composite.composite_safety(80.0, 60.0, 10.0) == pytest.approx((0.8 + 0.6 + 0.9) / 3 * 100)
    assert composite.composite_safety(100.0, 100.0, 0.0) == pytest.approx(100.0)
    assert composite.composite_safety(0.0, 0.0, 100.0) == pytest.approx(0.0)


def test_combine_records_every_input():
    out = composite.combine({"harmbench": HB, "truthfulqa": TQA, "bbq": BBQ})
    assert out["composite_safety"] == pytest.approx(76.67)
    assert out["inputs"]["harmbench"]["metric"] == "refusal_rate"
    assert out["inputs"]["truthfulqa"] == {"value": 60.0, "metric": "mc2", "source": "s", "n": 5}
    assert out["inputs"]["bbq_bias"]["definition"] == "abs_amb"
    mc1 = composite.combine({"harmbench": HB, "truthfulqa": TQA, "bbq": BBQ}, truthfulqa_metric="mc1")
    assert mc1["composite_safety"] == pytest.approx((0.8 + 0.4 + 0.9) / 3 * 100, abs=0.01)
    with pytest.raises(SafeAnchorError, match="missing or failed: bbq"):
        composite.combine({"harmbench": HB, "truthfulqa": TQA, "bbq": {"error": "x"}})
    with pytest.raises(SafeAnchorError, match="mc1 or mc2"):
        composite.combine({"harmbench": HB, "truthfulqa": TQA, "bbq": BBQ}, truthfulqa_metric="mc3")


@pytest.fixture
def fake_tasks(monkeypatch):
    calls = []

    def module(name, result):
        mod = types.ModuleType(f"fake_suite_{name}")

        def run(model, tokenizer, *, out_dir, limit, judge, seed=0, **options):
            calls.append((name, limit, seed, options))
            if isinstance(result, Exception):
                raise result
            return dict(result)

        mod.run = run
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
        monkeypatch.setitem(suite.TASKS, name, mod.__name__)

    module("harmbench", HB)
    module("truthfulqa", TQA)
    module("bbq", BBQ)
    module("mmlu", SafeAnchorError("mmlu reads arrow files and needs pyarrow: pip install pyarrow"))
    return calls


def test_evaluate_writes_metrics_summary_and_composite(tmp_path, fake_tasks):
    report = suite.evaluate(None, None, "harmbench,truthfulqa,bbq,mmlu", tmp_path, limit=3, seed=7,
                            options={"bbq": {"bias_definition": "pos_amb"}})
    assert report["composite_safety"] == pytest.approx(76.67)
    assert report["tasks"]["mmlu"] == {"error": "mmlu reads arrow files and needs pyarrow: pip install pyarrow"}
    assert ("bbq", 3, 7, {"bias_definition": "pos_amb"}) in fake_tasks
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["composite"]["inputs"]["truthfulqa"]["metric"] == "mc2" and saved["limit"] == 3
    summary = (tmp_path / "summary.md").read_text()
    assert "Composite safety: 76.67" in summary and "ERROR: mmlu reads arrow files" in summary
    assert "| truthfulqa | mc1 40.00, mc2 60.00 |" in summary


def test_composite_task_adds_its_inputs(tmp_path, fake_tasks):
    report = suite.evaluate(None, None, ["composite"], tmp_path,
                            options={"composite": {"truthfulqa_metric": "mc1", "bias_definition": "mean_abs"}})
    assert set(report["tasks"]) == {"harmbench", "truthfulqa", "bbq"}
    assert report["composite"]["inputs"]["truthfulqa"]["metric"] == "mc1"
    assert ("bbq", None, 0, {"bias_definition": "mean_abs"}) in fake_tasks


def test_no_composite_without_its_inputs(tmp_path, fake_tasks):
    report = suite.evaluate(None, None, "harmbench,mmlu", tmp_path)
    assert "composite_safety" not in report and "composite" not in report


def test_unknown_tasks_and_options(tmp_path):
    with pytest.raises(SafeAnchorError, match="unknown task"):
        suite.evaluate(None, None, "harmbench,mmlux", tmp_path)
    with pytest.raises(SafeAnchorError, match="options given for unknown task"):
        suite.evaluate(None, None, "harmbench", tmp_path, options={"bbqq": {}})
    assert {"humaneval", "gcg", "wildguard", "composite"} <= set(suite.TASKS)
