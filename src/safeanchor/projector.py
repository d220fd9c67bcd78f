"""OSCA: keep each optimizer step out of the safety subspace, through torch's optimizer step hooks.

For module i with basis V_i and strength s_i = 1 - alpha_i (Guo, Wu, Yiu, arXiv:2604.17691, Eq. 4-5):

    mode "gradient" (the paper):  g_i <- g_i - s_i V_i V_i^T g_i          before the optimizer step
    mode "update"   (default):    u_i <- u_i - s_i V_i V_i^T u_i          the optimizer's actual update
    mode "none"     (ablation):   nothing is projected; safety terms are still added

Projecting the gradient is not enough under AdamW: its per-coordinate scaling m / sqrt(v) and the
decoupled weight decay move a projected gradient's update back into the subspace (measured in the
tests). Projecting the update u = theta_after - theta_before makes every step exactly orthogonal to
V_i for s_i = 1.

Safety terms (``SafetyTerm``: the anchor KL, CSM's replay loss) are added to the gradient inside the
step's pre-hook, i.e. after the training loop's gradient clipping (so their weight does not depend on
the task gradient's norm) and, by default, *bypass* the projection: they pull toward safety, which is
inside the subspace. In mode "update" the bypass is exact for Adam / AdamW: the update
-lr/bc1 * m / (sqrt(v_hat) + eps) is linear in the first moment m for the step's second moment, and m
is an EMA of the gradients, so it splits into the task's EMA and the terms' EMA m_s (kept here). The
terms' share -lr/bc1 * m_s / (sqrt(v_hat) + eps) is split off, the rest (task gradient and weight
decay) projected, and the share added back.

Because everything happens in ``optimizer.register_step_pre_hook`` / ``register_step_post_hook``, any
training loop that calls ``optimizer.step()`` (transformers' Trainer, TRL, accelerate, a plain loop) gets
the projection unchanged. In a data-parallel group the hooks run on every process on the same (already
all-reduced) gradients; a term's batch is sharded over processes when it is given a ``Dist``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch

from . import subspace as ss
from .anchor import SafetyBatches, anchor_kl
from .data.chat import mean_token_nll
from .errors import SafeAnchorError
from .safety_subspace import SafetySubspace

ProjectMode = Literal["gradient", "update", "none"]


class SafetyTerm:
    """``weight`` x a safety loss on the next batch of a stream, added inside the optimizer step.

    kind "anchor_kl": KL(p_aligned || p_theta) (``anchor.anchor_kl``); kind "nll": the response-token mean
    NLL (CSM's replay of safe responses). With a data-parallel ``dist`` each process takes its rows of the
    batch with the shard weight and the gradients are averaged (the whole batch's gradient); a batch with
    fewer rows than processes is computed whole on every process.
    """

    def __init__(self, kind: Literal["anchor_kl", "nll"], batches: SafetyBatches, weight: float, name: str | None = None,
                 dist=None, autocast=None, reference=None):
        if kind not in ("anchor_kl", "nll"):
            raise SafeAnchorError(f"unknown safety term {kind!r}; use anchor_kl or nll")
        from .distributed import Dist

        self.kind, self.batches, self.weight = kind, batches, float(weight)
        self.name = name or kind
        self.dist = dist or Dist()
        self.autocast = autocast or contextlib.nullcontext  # () -> context, e.g. the trainer's bf16 autocast
        self.reference = reference  # anchor_kl: (model, batch) -> reference logits; None = the aligned model

    def gradients(self, model, weights: list[torch.Tensor]) -> tuple[list[torch.Tensor | None], float]:
        """(d weight*loss / d w for each of ``weights``, the loss value) on the stream's next batch."""
        batch, share, sharded = self.dist.shard_extra(self.batches.next(weights[0].device))
        with torch.enable_grad():
            with self.autocast():
                if self.kind == "anchor_kl":
                    ref = self.reference(model, batch) if self.reference is not None else None
                    loss = anchor_kl(model, batch, ref)
                else:
                    loss = mean_token_nll(model, batch)
            if self.dist.any(not bool(torch.isfinite(loss).all())):
                raise SafeAnchorError(f"{self.name} loss is {float(loss)} (not finite, here or in another process); "
                                      f"lower the learning rate or check the safety data for empty responses")
            grads = _grads_of(self.weight * share * loss, weights, model)
        value = float(loss.detach()) * share
        if sharded:
            present = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, weights)]
            self.dist._flat_reduce(present, torch.distributed.ReduceOp.SUM)
            grads = [g.div_(self.dist.world) for g in present]
            value = self.dist.mean(value)
        return grads, value

    def state_dict(self) -> dict:
        return {"position": self.batches.position}

    def load_state_dict(self, state: dict) -> None:
        self.batches.position = int(state.get("position", 0))


