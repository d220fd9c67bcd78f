"""SafeAnchor's parts against obvious references on the tiny model."""
import random

import pytest
import torch

from safeanchor import subspace as ss
from safeanchor.config import load_config
from safeanchor.data.chat import collate, mean_token_nll
from safeanchor.errors import SafeAnchorError
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
    """mode=gradient: with plain SGD (lr 1) the step is -(I - s V V^T) g per module, s = 1 - alpha."""
    from safeanchor.projector import SafetyProjector

    ctx, task = _ctx(tmp_path, {"project": "gradient", "gamma": 0.0, "csm": False, "trace_norm": "max"})
    _randomise_b(ctx.model)
    ctx.method.prepare(ctx)
    batch = ctx.to_device(collate(ctx.encode_all(task[:4]), ctx.tokenizer.pad_token_id))
    modules = ss.lora_modules(ctx.model)
    params = [w for a, b in modules.values() for w in (a.weight, b.weight)]
    opt = torch.optim.SGD(params, lr=1.0)
    proj = SafetyProjector(ctx.model, ctx.method.subspace, {n: 1 - a for n, a in ctx.method.alpha.items()},
                           mode="gradient").attach(opt)
    mean_token_nll(ctx.model, batch).backward()
    raw = {n: torch.cat([b.weight.grad.reshape(-1), a.weight.grad.reshape(-1)]).clone() for n, (a, b) in modules.items()}
    before = _flat(ctx.model)
    opt.step()
    after = _flat(ctx.model)
    for n in modules:
        V = ctx.method.bases[n].basis.double()
        dense = torch.eye(V.shape[0], dtype=torch.float64) - (1 - ctx.method.alpha[n]) * V @ V.T
        torch.testing.assert_close((before[n] - after[n]).double(), dense @ raw[n].double(), rtol=1e-4, atol=1e-7)
    assert "grad_in_subspace" in proj.logs
    alphas = list(ctx.method.alpha.values())
    assert min(alphas) == pytest.approx(0.5)  # trace_norm max: the top module gets alpha = 1 - lambda


def test_b_zero_start_constrains_b_only(tmp_path):
    ctx, _ = _ctx(tmp_path, {"csm": False})
    ctx.method.prepare(ctx)
    for n, (a, b) in ss.lora_modules(ctx.model).items():
        V = ctx.method.bases[n].basis
        assert V.shape[1] > 0
        assert V[b.weight.numel():].abs().max() == 0  # A-block rows of every basis vector are zero


def _anchor_batch(ctx, n=4):
    return ctx.to_device(collate(ctx.encode_all(ctx.calibration[:n]), ctx.tokenizer.pad_token_id))


def _lora_grads(model, loss):
    weights = [w for a, b in ss.lora_modules(model).values() for w in (a.weight, b.weight)]
    return torch.autograd.grad(loss, weights)


def test_anchor_kl_zero_at_fresh_lora_positive_after_training(tmp_path):
    from safeanchor.anchor import anchor_kl

    ctx, task = _ctx(tmp_path, {"project": "none", "csm": False, "gamma": 0.1})
    ctx.model.eval()
    kl0 = anchor_kl(ctx.model, _anchor_batch(ctx))
    assert abs(float(kl0)) < 1e-9  # B = 0: the adapter is the identity, so both distributions are equal
    assert all(float(g.abs().max()) == 0.0 for g in _lora_grads(ctx.model, kl0))  # closed form: exactly zero
    train_steps(ctx, task, 4, stream=1, method=get_method("standard"))
    ctx.model.eval()
    kl = anchor_kl(ctx.model, _anchor_batch(ctx))
    assert float(kl) > 1e-6
    assert any(float(g.abs().sum()) > 0 for g in _lora_grads(ctx.model, kl))


def test_anchor_kl_matches_a_second_model_copy(tmp_path):
    """Value and gradient against the obvious, costly way: a separate copy of the aligned weights and
    autograd through log_softmax."""
    from safeanchor.anchor import anchor_kl
    from safeanchor.data.chat import response_logits

    ctx, task = _ctx(tmp_path, {"project": "none", "csm": False})
    train_steps(ctx, task, 2, stream=1, method=get_method("standard"))
    ctx.model.eval()
    reference = tiny_model(0)  # the same aligned weights as a separate model
    batch = _anchor_batch(ctx)
    with torch.no_grad():
        p0 = torch.log_softmax(response_logits(reference, batch)[0], -1)
    pt = torch.log_softmax(response_logits(ctx.model, batch)[0], -1)
    expected = (p0.exp() * (p0 - pt)).sum(-1).mean()
    got = anchor_kl(ctx.model, batch)
    assert float(got) == pytest.approx(float(expected), rel=1e-4)
    for g, e in zip(_lora_grads(ctx.model, got), _lora_grads(ctx.model, expected)):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-8)


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


