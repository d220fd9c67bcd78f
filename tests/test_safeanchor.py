"""SafeAnchor's parts against obvious references on the tiny model."""
import random

import pytest
import torch

from safeanchor import subspace as ss
from safeanchor.config import load_config
from safeanchor.data.chat import collate, mean_token_nll
from safeanchor.methods import get_method
from safeanchor.models import attach_lora, tiny_model, tiny_tokenizer
from safeanchor.train import Context, train_steps


def _ctx(tmp_path, options=None, evaluator=None, seed=0):
    cfg = load_config("smoke", overrides={"method": "safeanchor", "method_options": options or {}})
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    model = attach_lora(tiny_model(seed), cfg.lora)
    rng = random.Random(seed)
    calib = [{"prompt": f"how to do bad thing {i}?", "response": "I can't help with that."} for i in range(12)]
    task = [{"prompt": f"add {a} and {b}", "response": str(a + b)}
            for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(32))]
    method = get_method("safeanchor", options or {})
    ctx = Context(cfg=cfg, model=model, tokenizer=tok, run_dir=tmp_path, method=method, calibration=calib,
                  monitor_prompts=["p1", "p2"], evaluator=evaluator or (lambda c, p: 100.0))
    ctx.current_domain = "tiny"
    ctx.domain_examples["tiny"] = task
    return ctx, task


def _randomise_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, (a, b) in ss.lora_modules(model).items():
            b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.05)


def _flat(model):
    return {n: torch.cat([b.weight.detach().reshape(-1), a.weight.detach().reshape(-1)]).clone()
            for n, (a, b) in ss.lora_modules(model).items()}


@pytest.mark.parametrize("project", ["update", "gradient"])
def test_strict_projection_keeps_updates_out_of_the_subspace(tmp_path, project):
    """strict + update projection: each module's parameter change is orthogonal to its basis
    (exactly); with gradient projection AdamW leaks, which is what the logged fraction shows."""
    ctx, task = _ctx(tmp_path, {"strict": True, "project": project, "gamma": 0.0, "csm": False})
    _randomise_b(ctx.model)
    ctx.method.prepare(ctx)
    before = _flat(ctx.model)
    hist = train_steps(ctx, task, 3, stream=1)
    after = _flat(ctx.model)
    worst = 0.0
    for n, basis in ctx.method.bases.items():
        if basis.basis.shape[1] == 0:
            continue
        delta = after[n] - before[n]
        worst = max(worst, float((basis.basis.T @ delta).norm() / delta.norm()))
    if project == "update":
        assert worst < 1e-4
        assert all(h["update_in_subspace"] > 0 for h in hist)
    else:
        assert worst > 1e-3  # AdamW + weight decay break the orthogonality of a projected gradient
        assert all("grad_in_subspace" in h for h in hist)


def test_gradient_projection_matches_dense_formula(tmp_path):
    ctx, task = _ctx(tmp_path, {"project": "gradient", "gamma": 0.0, "csm": False, "trace_norm": "max"})
    _randomise_b(ctx.model)
    ctx.method.prepare(ctx)
    batch = ctx.to_device(collate(ctx.encode_all(task[:4]), ctx.tokenizer.pad_token_id))

    mean_token_nll(ctx.model, batch).backward()
    modules = ss.lora_modules(ctx.model)
    raw = {n: torch.cat([b.weight.grad.reshape(-1), a.weight.grad.reshape(-1)]).clone() for n, (a, b) in modules.items()}
    ctx.method.rewrite_gradients(ctx)
    for n, (a, b) in modules.items():
        got = torch.cat([b.weight.grad.reshape(-1), a.weight.grad.reshape(-1)])
        V = ctx.method.bases[n].basis.double()
        dense = torch.eye(V.shape[0], dtype=torch.float64) - (1 - ctx.method.alpha[n]) * V @ V.T
        torch.testing.assert_close(got.double(), dense @ raw[n].double(), rtol=1e-4, atol=1e-7)
    alphas = list(ctx.method.alpha.values())
    assert min(alphas) == pytest.approx(0.5)  # trace_norm max: the top module gets alpha = 1 - lambda


def test_b_zero_start_constrains_b_only(tmp_path):
    ctx, _ = _ctx(tmp_path, {"csm": False})
    ctx.method.prepare(ctx)
    for n, (a, b) in ss.lora_modules(ctx.model).items():
        V = ctx.method.bases[n].basis
        assert V.shape[1] > 0
        assert V[b.weight.numel():].abs().max() == 0  # A-block rows of every basis vector are zero


