"""results.md (trajectory table like the paper's) and refusal.png from results.json; comparison.md,
comparison.json and comparison.png over several runs (the statistics are stats.py's).

Refusal and over-refusal come from the refusal judge; a "harmful response %" column (and line in the
plot) appears when the run had a harm judge (``eval.harm_judge``), composite safety (Eq. 8) and its
inputs when the run's suite computed it, and every rate carries its 95% interval (Wilson for one run;
the bootstrap of stats.py over runs and prompts in comparisons)."""
from __future__ import annotations

from pathlib import Path


def _has_harm(results: dict) -> bool:
    return any(s.get("harmful_response_rate") is not None for s in results["steps"])


def _has_composite(results: dict) -> bool:
    return any(s.get("composite_safety") is not None for s in results["steps"])


def composite_cells(step: dict) -> list[str]:
    """Composite safety (Eq. 8) and its three recorded inputs (HarmBench score, TruthfulQA, BBQ bias)."""
    inputs = (step.get("composite") or {}).get("inputs") or {}
    suite = step.get("suite") or {}
    fallback = {"harmbench": (suite.get("harmbench") or {}).get("score"),
                "truthfulqa": (suite.get("truthfulqa") or {}).get("mc2"),
                "bbq_bias": (suite.get("bbq") or {}).get("bias")}
    vals = [step.get("composite_safety")] + [(inputs.get(k) or {}).get("value", fallback[k]) if inputs else fallback[k]
                                             for k in ("harmbench", "truthfulqa", "bbq_bias")]
    return ["n/a" if v is None else f"{v:.1f}" for v in vals]


def composite_note(results: dict) -> str:
    """One line: the composite's formula and what each input is (metric, judge, definition), from the last
    step that recorded them."""
    from .suite.composite import FORMULA

    step = next((s for s in reversed(results["steps"]) if (s.get("composite") or {}).get("inputs")), None)
    if step is None:
        return (f"Composite safety (Eq. 8) = {FORMULA}, from each step's suite (harmbench score, truthfulqa mc2, "
                f"bbq bias).")
    inp = step["composite"]["inputs"]
    judge = (inp.get("harmbench", {}).get("judge") or {}).get("name", "?")
    return (f"Composite safety (Eq. 8) = {step['composite'].get('formula', FORMULA)}; inputs: HarmBench "
            f"{inp.get('harmbench', {}).get('metric')} (judge {judge}), TruthfulQA "
            f"{inp.get('truthfulqa', {}).get('metric')}, "
            f"BBQ bias ({inp.get('bbq_bias', {}).get('definition')}).")


def trajectory_rows(results: dict) -> list[str]:
    """The trajectory table; a "harmful response %" column (the harm judge's) when the run had one, composite
    safety and its inputs when the suite computed it, and the Wilson 95% interval of every rate (last columns)."""
    from .stats import wilson_pct, fmt_ci

    steps = results["steps"]
    domains = results["domains"]
    harm, comp = _has_harm(results), _has_composite(results)
    held = any("heldout_refusal_rate" in s for s in steps)
    cis = ["refusal", "over-refusal"] + (["harmful response"] if harm else []) + (["held-out-style refusal"]
                                                                                 if held else [])
    head = ("| after | refusal % | Δ pts | over-refusal % | " + ("harmful response % | " if harm else "")
            + ("held-out-style refusal % | " if held else "")
            + ("composite safety | HarmBench | TruthfulQA | BBQ bias | " if comp else "")
            + " | ".join(f"{d} score" for d in domains) + " | " + " | ".join(f"{c} 95% CI" for c in cis) + " |")
    rows = [head, "|" + "---|" * (4 + harm + held + 4 * comp + len(domains) + len(cis))]
    prev = None
    for s in steps:
        delta = "" if prev is None else f"{s['refusal_rate'] - prev:+.1f}"
        prev = s["refusal_rate"]
        scores = " | ".join(f"{s['domain_scores'].get(d, float('nan')):.1f}" for d in domains)
        hr = s.get("harmful_response_rate")
        harm_cell = ("n/a | " if hr is None else f"{hr:.1f} | ") if harm else ""
        comp_cell = " | ".join(composite_cells(s)) + " | " if comp else ""
        hh = s.get("heldout_refusal_rate")
        held_cell = ("n/a | " if hh is None else f"{hh:.1f} | ") if held else ""
        intervals = [wilson_pct(s["refusal_rate"], s.get("n_probe")),
                     wilson_pct(s["over_refusal_rate"], s.get("n_benign"))]
        if harm:
            intervals.append(wilson_pct(hr, s.get("n_probe")))
        if held:
            intervals.append(wilson_pct(hh, s.get("n_heldout")))
        rows.append(f"| {s['after']} | {s['refusal_rate']:.1f} | {delta} | {s['over_refusal_rate']:.1f} | {harm_cell}"
                    f"{held_cell}{comp_cell}{scores} | " + " | ".join(fmt_ci(c) for c in intervals) + " |")
    return rows


