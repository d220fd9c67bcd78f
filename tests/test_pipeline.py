"""End to end on the smoke preset: 3 domains, results contract, resume after a kill, determinism."""
import json
import os
import subprocess
import sys

import pytest
import torch

from safeanchor.config import load_config
from safeanchor.methods import METHODS, load_all
from safeanchor.methods.vaccine import VACCINE_STREAM
from safeanchor.pipeline import run

load_all()
VACCINE_MERGE_REINIT = {"method_options.vaccine.merge": True, "train.reinit_adapter_per_domain": True}
# every registered method, plus Vaccine with merge + reinit (its adapter must also carry the merged vaccination)
EVERY_METHOD = [(m, None) for m in sorted(METHODS)] + [("vaccine", VACCINE_MERGE_REINIT)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """method -> (run dir, results) of an uninterrupted smoke run, made once per module."""
    runs = {}

    def get(method: str, overrides: dict | None = None):
        key = (method, json.dumps(overrides, sort_keys=True))
        if key not in runs:
            out = tmp_path_factory.mktemp(method) / "run"
            cfg = load_config("smoke", overrides={"method": method, **(overrides or {})})
            runs[key] = out, run(cfg, out, progress=lambda *_: None)
        return runs[key]

    return get


@pytest.fixture(scope="module")
def smoke_run(reference_run):
    return reference_run("standard")


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
    state = torch.load(out / "state" / "stage3.pt", weights_only=False)["params"]
    got = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert set(got) == set(state)
    for n, p in got.items():
        torch.testing.assert_close(p, state[n])


@pytest.mark.parametrize("method, overrides", EVERY_METHOD)
def test_adapter_dir_is_the_model_after_each_step(reference_run, method, overrides):
    """results.json's contract for every method: PeftModel.from_pretrained(base_model, step's adapter) gives
    the model after that step (rebuilt here from the run's resume state, as a resumed run would)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from safeanchor.methods import get_method
    from safeanchor.models import attach_lora, load_model
    from safeanchor.checkpoint import load_checkpoint
    from safeanchor.train import Context

    out, res = reference_run(method, overrides)
    cfg = load_config("smoke", overrides={"method": method, **(overrides or {})})
    ids = torch.randint(0, 259, (2, 15))
    for t, step in enumerate(res["steps"][1:], start=1):
        model, tok = load_model(cfg.model, path=str(out / res["base_model_dir"]))
        ctx = Context(cfg=cfg, model=attach_lora(model, cfg.lora), tokenizer=tok, run_dir=out,
                      method=get_method(method, cfg.method_options.get(method)))
        load_checkpoint(out / "state" / f"stage{t}.pt", ctx)
        base = AutoModelForCausalLM.from_pretrained(out / res["base_model_dir"])
        loaded = PeftModel.from_pretrained(base, out / step["adapter"]).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, ctx.model.eval()(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)


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


def _cli(out, method, overrides=None, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    sets = [a for k, v in (overrides or {}).items() for a in ("--set", f"{k}={json.dumps(v)}")]
    return subprocess.run([sys.executable, "-m", "safeanchor.cli", "run", "--preset", "smoke", "--method", method,
                           *sets, "--out", str(out)], capture_output=True, text=True, env=env)


# methods resumed through train_steps there instead (test_baselines_a.py: test_resume_after_a_kill_reproduces_the_run)
RESUMED_IN_BASELINES_A = {"ewc", "safegrad", "interleave"}
# extra crash points where a method has state that a plain mid-domain kill would not reach
RESUME_EXTRA = [("standard", "3:4", None), ("olora", "3:4", None), ("safelora", "1:4", None),
                ("vaccine", f"{VACCINE_STREAM}:3", None), ("vaccine", "2:3", VACCINE_MERGE_REINIT),
                ("safeanchor", "3:4", None)]
# every registered method is killed mid-domain 2 (a new method is covered without editing this file)
RESUME = [(m, "2:3", None) for m in sorted(METHODS) if m not in RESUMED_IN_BASELINES_A] + RESUME_EXTRA


def test_every_method_has_a_resume_test():
    missing = set(METHODS) - {m for m, _, _ in RESUME} - RESUMED_IN_BASELINES_A
    assert not missing, f"no kill-and-resume test for {sorted(missing)}"


@pytest.mark.parametrize("method, crash_at, overrides", RESUME)
def test_killed_run_resumes_to_identical_results(reference_run, tmp_path, method, crash_at, overrides):
    """Kill mid-domain (after step 3 of domain 2: between checkpoints; right at a domain's end, before
    its after_domain; inside Vaccine's vaccination), restart with the same command: the final results
    equal the uninterrupted run's."""
    _, reference = reference_run(method, overrides)
    out = tmp_path / "run"
    first = _cli(out, method, overrides, {"SAFEANCHOR_TEST_CRASH_AT": crash_at})
    assert first.returncode == 137, first.stderr[-2000:]
    done_before = json.loads((out / "results.json").read_text())["steps"]
    assert len(done_before) < 4
    second = _cli(out, method, overrides)
    assert second.returncode == 0, second.stderr[-2000:]
    resumed = json.loads((out / "results.json").read_text())

    def strip(steps):
        return [{k: v for k, v in s.items() if k not in ("eval_seconds", "train")} |
                {"train": {k: v for k, v in s.get("train", {}).items()
                           if k not in ("seconds", "method_seconds", "method_seconds_by_part")}}
                for s in steps]

    assert strip(resumed["steps"]) == strip(json.loads(json.dumps(reference["steps"])))
    prepare = {k: v for k, v in reference["prepare"].items() if k != "seconds"}
    assert {k: v for k, v in resumed["prepare"].items() if k != "seconds"} == json.loads(json.dumps(prepare))
    assert not list((out / "checkpoints").glob("*.pt"))


def test_suite_tasks_after_every_step(tmp_path):
    """eval.tasks runs the evaluation suite after the base and every domain, into results.json."""
    cfg = load_config("smoke", overrides={"eval.tasks": ["harmbench"], "eval.task_limit": 3,
                                          "data.domains": ["tiny-arith"]})
    res = run(cfg, tmp_path / "run", progress=lambda *_: None)
    for step in res["steps"]:
        assert "harmbench" in step["suite"] and "error" not in step["suite"]["harmbench"]
    assert (tmp_path / "run" / "suite" / "1-tiny-arith" / "metrics.json").exists()


def test_base_generations_are_reused_by_the_next_run(tmp_path, monkeypatch, generated):
    """A second run on the same aligned base (another method's seed) generates none of the base's completions
    again: its step-0 numbers and generations equal the first run's, s_0 too, and the prompts it generates are
    fewer by at least the probe, benign and monitor prompts. eval.base_cache: false leaves no cache."""
    import safeanchor.align as align
    from safeanchor.data.splits import safety_sets

    monkeypatch.setattr(align, "aligned_dir", lambda cfg: tmp_path / "aligned" / align._key(cfg))
    align.ensure_aligned(load_config("smoke"), progress=lambda *_: None)  # the alignment stage's own generations
    generated.clear()
    over = {"data.domains": ["tiny-arith"], "train.steps_per_domain": 2,
            "method_options.safeanchor.repair_lookalikes": 8}
    quiet = lambda *_: None  # noqa: E731
    first = run(load_config("smoke", overrides={**over, "method": "safeanchor"}), tmp_path / "a", progress=quiet)
    n_first = sum(map(len, generated))
    train = first["steps"][1]["train"]  # where SafeAnchor's after-domain time went: CSM, then the refresh
    assert set(train["method_seconds_by_part"]) == {"csm", "refresh"} and "seconds" not in first["steps"][1]["method"]
    assert 0 < sum(train["method_seconds_by_part"].values()) <= train["method_seconds"] + 0.1, train
    generated.clear()
    second = run(load_config("smoke", overrides={**over, "method": "safeanchor", "seed": 1}), tmp_path / "b",
                 progress=quiet)
    n_second = sum(map(len, generated))
    assert first["steps"][0] == {**second["steps"][0], "eval_seconds": first["steps"][0]["eval_seconds"]}
    assert (tmp_path / "a/generations/0-base.jsonl").read_text() == (tmp_path / "b/generations/0-base.jsonl").read_text()
    assert first["prepare"]["s0"] == second["prepare"]["s0"]
    cfg = load_config("smoke")
    n_monitor = len(safety_sets(cfg)[1])
    assert n_first - n_second >= cfg.eval.probe_size + cfg.eval.benign_size + n_monitor, (n_first, n_second)
    cache = tmp_path / "aligned" / align._key(cfg) / "generation_cache"
    assert list(cache.glob("generations-*.json"))
    for f in cache.iterdir():
        f.unlink()
    third = run(load_config("smoke", overrides={**over, "method": "standard", "eval.base_cache": False}),
                tmp_path / "c", progress=quiet)
    assert not list(cache.iterdir())
    assert "method_seconds_by_part" not in third["steps"][1]["train"]  # a method with no after-domain parts


def test_a_changed_alignment_artifact_is_merged_again(tmp_path, monkeypatch):
    """The merged base is rebuilt when the artifact's adapter checksum differs from the one it was merged
    from (a new release), and its generation cache goes with it."""
    import json as _json

    from safetensors.torch import load_file, save_file

    import safeanchor.align as align

    monkeypatch.setattr(align, "aligned_dir", lambda cfg: tmp_path / "aligned" / align._key(cfg))
    art = align.export_artifact(load_config("smoke"), tmp_path / "artifact", "test")
    cfg = load_config("smoke", overrides={"align.artifact": str(art)})
    base = align.ensure_aligned(cfg, progress=lambda *_: None)
    (base / "generation_cache").mkdir()
    (base / "generation_cache" / "generations-x.json").write_text("{}")
    assert align.ensure_aligned(cfg, progress=lambda *_: None) == base
    assert (base / "generation_cache" / "generations-x.json").exists()  # unchanged artifact: kept
    weights = art / "adapter_model.safetensors"
    tensors = {k: v + 0.01 for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    meta = _json.loads((art / "ARTIFACT.json").read_text())
    meta["adapter_sha256"] = align._sha256_dir(art)
    (art / "ARTIFACT.json").write_text(_json.dumps(meta))
    said = []
    assert align.ensure_aligned(cfg, progress=said.append) == base
    assert not (base / "generation_cache").exists() and any("changed" in s for s in said)
    assert _json.loads((base / "ALIGNMENT.json").read_text())["adapter_sha256"] == meta["adapter_sha256"]
