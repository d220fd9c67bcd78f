"""results.md (trajectory table like the paper's) and refusal.png from results.json; comparison.md.

Refusal and over-refusal come from the refusal judge; a "harmful response %" column (and line in the
plot) appears when the run had a harm judge (``eval.harm_judge``)."""
from __future__ import annotations

from pathlib import Path


def _has_harm(results: dict) -> bool:
    return any(s.get("harmful_response_rate") is not None for s in results["steps"])


def trajectory_rows(results: dict) -> list[str]:
    """The trajectory table; a "harmful response %" column (the harm judge's) when the run had one."""
    steps = results["steps"]
    domains = results["domains"]
    harm = _has_harm(results)
    head = ("| after | refusal % | Δ pts | over-refusal % | " + ("harmful response % | " if harm else "")
            + " | ".join(f"{d} score" for d in domains) + " |")
    rows = [head, "|" + "---|" * (4 + harm + len(domains))]
    prev = None
    for s in steps:
        delta = "" if prev is None else f"{s['refusal_rate'] - prev:+.1f}"
        prev = s["refusal_rate"]
        scores = " | ".join(f"{s['domain_scores'].get(d, float('nan')):.1f}" for d in domains)
        hr = s.get("harmful_response_rate")
        harm_cell = ("n/a | " if hr is None else f"{hr:.1f} | ") if harm else ""
        rows.append(f"| {s['after']} | {s['refusal_rate']:.1f} | {delta} | {s['over_refusal_rate']:.1f} | {harm_cell}"
                    f"{scores} |")
    return rows


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
             f"retained, {s['pts_per_step']:+.1f} pts/step). Domain score = held-out response-token accuracy %.", ""]
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
        if _has_harm(res):
            ax.plot(range(len(xs)), [s.get("harmful_response_rate", float("nan")) for s in res["steps"]], marker="^",
                    linestyle="--", label=f"{name} harmful response")
        ax.set_xticks(range(len(xs)), xs)
    ax.set_ylim(-3, 103)
    ax.set_ylabel("% of prompts")
    ax.set_xlabel("after")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(out: Path, runs: dict) -> Path:
    """comparison.md (+ comparison.png) over several runs: mean ± sample std (ddof 1) over seeds per method."""
    import numpy as np

    by_method: dict[str, list[dict]] = {}
    for (method, _seed), res in runs.items():
        by_method.setdefault(method, []).append(res)
    harm = any(_has_harm(r) for r in runs.values())
    lines = ["| method | seeds | base refusal % | final refusal % | % retained | pts/step | final over-refusal % | "
             + ("base harmful response % | final harmful response % | " if harm else "")
             + "mean final domain score | train s | wall s |", "|" + "---|" * (10 + 2 * harm)]

    def ms(values):
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

    for method, results in by_method.items():
        sums = [summary(r) for r in results]
        final_scores = [float(np.mean(list(r["steps"][-1]["domain_scores"].values()))) for r in results]
        train_s = [sum(s.get("train", {}).get("seconds", 0) for s in r["steps"]) for r in results]
        wall_s = [wall_seconds(r) for r in results]
        lines.append(f"| {method} | {len(results)} | {ms([s['base_refusal'] for s in sums])} | "
                     f"{ms([s['final_refusal'] for s in sums])} | {ms([s['retained_pct'] for s in sums])} | "
                     f"{ms([s['pts_per_step'] for s in sums])} | "
                     f"{ms([r['steps'][-1]['over_refusal_rate'] for r in results])} | "
                     + (f"{ms([r['steps'][0].get('harmful_response_rate') for r in results])} | "
                        f"{ms([r['steps'][-1].get('harmful_response_rate') for r in results])} | " if harm else "")
                     + f"{ms(final_scores)} | {ms(train_s)} | {ms(wall_s)} |")
    lines += ["", "Trajectories (first seed of each method):", ""]
    for method, results in by_method.items():
        lines += [f"**{method}**", "", *trajectory_rows(results[0]), ""]
    path = Path(out) / "comparison.md"
    path.write_text("\n".join(lines))
    plot_refusal(Path(out) / "comparison.png", {m: r[0] for m, r in by_method.items()})
    return path
