"""O-LoRA, Safe LoRA and Vaccine: each rule against a hand-computed reference, then through train_steps."""
import json
import random

import numpy as np
import pytest
import torch

from safeanchor import subspace as ss
from safeanchor.config import load_config
from safeanchor.data.chat import collate, mean_token_nll
from safeanchor.errors import SafeAnchorError
from safeanchor.methods import get_method
from safeanchor.methods.base import Method
from safeanchor.methods.olora import orthogonality
from safeanchor.methods.safelora import lora_layers, safe_lora_project
from safeanchor.methods.vaccine import _Hooks, attention_modules, vaccine_backward
from safeanchor.models import attach_lora, tiny_model, tiny_tokenizer
from safeanchor.train import Context, train_steps


def _ctx(tmp_path, method, options=None, seed=0, model=None, base_dir=None, overrides=None):
    cfg = load_config("smoke", overrides={"method": method, "method_options": {method: options or {}},
                                          **(overrides or {})})
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    model = attach_lora(model if model is not None else tiny_model(0), cfg.lora)
    rng = random.Random(seed)
    calib = [{"prompt": f"how to do bad thing {i}?", "response": "I can't help with that."} for i in range(12)]
    task = [{"prompt": f"add {a} and {b}", "response": str(a + b)}
            for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(32))]
    ctx = Context(cfg=cfg, model=model, tokenizer=tok, run_dir=tmp_path, method=get_method(method, options or {}),
                  calibration=calib, monitor_prompts=["p1"], evaluator=lambda c, p: 100.0, base_dir=base_dir)
    ctx.current_domain = "tiny"
    ctx.domain_examples["tiny"] = task
    return ctx, task


