"""The training step and the per-domain loop: readable top to bottom, resumable, deterministic."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .data.chat import collate, encode
from .distributed import Dist
from .errors import SafeAnchorError


@dataclass
class Context:
    """Everything a method hook may need: the model, data, config and a few helpers."""

    cfg: object
    model: torch.nn.Module
    tokenizer: object
    run_dir: Path
    method: object = None
    base_dir: Path | None = None  # the aligned base (HF directory) the adapters sit on; None = cfg.model.name
    calibration: list = field(default_factory=list)  # safety examples {"prompt", "response"} (D_safe)
    repair_examples: list | None = None  # CSM repair's safety data (data.repair_source); None = calibration
    monitor_prompts: list = field(default_factory=list)  # harmful prompts for in-run monitoring (CSM)
    domain_examples: dict = field(default_factory=dict)  # domain -> training examples (after domain_data)
    evaluator: object = None  # callable(ctx, prompts) -> refusal rate, set by the pipeline
    # greedy completions of the aligned base (generation.GenerationCache), for what runs with the adapter off
    generation_cache: object = None
    current_domain: str | None = None
    # within ``train_steps``: the optimizer step just taken (1-based) and the call's total, for after_step
    step: int = 0
    steps: int = 0
    log: list = field(default_factory=list)
    # this process's place in a data-parallel group (distributed.py); the default is a single process
    dist: Dist = field(default_factory=Dist)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self):
        """The training forward's precision context: bf16 autocast with ``train.mixed_precision: bf16``."""
        if getattr(self.cfg.train, "mixed_precision", "no") == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def check_finite(self, loss: torch.Tensor, what: str) -> None:
        # in a data-parallel group every process learns of a non-finite loss on any of them, so all raise together
        if self.dist.any(not bool(torch.isfinite(loss).all())):
            raise SafeAnchorError(f"{what} is {loss.detach().flatten()[0].item()} (not finite, here or in another "
                                  f"process); lower train.lr, check the data for empty responses, or use model.dtype: "
                                  f"float32; finished steps are kept, rerun resumes")

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def encode_all(self, examples: list[dict], max_length: int | None = None) -> list[dict]:
        max_length = max_length or self.cfg.train.max_length
        out = [encode(self.tokenizer, e["prompt"], e["response"], max_length) for e in examples]
        return [e for e in out if any(lbl != -100 for lbl in e["labels"])]

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device) for k, v in batch.items()}


class BatchStream:
    """Micro-batches in a seeded order: a fresh permutation every epoch, fully determined by
    (seed, stream id, position), so a resumed run can skip to any step without saved state."""

    def __init__(self, encoded: list[dict], batch_size: int, seed: int, stream: int, pad_id: int):
        if not encoded:
            raise SafeAnchorError("no usable training examples (empty data or every response truncated away); "
                                  "check the domain data and train.max_length")
        self.encoded, self.batch_size, self.seed, self.stream, self.pad_id = encoded, batch_size, seed, stream, pad_id

    def batch(self, index: int) -> dict:
        n = len(self.encoded)
        rows = []
        for j in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, pos = divmod(j, n)
            perm = np.random.default_rng([self.seed, self.stream, epoch]).permutation(n)
            rows.append(self.encoded[perm[pos]])
        return collate(rows, self.pad_id)


def steps_for(cfg, n_examples: int) -> int:
    tc = cfg.train
    if tc.steps_per_domain > 0:
        return tc.steps_per_domain
    return max(1, math.ceil(tc.epochs * n_examples / (tc.batch_size * tc.grad_accum)))


def make_optimizer(params, lr, tc, total_steps):
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay, eps=1e-8)
    sched = get_cosine_schedule_with_warmup(opt, int(tc.warmup_ratio * total_steps), total_steps)
    return opt, sched


def _save_ckpt(path: Path, ctx: Context, opt, sched, step: int, history: list) -> None:
    rngs = ctx.dist.gather([torch.get_rng_state()])  # each process's own RNG (dropout masks differ per shard)
    save_checkpoint(path, ctx, step=step, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                    rank_rng=[r[0] for r in rngs], history=history)


def _load_ckpt(path: Path, ctx: Context, opt, sched) -> tuple[int, list]:
    state = load_checkpoint(path, ctx)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    rank_rng = state.get("rank_rng") or [state["torch_rng"]]  # torch_rng: checkpoints from before data parallelism
    if len(rank_rng) != ctx.dist.world:
        raise SafeAnchorError(f"checkpoint {path} was written by {len(rank_rng)} process(es), this run has "
                              f"{ctx.dist.world}; resume with the same number of processes")
    torch.set_rng_state(rank_rng[ctx.dist.rank])
    return state["step"], state["history"]


def train_steps(ctx: Context, examples: list[dict], steps: int, stream: int, ckpt: Path | None = None,
                lr: float | None = None, desc: str = "train", method=None, stop=None) -> list[dict]:
    """Run ``steps`` optimizer steps of ``method`` (default: the run's method) on ``examples``.

    One step: gradients of grad_accum micro-batches -> method.rewrite_gradients -> clip -> AdamW
    (with whatever the method attached to it in ``attach_optimizer``: SafeAnchor's projector and
    anchor run in its step hooks, as they do under transformers' Trainer) -> method.after_step. A checkpoint every ``train.checkpoint_every`` steps makes a kill cost at
    most that many steps, and a resumed run reproduces the uninterrupted one exactly. ``stop(k)``,
    if given, is asked after step k (1-based) and ends training early when it returns True.
    """
    tc, method = ctx.cfg.train, method or ctx.method
    stream_ = BatchStream(ctx.encode_all(examples), tc.batch_size, ctx.cfg.seed, stream, ctx.tokenizer.pad_token_id)
    params = list(ctx.trainable().values())
    if not params:
        raise SafeAnchorError("the model has no trainable parameters; check lora.target_modules")
    opt, sched = make_optimizer(params, lr or tc.lr, tc, steps)
    start, history = 0, []
    if ckpt is not None and ckpt.exists():
        start, history = _load_ckpt(ckpt, ctx, opt, sched)
    method.attach_optimizer(ctx, opt)
    ctx.model.train()
    crash_at = os.environ.get("SAFEANCHOR_TEST_CRASH_AT")  # "stream:step": simulate a kill (tests only)
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, leave=False, disable=not ctx.dist.is_main)
    for step in bar:
        micro = [ctx.to_device(stream_.batch(step * tc.grad_accum + k)) for k in range(tc.grad_accum)]
        logs = method.compute_grads(ctx, micro)
        if ctx.dist.active:  # one all-reduce: every process now holds the whole batch's gradient
            ctx.dist.average_grads(params)
            logs["loss"] = ctx.dist.mean(logs["loss"])
        logs.update(method.rewrite_gradients(ctx))
        if tc.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm))
            logs["grad_norm"] = norm
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ctx.step, ctx.steps = step + 1, steps
        logs.update(method.after_step(ctx))
        logs["step"] = step + 1
        history.append(logs)
        bar.set_postfix(loss=f"{logs['loss']:.3f}")
        if ckpt is not None and ((step + 1) % tc.checkpoint_every == 0 or step + 1 == steps):
            _save_ckpt(ckpt, ctx, opt, sched, step + 1, history)
        if crash_at == f"{stream}:{step + 1}":
            os._exit(137)
        if stop is not None and step + 1 < steps and stop(step + 1):
            break
    ctx.dist.broadcast_params(params)  # identical already; this only removes kernel-level floating drift
    ctx.model.eval()
    return history
