"""EWC, SafeGrad and safety interleaving: each rule against a hand computation, then each method
through train_steps on the tiny model."""
import copy
import random

import pytest
import torch

from safeanchor import subspace as ss
from safeanchor.config import load_config
from safeanchor.data.chat import collate, mean_token_nll, response_logits, sequence_logprob
from safeanchor.methods import get_method
from safeanchor.methods.interleave import safety_count
from safeanchor.methods.safegrad import surgery
from safeanchor.models import attach_lora, tiny_model, tiny_tokenizer
from safeanchor.train import Context, train_steps


def _ctx(tmp_path, name, options=None, seed=0):
    cfg = load_config("smoke", overrides={"method": name, "method_options": options or {}})
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    model = attach_lora(tiny_model(seed), cfg.lora)
    rng = random.Random(seed)
    calib = [{"prompt": f"how to do bad thing {i}?", "response": "I can't help with that."} for i in range(12)]
    task = [{"prompt": f"add {a} and {b}", "response": str(a + b)}
            for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(32))]
    method = get_method(name, options or {})
    ctx = Context(cfg=cfg, model=model, tokenizer=tok, run_dir=tmp_path, method=method, calibration=calib,
                  monitor_prompts=["p1", "p2"], evaluator=lambda c, p: 100.0)
    ctx.current_domain = "tiny"
    ctx.domain_examples["tiny"] = task
    return ctx, task


def _fresh_seed() -> int:
    """A new seed every run (the rules must hold for any inputs, not for one lucky draw)."""
    return random.SystemRandom().randrange(1 << 30)