def _csm_with_rates(tmp_path, rates, **options):
    """CSM after one domain (blocks of 25 steps, checks every 10, at most 2 blocks) with a monitor that reads
    ``rates`` in turn (s_0 first); returns its record and what was left of ``rates``."""
    queue = list(rates)
    ctx, _ = _ctx(tmp_path, {"repair_steps": 25, "repair_check_every": 10, "max_repair_blocks": 2, "gamma": 0.0,
                             "incremental": False, "repair_lookalikes": 0, **options},
                  evaluator=lambda c, p: queue.pop(0))
    ctx.method.prepare(ctx)
    return ctx.method.after_domain(ctx, 1, "tiny")["csm"], queue


@pytest.mark.parametrize("restore, rates, steps", [
    (0.0, [100.0, 90.0, 96.0], [10]),                          # the paper: stop at the first check past 95
    (1.0, [100.0, 90.0, 96.0, 96.0, 97.0, 100.0], [25, 10]),   # hysteresis: on to s_0, a second block
    (1.0, [100.0, 90.0, 96.0, 99.0, 100.0], [25]),             # back to s_0 after the first block's end
    (0.5, [100.0, 90.0, 96.0], [10]),                          # below the threshold: the threshold rules
])
def test_csm_repair_restores_to_the_restore_level(tmp_path, restore, rates, steps):
    rec, queue = _csm_with_rates(tmp_path, rates, repair_restore=restore)
    assert [b["steps"] for b in rec["blocks"]] == steps and rec["s_after"] == rates[-1] and not queue
    assert rec["threshold"] == 95.0 and rec["restore_level"] == max(95.0, 100.0 * restore)


@pytest.mark.parametrize("patience, rates, steps, plateau", [
    (2, [100.0, 50.0, 80.0, 70.0, 75.0], [25], True),          # best 80 at step 10, then 2 without a new best
    (2, [100.0, 50.0, 80.0, 80.0, 79.0], [25], True),          # equal to the best is not an improvement
    (2, [100.0, 50.0, 40.0, 45.0], [20], True),                # below s_before twice: ends inside the block
    (0, [100.0, 50.0, 40.0, 45.0, 45.0, 44.0, 46.0, 47.0], [25, 25], False),  # off: both blocks, as before
    (3, [100.0, 50.0, 60.0, 55.0, 70.0, 65.0, 68.0, 96.0], [25, 25], False),  # a new best resets the count
    (1, [100.0, 50.0, 96.0], [10], False),                     # restored: patience plays no part
])
def test_csm_repair_ends_on_a_plateau(tmp_path, patience, rates, steps, plateau):
    rec, queue = _csm_with_rates(tmp_path, rates, repair_patience=patience)
    assert [b["steps"] for b in rec["blocks"]] == steps, rec
    assert rec["plateau"] is plateau and rec["s_after"] == rates[-1] and not queue


def _csm_two_sided(tmp_path, rates, benign_rates, **options):
    """``_csm_with_rates`` with CSM's over-refusal monitor on (20 look-alikes, tolerance 5): the harmful
    monitor reads ``rates`` in turn, the benign one ``benign_rates`` (b_0 first)."""
    queues = {"harmful": list(rates), "benign": list(benign_rates)}

    def evaluator(ctx, prompts):
        return queues["harmful" if prompts == ctx.monitor_prompts else "benign"].pop(0)

    ctx, _ = _ctx(tmp_path, {"repair_steps": 25, "repair_check_every": 10, "max_repair_blocks": 2, "gamma": 0.0,
                             "incremental": False, "repair_lookalikes": 0, "overrefusal_monitor": 20, **options},
                  evaluator=evaluator)
    prep = ctx.method.prepare(ctx)
    return prep, ctx.method.after_domain(ctx, 1, "tiny")["csm"], queues


