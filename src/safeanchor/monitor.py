"""CSM: cumulative safety monitoring with repair replay, after any training stage.

After each stage t the monitor measures s_t on held-out harmful monitor prompts: the % refused (a
refusal judge) or the % answered safely (a harm judge such as Llama Guard, the paper's monitor). If s_t < (1 - tau) s_0 (s_0: the aligned model's rate), a repair block runs
E_repair optimizer steps of corrective replay (Guo, Wu, Yiu, arXiv:2604.17691, Sec. 3.4):

    loss = task loss on the stage's own data (projected like OSCA) + beta * NLL of safe responses (bypass)

then s_t is measured again; at most ``max_blocks`` blocks. Two defaults of this library differ from the
paper and can be switched back: a block ends early once a re-measurement every ``check_every`` steps is
back above the threshold (0: only after the whole block, the paper), and the caller may mix benign
look-alike prompts answered by the aligned model into the safety data (a refusal-only replay to a fixed
budget teaches refusing everything: over-refusal 10% -> 80% on the quick start).

``SafetyMonitor`` measures; ``repair_block`` runs one block through the library's training loop
(``train.train_steps``) with a ``SafetyProjector`` attached; ``monitor_and_repair`` is the whole CSM
step. They take a PEFT model, a tokenizer and plain example lists, so they run after a
``transformers.Trainer`` stage as well as inside ``safeanchor run``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from .anchor import SafetyBatches
from .errors import SafeAnchorError
from .generation import MIXED_PRECISIONS
from .projector import SafetyProjector, SafetyTerm
from .safety_subspace import SafetySubspace


class SafetyMonitor:
    """s_t (%) of a model on harmful monitor prompts, with CSM's threshold (1 - tau) s_0.

    ``judge``: a refusal judge (label 1 = refused; default the offline keyword judge), or a harm judge
    such as Llama Guard, as the paper monitors (label 1 = safe response): s_t is then the % of safe
    responses; ``measures`` says which. ``rate_fn(model, tokenizer) -> %`` replaces generation + judging
    (e.g. the pipeline's data-parallel evaluator, or a test's fixed sequence). ``mixed_precision``: "no" or
    "bf16" (generation under bf16 autocast, ``generation.generate_samples``).
    """

    def __init__(self, prompts: list[str], judge=None, *, tau: float = 0.05, max_new_tokens: int = 64,
                 batch_size: int = 16, rate_fn: Callable | None = None, dist=None, mixed_precision: str = "no"):
        if not prompts and rate_fn is None:
            raise SafeAnchorError("the safety monitor has no prompts; give harmful monitor prompts (data.monitor_source)")
        if not 0.0 <= tau < 1.0:
            raise SafeAnchorError(f"tau must be in [0, 1), got {tau}")
        if mixed_precision not in MIXED_PRECISIONS:
            raise SafeAnchorError(f"mixed_precision={mixed_precision!r}: use 'no' or 'bf16'")
        if judge is None and rate_fn is None:
            from .judges import get_judge

            judge = get_judge("keyword")
        measures = getattr(judge if judge is not None else rate_fn, "measures", "refusal")
        if measures not in ("refusal", "safe_response"):
            raise SafeAnchorError(f"judge {getattr(judge, 'name', judge)!r} measures {measures!r}; the monitor needs a "
                                  "refusal judge (label 1 = refused) or a harm judge (label 1 = safe response)")
        self.prompts, self.judge, self.tau, self.measures = list(prompts), judge, tau, measures
        self.max_new_tokens, self.batch_size, self.rate_fn, self.dist = max_new_tokens, batch_size, rate_fn, dist
        self.mixed_precision = mixed_precision
        self.s0: float | None = None

    def rate(self, model, tokenizer) -> float:
        """s_t: % of the monitor prompts refused (refusal judge) or answered safely (harm judge)."""
        if self.rate_fn is not None:
            return self.rate_fn(model, tokenizer)
        from .evaluation import judge_prompts

        rate, _ = judge_prompts(model, tokenizer, self.judge, self.prompts, self.max_new_tokens, self.batch_size,
                                "monitor", self.dist, mixed_precision=self.mixed_precision)
        return round(rate, 2)

    def set_baseline(self, model, tokenizer) -> float:
        """s_0: the rate of the model before any stage (call it on the aligned model)."""
        self.s0 = self.rate(model, tokenizer)
        return self.s0

    @property
    def threshold(self) -> float:
        if self.s0 is None:
            raise SafeAnchorError("the safety monitor has no baseline s_0; call set_baseline on the aligned model first")
        return (1 - self.tau) * self.s0


def aligned_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 16,
                    judge=None, cache=None, mixed_precision: str = "no") -> list[dict]:
    """Benign prompts with the aligned model's own answers (the adapter disabled, greedy), for CSM's replay:
    repair then restores the aligned behaviour on both sides of the refusal boundary, not refusal alone.
    Answers the refusal ``judge`` (default: keyword) calls refusals, and empty ones, are dropped. ``cache``: a
    ``generation.GenerationCache`` of the aligned model (the answers are the same in every run on it);
    ``mixed_precision``: "no" or "bf16" (``generation.generate_samples``)."""
    from .generation import generate
    from .judges import KeywordRefusalJudge

    with model.disable_adapter():
        answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size, desc="CSM look-alikes",
                           cache=cache, mixed_precision=mixed_precision)
    labels = (judge or KeywordRefusalJudge())(prompts, answers)
    return [{"prompt": p, "response": a} for p, a, lbl in zip(prompts, answers, labels) if lbl == 0 and a.strip()]


def builtin_lookalikes(n: int, seed: int = 0, skip: int = 0) -> list[str]:
    """``n`` of the library's benign prompts that sound dangerous ("how do I kill a Python process"; the
    look-alikes' training split, never the over-refusal evaluation split, and our benign short direct
    questions), in a seeded order, after the first ``skip`` of that order (so that the repair's look-alikes,
    the first ``repair_lookalikes``, and CSM's over-refusal monitor, the next ones, never share a prompt)."""
    import random

    from .data.safety import benign_borderline, benign_direct

    prompts = benign_borderline("train") + benign_direct()
    if skip + n > len(prompts):
        raise SafeAnchorError(f"{skip} + {n} benign look-alikes asked for, the library has {len(prompts)}; lower "
                              f"repair_lookalikes or overrefusal_monitor")
    random.Random(seed).shuffle(prompts)
    return prompts[skip:skip + n]


@dataclass
class RepairSettings:
    """One CSM repair configuration (defaults: the paper's, except ``check_every``)."""

    steps: int = 200           # E_repair, optimizer steps per block
    lr: float = 2e-4           # learning rate of the replay
    beta: float = 1.0          # weight of the safety NLL
    max_blocks: int = 2        # one block plus at most one further
    check_every: int = 5       # re-measure every N steps, stop once restored (0 = paper: whole blocks)
    batch_size: int = 8        # safety replay batch size
    mode: str = "update"       # the projector's mode for the task part (update | gradient | none)
    restore: float = 0.0       # repair until s_t >= max(restore, 1 - tau) s_0 (0 = the trigger threshold, paper)
    patience: int = 0          # end the repair after N measurements in a row without a new best s_t (0 = never)
    overrefusal_tolerance: float = 5.0  # with a benign monitor: repair while b_t > b_0 + this many points
    mix: str = "fixed"         # "adaptive": replay look-alikes alone while only over-refusal is off (benign monitor)

    @classmethod
    def of(cls, options, lr: float, batch_size: int) -> "RepairSettings":
        """The settings of SafeAnchor's options (``SafeAnchorConfig``): the method's and the callback's."""
        return cls(steps=options.repair_steps, lr=options.repair_lr or lr, beta=options.beta,
                   max_blocks=options.max_repair_blocks, check_every=options.repair_check_every,
                   batch_size=batch_size, mode=options.project, restore=options.repair_restore,
                   patience=options.repair_patience, overrefusal_tolerance=options.overrefusal_tolerance,
                   mix=options.repair_mix)


class _ReplayStream:
    """The repair's safety batches under ``mix: adaptive``: the whole safety data (refusals + look-alikes)
    while the harmful monitor is below its restore level, the look-alikes alone while ``lookalikes_only()``
    says only over-refusal is left to repair. ``counts`` records how many batches each side gave."""

    def __init__(self, mixed: SafetyBatches, lookalikes: SafetyBatches, lookalikes_only: Callable[[], bool]):
        self.mixed, self.lookalikes, self.lookalikes_only = mixed, lookalikes, lookalikes_only
        self.counts = {"mixed": 0, "lookalikes": 0}

    @property
    def position(self) -> int:
        """Batches drawn (a repair block is never resumed mid-block, so there is no setter)."""
        return sum(self.counts.values())

    def next(self, device) -> dict:
        side = "lookalikes" if self.lookalikes_only() else "mixed"
        self.counts[side] += 1
        return (self.lookalikes if side == "lookalikes" else self.mixed).next(device)


def repair_block(model, tokenizer, task_examples: list[dict], safety_examples: list[dict], subspace: SafetySubspace,
                 strengths: dict[str, float], settings: RepairSettings, train, *, seed: int = 0, stream: int = 20_001,
                 stop: Callable[[int], bool] | None = None, dist=None, desc: str = "CSM repair",
                 lookalikes: list[dict] | None = None, lookalikes_only: Callable[[], bool] | None = None,
                 counts: dict | None = None) -> list[dict]:
    """``settings.steps`` steps of replay through ``train.train_steps`` (``train``: a ``config.TrainConfig``
    giving batch size, accumulation, AdamW and clipping); returns the per-step logs. ``stop(k)`` is asked
    after step k and ends the block when it returns True. With ``lookalikes`` (benign prompts and the aligned
    model's answers) and ``lookalikes_only``, each safety batch comes from the look-alikes alone while
    ``lookalikes_only()`` is True, else from ``safety_examples``; ``counts`` (a dict) receives the number of
    batches of each kind."""
    from .distributed import Dist
    from .methods.base import Method, MethodConfig
    from .train import Context, train_steps

    dist = dist or Dist()
    safe = SafetyBatches(safety_examples, tokenizer, settings.batch_size, seed, 30_000, train.max_length,
                         "repair safety examples")
    if lookalikes is not None and lookalikes_only is not None:
        safe = _ReplayStream(safe, SafetyBatches(lookalikes, tokenizer, settings.batch_size, seed, 30_001,
                                                 train.max_length, "repair look-alikes"), lookalikes_only)
    term = SafetyTerm("nll", safe, settings.beta, name="safe_loss", dist=dist,
                      autocast=lambda: ctx.autocast())  # ctx is built below, before any step runs

    class _Replay(Method):
        name = "csm-replay"

        def attach_optimizer(self, ctx, optimizer) -> None:
            self.projector = SafetyProjector(model, subspace, strengths, mode=settings.mode, terms=[term]).attach(optimizer)

        def after_step(self, ctx) -> dict:
            return dict(self.projector.logs)

    cfg = SimpleNamespace(train=train, seed=seed)
    ctx = Context(cfg=cfg, model=model, tokenizer=tokenizer, run_dir=Path("."), method=_Replay(MethodConfig()), dist=dist)
    was = model.training
    try:
        return train_steps(ctx, task_examples, settings.steps, stream=stream, lr=settings.lr, desc=desc, stop=stop)
    finally:
        if hasattr(ctx.method, "projector"):
            ctx.method.projector.detach()
        model.train(was)
        if counts is not None and isinstance(safe, _ReplayStream):
            counts.update(safe.counts)


def check_repair_mix(mix: str, benign: "SafetyMonitor | None", lookalikes: list[dict] | None) -> None:
    """``mix`` "adaptive" needs the over-refusal monitor and look-alike answers to replay. Called by
    ``monitor_and_repair`` and, as soon as the look-alikes are answered (before any training), by the
    method's ``prepare`` and the callback: the aligned model may refuse every look-alike."""
    if mix not in ("fixed", "adaptive"):
        raise SafeAnchorError(f"repair mix {mix!r}: use 'fixed' or 'adaptive'")
    if mix == "adaptive" and (benign is None or not lookalikes):
        raise SafeAnchorError("repair_mix: adaptive switches the replay to the benign look-alikes while only "
                              "over-refusal is off, so it needs the over-refusal monitor (overrefusal_monitor > 0) "
                              f"and look-alikes to replay (repair_lookalikes > 0; the aligned model answered "
                              f"{len(lookalikes or [])} of them without refusing); set both, or repair_mix: fixed")


def monitor_and_repair(monitor: SafetyMonitor, model, tokenizer, task_examples: list[dict],
                       safety_examples: list[dict], subspace: SafetySubspace, strengths: dict[str, float],
                       settings: RepairSettings, train, *, seed: int = 0, stage: int = 1, dist=None,
                       benign: SafetyMonitor | None = None, lookalikes: list[dict] | None = None) -> dict:
    """CSM after stage ``stage``: measure s_t; if s_t < (1 - tau) s_0, repair and re-measure while s_t is below
    the restore level (``settings.restore`` s_0, at least the threshold) and fewer than ``max_blocks`` blocks
    ran. A restore level above the threshold is a hysteresis: a 60-prompt monitor has a binomial sd of about
    6 points, so a block that stops at the first re-measurement past the threshold stops on an upward
    fluctuation as often as not. ``settings.patience`` > 0 ends the repair (this block and any further one)
    once that many measurements in a row (checks and block ends) have not beaten the best s_t so far, the
    triggering one included: a repair that has stopped moving the monitor only spends steps on noise.
    ``benign``: a second monitor on benign look-alike prompts (its ``s0`` is b_0, the aligned model's refusal
    rate on them; ``rate`` is b_t, the over-refusal): then a repair also starts when b_t > b_0 +
    ``settings.overrefusal_tolerance``, and it goes on until both monitors are restored. Inside a repair
    b_t is measured only where s_t has reached its restore level (elsewhere the repair goes on whatever
    b_t reads; the check records None), and once more at the end if the last measurement skipped it. The paper's monitor
    sees harmful prompts only, so a domain that teaches refusing benign questions is never repaired.
    ``settings.mix`` "adaptive" (needs ``benign`` and ``lookalikes``, the look-alike part of the safety data):
    while the last measurement had s_t at its restore level and only b_t over its ceiling, the replay's safety
    batches come from the look-alikes alone (the aligned model's answers to benign prompts), since replaying
    refusals then raises both monitors together; otherwise from all of ``safety_examples``.
    Returns the record (s0, threshold, restore_level, s_before, blocks, triggered, s_after, and
    ``plateau``: whether patience ended it; with ``benign`` also b0, overrefusal_ceiling, b_before, b_after
    and each check's b_t; under ``mix`` "adaptive" each block's ``replay``: batches from the whole safety
    data and from the look-alikes alone)."""
    check_repair_mix(settings.mix, benign, lookalikes)
    adaptive = settings.mix == "adaptive"
    threshold = monitor.threshold
    level = max(threshold, settings.restore * monitor.s0)
    s_t = monitor.rate(model, tokenizer)
    rec = {"s0": monitor.s0, "threshold": round(threshold, 2), "restore_level": round(level, 2), "s_before": s_t,
           "blocks": []}
    ceiling = b_t = None
    if benign is not None:
        if benign.s0 is None:
            raise SafeAnchorError("the over-refusal monitor has no baseline b_0; call set_baseline on the aligned "
                                  "model first")
        ceiling = benign.s0 + settings.overrefusal_tolerance
        b_t = benign.rate(model, tokenizer)
        rec.update(b0=benign.s0, overrefusal_ceiling=round(ceiling, 2), b_before=b_t)

    def over(rate: float | None) -> bool:
        return ceiling is not None and rate is not None and rate > ceiling

    def benign_rate(rate: float) -> float | None:
        """b_t inside a repair, measured only when it decides something: while s_t is below its restore level
        the repair goes on and replays the whole mix whatever b_t reads (None: not measured)."""
        return benign.rate(model, tokenizer) if benign is not None and rate >= level else None

    best, stale = s_t, 0

    def plateaued(rate: float) -> bool:
        """Counts one more measurement; True once ``patience`` in a row have not beaten the best."""
        nonlocal best, stale
        if rate > best:
            best, stale = rate, 0
        else:
            stale += 1
        return bool(settings.patience) and stale >= settings.patience

    blocks, plateau = 0, False
    mode = {"lookalikes_only": False}  # adaptive: what the last measurement asks the replay to repair

    def steer(rate: float, b_rate: float | None) -> None:
        mode["lookalikes_only"] = adaptive and rate >= level and over(b_rate)

    steer(s_t, b_t)
    while ((s_t < threshold if blocks == 0 else s_t < level) or over(b_t)) and blocks < settings.max_blocks \
            and not plateau:
        blocks += 1
        checks: list[tuple] = []  # (step, s_t) or, with the benign monitor, (step, s_t, b_t)

        def restored(k: int) -> bool:
            nonlocal plateau
            if not settings.check_every or k % settings.check_every:
                return False
            rate = monitor.rate(model, tokenizer)
            b_rate = benign_rate(rate)
            checks.append((k, rate) if benign is None else (k, rate, b_rate))
            plateau = plateaued(rate) and rate < level
            steer(rate, b_rate)
            return (rate >= level and not over(b_rate)) or plateau

        counts: dict = {}
        hist = repair_block(model, tokenizer, task_examples, safety_examples, subspace, strengths, settings, train,
                            seed=seed, stream=20_000 + 10 * stage + blocks, stop=restored, dist=dist,
                            desc=f"CSM repair {blocks}", lookalikes=lookalikes if adaptive else None,
                            lookalikes_only=(lambda: mode["lookalikes_only"]) if adaptive else None, counts=counts)
        done = len(hist)
        if checks and checks[-1][0] == done:
            s_t = checks[-1][1]
            b_t = checks[-1][2] if benign is not None else None
        else:
            s_t = monitor.rate(model, tokenizer)
            b_t = benign_rate(s_t)
            plateau = plateaued(s_t) and s_t < level
        steer(s_t, b_t)
        block = {"steps": done, "s_after": s_t, "checks": checks,
                 "safe_loss": sum(h.get("safe_loss", 0.0) for h in hist) / max(1, done)}
        if adaptive:
            block["replay"] = counts
        if benign is not None:
            block["b_after"] = b_t
        rec["blocks"].append(block)
    rec["triggered"] = blocks > 0
    rec["plateau"] = plateau
    rec["s_after"] = s_t
    if benign is not None:
        rec["b_after"] = b_t if b_t is not None else benign.rate(model, tokenizer)
    return rec
