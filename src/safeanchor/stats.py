"""The statistics behind ``comparison.json`` / ``comparison.md``: pure functions over results dicts.

- **Wilson interval** (Wilson 1927) for one proportion of prompts: ``refusal_rate`` is a % of
  ``n_probe`` prompts, ``over_refusal_rate`` of ``n_benign`` (both recorded in results.json).
- **Seeded bootstrap over runs and prompts** for a mean over runs and for the difference of two
  methods' means (hierarchical resampling, Davison & Hinkley 1997, sec. 3.8; prompts shared by runs
  make it a crossed design, Owen 2007, "The pigeonhole bootstrap"). Each replicate resamples the runs
  (seeds x orderings) of a method with replacement and the prompts with replacement:
  - where every run's per-prompt labels are known (``generations/<k>-<after>.jsonl``) and the runs share
    their prompts, one resampling of the prompts serves all runs, and both methods of a difference
    (paired by prompt);
  - labels rebuilt from a rate and its n (no generations file) are resampled together for a mean (the
    widest case, as if the runs agreed on which prompts they refuse) and per run for a difference (for
    0/1 labels a Binomial(n, rate) draw);
  - a score with no per-prompt parts (composite safety, domain score) is resampled over runs only; from a
    single run it has no interval (null, shown n/a) and its difference is neither distinguishable nor not.
  95% percentile intervals; a rate's interval is never narrower than one run's Wilson interval at the
  mean rate (a rate that is 0 in every run would get [0, 0]). Two methods are *not distinguishable* when
  the interval of their difference contains 0.
- Per method (``method_summary``): the per-step trajectory (mean ± sample sd over runs, interval), final
  value, % retained, per-step slopes (points per step for each step), ``cross_ordering_sd`` (sd over
  orderings of the per-ordering mean final value) and ``within_ordering_seed_sd`` (mean over orderings
  of the sd over seeds), the CSM trigger rate per domain, and the final mean domain score.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Z95 = 1.959963984540054  # the 97.5% normal quantile
LEVEL = 0.95
N_BOOT = 2000
BOOT_SEED = 0

# rate metric -> (generations "set", label key, label value that counts, results key of the number of prompts)
RATE_METRICS = {
    "refusal_rate": ("harmful", "label", 1, "n_probe"),
    "over_refusal_rate": ("benign", "label", 1, "n_benign"),
    "harmful_response_rate": ("harmful", "harm_label", 0, "n_probe"),
    "heldout_refusal_rate": ("heldout", "label", 1, "n_heldout"),
}
SCORE_METRICS = ("composite_safety",)
METRICS = (*RATE_METRICS, *SCORE_METRICS)
LABELS = {"refusal_rate": "refusal %", "over_refusal_rate": "over-refusal %",
          "harmful_response_rate": "harmful response %",
          "heldout_refusal_rate": "held-out-style refusal %", "composite_safety": "composite safety"}


# -- intervals ---------------------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion k / n (as fractions in [0, 1])."""
    if n <= 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (0.0 if k == 0 else max(0.0, center - half)), (1.0 if k == n else min(1.0, center + half))


def refusal_cell(labels) -> dict:
    """``{"refusal_rate", "n", "ci95"}`` (%, 2 decimals; Wilson 95%) of judge labels, 1 = refused."""
    k, n = sum(1 for x in labels if x == 1), len(labels)
    lo, hi = wilson(k, n)
    return {"refusal_rate": round(100 * k / n, 2) if n else None, "n": n,
            "ci95": [round(100 * lo, 2), round(100 * hi, 2)]}


def wilson_pct(rate: float | None, n: int | None) -> tuple[float, float] | None:
    """The Wilson 95% interval (in %) of a rate (in %) of ``n`` prompts; None without ``n``."""
    if rate is None or not n:
        return None
    lo, hi = wilson(round(rate * n / 100.0), int(n))
    return 100.0 * lo, 100.0 * hi


def fmt_ci(ci, digits: int = 1) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


