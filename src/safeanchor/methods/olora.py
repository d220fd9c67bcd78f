"""O-LoRA (Wang et al., EMNLP Findings 2023, arXiv:2310.14152): one LoRA per domain, orthogonal row spaces.

Rule. Domain 1 trains the run's adapter ("default"). Before domain t >= 2 a fresh adapter
``domain<t>`` (r, alpha, targets, dropout from ``cfg.lora``; PEFT init: A Kaiming-uniform, B = 0)
is added; every earlier adapter stays active (the forward sums s B_i A_i over all of them, each
with its own s = alpha / r) and frozen. The loss is

    L = L_task + lambda1 * sum_modules sum_jk |(A_old A_t^T)_jk|  +  lambda2 * sum_{new tensors} ||theta||_F

with A_old = [A_1; ...; A_{t-1}] (r (t-1) x d_in) the frozen factors of the same module and A_t the
trained one. In PEFT's convention ``lora_A`` spans the input (row) space, so the term pushes each
domain's update into input directions the earlier domains did not use.

Choices the paper leaves open, as options:
- ``orth_norm``: "l1" (default) sums |entries| as the official code (cmnfriend/O-LoRA
  ``uie_trainer_lora.py``) does; "squared" sums squared entries as the paper writes it.
- ``lambda1`` 0.5 and ``lambda2`` 0 are the official scripts' defaults. The L1 term is a raw sum over
  r^2 (t-1) entries per module and every module: it can be thousands of times the token loss on a large
  model (O-LoRA#33); every step logs ``penalty`` so lambda1 can be swept, nothing is normalised here.
- lambda2 penalises the plain (not squared) Frobenius norm of each trained tensor, as the code does;
  it also applies in domain 1 (the official code's first task has no orthogonality term but the L2
  term is active).
- Old adapters are kept as separate PEFT adapters instead of being concatenated into one growing
  adapter (the official code's rank r_sum); the forward is identical (concatenation of [B_i] and
  [A_i] with a shared scaling is the sum of the adapters) and ``disable_adapter()`` still gives
  the aligned base. The official LLaMA scripts use lr 1e-3 for task 1 and 1e-4 afterwards; here every
  domain uses ``train.lr`` like the other methods (the method interface has no per-domain lr).

Cost: the number of stored LoRA parameters grows linearly with the domains (effective rank r t);
``after_domain`` records the trained and stored counts. ``train.reinit_adapter_per_domain`` changes
nothing: every domain already trains a freshly created adapter, and the earlier ones are the method.

Saved adapters. ``adapters/<t>-<domain>`` holds the model after domain t as ONE standard LoRA of rank
r t, the t adapters stacked (A = [A_1; ...; A_t], B = [s B_1, ..., s B_t], alpha = r t so its scaling is
1; ``models.save_lora_sum``), so ``PeftModel.from_pretrained(base, path)`` reproduces the model like
every other method's directory, at the price of a file that grows linearly with the domains (the
step's ``method`` record has ``saved_rank``). ``per_domain/`` inside it keeps the t adapters separately
(PEFT layout: ``default`` at its top, ``domain<k>/`` subfolders) for inspection or re-use; resuming
reads ``state/stage<t>.pt``, which holds the same tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .. import subspace as ss
from ..errors import SafeAnchorError
from .base import Method, MethodConfig, option, register


def _h(default, help, check=None):
    return option(default, help, check=check)  # Literal annotations + check=: see config.check_fields


@dataclass
class OLoRAConfig(MethodConfig):
    lambda1: float = _h(0.5, "weight of the orthogonality term (official scripts: 0.5)", check=">=0")
    lambda2: float = _h(0.0, "weight of the Frobenius norm of the trained adapter's tensors (official scripts: 0)",
                        check=">=0")
    orth_norm: Literal["l1", "squared"] = _h("l1", "'l1': sum |(A_old A_t^T)_jk| (official code) or 'squared': "
                                             "sum of squares (paper)")


def adapter_name(t: int) -> str:
    """The adapter trained in domain t (1-based): the run's "default" first, then one per domain."""
    return "default" if t == 1 else f"domain{t}"


def orthogonality(old: list[torch.Tensor], new: torch.Tensor, norm: str = "l1") -> torch.Tensor:
    """sum_jk |(A_old A_new^T)_jk| (norm "l1") or sum of squares ("squared"); A_old = cat(old) rows."""
    prod = torch.cat([a.detach() for a in old]) @ new.T
    if norm == "l1":
        return prod.abs().sum()
    if norm == "squared":
        return prod.pow(2).sum()
    raise SafeAnchorError(f"unknown orth_norm {norm!r}; use l1 or squared")


