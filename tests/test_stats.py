"""stats.py and the reports built on it, on synthetic results (no training): Wilson against hand-computed
values, the bootstrap against cases with a known answer, the per-method summary (trajectory, slopes,
ordering invariance, CSM trigger rates, domain cost against Standard) against hand-computed numbers,
composite safety and the intervals in results.md / comparison.md / comparison.json."""
import json
import random

import numpy as np
import pytest

from safeanchor import stats as st
from safeanchor.report import compare, trajectory_rows, write_report


# -- Wilson -------------------------------------------------------------------------------------------------
def test_wilson_matches_hand_computed_values():
    # 44 of 50: p = 0.88, z^2/n = 0.0768292, centre 0.9184146 / 1.0768292 = 0.852889,
    # half-width 1.959964 * sqrt(0.002112 + 0.000384146) / 1.0768292 = 0.090936
    lo, hi = st.wilson(44, 50)
    assert lo == pytest.approx(0.761953, abs=2e-6) and hi == pytest.approx(0.943825, abs=2e-6)
    # 0 of 50: [0, (z^2/n) / (1 + z^2/n)] = [0, 0.0768292 / 1.0768292]
    lo, hi = st.wilson(0, 50)
    assert lo == 0.0 and hi == pytest.approx(0.071348, abs=2e-6)
    assert st.wilson_pct(88.0, 50) == pytest.approx((76.1953, 94.3825), abs=2e-4)
    assert st.wilson_pct(88.0, None) is None


# -- bootstrap ----------------------------------------------------------------------------------------------
def _labels(ones: int, n: int = 50, prompts: bool = True, flip=()):
    v = np.array([1.0] * ones + [0.0] * (n - ones))
    v[list(flip)] = 0.0
    return st.Sample(v, tuple(f"p{i:03d}" for i in range(n)) if prompts else None)


def test_difference_of_identical_samples_contains_zero():
    a = [_labels(30), _labels(35), _labels(40)]
    d = st.boot_diff(a, list(a))
    assert d["diff"] == 0.0 and d["ci"][0] <= 0.0 <= d["ci"][1] and not d["distinguishable"]
    assert d["paired_prompts"]


def test_a_huge_difference_is_distinguishable():
    d = st.boot_diff([_labels(50), _labels(50)], [_labels(0), _labels(0)])
    assert d["diff"] == 100.0 and d["ci"] == [100.0, 100.0] and d["distinguishable"]


def test_bootstrap_of_one_run_is_the_binomial_interval():
    lo, hi = st.boot_mean([_labels(44, prompts=False)])
    half = 196 * (0.88 * 0.12 / 50) ** 0.5  # normal approximation: 88 ± 9.0
    assert abs(lo - (88 - half)) < 2.5 and abs(hi - (88 + half)) < 2.5
    assert st.boot_mean([_labels(44, prompts=False)]) == (lo, hi)  # seeded: the same interval again


def test_pairing_by_prompt_separates_a_small_consistent_difference():
    """B refuses exactly the prompts A refuses minus 5 of them, in every run: paired by prompt (labels from
    the generations files) that is a clear 10-point difference; with the prompts unknown it is not."""
    a = [_labels(25) for _ in range(3)]
    b = [_labels(25, flip=range(5)) for _ in range(3)]
    paired = st.boot_diff(a, b)
    assert paired["diff"] == pytest.approx(10.0) and paired["paired_prompts"] and paired["distinguishable"]
    unpaired = st.boot_diff([st.Sample(s.values) for s in a], [st.Sample(s.values) for s in b])
    assert not unpaired["paired_prompts"] and not unpaired["distinguishable"]


def test_scores_are_resampled_over_runs_only():
    same = [st.Sample(np.array([0.6])) for _ in range(4)]
    assert st.boot_mean(same) == pytest.approx((60.0, 60.0))
    spread = [st.Sample(np.array([v])) for v in (0.4, 0.6)]
    lo, hi = st.boot_mean(spread)
    assert lo == pytest.approx(40.0) and hi == pytest.approx(60.0)