@pytest.mark.parametrize("rates, benign_rates, steps, triggered", [
    ([100.0, 98.0, 99.0], [10.0, 20.0, 12.0], [10], True),       # over-refusal alone starts a repair; back at 12
    ([100.0, 98.0], [10.0, 15.0], [], False),                     # b_0 + 5 exactly is tolerated
    ([100.0, 90.0, 96.0, 97.0], [10.0, 10.0, 20.0, 12.0], [20], True),  # s_t back at 10, b_t only at 20
    ([100.0, 98.0] + [99.0] * 6, [10.0, 30.0] + [30.0] * 6, [25, 25], True),  # never
    # restored: both blocks (the block end re-measures both monitors), as the harmful monitor's budget
    ([100.0, 90.0] + [91.0] * 6, [10.0, 10.0, 12.0], [25, 25], True),  # s_t never back: b_t is read only
    # before and after the repair, since no check inside it could decide anything on it
])
def test_csm_over_refusal_monitor_triggers_and_ends_repair(tmp_path, rates, benign_rates, steps, triggered):
    prep, rec, queues = _csm_two_sided(tmp_path, rates, benign_rates)
    assert prep["b0"] == benign_rates[0] and rec["b0"] == benign_rates[0] and rec["overrefusal_ceiling"] == 15.0
    assert [b["steps"] for b in rec["blocks"]] == steps, rec
    assert rec["triggered"] is triggered and rec["b_before"] == benign_rates[1]
    assert rec["s_after"] == rates[-1] and rec["b_after"] == benign_rates[-1]
    assert not queues["harmful"] and not queues["benign"]


def test_csm_over_refusal_monitor_off_never_measures_benign_prompts(tmp_path):
    prep, rec, queues = _csm_two_sided(tmp_path, [100.0, 98.0], [10.0, 90.0], overrefusal_monitor=0)
    assert "b0" not in prep and "b0" not in rec and not rec["triggered"]
    assert queues["benign"] == [10.0, 90.0]  # the paper's CSM: harmful prompts only


def test_adaptive_repair_mix_replays_lookalikes_alone_while_only_over_refusal_is_off(tmp_path, monkeypatch):
    """Checks every 2 steps; the harmful monitor reads s, the benign one b (s_0 100, b_0 10: threshold 95,
    ceiling 15). s 90 / b 20: both off, the whole mix; s 97 / b 20 at step 2: only over-refusal is off, the
    look-alikes alone; s 93 / b 12 at step 4: the harmful side is off, the whole mix again; s 96 / b 12 at
    step 6: restored."""
    from safeanchor import monitor as mon

    sides = []
    real_next = mon._ReplayStream.next

    def spy(self, device):
        sides.append("lookalikes" if self.lookalikes_only() else "mixed")
        return real_next(self, device)

    monkeypatch.setattr(mon._ReplayStream, "next", spy)
    options = {"repair_steps": 8, "repair_check_every": 2, "max_repair_blocks": 1, "repair_lookalikes": 6,
               "repair_mix": "adaptive"}
    rates, benign_rates = [100.0, 90.0, 97.0, 93.0, 96.0], [10.0, 20.0, 20.0, 12.0]  # b_t unread at s 93
    prep, rec, queues = _csm_two_sided(tmp_path, rates, benign_rates, **options)
    assert prep["repair_lookalikes"] > 0 and not queues["harmful"] and not queues["benign"]
    assert [b["steps"] for b in rec["blocks"]] == [6], rec
    assert sides == ["mixed"] * 2 + ["lookalikes"] * 2 + ["mixed"] * 2
    assert rec["blocks"][0]["replay"] == {"lookalikes": 2, "mixed": 4}
    assert rec["blocks"][0]["checks"] == [[2, 97.0, 20.0], [4, 93.0, None], [6, 96.0, 12.0]] or \
        rec["blocks"][0]["checks"] == [(2, 97.0, 20.0), (4, 93.0, None), (6, 96.0, 12.0)]
    # the same measurements under the fixed mix: the same stops, one pool, no replay record
    sides.clear()
    _, fixed, _ = _csm_two_sided(tmp_path / "fixed", rates, benign_rates, **{**options, "repair_mix": "fixed"})
    assert [b["steps"] for b in fixed["blocks"]] == [6] and "replay" not in fixed["blocks"][0] and not sides


def test_adaptive_repair_mix_with_no_lookalike_answered_is_refused_before_training(tmp_path, monkeypatch):
    """The aligned model may refuse every look-alike: then the adaptive mix has nothing to replay, and prepare
    (before any domain trains) says so, rather than CSM after the first domain."""
    import safeanchor.methods.safeanchor as sa

    monkeypatch.setattr(sa, "aligned_answers", lambda *a, **k: [])
    ctx, _ = _ctx(tmp_path, {"repair_lookalikes": 6, "overrefusal_monitor": 20, "repair_mix": "adaptive"})
    with pytest.raises(SafeAnchorError, match="answered 0 of them without refusing"):
        ctx.method.prepare(ctx)