@register
class OLoRA(Method):
    name = "olora"
    paper = "Wang et al., Orthogonal Subspace Learning for Language Model Continual Learning (EMNLP Findings 2023)"
    summary = "a new LoRA per domain, earlier ones frozen, L1 orthogonality of lora_A to the earlier ones"
    config_cls = OLoRAConfig

    def __init__(self, options):
        super().__init__(options)
        self.adapters: list[str] = ["default"]  # in domain order; the last one is trained
        self.records: list[dict] = []

    # -- adapters ---------------------------------------------------------------------------------------
    def _ensure(self, ctx, names: list[str]) -> None:
        """Create missing adapters, activate all of ``names``, train only the last one."""
        from ..models import peft_lora_config

        model = ctx.model
        for name in names:
            if name not in model.peft_config:
                model.add_adapter(name, peft_lora_config(ctx.cfg.lora))
                ref = next(iter(ss.lora_modules(model, "default").values()))[0].weight
                for a, b in ss.lora_modules(model, name).values():
                    a.to(ref.dtype)
                    b.to(ref.dtype)
        model.base_model.set_adapter(list(names))  # PEFT marks every active adapter trainable ...
        self.adapters = list(names)
        self._freeze(ctx)  # ... so freeze the earlier ones again

    def _freeze(self, ctx) -> None:
        """requires_grad only on the trained adapter. PEFT re-enables every active adapter's grads when
        it leaves ``disable_adapter()``; this runs before every step so the flags cannot drift."""
        trained = self.adapters[-1]
        for name in self.adapters:
            for a, b in ss.lora_modules(ctx.model, name).values():
                a.weight.requires_grad_(name == trained)
                b.weight.requires_grad_(name == trained)

    def before_domain(self, ctx, t: int, domain: str) -> None:
        self._ensure(ctx, [adapter_name(k) for k in range(1, t + 1)])

    def reset_adapters(self, ctx) -> None:
        """No-op: the trained adapter was created fresh (PEFT init) for this domain already."""

    # -- loss -------------------------------------------------------------------------------------------
    def orthogonality_term(self, ctx) -> torch.Tensor | None:
        """sum over modules of the (un-weighted) orthogonality of the trained A to the earlier ones."""
        if len(self.adapters) < 2:
            return None
        new = ss.lora_modules(ctx.model, self.adapters[-1])
        old = [ss.lora_modules(ctx.model, n) for n in self.adapters[:-1]]
        return sum(orthogonality([m[name][0].weight for m in old], a.weight, self.options.orth_norm)
                   for name, (a, _) in new.items())

    def penalty(self, ctx) -> torch.Tensor | None:
        o = self.options
        total = None
        if o.lambda1:
            orth = self.orthogonality_term(ctx)
            total = None if orth is None else o.lambda1 * orth
        if o.lambda2:
            new = ss.lora_modules(ctx.model, self.adapters[-1])
            l2 = o.lambda2 * sum(a.weight.norm() + b.weight.norm() for a, b in new.values())
            total = l2 if total is None else total + l2
        return total

    def compute_grads(self, ctx, micro_batches: list[dict]) -> dict:
        self._freeze(ctx)
        return super().compute_grads(ctx, micro_batches)

    # -- bookkeeping ------------------------------------------------------------------------------------
    def after_domain(self, ctx, t: int, domain: str) -> dict:
        counts = {}
        for name in self.adapters:
            modules = ss.lora_modules(ctx.model, name).values()
            counts[name] = sum(a.weight.numel() + b.weight.numel() for a, b in modules)
        rec = {"adapter": self.adapters[-1], "adapters": len(self.adapters),
               "trainable_params": counts[self.adapters[-1]], "stored_params": sum(counts.values()),
               "effective_rank": ctx.cfg.lora.r * len(self.adapters)}
        rec["saved_rank"] = rec["effective_rank"]  # the adapter directory grows linearly with the domains
        if len(self.adapters) > 1:
            with torch.no_grad():
                rec["orthogonality"] = float(self.orthogonality_term(ctx))
        self.records.append(rec)
        return rec

    def save_adapter(self, ctx, path) -> None:
        """The sum of every adapter so far as one LoRA of rank r t; the adapters themselves in per_domain/."""
        from ..models import lora_factors, save_lora_sum

        save_lora_sum(ctx.model, path, [lora_factors(ctx.model, n) for n in self.adapters])
        ctx.model.save_pretrained(Path(path) / "per_domain")

    def state_dict(self) -> dict:
        return {"adapters": list(self.adapters), "records": list(self.records)}

    def load_state_dict(self, state: dict, ctx) -> None:
        """Re-create the adapters of the saved point (random values; the pipeline copies the saved
        LoRA tensors in by name right after this call). Idempotent: existing adapters are kept."""
        self.records = list(state.get("records", []))
        self._ensure(ctx, list(state.get("adapters", ["default"])))
