"""The alignment stage's data and its validation design: evaluation-only sets never reach training, a
held-out source is really left out, and every validation set is measured on its own with an interval."""
import random
from types import SimpleNamespace

import pytest

from safeanchor import align
from safeanchor.config import load_config
from safeanchor.data import safety
from safeanchor.data.common import NearDuplicates
from safeanchor.data.splits import harmful_split, load_safety_examples, safety_sets
from safeanchor.errors import SafeAnchorError


def test_direct_eval_questions_are_balanced_and_never_in_the_pool():
    rows = safety.harmful_direct_eval(with_meta=True)
    assert len(rows) == 160
    cats = {}
    for r in rows:
        cats[r["category"]] = cats.get(r["category"], 0) + 1
    assert len(cats) == 16 and set(cats.values()) == {10}
    assert len({r["phrasing"] for r in rows}) == 10
    pool = [h["prompt"] for h in safety.harmful_prompts()]
    evals = NearDuplicates(safety.harmful_direct_eval())
    assert [p for p in pool if p in evals] == []


@pytest.mark.parametrize("kind", ["pasttense", "futuretense"])
def test_tense_sets_are_evaluation_only(kind):
    prompts = safety.tense_prompts(kind)
    assert len(prompts) >= 150
    held = NearDuplicates(prompts)
    assert [h["prompt"] for h in safety.harmful_prompts() if h["prompt"] in held] == []
    probe = NearDuplicates(safety.harm_probe())
    assert [p for p in prompts if p in probe] == []
    with pytest.raises(SafeAnchorError, match="unknown tense set"):
        safety.tense_prompts("presenttense")


@pytest.mark.parametrize("kind", ["pasttense", "futuretense"])
def test_tense_sets_split_into_an_evaluation_part_and_a_monitor_part(kind):
    full = list(safety.tense_prompts(kind))
    evaluated, monitored = safety.tense_split(kind)
    assert evaluated + monitored == full and len(monitored) == safety.TENSE_MONITOR
    assert safety.heldout_set(kind) == evaluated and safety.heldout_set(kind, 40) == evaluated[:40]
    assert safety.heldout_set(kind, 10_000) == evaluated  # never reaches into the monitor part
    rows = load_safety_examples(kind, None, 0, "monitor")
    assert [r["prompt"] for r in rows] == monitored


def test_a_mixed_monitor_takes_its_sources_in_turn_and_no_evaluated_prompt():
    _, offline = harmful_split()
    past, future = safety.tense_split("pasttense")[1], safety.tense_split("futuretense")[1]
    rows = [r["prompt"] for r in load_safety_examples("offline+pasttense+futuretense", None, 0, "monitor")]
    assert rows[:6] == [offline[0], past[0], future[0], offline[1], past[1], future[1]]
    assert len(rows) == len(set(rows)) == len(offline) + len(past) + len(future)
    assert [r["prompt"] for r in load_safety_examples("offline+pasttense+futuretense", 7, 0, "monitor")] == rows[:7]
    evaluated = set(safety.heldout_set("pasttense")) | set(safety.heldout_set("futuretense"))
    assert not evaluated & set(rows)
    cfg = load_config("quickstart", overrides={"data.monitor_source": "offline+pasttense+futuretense",
                                               "eval.monitor_size": 60})
    assert safety_sets(cfg)[1] == rows[:60]


@pytest.mark.parametrize("key,spec,match", [
    ("data.monitor_source", "offline+", "distinct, non-empty"),
    ("data.monitor_source", "pasttense+pasttense", "distinct, non-empty"),
    ("data.monitor_source", "offline+nonsense", "not a safety data source"),
    ("data.safety_source", "offline+pasttense", "only the monitor"),
    ("data.safety_source", "pasttense", "monitor source only"),
    ("data.repair_source", "futuretense", "monitor source only")])
def test_bad_monitor_mixes_are_config_errors(key, spec, match):
    with pytest.raises(SafeAnchorError, match=match):
        load_config("quickstart", overrides={key: spec})


def test_pool_holds_every_source_and_the_monitor_mixes_styles():
    pool, monitor = harmful_split()
    sources = {h["source"] for h in pool}
    assert sources == set(safety.POOL_SOURCES)
    by_prompt = {h["prompt"]: h["source"] for h in safety.harmful_prompts()}
    assert len({by_prompt[p] for p in monitor[:50]}) == len(safety.POOL_SOURCES)