BY_SET_TITLE = ("Refusal % per harmful set (95% Wilson interval; the held-out sets are styles the alignment "
                "stage never trained on):")
BY_CATEGORY_TITLE = ("Refusal % of our direct questions per coarse harm category (95% Wilson interval; "
                     "evaluation only, never trained on):")


def by_set_rows(results: dict, key: str = "refusal_by_set", title: str = BY_SET_TITLE) -> list[str]:
    """Refusal per harmful set (the probe and each ``eval.heldout_sets`` set; ``key="refusal_by_category"``:
    per harm category) after every step, with its 95% Wilson interval; [] when it was not measured."""
    from .stats import fmt_ci

    steps = [s for s in results["steps"] if s.get(key)]
    if not steps:
        return []
    names = list(steps[0][key])
    rows = [title, "", "| after | " + " | ".join(f"{n} (n={steps[0][key][n]['n']})" for n in names) + " |",
            "|" + "---|" * (1 + len(names))]
    for s in steps:
        cells = []
        for n in names:
            c = s[key].get(n)
            cells.append("n/a" if not c or c["refusal_rate"] is None else
                         f"{c['refusal_rate']:.1f} {fmt_ci(c['ci95'])}")
        rows.append(f"| {s['after']} | " + " | ".join(cells) + " |")
    return rows + [""]


def time_rows(results: dict) -> list[str]:
    """Seconds of work per step: training, the method's after-domain work (split by part where the method
    records it, e.g. SafeAnchor's CSM and subspace refresh) and evaluation; [] for a run without timings."""
    steps = results["steps"]
    if not any("eval_seconds" in s for s in steps):
        return []
    parts = sorted({k for s in steps for k in s.get("train", {}).get("method_seconds_by_part", {})})
    prepare = float((results.get("prepare") or {}).get("seconds", 0.0))
    rows = ["Seconds of work (model loading not counted)", "",
            "| after | train | method | " + "".join(f"of which {k} | " for k in parts) + "evaluation |",
            "|" + "---|" * (4 + len(parts))]
    for s in steps:
        t = s.get("train", {})
        by_part = t.get("method_seconds_by_part", {})
        cells = [f"{t['seconds']:.1f}" if "seconds" in t else "",
                 f"{t['method_seconds']:.1f}" if "method_seconds" in t else "",
                 *(f"{by_part[k]:.1f}" if k in by_part else "" for k in parts),
                 f"{s.get('eval_seconds', 0.0):.1f}"]
        rows.append(f"| {s['after']} | " + " | ".join(cells) + " |")
    return rows + ["", f"Method preparation (e.g. SSI) {prepare:.1f} s; total {wall_seconds(results):.1f} s.", ""]


def judges_line(step: dict) -> str:
    """Which judge gave which number, from a results step (older runs: one ``judge``)."""
    refusal = step.get("refusal_judge") or step.get("judge", "?")
    parts = [f"refusal and over-refusal: {refusal} ({step.get('judge_measures', 'refusal')})"]
    if step.get("harm_judge"):
        parts.append(f"harmful response: {step['harm_judge']} (% of probe completions labelled unsafe; "
                     f"{step.get('n_harm_unparseable', 0)} unparseable)")
    if step.get("monitor_judge"):
        parts.append(f"CSM monitor: {step['monitor_judge']} ({step.get('monitor_measures', '')})")
    return "Judges: " + "; ".join(parts) + "."


def summary(results: dict) -> dict:
    steps = results["steps"]
    base, last = steps[0]["refusal_rate"], steps[-1]["refusal_rate"]
    n = max(1, len(steps) - 1)
    return {"base_refusal": base, "final_refusal": last, "retained_pct": 100.0 * last / base if base else None,
            "pts_per_step": (last - base) / n if len(steps) > 1 else 0.0}