@dataclass
class Sample:
    """One run's measurement at one step: per-prompt values (0/1 labels, or one value for a score), as
    fractions; ``prompts`` (in the order of ``values``) when they were read from the generations file."""
    values: np.ndarray
    prompts: tuple | None = None


def _aligned(samples: list[Sample]) -> bool:
    """Every sample has the same known prompts (in the same order): one prompt resampling serves them all."""
    first = samples[0].prompts if samples else None
    return bool(first) and len(first) > 1 and all(s.prompts == first for s in samples)


def _same_unknown_prompts(samples: list[Sample]) -> bool:
    """Labels rebuilt from rates (no generations file), all of one length: the runs measured the same n prompts
    but which ones each refused is unknown; resampling them together with the labels sorted assumes the runs
    agree as much as they can, the widest interval for a mean."""
    n = len(samples[0].values) if samples else 0
    return n > 1 and all(s.prompts is None and len(s.values) == n for s in samples)


def _rng(seed: int, *key) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(repr(key).encode())])


def _replicates(samples: list[Sample], rng: np.random.Generator, n_boot: int,
                weights: np.ndarray | None = None) -> np.ndarray:
    """(n_boot,) bootstrap replicates of the mean over runs of each run's mean: runs resampled with
    replacement, then prompts (``weights``: shared multinomial counts of shape (n_boot, P); else per run)."""
    r = len(samples)
    pick = rng.integers(0, r, (n_boot, r))
    if weights is not None:
        matrix = np.stack([s.values for s in samples])  # (R, P)
        means = weights @ matrix.T / matrix.shape[1]  # (n_boot, R): every run at the shared resampled prompts
        return np.take_along_axis(means, pick, 1).mean(1)
    means = np.array([s.values.mean() for s in samples])
    sizes = np.array([len(s.values) for s in samples])
    binary = np.array([len(s.values) > 1 and bool(np.isin(s.values, (0.0, 1.0)).all()) for s in samples])
    draws = means[pick]  # a one-value run (a score) is its value
    mask = binary[pick]
    draws[mask] = rng.binomial(sizes[pick][mask], draws[mask]) / sizes[pick][mask]  # 0/1 labels: Binomial(n, p)
    for j in np.flatnonzero((sizes > 1) & ~binary):  # other per-prompt values: resample them
        slots = pick == j
        v = samples[j].values
        draws[slots] = v[rng.integers(0, len(v), (int(slots.sum()), len(v)))].mean(1)
    return draws.mean(1)