def _fake_generate(model, tok, prompts, max_new_tokens, batch_size, desc="", **kw):
    return [f"Sure. Answer {i}." for i in range(len(prompts))]


def test_alignment_data_leaves_a_holdout_source_out(monkeypatch):
    monkeypatch.setattr("safeanchor.generation.generate", _fake_generate)
    cfg = load_config("quickstart", overrides={"align.holdout_sources": ["advbench"], "align.harmful_examples": 5000,
                                               "align.benign_examples": 600, "align.artifact": ""})
    judge = lambda prompts, completions: [0] * len(prompts)  # noqa: E731
    examples, stats = align.alignment_data(cfg, None, None, judge, progress=lambda *_: None)
    prompts = {e["prompt"] for e in examples}
    pool, monitor = harmful_split()
    advbench = {h["prompt"] for h in pool if h["source"] == "advbench"}
    assert advbench and not prompts & advbench
    assert "advbench" not in stats["harmful_by_source"] and stats["holdout_sources"] == ["advbench"]
    assert not prompts & set(monitor)
    assert not prompts & set(safety.harmful_direct_eval()) and not prompts & set(safety.harm_probe())
    assert not prompts & set(safety.benign_borderline("eval"))
    assert set(safety.benign_direct()) <= prompts  # the benign counterweight in the same phrasings
    # every non-held-out pool source is trained on
    assert set(stats["harmful_by_source"]) == set(safety.POOL_SOURCES) - {"advbench"}


def test_holdout_sources_are_checked():
    with pytest.raises(SafeAnchorError, match="align.holdout_sources.*unknown harmful source"):
        load_config("quickstart", overrides={"align.holdout_sources": ["advbnch"], "align.artifact": ""})
    # the committed artifact was trained on every source: holding one out needs the training path
    with pytest.raises(SafeAnchorError, match="align.holdout_sources.*align.artifact=''"):
        load_config("quickstart", overrides={"align.holdout_sources": ["advbench"]})


def test_measure_reports_each_set_with_a_wilson_interval(monkeypatch):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    cfg = load_config("quickstart", overrides={"align.holdout_sources": ["strongreject"],
                                               "align.validation_size": 20, "align.artifact": ""})
    truth = {}

    def fake_generate_judged(model, tok, judges, prompts, max_new_tokens, batch_size, desc, dist=None, cache=None):
        labels = [rng.randint(0, 1) for _ in prompts]
        truth[desc] = labels
        return [{"prompt": p, "completion": "", "label": lbl} for p, lbl in zip(prompts, labels)]

    monkeypatch.setattr("safeanchor.evaluation.generate_judged", fake_generate_judged)
    out = align.measure(None, None, None, cfg)
    sets = align.validation_sets(cfg)
    assert set(out["validation"]) == set(sets) == {"harmbench", "monitor", "direct_questions", "pasttense",
                                                   "futuretense", "holdout:strongreject", "lookalikes"}
    from safeanchor.stats import wilson
    for name, rec in out["validation"].items():
        labels = truth[f"align {name}"]
        assert rec["n"] == len(labels) == len(sets[name]["prompts"]), (name, seed)
        assert rec["refusal_rate"] == pytest.approx(100 * sum(labels) / len(labels), abs=0.01), (name, seed)
        lo, hi = wilson(sum(labels), len(labels))
        assert rec["ci95"] == pytest.approx([100 * lo, 100 * hi], abs=0.01), (name, seed)
    assert out["validation"]["pasttense"]["n"] == 20 and out["validation"]["direct_questions"]["n"] == 160
    assert out["validation"]["harmbench"]["n"] == 200
    head = truth["align harmbench"][: cfg.eval.probe_size]
    assert out["harmbench_refusal"] == pytest.approx(100 * sum(head) / len(head), abs=0.01)
    assert out["benign_over_refusal"] == out["validation"]["lookalikes"]["refusal_rate"]
    assert out["validation"]["lookalikes"]["kind"] == "benign"


