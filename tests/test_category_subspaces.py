"""`safeanchor analyze category-subspaces`: SSI per coarse harm category, overlap and cross-category energy."""
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch

from safeanchor import analysis
from safeanchor import category_subspaces as cs
from safeanchor import subspace as ss
from safeanchor.cli import build_parser, cmd_analyze, main
from safeanchor.config import load_config
from safeanchor.data.safety import (COARSE_CATEGORIES, COARSE_SLUGS, OTHER_CATEGORY, coarse_category,
                                    harmful_direct_eval, harmful_prompts)
from safeanchor.safety_subspace import SafetySubspace

# measured on the shipped pool: every (source, category) pair is mapped, so 0 rows are "other"
MAX_OTHER_SHARE = 0.01


def _seed() -> int:
    return random.SystemRandom().randrange(2**31)


def test_every_pool_row_has_a_coarse_category():
    rows = harmful_prompts()
    got = Counter(coarse_category(r["source"], r["category"]) for r in rows)
    assert set(got) <= set(COARSE_CATEGORIES) | {OTHER_CATEGORY}
    assert got[OTHER_CATEGORY] / len(rows) <= MAX_OTHER_SHARE, got
    assert len(set(got) - {OTHER_CATEGORY}) >= 5, got
    # the evaluation-only questions use the self-written labels too
    assert all(coarse_category("harmful_direct_eval_selfwritten", r["category"]) != OTHER_CATEGORY
               for r in harmful_direct_eval(with_meta=True))
    assert coarse_category("advbench", "no such label") == OTHER_CATEGORY
    assert coarse_category("no such source", "Violence") == OTHER_CATEGORY
    assert set(COARSE_SLUGS) == set(COARSE_CATEGORIES) and len(set(COARSE_SLUGS.values())) == len(COARSE_SLUGS)
    # no label is mapped twice
    labels = [(s, lab) for by in COARSE_CATEGORIES.values() for s, names in by.items() for lab in names]
    assert len(labels) == len(set(labels))


def _planted(seed: int, cats=("a", "b", "c"), ns=(5, 6, 7), ps=(40, 64, 30)):
    """Per module: rows of each category near a few category-specific plus shared directions, the last 10
    coordinates zero (a dead A-block)."""
    g = torch.Generator().manual_seed(seed)
    modules, rows, start = {}, {}, 0
    for c, n in zip(cats, ns):
        rows[c] = slice(start, start + n)
        start += n
    for m, p in enumerate(ps):
        shared = torch.randn(2, p - 10, generator=g)
        parts = []
        for n in ns:
            own = torch.randn(3, p - 10, generator=g)
            coef = torch.randn(n, 5, generator=g) * torch.tensor([2.0, 2.0, 1.0, 1.0, 1.0])  # shared ones stronger
            parts.append(coef @ torch.cat([shared, own]) + 0.05 * torch.randn(n, p - 10, generator=g))
        modules[f"m{m}"] = torch.cat([torch.cat(parts), torch.zeros(start, 10)], dim=1)
    return modules, rows


def test_energy_matrix_matches_a_slow_reference():
    seed = _seed()
    rho = 0.8
    modules, rows = _planted(seed)
    cats = list(rows)
    per = [cs.module_comparison(g, rows, rho, generator=torch.Generator().manual_seed(seed)) for g in modules.values()]
    got = cs.summarise(per, cats)
    ref_energy = {a: {b: [] for b in cats} for a in cats}
    ref_union = {b: [] for b in cats}
    for (name, g), m in zip(modules.items(), per):
        gn = g.numpy().astype(np.float64)
        for a in cats:  # the bases are SSI's own: fisher_basis on the category's rows alone
            assert torch.equal(m["bases"][a], ss.fisher_basis(g[rows[a]], rho).basis), (seed, name, a)
        bases = {**{a: m["bases"][a].numpy().astype(np.float64) for a in cats},
                 "union": m["bases_union"].numpy().astype(np.float64)}
        for a, v in bases.items():
            for b in cats:
                num = den = 0.0
                for n in range(rows[b].start, rows[b].stop):
                    den += float(np.dot(gn[n], gn[n]))
                    for k in range(v.shape[1]):
                        num += float(np.dot(gn[n], v[:, k])) ** 2
                ref = num / den
                mine = m["union"][b] if a == "union" else m["energy"][a][b]
                assert abs(mine - ref) < 1e-9, (seed, name, a, b, mine, ref)
                (ref_union[b] if a == "union" else ref_energy[a][b]).append(ref)
        for a in cats:
            assert m["energy"][a][a] >= rho - 1e-9, (seed, name, a, m["energy"][a][a])  # own basis covers rho
            for b in cats:
                sv = np.linalg.svd(bases[a].T @ bases[b], compute_uv=False)
                assert abs(m["cos"][a][b] - float(np.clip(sv, 0, 1).mean())) < 1e-6, (seed, name, a, b)
        assert m["P_live"] == g.shape[1] - 10, (seed, name)
    for a in cats:  # the summary is the plain mean over modules (rounded to 4 decimals)
        assert abs(got["mean_cos"][a][a] - 1.0) < 1e-4, (seed, a)
        assert got["energy_captured"][a][a] >= rho - 1e-4, (seed, a)
        for b in cats:
            assert abs(got["energy_captured"][a][b] - np.mean(ref_energy[a][b])) < 6e-5, (seed, a, b)
        assert abs(got["union"]["energy_captured"][a] - np.mean(ref_union[a])) < 6e-5, (seed, a)
        rb = got["random_baseline"][a]
        k_over_p = np.mean([m["k"][a] / m["P"] for m in per])
        assert abs(rb["expected_k_over_p"] - k_over_p) < 6e-5, (seed, a)
        assert rb["expected_k_over_p_live"] > rb["expected_k_over_p"], (seed, a)
        # a random basis of the same size is chance level, far below what the categories share
        assert rb["energy_live"] < 0.35, (seed, a, rb)
    assert got["summary"]["cross_energy_mean"] > 2 * got["summary"]["random_live_energy_mean"], (seed, got["summary"])