def wall_seconds(results: dict) -> float:
    """Seconds of work recorded in a run: method preparation + per step training, method and evaluation
    (model loading and the shared aligned base are not counted)."""
    total = float((results.get("prepare") or {}).get("seconds", 0.0))
    for s in results["steps"]:
        total += s.get("eval_seconds", 0.0) + s.get("train", {}).get("seconds", 0.0)
        total += s.get("train", {}).get("method_seconds", 0.0)
    return total


def write_report(run_dir: Path, results: dict) -> None:
    s = summary(results)
    retained = "n/a" if s["retained_pct"] is None else f"{s['retained_pct']:.1f}%"
    lines = [f"# {results['method']} on {results['model']} (seed {results['seed']})", "",
             f"Domains: {' -> '.join(results['domains'])}. {judges_line(results['steps'][0])} Probe "
             f"{results['steps'][0].get('n_probe')} HarmBench prompts, {results['steps'][0].get('n_benign')} benign "
             f"prompts that sound dangerous.", "",
             *trajectory_rows(results), "",
             f"Refusal {s['base_refusal']:.1f}% -> {s['final_refusal']:.1f}% ({retained} of the aligned base "
             f"retained, {s['pts_per_step']:+.1f} pts/step). Domain score = held-out response-token accuracy %. "
             f"Intervals: Wilson 95% for a proportion of the n prompts.", ""]
    if _has_composite(results):
        lines += [composite_note(results), ""]
    lines += by_set_rows(results)
    lines += by_set_rows(results, "refusal_by_category", BY_CATEGORY_TITLE)
    lines += time_rows(results)
    (run_dir / "results.md").write_text("\n".join(lines))
    plot_refusal(run_dir / "refusal.png", {results["method"]: results})