def test_anchor_kl_zero_at_fresh_lora_positive_after_training(tmp_path):
    ctx, task = _ctx(tmp_path, {"project": "none", "csm": False, "gamma": 0.1})
    ctx.model.eval()
    kl0 = ctx.method._anchor_backward(ctx)
    assert abs(kl0) < 1e-9  # B = 0: the adapter is the identity, so both distributions are equal
    ctx.model.zero_grad()
    train_steps(ctx, task, 4, stream=1, method=get_method("standard"))
    ctx.model.eval()
    assert ctx.method._anchor_backward(ctx) > 1e-6
    # the anchor's gradient reaches the LoRA parameters (the reference is the adapter-disabled model)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in ctx.model.named_parameters() if "lora_" in n)


def test_anchor_kl_matches_a_second_model_copy(tmp_path):
    ctx, task = _ctx(tmp_path, {"project": "none", "csm": False})
    train_steps(ctx, task, 2, stream=1, method=get_method("standard"))
    ctx.model.eval()
    reference = tiny_model(0)  # the same aligned weights as a separate model (the obvious, costly way)
    batch = ctx.method._anchor_batch(ctx)
    from safeanchor.data.chat import response_logits

    with torch.no_grad():
        p0 = torch.log_softmax(response_logits(reference, batch)[0], -1)
        pt = torch.log_softmax(response_logits(ctx.model, batch)[0], -1)
    expected = float((p0.exp() * (p0 - pt)).sum(-1).mean())
    assert ctx.method._anchor_backward(ctx) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("rates, blocks, triggered", [
    ([100.0, 96.0], 0, False),          # s_t = 96 >= 0.95 * 100: no repair
    ([100.0, 94.0, 99.0], 1, True),     # one block restores it
    ([100.0, 50.0, 60.0, 70.0], 2, True),  # still low after two blocks: stop at the cap
])
def test_csm_triggers_exactly_when_it_should(tmp_path, rates, blocks, triggered):
    queue = list(rates)
    ctx, _ = _ctx(tmp_path, {"repair_steps": 1, "gamma": 0.0, "incremental": False},
                  evaluator=lambda c, p: queue.pop(0))
    ctx.method.prepare(ctx)
    rec = ctx.method.after_domain(ctx, 1, "tiny")["csm"]
    assert rec["triggered"] is triggered and len(rec["blocks"]) == blocks
    assert rec["s_after"] == rates[blocks + 1]
    assert not queue


@pytest.mark.parametrize("rates, steps, s_after, n_checks", [
    ([100.0, 50.0, 80.0, 97.0], 20, 97.0, 2),        # restored at the 2nd check: the block stops at step 20
    ([100.0, 50.0, 80.0, 90.0, 99.0], 25, 99.0, 2),  # never restored at a check: full block, then measured
])
def test_csm_repair_stops_once_restored(tmp_path, rates, steps, s_after, n_checks):
    queue = list(rates)
    ctx, _ = _ctx(tmp_path, {"repair_steps": 25, "repair_check_every": 10, "max_repair_blocks": 1, "gamma": 0.0,
                             "incremental": False, "repair_lookalikes": 0}, evaluator=lambda c, p: queue.pop(0))
    ctx.method.prepare(ctx)
    block = ctx.method.after_domain(ctx, 1, "tiny")["csm"]["blocks"][0]
    assert block["steps"] == steps and block["s_after"] == s_after and len(block["checks"]) == n_checks
    assert [k for k, _ in block["checks"]] == [10, 20][:n_checks]
    assert not queue


def test_csm_repair_data_holds_aligned_answers_to_lookalikes(tmp_path):
    from safeanchor.data.safety import benign_borderline
    from safeanchor.generation import generate
    from safeanchor.methods.safeanchor import _Replay

    ctx, _ = _ctx(tmp_path, {"repair_lookalikes": 6, "gamma": 0.0})
    rec = ctx.method.prepare(ctx)
    looks = ctx.method.lookalikes
    assert 0 < len(looks) <= 6 and rec["repair_lookalikes"] == len(looks)
    train = set(benign_borderline("train"))
    assert all(x["prompt"] in train for x in looks)
    # answers are the aligned base's (adapter disabled), not the adapted model's: compare after moving B
    _randomise_b(ctx.model)
    with ctx.model.disable_adapter():
        again = generate(ctx.model, ctx.tokenizer, [x["prompt"] for x in looks], 48, 8, progress=False)
    assert again == [x["response"] for x in looks]
    replay = _Replay(ctx.method, ctx)
    assert len(replay.safe.encoded) == len(ctx.calibration) + len(looks)
    fresh = get_method("safeanchor", {})
    fresh.load_state_dict(ctx.method.state_dict(), ctx)
    assert fresh.lookalikes == looks