def test_adaptive_replay_stream_draws_each_side_from_its_own_examples():
    from safeanchor.anchor import SafetyBatches
    from safeanchor.monitor import _ReplayStream

    seed = random.randrange(1000)
    tok = tiny_tokenizer()
    refusals = [{"prompt": f"harm {i}", "response": "I can't help with that."} for i in range(5)]
    looks = [{"prompt": f"kill a python process {i}", "response": f"Use kill -9 {i}."} for i in range(7)]
    mixed = SafetyBatches(refusals + looks, tok, 3, seed)
    alone = SafetyBatches(looks, tok, 3, seed, 30_001)
    rows = {name: {tuple(e["input_ids"]) for e in b.stream.encoded} for name, b in (("mixed", mixed), ("alone", alone))}
    flag = {"on": False}
    stream = _ReplayStream(mixed, alone, lambda: flag["on"])
    plan = [random.Random(seed).random() < 0.5 for _ in range(12)]
    for on in plan:
        flag["on"] = on
        batch = stream.next("cpu")
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            row = tuple(ids[mask.bool()].tolist())
            assert row in rows["alone" if on else "mixed"], f"seed {seed}"
    assert stream.counts == {"lookalikes": sum(plan), "mixed": len(plan) - sum(plan)}, f"seed {seed}"
    assert alone.position == sum(plan) and mixed.position == len(plan) - sum(plan)


def test_adaptive_repair_mix_needs_the_over_refusal_monitor_and_lookalikes():
    from safeanchor.methods.safeanchor import SafeAnchorConfig

    for opts in ({"repair_mix": "adaptive"}, {"repair_mix": "adaptive", "overrefusal_monitor": 20,
                                              "repair_lookalikes": 0}):
        with pytest.raises(SafeAnchorError, match="repair_mix: adaptive .* needs overrefusal_monitor > 0"):
            load_config("smoke", overrides={"method_options": {"safeanchor": opts}})
        with pytest.raises(SafeAnchorError, match="set both, or repair_mix: fixed"):
            SafeAnchorConfig(**opts)  # the callback's config: the same check
    assert SafeAnchorConfig(repair_mix="adaptive", csm=False).repair_mix == "adaptive"  # CSM off: nothing to steer


def test_over_refusal_monitor_prompts_are_neither_replayed_nor_evaluated():
    from safeanchor.data.safety import benign_borderline
    from safeanchor.monitor import builtin_lookalikes

    seed = random.randrange(1000)
    repair = builtin_lookalikes(192, seed)
    watched = builtin_lookalikes(60, seed, skip=192)
    assert len(watched) == 60 and not set(watched) & set(repair), f"seed {seed}"
    assert not set(watched) & set(benign_borderline("eval")), f"seed {seed}"
    assert builtin_lookalikes(252, seed) == repair + watched, f"seed {seed}"
    with pytest.raises(SafeAnchorError, match="lower repair_lookalikes or overrefusal_monitor"):
        builtin_lookalikes(10_000, seed, skip=192)


def test_over_refusal_monitor_needs_a_refusal_judge_before_any_work():
    with pytest.raises(SafeAnchorError, match="eval.monitor_judge 'llamaguard3' measures safe responses"):
        load_config("smoke", overrides={"eval": {"monitor_judge": "llamaguard3"},
                                        "method_options": {"safeanchor": {"overrefusal_monitor": 30}}})
    load_config("smoke", overrides={"eval": {"monitor_judge": "llamaguard3"}})  # off: the paper's harm-judge monitor


def test_over_refusal_monitor_with_a_harm_judge_evaluator_is_refused_at_prepare(tmp_path):
    """API users who build their own context skip the config check; prepare has the same one, before SSI."""
    def evaluator(ctx, prompts):
        raise AssertionError("no generation may run before the error")

    evaluator.measures = "safe_response"
    ctx, _ = _ctx(tmp_path, {"overrefusal_monitor": 20, "repair_lookalikes": 0}, evaluator=evaluator)
    with pytest.raises(SafeAnchorError, match="set eval.monitor_judge to a refusal judge"):
        ctx.method.prepare(ctx)


