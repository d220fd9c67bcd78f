"""SafeGrad (Yi, Li, Zhang, Nie, Li, Huang, Liu, arXiv:2508.07172): gradient surgery against safety.

Every optimizer step, after the task gradient g_u has been accumulated (compute_grads), this method
(rewrite_gradients) saves g_u, zeroes the gradients, backpropagates an alignment loss on a calibration
batch to read g_a, and writes back

    g_u' = g_u - (<g_u, g_a> / ||g_a||^2) g_a    if <g_u, g_a> < 0   (conflict: PCGrad's projection
         = g_u                                   otherwise            onto the normal plane of g_a)
    g    = g_u' + lambda_a * g_a

Clipping (train.max_grad_norm) then applies to g, i.e. after the surgery.

Choices (the paper's code is not public; each inferred choice is an option below):
- ``align_loss``: ``kl`` (default, the paper's alignment loss) is KL(p_aligned || p_theta) per response
  token, mean over tokens, on a batch of calibration examples (harmful prompt -> refusal); p_aligned is
  the same model with the adapter disabled (``ctx.model.disable_adapter()``, no second model copy),
  i.e. the aligned chat model before any domain. At a fresh LoRA (B = 0) p_theta = p_aligned, the KL
  is at its minimum and g_a = 0 (exactly: the KL gradient uses its closed form in the logits, see
  ``align_backward``): then no surgery happens (``||g_a|| = 0`` is checked, never divided by) and the
  first step of a run is plain fine-tuning. ``nll`` is the refusal NLL on the same batch,
  whose gradient is non-zero from the start (it pushes towards the refusals, not towards p_aligned).
- ``lambda_a`` = 1.0: the final step adds the alignment gradient unweighted, as PCGrad sums the
  (projected) task gradients; an assumption, since the paper's weighting is not available. 0 gives
  pure projection (g_a is only used to remove the conflicting component).
- ``surgery``: ``global`` (default) tests the conflict on the flattened gradient of all trainable
  (LoRA) weights, as PCGrad and the paper's "gradient" do; ``per_module`` applies the rule separately
  to each LoRA module's vec([B; A]) (OGPSA projects per parameter tensor).
- g_a is recomputed every step on the next batch of a seeded stream over the calibration set
  (``align_batch`` examples); only g_u is projected, g_a itself is not.
Logs per step: ``align_loss``, ``align_grad_norm``, ``conflict`` (1 if the global <g_u, g_a> < 0; its
mean over a domain is the conflict rate), ``conflict_modules`` (``per_module`` only: the fraction of
modules in conflict) and ``cos_task_align`` (global cosine of g_u and g_a before surgery, when both are
non-zero).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .. import subspace as ss
from ..anchor import anchor_kl
from ..data.chat import mean_token_nll
from ..errors import SafeAnchorError
from ..train import BatchStream
from .base import Method, MethodConfig, register

ALIGN_STREAM = 51_000  # seed stream of the alignment batches


def _h(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SafeGradConfig(MethodConfig):
    align_loss: Literal["kl", "nll"] = _h(
        "kl", "'kl' (paper: KL(p_aligned || p_theta) on calibration data, reference = adapter disabled; zero "
        "gradient at a fresh LoRA) or 'nll' (refusal NLL on calibration data)")
    lambda_a: float = _h(1.0, "weight of g_a in the final gradient g_u' + lambda_a g_a (assumed: the paper's "
                         "code is not public; PCGrad sums unweighted); 0 = projection only", check=">=0")
    surgery: Literal["global", "per_module"] = _h(
        "global", "'global' (conflict test and projection on the flattened gradient of all LoRA weights, as PCGrad) "
        "or 'per_module' (separately per LoRA module vec([B; A]))")
    align_batch: int = _h(0, "calibration examples per alignment gradient (0 = train.batch_size)", check=">=0")


def surgery(g_u: torch.Tensor, g_a: torch.Tensor, lambda_a: float = 1.0) -> tuple[torch.Tensor, dict]:
    """PCGrad step on flat vectors: g_u' + lambda_a g_a with g_u' = g_u - <g_u,g_a>/||g_a||^2 g_a on conflict.

    Dot products and norms in float64; the result has g_u's dtype. ||g_a|| = 0 means no surgery.
    """
    u, a = g_u.double(), g_a.double()
    dot, a_sq, u_sq = float(u @ a), float(a @ a), float(u @ u)
    conflict = dot < 0.0 and a_sq > 0.0
    out = u - (dot / a_sq) * a if conflict else u
    if lambda_a:
        out = out + lambda_a * a
    info = {"dot": dot, "conflict": conflict, "cos": dot / (u_sq * a_sq) ** 0.5 if u_sq > 0 and a_sq > 0 else None}
    return out.to(g_u.dtype), info


@register
class SafeGrad(Method):
    name = "safegrad"
    paper = "Yi et al., Gradient Surgery for Safe LLM Fine-Tuning (arXiv:2508.07172, 2025)"
    summary = "project the task gradient off the alignment (KL to the aligned model) gradient on conflict"
    config_cls = SafeGradConfig

    def __init__(self, options):
        super().__init__(options)
        self.step_count = 0

    def align_batch(self, ctx) -> dict:
        encoded = getattr(self, "_encoded", None)
        if encoded is None:
            encoded = self._encoded = ctx.encode_all(ctx.calibration)
            if not encoded:
                raise SafeAnchorError("SafeGrad needs safety calibration examples; set data.calibration_size > 0")
        size = self.options.align_batch or ctx.cfg.train.batch_size
        stream = BatchStream(encoded, size, ctx.cfg.seed, ALIGN_STREAM, ctx.tokenizer.pad_token_id)
        return ctx.to_device(stream.batch(self.step_count))

    def align_backward(self, ctx, batch: dict, weight: float = 1.0) -> float:
        """Backpropagate ``weight`` x the alignment loss on ``batch`` (adds g_a to .grad); returns that value.

        KL: the library's one anchor loss (``anchor.anchor_kl``), whose gradient is the closed form
        dKL/dlogits = (p_theta - p_aligned) / T, so g_a is exactly zero where p_theta = p_aligned.
        Autograd through log_softmax instead leaves float32 round-off (sum p_aligned != 1 exactly,
        ~1e-9 of the task gradient) that would turn the conflict test and cosine into noise.
        """
        if self.options.align_loss == "nll":
            with ctx.autocast():
                loss = mean_token_nll(ctx.model, batch)
            ctx.check_finite(loss, "SafeGrad alignment loss (nll)")
            ctx.backward(weight * loss)
            return weight * loss.item()
        with ctx.autocast():
            kl = anchor_kl(ctx.model, batch)
        ctx.check_finite(kl, "SafeGrad alignment loss (kl)")
        ctx.backward(weight * kl)
        return weight * kl.item()

    def _groups(self, ctx, params: dict[str, torch.nn.Parameter]) -> list[list[str]]:
        """Parameter-name groups the rule applies to: all at once, or one per LoRA module (A and B together)."""
        names = list(params)
        if self.options.surgery == "global":
            return [names]
        ids = {id(p): n for n, p in params.items()}
        groups, seen = [], set()
        for a, b in ss.lora_modules(ctx.model).values():
            group = [ids[id(w)] for w in (b.weight, a.weight) if id(w) in ids]
            groups.append(group)
            seen.update(group)
        return [g for g in groups if g] + [[n] for n in names if n not in seen]

    def rewrite_gradients(self, ctx) -> dict:
        params = ctx.trainable()
        task = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
        for p in params.values():
            p.grad = None
        # data parallel: each process its rows of the alignment batch (shard weight as for the task loss),
        # then one all-reduce; a batch with fewer rows than processes is computed whole everywhere
        batch, weight, sharded = ctx.dist.shard_extra(self.align_batch(ctx))
        loss = ctx.dist.reduce_extra(list(params.values()), self.align_backward(ctx, batch, weight), sharded)
        align = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
        self.step_count += 1

        def flat(d, names):
            return torch.cat([d[n].reshape(-1) for n in names])

        u_all, a_all = flat(task, list(params)).double(), flat(align, list(params)).double()
        dot, u_norm, a_norm = float(u_all @ a_all), float(u_all.norm()), float(a_all.norm())
        del u_all, a_all
        groups = self._groups(ctx, params)
        conflicts = 0
        with torch.no_grad():
            for names in groups:
                new, info = surgery(flat(task, names), flat(align, names), self.options.lambda_a)
                conflicts += info["conflict"]
                offset = 0
                for n in names:
                    p = params[n]
                    p.grad = new[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
                    offset += p.numel()
        logs = {"align_loss": loss, "align_grad_norm": a_norm, "conflict": float(dot < 0.0 and a_norm > 0)}
        if self.options.surgery == "per_module":
            logs["conflict_modules"] = conflicts / len(groups)
        if u_norm > 0 and a_norm > 0:
            logs["cos_task_align"] = dot / (u_norm * a_norm)
        return logs

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict, ctx) -> None:
        self.step_count = state.get("step_count", 0)