def test_a_single_run_of_a_score_has_no_interval_and_no_verdict():
    """One run of a score without per-prompt parts resamples to a point: no interval, and its difference is
    neither distinguishable nor not (it used to read [x, x] and 'distinguishable' for any difference)."""
    one = [st.Sample(np.array([0.893]))]
    assert st.boot_mean(one) is None
    d = st.boot_diff(one, [st.Sample(np.array([0.852]))])
    assert d["diff"] == pytest.approx(4.1) and d["ci"] is None and d["distinguishable"] is None
    d = st.boot_diff(one, [st.Sample(np.array([v])) for v in (0.84, 0.86)])
    assert d["ci"] is None and d["distinguishable"] is None
    # two runs on each side: an interval again; one run of 0/1 labels: the binomial interval (above)
    d = st.boot_diff([st.Sample(np.array([v])) for v in (0.89, 0.90)], [st.Sample(np.array([v])) for v in (0.84, 0.86)])
    assert d["ci"] is not None and d["distinguishable"]


# -- per-method summary -------------------------------------------------------------------------------------
def _run(method, seed, order, values, *, over=(10.0, 10.0, 10.0), scores=60.0, csm=None, composite=None):
    steps = [{"after": "base", "refusal_rate": values[0], "over_refusal_rate": over[0], "n_probe": 50,
              "n_benign": 90, "domain_scores": {d: 50.0 for d in order}, "adapter": None}]
    for t, d in enumerate(order, 1):
        step = {"after": d, "refusal_rate": values[t], "over_refusal_rate": over[t], "n_probe": 50, "n_benign": 90,
                "domain_scores": {x: scores for x in order}, "adapter": f"a{t}", "train": {"seconds": 1.0},
                "method": {"csm": {"triggered": csm[t - 1]}} if csm else {}}
        if composite:
            step.update(composite_safety=composite[t - 1], composite={
                "composite_safety": composite[t - 1], "formula": "f",
                "inputs": {"harmbench": {"value": 90.0, "metric": "refusal_rate", "judge": {"name": "keyword"}},
                           "truthfulqa": {"value": 40.0, "metric": "mc2"},
                           "bbq_bias": {"value": 10.0, "definition": "abs_amb"}}})
        steps.append(step)
    return {"method": method, "model": "m", "seed": seed, "domains": list(order), "steps": steps}


AB, BA = ("d1", "d2"), ("d2", "d1")
#                     seed, ordering, refusal after base / 1st / 2nd domain, CSM triggered after 1st / 2nd
SAFE = [(0, AB, (80.0, 60.0, 10.0), (True, False)), (1, AB, (80.0, 60.0, 20.0), (True, True)),
        (0, BA, (80.0, 70.0, 30.0), (False, False)), (1, BA, (80.0, 70.0, 50.0), (True, True))]


def _groups():
    safe = [st.RunData(_run("safeanchor", s, o, v, csm=c, scores=sc))
            for (s, o, v, c), sc in zip(SAFE, (58.0, 62.0, 59.0, 61.0))]
    std = [st.RunData(_run("standard", s, AB, (80.0, 20.0, 0.0), scores=sc)) for s, sc in ((0, 50.0), (1, 60.0))]
    return {"standard": std, "safeanchor": safe}


def test_method_summary_matches_hand_computed_numbers():
    s = st.method_summary(_groups()["safeanchor"], label="safeanchor")
    r = s["refusal_rate"]
    assert s["runs"] == 4 and s["seeds"] == [0, 1] and s["steps"] == ["base", "1", "2"]
    assert r["final"]["mean"] == 27.5 and r["final"]["sd"] == pytest.approx(17.0783, abs=1e-4)
    # slopes: step 1 = -20, -20, -10, -10; step 2 = -50, -40, -40, -20
    assert r["slopes"][0]["mean"] == -15.0 and r["slopes"][0]["sd"] == pytest.approx(5.7735, abs=1e-4)
    assert r["slopes"][1]["mean"] == -37.5 and r["slopes"][1]["sd"] == pytest.approx(12.5831, abs=1e-4)
    assert r["pts_per_step"]["mean"] == pytest.approx(-26.25)
    assert r["retained_pct"]["mean"] == pytest.approx((12.5 + 25 + 37.5 + 62.5) / 4)
    # per-ordering final means 15 and 40: sd 17.6777; seed sds 7.0711 and 14.1421: mean 10.6066
    assert r["n_orderings"] == 2 and r["seeds_per_ordering"] == [2]
    assert r["cross_ordering_sd"] == pytest.approx(17.6777, abs=1e-4)
    assert r["within_ordering_seed_sd"] == pytest.approx(10.6066, abs=1e-4)
    assert r["final"]["ci"][0] <= 27.5 <= r["final"]["ci"][1]
    assert s["csm_trigger_rate"]["d1"] == {"triggered": 3, "n": 4, "rate": 0.75}
    assert s["csm_trigger_rate"]["d2"] == {"triggered": 2, "n": 4, "rate": 0.5}
    assert s["csm_trigger_rate"]["all"]["rate"] == pytest.approx(5 / 8)
    assert "composite_safety" not in s and "harmful_response_rate" not in s