def _checkpointing(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers 5 renamed it
        if hasattr(type(base), attr):
            return bool(getattr(base, attr))
    return False


def _grads_of(loss: torch.Tensor, weights: list[torch.Tensor], model) -> list[torch.Tensor | None]:
    """d loss / d w, leaving every .grad as it was. autograd.grad touches no .grad (and no DDP hook); with
    gradient checkpointing active (reentrant checkpoints refuse autograd.grad) the weights' .grad are moved
    aside, a plain backward fills them, and they are put back."""
    if not (_checkpointing(model) and model.training):
        return list(torch.autograd.grad(loss, weights, allow_unused=True))
    saved = [w.grad for w in weights]
    for w in weights:
        w.grad = None
    loss.backward()
    grads = [w.grad for w in weights]
    for w, g in zip(weights, saved):
        w.grad = g
    return grads


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer``."""
    opt = optimizer
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):  # AcceleratedOptimizer is a subclass
        opt = opt.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise SafeAnchorError(f"cannot attach the safety projector to {type(optimizer).__name__}: it is not a "
                              "torch.optim.Optimizer (DeepSpeed's engine steps its own partitioned optimizer; "
                              "use DDP instead)")
    return opt


class SafetyProjector:
    """OSCA for one PEFT model: ``attach(optimizer)`` and every ``optimizer.step()`` is projected.

    ``strengths``: s_i per module (default 1 everywhere: strict); ``terms``: safety terms added inside the
    step; ``project_terms``: project them too (the public SafeAnchor code's behaviour; default: bypass).
    After each step ``logs`` holds ``grad_in_subspace`` / ``update_in_subspace`` (mean over modules of
    ||V^T x|| / ||x|| of the projected quantity, before projection) and each term's loss.
    """

    def __init__(self, model, subspace: SafetySubspace, strengths: dict[str, float] | None = None, *,
                 mode: ProjectMode = "update", terms: list[SafetyTerm] | tuple = (), project_terms: bool = False,
                 share_cap: float = 10.0, adapter_name: str = "default"):
        if mode not in ("gradient", "update", "none"):
            raise SafeAnchorError(f"unknown projection mode {mode!r}; use gradient, update or none")
        self.model, self.mode, self.terms, self.project_terms = model, mode, list(terms), project_terms
        self.share_cap = share_cap
        self.modules = ss.lora_modules(model, adapter_name)
        unknown = [n for n in subspace.bases if n not in self.modules]
        if unknown:
            raise SafeAnchorError(f"the safety subspace has module {unknown[0]} that the model's adapter "
                                  f"{adapter_name!r} lacks; compute the subspace on this model")
        device = next(model.parameters()).device
        self.subspace = subspace.to(device)
        self.strengths = {n: 1.0 for n in subspace.bases} if strengths is None else dict(strengths)
        self.weights = [w for a, b in self.modules.values() for w in (a.weight, b.weight)]
        self.logs: dict = {}
        self._ema: dict[str, torch.Tensor] = {}  # first-moment EMA of the bypassing terms' gradients, per weight
        self._term_grads: dict[str, torch.Tensor] | None = None
        self._before: dict[str, torch.Tensor] | None = None
        self._handles: list = []
        self.optimizer = None

    # -- attaching ------------------------------------------------------------------------------------
    def attach(self, optimizer) -> "SafetyProjector":
        opt = _torch_optimizer(optimizer)
        self.detach()
        exact_bypass = self.mode == "update" and self.terms and not self.project_terms
        if exact_bypass:
            if not isinstance(opt, (torch.optim.AdamW, torch.optim.Adam)):
                raise SafeAnchorError(f"update projection with safety terms that bypass it needs Adam or AdamW "
                                      f"(got {type(opt).__name__}); use mode='gradient' or project_terms=True")
            if any(g.get("maximize") for g in opt.param_groups):
                raise SafeAnchorError("update projection does not support maximize=True; use the default")
        params = {id(p) for g in opt.param_groups for p in g["params"]}
        missing = [n for n, (a, b) in self.modules.items() if id(a.weight) not in params or id(b.weight) not in params]
        if missing and self.mode != "none":
            raise SafeAnchorError(f"the optimizer does not hold LoRA module {missing[0]}'s weights; create the "
                                  "optimizer over the model's trainable parameters")
        self.optimizer = opt
        self._group = {id(p): g for g in opt.param_groups for p in g["params"]}
        self._handles = [opt.register_step_pre_hook(self._pre), opt.register_step_post_hook(self._post)]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- the step -------------------------------------------------------------------------------------
    def _key(self, name: str, part: str) -> str:
        return f"{name}.{part}"

    def _project(self, vecs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float | None]:
        """(s_i-projected vec([B; A]) per module, mean fraction inside the subspace before projection)."""
        out, fractions = {}, []
        for n, vec in vecs.items():
            basis = self.subspace.bases.get(n)
            if basis is None or basis.basis.shape[1] == 0:
                out[n] = vec
                continue
            fractions.append(ss.fraction_in_subspace(vec, basis))
            out[n] = ss.project_out(vec, basis, self.strengths.get(n, 1.0)) if self.mode != "none" else vec
        return out, (sum(fractions) / len(fractions) if fractions else None)

    @torch.no_grad()
    def _project_grads(self) -> float | None:
        """Project every module's .grad (vec([B; A])) in place; the mean fraction inside before projection."""
        grads = {n: ss.flat_grad(a, b) for n, (a, b) in self.modules.items()
                 if a.weight.grad is not None and b.weight.grad is not None}
        projected, frac = self._project(grads)
        for n, vec in projected.items():
            ss.set_flat_grad(*self.modules[n], vec)
        return frac

    def _add_terms(self) -> dict[str, torch.Tensor]:
        """Each term's gradient, summed per weight (keys "<module>.A" / "<module>.B"); logs their losses."""
        total: dict[str, torch.Tensor] = {}
        for term in self.terms:
            grads, value = term.gradients(self.model, self.weights)
            self.logs[term.name] = value
            for (n, (a, b)), ga, gb in zip(self.modules.items(), grads[0::2], grads[1::2]):
                for part, g in (("A", ga), ("B", gb)):
                    if g is not None:
                        key = self._key(n, part)
                        total[key] = g if key not in total else total[key] + g
        return total

    def _apply(self, grads: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, (a, b) in self.modules.items():
                for part, lin in (("A", a), ("B", b)):
                    g = grads.get(self._key(n, part))
                    if g is None:
                        continue
                    if lin.weight.grad is None:
                        lin.weight.grad = g.to(lin.weight.dtype).clone()
                    else:
                        lin.weight.grad.add_(g.to(lin.weight.grad.dtype))

    def _pre(self, optimizer, args, kwargs) -> None:
        self.logs = {}
        bypass = not self.project_terms
        if self.mode == "gradient":  # the terms join before the projection only when they are projected too
            if not bypass:
                self._apply(self._add_terms())
            frac = self._project_grads()
            if bypass:
                self._apply(self._add_terms())
        else:
            terms = self._add_terms()
            self._apply(terms)
            frac = None
            self._term_grads = terms if (self.mode == "update" and bypass and terms) else None
        if frac is not None:
            self.logs["grad_in_subspace"] = frac
        self._before = {self._key(n, p): lin.weight.detach().clone()
                        for n, (a, b) in self.modules.items() for p, lin in (("A", a), ("B", b))}

    def _term_share(self) -> dict[str, torch.Tensor]:
        """The bypassing terms' exact share of this step's Adam(W) update, per weight (module docstring).

        Where a term cancels the task gradient in a coordinate, v (and the denominator) is small and both
        shares are huge while their sum, the actual update, is not; projecting the huge task share would
        then throw the weights far (a 2.5 jump at lr 1e-2 in a test). Each coordinate's term share is
        therefore capped at ``share_cap`` x lr (10 typical Adam steps); the shares still sum to the update
        and the capped fraction of coordinates is logged (``bypass_capped``)."""
        shares, capped, total = {}, 0, 0
        for n, (a, b) in self.modules.items():
            for part, lin in (("A", a), ("B", b)):
                key = self._key(n, part)
                g = self._term_grads.get(key)
                if g is None:
                    continue
                p = lin.weight
                state, group = self.optimizer.state[p], self._group[id(p)]
                t = int(state["step"])
                b1, b2 = group["betas"]
                prev = self._ema.get(key) if t > 1 else None
                m_s = (1 - b1) * g if prev is None else b1 * prev.to(g) + (1 - b1) * g
                self._ema[key] = m_s
                v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
                denom = v.sqrt() / math.sqrt(1 - b2 ** t) + group["eps"]
                lr = float(group["lr"])
                share = -(lr / (1 - b1 ** t)) * m_s / denom
                if self.share_cap:
                    cap = self.share_cap * lr
                    capped += int((share.abs() > cap).sum())
                    share = share.clamp(-cap, cap)
                total += share.numel()
                shares[key] = share
        self.logs["bypass_capped"] = capped / max(1, total)
        return shares

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs) -> None:
        before = self._before
        if before is None:
            return
        share = self._term_share() if self._term_grads else {}
        deltas = {}
        for n, (a, b) in self.modules.items():
            da = a.weight - before[self._key(n, "A")] - share.get(self._key(n, "A"), 0)
            db = b.weight - before[self._key(n, "B")] - share.get(self._key(n, "B"), 0)
            deltas[n] = torch.cat([db.reshape(-1), da.reshape(-1)])
        if self.mode == "update":
            projected, frac = self._project(deltas)
            for n, (a, b) in self.modules.items():
                vec, nb = projected[n], b.weight.numel()
                b.weight.copy_(before[self._key(n, "B")] + vec[:nb].view_as(b.weight) + share.get(self._key(n, "B"), 0))
                a.weight.copy_(before[self._key(n, "A")] + vec[nb:].view_as(a.weight) + share.get(self._key(n, "A"), 0))
        else:
            frac = self._project(deltas)[1] if self.subspace.bases else None
        if frac is not None:
            self.logs["update_in_subspace"] = frac
        self._before, self._term_grads = None, None

    # -- resuming -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"ema": {k: v.detach().cpu().clone() for k, v in self._ema.items()},
                "terms": [t.state_dict() for t in self.terms]}

    def load_state_dict(self, state: dict) -> None:
        device = self.weights[0].device if self.weights else "cpu"
        self._ema = {k: v.to(device) for k, v in state.get("ema", {}).items()}
        for term, s in zip(self.terms, state.get("terms", [])):
            term.load_state_dict(s)
