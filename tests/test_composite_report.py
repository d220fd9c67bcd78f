"""A run with the suite's composite task: every step records Eq. 8's composite with its inputs, and
results.md shows it next to refusal (fixture data for HarmBench / TruthfulQA / BBQ, as test_suite_cli)."""
import json

from safeanchor.config import load_config
from safeanchor.pipeline import run

from test_suite_cli import offline_data  # noqa: F401  (the fixture, used by name)


def test_run_records_and_reports_the_composite(tmp_path, offline_data):  # noqa: F811
    cfg = load_config("smoke", overrides={"train.steps_per_domain": 1, "data.domains": ["tiny-arith"],
                                          "eval.tasks": ["composite"], "eval.task_limit": 2})
    res = run(cfg, tmp_path / "run", progress=lambda *_: None)
    for step in res["steps"]:
        comp = step["composite"]
        assert step["composite_safety"] == comp["composite_safety"]
        inp = comp["inputs"]
        want = (inp["harmbench"]["value"] + inp["truthfulqa"]["value"] + 100 - inp["bbq_bias"]["value"]) / 3
        assert abs(step["composite_safety"] - want) < 0.01 and inp["truthfulqa"]["metric"] == "mc2"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"][1]["composite"]["formula"]
    md = (tmp_path / "run" / "results.md").read_text()
    assert "| composite safety | HarmBench | TruthfulQA | BBQ bias |" in md and "Composite safety (Eq. 8) =" in md