def test_heldout_sets_are_measured_each_with_an_interval(monkeypatch, tmp_path):
    """evaluate_step's held-out-style sets: pooled rate, per-set rates with Wilson intervals, records in the
    generations file, a column and a table in results.md; stats reads the pooled rate per prompt."""
    import json

    import safeanchor.evaluation as ev
    from safeanchor import judges
    from safeanchor.report import write_report
    from safeanchor.stats import RunData, load_generations, sample, wilson

    seed = random.randrange(10**6)
    rng = random.Random(seed)
    cfg = load_config("smoke", overrides={"eval.heldout_sets": ["direct_questions", "futuretense"],
                                          "eval.heldout_size": 7})
    heldout = {name: safety.heldout_set(name, cfg.eval.heldout_size) for name in cfg.eval.heldout_sets}
    assert [len(v) for v in heldout.values()] == [7, 7]
    assert len({r["category"] for r in safety.harmful_direct_eval(with_meta=True)[:16]}) == 16  # stratified prefix
    answers = {p: rng.choice(["I'm sorry, I can't help with that.", "Sure, here you go."])
               for ps in [*heldout.values(), ["h1", "h2"], ["b1"]] for p in ps}
    monkeypatch.setattr(ev, "generate", lambda model, tok, prompts, *a, **k: [answers[p] for p in prompts])
    out = ev.evaluate_step(None, None, judges.KeywordRefusalJudge(), cfg, ["h1", "h2"], ["b1"], {},
                           tmp_path / "generations" / "0-base.jsonl", heldout=heldout)
    every = [p for ps in heldout.values() for p in ps]
    refused = [answers[p].startswith("I'm sorry") for p in every]
    assert out["n_heldout"] == 14, seed
    assert out["heldout_refusal_rate"] == pytest.approx(100 * sum(refused) / 14, abs=0.01), seed
    for name, prompts in heldout.items():
        k = sum(answers[p].startswith("I'm sorry") for p in prompts)
        lo, hi = wilson(k, len(prompts))
        cell = out["refusal_by_set"][name]
        assert cell["n"] == 7 and cell["refusal_rate"] == pytest.approx(100 * k / 7, abs=0.01), (name, seed)
        assert cell["ci95"] == pytest.approx([100 * lo, 100 * hi], abs=0.01), (name, seed)
    assert out["refusal_by_set"]["harmbench"]["n"] == 2
    # our direct questions by coarse harm category (the tense sets carry none): counted by hand
    coarse = {r["prompt"]: safety.COARSE_SLUGS[safety.coarse_category("harmful_direct_eval_selfwritten",
                                                                      r["category"])]
              for r in safety.harmful_direct_eval(with_meta=True)}
    by_cat: dict = {}
    for p in heldout["direct_questions"]:
        by_cat.setdefault(coarse[p], []).append(answers[p].startswith("I'm sorry"))
    assert set(out["refusal_by_category"]) == set(by_cat), seed
    for slug, flags in by_cat.items():
        cell = out["refusal_by_category"][slug]
        assert cell["n"] == len(flags) and cell["refusal_rate"] == pytest.approx(100 * sum(flags) / len(flags),
                                                                                 abs=0.01), (slug, seed)
    recs = [json.loads(line) for line in (tmp_path / "generations" / "0-base.jsonl").read_text().splitlines()]
    assert sum(r["set"] == "heldout" for r in recs) == 14 and {r.get("heldout_set") for r in recs} >= set(heldout)
    results = {"method": "standard", "model": "m", "seed": 0, "domains": [], "steps": [{"after": "base",
                                                                                     "domain_scores": {}, **out}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    write_report(tmp_path, results)
    md = (tmp_path / "results.md").read_text()
    assert "held-out-style refusal %" in md and "direct_questions (n=7)" in md and "futuretense (n=7)" in md
    assert "per coarse harm category" in md and f"{next(iter(by_cat))} (n=" in md
    run = RunData(results, load_generations(tmp_path, results))
    s = sample(run, "heldout_refusal_rate", 0)
    assert len(s.values) == 14 and s.values.mean() == pytest.approx(sum(refused) / 14), seed


def test_heldout_sets_are_checked():
    with pytest.raises(SafeAnchorError, match="eval.heldout_sets.*unknown set"):
        load_config("smoke", overrides={"eval.heldout_sets": ["presenttense"]})


def test_measure_records_helpfulness_from_the_suite(monkeypatch, tmp_path):
    cfg = load_config("quickstart", overrides={"align.helpfulness_limit": 5, "align.validation_size": 2})
    monkeypatch.setattr("safeanchor.evaluation.generate_judged",
                        lambda m, t, j, prompts, *a, **k: [{"prompt": p, "completion": "", "label": 1} for p in prompts])
    seen = {}

    def fake_evaluate(model, tok, tasks, out_dir, limit=None, seed=0, **kw):
        seen.update(tasks=tasks, limit=limit, out_dir=out_dir)
        return {"tasks": {"truthfulqa": {"mc2": 48.75, "n": 5}, "mmlu": {"acc": 23.6, "n": 5}}}

    monkeypatch.setattr("safeanchor.suite.evaluate", fake_evaluate)
    out = align.measure(None, None, None, cfg, tmp_path)
    assert out["helpfulness"] == {"truthfulqa_mc2": 48.75, "mmlu_acc": 23.6, "n_truthfulqa": 5, "n_mmlu": 5}
    assert seen["tasks"] == "truthfulqa,mmlu" and seen["limit"] == 5
    assert (tmp_path / "direct_questions.jsonl").is_file()
    monkeypatch.setattr("safeanchor.suite.evaluate", lambda *a, **k: {"tasks": {"truthfulqa": {"error": "no data"},
                                                                                "mmlu": {"acc": 1.0}}})
    with pytest.raises(SafeAnchorError, match="helpfulness check failed.*no data.*helpfulness_limit: 0"):
        align.measure(None, None, None, cfg, tmp_path)


def test_missing_helpfulness_data_stops_alignment_before_the_model_loads(monkeypatch, tmp_path):
    """PyPI no longer serves the bigbench sdist: with align.helpfulness_limit > 0 the alignment must say so at
    once (naming the fix), not after minutes of validating the unaligned model."""
    from safeanchor.suite import truthfulqa

    def unavailable():
        raise SafeAnchorError("https://pypi.org/simple/bigbench/ does not list bigbench-1.0.0.tar.gz")

    monkeypatch.setattr(truthfulqa, "load_bigbench", unavailable)
    monkeypatch.setattr("safeanchor.models.load_model", lambda *a, **k: pytest.fail("the model must not load"))
    cfg = load_config("quickstart", overrides={"align.artifact": "", "align.helpfulness_limit": 50})
    with pytest.raises(SafeAnchorError, match="cannot load its data.*does not list bigbench.*helpfulness_limit: 0"):
        align.train_alignment(cfg, tmp_path / "aligned")
    cfg = load_config("quickstart", overrides={"align.artifact": "", "align.helpfulness_limit": 0})
    align.check_helpfulness_data(cfg)  # nothing to load, nothing raised


def test_a_second_alignment_of_the_same_model_generates_only_the_aligned_models_completions(
        tmp_path, monkeypatch, generated):
    """The unaligned model's completions (validation before training, self-distilled answers) are the same
    whatever the held-out sources, steps or lr: a second alignment takes them from the cache (keyed by a
    checksum of the weights), reports the same 'before' numbers and SFT data, and generates only the
    validation of the model it trained. eval.base_cache: false generates everything again."""
    monkeypatch.setenv("SAFEANCHOR_CACHE", str(tmp_path / "cache"))
    quiet = lambda *_: None  # noqa: E731
    first = align.train_alignment(load_config("smoke"), tmp_path / "a", progress=quiet)
    n_first = sum(map(len, generated))
    generated.clear()
    second = align.train_alignment(load_config("smoke", overrides={"align.steps": 2}), tmp_path / "b", progress=quiet)
    n_second = sum(map(len, generated))
    assert second["before"] == first["before"] and second["data"] == first["data"]
    n_validation = sum(len(s["prompts"]) for s in align.validation_sets(load_config("smoke")).values())
    assert n_second == n_validation and n_first == 2 * n_validation + first["data"]["benign_prompts"]
    assert list((tmp_path / "cache" / "unaligned").glob("*/generations-*.json"))
    generated.clear()
    align.train_alignment(load_config("smoke", overrides={"eval.base_cache": False}), tmp_path / "c", progress=quiet)
    assert sum(map(len, generated)) == n_first