def _batch(ctx, examples):
    return ctx.to_device(collate(ctx.encode_all(examples), ctx.tokenizer.pad_token_id))


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _base(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def _randomise(model, adapter, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in ss.lora_modules(model, adapter).values():
            a.weight.copy_(torch.randn(a.weight.shape, generator=g) * 0.3)
            b.weight.copy_(torch.randn(b.weight.shape, generator=g) * scale)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(5))


# -- O-LoRA ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["l1", "squared"])
def test_olora_penalty_matches_direct_formula(tmp_path, norm):
    lam1, lam2 = 0.7, 0.3
    ctx, _ = _ctx(tmp_path, "olora", {"lambda1": lam1, "lambda2": lam2, "orth_norm": norm})
    m = ctx.method
    m.before_domain(ctx, 1, "d1")
    _randomise(ctx.model, "default", seed=int(torch.randint(0, 10**6, ())))
    for t in (2, 3):
        m.before_domain(ctx, t, f"d{t}")
        new = f"domain{t}"
        _randomise(ctx.model, new, seed=int(torch.randint(0, 10**6, ())))
        old = ["default"] + [f"domain{k}" for k in range(2, t)]
        expected = 0.0
        for name, (a_new, b_new) in ss.lora_modules(ctx.model, new).items():
            an = a_new.weight.detach().double().numpy()
            for o in old:
                ao = ss.lora_modules(ctx.model, o)[name][0].weight.detach().double().numpy()
                prod = ao @ an.T
                expected += lam1 * (np.abs(prod).sum() if norm == "l1" else (prod ** 2).sum())
            expected += lam2 * (np.linalg.norm(an) + np.linalg.norm(b_new.weight.detach().double().numpy()))
        got = m.penalty(ctx)
        assert got.item() == pytest.approx(expected, rel=1e-5)
        # the gradient reaches only the trained adapter
        got.backward()
        for n, p in ctx.model.named_parameters():
            if "lora_" in n:
                assert (p.grad is not None) == (f".{new}." in n), n
        ctx.model.zero_grad(set_to_none=True)
    assert m.adapters == ["default", "domain2", "domain3"]


def test_olora_trains_only_the_new_adapter_and_keeps_the_base(tmp_path):
    ctx, task = _ctx(tmp_path, "olora", {"lambda2": 0.01})
    m = ctx.method
    m.before_domain(ctx, 1, "d1")
    h1 = train_steps(ctx, task, 1, stream=1)
    assert "penalty" in h1[0] and all(h["penalty"] > 0 for h in h1)  # lambda2 acts on task 1 too
    assert m.after_domain(ctx, 1, "d1")["stored_params"] > 0
    base0 = _base(ctx.model)
    m.before_domain(ctx, 2, "d2")
    assert set(n.split(".")[-2] for n in ctx.trainable()) == {"domain2"}
    before = _lora(ctx.model)
    # PEFT re-enables every active adapter's grads when disable_adapter() exits; the method re-freezes
    with ctx.model.disable_adapter():
        torch.testing.assert_close(_logits(ctx.model, IDS), _logits(tiny_model(0), IDS))
    hist = train_steps(ctx, task, 2, stream=2)
    after = _lora(ctx.model)
    assert all(h["penalty"] > 0 for h in hist)
    for n in before:
        moved = not torch.equal(before[n], after[n])
        assert moved == (".domain2." in n), n
    for n, p in _base(ctx.model).items():
        assert torch.equal(p, base0[n]), n
    with ctx.model.disable_adapter():  # both adapters off: still the aligned base
        torch.testing.assert_close(_logits(ctx.model, IDS), _logits(tiny_model(0), IDS))
    rec = m.after_domain(ctx, 2, "d2")
    per = sum(a.weight.numel() + b.weight.numel() for a, b in ss.lora_modules(ctx.model, "default").values())
    assert rec["trainable_params"] == per and rec["stored_params"] == 2 * per and rec["effective_rank"] == 8
    assert rec["orthogonality"] > 0


def _olora_run(tmp_path, seed=0):
    ctx, task = _ctx(tmp_path, "olora", seed=seed)
    ctx.method.before_domain(ctx, 1, "d1")
    losses = [h["loss"] for h in train_steps(ctx, task, 1, stream=1)]
    ctx.method.before_domain(ctx, 2, "d2")
    losses += [h["loss"] for h in train_steps(ctx, task, 2, stream=2)]
    return ctx, losses


def test_olora_state_round_trip_recreates_adapters_and_is_deterministic(tmp_path):
    ctx, losses = _olora_run(tmp_path)
    state, lora = ctx.method.state_dict(), _lora(ctx.model)
    fresh, _ = _ctx(tmp_path, "olora", seed=3)
    fresh.method.load_state_dict(state, fresh)
    fresh.method.load_state_dict(state, fresh)  # idempotent (a checkpoint inside a domain loads it again)
    params = {n: p for n, p in fresh.model.named_parameters() if "lora_" in n}
    assert set(params) == set(lora)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(lora[n])
    torch.testing.assert_close(_logits(fresh.model, IDS), _logits(ctx.model, IDS))
    assert set(n.split(".")[-2] for n in fresh.trainable()) == {"domain2"}
    _, again = _olora_run(tmp_path)
    assert again == losses


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(SafeAnchorError):
        orthogonality([torch.ones(2, 3)], torch.ones(2, 3), "l3")
    with pytest.raises(SafeAnchorError):
        get_method("olora", {"orth_norm": "cosine"})
    with pytest.raises(SafeAnchorError):
        get_method("safelora", {"projector": "svd"})


REINIT = {"train.reinit_adapter_per_domain": True}


def _domains(ctx, task, steps=(1, 2)):
    """Domains as the pipeline runs them: before_domain, reset_adapters under reinit, train, after_domain."""
    losses = []
    torch.manual_seed(11)
    for t, n in enumerate(steps, start=1):
        ctx.method.before_domain(ctx, t, f"d{t}")
        if ctx.cfg.train.reinit_adapter_per_domain:
            with torch.random.fork_rng():
                torch.manual_seed(150 + t)
                ctx.method.reset_adapters(ctx)
        losses += [h["loss"] for h in train_steps(ctx, task, n, stream=t)]
        ctx.method.after_domain(ctx, t, f"d{t}")
    return losses


def test_reset_adapters_reinitialises_every_trained_adapter_with_peft_init(tmp_path):
    """The default hook resets the adapters the method trains, whatever their name (the pipeline used to
    reset only "default"), by PEFT's init (B = 0, A Kaiming), deterministically; frozen adapters stay."""
    from safeanchor.models import peft_lora_config

    cfg = load_config("smoke", overrides=REINIT)
    model = attach_lora(tiny_model(0), cfg.lora, adapter_name="task")
    model.add_adapter("frozen", peft_lora_config(cfg.lora))  # inactive, not trainable
    _randomise(model, "task", seed=1)
    _randomise(model, "frozen", seed=2)
    frozen = {n: p.clone() for n, p in _lora(model).items() if ".frozen." in n}
    ctx = Context(cfg=cfg, model=model, tokenizer=tiny_tokenizer(), run_dir=tmp_path, method=Method(None))
    resets = []
    for _ in range(2):
        torch.manual_seed(7)
        ctx.method.reset_adapters(ctx)
        resets.append(_lora(model))
    for n, p in resets[0].items():
        if ".frozen." in n:
            assert torch.equal(p, frozen[n]), n
        elif "lora_B" in n:
            assert not p.any(), n
        else:
            assert p.abs().max() > 0 and p.abs().max() <= 1 / p.shape[1] ** 0.5 + 1e-6, n  # Kaiming-uniform(a=sqrt 5)
        assert torch.equal(p, resets[1][n]), n


def test_olora_reinit_is_a_no_op(tmp_path):
    """Every O-LoRA domain already trains a fresh adapter: reinit gives the same run (it used to be refused)."""
    plain, task = _ctx(tmp_path, "olora")
    reinit, _ = _ctx(tmp_path, "olora", overrides=REINIT)
    assert _domains(reinit, task) == _domains(plain, task)
    for n, p in _lora(reinit.model).items():
        assert torch.equal(p, _lora(plain.model)[n]), n


@pytest.mark.parametrize("merge", [False, True])
def test_vaccine_reinit_starts_every_domain_from_the_vaccinated_model(tmp_path, merge):
    """With reinit each domain starts from the vaccinated model (it used to be refused without merge)."""
    ctx, task = _ctx(tmp_path, "vaccine", {"steps": 2, "merge": merge}, overrides=REINIT)
    ctx.method.prepare(ctx)
    vaccinated = _logits(ctx.model, IDS)
    for t in (1, 2):
        ctx.method.before_domain(ctx, t, f"d{t}")
        torch.manual_seed(150 + t)
        ctx.method.reset_adapters(ctx)
        torch.testing.assert_close(_logits(ctx.model, IDS), vaccinated)
        train_steps(ctx, task, 2, stream=t)
        assert (_logits(ctx.model, IDS) - vaccinated).abs().max() > 1e-4
    state = ctx.method.state_dict()  # a resumed run restores the same point
    fresh, _ = _ctx(tmp_path, "vaccine", {"steps": 2, "merge": merge}, overrides=REINIT)
    fresh.method.load_state_dict(state, fresh)
    torch.manual_seed(0)
    fresh.method.reset_adapters(fresh)
    torch.testing.assert_close(_logits(fresh.model, IDS), vaccinated)


def _load_saved(path, ids):
    from peft import PeftModel

    return _logits(PeftModel.from_pretrained(tiny_model(0), path), ids)


def test_olora_saves_one_standard_adapter_equal_to_the_model(tmp_path):
    """adapters/<t>-<domain> is loadable with PeftModel.from_pretrained and IS the model after domain t."""
    import json

    ctx, task = _ctx(tmp_path, "olora")
    for t in (1, 2, 3):
        ctx.method.before_domain(ctx, t, f"d{t}")
        _randomise(ctx.model, ctx.method.adapters[-1], seed=int(torch.randint(0, 10**6, ())))
        rec = ctx.method.after_domain(ctx, t, f"d{t}")
        path = tmp_path / f"adapter{t}"
        ctx.method.save_adapter(ctx, path)
        ids = torch.randint(0, 259, (3, 17))
        torch.testing.assert_close(_load_saved(path, ids), _logits(ctx.model, ids), rtol=1e-5, atol=1e-5)
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["r"] == config["lora_alpha"] == rec["saved_rank"] == 4 * t
        assert (path / "per_domain" / "adapter_config.json").exists()
        assert sorted(p.name for p in (path / "per_domain").iterdir() if p.is_dir()) == \
            [f"domain{k}" for k in range(2, t + 1)]


def test_vaccine_merge_saves_the_vaccination_with_the_adapter(tmp_path):
    ctx, task, _ = _vaccine_prepare(tmp_path, {"merge": True})
    train_steps(ctx, task, 2, stream=1)
    ctx.method.save_adapter(ctx, tmp_path / "adapter1")
    ids = torch.randint(0, 259, (3, 17))
    torch.testing.assert_close(_load_saved(tmp_path / "adapter1", ids), _logits(ctx.model, ids), rtol=1e-5, atol=1e-5)


# -- Safe LoRA ------------------------------------------------------------------------------------------

def _alignment_weights(model, seed):
    """(aligned, unaligned) dicts keyed by checkpoint name, inserted in shuffled order (different orders)."""
    g = torch.Generator().manual_seed(seed)
    names = list(lora_layers(model))
    aligned, unaligned = {}, {}
    for name in names:
        w = lora_layers(model)[name].get_base_layer().weight.detach().clone()
        unaligned[name + ".weight"] = w
        aligned[name + ".weight"] = w + torch.randn(w.shape, generator=g) * 0.1
    ka, ku = list(aligned), list(unaligned)
    random.Random(seed).shuffle(ka)
    random.Random(seed + 1).shuffle(ku)
    return {k: aligned[k] for k in ka}, {k: unaligned[k] for k in ku}


def _dense_reference(model, aligned, unaligned, projector, energy, select, k, tau, start=None):
    """Expected B per module and cosines, with dense numpy matrices (C formed explicitly)."""
    expected, cos = {}, {}
    for name, layer in lora_layers(model).items():
        A = layer.lora_A["default"].weight.detach().double().numpy()
        B = layer.lora_B["default"].weight.detach().double().numpy()
        B0 = np.zeros_like(B) if start is None else start[name].double().numpy()
        V = (aligned[name + ".weight"] - unaligned[name + ".weight"]).double().numpy()
        if projector == "paper":
            C = V @ V.T / np.linalg.norm(V, "fro")
        else:
            U, S, _ = np.linalg.svd(V)
            kk = int(np.searchsorted(np.cumsum(S ** 2), energy * (S ** 2).sum())) + 1
            C = U[:, :kk] @ U[:, :kk].T
        D = B - B0
        dw, dwp = D @ A, C @ D @ A
        cos[name] = float((dw * dwp).sum() / (np.linalg.norm(dw) * np.linalg.norm(dwp)))
        expected[name] = (B, B0 + C @ D)
    ranked = sorted(cos, key=cos.get)
    chosen = ranked[:k] if select == "number" else [n for n in ranked if cos[n] <= tau]
    return {n: (expected[n][1] if n in chosen else expected[n][0]) for n in expected}, cos, set(chosen)


@pytest.mark.parametrize("projector,select", [("paper", "number"), ("exact", "threshold"), ("exact", "number")])
def test_safe_lora_matches_dense_reference_and_pairs_by_name(tmp_path, projector, select):
    ctx, _ = _ctx(tmp_path, "safelora", seed=int(torch.randint(0, 10**6, ())))
    _randomise(ctx.model, "default", seed=int(torch.randint(0, 10**6, ())), scale=0.3)
    aligned, unaligned = _alignment_weights(ctx.model, seed=int(torch.randint(0, 10**6, ())))
    k, energy = 3, 0.6
    _, cos, _ = _dense_reference(ctx.model, aligned, unaligned, projector, energy, select, k, tau=0.0)
    low = sorted(cos.values())
    tau = (low[2] + low[3]) / 2  # a threshold between the 3rd and 4th lowest cosine
    exp, cos, chosen = _dense_reference(ctx.model, aligned, unaligned, projector, energy, select, k, tau=tau)
    assert len(chosen) == 3 and len(exp) == 8  # the selection is exercised both ways
    A0 = {n: l.lora_A["default"].weight.detach().clone() for n, l in lora_layers(ctx.model).items()}
    rep = safe_lora_project(ctx.model, aligned, unaligned, projector=projector, exact_energy=energy, select=select,
                            num_proj_layers=k, threshold=tau)
    assert set(rep["projected"]) == chosen
    for n, layer in lora_layers(ctx.model).items():
        # float32 maths (an SVD for "exact") against float64: entries are ~0.1, a wrong C is off by ~1e-2
        np.testing.assert_allclose(layer.lora_B["default"].weight.detach().double().numpy(), exp[n], rtol=1e-4,
                                   atol=2e-5)
        assert rep["cosine"][n] == pytest.approx(cos[n], abs=1e-5)
        assert torch.equal(layer.lora_A["default"].weight, A0[n])
    assert 0 < rep["pdst"] <= 1


def test_safe_lora_projects_the_increment_without_compounding(tmp_path):
    ctx, _ = _ctx(tmp_path, "safelora")
    _randomise(ctx.model, "default", seed=11, scale=0.3)
    aligned, unaligned = _alignment_weights(ctx.model, seed=12)
    every = dict(select="threshold", threshold=1.0 + 1e-6)  # project every module: exact comparisons
    safe_lora_project(ctx.model, aligned, unaligned, **every)  # "domain 1"
    start = {n: l.lora_B["default"].weight.detach().clone() for n, l in lora_layers(ctx.model).items()}
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():  # "domain 2" changes B
        for layer in lora_layers(ctx.model).values():
            layer.lora_B["default"].weight.add_(torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.3)
    end = {n: l.lora_B["default"].weight.detach().clone() for n, l in lora_layers(ctx.model).items()}
    safe_lora_project(ctx.model, aligned, unaligned, start=start, **every)
    for n, layer in lora_layers(ctx.model).items():
        V = (aligned[n + ".weight"] - unaligned[n + ".weight"]).double()
        C = V @ V.T / torch.linalg.matrix_norm(V)
        got = layer.lora_B["default"].weight.detach().double()
        torch.testing.assert_close(got, start[n].double() + C @ (end[n] - start[n]).double(), rtol=1e-4, atol=1e-6)
        assert (got - C @ end[n].double()).abs().max() > 1e-3  # not the compounded C (B1' + D)


def test_safe_lora_exact_projector_is_idempotent(tmp_path):
    ctx, _ = _ctx(tmp_path, "safelora")
    _randomise(ctx.model, "default", seed=21, scale=0.3)
    aligned, unaligned = _alignment_weights(ctx.model, seed=22)
    every = dict(select="threshold", threshold=2.0, projector="exact", exact_energy=0.5)
    safe_lora_project(ctx.model, aligned, unaligned, **every)
    once = _lora(ctx.model)
    safe_lora_project(ctx.model, aligned, unaligned, **every)
    for n, p in _lora(ctx.model).items():
        torch.testing.assert_close(p, once[n], rtol=1e-4, atol=1e-6)


def test_safe_lora_reads_safetensors_by_name_and_checks_them(tmp_path):
    from safetensors.torch import save_file

    ctx, _ = _ctx(tmp_path, "safelora")
    _randomise(ctx.model, "default", seed=31, scale=0.3)
    aligned, unaligned = _alignment_weights(ctx.model, seed=32)
    shard_dir = tmp_path / "unaligned"
    shard_dir.mkdir()
    keys = list(unaligned)
    save_file({k: unaligned[k].contiguous() for k in keys[::2]}, str(shard_dir / "model-00002-of-00002.safetensors"))
    save_file({k: unaligned[k].contiguous() for k in keys[1::2]}, str(shard_dir / "model-00001-of-00002.safetensors"))
    save_file({"decoy." + k: torch.zeros(1) for k in keys}, str(shard_dir / "consolidated.safetensors"))
    weight_map = {k: f"model-0000{2 - i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ref = _lora(ctx.model)
    rep_dict = safe_lora_project(ctx.model, aligned, unaligned, num_proj_layers=4)
    by_dict = _lora(ctx.model)
    with torch.no_grad():
        for n, p in ctx.model.named_parameters():
            if n in ref:
                p.copy_(ref[n])
    rep_dir = safe_lora_project(ctx.model, aligned, str(shard_dir), num_proj_layers=4)
    assert rep_dir["projected"] == rep_dict["projected"]
    for n, p in _lora(ctx.model).items():
        torch.testing.assert_close(p, by_dict[n])
    # a missing module and a wrong shape are one-line errors, raised before anything changes
    missing = dict(unaligned)
    del missing[keys[0]]
    with pytest.raises(SafeAnchorError, match="no weight named"):
        safe_lora_project(ctx.model, aligned, missing)
    wrong = dict(unaligned)
    wrong[keys[1]] = torch.zeros(3, 3)
    with pytest.raises(SafeAnchorError, match="shape"):
        safe_lora_project(ctx.model, aligned, wrong)
    with pytest.raises(SafeAnchorError, match="does not exist"):
        safe_lora_project(ctx.model, aligned, str(tmp_path / "no-such-dir"))
    torch.testing.assert_close(_lora(ctx.model), by_dict)


def _aligned_dir(tmp_path):
    """A saved 'aligned' tiny model: the tiny-random weights with every attention projection changed."""
    path = tmp_path / "aligned"
    if not (path / "config.json").exists():
        model = tiny_model(0)
        g = torch.Generator().manual_seed(41)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "self_attn" in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.save_pretrained(path, safe_serialization=True)
    from transformers import AutoModelForCausalLM

    return path, AutoModelForCausalLM.from_pretrained(path)


def _safelora_run(tmp_path, options):
    base_dir, aligned = _aligned_dir(tmp_path)
    ctx, task = _ctx(tmp_path, "safelora", options, model=aligned, base_dir=base_dir)
    prep = ctx.method.prepare(ctx)
    base0 = _base(ctx.model)
    recs, losses = [], []
    for t in (1, 2):
        ctx.method.before_domain(ctx, t, f"d{t}")
        start = {n: l.lora_B["default"].weight.detach().clone() for n, l in lora_layers(ctx.model).items()}
        losses += [h["loss"] for h in train_steps(ctx, task, 1, stream=t)]
        end = _lora(ctx.model)
        recs.append((start, end, ctx.method.after_domain(ctx, t, f"d{t}")))
        for n, p in _lora(ctx.model).items():  # after_domain changes lora_B only
            assert torch.equal(p, end[n]) or ".lora_B." in n, n
    assert all(torch.equal(p, base0[n]) for n, p in _base(ctx.model).items())
    return ctx, prep, recs, losses


def test_safelora_method_after_each_domain(tmp_path):
    ctx, prep, recs, losses = _safelora_run(tmp_path, {"num_proj_layers": 3})
    assert prep["modules"] == 8 and prep["unaligned"] == "tiny-random"
    unaligned = tiny_model(0).state_dict()
    _, aligned = _aligned_dir(tmp_path)
    aligned = aligned.state_dict()
    layers = lora_layers(ctx.model)
    final = _lora(ctx.model)
    start, end, rec = recs[1]
    assert rec["n_projected"] == 3 and rec["increment"]
    pname = {n: [k for k in final if k.startswith("base_model.model." + n + ".lora_B")][0] for n in layers}
    for n in layers:
        if n in rec["projected"]:
            V = (aligned[n + ".weight"] - unaligned[n + ".weight"]).double()
            want = start[n].double() + V @ (V.T @ (end[pname[n]] - start[n]).double()) / torch.linalg.matrix_norm(V)
            torch.testing.assert_close(final[pname[n]].double(), want, rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(final[pname[n]], end[pname[n]])
    assert all(not torch.equal(end[k], recs[0][1][k]) for k in end)  # training moved every LoRA tensor
    state = ctx.method.state_dict()
    fresh = get_method("safelora", {"num_proj_layers": 3})
    fresh.load_state_dict(state, ctx)
    assert fresh.state_dict() == state
    _, _, recs2, losses2 = _safelora_run(tmp_path, {"num_proj_layers": 3})
    assert losses2 == losses and [r[2]["projected"] for r in recs2] == [r[2]["projected"] for r in recs]


def test_safelora_needs_an_unaligned_model(tmp_path):
    ctx, _ = _ctx(tmp_path, "safelora")  # base_dir None: model.name is the aligned model itself
    with pytest.raises(SafeAnchorError, match="unaligned_model"):
        ctx.method.prepare(ctx)


# -- Vaccine --------------------------------------------------------------------------------------------

def _tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        tie_word_embeddings=False, pad_token_id=258, eos_token_id=257, bos_token_id=256)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MistralForCausalLM(cfg)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_vaccine_perturbation_is_rho_g_over_global_norm(tmp_path, arch):
    model = tiny_model(0) if arch == "llama" else _tiny_mistral()
    ctx, task = _ctx(tmp_path, "vaccine", model=model)
    _randomise(ctx.model, "default", seed=int(torch.randint(0, 10**6, ())))
    ctx.model.eval()  # no dropout: pass 1 and the reference see the same function
    batch = _batch(ctx, task[:4])
    layers = ctx.model.base_model.model.model.layers
    mods = attention_modules(ctx.model)
    assert [m for m in mods.values()] == [layer.self_attn for layer in layers]
    rho = float(torch.empty(()).uniform_(0.5, 3.0))
    hooks0 = _hook_count(ctx.model)

    # reference pass 1: retain_grad on each attention output, one backward
    outs = []
    handles = [layer.self_attn.register_forward_hook(lambda m, a, o: outs.append(o[0]) or o[0].retain_grad())
               for layer in layers]
    mean_token_nll(ctx.model, batch).backward()
    for h in handles:
        h.remove()
    g = [o.grad.double().numpy() for o in outs]
    total = np.sqrt(sum((x ** 2).sum() for x in g))
    eps_ref = [rho * x / (total + 1e-7) for x in g]

    ctx.model.zero_grad(set_to_none=True)
    out = vaccine_backward(ctx.model, batch, rho)
    assert _hook_count(ctx.model) == hooks0  # every hook removed
    for e, ref in zip(out["eps"].values(), eps_ref):
        np.testing.assert_allclose(e.double().numpy(), ref, rtol=1e-4, atol=1e-7)
    norm = np.sqrt(sum((e.double().numpy() ** 2).sum() for e in out["eps"].values()))
    assert norm == pytest.approx(rho, rel=1e-5)  # one global norm, not one per layer
    got = {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}

    # reference pass 2: add eps_ref to each attention output, backward
    ctx.model.zero_grad(set_to_none=True)
    handles = [layer.self_attn.register_forward_hook(
        lambda m, a, o, e=torch.from_numpy(e).float(): (o[0] + e, *o[1:])) for layer, e in zip(layers, eps_ref)]
    loss = mean_token_nll(ctx.model, batch)
    loss.backward()
    for h in handles:
        h.remove()
    assert float(out["loss"]) == pytest.approx(loss.item(), rel=1e-5)
    assert float(out["loss"]) > float(out["clean_loss"])  # the ascent direction raises the loss
    for n, p in ctx.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7)
    assert set(got) == {n for n, p in ctx.model.named_parameters() if p.grad is not None}


def test_vaccine_hooks_are_removed_after_an_error(tmp_path):
    ctx, _ = _ctx(tmp_path, "vaccine")
    mods = attention_modules(ctx.model)
    with pytest.raises(RuntimeError):
        with _Hooks(mods):
            raise RuntimeError("boom")
    assert _hook_count(ctx.model) == 0


def _vaccine_prepare(tmp_path, options, seed=0):
    ctx, task = _ctx(tmp_path, "vaccine", {"steps": 2, **options}, seed=seed)
    rec = ctx.method.prepare(ctx)
    return ctx, task, rec


def test_vaccine_prepare_trains_the_lora_once_then_plain_sequential(tmp_path):
    ctx0, _ = _ctx(tmp_path, "vaccine")
    lora0, base0 = _lora(ctx0.model), _base(ctx0.model)
    ctx, task, rec = _vaccine_prepare(tmp_path, {})
    assert rec["steps"] == 2 and rec["hooked_modules"] == 2 and rec["rho"] == 2.0
    assert rec["first_loss"] > rec["first_clean_loss"]
    lora, base = _lora(ctx.model), _base(ctx.model)
    assert all(not torch.equal(lora[n], lora0[n]) for n in lora)
    assert all(torch.equal(base[n], base0[n]) for n in base)
    assert _hook_count(ctx.model) == 0
    assert not (tmp_path / "checkpoints" / "vaccine.pt").exists()
    # the domains are standard LoRA: the default step, no per-step change
    assert type(ctx.method).compute_grads is Method.compute_grads
    hist = train_steps(ctx, task, 1, stream=1)
    assert "penalty" not in hist[0]
    # same seed, same losses; the state round trip is trivial without merge
    ctx2, _, rec2 = _vaccine_prepare(tmp_path, {})
    assert (rec2["first_loss"], rec2["final_loss"]) == (rec["first_loss"], rec["final_loss"])
    fresh = get_method("vaccine")
    fresh.load_state_dict(ctx.method.state_dict(), ctx2)
    assert fresh.merged == {}


def test_vaccine_merge_moves_the_lora_into_the_base_and_resumes(tmp_path):
    ctx, _, rec = _vaccine_prepare(tmp_path, {"merge": True})
    assert rec["merged_modules"] == 8
    assert all(b.weight.abs().max() == 0 for _, b in ss.lora_modules(ctx.model).values())  # LoRA restarted
    assert (tmp_path / "vaccine_adapter" / "adapter_config.json").exists()
    # the base is now W + s B A of the vaccination factors
    ref = tiny_model(0)
    ref_w = dict(ref.named_parameters())
    layers = dict(ctx.model.named_modules())
    for name, (a, b, s) in ctx.method.merged.items():
        key = name[len("base_model.model."):] + ".weight"
        torch.testing.assert_close(layers[name].get_base_layer().weight, ref_w[key] + s * b @ a)
    with ctx.model.disable_adapter():
        vaccinated = _logits(ctx.model, IDS)
    assert (vaccinated - _logits(ref, IDS)).abs().max() > 1e-4
    # resume on a fresh model: load_state_dict re-merges, once
    fresh, _ = _ctx(tmp_path, "vaccine", {"merge": True})
    state = ctx.method.state_dict()
    fresh.method.load_state_dict(state, fresh)
    fresh.method.load_state_dict(state, fresh)
    with torch.no_grad():
        for n, p in fresh.model.named_parameters():
            if "lora_" in n:
                p.copy_(_lora(ctx.model)[n])
    torch.testing.assert_close(_logits(fresh.model, IDS), _logits(ctx.model, IDS))
