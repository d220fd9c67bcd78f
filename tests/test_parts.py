"""The trainer-agnostic parts (SafetySubspace, SafetyProjector, SafetyTerm, SafetyMonitor) against obvious references."""
import random

import pytest
import torch

import safeanchor
from safeanchor import subspace as ss
from safeanchor.anchor import SafetyBatches
from safeanchor.config import load_config
from safeanchor.data.chat import collate, encode
from safeanchor.errors import SafeAnchorError
from safeanchor.models import attach_lora, tiny_model, tiny_tokenizer
from safeanchor.projector import SafetyProjector, SafetyTerm
from safeanchor.safety_subspace import SafetySubspace


def _setup(seed, r=4):
    cfg = load_config("smoke", overrides={"lora.dropout": 0.0, "lora.r": r})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = attach_lora(tiny_model(seed % 5), cfg.lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, (a, b) in ss.lora_modules(model).items():
            b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.05)
    rng = random.Random(seed)
    calib = [{"prompt": f"how do I do harm {rng.randint(0, 999)}?",
              "response": rng.choice(["I can't help with that.", "No, I won't do that.", "Sorry, I cannot assist."])
              + " It is unsafe." * rng.randint(0, 3)} for _ in range(10)]
    return model, tiny_tokenizer(), calib


def _projector_matrix(v):
    v = v.double()
    return v @ v.T


def test_compute_matches_the_one_example_at_a_time_reference():
    seed = random.randrange(10**6)
    model, tok, calib = _setup(seed)
    sub = SafetySubspace.compute(model, calib, tok, rho=0.9, max_length=64, chunk=3)
    batch = collate([encode(tok, e["prompt"], e["response"], 64) for e in calib], tok.pad_token_id)
    slow = ss.per_sample_grads_loop(model, batch, ss.lora_modules(model))
    assert set(sub.bases) == set(slow)
    for n, g in slow.items():
        ref = ss.fisher_basis(g, 0.9)
        got = sub.bases[n]
        assert got.basis.shape == ref.basis.shape, (seed, n)
        torch.testing.assert_close(_projector_matrix(got.basis), _projector_matrix(ref.basis), atol=1e-4, rtol=0,
                                   msg=f"seed {seed} module {n}")
        assert got.trace == pytest.approx(ref.trace, rel=1e-4)


def test_alpha_strengths_and_fraction_against_the_formulas():
    seed = random.randrange(10**6)
    model, tok, calib = _setup(seed)
    sub = SafetySubspace.compute(model, calib, tok, max_length=64)
    traces = {n: b.trace for n, b in sub.bases.items()}
    for norm, z in (("none", 1.0), ("max", max(traces.values())), ("mean", sum(traces.values()) / len(traces))):
        alpha = sub.alpha(0.5, norm)
        for n, t in traces.items():
            assert alpha[n] == pytest.approx(max(0.0, 1 - 0.5 * t / z)), (seed, norm, n)
    assert set(sub.alpha(0.5, "max", strict=True).values()) == {0.0}
    assert all(s == pytest.approx(1 - a) for s, a in zip(sub.strengths(0.5, "max").values(), sub.alpha(0.5, "max").values()))
    g = torch.Generator().manual_seed(seed)
    updates = {n: torch.randn(b.basis.shape[0], generator=g) for n, b in sub.bases.items()}
    frac = sub.fraction(updates)
    for n, u in updates.items():
        if sub.bases[n].basis.shape[1]:
            dense = float((_projector_matrix(sub.bases[n].basis) @ u.double()).norm() / u.double().norm())
            assert frac[n] == pytest.approx(dense, rel=1e-5), seed


def test_refresh_weighted_equals_merging_the_fresh_basis_and_save_load_round_trips(tmp_path):
    seed = random.randrange(10**6)
    model, tok, calib = _setup(seed)
    old = SafetySubspace.compute(model, calib[:5], tok, max_length=64)
    with torch.no_grad():
        for _, (a, b) in ss.lora_modules(model).items():
            b.weight.mul_(1.5)
    fresh = SafetySubspace.compute(model, calib, tok, max_length=64)
    merged = old.refresh(model, calib, tok, merge="weighted", max_length=64)
    by_merge = old.merge(fresh, "weighted")
    for n in merged.bases:
        torch.testing.assert_close(_projector_matrix(merged.bases[n].basis), _projector_matrix(by_merge.bases[n].basis),
                                   atol=1e-5, rtol=0, msg=f"seed {seed}")
        ref = ss.merge_weighted(old.bases[n], fresh.bases[n], 0.9)
        assert merged.bases[n].trace == pytest.approx(ref.trace)
    path = tmp_path / "safety.safetensors"
    merged.save(path, model=model)
    back = SafetySubspace.load(path, model=model)
    assert back.rho == merged.rho
    for n, b in merged.bases.items():
        torch.testing.assert_close(back.bases[n].basis, b.basis)
        assert back.bases[n].trace == b.trace
    other, _, _ = _setup(seed, r=2)
    with pytest.raises(SafeAnchorError, match="recompute the bases"):
        SafetySubspace.load(path, model=other)
    with pytest.raises(SafeAnchorError, match="merge"):
        old.refresh(model, calib, tok, merge="sum")


