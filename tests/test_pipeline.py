"""End to end on the smoke preset: 3 domains, results contract, resume after a kill, determinism."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safeanchor.config import load_config
from safeanchor.pipeline import run


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    results = run(load_config("smoke"), out, progress=lambda *_: None)
    return out, results


def test_results_contract(smoke_run):
    out, res = smoke_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert res["method"] == "standard" and res["model"] == "tiny-random" and res["seed"] == 0
    assert res["domains"] == ["tiny-arith", "tiny-reverse", "tiny-upper"]
    assert [s["after"] for s in res["steps"]] == ["base", "tiny-arith", "tiny-reverse", "tiny-upper"]
    for s in res["steps"]:
        assert 0 <= s["refusal_rate"] <= 100 and 0 <= s["over_refusal_rate"] <= 100
        assert set(s["domain_scores"]) == set(res["domains"])
    assert res["steps"][0]["adapter"] is None
    assert (out / res["base_model_dir"] / "config.json").exists()
    assert (out / "results.md").read_text().count("\n| ") >= 5 and (out / "refusal.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["versions"]["torch"] == torch.__version__


def test_adapters_are_standard_peft(smoke_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, res = smoke_run
    base = AutoModelForCausalLM.from_pretrained(out / res["base_model_dir"])
    model = PeftModel.from_pretrained(base, out / res["steps"][-1]["adapter"])
    state = torch.load(out / "state" / "stage3.pt", weights_only=False)["lora"]
    got = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert set(got) == set(state)
    for n, p in got.items():
        torch.testing.assert_close(p, state[n])


def test_training_moved_the_domain_score(smoke_run):
    _, res = smoke_run
    first = res["steps"][1]
    assert first["train"]["final_loss"] < first["train"]["first_loss"]


def test_rerun_is_a_no_op_and_config_mismatch_is_refused(smoke_run):
    out, res = smoke_run
    again = run(load_config("smoke"), out, progress=lambda *_: None)
    assert again["steps"] == json.loads(json.dumps(res))["steps"]
    from safeanchor.errors import SafeAnchorError

    with pytest.raises(SafeAnchorError, match="different config"):
        run(load_config("smoke", overrides={"train.lr": 0.5}), out, progress=lambda *_: None)


def _cli(out, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "safeanchor.cli", "run", "--preset", "smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env)


@pytest.mark.parametrize("crash_at", ["2:3", "3:4"])
def test_killed_run_resumes_to_identical_results(smoke_run, tmp_path, crash_at):
    """Kill mid-domain (after step 3 of domain 2: between checkpoints; or right at a domain's end),
    restart with the same command: the final results equal the uninterrupted run's."""
    _, reference = smoke_run
    out = tmp_path / "run"
    first = _cli(out, {"SAFEANCHOR_TEST_CRASH_AT": crash_at})
    assert first.returncode == 137, first.stderr[-2000:]
    done_before = json.loads((out / "results.json").read_text())["steps"]
    assert len(done_before) < 4
    second = _cli(out)
    assert second.returncode == 0, second.stderr[-2000:]
    resumed = json.loads((out / "results.json").read_text())

    def strip(steps):
        return [{k: v for k, v in s.items() if k not in ("eval_seconds", "train")} |
                {"train": {k: v for k, v in s.get("train", {}).items() if k not in ("seconds", "method_seconds")}}
                for s in steps]

    assert strip(resumed["steps"]) == strip(json.loads(json.dumps(reference["steps"])))
    assert not list((out / "checkpoints").glob("*.pt"))


def test_suite_tasks_after_every_step(tmp_path):
    """eval.tasks runs the evaluation suite after the base and every domain, into results.json."""
    cfg = load_config("smoke", overrides={"eval.tasks": ["harmbench"], "eval.task_limit": 3,
                                          "data.domains": ["tiny-arith"]})
    res = run(cfg, tmp_path / "run", progress=lambda *_: None)
    for step in res["steps"]:
        assert "harmbench" in step["suite"] and "error" not in step["suite"]["harmbench"]
    assert (tmp_path / "run" / "suite" / "1-tiny-arith" / "metrics.json").exists()
