"""Fisher spectrum of the safety subspace: how many eigenvectors cover rho of tr(F_i) per LoRA module,
on the safety calibration set vs control data of the same size (`safeanchor spectrum`).

Controls, each with exactly as many examples as the calibration set:
  - ``random``: random token ids with the same prompt / response lengths as the calibration examples
    (the chat template is kept, so only the content is random);
  - ``domain``: the first domain's training examples (benign task data).
A safety Fisher that is genuinely low-rank needs fewer eigenvectors than random data for the same
share of its trace; that is what SSI's "safety lives in a small subspace" premise predicts.

The Fisher is taken where SSI takes it (the aligned base with a freshly initialised LoRA): PEFT's B = 0
start makes every A-gradient zero there, so the spectrum is that of the B block (see SafeAnchor's
``refresh_every``).
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import torch

from . import subspace as ss
from .data.chat import encode

SOURCES = ("calibration", "random", "domain")


def _randomised(tokenizer, encoded: list[dict], seed: int) -> list[dict]:
    """Same lengths and label masks, response and prompt content replaced by random ordinary tokens."""
    g = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    out = []
    for e in encoded:
        ids = list(e["input_ids"])
        labels = list(e["labels"])
        # keep the chat header/footer tokens (the first 3 and the template's special tokens), randomise the rest
        for j in range(len(ids)):
            if ids[j] in special or j < 3:
                continue
            ids[j] = int(pool[torch.randint(len(pool), (1,), generator=g)])
            if labels[j] != -100:
                labels[j] = ids[j]
        out.append({"input_ids": ids, "labels": labels})
    return out


def spectrum_stats(grads: dict[str, torch.Tensor], rho: float) -> dict:
    ks, curves = {}, []
    for name, g in grads.items():
        basis = ss.fisher_basis(g, rho)
        ks[name] = int(basis.basis.shape[1])
        # cumulative share of the trace covered by the top-j eigenvectors (full Gram spectrum)
        lam = torch.linalg.eigvalsh(ss._gram(g)).flip(0).clamp_min(0)
        total = float(lam.sum())
        curves.append((lam.cumsum(0) / total).tolist() if total > 0 else [0.0] * len(lam))
    vals = list(ks.values())
    n = max(len(c) for c in curves)
    mean_curve = [statistics.fmean(c[min(j, len(c) - 1)] for c in curves) for j in range(n)]
    return {"k_mean": round(statistics.fmean(vals), 2), "k_min": min(vals), "k_max": max(vals),
            "k_median": statistics.median(vals), "per_module": ks, "mean_cumulative_share": mean_curve}


def model_at_ssi_point(cfg, progress=print):
    """(model with a fresh LoRA, tokenizer, aligned base dir or None): the model as the pipeline has it
    just before SSI (the aligned base when ``cfg.aligned``, seeded, LoRA attached)."""
    from .align import ensure_aligned
    from .models import attach_lora, load_model
    from .pipeline import seed_everything

    base_dir = ensure_aligned(cfg, progress=progress) if cfg.aligned else None
    seed_everything(cfg.seed, 0)
    model, tok = load_model(cfg.model, path=str(base_dir) if base_dir else None)
    return attach_lora(model, cfg.lora), tok, base_dir


def _spectrum_inputs(cfg, n: int | None, progress, need: int | None = None):
    """(model with a fresh LoRA, tokenizer, encoded examples per source, base dir, domain name): the first
    ``n`` calibration examples, their random-token twins, and as many of the first domain's. With ``need``,
    fewer than ``need`` examples of a source is an error, raised before any model loads."""
    from .data.domains import get_domain
    from .errors import SafeAnchorError
    from .data.splits import safety_sets

    calib, _ = safety_sets(cfg)
    if n:
        calib = calib[:n]
    domain = get_domain(cfg.data.domains[0])
    examples = domain.load("train", len(calib), seed=cfg.seed)
    if need is not None and min(len(calib), len(examples)) < need:
        have = min(len(calib), len(examples))
        raise SafeAnchorError(f"--sweep-ns {need}: only {have} examples available (calibration source "
                              f"{cfg.data.safety_source!r}: {len(calib)}, domain {domain.name!r}: {len(examples)}); "
                              f"sweep sizes up to {have}")
    model, tok, base_dir = model_at_ssi_point(cfg, progress)
    ml = cfg.train.max_length
    enc = {"calibration": [encode(tok, e["prompt"], e["response"], ml) for e in calib]}
    enc["random"] = _randomised(tok, enc["calibration"], cfg.seed)
    enc["domain"] = [encode(tok, e["prompt"], e["response"], ml) for e in examples]
    return model, tok, enc, base_dir, domain.name


def fisher_spectrum(cfg, out: Path, n: int | None = None, rho: float | None = None, progress=print) -> dict:
    """Compute, write (spectrum.json, spectrum.md, spectrum.png) and return the comparison."""
    rho = rho if rho is not None else 0.90
    out.mkdir(parents=True, exist_ok=True)
    model, tok, enc, base_dir, domain = _spectrum_inputs(cfg, n, progress)
    n = len(enc["calibration"])
    results = {"model": cfg.model.name, "base_model_dir": str(base_dir) if base_dir else None, "rho": rho,
               "examples": n, "domain": domain, "point": "aligned base, fresh LoRA (B = 0)", "sources": {}}
    for src in SOURCES:
        progress(f"spectrum: per-example gradients on {src} ({len(enc[src])} examples)")
        stats = spectrum_stats(ss.per_sample_grads_chunked(model, enc[src], tok.pad_token_id), rho)
        results["sources"][src] = stats
        progress(f"spectrum: {src}: k for {rho:.0%} of the trace: mean {stats['k_mean']}, "
                 f"min {stats['k_min']}, max {stats['k_max']}")
    (out / "spectrum.json").write_text(json.dumps(results, indent=2))
    _write_md(results, out / "spectrum.md")
    _plot(results, out / "spectrum.png")
    return results


def ns_sweep(cfg, out: Path, ns: list[int], rho: float | None = None, progress=print) -> dict:
    """The spectrum at several calibration sizes N_s in one pass (``safeanchor spectrum --sweep-ns``).

    Per-example gradients are taken once for max(ns) examples of each source; N_s = n uses the first n of
    them (nested sets: the n-example spectrum is exactly the one ``safeanchor spectrum --examples n`` gives
    on a calibration draw of max(ns)). Writes ns_sweep.json, ns_sweep.md and ns_sweep.png."""
    import dataclasses

    from .errors import SafeAnchorError

    rho = rho if rho is not None else 0.90
    ns = sorted(set(int(x) for x in ns))
    if not ns or ns[0] < 2:
        raise SafeAnchorError(f"--sweep-ns needs sizes >= 2 (got {ns}); e.g. --sweep-ns 16,32,64")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, calibration_size=max(ns)))
    model, tok, enc, base_dir, domain = _spectrum_inputs(cfg, max(ns), progress, need=max(ns))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    grads = {}
    for src in SOURCES:
        progress(f"ns-sweep: per-example gradients on {src} ({len(enc[src])} examples)")
        grads[src] = ss.per_sample_grads_chunked(model, enc[src], tok.pad_token_id)
    for n in ns:
        row = {"n_s": n, "sources": {}}
        for src in SOURCES:
            st = spectrum_stats({name: g[:n] for name, g in grads[src].items()}, rho)
            row["sources"][src] = {k: st[k] for k in ("k_mean", "k_median", "k_min", "k_max")}
            row["sources"][src]["k_share"] = round(st["k_mean"] / n, 4)
        rows.append(row)
        progress(f"ns-sweep: N_s = {n}: k mean " + ", ".join(f"{src} {row['sources'][src]['k_mean']}"
                                                            for src in SOURCES))
    results = {"model": cfg.model.name, "base_model_dir": str(base_dir) if base_dir else None, "rho": rho,
               "domain": domain, "point": "aligned base, fresh LoRA (B = 0)", "ns": ns, "rows": rows}
    (out / "ns_sweep.json").write_text(json.dumps(results, indent=2))
    names = {"calibration": "safety calibration", "random": "random tokens", "domain": f"domain ({domain})"}
    lines = [f"# Fisher spectrum against N_s ({cfg.model.name}, rho = {rho})", "",
             f"Eigenvectors per LoRA module for {rho:.0%} of tr(F_i) (mean, median, min-max; k/N_s = mean k over "
             f"N_s), at {results['point']}. Nested sets: N_s = n is the first n examples.", "",
             "| N_s | " + " | ".join(names[s] for s in SOURCES) + " | " + " | ".join(f"{s} k/N_s" for s in SOURCES)
             + " |", "|---:|" + "---|" * (2 * len(SOURCES))]
    for row in rows:
        cells = [f"{v['k_mean']} ({v['k_median']}, {v['k_min']}-{v['k_max']})" for v in row["sources"].values()]
        shares = [f"{v['k_share']:.2f}" for v in row["sources"].values()]
        lines.append(f"| {row['n_s']} | " + " | ".join(cells + shares) + " |")
    (out / "ns_sweep.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for src in SOURCES:
        ax.plot(ns, [r["sources"][src]["k_mean"] for r in rows], marker="o", label=names[src])
    ax.plot(ns, ns, color="grey", linestyle=":", linewidth=1, label="k = N_s")
    ax.set_xlabel("N_s (examples)")
    ax.set_ylabel(f"eigenvectors for {rho:.0%} of tr(F), mean")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ns_sweep.png", dpi=110)
    plt.close(fig)
    return results


# -- subspace drift: principal angles between successive safety bases ------------------------------------
def _basis_versions(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in (Path(run_dir) / "state").glob("safety_basis_v*.safetensors"):
        m = re.fullmatch(r"safety_basis_v(\d+)\.safetensors", path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def subspace_drift(run_dir: Path, out: Path, progress=print) -> dict:
    """Principal angles and Grassmann distance between SafeAnchor's safety bases after successive updates
    (``<run>/state/safety_basis_v<k>.safetensors``, written each time the subspace changes): per
    transition (v_k -> v_k+1, and v_1 -> v_k) the mean / max over modules, and per module the mean / max
    distance over transitions and the mean cos of the principal angles. Writes subspace_drift.json,
    subspace_drift.md and subspace_drift.png."""
    from .errors import SafeAnchorError
    from .safety_subspace import SafetySubspace

    run_dir, out = Path(run_dir), Path(out)
    versions = _basis_versions(run_dir)
    if len(versions) < 2:
        raise SafeAnchorError(f"{run_dir / 'state'} holds {len(versions)} safety_basis_v<k>.safetensors file(s); "
                              f"drift needs two or more: pass the directory of a SafeAnchor run that finished a domain")
    labels = {}
    res_path = run_dir / "results.json"
    if res_path.is_file():  # v1 = SSI on the base; with no in-domain refresh, v(t+1) = after domain t
        domains = json.loads(res_path.read_text()).get("domains", [])
        if len(versions) == len(domains) + 1 and [v for v, _ in versions] == list(range(1, len(domains) + 2)):
            labels = {1: "SSI (base)", **{t + 2: f"after {d}" for t, d in enumerate(domains)}}
    bases = {}
    for v, path in versions:
        bases[v] = SafetySubspace.load(path).bases
        progress(f"subspace-drift: v{v} ({labels.get(v, path.name)}): {len(bases[v])} modules")
    first = versions[0][0]

    def compare(a: int, b: int) -> dict:
        per = {}
        for name in sorted(set(bases[a]) & set(bases[b])):
            va, vb = bases[a][name].basis, bases[b][name].basis
            theta = ss.principal_angles(va, vb)
            per[name] = {"grassmann": float(theta.norm()), "mean_cos": float(torch.cos(theta).mean()) if len(theta)
                         else 1.0, "k": [int(va.shape[1]), int(vb.shape[1])]}
        d = [x["grassmann"] for x in per.values()]
        c = [x["mean_cos"] for x in per.values()]
        return {"from": a, "to": b, "from_label": labels.get(a, f"v{a}"), "to_label": labels.get(b, f"v{b}"),
                "modules": len(per), "grassmann_mean": round(statistics.fmean(d), 4) if d else None,
                "grassmann_max": round(max(d), 4) if d else None,
                "mean_cos": round(statistics.fmean(c), 4) if c else None,
                "k_mean": [round(statistics.fmean(x["k"][i] for x in per.values()), 2) if per else None
                           for i in (0, 1)], "per_module": per}

    vs = [v for v, _ in versions]
    successive = [compare(a, b) for a, b in zip(vs, vs[1:])]
    from_first = [compare(first, b) for b in vs[1:]]
    modules = sorted({m for t in successive for m in t["per_module"]})
    per_module = {}
    for m in modules:
        d = [t["per_module"][m]["grassmann"] for t in successive if m in t["per_module"]]
        c = [t["per_module"][m]["mean_cos"] for t in successive if m in t["per_module"]]
        per_module[m] = {"grassmann_mean": round(statistics.fmean(d), 4), "grassmann_max": round(max(d), 4),
                         "mean_cos": round(statistics.fmean(c), 4), "transitions": len(d)}
    results = {"run": str(run_dir), "versions": [{"version": v, "file": p.name, "label": labels.get(v, f"v{v}")}
                                                  for v, p in versions],
               "successive": [{k: v for k, v in t.items() if k != "per_module"} for t in successive],
               "from_first": [{k: v for k, v in t.items() if k != "per_module"} for t in from_first],
               "per_module": per_module,
               "definition": "principal angles theta_j between span V_a and span V_b (min(k_a, k_b) of them); "
                             "Grassmann distance ||theta||_2; mean cos = mean_j cos theta_j (1 = same subspace)"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "subspace_drift.json").write_text(json.dumps(results, indent=2))
    _drift_md(results, out / "subspace_drift.md")
    _drift_plot(results, out / "subspace_drift.png")
    return results


def _drift_md(results: dict, path: Path) -> None:
    lines = [f"# Safety-subspace drift ({results['run']})", "", results["definition"] + ".", "",
             "| transition | modules | mean k (from -> to) | Grassmann distance mean | max | mean cos |",
             "|---|---:|---|---:|---:|---:|"]
    for kind, rows in (("successive", results["successive"]), ("from the first", results["from_first"])):
        for t in rows:
            lines.append(f"| {t['from_label']} -> {t['to_label']} ({kind}) | {t['modules']} | "
                         f"{t['k_mean'][0]} -> {t['k_mean'][1]} | {t['grassmann_mean']} | {t['grassmann_max']} | "
                         f"{t['mean_cos']} |")
    pm = results["per_module"]
    d = [v["grassmann_mean"] for v in pm.values()]
    lines += ["", f"Per module, over the {len(results['successive'])} successive transition(s) "
              f"({len(pm)} modules; the 10 that moved most, then the mean over all):", "",
              "| module | Grassmann distance mean | max | mean cos |", "|---|---:|---:|---:|"]
    for name, v in sorted(pm.items(), key=lambda kv: -kv[1]["grassmann_mean"])[:10]:
        lines.append(f"| {name} | {v['grassmann_mean']} | {v['grassmann_max']} | {v['mean_cos']} |")
    if pm:
        lines.append(f"| mean over modules | {statistics.fmean(d):.4f} | "
                     f"{statistics.fmean(v['grassmann_max'] for v in pm.values()):.4f} | "
                     f"{statistics.fmean(v['mean_cos'] for v in pm.values()):.4f} |")
    path.write_text("\n".join(lines) + "\n")


def _drift_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, rows, style in (("successive", results["successive"], "-o"),
                              ("from the first", results["from_first"], "--s")):
        xs = list(range(1, len(rows) + 1))
        left.plot(xs, [t["grassmann_mean"] for t in rows], style, label=f"{kind}: mean over modules")
        left.plot(xs, [t["grassmann_max"] for t in rows], style, alpha=0.4, label=f"{kind}: max")
    left.set_xticks(range(1, len(results["successive"]) + 1),
                    [t["to_label"] for t in results["successive"]], fontsize=7, rotation=20)
    left.set_ylabel("Grassmann distance")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    right.hist([v["mean_cos"] for v in results["per_module"].values()], bins=20)
    right.set_xlabel("mean cos of principal angles, per module (successive)")
    right.set_ylabel("LoRA modules")
    fig.suptitle("Safety-subspace drift between versions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_md(results: dict, path: Path) -> None:
    rho, n = results["rho"], results["examples"]
    lines = [f"# Fisher spectrum ({results['model']}, {n} examples each, rho = {rho})", "",
             f"Eigenvectors needed per LoRA module to cover {rho:.0%} of tr(F_i), at {results['point']}.", "",
             "| data | mean | median | min | max |", "|---|---:|---:|---:|---:|"]
    names = {"calibration": "safety calibration (harmful -> refusal)", "random": "random tokens, same lengths",
             "domain": f"domain data ({results['domain']})"}
    for src, s in results["sources"].items():
        lines.append(f"| {names[src]} | {s['k_mean']} | {s['k_median']} | {s['k_min']} | {s['k_max']} |")
    path.write_text("\n".join(lines) + "\n")


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for src, s in results["sources"].items():
        curve = s["mean_cumulative_share"]
        right.plot(range(1, len(curve) + 1), curve, label=src)
        left.hist(list(s["per_module"].values()), bins=20, alpha=0.5, label=src)
    right.axhline(results["rho"], color="grey", linestyle=":", linewidth=1)
    right.set_xlabel("eigenvectors (top j)")
    right.set_ylabel("share of tr(F), mean over modules")
    right.legend()
    left.set_xlabel(f"eigenvectors for {results['rho']:.0%} of the trace")
    left.set_ylabel("LoRA modules")
    left.legend()
    fig.suptitle(f"Fisher spectrum per LoRA module ({results['examples']} examples each)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- capacity of the orthogonal complement as T grows ----------------------------------------------------

def capacity_rows(results: dict) -> list[dict]:
    """One row per domain position t = 1..T of one run: the domain, the safety basis after it (mean basis
    vectors per module; ``k_before`` at t = 1 is SSI's at the base), the share of the task update inside the
    subspace before projection (the part removed; mean over the domain's steps of the mean over modules of
    ||V^T u|| / ||u||), the domain's own score right after training it and the gain on it from training it
    (points of held-out token accuracy: plasticity), and refusal (and held-out-style refusal) as % of the
    aligned base's."""
    steps = results["steps"]
    base = steps[0]
    prepare = (results.get("prepare") or {}).get("subspace") or {}
    rows = []
    for t in range(1, len(steps)):
        step, before = steps[t], steps[t - 1]
        domain = step["after"]
        sub = (step.get("method") or {}).get("subspace") or {}
        prev = ((before.get("method") or {}).get("subspace") or prepare) if t > 1 else prepare
        logs = (step.get("train") or {}).get("logs") or {}
        scores, prior = step.get("domain_scores") or {}, before.get("domain_scores") or {}

        def retained(key):
            return (round(100.0 * step[key] / base[key], 2) if step.get(key) is not None and base.get(key)
                    else None)

        csm = (step.get("method") or {}).get("csm") or {}
        rows.append({"t": t, "domain": domain, "k_before": prev.get("k_mean"), "k_after": sub.get("k_mean"),
                     "update_removed": logs.get("update_in_subspace"),
                     "score": scores.get(domain),
                     "gain": (round(scores[domain] - prior[domain], 2)
                              if domain in scores and domain in prior else None),
                     "refusal_retained": retained("refusal_rate"),
                     "heldout_retained": retained("heldout_refusal_rate"),
                     "csm_triggered": csm.get("triggered")})
    return rows


def capacity(run_dirs: list, out: Path) -> dict:
    """``safeanchor analyze capacity``: per method (the runs' ``method``) and domain position t, the mean ± sd
    over runs of ``capacity_rows``; with a Standard run among them, each method's gain on the new domain as a
    share of Standard's at the same t (plasticity kept). Writes capacity.json, capacity.md, capacity.png."""
    from .errors import SafeAnchorError

    by_method: dict[str, list[list[dict]]] = {}
    names: dict[str, list[str]] = {}
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise SafeAnchorError(f"{path} does not exist; pass run directories made by `safeanchor run`")
        res = json.loads(path.read_text())
        if len(res.get("steps", [])) < 2:
            raise SafeAnchorError(f"{d} has not finished a domain; pass finished runs")
        by_method.setdefault(res["method"], []).append(capacity_rows(res))
        names.setdefault(res["method"], []).append(str(d))
    keys = ("k_after", "update_removed", "score", "gain", "refusal_retained", "heldout_retained")
    methods = {}
    for method, runs in by_method.items():
        T = max(len(r) for r in runs)
        per_t = []
        for t in range(1, T + 1):
            rows = [r[t - 1] for r in runs if len(r) >= t]
            cell = {"t": t, "runs": len(rows), "domains": sorted({r["domain"] for r in rows}),
                    "csm_triggered": sum(1 for r in rows if r["csm_triggered"]) if any(
                        r["csm_triggered"] is not None for r in rows) else None}
            for key in keys:
                vals = [r[key] for r in rows if r[key] is not None]
                cell[key] = ({"mean": round(statistics.fmean(vals), 4),
                              "sd": round(statistics.stdev(vals), 4) if len(vals) > 1 else None, "n": len(vals)}
                             if vals else None)
            if t == 1:
                k0 = [r["k_before"] for r in rows if r["k_before"] is not None]
                cell["k_before"] = round(statistics.fmean(k0), 4) if k0 else None
            per_t.append(cell)
        methods[method] = {"runs": names[method], "per_t": per_t}
    if "standard" in methods:
        std = {c["t"]: c for c in methods["standard"]["per_t"]}
        for method, m in methods.items():
            for c in m["per_t"]:
                s = std.get(c["t"], {})
                c["gain_vs_standard"] = (round(100.0 * c["gain"]["mean"] / s["gain"]["mean"], 1)
                                         if c["gain"] and s.get("gain") and s["gain"]["mean"] else None)
                c["score_vs_standard"] = (round(c["score"]["mean"] - s["score"]["mean"], 2)
                                          if c["score"] and s.get("score") else None)
    result = {"methods": methods, "definitions": {
        "k_after": "mean basis vectors per LoRA module after the domain's merge",
        "update_removed": "share of the task update's norm inside the safety subspace before projection (removed), "
                          "mean over the domain's steps and the modules",
        "score": "held-out token accuracy on the domain right after training it (plasticity, whatever the "
                 "score before)",
        "gain": "points of held-out token accuracy gained on the domain by training it (plasticity)",
        "refusal_retained": "HarmBench-probe refusal as % of the aligned base's",
        "heldout_retained": "held-out-style refusal as % of the aligned base's",
        "gain_vs_standard": "gain as % of Standard LoRA's gain at the same position (misleads where the two "
                            "start the domain from different scores: compare score_vs_standard)",
        "score_vs_standard": "score minus Standard LoRA's at the same position (pts)"}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(result, indent=2))
    _capacity_md(result, out / "capacity.md")
    _capacity_plot(result, out / "capacity.png")
    return result


def _capacity_md(result: dict, path: Path) -> None:
    def fmt(cell, digits=1, scale=1.0):
        if not cell:
            return "n/a"
        sd = f" ± {cell['sd'] * scale:.{digits}f}" if cell.get("sd") is not None else ""
        return f"{cell['mean'] * scale:.{digits}f}{sd}"

    lines = ["# Capacity of the orthogonal complement as T grows", "",
             "Per domain position t, mean ± sd over runs. " + "; ".join(f"{k}: {v}" for k, v in
                                                                      result["definitions"].items()) + ".", ""]
    for method, m in result["methods"].items():
        k0 = m["per_t"][0].get("k_before")
        lines += [f"## {method} ({len(m['runs'])} run(s)" + (f"; basis at the base: {k0:.1f} per module)" if k0
                                                              else ")"), "",
                  "| t | domain(s) | runs | basis k after | update removed % | score on the domain | "
                  "score vs Standard (pts) | gain on the domain (pts) | gain vs Standard % | refusal retained % | "
                  "held-out retained % | CSM repaired |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in m["per_t"]:
            g = c.get("gain_vs_standard")
            vs_std = "n/a" if g is None else f"{g:.0f}"
            d = c.get("score_vs_standard")
            score_vs = "n/a" if d is None else f"{d:+.1f}"
            repaired = "n/a" if c["csm_triggered"] is None else f"{c['csm_triggered']}/{c['runs']}"
            lines.append(f"| {c['t']} | {', '.join(c['domains'])} | {c['runs']} | {fmt(c['k_after'])} | "
                         f"{fmt(c['update_removed'], 1, 100.0)} | {fmt(c['score'])} | {score_vs} | "
                         f"{fmt(c['gain'])} | {vs_std} | "
                         f"{fmt(c['refusal_retained'])} | {fmt(c['heldout_retained'])} | {repaired} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def _capacity_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    panels = (("k_after", "basis vectors per module", 1.0), ("update_removed", "update removed %", 100.0),
              ("gain", "gain on the new domain (pts)", 1.0))
    for ax, (key, label, scale) in zip(axes, panels):
        for method, m in result["methods"].items():
            pts = [(c["t"], c[key]["mean"] * scale) for c in m["per_t"] if c.get(key)]
            if key == "k_after" and m["per_t"][0].get("k_before") is not None:
                pts = [(0, m["per_t"][0]["k_before"])] + pts
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=method)
        ax.set_xlabel("domain position t")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.suptitle("Capacity of the orthogonal complement as T grows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
