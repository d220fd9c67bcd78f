"""The method interface: every method is a few overridden hooks of one training sequence.

The sequence (pipeline.py) calls, for a run over domains 1..T::

    prepare(ctx)                                   once, before domain 1   (Vaccine, SSI, EWC Fisher)
    for t, domain:
        examples = domain_data(ctx, t, domain, examples)                  (Interleaving)
        before_domain(ctx, t, domain)                                      (O-LoRA: new adapter)
        reset_adapters(ctx)        only with train.reinit_adapter_per_domain (Vaccine: back to vaccinated)
        every optimizer step (train.py):
            compute_grads(ctx, micro_batches)  -> loss + penalty(ctx), backward   (Vaccine overrides)
            rewrite_gradients(ctx)             between backward and step   (OSCA, SafeGrad)
            optimizer.step()
            after_step(ctx, before)            sees the parameter update   (update projection)
        after_domain(ctx, t, domain) -> records                           (Safe LoRA, CSM, SSI update)
        save_adapter(ctx, path)    the model after domain t as one PEFT adapter   (O-LoRA: stacked rank r t)

A method is a config dataclass (every field with help text and the paper's default), a subclass of
``Method`` and one ``@register`` line. Its state for resuming is ``state_dict`` / ``load_state_dict``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..data.chat import mean_token_nll
from ..errors import SafeAnchorError


@dataclass
class MethodConfig:
    """Options of a method; subclasses add fields with ``metadata={"help": ...}``."""


class Method:
    name = "base"
    paper = ""
    summary = ""
    config_cls = MethodConfig

    def __init__(self, options: MethodConfig):
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

    def after_step(self, ctx, before: dict[str, torch.Tensor] | None) -> dict:
        return {}

    wants_update = False  # set True to receive parameter values before the step in after_step

    def after_domain(self, ctx, t: int, domain: str) -> dict:
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
    METHODS[cls.name] = cls
    return cls


def method_options(cls: type[Method], options: dict):
    valid = {f.name for f in fields(cls.config_cls)}
    unknown = set(options) - valid
    if unknown:
        raise SafeAnchorError(f"unknown option(s) {sorted(unknown)} for method {cls.name!r}; valid: "
                              f"{sorted(valid) or 'none'} (see `safeanchor methods`)")
    return cls.config_cls(**options)


def get_method(name: str, options: dict | None = None) -> Method:
    from . import load_all

    load_all()
    if name not in METHODS:
        raise SafeAnchorError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    return cls(method_options(cls, options or {}))