def test_one_ordering_keeps_domain_names_and_has_no_cross_ordering_sd():
    s = st.method_summary(_groups()["standard"])
    assert s["steps"] == ["base", "d1", "d2"]
    assert s["refusal_rate"]["cross_ordering_sd"] is None and s["refusal_rate"]["within_ordering_seed_sd"] == 0.0
    assert s["csm_trigger_rate"] == {}


def test_compare_stats_cost_against_standard_and_differences():
    data = st.compare_stats(_groups())
    assert data["standard"] == "standard" and data["metrics"] == ["refusal_rate", "over_refusal_rate"]
    cost = data["methods"]["safeanchor"]["domain_score"]["cost_vs_standard"]
    assert cost["diff"] == pytest.approx(5.0)  # mean final domain score 60 against Standard's 55
    assert data["methods"]["standard"]["domain_score"]["cost_vs_standard"]["diff"] == 0.0
    (ref,) = [d for d in data["differences"] if d["metric"] == "refusal_rate"]
    assert (ref["a"], ref["b"], ref["diff"]) == ("standard", "safeanchor", -27.5) and ref["distinguishable"]
    (over,) = [d for d in data["differences"] if d["metric"] == "over_refusal_rate"]
    assert over["diff"] == 0.0 and not over["distinguishable"]


def test_unfinished_run_in_a_group_is_refused():
    from safeanchor.errors import SafeAnchorError

    runs = _groups()["standard"]
    runs[1].results["steps"].pop()
    with pytest.raises(SafeAnchorError, match="different numbers of steps"):
        st.method_summary(runs, label="standard")


# -- reports ------------------------------------------------------------------------------------------------
def test_comparison_files_hold_the_new_tables_and_keys(tmp_path):
    runs = {("standard", AB, s): _run("standard", s, AB, (80.0, 20.0, 0.0)) for s in (0, 1)}
    runs.update({("safeanchor", o, s): _run("safeanchor", s, o, v, csm=c) for s, o, v, c in SAFE})
    md = compare(tmp_path, runs).read_text()
    data = json.loads((tmp_path / "comparison.json").read_text())
    safe = data["methods"]["safeanchor"]["refusal_rate"]
    for key in ("trajectory", "final", "retained_pct", "slopes", "cross_ordering_sd", "within_ordering_seed_sd"):
        assert key in safe
    assert data["interval"]["replicates"] == st.N_BOOT
    for needle in ("### refusal % after each step", "Per-step slope of refusal %", "### Ordering invariance",
                   "cross_ordering_sd", "### CSM trigger rate per domain", "| safeanchor | 3/4 (75%) | 2/4 (50%) |",
                   "### Domain-task cost against Standard", "### Differences between methods",
                   "final refusal 95% CI", "domain score − Standard [95% CI]"):
        assert needle in md, needle
    assert (tmp_path / "comparison.png").stat().st_size > 1000


def test_results_md_has_wilson_intervals_and_composite(tmp_path):
    res = _run("safeanchor", 0, AB, (88.0, 100.0, 98.0), composite=(70.0, 71.5))
    rows = trajectory_rows(res)
    assert rows[0] == ("| after | refusal % | Δ pts | over-refusal % | composite safety | HarmBench | TruthfulQA | "
                       "BBQ bias | d1 score | d2 score | refusal 95% CI | over-refusal 95% CI |")
    # Wilson: 44/50 -> [76.2, 94.4], 50/50 -> [92.9, 100.0], 9/90 -> [5.4, 17.9]
    assert rows[2] == "| base | 88.0 |  | 10.0 | n/a | n/a | n/a | n/a | 50.0 | 50.0 | [76.2, 94.4] | [5.4, 17.9] |"
    assert rows[3] == ("| d1 | 100.0 | +12.0 | 10.0 | 70.0 | 90.0 | 40.0 | 10.0 | 60.0 | 60.0 | [92.9, 100.0] | "
                       "[5.4, 17.9] |")
    write_report(tmp_path, res)
    md = (tmp_path / "results.md").read_text()
    assert "Composite safety (Eq. 8) = f; inputs: HarmBench refusal_rate (judge keyword), TruthfulQA mc2" in md
    assert "Wilson 95%" in md and (tmp_path / "refusal.png").stat().st_size > 1000
    runs = {("safeanchor", AB, s): _run("safeanchor", s, AB, (88.0, 100.0, 98.0), composite=(70.0, 70.0 + s))
            for s in (0, 1)}
    table = compare(tmp_path, runs).read_text()
    assert "### Composite safety (Eq. 8), final step" in table and "composite safety after each step" in table
    assert "| safeanchor | 70.5 ± 0.7 [70.0, 71.0] | 90.0 ± 0.0 | 40.0 ± 0.0 | 10.0 ± 0.0 |" in table
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert data["methods"]["safeanchor"]["composite_safety"]["final"]["mean"] == 70.5
    assert data["methods"]["safeanchor"]["composite_inputs"]["truthfulqa"]["mean"] == 40.0