def _shared_weights(p: int, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    return rng.multinomial(p, np.full(p, 1.0 / p), n_boot).astype(float)


def _no_spread(samples: list[Sample]) -> bool:
    """One run of a score that has no per-prompt parts (one value): resampling it gives a point, not an
    interval."""
    return len(samples) < 2 and all(len(s.values) == 1 for s in samples)


def boot_mean(samples: list[Sample], n_boot: int = N_BOOT, seed: int = BOOT_SEED, key=(),
              scale: float = 100.0) -> tuple[float, float] | None:
    """The bootstrap 95% interval of the mean over runs (x ``scale``)."""
    samples = [s for s in samples if s is not None and len(s.values)]
    if not samples or _no_spread(samples):
        return None
    rng = _rng(seed, "mean", *key)
    shared = _aligned(samples) or _same_unknown_prompts(samples)
    weights = _shared_weights(len(samples[0].values), rng, n_boot) if shared else None
    reps = _replicates(samples, rng, n_boot, weights) * scale
    lo, hi = np.percentile(reps, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return float(lo), float(hi)


def boot_diff(a: list[Sample], b: list[Sample], n_boot: int = N_BOOT, seed: int = BOOT_SEED, key=(),
              scale: float = 100.0) -> dict | None:
    """Mean of ``a`` minus mean of ``b`` (x ``scale``), its bootstrap 95% interval, and whether the two are
    distinguishable (the interval excludes 0). Prompts are paired when all runs of both share them."""
    a = [s for s in a if s is not None and len(s.values)]
    b = [s for s in b if s is not None and len(s.values)]
    if not a or not b:
        return None
    diff = scale * (float(np.mean([s.values.mean() for s in a])) - float(np.mean([s.values.mean() for s in b])))
    if _no_spread(a) or _no_spread(b):  # the interval would be a point, and "distinguishable" always true
        return {"diff": round(diff, 3), "ci": None, "distinguishable": None, "paired_prompts": False,
                "note": "a score without per-prompt parts from a single run has no interval"}
    rng = _rng(seed, "diff", *key)
    paired = _aligned(a + b)
    weights = _shared_weights(len(a[0].values), rng, n_boot) if paired else None
    reps = (_replicates(a, rng, n_boot, weights) - _replicates(b, rng, n_boot, weights)) * scale
    lo, hi = (float(x) for x in np.percentile(reps, [50 * (1 - LEVEL), 50 * (1 + LEVEL)]))
    return {"diff": round(diff, 3), "ci": [round(lo, 3), round(hi, 3)], "distinguishable": not (lo <= 0.0 <= hi),
            "paired_prompts": paired}


# -- reading runs ------------------------------------------------------------------------------------------
@dataclass
class RunData:
    """A run's results.json and, when its directory is known, its per-prompt records per step."""
    results: dict
    generations: dict | None = None  # step index -> the records of generations/<k>-<after>.jsonl


def load_generations(run_dir: Path | str, results: dict) -> dict | None:
    """Step index -> records ({set, prompt, completion, label[, harm_label]}) of every step whose
    generations file exists; None when none does."""
    out = {}
    for k, step in enumerate(results.get("steps", [])):
        path = Path(run_dir) / "generations" / f"{k}-{step.get('after')}.jsonl"
        if path.is_file():
            out[k] = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out or None


def value(results: dict, metric: str, k: int) -> float | None:
    steps = results.get("steps", [])
    v = steps[k].get(metric) if -len(steps) <= k < len(steps) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def sample(run: RunData, metric: str, k: int) -> Sample | None:
    """The run's per-prompt labels for ``metric`` at step ``k`` (from its generations file when their count
    matches the recorded rate's; else 0/1 labels rebuilt from the rate and its n); a score: one value."""
    v = value(run.results, metric, k)
    if v is None:
        return None
    if metric not in RATE_METRICS:
        return Sample(np.array([v / 100.0]))
    kind, key, hit, n_key = RATE_METRICS[metric]
    recs = (run.generations or {}).get(k)
    if recs:
        pairs = sorted((r["prompt"], 1.0 if r.get(key) == hit else 0.0) for r in recs if r.get("set") == kind)
        if pairs and abs(100.0 * sum(x for _, x in pairs) / len(pairs) - v) <= 0.011:  # the file is this number's
            return Sample(np.array([x for _, x in pairs]), tuple(p for p, _ in pairs))
    n = run.results["steps"][k].get(n_key)
    if not n:
        return Sample(np.array([v / 100.0]))
    hits = int(round(v * n / 100.0))
    return Sample(np.array([1.0] * hits + [0.0] * (int(n) - hits)))


def _ms(values) -> dict:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "sd": None, "n": 0}
    sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return {"mean": round(float(np.mean(vals)), 4), "sd": None if sd is None else round(sd, 4), "n": len(vals)}


def final_domain_score(results: dict) -> float | None:
    scores = [float(v) for v in (results["steps"][-1].get("domain_scores") or {}).values()
              if isinstance(v, (int, float)) and not math.isnan(v)]
    return float(np.mean(scores)) if scores else None


def _sd(values) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


# -- per method --------------------------------------------------------------------------------------------
def step_labels(runs: list[RunData]) -> list[str]:
    """"base" + the domains when every run has the same ordering, else "base", "1", ..., "T"."""
    orders = {tuple(r.results["domains"]) for r in runs}
    n = len(runs[0].results["steps"])
    if len(orders) == 1 and len(next(iter(orders))) == n - 1:
        return ["base", *next(iter(orders))]
    return ["base", *[str(t) for t in range(1, n)]]


def metric_summary(runs: list[RunData], metric: str, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                   key=()) -> dict | None:
    """Trajectory, final, % retained, slopes and the ordering-invariance numbers of one metric (None when
    no run has it)."""
    n_steps = len(runs[0].results["steps"])
    if not any(value(r.results, metric, k) is not None for r in runs for k in range(n_steps)):
        return None
    labels = step_labels(runs)
    traj = []
    for k in range(n_steps):
        vals = [value(r.results, metric, k) for r in runs]
        samples = [x for r in runs if (x := sample(r, metric, k)) is not None]
        ci = boot_mean(samples, n_boot, seed, (*key, metric, k))
        if ci is not None and metric in RATE_METRICS and all(len(x.values) > 1 for x in samples):
            # never narrower than one run's Wilson interval at the mean rate: a percentile bootstrap of a rate
            # that is 0 (or 100) in every run is the single point [0, 0]
            n = int(np.median([len(x.values) for x in samples]))
            w = wilson_pct(float(np.mean([x.values.mean() for x in samples])) * 100.0, n)
            ci = (min(ci[0], w[0]), max(ci[1], w[1]))
        traj.append({"step": k, "after": labels[k], **_ms(vals), "ci": None if ci is None else
                     [round(ci[0], 3), round(ci[1], 3)]})
    finals = [value(r.results, metric, -1) for r in runs]
    bases = [value(r.results, metric, 0) for r in runs]
    retained = [100.0 * f / b if f is not None and b else None for f, b in zip(finals, bases)]
    slopes = []
    for t in range(1, n_steps):
        diffs = [None if (x := value(r.results, metric, t)) is None or (y := value(r.results, metric, t - 1)) is None
                 else x - y for r in runs]
        slopes.append({"step": t, **_ms(diffs)})
    per_step = [(f - b) / (n_steps - 1) if f is not None and b is not None and n_steps > 1 else None
                for f, b in zip(finals, bases)]
    by_order: dict[tuple, list[float]] = {}
    for r, f in zip(runs, finals):
        if f is not None:
            by_order.setdefault(tuple(r.results["domains"]), []).append(f)
    order_means = [float(np.mean(v)) for v in by_order.values()]
    seed_sds = [s for v in by_order.values() if (s := _sd(v)) is not None]
    cross = _sd(order_means)
    within = float(np.mean(seed_sds)) if seed_sds else None
    return {"trajectory": traj, "base": traj[0], "final": traj[-1], "retained_pct": _ms(retained),
            "slopes": slopes, "pts_per_step": _ms(per_step), "n_orderings": len(by_order),
            "seeds_per_ordering": sorted({len(v) for v in by_order.values()}),
            "cross_ordering_sd": None if cross is None else round(cross, 4),
            "within_ordering_seed_sd": None if within is None else round(within, 4)}


def csm_trigger_rates(runs: list[RunData]) -> dict:
    """Domain -> {triggered, n, rate} from steps[].method.csm.triggered where recorded ({} if never)."""
    out: dict[str, dict] = {}
    for r in runs:
        for step in r.results["steps"][1:]:
            csm = (step.get("method") or {}).get("csm")
            if isinstance(csm, dict) and "triggered" in csm:
                d = out.setdefault(step["after"], {"triggered": 0, "n": 0})
                d["triggered"] += int(bool(csm["triggered"]))
                d["n"] += 1
    if out:
        total = {"triggered": sum(d["triggered"] for d in out.values()), "n": sum(d["n"] for d in out.values())}
        out["all"] = total
    for d in out.values():
        d["rate"] = round(d["triggered"] / d["n"], 4)
    return out


def composite_inputs(runs: list[RunData]) -> dict | None:
    """Mean final inputs of Eq. 8's composite (HarmBench, TruthfulQA, BBQ bias), from each run's last step."""
    rows = []
    for r in runs:
        last = r.results["steps"][-1]
        inputs = (last.get("composite") or {}).get("inputs")
        if inputs:
            rows.append({k: (v or {}).get("value") for k, v in inputs.items()})
        elif last.get("composite_safety") is not None:
            suite = last.get("suite") or {}
            rows.append({"harmbench": (suite.get("harmbench") or {}).get("score"),
                         "truthfulqa": (suite.get("truthfulqa") or {}).get("mc2"),
                         "bbq_bias": (suite.get("bbq") or {}).get("bias")})
    if not rows:
        return None
    return {k: _ms([row.get(k) for row in rows]) for k in ("harmbench", "truthfulqa", "bbq_bias")}


def method_summary(runs: list[RunData], metrics=METRICS, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                   label: str = "") -> dict:
    from .errors import SafeAnchorError

    lengths = {len(r.results["steps"]) for r in runs}
    if len(lengths) > 1:
        raise SafeAnchorError(f"the runs of {label!r} have different numbers of steps ({sorted(lengths)}): one is "
                              f"unfinished or has other domains; finish it (rerun its command) or leave it out")
    out = {"runs": len(runs), "seeds": sorted({r.results["seed"] for r in runs}, key=str),
           "orderings": [list(o) for o in dict.fromkeys(tuple(r.results["domains"]) for r in runs)],
           "steps": step_labels(runs)}
    for metric in metrics:
        s = metric_summary(runs, metric, n_boot, seed, (label,))
        if s is not None:
            out[metric] = s
    scores = [final_domain_score(r.results) for r in runs]
    ci = boot_mean([None if v is None else Sample(np.array([v / 100.0])) for v in scores], n_boot, seed,
                   (label, "domain_score"))
    out["domain_score"] = {"final_mean": {**_ms(scores), "ci": None if ci is None else [round(x, 3) for x in ci]}}
    out["csm_trigger_rate"] = csm_trigger_rates(runs)
    comp = composite_inputs(runs)
    if comp is not None:
        out["composite_inputs"] = comp
    return out


def _final_samples(runs: list[RunData], metric: str) -> list[Sample]:
    return [s for r in runs if (s := sample(r, metric, len(r.results["steps"]) - 1)) is not None]


def standard_label(groups: dict[str, list[RunData]]) -> str | None:
    """The group that is Standard LoRA: the label 'standard', else the first whose runs are all method standard."""
    if "standard" in groups:
        return "standard"
    return next((g for g, runs in groups.items() if all(r.results.get("method") == "standard" for r in runs)), None)


def compare_stats(groups: dict[str, list[RunData]], n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """comparison.json's content: per method summaries, the domain-score cost against Standard, and every
    pairwise final-value difference with its interval and verdict."""
    methods = {g: method_summary(runs, n_boot=n_boot, seed=seed, label=g) for g, runs in groups.items()}
    std = standard_label(groups)
    for g, runs in groups.items():
        if std is None:
            methods[g]["domain_score"]["cost_vs_standard"] = None
            continue
        mk = [Sample(np.array([v / 100.0])) for r in runs if (v := final_domain_score(r.results)) is not None]
        sk = [Sample(np.array([v / 100.0])) for r in groups[std] if (v := final_domain_score(r.results)) is not None]
        methods[g]["domain_score"]["cost_vs_standard"] = boot_diff(mk, sk, n_boot, seed, (g, std, "domain_score"))
    diffs = []
    names = list(groups)
    for metric in METRICS:
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if metric not in methods[a] or metric not in methods[b]:
                    continue
                d = boot_diff(_final_samples(groups[a], metric), _final_samples(groups[b], metric), n_boot, seed,
                              (a, b, metric))
                if d is not None:
                    diffs.append({"metric": metric, "a": a, "b": b, **d})
    return {"metrics": [m for m in METRICS if any(m in s for s in methods.values())], "standard": std,
            "interval": {"level": LEVEL, "proportion": "Wilson (one run, one step)",
                         "mean_and_difference": "percentile bootstrap over runs (seeds x orderings) and prompts",
                         "replicates": n_boot, "seed": seed},
            "methods": methods, "differences": diffs}


# -- adversarial vs benign ranking (GCG after the last domain) ---------------------------------------------

def midranks(values) -> np.ndarray:
    """Ranks 1..n of ``values``, ties given the mean of the ranks they span."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float | None:
    """Spearman's rho: Pearson's correlation of the midranks; None for n < 3 or a constant side."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    if len(x) < 3:
        return None
    rx, ry = midranks(x), midranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return None if denom == 0 else float((rx * ry).sum() / denom)


def spearman_exact_p(x, y, max_n: int = 9) -> float | None:
    """Two-sided exact permutation p-value of Spearman's rho (share of the n! pairings of ``y`` with ``x``
    whose |rho| is at least the observed one); None when rho is undefined or n > ``max_n``."""
    import itertools

    rho = spearman(x, y)
    if rho is None or len(x) > max_n:
        return None
    rx, ry = midranks(x), midranks(y)  # ranks of a permuted y are the permuted ranks: computed once
    rx, ry = rx - rx.mean(), ry - ry.mean()
    perms = np.array(list(itertools.permutations(range(len(ry)))))
    r = ry[perms] @ rx / math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float(np.mean(np.abs(r) >= abs(rho) - 1e-12))


GCG_METRIC = "refusal_rate_attack"


def final_gcg(run_dir: Path | str, results: dict) -> dict | None:
    """The GCG metrics of the run's last step under ``<run>/suite`` (``safeanchor eval --run RUN --tasks gcg
    --steps last``); None when there are none (or the task failed)."""
    k, after = len(results["steps"]) - 1, results["steps"][-1]["after"]
    path = Path(run_dir) / "suite" / f"{k}-{after}" / "metrics.json"
    if not path.is_file():
        return None
    gcg = json.loads(path.read_text()).get("tasks", {}).get("gcg")
    return gcg if gcg and "error" not in gcg else None


def adversarial_ranking(groups: dict[str, list[tuple[dict, dict]]]) -> dict | None:
    """GCG refusal after the last domain per method against its benign (HarmBench probe) final refusal.

    ``groups``: label -> [(results, GCG metrics of its final step)] for the runs that have GCG. Per method:
    the mean over those runs of the refusal under attack (its pooled prompts' Wilson interval) and of the
    final benign refusal of the same runs, each method's rank on both (midranks, 1 = least refusal), and
    over methods Spearman's rho of the two with its exact permutation p-value. None without GCG results."""
    rows = {}
    for label, pairs in groups.items():
        pairs = [(r, g) for r, g in pairs if g is not None and GCG_METRIC in g]
        if not pairs:
            continue
        attack = [g[GCG_METRIC] for _, g in pairs]
        n = sum(int(g.get("n", 0)) for _, g in pairs)
        k = round(sum(g[GCG_METRIC] / 100.0 * g.get("n", 0) for _, g in pairs))
        lo, hi = wilson(k, n) if n else (None, None)
        rows[label] = {"gcg_refusal": round(float(np.mean(attack)), 2),
                       "gcg_refusal_clean": round(float(np.mean([g.get("refusal_rate_clean", float("nan"))
                                                                 for _, g in pairs])), 2),
                       "ci": [round(100 * lo, 1), round(100 * hi, 1)] if n else None, "n_prompts": n,
                       "benign_refusal": round(float(np.mean([r["steps"][-1]["refusal_rate"] for r, _ in pairs])), 2),
                       "n_runs": len(pairs), "preset": pairs[0][1].get("preset")}
    if not rows:
        return None
    labels = list(rows)
    gcg = [rows[m]["gcg_refusal"] for m in labels]
    benign = [rows[m]["benign_refusal"] for m in labels]
    for m, a, b in zip(labels, midranks(gcg), midranks(benign)):
        rows[m]["rank_gcg"], rows[m]["rank_benign"] = float(a), float(b)
    rho = spearman(benign, gcg)
    return {"attack": "gcg", "metric": f"{GCG_METRIC} (% refused under the GCG suffix, after the last domain)",
            "benign_metric": "refusal_rate after the last domain (HarmBench probe, no attack)",
            "methods": rows, "n_methods": len(labels),
            "spearman_rho": None if rho is None else round(rho, 4), "p_exact": spearman_exact_p(benign, gcg),
            "note": "rho is over methods (each a mean over its runs with GCG); it needs 3 or more methods"}
