"""Per-category safety subspaces (``safeanchor analyze category-subspaces``): is SafeAnchor's safety subspace
one subspace, or does each harm category have its own?

For each coarse harm category c (``data.safety.COARSE_CATEGORIES``) with at least ``per_category`` prompts in
the harmful training pool (``data.splits.harmful_split()[0]``: never the monitor split, never an evaluation
set), the first ``per_category`` prompts in a seeded order (seed ``cfg.seed``) are paired with refusals as the
offline calibration set is (``data.safety.refusal``), and SSI is run on them alone: per LoRA module i the
per-example scores G_c (n_c x P_i, rows g_n) and the basis V_c (P_i x k_c) of eigenvectors of
F_c = G_c^T G_c / n_c covering rho of tr F_c (``subspace.fisher_basis``). Per pair of categories (a, b),
per module, then averaged over modules:

* mean cos of the principal angles between span V_a and span V_b (``subspace.principal_angles``; 1 = the
  same subspace, 0 = orthogonal);
* energy captured E[a][b] = ||G_b V_a||_F^2 / ||G_b||_F^2 = tr(V_a^T F_b V_a) / tr F_b: the share of category
  b's Fisher trace inside category a's basis (rows: the basis, columns: the data; the diagonal is >= rho by
  construction);
* a chance level for the row: the energy a random orthonormal basis of the same size k_a captures, which is
  k_a / P_i in expectation, and the same inside the coordinates the gradients reach at all (at the fresh
  LoRA, B = 0, every A-gradient is zero, so the scores live in the B block: k_a / P_live);
* the union: the share of each category's trace inside the basis SSI computes on all categories' examples
  pooled (the same total N).

The point is SSI's: the aligned base with a freshly initialised LoRA, loaded as ``safeanchor spectrum`` and
the pipeline load it. PEFT's B = 0 start makes every A-gradient zero there, so, as in SSI itself, the bases
constrain the B block only (``fisher_basis`` keeps the zero A-columns out of every eigenvector).
The per-example gradients are taken once, for all categories together, by the routine ``SafetySubspace.compute``
uses (``safety_gradients``, with SafeAnchor's SSI options: ``max_length``, ``ssi_chunk``, ``ssi_memory_gib``),
one group of modules at a time; every category's basis, the union basis and all energies come from those rows.
"""
from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import numpy as np
import torch

from . import subspace as ss
from .errors import SafeAnchorError

POINT = "aligned base, fresh LoRA (B = 0)"
FILES = ("category_subspaces.json", "category_subspaces.md", "category_subspaces.png")
RANDOM_STREAM = 91_000  # seed stream of the random baseline bases

DEFINITIONS = {
    "basis": "per LoRA module i and category c: V_c (P_i x k_c), the eigenvectors of F_c = G_c^T G_c / n_c covering "
             "rho of tr F_c (SSI on category c's examples alone); G_c: n_c x P_i per-example scores "
             "g_n = d log p(refusal | prompt) / d vec([B; A])",
    "energy_captured": "E[a][b] = ||G_b V_a||_F^2 / ||G_b||_F^2 = tr(V_a^T F_b V_a) / tr F_b, per module, then the "
                       "mean over modules: the share of category b's (column) Fisher trace inside category a's "
                       "(row) basis; the diagonal is >= rho by construction",
    "mean_cos": "mean_j cos theta_j over the min(k_a, k_b) principal angles between span V_a and span V_b, per "
                "module, then the mean over modules (1 = the same subspace, 0 = orthogonal)",
    "random_baseline": "the energy of each category inside a random orthonormal basis of size k_a (one seeded draw "
                       "per module; expected k_a / P_i), and inside a random basis of size k_a restricted to the "
                       "coordinates some gradient reaches (P_live: the B block at the fresh LoRA; expected "
                       "k_a / P_live); mean over modules and over the categories measured",
    "union": "V_union: SSI on all categories' examples pooled (N = sum of n_c); energy_captured[b] = "
             "||G_b V_union||_F^2 / ||G_b||_F^2, mean over modules",
    "mean_over_modules": "unweighted mean over LoRA modules; a module where a value is undefined (tr F_b = 0, or an "
                         "empty basis for the angles) is left out of that mean",
}


# -- categories -----------------------------------------------------------------------------------------

def _names() -> dict[str, str]:
    """Accepted spelling (slug or full name, lower case) -> full coarse category name."""
    from .data.safety import COARSE_SLUGS

    out = {slug: name for name, slug in COARSE_SLUGS.items()}
    out.update({name.lower(): name for name in COARSE_SLUGS})
    return out