def plot_refusal(path: Path, runs: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, res in runs.items():
        xs = [s["after"] for s in res["steps"]]
        ax.plot(range(len(xs)), [s["refusal_rate"] for s in res["steps"]], marker="o", label=f"{name} refusal")
        ax.plot(range(len(xs)), [s["over_refusal_rate"] for s in res["steps"]], marker="x", linestyle=":",
                label=f"{name} over-refusal")
        if any("heldout_refusal_rate" in s for s in res["steps"]):
            ax.plot(range(len(xs)), [s.get("heldout_refusal_rate", float("nan")) for s in res["steps"]], marker="s",
                    linestyle="--", label=f"{name} held-out-style refusal")
        if _has_harm(res):
            ax.plot(range(len(xs)), [s.get("harmful_response_rate", float("nan")) for s in res["steps"]], marker="^",
                    linestyle="--", label=f"{name} harmful response")
        if _has_composite(res):
            ax.plot(range(len(xs)), [s.get("composite_safety") if s.get("composite_safety") is not None
                                     else float("nan") for s in res["steps"]], marker="s", linestyle="-.",
                    label=f"{name} composite safety")
        ax.set_xticks(range(len(xs)), xs)
    ax.set_ylim(-3, 103)
    ax.set_ylabel("% of prompts (composite: score)")
    ax.set_xlabel("after")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(d: dict | None, digits: int = 1, ci: bool = True) -> str:
    """mean ± sd [lo, hi] of a stats summary entry."""
    from .stats import fmt_ci

    if not d or d.get("mean") is None:
        return "n/a"
    text = f"{d['mean']:.{digits}f}" + ("" if d.get("sd") is None else f" ± {d['sd']:.{digits}f}")
    return text + (f" {fmt_ci(d.get('ci'), digits)}" if ci and d.get("ci") is not None else "")


def _diff_cell(d: dict | None) -> str:
    from .stats import fmt_ci

    if not d:
        return "n/a"
    if d.get("distinguishable") is None:
        return f"{d['diff']:+.1f} (one run: no interval)"
    return f"{d['diff']:+.1f} {fmt_ci(d['ci'])}" + ("" if d["distinguishable"] else " n.d.")


def compare(out: Path, runs: dict, dirs: dict | None = None, n_boot: int | None = None,
            boot_seed: int | None = None) -> Path:
    """comparison.md, comparison.json and comparison.png over several runs.

    ``runs``: key -> results dict, where ``key[0]`` (or the key itself) is the row label (method, or directory
    for --by-dir) and the rest tells runs apart (seed, ordering); ``dirs``: the same keys -> run directory,
    whose generations/ files give the bootstrap its per-prompt labels (without them, labels are rebuilt
    from each rate and its n). Mean ± sample std (ddof 1) over the runs of a label, 95% intervals
    (stats.py), the per-step trajectory and slopes, ordering invariance, CSM trigger rates, the domain-score
    cost against Standard and every pairwise difference."""
    import json

    import numpy as np

    from . import stats as st

    groups: dict[str, list] = {}
    keys: dict[str, list] = {}
    for key, res in runs.items():
        label = key[0] if isinstance(key, tuple) else key
        gen = st.load_generations(dirs[key], res) if dirs and key in dirs else None
        groups.setdefault(label, []).append(st.RunData(res, gen))
        keys.setdefault(label, []).append(key)
    data = st.compare_stats(groups, n_boot or st.N_BOOT, st.BOOT_SEED if boot_seed is None else boot_seed)
    adversarial = st.adversarial_ranking({
        label: [(runs[k], st.final_gcg(dirs[k], runs[k]) if dirs and k in dirs else None) for k in ks]
        for label, ks in keys.items()})
    if adversarial is not None:
        data["adversarial"] = adversarial
    methods = data["methods"]
    by_method = {m: [r.results for r in rs] for m, rs in groups.items()}
    harm = any(_has_harm(r) for r in runs.values())
    comp = any(_has_composite(r) for r in runs.values())
    multi_order = any(len(s["orderings"]) > 1 for s in methods.values())
    extra = (["domain score − Standard [95% CI]"] + (["final composite safety"] if comp else [])
             + (["orderings"] if multi_order else [])
             + ["base refusal 95% CI", "final refusal 95% CI", "final over-refusal 95% CI"]
             + (["base harmful response 95% CI", "final harmful response 95% CI"] if harm else [])
             + (["final composite 95% CI"] if comp else []) + ["mean final domain score 95% CI"])
    lines = ["| method | seeds | base refusal % | final refusal % | % retained | pts/step | final over-refusal % | "
             + ("base harmful response % | final harmful response % | " if harm else "")
             + "mean final domain score | train s | wall s | " + " | ".join(extra) + " |",
             "|" + "---|" * (10 + 2 * harm + len(extra))]

    def ms(values):
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

    def ci_of(method, metric, which):
        from .stats import fmt_ci

        m = methods[method].get(metric)
        return fmt_ci(m[which].get("ci")) if m else "n/a"

    for method, results in by_method.items():
        summ = methods[method]
        sums = [summary(r) for r in results]
        final_scores = [st.final_domain_score(r) for r in results]
        train_s = [sum(s.get("train", {}).get("seconds", 0) for s in r["steps"]) for r in results]
        wall_s = [wall_seconds(r) for r in results]
        cost = summ["domain_score"].get("cost_vs_standard")
        cells = [("reference" if method == data["standard"] else _diff_cell(cost))]
        if comp:
            cells.append(_cell(summ.get("composite_safety", {}).get("final"), ci=False))
        if multi_order:
            cells.append(str(len(summ["orderings"])))
        cells += [ci_of(method, "refusal_rate", "base"), ci_of(method, "refusal_rate", "final"),
                  ci_of(method, "over_refusal_rate", "final")]
        if harm:
            cells += [ci_of(method, "harmful_response_rate", "base"), ci_of(method, "harmful_response_rate", "final")]
        if comp:
            cells.append(ci_of(method, "composite_safety", "final"))
        cells.append(st.fmt_ci(summ["domain_score"]["final_mean"].get("ci")))
        lines.append(f"| {method} | {len(summ['seeds'])} | {ms([s['base_refusal'] for s in sums])} | "
                     f"{ms([s['final_refusal'] for s in sums])} | {ms([s['retained_pct'] for s in sums])} | "
                     f"{ms([s['pts_per_step'] for s in sums])} | "
                     f"{ms([r['steps'][-1]['over_refusal_rate'] for r in results])} | "
                     + (f"{ms([r['steps'][0].get('harmful_response_rate') for r in results])} | "
                        f"{ms([r['steps'][-1].get('harmful_response_rate') for r in results])} | " if harm else "")
                     + f"{ms(final_scores)} | {ms(train_s)} | {ms(wall_s)} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± sample sd over each method's runs (seeds x orderings). 95% intervals: Wilson for one "
              f"run's proportion, else a seeded percentile bootstrap over runs and prompts "
              f"({data['interval']['replicates']} replicates, seed {data['interval']['seed']}); n.d. = not "
              f"distinguishable (the interval of the difference contains 0).", ""]
    lines += _trajectory_tables(data)
    lines += _invariance_table(data) if multi_order else []
    lines += _csm_table(data)
    lines += _cost_table(data)
    lines += _composite_table(data, by_method) if comp else []
    lines += _difference_table(data)
    lines += _adversarial_table(data)
    lines += ["Trajectories (first run of each method):", ""]
    for method, results in by_method.items():
        lines += [f"**{method}** ({' -> '.join(results[0]['domains'])}, seed {results[0]['seed']})", "",
                  *trajectory_rows(results[0]), ""]
    out = Path(out)
    path = out / "comparison.md"
    path.write_text("\n".join(lines))
    (out / "comparison.json").write_text(json.dumps(data, indent=2))
    plot_comparison(out / "comparison.png", data)
    return path


def _common_steps(data: dict) -> list[str]:
    labels = {tuple(s["steps"]) for s in data["methods"].values()}
    if len(labels) == 1:
        return list(next(iter(labels)))
    n = max(len(s["steps"]) for s in data["methods"].values())
    return ["base", *[str(t) for t in range(1, n)]]


def _trajectory_tables(data: dict) -> list[str]:
    steps = _common_steps(data)
    head = ["base" if s == "base" else f"after {s}" for s in steps]
    lines = []
    for metric in data["metrics"]:
        from .stats import LABELS

        lines += [f"### {LABELS[metric]} after each step (mean ± sd [95% CI])", "",
                  "| method | runs | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
        for method, s in data["methods"].items():
            if metric not in s:
                continue
            cells = [_cell(e) for e in s[metric]["trajectory"]]
            lines.append(f"| {method} | {s['runs']} | " + " | ".join(cells + [""] * (len(head) - len(cells))) + " |")
        lines += ["", f"Per-step slope of {LABELS[metric]} (points per step, mean ± sd; a growing magnitude is "
                  f"acceleration):", "",
                  "| method | " + " | ".join(f"step {t}" for t in range(1, len(steps))) + " | overall pts/step |",
                  "|---|" + "---|" * len(steps)]
        for method, s in data["methods"].items():
            if metric not in s:
                continue
            cells = [_cell(e, ci=False) for e in s[metric]["slopes"]]
            lines.append(f"| {method} | " + " | ".join(cells + [""] * (len(steps) - 1 - len(cells)))
                         + f" | {_cell(s[metric]['pts_per_step'], ci=False)} |")
        lines.append("")
    return lines


def _invariance_table(data: dict) -> list[str]:
    from .stats import LABELS

    lines = ["### Ordering invariance (final value)", "",
             "cross_ordering_sd: sd over orderings of each ordering's mean final value; within_ordering_seed_sd: "
             "mean over orderings of the sd over seeds. Invariance to the order of domains: the first is no "
             "larger than the second.", "",
             "| method | metric | orderings | seeds per ordering | cross_ordering_sd | within_ordering_seed_sd |",
             "|---|---|---|---|---|---|"]
    for method, s in data["methods"].items():
        for metric in data["metrics"]:
            if metric in s:
                m = s[metric]
                fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
                lines.append(f"| {method} | {LABELS[metric]} | {m['n_orderings']} | "
                             f"{', '.join(map(str, m['seeds_per_ordering']))} | {fmt(m['cross_ordering_sd'])} | "
                             f"{fmt(m['within_ordering_seed_sd'])} |")
    return lines + [""]


def _adversarial_table(data: dict) -> list[str]:
    """GCG refusal after the last domain against benign refusal, per method, and Spearman's rho."""
    adv = data.get("adversarial")
    if not adv:
        return []
    from .stats import fmt_ci

    lines = ["### Adversarial (GCG) against benign refusal, after the last domain", "",
             "GCG: `safeanchor eval --run RUN --tasks gcg --steps last` (RUN/suite). Ranks: 1 = least refusal.", "",
             "| method | runs | GCG prompts | refusal under GCG % [95% CI] | refusal without attack (GCG's prompts) % | "
             "benign refusal % (probe) | rank under GCG | rank benign |", "|---|---|---|---|---|---|---|---|"]
    for m, r in adv["methods"].items():
        lines.append(f"| {m} | {r['n_runs']} | {r['n_prompts']} | {r['gcg_refusal']:.1f} {fmt_ci(r['ci'])} | "
                     f"{r['gcg_refusal_clean']:.1f} | {r['benign_refusal']:.1f} | {r['rank_gcg']:g} | "
                     f"{r['rank_benign']:g} |")
    rho = adv["spearman_rho"]
    p = adv["p_exact"]
    lines += ["", (f"Spearman's rho between the two rankings: {rho:.3f} over {adv['n_methods']} methods"
                   + (f" (exact permutation p = {p:.3f})" if p is not None else "") + "."
                   if rho is not None else f"Spearman's rho: n/a ({adv['n_methods']} method(s) with GCG; it needs "
                                           f"3 or more, with differing values)."), ""]
    return lines


def _csm_table(data: dict) -> list[str]:
    rates = {m: s["csm_trigger_rate"] for m, s in data["methods"].items() if s["csm_trigger_rate"]}
    if not rates:
        return []
    domains = list(dict.fromkeys(d for r in rates.values() for d in r if d != "all")) + ["all"]
    lines = ["### CSM trigger rate per domain (runs whose monitor fell below the threshold after that domain)", "",
             "| method | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for method, r in rates.items():
        cells = [f"{r[d]['triggered']}/{r[d]['n']} ({100 * r[d]['rate']:.0f}%)" if d in r else "n/a" for d in domains]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines + [""]


def _cost_table(data: dict) -> list[str]:
    std = data["standard"]
    lines = [f"### Domain-task cost against Standard (mean final domain score minus {std or 'Standard'}'s; "
             "bootstrap over runs)", "", "| method | mean final domain score [95% CI] | minus Standard [95% CI] |",
             "|---|---|---|"]
    for method, s in data["methods"].items():
        cost = s["domain_score"].get("cost_vs_standard")
        lines.append(f"| {method} | {_cell(s['domain_score']['final_mean'])} | "
                     f"{'reference' if method == std else _diff_cell(cost) if std else 'n/a (no Standard run)'} |")
    return lines + [""]


def _composite_table(data: dict, by_method: dict) -> list[str]:
    lines = ["### Composite safety (Eq. 8), final step", "",
             "| method | composite safety [95% CI] | HarmBench | TruthfulQA | BBQ bias |", "|---|---|---|---|---|"]
    note = ""
    for method, s in data["methods"].items():
        if "composite_safety" not in s:
            continue
        inp = s.get("composite_inputs") or {}
        lines.append(f"| {method} | {_cell(s['composite_safety']['final'])} | "
                     + " | ".join(_cell(inp.get(k), ci=False) for k in ("harmbench", "truthfulqa", "bbq_bias")) + " |")
        note = note or composite_note(by_method[method][0])
    return lines + ["", note, ""]


def _difference_table(data: dict) -> list[str]:
    from .stats import LABELS

    if not data["differences"]:
        return []
    metrics = [m for m in data["metrics"] if any(d["metric"] == m for d in data["differences"])]
    pairs = list(dict.fromkeys((d["a"], d["b"]) for d in data["differences"]))
    index = {(d["a"], d["b"], d["metric"]): d for d in data["differences"]}
    lines = ["### Differences between methods, final value (A minus B [95% CI]; n.d. = not distinguishable)", "",
             "| A | B | " + " | ".join(LABELS[m] for m in metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for a, b in pairs:
        lines.append(f"| {a} | {b} | " + " | ".join(_diff_cell(index.get((a, b, m))) for m in metrics) + " |")
    return lines + [""]


def plot_comparison(path: Path, data: dict) -> None:
    """One panel per metric: each method's mean per step with its 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .stats import LABELS

    metrics = data["metrics"]
    steps = _common_steps(data)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for method, s in data["methods"].items():
            if metric not in s:
                continue
            traj = s[metric]["trajectory"]
            xs = list(range(len(traj)))
            mean = [e["mean"] if e["mean"] is not None else float("nan") for e in traj]
            line, = ax.plot(xs, mean, marker="o", label=f"{method} (n={s['runs']})")
            lo = [e["ci"][0] if e.get("ci") else float("nan") for e in traj]
            hi = [e["ci"][1] if e.get("ci") else float("nan") for e in traj]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_xticks(range(len(steps)), steps, fontsize=7)
        ax.set_ylim(-3, 103)
        ax.set_title(LABELS[metric], fontsize=9)
        ax.set_xlabel("after")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean over runs, 95% band")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