def test_repair_patience_reaches_the_callback_settings():
    from safeanchor.methods.safeanchor import SafeAnchorConfig
    from safeanchor.monitor import RepairSettings

    settings = RepairSettings.of(SafeAnchorConfig(repair_patience=4), 1e-4, 8)
    assert settings.patience == 4 and RepairSettings.of(SafeAnchorConfig(), 1e-4, 8).patience == 0


def test_csm_repair_data_holds_aligned_answers_to_lookalikes(tmp_path):
    from safeanchor.data.safety import benign_borderline, benign_direct
    from safeanchor.generation import generate

    ctx, _ = _ctx(tmp_path, {"repair_lookalikes": 6, "gamma": 0.0})
    rec = ctx.method.prepare(ctx)
    looks = ctx.method.lookalikes
    assert 0 < len(looks) <= 6 and rec["repair_lookalikes"] == len(looks)
    train = set(benign_borderline("train")) | set(benign_direct())  # training-only look-alikes, never eval
    assert not train & set(benign_borderline("eval"))
    assert all(x["prompt"] in train for x in looks)
    # answers are the aligned base's (adapter disabled), not the adapted model's: compare after moving B
    _randomise_b(ctx.model)
    with ctx.model.disable_adapter():
        again = generate(ctx.model, ctx.tokenizer, [x["prompt"] for x in looks], 48, 8, progress=False)
    assert again == [x["response"] for x in looks]
    seen = {}

    def capture(monitor, model, tok, task, safety, *args, **kwargs):
        seen["safety"] = safety
        return {"triggered": False}

    import safeanchor.methods.safeanchor as sa_mod

    original, sa_mod.monitor_and_repair = sa_mod.monitor_and_repair, capture
    try:
        ctx.method.after_domain(ctx, 1, "tiny")
    finally:
        sa_mod.monitor_and_repair = original
    assert seen["safety"] == ctx.calibration + looks  # refusals and the aligned base's look-alike answers
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


class _FakeTerm:
    """A safety term whose gradients are given (fresh random ones each step)."""

    name = "anchor_kl"

    def __init__(self):
        self.grads = None

    def gradients(self, model, weights):
        return list(self.grads), 0.0

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize("project_terms", [False, True])
def test_update_projection_with_anchor_matches_hand_written_adamw(tmp_path, project_terms):
    """Update projection with a safety term, through torch's step hooks, against a hand-written AdamW over
    4 steps with fresh random task and term gradients; the task gradient is clipped before the step (some
    steps clip), the term is added inside the step, unclipped. Bypass: theta += P(u - u_a) + u_a with
    u_a = -lr/bc1 * m_a / denom, m_a the EMA of the term's gradients; project_terms: theta += P(u)."""
    from safeanchor.projector import SafetyProjector

    seed = random.randrange(10**6)
    ctx, _ = _ctx(tmp_path, {"csm": False, "trace_norm": "max"}, seed=seed % 7)
    _randomise_b(ctx.model, seed)
    ctx.method.prepare(ctx)
    modules = ss.lora_modules(ctx.model)
    gen = torch.Generator().manual_seed(seed)
    term = _FakeTerm()
    lr, wd, (b1, b2), eps, max_norm = 1e-2, 0.05, (0.9, 0.99), 1e-8, 3.0
    params = [w for _, (a, b) in modules.items() for w in (a.weight, b.weight)]
    opt = torch.optim.AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    strengths = {n: 1 - a for n, a in ctx.method.alpha.items()}
    SafetyProjector(ctx.model, ctx.method.subspace, strengths, mode="update", terms=[term],
                    project_terms=project_terms).attach(opt)
    theta = {n: _vec(a.weight, b.weight).detach().double().clone() for n, (a, b) in modules.items()}
    m = {n: torch.zeros_like(t) for n, t in theta.items()}
    v = {n: torch.zeros_like(t) for n, t in theta.items()}
    m_a = {n: torch.zeros_like(t) for n, t in theta.items()}
    diff_from_all_projected, clipped = 0.0, 0
    for t in range(1, 5):
        task_g = {n: (torch.randn(a.weight.shape, generator=gen), torch.randn(b.weight.shape, generator=gen))
                  for n, (a, b) in modules.items()}
        scale = 0.3 * t  # term gradients of a changing size
        anchor_g = {n: (torch.randn(a.weight.shape, generator=gen) * scale,
                        torch.randn(b.weight.shape, generator=gen) * scale) for n, (a, b) in modules.items()}
        term.grads = [g for n in modules for g in anchor_g[n]]
        for n, (a, b) in modules.items():
            a.weight.grad, b.weight.grad = task_g[n][0].clone(), task_g[n][1].clone()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # the reference, per module in vec([B; A]) coordinates, float64
        total = torch.cat([_vec(*task_g[n]) for n in theta]).double()
        c = min(1.0, max_norm / (float(total.norm()) + 1e-6))
        clipped += c < 1.0
        for n in theta:
            ga = _vec(*anchor_g[n]).double()
            g = c * _vec(*task_g[n]).double() + ga
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            m_a[n] = b1 * m_a[n] + (1 - b1) * ga
            denom = v[n].sqrt() / (1 - b2 ** t) ** 0.5 + eps
            u = -lr * wd * theta[n] - lr / (1 - b1 ** t) * m[n] / denom
            u_a = (-lr / (1 - b1 ** t) * m_a[n] / denom).clamp(-10 * lr, 10 * lr)  # the projector's share cap
            basis = ctx.method.bases[n].basis.double()
            proj = torch.eye(len(u), dtype=torch.float64) - strengths[n] * basis @ basis.T
            step = proj @ u if project_terms else proj @ (u - u_a) + u_a
            diff_from_all_projected = max(diff_from_all_projected, float((step - proj @ u).abs().max()))
            theta[n] = theta[n] + step
            got = _vec(modules[n][0].weight, modules[n][1].weight).detach().double()
            assert torch.allclose(got, theta[n], rtol=1e-5, atol=5e-6), (seed, n, t, float((got - theta[n]).abs().max()))
    assert clipped  # the clip factor is part of what is checked
    if not project_terms:
        assert diff_from_all_projected > 1e-4  # the bypass really changes the update