def resolve_categories(categories: list[str] | None) -> list[str] | None:
    """Slugs or full names -> full coarse category names (None stays None); unknown names are an error."""
    if categories is None:
        return None
    from .data.safety import COARSE_SLUGS

    known = _names()
    wanted = [c.strip() for c in categories if c.strip()]
    bad = [c for c in wanted if c.lower() not in known]
    if bad:
        raise SafeAnchorError(f"unknown categor{'y' if len(bad) == 1 else 'ies'} {', '.join(map(repr, bad))}; use "
                              f"any of {','.join(COARSE_SLUGS.values())} (e.g. --categories hate,violence)")
    names = list(dict.fromkeys(known[c.lower()] for c in wanted))
    if len(names) < 2:
        raise SafeAnchorError(f"--categories names {len(names)} categor{'y' if len(names) == 1 else 'ies'}; the "
                              f"comparison needs two or more, e.g. --categories hate,violence")
    return names


def pool_by_category(seed: int) -> dict[str, list[str]]:
    """The harmful training pool's prompts per coarse category (``COARSE_CATEGORIES`` order, "other" left
    out), each list in the seeded order of ``seed``."""
    from .data.safety import COARSE_CATEGORIES, OTHER_CATEGORY, coarse_category
    from .data.splits import harmful_split

    pool = harmful_split()[0]
    by_cat: dict[str, list[str]] = {name: [] for name in COARSE_CATEGORIES}
    for i in np.random.default_rng(seed).permutation(len(pool)):
        row = pool[int(i)]
        c = coarse_category(row["source"], row["category"])
        if c != OTHER_CATEGORY:
            by_cat[c].append(row["prompt"])
    return by_cat


def select_examples(per_category: int, seed: int, categories: list[str] | None = None) -> tuple[dict, dict]:
    """({category: [{"prompt", "response"}] * per_category}, {category: prompts available}) for every coarse
    category with at least ``per_category`` training prompts (or the named ``categories``, each of which must
    have that many). Refusals are drawn as the offline calibration set draws them (``refusal(prompt, rng)``,
    ``rng = random.Random(seed)``), category by category."""
    from .data.safety import COARSE_SLUGS, refusal

    if per_category < 2:
        raise SafeAnchorError(f"--per-category must be >= 2 (got {per_category}): a category's Fisher basis needs two "
                              f"or more examples; e.g. --per-category 32")
    wanted = resolve_categories(categories)
    by_cat = pool_by_category(seed)
    counts = {c: len(p) for c, p in by_cat.items()}
    shown = ", ".join(f"{COARSE_SLUGS[c]} {counts[c]}" for c in (wanted or counts))
    if wanted:
        short = [c for c in wanted if counts[c] < per_category]
        if short:
            raise SafeAnchorError(f"--per-category {per_category}: {', '.join(COARSE_SLUGS[c] for c in short)} "
                                  f"ha{'s' if len(short) == 1 else 've'} fewer training prompts ({shown}); lower "
                                  f"--per-category to at most {min(counts[c] for c in wanted)} or drop "
                                  f"{'it' if len(short) == 1 else 'them'} from --categories")
        names = wanted
    else:
        names = [c for c in by_cat if counts[c] >= per_category]
        if len(names) < 2:
            most = sorted(counts.values(), reverse=True)
            raise SafeAnchorError(f"--per-category {per_category}: only {len(names)} coarse categor"
                                  f"{'y has' if len(names) == 1 else 'ies have'} that many training prompts "
                                  f"({shown}); lower --per-category to at most {most[1]}")
    rng = random.Random(seed)
    chosen = {c: [{"prompt": p, "response": refusal(p, rng)} for p in by_cat[c][:per_category]] for c in names}
    return chosen, counts


# -- the comparison, one module at a time ---------------------------------------------------------------

def _captured(g: torch.Tensor, v: torch.Tensor, total: float) -> float | None:
    """||G V||_F^2 / total (None for total = 0; 0 for an empty basis)."""
    if total <= 0.0:
        return None
    if v.shape[1] == 0:
        return 0.0
    return float((g.double() @ v.to(g.device, torch.float64)).square().sum()) / total


def _random_basis(p: int, k: int, generator: torch.Generator, rows: torch.Tensor | None = None) -> torch.Tensor:
    """A random orthonormal P x k basis (QR of a Gaussian matrix), with ``rows``: supported on those rows."""
    live = p if rows is None else int(rows.numel())
    k = min(k, live)
    q = torch.linalg.qr(torch.randn(live, k, generator=generator, dtype=torch.float64))[0]
    if rows is None:
        return q
    out = torch.zeros(p, k, dtype=torch.float64)
    out[rows] = q
    return out