def test_labels_from_generations_files_pair_the_bootstrap(tmp_path):
    """With the run directories given, the per-prompt labels come from generations/<k>-<after>.jsonl."""
    dirs, runs = {}, {}
    for method, refused in (("standard", 0), ("safeanchor", 45)):
        res = _run(method, 0, AB, (90.0, 2.0 * refused, 2.0 * refused))
        d = tmp_path / method
        (d / "generations").mkdir(parents=True)
        for k, step in enumerate(res["steps"]):
            lines = [{"set": "harmful", "prompt": f"h{i:02d}", "completion": "", "label": int(i < refused)}
                     for i in range(50)]
            lines += [{"set": "benign", "prompt": f"b{i:02d}", "completion": "", "label": int(i < 9)}
                      for i in range(90)]
            (d / "generations" / f"{k}-{step['after']}.jsonl").write_text("\n".join(map(json.dumps, lines)))
        runs[(method, AB, 0)], dirs[(method, AB, 0)] = res, d
    res = runs[("safeanchor", AB, 0)]
    s = st.sample(st.RunData(res, st.load_generations(dirs[("safeanchor", AB, 0)], res)), "refusal_rate", 2)
    assert s.prompts == tuple(f"h{i:02d}" for i in range(50)) and s.values.sum() == 45
    # standard's base file (0 refused) disagrees with its recorded 90%: that step falls back to the rate and n
    std = runs[("standard", AB, 0)]
    assert st.sample(st.RunData(std, st.load_generations(dirs[("standard", AB, 0)], std)), "refusal_rate", 0).prompts \
        is None
    (tmp_path / "out").mkdir()
    compare(tmp_path / "out", runs, dirs)
    data = json.loads((tmp_path / "out" / "comparison.json").read_text())
    ref = next(d for d in data["differences"] if d["metric"] == "refusal_rate")
    assert ref["paired_prompts"] and ref["diff"] == pytest.approx(-90.0) and ref["distinguishable"]


# -- adversarial vs benign ranking ------------------------------------------------------------------------

def _slow_spearman(x, y):
    """REFERENCE: midranks by counting (rank = #smaller + (#equal + 1) / 2), then Pearson by its sums."""
    def ranks(v):
        return [sum(w < a for w in v) + (sum(w == a for w in v) + 1) / 2 for a in v]

    rx, ry = ranks(list(x)), ranks(list(y))
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5