def _randomise_lora(model, seed):
    """B (and a perturbation of A) away from the fresh-LoRA point, so every gradient is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, (a, b) in ss.lora_modules(model).items():
            b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.05)
            a.weight.add_(torch.randn(a.weight.shape, generator=g) * 0.01)


def _vec_grads(model):
    """vec([grad B; grad A]) per module, cloned (zeros where None)."""
    return {n: ss.flat_grad(a, b).detach().clone() for n, (a, b) in ss.lora_modules(model).items()}


# -- EWC -------------------------------------------------------------------------------------------

def test_ewc_fisher_is_mean_of_single_example_squared_scores(tmp_path):
    ctx, _ = _ctx(tmp_path, "ewc")
    _randomise_lora(ctx.model, seed=_fresh_seed())
    examples = ctx.calibration[:3] + ctx.domain_examples["tiny"][:3]
    got = ctx.method.diagonal_fisher(ctx, examples)

    ctx.model.eval()
    sq_sum, g_sum = None, None
    for ex in examples:
        ctx.model.zero_grad(set_to_none=True)
        one = collate(ctx.encode_all([ex]), ctx.tokenizer.pad_token_id)
        sequence_logprob(ctx.model, one).sum().backward()
        g = {n: v.double() for n, v in _vec_grads(ctx.model).items()}
        sq_sum = {n: v.square() for n, v in g.items()} if sq_sum is None else {n: sq_sum[n] + g[n].square() for n in g}
        g_sum = g if g_sum is None else {n: g_sum[n] + g[n] for n in g}
    for n, e in sq_sum.items():
        torch.testing.assert_close(got[n].double(), e / len(examples), rtol=1e-4, atol=1e-10)
    # the squared batch-mean gradient (public EWC codes) is a different, smaller quantity
    batch_sq = sum(float((v / len(examples)).square().sum()) for v in g_sum.values())
    assert batch_sq < 0.8 * sum(float(f.sum()) for f in got.values())


def test_ewc_safety_fisher_at_fresh_lora_has_zero_a_block(tmp_path):
    ctx, _ = _ctx(tmp_path, "ewc")
    rec = ctx.method.prepare(ctx)["fisher"]
    for n, (a, b) in ss.lora_modules(ctx.model).items():
        f = ctx.method.fisher[n]
        assert f[: b.weight.numel()].sum() > 0 and f[b.weight.numel():].abs().max() == 0
    assert rec["zero_fraction"] > 0.5  # r * d_in A-entries of r * (d_in + d_out), all zero
    assert rec["scale"] == pytest.approx(rec["trace"])
    assert ctx.method.penalty(ctx).item() == 0.0  # at the anchor


def test_ewc_penalty_and_its_gradient_match_the_formula(tmp_path):
    lam = random.SystemRandom().uniform(0.5, 5.0)
    ctx, _ = _ctx(tmp_path, "ewc", {"lam": lam, "fisher_norm": "none"})
    m = ctx.method
    mods = ss.lora_modules(ctx.model)
    m.fisher = {n: torch.rand(a.weight.numel() + b.weight.numel()) for n, (a, b) in mods.items()}
    m.anchor = {n: torch.randn(a.weight.numel() + b.weight.numel()) * 0.1 for n, (a, b) in mods.items()}
    m.scale = 1.0
    _randomise_lora(ctx.model, seed=_fresh_seed())
    expected, grads = 0.0, {}
    for n, (a, b) in mods.items():
        nb = b.weight.numel()
        fb, fa = m.fisher[n][:nb].view_as(b.weight).double(), m.fisher[n][nb:].view_as(a.weight).double()
        db = b.weight.detach().double() - m.anchor[n][:nb].view_as(b.weight).double()
        da = a.weight.detach().double() - m.anchor[n][nb:].view_as(a.weight).double()
        expected += 0.5 * lam * float((fb * db ** 2).sum() + (fa * da ** 2).sum())
        grads[n] = (lam * fa * da, lam * fb * db)
    ctx.model.zero_grad(set_to_none=True)
    pen = m.penalty(ctx)
    assert pen.item() == pytest.approx(expected, rel=1e-5)
    pen.backward()
    for n, (a, b) in mods.items():
        torch.testing.assert_close(a.weight.grad.double(), grads[n][0], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(b.weight.grad.double(), grads[n][1], rtol=1e-4, atol=1e-8)
    # fisher_norm trace divides by c
    m.scale = 7.0
    assert m.penalty(ctx).item() == pytest.approx(expected / 7.0, rel=1e-5)


def test_ewc_online_accumulates_and_moves_the_anchor(tmp_path):
    ctx, task = _ctx(tmp_path, "ewc", {"online": True, "gamma": 0.5})
    ctx.calibration = ctx.calibration[:4]
    m = ctx.method
    m.prepare(ctx)
    f0 = {n: f.clone() for n, f in m.fisher.items()}
    _randomise_lora(ctx.model, seed=3)
    f_new = m.diagonal_fisher(ctx, ctx.calibration)
    m.after_domain(ctx, 1, "tiny")
    for n, p in m._params(ctx).items():
        torch.testing.assert_close(m.fisher[n], 0.5 * f0[n] + f_new[n], rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(m.anchor[n], p.detach())
    assert m.scale == pytest.approx(sum(float(f.double().sum()) for f in f0.values()))  # fixed at the first


def test_ewc_previous_domain_penalises_only_after_a_domain(tmp_path):
    ctx, task = _ctx(tmp_path, "ewc", {"fisher_data": "previous_domain", "fisher_samples": 5})
    m = ctx.method
    assert m.prepare(ctx) == {} and m.penalty(ctx) is None
    _randomise_lora(ctx.model, seed=4)
    rec = m.after_domain(ctx, 1, "tiny")["fisher"]
    assert rec["zero_fraction"] < 0.5 and m.penalty(ctx).item() == 0.0
    subset = m._subset(ctx, task, 1)
    assert len(subset) == 5 and subset == m._subset(ctx, task, 1)
    f = m.diagonal_fisher(ctx, subset)
    for n in f:
        torch.testing.assert_close(m.fisher[n], f[n])


# -- SafeGrad --------------------------------------------------------------------------------------

@pytest.mark.parametrize("conflict", [True, False])
def test_surgery_matches_hand_computation(conflict):
    gen = torch.Generator().manual_seed(_fresh_seed())
    g_u, g_a = torch.randn(257, generator=gen), torch.randn(257, generator=gen)
    if (float(g_u @ g_a) < 0) != conflict:
        g_a = -g_a
    lam = float(torch.rand(1, generator=gen))
    got, info = surgery(g_u, g_a, lam)
    u, a = g_u.tolist(), g_a.tolist()
    dot = sum(x * y for x, y in zip(u, a))
    na = sum(y * y for y in a)
    coef = dot / na if dot < 0 else 0.0
    expected = torch.tensor([x - coef * y + lam * y for x, y in zip(u, a)], dtype=torch.float64)
    assert info["conflict"] is conflict
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    if conflict:  # the projected task gradient is orthogonal to g_a
        assert abs(float((got.double() - lam * g_a.double()) @ g_a.double())) < 1e-4 * float(g_u.norm() * g_a.norm())
    else:
        torch.testing.assert_close(got.double(), g_u.double() + lam * g_a.double())
    zero, info0 = surgery(g_u, torch.zeros(257), lam)
    assert not info0["conflict"] and info0["cos"] is None and torch.equal(zero, g_u)


def _reference_align_grads(ctx, batch):
    """g_a of KL(p_aligned || p_theta), the aligned model a separate copy (not disable_adapter)."""
    reference = tiny_model(0)
    with torch.no_grad():
        ref_logp = torch.log_softmax(response_logits(reference, batch)[0], -1)
    ctx.model.zero_grad(set_to_none=True)
    logp = torch.log_softmax(response_logits(ctx.model, batch)[0], -1)
    (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().backward()
    out = _vec_grads(ctx.model)
    ctx.model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("mode", ["global", "per_module"])
@pytest.mark.parametrize("conflict", [True, False])
def test_safegrad_hook_matches_surgery_by_hand(tmp_path, mode, conflict):
    lam = random.SystemRandom().uniform(0.1, 2.0)
    ctx, _ = _ctx(tmp_path, "safegrad", {"surgery": mode, "lambda_a": lam})
    _randomise_lora(ctx.model, seed=_fresh_seed())
    ctx.model.eval()  # dropout off: the hook's and the reference's forwards are identical
    m = ctx.method
    g_a = _reference_align_grads(ctx, m.align_batch(ctx))
    # a task gradient with a chosen sign of <g_u, g_a> in every module
    g_u = {n: torch.randn_like(g) * float(g.norm()) / g.numel() ** 0.5 + (-3.0 if conflict else 3.0) * g
           for n, g in g_a.items()}
    mods = ss.lora_modules(ctx.model)
    for n, (a, b) in mods.items():
        ss.set_flat_grad(a, b, g_u[n])
    logs = m.rewrite_gradients(ctx)
    got = _vec_grads(ctx.model)

    names = list(mods)
    groups = [names] if mode == "global" else [[n] for n in names]
    for group in groups:
        u = torch.cat([g_u[n].double() for n in group])
        a = torch.cat([g_a[n].double() for n in group])
        dot = float(u @ a)
        exp = (u - dot / float(a @ a) * a if dot < 0 else u) + lam * a
        torch.testing.assert_close(torch.cat([got[n].double() for n in group]), exp, rtol=1e-4, atol=1e-7)
    assert logs["conflict"] == (1.0 if conflict else 0.0)
    assert (logs["cos_task_align"] < 0) is conflict
    if mode == "per_module":
        assert logs["conflict_modules"] == (1.0 if conflict else 0.0)


def test_safegrad_kl_at_fresh_lora_leaves_the_task_gradient_alone(tmp_path):
    ctx, task = _ctx(tmp_path, "safegrad")
    batch = collate(ctx.encode_all(task[:4]), ctx.tokenizer.pad_token_id)
    mean_token_nll(ctx.model, batch).backward()
    before = _vec_grads(ctx.model)
    logs = ctx.method.rewrite_gradients(ctx)
    after = _vec_grads(ctx.model)
    for n in before:
        assert torch.equal(before[n], after[n])
    assert logs["align_grad_norm"] == 0.0 and logs["conflict"] == 0.0 and "cos_task_align" not in logs
    # the refusal NLL has a non-zero gradient at the same point
    ctx2, _ = _ctx(tmp_path, "safegrad", {"align_loss": "nll"})
    mean_token_nll(ctx2.model, batch).backward()
    assert ctx2.method.rewrite_gradients(ctx2)["align_grad_norm"] > 0


# -- interleaving ----------------------------------------------------------------------------------

def test_safety_count_is_the_closest_integer_share():
    rng = random.Random()
    for _ in range(200):
        n, ratio = rng.randint(0, 6000), rng.uniform(0.0, 0.6)
        k = safety_count(n, ratio, "mixture")
        best = min(range(0, 2 * n + 3), key=lambda j: (abs((j / (n + j) if n + j else 0.0) - ratio), j))
        assert k == best
        kd = safety_count(n, ratio, "domain")
        assert kd == min(range(0, n + 2), key=lambda j: (abs((j / n if n else 0.0) - ratio), j))
    assert safety_count(5000, 0.10, "mixture") == 556 and safety_count(5000, 0.10, "domain") == 500


def _interleave(tmp_path, options, n_task=None, pool=None, seed=0):
    ctx, task = _ctx(tmp_path, "interleave", options, seed=seed)
    if pool is not None:
        ctx.calibration = [{"prompt": f"harmful request {i}", "response": f"I won't help ({i})."} for i in range(pool)]
    if n_task is not None:
        task = [{"prompt": f"q{i}", "response": f"a{i}", "extra": [i]} for i in range(n_task)]
    return ctx, task


@pytest.mark.parametrize("relative_to, ratio", [("mixture", 0.10), ("domain", 0.10), ("mixture", 0.03)])
def test_interleave_mixture_exact_deterministic_and_inputs_untouched(tmp_path, relative_to, ratio):
    n = random.randint(150, 400)
    ctx, task = _interleave(tmp_path, {"ratio": ratio, "relative_to": relative_to}, n_task=n, pool=100)
    task_copy, calib_copy = copy.deepcopy(task), copy.deepcopy(ctx.calibration)
    mix = ctx.method.domain_data(ctx, 1, "d", task)
    assert task == task_copy and ctx.calibration == calib_copy
    safety_prompts = {e["prompt"] for e in ctx.calibration}
    k = sum(e["prompt"] in safety_prompts for e in mix)
    assert k == safety_count(n, ratio, relative_to) and len(mix) == n + k
    share = k / (n + k) if relative_to == "mixture" else k / n
    assert abs(share - ratio) <= 0.5 / (n if relative_to == "domain" else n + k) + 1e-12
    assert sorted(e["prompt"] for e in mix if e["prompt"] not in safety_prompts) == sorted(e["prompt"] for e in task)
    assert all(e is not t for e in mix for t in task)  # copies: training code may not alias the caller's dicts
    again = ctx.method.domain_data(ctx, 1, "d", task)
    assert again == mix
    assert ctx.method.domain_data(ctx, 2, "d", task) != mix
    assert [i for i, e in enumerate(mix) if e["prompt"] in safety_prompts] != list(range(n, n + k))  # shuffled
    other, _ = _interleave(tmp_path, {"ratio": ratio, "relative_to": relative_to}, n_task=n, pool=100)
    other.cfg.seed = 1
    assert other.method.domain_data(other, 1, "d", task) != mix  # the run seed drives the shuffle
    assert ctx.method.after_domain(ctx, 1, "d")["mixture"]["safety_examples"] == k


def test_interleave_fresh_vs_reuse_and_balanced_repeats(tmp_path):
    ctx, task = _interleave(tmp_path, {}, n_task=90, pool=40)  # k = 10 per domain
    pool = {e["prompt"] for e in ctx.calibration}

    def picked(c, t):
        return [e["prompt"] for e in c.method.domain_data(c, t, f"d{t}", task) if e["prompt"] in pool]

    d1, d2 = picked(ctx, 1), picked(ctx, 2)
    assert len(d1) == len(d2) == 10 and not set(d1) & set(d2)
    ctx_r, _ = _interleave(tmp_path, {"samples": "reuse"}, n_task=90, pool=40)
    assert sorted(picked(ctx_r, 1)) == sorted(picked(ctx_r, 2)) == sorted(d1)
    small, _ = _interleave(tmp_path, {"ratio": 0.5}, n_task=90, pool=40)  # k = 90 > pool of 40
    counts = {}
    for p in picked(small, 1):
        counts[p] = counts.get(p, 0) + 1
    assert set(counts) == pool and set(counts.values()) <= {2, 3} and sum(counts.values()) == 90


# -- every method through train_steps --------------------------------------------------------------

CASES = [("ewc", {}), ("ewc", {"fisher_data": "previous_domain", "online": True}),
         ("safegrad", {}), ("safegrad", {"align_loss": "nll", "surgery": "per_module"}), ("interleave", {})]


def _run(tmp_path, name, options):
    """prepare, then two domains of 2 steps each, as the pipeline calls the hooks."""
    ctx, task = _ctx(tmp_path, name, options)
    frozen = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if not p.requires_grad}
    lora0 = {n: p.detach().clone() for n, p in ctx.trainable().items()}
    ctx.method.prepare(ctx)
    history = []
    for t, domain in enumerate(["tiny", "tiny2"], start=1):
        examples = ctx.method.domain_data(ctx, t, domain, task)
        ctx.domain_examples[domain] = examples
        ctx.current_domain = domain
        ctx.method.before_domain(ctx, t, domain)
        history += train_steps(ctx, examples, 2, stream=t)
        ctx.method.after_domain(ctx, t, domain)
    return ctx, history, frozen, lora0


def _same_state(x, y):
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x.cpu(), y.cpu())
    if isinstance(x, dict):
        return isinstance(y, dict) and set(x) == set(y) and all(_same_state(x[k], y[k]) for k in x)
    return x == y


@pytest.mark.parametrize("name, options", CASES)
def test_method_trains_and_its_state_round_trips(tmp_path, name, options):
    ctx, hist, frozen, lora0 = _run(tmp_path, name, options)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    for n, p in ctx.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, lora0[n]) for n, p in ctx.trainable().items() if "lora_B" in n)
    if name == "ewc":
        pen = [h.get("penalty", 0.0) for h in hist]
        assert all("penalty_to_loss" in h for h in hist[2 if options else 0:])
        assert pen[-1] > 0 and hist[-1]["penalty_to_loss"] == pytest.approx(pen[-1] / hist[-1]["loss"])
    if name == "safegrad":
        assert all({"align_loss", "conflict", "align_grad_norm"} <= set(h) for h in hist)
        assert any("cos_task_align" in h for h in hist)

    # same seed, same losses: test_resume_after_a_kill_reproduces_the_run (a fresh run must match exactly)
    path = tmp_path / "state.pt"
    torch.save(ctx.method.state_dict(), path)
    fresh = get_method(name, options)
    fresh.load_state_dict(torch.load(path, weights_only=False), ctx)
    assert _same_state(fresh.state_dict(), ctx.method.state_dict())
    if name == "ewc":
        assert fresh.penalty(ctx).item() == ctx.method.penalty(ctx).item()


class _Killed(Exception):
    pass


@pytest.mark.parametrize("name", ["ewc", "safegrad", "interleave"])
def test_resume_after_a_kill_reproduces_the_run(tmp_path, monkeypatch, name):
    """Checkpoint every 2 steps (smoke preset), killed after step 3: the resumed run (a fresh model and
    method, state from the checkpoint) gives the uninterrupted run's losses and weights."""
    import safeanchor.train as train_mod

    def run(ckpt):
        ctx, task = _ctx(tmp_path, name)
        if ckpt is None or not ckpt.exists():
            ctx.method.prepare(ctx)
        examples = ctx.method.domain_data(ctx, 1, "tiny", task)
        return ctx, train_steps(ctx, examples, 4, stream=1, ckpt=ckpt)

    ctx_a, full = run(None)

    def kill(code):
        raise _Killed(code)

    monkeypatch.setattr(train_mod.os, "_exit", kill)
    monkeypatch.setenv("SAFEANCHOR_TEST_CRASH_AT", "1:3")
    ckpt = tmp_path / "domain1.pt"
    with pytest.raises(_Killed):
        run(ckpt)
    monkeypatch.delenv("SAFEANCHOR_TEST_CRASH_AT")
    ctx_b, resumed = run(ckpt)
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]
    for n, p in ctx_b.trainable().items():
        assert torch.equal(p, ctx_a.trainable()[n]), n