def module_comparison(g: torch.Tensor, rows: dict[str, slice], rho: float, max_rank: int | None = None,
                      generator: torch.Generator | None = None) -> dict:
    """Everything the command measures for one LoRA module, from its per-example scores ``g`` (N x P) whose
    rows ``rows[c]`` are category c's (together: every row of ``g``).

    Returns k (basis size per category), energy[a][b], cos[a][b] (None: an empty basis), random[a][b] and
    random_live[a][b] (energy of b in a random basis of size k_a, over all P / over the live coordinates),
    k_union and union[b], P, P_live, and the bases themselves (``bases[c]``, ``bases_union``)."""
    generator = generator or torch.Generator().manual_seed(0)
    cats = list(rows)
    p = g.shape[1]
    bases = {c: ss.fisher_basis(g[rows[c]], rho, max_rank=max_rank) for c in cats}
    union = ss.fisher_basis(g, rho, max_rank=max_rank)
    total = {c: float(g[rows[c]].double().square().sum()) for c in cats}
    live = torch.nonzero((g != 0).any(0).cpu()).flatten()
    out = {"P": p, "P_live": int(live.numel()), "k": {c: int(bases[c].basis.shape[1]) for c in cats},
           "k_union": int(union.basis.shape[1]), "energy": {}, "cos": {}, "random": {}, "random_live": {},
           "union": {b: _captured(g[rows[b]], union.basis, total[b]) for b in cats},
           "bases": {c: bases[c].basis for c in cats}, "bases_union": union.basis}
    for a in cats:
        va = bases[a].basis
        out["energy"][a] = {b: _captured(g[rows[b]], va, total[b]) for b in cats}
        out["cos"][a] = {}
        for b in cats:
            vb = bases[b].basis
            out["cos"][a][b] = (float(torch.cos(ss.principal_angles(va, vb)).mean())
                                if va.shape[1] and vb.shape[1] else None)
        k = out["k"][a]
        rnd = _random_basis(p, k, generator)
        rnd_live = _random_basis(p, k, generator, live) if live.numel() else rnd[:, :0]
        out["random"][a] = {b: _captured(g[rows[b]], rnd, total[b]) for b in cats}
        out["random_live"][a] = {b: _captured(g[rows[b]], rnd_live, total[b]) for b in cats}
    return out


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.fmean(vals), 4) if vals else None


def summarise(per_module: list[dict], cats: list[str]) -> dict:
    """The mean over modules of every ``module_comparison`` value (undefined values left out)."""
    def matrix(key):
        return {a: {b: _mean(m[key][a][b] for m in per_module) for b in cats} for a in cats}

    energy, cos = matrix("energy"), matrix("cos")
    rnd, rnd_live = matrix("random"), matrix("random_live")
    out = {"energy_captured": energy, "mean_cos": cos,
           "k_mean": {c: round(statistics.fmean(m["k"][c] for m in per_module), 2) for c in cats},
           "k_min": {c: min(m["k"][c] for m in per_module) for c in cats},
           "k_max": {c: max(m["k"][c] for m in per_module) for c in cats},
           "random_baseline": {a: {"energy": _mean(rnd[a].values()), "expected_k_over_p":
                                   _mean(m["k"][a] / m["P"] for m in per_module),
                                   "energy_live": _mean(rnd_live[a].values()), "expected_k_over_p_live":
                                   _mean(min(m["k"][a], m["P_live"]) / m["P_live"] for m in per_module
                                         if m["P_live"])} for a in cats},
           "union": {"k_mean": round(statistics.fmean(m["k_union"] for m in per_module), 2),
                     "energy_captured": {b: _mean(m["union"][b] for m in per_module) for b in cats}}}
    off = [(a, b) for a in cats for b in cats if a != b]
    out["summary"] = {
        "own_energy_mean": _mean(energy[a][a] for a in cats),
        "cross_energy_mean": _mean(energy[a][b] for a, b in off),
        "cross_energy_min": min((energy[a][b] for a, b in off if energy[a][b] is not None), default=None),
        "cross_mean_cos": _mean(cos[a][b] for a, b in off),
        "random_energy_mean": _mean(out["random_baseline"][a]["energy"] for a in cats),
        "random_live_energy_mean": _mean(out["random_baseline"][a]["energy_live"] for a in cats),
        "union_energy_mean": _mean(out["union"]["energy_captured"].values())}
    return out