def test_spearman_against_the_slow_reference_with_and_without_ties():
    import random

    seed = random.randrange(10**6)
    rng = np.random.default_rng(seed)
    for _ in range(50):
        n = int(rng.integers(3, 10))
        x, y = rng.integers(0, 5, n).astype(float), rng.integers(0, 5, n).astype(float)  # ties
        if len(set(x)) > 1 and len(set(y)) > 1:
            assert st.spearman(x, y) == pytest.approx(_slow_spearman(x, y), abs=1e-12), seed
        u, v = rng.permutation(n).astype(float), rng.normal(size=n)  # no ties: the textbook formula
        d = st.midranks(u) - st.midranks(v)
        assert st.spearman(u, v) == pytest.approx(1 - 6 * (d ** 2).sum() / (n * (n * n - 1)), abs=1e-12), seed
    assert st.spearman([1, 2], [2, 1]) is None and st.spearman([1, 1, 1], [1, 2, 3]) is None
    assert st.spearman_exact_p([1, 2, 3], [10, 20, 30]) == pytest.approx(2 / 6)  # identity and reversal
    assert st.spearman_exact_p([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(2 / 24)
    assert st.spearman_exact_p(list(range(10)), list(range(10))) is None  # beyond the exact limit


def test_compare_ranks_methods_by_gcg_and_benign_refusal(tmp_path):
    """Runs with RUN/suite/<k>-<after>/metrics.json (eval --run --steps last) give comparison.json an
    'adversarial' block: per-method means, pooled Wilson interval, ranks, and Spearman's rho; a method without
    GCG is left out."""
    finals = {"standard": (0.0, 10.0), "safegrad": (40.0, 30.0), "safeanchor": (90.0, 60.0), "ewc": (20.0, None)}
    runs, dirs = {}, {}
    for method, (benign, attack) in finals.items():
        for seed in (0, 1):
            res = _run(method, seed, AB, (80.0, 50.0, benign + seed))
            key = (method, AB, seed)
            runs[key], dirs[key] = res, tmp_path / f"{method}-{seed}"
            dirs[key].mkdir()
            (dirs[key] / "results.json").write_text(json.dumps(res))
            if attack is not None:
                folder = dirs[key] / "suite" / "2-d2"
                folder.mkdir(parents=True)
                (folder / "metrics.json").write_text(json.dumps({"tasks": {"gcg": {
                    "refusal_rate_attack": attack + 10 * seed, "refusal_rate_clean": 100.0, "n": 10,
                    "preset": "cpu"}}}))
    (tmp_path / "out").mkdir()
    md = compare(tmp_path / "out", runs, dirs, n_boot=50).read_text()
    adv = json.loads((tmp_path / "out" / "comparison.json").read_text())["adversarial"]
    assert set(adv["methods"]) == {"standard", "safegrad", "safeanchor"} and adv["n_methods"] == 3
    sa = adv["methods"]["safeanchor"]
    assert sa["gcg_refusal"] == 65.0 and sa["benign_refusal"] == 90.5 and sa["n_prompts"] == 20
    lo, hi = st.wilson(13, 20)
    assert sa["ci"] == [round(100 * lo, 1), round(100 * hi, 1)]
    assert (sa["rank_gcg"], adv["methods"]["standard"]["rank_gcg"]) == (3.0, 1.0)
    assert adv["spearman_rho"] == 1.0 and adv["p_exact"] == pytest.approx(2 / 6)
    assert "### Adversarial (GCG) against benign refusal" in md and "Spearman's rho between the two rankings: 1.000" in md


def test_time_rows_show_each_part_and_the_hand_summed_total():
    """results.md's seconds table: per step training, the method's after-domain work and its parts (columns
    only for parts some step records), evaluation; the total is preparation + every step's three numbers."""
    from safeanchor.report import time_rows

    rng = random.Random(_seed := random.SystemRandom().randrange(1 << 30))
    steps = [{"after": "base", "eval_seconds": round(rng.uniform(1, 50), 1)}]
    total = prep = round(rng.uniform(0, 40), 1)
    total += steps[0]["eval_seconds"]
    for name in ("medical", "legal"):
        csm, refresh = round(rng.uniform(0, 60), 1), round(rng.uniform(0, 30), 1)
        train = {"seconds": round(rng.uniform(10, 200), 1), "method_seconds": round(csm + refresh + 0.4, 1),
                 "method_seconds_by_part": {"csm": csm, "refresh": refresh}}
        steps.append({"after": name, "eval_seconds": round(rng.uniform(1, 90), 1), "train": train})
        total += train["seconds"] + train["method_seconds"] + steps[-1]["eval_seconds"]
    rows = time_rows({"steps": steps, "prepare": {"seconds": prep}})
    assert rows[2] == "| after | train | method | of which csm | of which refresh | evaluation |", _seed
    t = steps[2]["train"]
    assert rows[6] == (f"| legal | {t['seconds']:.1f} | {t['method_seconds']:.1f} | "
                       f"{t['method_seconds_by_part']['csm']:.1f} | {t['method_seconds_by_part']['refresh']:.1f} | "
                       f"{steps[2]['eval_seconds']:.1f} |"), (_seed, rows)
    assert rows[-2] == f"Method preparation (e.g. SSI) {prep:.1f} s; total {total:.1f} s.", (_seed, rows[-2], total)
    del steps[1]["train"]["method_seconds_by_part"], steps[2]["train"]["method_seconds_by_part"]
    assert "of which" not in time_rows({"steps": steps})[2]
    assert time_rows({"steps": [{"after": "base"}]}) == []