def test_update_projection_with_terms_refuses_an_optimizer_it_cannot_split(tmp_path):
    from safeanchor.errors import SafeAnchorError
    from safeanchor.projector import SafetyProjector

    ctx, _ = _ctx(tmp_path, {"csm": False})
    ctx.method.prepare(ctx)
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    with pytest.raises(SafeAnchorError, match="Adam or AdamW"):
        SafetyProjector(ctx.model, ctx.method.subspace, mode="update", terms=[_FakeTerm()]).attach(
            torch.optim.SGD(params, lr=0.1))
    SafetyProjector(ctx.model, ctx.method.subspace, mode="gradient", terms=[_FakeTerm()]).attach(
        torch.optim.SGD(params, lr=0.1))  # gradient mode needs no optimizer internals


@pytest.mark.parametrize("project_terms", [True, False])
def test_gradient_mode_projects_the_task_gradient_once(tmp_path, project_terms):
    """mode=gradient with a safety term, plain SGD (lr 1): the step is -(I - sP)(g + g_a) when the term is
    projected with the task (once: (I - sP)^2 != I - sP for 0 < s < 1), and -((I - sP) g + g_a) when it
    bypasses. (Before the parts existed, gradient mode with anchor_projected projected g twice.)"""
    from safeanchor.projector import SafetyProjector

    seed = random.randrange(10**6)
    ctx, _ = _ctx(tmp_path, {"csm": False}, seed=seed % 7)
    _randomise_b(ctx.model, seed)
    ctx.method.prepare(ctx)
    modules = ss.lora_modules(ctx.model)
    gen = torch.Generator().manual_seed(seed)
    term = _FakeTerm()
    term.grads = [torch.randn(w.shape, generator=gen) for a, b in modules.values() for w in (a.weight, b.weight)]
    params = [w for a, b in modules.values() for w in (a.weight, b.weight)]
    opt = torch.optim.SGD(params, lr=1.0)
    SafetyProjector(ctx.model, ctx.method.subspace, {n: 0.5 for n in modules}, mode="gradient", terms=[term],
                    project_terms=project_terms).attach(opt)
    task = {n: (torch.randn(a.weight.shape, generator=gen), torch.randn(b.weight.shape, generator=gen))
            for n, (a, b) in modules.items()}
    for n, (a, b) in modules.items():
        a.weight.grad, b.weight.grad = task[n][0].clone(), task[n][1].clone()
    before = _flat(ctx.model)
    opt.step()
    after = _flat(ctx.model)
    for i, (n, (a, b)) in enumerate(modules.items()):
        V = ctx.method.bases[n].basis.double()
        P = torch.eye(V.shape[0], dtype=torch.float64) - 0.5 * V @ V.T
        g, g_a = _vec(*task[n]).double(), _vec(term.grads[2 * i], term.grads[2 * i + 1]).double()
        expected = P @ (g + g_a) if project_terms else P @ g + g_a
        torch.testing.assert_close((before[n] - after[n]).double(), expected, rtol=1e-4, atol=1e-6, msg=f"seed {seed}")