def category_gradients(model, tokenizer, examples: dict[str, list[dict]], *, max_length: int, chunk: int = 8,
                       memory_budget_gib: float = 1.5):
    """Yields (module name, G [N, P], rows) for every LoRA module: the per-example scores of all categories'
    examples at once (``safety_subspace.safety_gradients``, the routine of ``SafetySubspace.compute``, one group
    of modules per pass), ``rows[c]`` the slice of category c's rows."""
    from .safety_subspace import safety_gradients

    rows, flat, start = {}, [], 0
    for c, exs in examples.items():
        rows[c] = slice(start, start + len(exs))
        flat += exs
        start += len(exs)
    for name, g in safety_gradients(model, flat, tokenizer, max_length, chunk, memory_budget_gib=memory_budget_gib):
        if g.shape[0] != start:
            raise SafeAnchorError(f"{start - g.shape[0]} of the {start} examples lost their whole refusal to "
                                  f"truncation at train.max_length {max_length}; raise train.max_length")
        yield name, g, rows


# -- the command ----------------------------------------------------------------------------------------

def _ssi_options(cfg):
    """SafeAnchor's options for this config (``method_options.safeanchor``, else the defaults)."""
    from .methods import METHODS, load_all
    from .methods.base import method_options

    load_all()
    return method_options(METHODS["safeanchor"], (cfg.method_options or {}).get("safeanchor") or {})


