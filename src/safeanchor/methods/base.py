"""The method interface: every method is a few overridden hooks of one training sequence.

The sequence (pipeline.py) calls, for a run over domains 1..T::

    prepare(ctx)                                   once, before domain 1   (Vaccine, SSI, EWC Fisher)
    for t, domain:
        examples = domain_data(ctx, t, domain, examples)                  (Interleaving)
        before_domain(ctx, t, domain)                                      (O-LoRA: new adapter)
        reset_adapters(ctx)        only with train.reinit_adapter_per_domain (Vaccine: back to vaccinated)
        attach_optimizer(ctx, optimizer)       each new optimizer (domain, repair block)  (SafeAnchor: step hooks)
        every optimizer step (train.py):
            compute_grads(ctx, micro_batches)  -> loss + penalty(ctx), backward   (Vaccine overrides)
            rewrite_gradients(ctx)             between backward and clipping   (SafeGrad)
            clip, optimizer.step()             (hooks attached above run inside the step)
            after_step(ctx)                    after the step                  (logs, subspace refresh)
        after_domain(ctx, t, domain) -> records                           (Safe LoRA, CSM, SSI update)
        save_adapter(ctx, path)    the model after domain t as one PEFT adapter   (O-LoRA: stacked rank r t)

A method is a config dataclass (every field with help text and the paper's default), a subclass of
``Method`` and one ``@register`` line. Its state for resuming is ``state_dict`` / ``load_state_dict``.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields

import torch

from ..config import _coerce, _f, check_fields
from ..data.chat import mean_token_nll
from ..errors import SafeAnchorError


def option(default, help: str, check=None):
    """A method option field: the paper's ``default``, ``help`` text and an optional ``check``.

    Validation is ``config.check_fields``'s convention: a fixed set of values is a ``Literal[...]``
    annotation (``from typing import Literal``), a range is ``check=">0"`` / ``"[0,1)"`` / ``"(0,1]"``...,
    e.g. ``project: Literal["gradient", "update", "none"] = option("update", "...")`` and
    ``rho: float = option(0.90, "...", check="(0,1]")``."""
    return _f(default, help, check=check)


@dataclass
class MethodConfig:
    """Options of a method; subclasses add fields with ``option(default, help, check=...)`` (or
    ``metadata={"help": ...}``), validated by ``check_fields`` when the method is built."""


class Method:
    name = "base"
    paper = ""
    summary = ""
    config_cls = MethodConfig

    def __init__(self, options: MethodConfig):
        if options is not None:  # also when built directly, not by get_method
            check_fields(options, f"method_options.{self.name}.")
        self.options = options

    # -- lifecycle hooks (no-ops by default) --------------------------------------------------------
    def prepare(self, ctx) -> dict:
        return {}

    def domain_data(self, ctx, t: int, domain: str, examples: list[dict]) -> list[dict]:
        return examples

    def before_domain(self, ctx, t: int, domain: str) -> None:
        pass

    def reset_adapters(self, ctx) -> None:
        """``train.reinit_adapter_per_domain``: start the domain from a fresh LoRA. Called after
        ``before_domain`` with torch's RNG forked and seeded from (seed, t); the default re-initialises
        every adapter with trainable factors by PEFT's own init (A Kaiming-uniform, B = 0)."""
        from ..models import reset_lora

        reset_lora(ctx.model)

    def penalty(self, ctx) -> torch.Tensor | None:
        return None

    def compute_grads(self, ctx, micro_batches: list[dict]) -> dict:
        """Accumulate gradients of mean(task loss) + penalty over the micro-batches; return logs.

        In a data-parallel group each process takes its rows of every micro-batch, weighted so that the
        average over processes (train.py's all-reduce) is the whole micro-batch's response-token mean."""
        n = len(micro_batches)
        task_total, pen_total, has_pen = 0.0, 0.0, False
        for batch in micro_batches:
            part, weight = ctx.dist.shard(batch)
            with ctx.autocast():  # forward only; the backward below runs outside autocast
                task = weight * mean_token_nll(ctx.model, part)
                pen = self.penalty(ctx)
                loss = task if pen is None else task + pen
            ctx.check_finite(loss, "training loss")
            ctx.backward(loss / n)
            task_total += task.item() / n
            if pen is not None:
                has_pen = True
                pen_total += pen.item() / n
        logs = {"loss": task_total}
        if has_pen:
            logs["penalty"] = pen_total
        return logs

    def rewrite_gradients(self, ctx) -> dict:
        return {}

    def attach_optimizer(self, ctx, optimizer) -> None:
        """Called with every optimizer ``train_steps`` creates (after a resumed checkpoint is loaded): the
        place to register ``optimizer.register_step_pre_hook`` / ``register_step_post_hook`` work."""

    def after_step(self, ctx) -> dict:
        return {}

    def after_domain(self, ctx, t: int, domain: str) -> dict:
        """Work after a domain's training; the record goes to the step's ``method``, except a ``seconds``
        entry ({part: seconds}), which goes to the step's ``train.method_seconds_by_part``."""
        return {}

    def save_adapter(self, ctx, path) -> None:
        """Write the model after this domain as a standard PEFT adapter directory:
        ``PeftModel.from_pretrained(aligned_base, path)`` must give ``ctx.model`` (results.json's contract)."""
        ctx.model.save_pretrained(path)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, ctx) -> None:
        """Restore ``state_dict()`` output; ``ctx.model`` is the freshly built model of the resumed run
        (a method that adds adapters or changes weights re-creates that structure here)."""


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` to ``METHODS`` under ``cls.name``; a name already taken by another
    class is refused (re-running the same module, e.g. a reload, replaces its own class)."""
    old = METHODS.get(cls.name)
    if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise SafeAnchorError(f"method name {cls.name!r} of {cls.__module__}.{cls.__qualname__} is already registered "
                              f"by {old.__module__}.{old.__qualname__}; give the new class another `name`")
    METHODS[cls.name] = cls
    return cls


def coerce_options(cls: type[Method], options: dict) -> dict:
    """``options`` (e.g. YAML / ``--set`` values) converted to the types of ``cls.config_cls``'s defaults."""
    valid = {f.name: f for f in fields(cls.config_cls)}
    unknown = set(options) - set(valid)
    if unknown:
        near = {u: (difflib.get_close_matches(str(u), valid, n=1) or [None])[0] for u in unknown}
        hint = "; ".join(f"did you mean '{n}' for '{u}'" for u, n in sorted(near.items(), key=str) if n)
        raise SafeAnchorError(f"unknown option(s) {sorted(unknown)} for method {cls.name!r}"
                              f"{' (' + hint + ')' if hint else ''}; valid: {sorted(valid) or 'none'} "
                              f"(see `safeanchor methods`)")
    out = {}
    for key, value in options.items():
        f = valid[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else \
            (None if f.default is dataclasses.MISSING else f.default)
        out[key] = _coerce(value, default, f"method_options.{cls.name}.{key}")
    return out


def method_options(cls: type[Method], options: dict):
    """``cls``'s options dataclass from a mapping, coerced and checked (``config.check_fields``)."""
    opts = cls.config_cls(**coerce_options(cls, options))
    check_fields(opts, f"method_options.{cls.name}.")
    return opts


def get_method(name: str, options: dict | None = None) -> Method:
    from . import load_all

    load_all()
    if name not in METHODS:
        raise SafeAnchorError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    return cls(method_options(cls, options or {}))
