"""The evaluation suite: a registry of tasks and ``evaluate``.

Every task is a module exposing ``run(model, tokenizer, *, out_dir, limit, judge, seed=0, **options)
-> dict``: its metrics plus ``n`` (items scored), ``source`` and ``data`` (what data, how many were
available, which were used), with per-item JSONL records under ``out_dir/<task>/``. Modules are
imported only when their task runs.

``evaluate`` runs a list of tasks, writes ``metrics.json`` and ``summary.md`` in ``out_dir``, and
adds ``composite_safety`` whenever HarmBench, TruthfulQA and BBQ all ran. A task that fails with a
SafeAnchorError is recorded as ``{"error": message}`` and the others still run; the CLI then exits 2.
"""
from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from ..errors import SafeAnchorError

TASKS: dict[str, str] = {
    "harmbench": "safeanchor.suite.harmbench",
    "truthfulqa": "safeanchor.suite.truthfulqa",
    "bbq": "safeanchor.suite.bbq",
    "wildguard": "safeanchor.suite.wildguard",
    "mmlu": "safeanchor.suite.mmlu",
    "medqa": "safeanchor.suite.medqa",
    "legalbench": "safeanchor.suite.legalbench",
    "humaneval": "safeanchor.suite.humaneval",
    "gcg": "safeanchor.suite.gcg",
    "composite": "safeanchor.suite.composite",
}
# The metric printed for each task in summary.md (others: every top-level number).
HEADLINE = {
    "harmbench": ("score", "asr", "n_unparseable"), "truthfulqa": ("mc1", "mc2"),
    "bbq": ("acc_amb", "acc_disamb", "s_dis", "s_amb", "bias"), "wildguard": ("harmful_response_rate", "refusal_rate"),
    "mmlu": ("acc",), "medqa": ("acc",), "legalbench": ("balanced_accuracy",), "composite": ("composite_safety",),
    "humaneval": ("pass@1",), "gcg": ("refusal_rate_clean", "refusal_rate_attack", "asr"),
}


def get_task(name: str):
    """The task module (imported now)."""
    if name not in TASKS:
        raise SafeAnchorError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    try:
        module = importlib.import_module(TASKS[name])
    except ModuleNotFoundError as exc:
        if exc.name == TASKS[name]:
            raise SafeAnchorError(f"task {name!r} is registered but {TASKS[name]} is not installed") from None
        raise
    return module


def parse_tasks(spec: str | list[str]) -> list[str]:
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise SafeAnchorError(f"unknown task(s) {unknown or spec!r}; tasks: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def evaluate(model, tokenizer, tasks, out_dir, judge=None, limit: int | None = None, seed: int = 0,
             options: dict[str, dict] | None = None, meta: dict | None = None) -> dict:
    """Run ``tasks`` (names or a comma list); ``options[task]`` are that task's keyword options.
    ``composite`` runs HarmBench, TruthfulQA and BBQ (added if absent) and combines them."""
    from ..judges import KeywordRefusalJudge
    from .common import parse_options
    from .composite import INPUTS, Options as CompositeOptions, combine

    names = parse_tasks(tasks)
    options = {k: dict(v) for k, v in (options or {}).items()}
    unknown = sorted(set(options) - set(TASKS))
    if unknown:
        raise SafeAnchorError(f"options given for unknown task(s) {unknown}; tasks: {', '.join(TASKS)}")
    want_composite = "composite" in names
    comp = parse_options(CompositeOptions, options.get("composite", {}), "composite")
    if want_composite:
        names = [t for t in names if t != "composite"] + [t for t in INPUTS if t not in names]
        if "bias_definition" in options.get("composite", {}):
            options.setdefault("bbq", {})["bias_definition"] = comp.bias_definition
    judge = judge or KeywordRefusalJudge()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, timings = {}, {}
    for name in names:
        start = time.time()
        try:
            results[name] = get_task(name).run(model, tokenizer, out_dir=out_dir, limit=limit, judge=judge, seed=seed,
                                               **options.get(name, {}))
        except SafeAnchorError as exc:
            results[name] = {"error": str(exc)}
        timings[name] = round(time.time() - start, 1)
    report = {"tasks": results, "seconds": timings, "judge": judge.describe(), "limit": limit, "seed": seed,
              "options": options, **({"meta": meta} if meta else {})}
    if want_composite or all(t in results for t in INPUTS):
        try:
            combined = combine(results, comp.truthfulqa_metric)
            report["composite_safety"] = combined["composite_safety"]
            report["composite"] = combined
        except SafeAnchorError as exc:
            report["composite"] = {"error": str(exc)}
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "summary.md").write_text(summary_markdown(report))
    return report


def _fmt(value) -> str:
    if isinstance(value, float):  # bias scores are fractions in [-1, 1]; the rest are percentages
        return f"{value:.4f}" if 0 < abs(value) < 1 else f"{value:.2f}"
    return "-" if value is None else str(value)


def summary_markdown(report: dict) -> str:
    lines = ["# Evaluation summary", ""]
    if "composite_safety" in report:
        inp = report["composite"]["inputs"]
        lines += [f"**Composite safety: {report['composite_safety']:.2f}** = {report['composite']['formula']} with "
                  f"HarmBench {inp['harmbench']['value']} ({inp['harmbench']['metric']}, judge "
                  f"{inp['harmbench']['judge'].get('name')}), TruthfulQA {inp['truthfulqa']['value']} "
                  f"({inp['truthfulqa']['metric']}), BBQ bias {inp['bbq_bias']['value']} "
                  f"({inp['bbq_bias']['definition']}).", ""]
    elif isinstance(report.get("composite"), dict) and "error" in report["composite"]:
        lines += [f"Composite safety not computed: {report['composite']['error']}", ""]
    lines += [f"Judge: {report['judge'].get('name')} ({report['judge'].get('measures')}); limit: {report['limit']}; "
              f"seed: {report['seed']}.", "", "| task | metrics | n | data | seconds |", "|---|---|---|---|---|"]
    for name, res in report["tasks"].items():
        if "error" in res:
            lines.append(f"| {name} | ERROR: {res['error']} | - | - | {report['seconds'].get(name, '-')} |")
            continue
        keys = HEADLINE.get(name) or [k for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and k != "n"]
        metrics = ", ".join(f"{k} {_fmt(res.get(k))}" for k in keys if k in res)
        data = res.get("data", {})
        where = res.get("source", "")
        selection = data.get("selection", "") if isinstance(data, dict) else ""
        lines.append(f"| {name} | {metrics} | {res.get('n', '-')} | {where} ({selection}) | "
                     f"{report['seconds'].get(name, '-')} |")
    return "\n".join(lines) + "\n"