def category_subspaces(cfg, out: Path, per_category: int, rho: float | None = None,
                       categories: list[str] | None = None, progress=print) -> dict:
    """Compute, write (category_subspaces.json / .md / .png in ``out``) and return the per-category
    comparison (module docstring). Every input error is raised before any model loads."""
    from .data.safety import COARSE_SLUGS

    opts = _ssi_options(cfg)
    rho = opts.rho if rho is None else float(rho)
    if not 0.0 < rho <= 1.0:
        raise SafeAnchorError(f"--rho must be in (0, 1], got {rho}; e.g. --rho 0.9")
    examples, counts = select_examples(per_category, cfg.seed, categories)
    cats = list(examples)
    max_rank = opts.max_rank or None
    progress(f"category-subspaces: {len(cats)} categories x {per_category} prompts ("
             + ", ".join(f"{COARSE_SLUGS[c]} of {counts[c]}" for c in cats) + f"), rho {rho}")
    out = Path(out)
    from .analysis import model_at_ssi_point

    model, tok, base_dir = model_at_ssi_point(cfg, progress)
    n_modules = len(ss.lora_modules(model))
    progress(f"category-subspaces: per-example gradients of {per_category * len(cats)} examples on {n_modules} "
             f"LoRA modules at the {POINT}")
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, RANDOM_STREAM])
                                                  .generate_state(1)[0]))
    per_module, names = [], []
    step = max(1, n_modules // 10)
    for name, g, rows in category_gradients(model, tok, examples, max_length=cfg.train.max_length,
                                            chunk=opts.ssi_chunk, memory_budget_gib=opts.ssi_memory_gib):
        m = module_comparison(g, rows, rho, max_rank, generator)
        del m["bases"], m["bases_union"], g
        per_module.append(m)
        names.append(name)
        if len(per_module) % step == 0 or len(per_module) == n_modules:
            progress(f"category-subspaces: {len(per_module)}/{n_modules} modules")
    stats = summarise(per_module, cats)
    results = {
        "model": cfg.model.name, "base_model_dir": str(base_dir) if base_dir else None, "point": POINT, "rho": rho,
        "max_rank": max_rank, "per_category": per_category, "modules": len(per_module),
        "categories": [{"name": c, "slug": COARSE_SLUGS[c], "n": len(examples[c]), "available": counts[c],
                        "k_mean": stats["k_mean"][c], "k_min": stats["k_min"][c], "k_max": stats["k_max"][c]}
                       for c in cats],
        "skipped": {c: n for c, n in counts.items() if c not in examples and n < per_category},
        "available": counts,
        "energy_captured": stats["energy_captured"], "mean_cos": stats["mean_cos"],
        "random_baseline": stats["random_baseline"],
        "union": {"n": sum(len(e) for e in examples.values()), **stats["union"]},
        "summary": stats["summary"], "definitions": DEFINITIONS,
        "per_module_k": {n: m["k"] for n, m in zip(names, per_module)},
        "config": {"model": cfg.model.name, "dtype": cfg.model.dtype, "aligned": cfg.aligned,
                   "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "target_modules": list(cfg.lora.target_modules)},
                   "max_length": cfg.train.max_length, "seed": cfg.seed, "ssi_chunk": opts.ssi_chunk,
                   "ssi_memory_gib": opts.ssi_memory_gib, "pool": "data.splits.harmful_split()[0] (training pool)",
                   "categories_requested": categories},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / FILES[0]).write_text(json.dumps(results, indent=2))
    write_markdown(results, out / FILES[1])
    plot(results, out / FILES[2])
    progress(f"category-subspaces: own-basis energy {stats['summary']['own_energy_mean']}, cross-category "
             f"{stats['summary']['cross_energy_mean']} (random {stats['summary']['random_live_energy_mean']} in "
             f"the live block), union {stats['summary']['union_energy_mean']}; wrote {out}")
    return results


def _cell(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def write_markdown(results: dict, path: Path) -> None:
    cats = [c["name"] for c in results["categories"]]
    slug = {c["name"]: c["slug"] for c in results["categories"]}
    rb, un, s = results["random_baseline"], results["union"], results["summary"]
    lines = [f"# Per-category safety subspaces ({results['model']}, {results['per_category']} prompts per "
             f"category, rho = {results['rho']})", "",
             f"SSI per coarse harm category at the {results['point']}, {results['modules']} LoRA modules; values "
             "are means over modules.", "",
             "| category | n | prompts available | k mean (min-max) | own energy | union energy (k "
             f"{un['k_mean']}, N {un['n']}) | random basis (k/P) | random in live block (k/P_live) |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for c in results["categories"]:
        name = c["name"]
        lines.append(f"| {name} (`{c['slug']}`) | {c['n']} | {c['available']} | {c['k_mean']} ({c['k_min']}-"
                     f"{c['k_max']}) | {_cell(results['energy_captured'][name][name])} | "
                     f"{_cell(un['energy_captured'][name])} | {_cell(rb[name]['energy'])} "
                     f"({_cell(rb[name]['expected_k_over_p'])}) | {_cell(rb[name]['energy_live'])} "
                     f"({_cell(rb[name]['expected_k_over_p_live'])}) |")
    if results["skipped"]:
        lines += ["", "Not measured (fewer training prompts than --per-category): "
                  + ", ".join(f"{c} ({n})" for c, n in results["skipped"].items()) + "."]
    head = "| basis \\ data | " + " | ".join(f"`{slug[c]}`" for c in cats) + " |"
    rule = "|---|" + "---:|" * len(cats)
    lines += ["", "Energy captured: share of the column category's Fisher trace inside the row category's basis, "
              "||G_col V_row||_F^2 / ||G_col||_F^2.", "", head, rule]
    for a in cats:
        lines.append(f"| `{slug[a]}` | " + " | ".join(_cell(results["energy_captured"][a][b]) for b in cats) + " |")
    lines += ["", "Mean cos of the principal angles between the two categories' bases (1 = same subspace).", "",
              head.replace("basis \\ data", "basis"), rule]
    for a in cats:
        lines.append(f"| `{slug[a]}` | " + " | ".join(_cell(results["mean_cos"][a][b]) for b in cats) + " |")
    lines += ["", f"Summary: own basis {_cell(s['own_energy_mean'])} of a category's trace, another category's "
              f"basis {_cell(s['cross_energy_mean'])} on average (min {_cell(s['cross_energy_min'])}), a random "
              f"basis of the same size {_cell(s['random_energy_mean'])} ({_cell(s['random_live_energy_mean'])} "
              f"inside the live coordinates), the pooled basis {_cell(s['union_energy_mean'])}; mean cos between "
              f"different categories' bases {_cell(s['cross_mean_cos'])}."]
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [c["name"] for c in results["categories"]]
    labels = [c["slug"] for c in results["categories"]]
    fig, axes = plt.subplots(1, 2, figsize=(5.2 * 2, 4.6))
    for ax, key, title in ((axes[0], "energy_captured", "energy of column category in row category's basis"),
                           (axes[1], "mean_cos", "mean cos of principal angles")):
        m = np.array([[np.nan if results[key][a][b] is None else results[key][a][b] for b in cats] for a in cats])
        im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(cats)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(len(cats)), labels, fontsize=8)
        for i in range(len(cats)):
            for j in range(len(cats)):
                if not np.isnan(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if m[i, j] > 0.6 else "white")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("data (category)" if key == "energy_captured" else "basis", fontsize=8)
        ax.set_ylabel("basis (category)", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"Per-category safety subspaces ({results['model']}, {results['per_category']} prompts each, "
                 f"rho {results['rho']}, random k/P_live ~ {_cell(results['summary']['random_live_energy_mean'])})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
