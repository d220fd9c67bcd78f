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


def fisher_spectrum(cfg, out: Path, n: int | None = None, rho: float | None = None, progress=print) -> dict:
    """Compute, write (spectrum.json, spectrum.md, spectrum.png) and return the comparison."""
    from .align import ensure_aligned
    from .data.domains import get_domain
    from .models import attach_lora, load_model
    from .data.splits import safety_sets
    from .pipeline import seed_everything

    rho = rho if rho is not None else 0.90
    out.mkdir(parents=True, exist_ok=True)
    base_dir = ensure_aligned(cfg, progress=progress) if cfg.aligned else None
    seed_everything(cfg.seed, 0)
    model, tok = load_model(cfg.model, path=str(base_dir) if base_dir else None)
    model = attach_lora(model, cfg.lora)
    calib, _ = safety_sets(cfg)
    if n:
        calib = calib[:n]
    n = len(calib)
    ml = cfg.train.max_length
    enc = {"calibration": [encode(tok, e["prompt"], e["response"], ml) for e in calib]}
    enc["random"] = _randomised(tok, enc["calibration"], cfg.seed)
    domain = get_domain(cfg.data.domains[0])
    enc["domain"] = [encode(tok, e["prompt"], e["response"], ml) for e in domain.load("train", n, seed=cfg.seed)]
    results = {"model": cfg.model.name, "base_model_dir": str(base_dir) if base_dir else None, "rho": rho,
               "examples": n, "domain": domain.name, "point": "aligned base, fresh LoRA (B = 0)", "sources": {}}
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