def test_safety_term_gradient_equals_backward_with_and_without_checkpointing():
    """The term's gradient through autograd.grad, and through the moved-aside .grad route that gradient
    checkpointing needs, both equal a plain backward of weight x loss, and leave .grad untouched."""
    seed = random.randrange(10**6)
    model, tok, calib = _setup(seed)
    weights = [w for a, b in ss.lora_modules(model).values() for w in (a.weight, b.weight)]
    for w in weights:
        w.grad = torch.full_like(w, 7.0)  # a task gradient already there
    model.train()
    term = SafetyTerm("nll", SafetyBatches(calib, tok, 4, seed=seed, max_length=64), weight=0.3)
    grads, value = term.gradients(model, weights)
    assert all(float((w.grad - 7.0).abs().max()) == 0 for w in weights)  # untouched
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    term.batches.position = 0
    grads_ckpt, value_ckpt = term.gradients(model, weights)
    assert all(float((w.grad - 7.0).abs().max()) == 0 for w in weights)
    model.gradient_checkpointing_disable()
    from safeanchor.data.chat import mean_token_nll

    for w in weights:
        w.grad = None
    batch = SafetyBatches(calib, tok, 4, seed=seed, max_length=64).next("cpu")
    (0.3 * mean_token_nll(model, batch)).backward()
    for g, gc, w in zip(grads, grads_ckpt, weights):
        torch.testing.assert_close(g, w.grad, rtol=1e-5, atol=1e-8, msg=f"seed {seed}")
        torch.testing.assert_close(gc, w.grad, rtol=1e-5, atol=1e-8, msg=f"seed {seed}")
    assert value == pytest.approx(value_ckpt, rel=1e-6)


def test_projector_refuses_a_subspace_of_another_model():
    model, tok, calib = _setup(0)
    sub = SafetySubspace.compute(model, calib, tok, max_length=64)
    bigger, _, _ = _setup(0, r=2)
    bad = SafetySubspace({"not.a.module": next(iter(sub.bases.values()))})
    with pytest.raises(SafeAnchorError, match="lacks"):
        SafetyProjector(bigger, bad)


class _Judge:
    def __init__(self, measures):
        self.name, self.measures = "j", measures


def test_monitor_takes_a_refusal_or_a_harm_judge_and_needs_a_baseline():
    assert safeanchor.SafetyMonitor(["p"], _Judge("safe_response")).measures == "safe_response"  # Llama Guard
    assert safeanchor.SafetyMonitor(["p"], _Judge("refusal")).measures == "refusal"
    with pytest.raises(SafeAnchorError, match="refusal judge"):
        safeanchor.SafetyMonitor(["p"], _Judge("toxicity"))
    mon = safeanchor.SafetyMonitor(["p"], rate_fn=lambda m, t: 80.0, tau=0.05)
    with pytest.raises(SafeAnchorError, match="baseline"):
        _ = mon.threshold
    assert mon.set_baseline(None, None) == 80.0 and mon.threshold == pytest.approx(76.0)
    with pytest.raises(SafeAnchorError, match="no prompts"):
        safeanchor.SafetyMonitor([])


def test_public_api_exports_every_part():
    for name in ("SafetySubspace", "SafetyProjector", "SafetyTerm", "SafetyBatches", "anchor_kl", "SafetyMonitor",
                 "monitor_and_repair", "RepairSettings", "safe_lora", "SafeAnchorCallback", "SafeAnchorConfig",
                 "load_safety_examples"):
        assert callable(getattr(safeanchor, name)), name
    with pytest.raises(AttributeError):
        safeanchor.not_a_part  # noqa: B018


def test_default_alpha_is_scale_free_and_the_paper_normalisation_is_not():
    """Scaling every module's Fisher by c (more response tokens, a larger LoRA scaling, a summed Fisher
    after merges) leaves the default alpha unchanged; Z = 1 (the paper as written) does not."""
    seed = random.randrange(10**6)
    model, tok, calib = _setup(seed)
    sub = SafetySubspace.compute(model, calib, tok, max_length=64)
    c = 37.0
    scaled = SafetySubspace({n: ss.FisherBasis(b.basis, b.eigenvalues * c, b.trace * c, b.n_samples)
                             for n, b in sub.bases.items()})
    for n, a in sub.alpha().items():
        assert scaled.alpha()[n] == pytest.approx(a), seed
    assert sub.alpha(trace_norm="none") != scaled.alpha(trace_norm="none")
    mean = sum(b.trace for b in sub.bases.values()) / len(sub.bases)
    for n, b in sub.bases.items():
        assert sub.alpha(lam=0.5)[n] == pytest.approx(max(0.0, 1 - 0.5 * b.trace / mean))
    assert safeanchor.SafeAnchorConfig().trace_norm == "mean"


def test_ssi_in_module_groups_gives_the_same_bases_within_its_memory_budget(monkeypatch):
    """A budget that fits two modules' per-example gradients: SSI runs one pass per group (counted), never
    holds more than the budget of gradients at once, and gives the bases of the all-at-once computation."""
    seed = random.randrange(10**6)
    model, tok, calib = _setup(seed)
    whole = SafetySubspace.compute(model, calib, tok, max_length=64, memory_budget_gib=64.0)
    mods = ss.lora_modules(model)
    one = 4.0 * len(calib) * max(a.weight.numel() + b.weight.numel() for a, b in mods.values())
    budget = 2 * one / 2**30
    calls, held = [], []
    real = ss.per_sample_grads_chunked

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(len(out))
        held.append(sum(g.numel() * 4 for g in out.values()))
        return out

    monkeypatch.setattr(ss, "per_sample_grads_chunked", counting)
    grouped = SafetySubspace.compute(model, calib, tok, max_length=64, memory_budget_gib=budget)
    assert len(calls) == -(-len(mods) // 2) and sum(calls) == len(mods)
    assert max(held) <= budget * 2**30
    for n, b in whole.bases.items():
        torch.testing.assert_close(grouped.bases[n].basis, b.basis, msg=f"seed {seed}")
        assert grouped.bases[n].trace == pytest.approx(b.trace)