def test_csm_repair_projects_in_the_methods_mode(tmp_path):
    """project=update: the repair's task part goes through the update projection too (it was always a
    gradient projection, which AdamW leaks): with beta = 0 and strict strength, a repair block's whole
    change is orthogonal to the subspace."""
    from safeanchor.monitor import RepairSettings, repair_block

    ctx, task = _ctx(tmp_path, {"csm": False, "strict": True})
    _randomise_b(ctx.model)
    ctx.method.prepare(ctx)
    before = _flat(ctx.model)
    settings = RepairSettings(steps=3, lr=1e-2, beta=0.0, check_every=0, batch_size=4, mode="update")
    hist = repair_block(ctx.model, ctx.tokenizer, task, ctx.calibration, ctx.method.subspace,
                        {n: 1.0 for n in ctx.method.bases}, settings, ctx.cfg.train, seed=0)
    assert len(hist) == 3 and all("update_in_subspace" in h for h in hist)
    after = _flat(ctx.model)
    worst = max(float((b.basis.T @ (after[n] - before[n])).norm() / (after[n] - before[n]).norm())
                for n, b in ctx.method.bases.items() if b.basis.shape[1])
    assert worst < 1e-4


def test_anchor_reference_runs_without_dropout(tmp_path):
    """p_aligned is a fixed distribution: the reference forward runs in eval mode even while training."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safeanchor.anchor import aligned_logits
    from safeanchor.data.chat import encode

    cfg = load_config("smoke")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5))
    model = attach_lora(base, cfg.lora)
    model.train()
    tok = tiny_tokenizer()
    batch = collate([encode(tok, "how to do bad thing?", "I can't help with that.", 64)], tok.pad_token_id)
    first, second = aligned_logits(model, batch), aligned_logits(model, batch)
    assert torch.equal(first, second) and model.training
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        from safeanchor.data.chat import response_logits

        torch.testing.assert_close(first, response_logits(model, batch)[0])


def test_a_term_that_cancels_the_task_gradient_cannot_throw_the_weights(tmp_path):
    """Term gradient = -(task gradient) + tiny: AdamW's denominator is near eps, the two shares of the update
    are huge and opposite. The capped split keeps every step within a few lr (uncapped, the projection of
    the huge task share moved weights by ~100x lr)."""
    from safeanchor.projector import SafetyProjector

    ctx, _ = _ctx(tmp_path, {"csm": False, "strict": True})
    _randomise_b(ctx.model)
    ctx.method.prepare(ctx)
    modules = ss.lora_modules(ctx.model)
    params = [w for a, b in modules.values() for w in (a.weight, b.weight)]
    gen = torch.Generator().manual_seed(3)
    task = [torch.randn(w.shape, generator=gen) for w in params]
    term = _FakeTerm()
    term.grads = [-g + 1e-7 * torch.randn(g.shape, generator=gen) for g in task]
    lr = 1e-2
    steps = {}
    for cap in (10.0, 0.0):
        with torch.no_grad():
            start = [w.detach().clone() for w in params]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        proj = SafetyProjector(ctx.model, ctx.method.subspace, mode="update", terms=[term], share_cap=cap).attach(opt)
        for w, g in zip(params, task):
            w.grad = g.clone()
        opt.step()
        steps[cap] = max(float((w - s).abs().max()) for w, s in zip(params, start))
        if cap:
            assert proj.logs["bypass_capped"] > 0.5
        proj.detach()
        with torch.no_grad():
            for w, s in zip(params, start):
                w.copy_(s)
    assert steps[10.0] <= 25 * lr
    assert steps[0.0] > 100 * lr  # what the cap prevents


@pytest.mark.parametrize("reference", ["aligned", "previous"])
def test_anchor_reference_aligned_or_previous(tmp_path, reference):
    """anchor_reference 'previous' anchors to the model at the start of the domain (KL 0 there, and equal to
    the KL against a copy of that model later); 'aligned' to the adapter-disabled model (KL > 0 after a
    domain of training)."""
    import copy

    from safeanchor.anchor import anchor_kl
    from safeanchor.data.chat import response_logits

    ctx, task = _ctx(tmp_path, {"csm": False, "anchor_reference": reference, "gamma": 0.1})
    ctx.method.prepare(ctx)
    train_steps(ctx, task, 3, stream=1, method=get_method("standard"))  # domain 1 moved the adapter
    ctx.method.before_domain(ctx, 2, "tiny")
    start = copy.deepcopy(ctx.model).eval()
    term = ctx.method._projector(ctx).terms[0]
    batch = _anchor_batch(ctx)
    ctx.model.eval()
    kl_start = float(anchor_kl(ctx.model, batch, term.reference(ctx.model, batch) if term.reference else None))
    train_steps(ctx, task, 3, stream=2)  # domain 2 with SafeAnchor (the anchor term inside)
    ctx.model.eval()
    ref = term.reference(ctx.model, batch) if term.reference else None
    kl_later = float(anchor_kl(ctx.model, batch, ref))
    if reference == "previous":
        assert abs(kl_start) < 1e-9
        with torch.no_grad():
            p0 = torch.log_softmax(response_logits(start, batch)[0], -1)
            pt = torch.log_softmax(response_logits(ctx.model, batch)[0], -1)
        assert kl_later == pytest.approx(float((p0.exp() * (p0 - pt)).sum(-1).mean()), rel=1e-4)
        assert ctx.method.state_dict()["previous"]  # resumable
    else:
        assert kl_start > 1e-6 and term.reference is None


def test_randomised_basis_is_orthonormal_same_size_and_within_the_fisher_support():
    from safeanchor.safety_subspace import SafetySubspace

    seed = random.randrange(10**6)
    g = torch.Generator().manual_seed(seed)
    bases = {}
    for i, (p, live, k) in enumerate(((300, 120, 6), (80, 80, 3), (50, 20, 0))):
        v = torch.zeros(p, k)
        if k:
            rows = torch.randperm(p, generator=g)[:live]
            v[rows] = torch.linalg.qr(torch.randn(live, k, generator=g))[0]
        bases[f"m{i}"] = ss.FisherBasis(v, torch.rand(k, dtype=torch.float64, generator=g), 3.5 + i, 12)
    sub = SafetySubspace(bases, 0.9)
    rnd, again, other = sub.randomised(7), sub.randomised(7), sub.randomised(8)
    for name, b in bases.items():
        r = rnd.bases[name]
        assert r.basis.shape == b.basis.shape and r.trace == b.trace, (name, seed)
        assert torch.equal(r.eigenvalues, b.eigenvalues)
        k = b.basis.shape[1]
        if k == 0:
            continue
        assert torch.allclose(r.basis.T @ r.basis, torch.eye(k), atol=1e-5), (name, seed)
        outside = b.basis.abs().sum(1) == 0
        assert float(r.basis[outside].abs().sum()) == 0.0, (name, seed)  # never outside the Fisher support
        assert torch.equal(r.basis, again.bases[name].basis)  # reproducible (a resumed run draws it again)
        assert not torch.allclose(r.basis, other.bases[name].basis)
        # a slow reference of the overlap: sum_j ||V_f^T r_j||^2 / k; a random k-subspace of an m-dim
        # support keeps about k/m of it (0.05 and 0.04 here), the Fisher basis itself all of it
        overlap = sum(float((b.basis.T @ r.basis[:, j]).pow(2).sum()) for j in range(k)) / k
        assert overlap < 0.5, (name, overlap, seed)


def test_basis_random_projects_updates_against_the_random_basis(tmp_path):
    ctx, task = _ctx(tmp_path, {"strict": True, "project": "update", "gamma": 0.0, "csm": False, "basis": "random"})
    _randomise_b(ctx.model)
    ctx.method.prepare(ctx)
    before = _flat(ctx.model)
    train_steps(ctx, task, 3, stream=1)
    after = _flat(ctx.model)
    projected = ctx.method.projector.subspace.bases
    fisher_leak, random_leak, n_modules = 0.0, 0.0, 0
    for n, basis in ctx.method.bases.items():
        k = basis.basis.shape[1]
        assert projected[n].basis.shape == basis.basis.shape
        if k == 0:
            continue
        n_modules += 1
        delta = after[n] - before[n]
        random_leak = max(random_leak, float((projected[n].basis.T @ delta).norm() / delta.norm()))
        fisher_leak = max(fisher_leak, float((basis.basis.T @ delta).norm() / delta.norm()))
    assert n_modules and random_leak < 1e-4  # exactly out of the basis it projects against
    assert fisher_leak > 1e-2  # and no longer out of the Fisher basis