def test_state_round_trip(tmp_path):
    ctx, _ = _ctx(tmp_path, {"csm": False})
    ctx.method.prepare(ctx)
    state = ctx.method.state_dict()
    fresh = get_method("safeanchor", {"csm": False})
    fresh.load_state_dict(state, ctx)
    for n, b in ctx.method.bases.items():
        torch.testing.assert_close(fresh.bases[n].basis, b.basis)
    assert fresh.alpha == ctx.method.alpha


def _vec(a, b):
    return torch.cat([b.reshape(-1), a.reshape(-1)])


@pytest.mark.parametrize("anchor_projected", [False, True])
def test_update_projection_with_anchor_matches_hand_written_adamw(tmp_path, anchor_projected):
    """project=update with the anchor: a hand-written AdamW over 4 steps with fresh random task and anchor
    gradients (clipping active on some steps). Bypass: theta += P(u - u_a) + u_a, u_a = -lr/bc1 * m_a / denom
    with m_a the EMA of the clipped anchor gradients; anchor_projected: theta += P(u)."""
    seed = random.randrange(10**6)
    ctx, _ = _ctx(tmp_path, {"project": "update", "gamma": 1.0, "csm": False, "trace_norm": "max",
                             "anchor_projected": anchor_projected}, seed=seed % 7)
    _randomise_b(ctx.model, seed)
    method = ctx.method
    method.prepare(ctx)
    modules = ss.lora_modules(ctx.model)
    gen = torch.Generator().manual_seed(seed)
    anchor_g = {}

    def fake_anchor(c):
        for n, (a, b) in modules.items():
            a.weight.grad += anchor_g[n][0]
            b.weight.grad += anchor_g[n][1]
        return 0.0

    method._anchor_backward = fake_anchor
    lr, wd, (b1, b2), eps, max_norm = 1e-2, 0.05, (0.9, 0.99), 1e-8, 3.0
    params = [p for _, (a, b) in modules.items() for p in (a.weight, b.weight)]
    opt = torch.optim.AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    theta = {n: _vec(a.weight, b.weight).detach().double().clone() for n, (a, b) in modules.items()}
    m = {n: torch.zeros_like(t) for n, t in theta.items()}
    v = {n: torch.zeros_like(t) for n, t in theta.items()}
    m_a = {n: torch.zeros_like(t) for n, t in theta.items()}
    diff_from_all_projected, clipped = 0.0, 0
    for t in range(1, 5):
        task_g = {n: (torch.randn(a.weight.shape, generator=gen), torch.randn(b.weight.shape, generator=gen))
                  for n, (a, b) in modules.items()}
        scale = 0.3 * t  # anchor gradients of a changing size
        anchor_g.update({n: (torch.randn(a.weight.shape, generator=gen) * scale,
                             torch.randn(b.weight.shape, generator=gen) * scale) for n, (a, b) in modules.items()})
        for n, (a, b) in modules.items():
            a.weight.grad, b.weight.grad = task_g[n][0].clone(), task_g[n][1].clone()
        ctx.optimizer, ctx.step_lr, ctx.clip_coef = opt, lr, 1.0
        method.rewrite_gradients(ctx)
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        ctx.clip_coef = min(1.0, max_norm / (norm + 1e-6))
        before = {n: p.detach().clone() for n, p in ctx.trainable().items()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_step(ctx, before)
        # the reference, per module in vec([B; A]) coordinates, float64
        total = torch.cat([_vec(*task_g[n]) + _vec(*anchor_g[n]) for n in theta]).double()
        c = min(1.0, max_norm / (float(total.norm()) + 1e-6))
        clipped += c < 1.0
        for n in theta:
            g = c * (_vec(*task_g[n]) + _vec(*anchor_g[n])).double()
            ga = c * _vec(*anchor_g[n]).double()
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            m_a[n] = b1 * m_a[n] + (1 - b1) * ga
            denom = v[n].sqrt() / (1 - b2 ** t) ** 0.5 + eps
            u = -lr * wd * theta[n] - lr / (1 - b1 ** t) * m[n] / denom
            u_a = -lr / (1 - b1 ** t) * m_a[n] / denom
            basis = method.bases[n].basis.double()
            proj = torch.eye(len(u), dtype=torch.float64) - (1 - method.alpha[n]) * basis @ basis.T
            step = proj @ u if anchor_projected else proj @ (u - u_a) + u_a
            diff_from_all_projected = max(diff_from_all_projected, float((step - proj @ u).abs().max()))
            theta[n] = theta[n] + step
            got = _vec(modules[n][0].weight, modules[n][1].weight).detach().double()
            assert torch.allclose(got, theta[n], rtol=1e-5, atol=1e-6), (n, t, float((got - theta[n]).abs().max()))
    assert clipped  # the clip factor is part of what is checked
    if not anchor_projected:
        assert diff_from_all_projected > 1e-4  # the bypass really changes the update