def test_orthogonal_and_identical_categories():
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    p = 50
    base_a = torch.linalg.qr(torch.randn(p, 2, generator=g))[0].T  # 2 directions
    x = torch.randn(6, 2, generator=g) @ base_a          # category x: span base_a
    y = torch.randn(6, 3, generator=g) @ torch.randn(3, p, generator=g)
    y = y - (y @ base_a.T) @ base_a                        # category y: orthogonal to span base_a
    z = torch.randn(5, 2, generator=g) @ base_a           # category z: the same span as x
    m = cs.module_comparison(torch.cat([x, y, z]), {"x": slice(0, 6), "y": slice(6, 12), "z": slice(12, 17)}, 1.0)
    assert m["energy"]["x"]["y"] < 1e-8 and m["energy"]["y"]["x"] < 1e-8, (seed, m["energy"])
    assert m["cos"]["x"]["y"] < 1e-6, (seed, m["cos"])
    assert m["energy"]["x"]["z"] > 1 - 1e-6 and m["energy"]["z"]["x"] > 1 - 1e-6, (seed, m["energy"])
    assert m["cos"]["x"]["z"] > 1 - 1e-6, (seed, m["cos"])
    assert min(m["union"].values()) > 0.99, (seed, m["union"])


def _smoke():
    return load_config("smoke", None, {"aligned": False})


def test_one_gradient_pass_gives_each_categorys_ssi_basis():
    cfg = _smoke()
    model, tok, _ = analysis.model_at_ssi_point(cfg, progress=lambda *_: None)
    examples, counts = cs.select_examples(3, cfg.seed, ["hate", "violence"])
    assert [len(v) for v in examples.values()] == [3, 3] and counts["Violence"] > 3
    kw = {"max_length": cfg.train.max_length, "chunk": 4}
    own = SafetySubspace.compute(model, examples["Violence"], tok, rho=0.9, **kw)
    n = 0
    for name, g, rows in cs.category_gradients(model, tok, examples, **kw):
        m = cs.module_comparison(g, rows, 0.9)
        ref = own.bases[name].basis
        assert m["k"]["Violence"] == ref.shape[1], name
        assert float(torch.cos(ss.principal_angles(m["bases"]["Violence"], ref)).min()) > 1 - 1e-4, name
        assert abs(m["energy"]["Violence"]["Hate, harassment and discrimination"]
                   - cs._captured(g[rows["Hate, harassment and discrimination"]], ref,
                                  float(g[rows["Hate, harassment and discrimination"]].double().square().sum()))) \
            < 1e-4, name
        n += 1
    assert n == len(own.bases) == len(ss.lora_modules(model))


def test_command_writes_the_three_files(tmp_path, capsys):
    out = tmp_path / "cs"
    assert main(["analyze", "category-subspaces", "--preset", "smoke", "--set", "aligned=false",
                 "--per-category", "3", "--out", str(out)]) == 0
    assert "Energy captured" in capsys.readouterr().out
    for f in cs.FILES:
        assert (out / f).stat().st_size > 200, f
    res = json.loads((out / "category_subspaces.json").read_text())
    assert {"categories", "energy_captured", "mean_cos", "random_baseline", "union", "definitions", "config",
            "summary", "skipped", "rho", "per_category"} <= set(res)
    names = [c["name"] for c in res["categories"]]
    assert names == list(COARSE_CATEGORIES) and res["skipped"] == {}  # every category has >= 3 prompts
    assert all(c["n"] == 3 and c["k_mean"] > 0 for c in res["categories"])
    assert res["rho"] == 0.9 and res["union"]["n"] == 3 * len(names)
    for a in names:
        assert set(res["energy_captured"][a]) == set(names) == set(res["mean_cos"][a])
        assert res["energy_captured"][a][a] >= 0.9 - 1e-4
        assert {"energy", "expected_k_over_p", "energy_live",
                "expected_k_over_p_live"} <= set(res["random_baseline"][a])
    assert set(cs.DEFINITIONS) <= set(res["definitions"])
    assert "| basis \\ data |" in (out / "category_subspaces.md").read_text()


@pytest.mark.parametrize("argv, words", [
    (["--per-category", "1"], ["--per-category must be >= 2"]),
    (["--per-category", "200"], ["only 1 coarse category", "non-violent-crimes", "at most"]),
    (["--per-category", "5000"], ["only 0 coarse categories"]),
    (["--categories", "hate,nonsense"], ["unknown category 'nonsense'", "violence"]),
    (["--categories", "hate"], ["two or more"]),
    (["--categories", "hate,self-harm", "--per-category", "30"], ["self-harm has fewer", "at most"]),
    (["--rho", "1.5"], ["--rho must be in (0, 1]"]),
])
def test_errors_name_the_fix_before_any_model_loads(tmp_path, capsys, monkeypatch, argv, words):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(analysis, "model_at_ssi_point", no_model)
    assert main(["analyze", "category-subspaces", "--preset", "smoke", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


def test_subspace_drift_still_dispatches():
    args = build_parser().parse_args(["analyze", "subspace-drift", "somewhere"])
    assert args.func is cmd_analyze and args.run == "somewhere"
