"""EWC on the LoRA parameters (Kirkpatrick et al., PNAS 2017), with a safety Fisher by default.

Rule. For every LoRA module i, theta_i = vec([B_i; A_i]) (subspace.py's layout); every step adds

    penalty = (lambda / 2) * sum_i sum_j Fn_ij (theta_ij - theta*_ij)^2,      Fn = F / c,

to the task loss, with the empirical diagonal Fisher from PER-EXAMPLE scores

    F_ij = (1/N) sum_n (d log p(y_n | x_n) / d theta_ij)^2       (log p summed over response tokens)

(subspace.per_sample_grads; squaring a batch-mean gradient, as every public EWC-on-LoRA code does,
underestimates F by about the batch size and mixes examples).

Which Fisher and anchor (``fisher_data``, ``online``):
- ``safety`` (default, "Safety-EWC"): F on the safety calibration set (harmful prompt -> refusal) at
  the aligned model theta_0 (fresh LoRA), anchor theta* = theta_0, computed once in ``prepare``. The
  baseline this library compares against is about keeping safety, so the Fisher is the safety one.
- ``previous_domain`` ("CL-EWC", the public SafeAnchor code's EWCLoRABaseline): after each domain, F on
  ``fisher_samples`` examples of that domain at the post-domain point theta_t, anchor theta_t; F is
  replaced each time, so domain 1 trains without a penalty. It protects earlier domains, not safety.
- ``online`` (Schwarz et al. 2018): after each domain a new Fisher F_new at theta_t (on the safety set
  or that domain), F <- gamma F + F_new, anchor <- theta_t. With ``safety`` this also refreshes the
  Fisher once B != 0 (see below), at the price of an anchor that drifts with the run.

The B = 0 degeneracy: PEFT starts B at zero, so at theta_0 every A-score is exactly zero
(d/dA of s B A x = 0 when B = 0): the default safety Fisher has F_A = 0 and leaves A unconstrained;
only B is anchored (and B alone already gates the adapter's output: delta W = s B A). The prepare
record reports the zero fraction of F (``fisher.zero_fraction``); ``online: true`` recomputes F at
later points, where F_A != 0.
EWC-LoRA (arXiv:2602.17559) instead regularises delta W = B A jointly; not implemented here.

lambda and the Fisher's scale (``fisher_norm``). Raw F depends on sequence length (scores sum over
tokens), on the model and on the loss convention; that is why public lambdas span 1e-3 (Vaccine
default) .. 100 (SafeAnchor code) .. 1e9 (Vaccine scripts). Default ``trace``: c = tr F of the first
Fisher (fixed afterwards, so online accumulation and later Fishers keep their relative size and the
penalty is exactly the paper's with lambda_raw = lambda / c). Then

    penalty = (lambda / 2) * E_{j ~ Fn}[(theta_j - theta*_j)^2]

is half lambda times the Fisher-weighted mean squared drift, independent of the number of LoRA
parameters. lambda = 2e4 makes it 1 nat (the size of a token NLL, i.e. of the task loss) when the
safety-important coordinates have drifted 0.01 RMS, about the RMS of a LoRA entry after a domain of
AdamW at lr 2e-4 (A's kaiming init is ~0.009 RMS at d_in = 4096). This is an order-of-magnitude
choice, not the paper's (the paper tuned lambda per benchmark). A check on SmolLM2-135M-Instruct
(r 16, q/k/v/o, 16 refusal examples, lr 2e-4): after 30 unpenalised steps on a benign task the
Fisher-weighted RMS drift was 2e-3 and at lambda = 2e4 the penalty was 0.04 (11% of the loss) with a
gradient norm of 0.37 against the task's 1.1, so the penalty starts to bind at a few 1e-3 of drift:
a firm constraint, not a freeze. Every step logs ``penalty`` and ``penalty_to_loss`` so a sweep can be
judged; ``fisher_norm: none`` uses raw F with lambda as given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .. import subspace as ss
from ..data.chat import collate
from ..errors import SafeAnchorError
from .base import Method, MethodConfig, option, register

FISHER_STREAM = 53_000  # seed stream of the Fisher subset of a domain


def _h(default, help, check=None):
    return option(default, help, check=check)  # Literal annotations + check=: see config.check_fields


@dataclass
class EWCConfig(MethodConfig):
    lam: float = _h(2e4, "lambda in (lambda/2) sum_j F_j (theta_j - theta*_j)^2; with fisher_norm 'trace' the "
                    "penalty is lambda/2 x the Fisher-weighted mean squared drift (2e4: 1 nat at 0.01 RMS drift; "
                    "the paper tunes lambda per task)", check=">=0")
    fisher_data: Literal["safety", "previous_domain"] = _h(
        "safety", "'safety' (Fisher on the safety calibration set at the aligned model, anchor there, once before "
        "domain 1) or 'previous_domain' (CL-EWC as the public SafeAnchor code: Fisher on each finished domain's "
        "data, anchor = post-domain weights)")
    online: bool = _h(False, "online EWC: after every domain F <- gamma F + F_new (F_new on fisher_data at the current "
                      "weights) and anchor <- current weights; False: safety Fisher fixed, previous-domain replaced")
    gamma: float = _h(1.0, "online EWC decay of the old Fisher (1.0 = plain accumulation, Huszar 2018)",
                      check="[0,1]")
    fisher_norm: Literal["trace", "none"] = _h(
        "trace", "'trace' (divide F by tr F of the first Fisher: lambda independent of model size and loss scale) "
        "or 'none' (raw F, lambda as in the paper's formula)")
    fisher_samples: int = _h(500, "examples per Fisher at most (a seeded subset when there are more; the safety "
                             "set has N_s = 500 by default); 0 = all", check=">=0")
    fisher_chunk: int = _h(8, "examples per batched forward/backward when computing per-sample scores",
                           check=">=1")


@register
class EWC(Method):
    name = "ewc"
    paper = "Kirkpatrick et al., Overcoming catastrophic forgetting (PNAS 2017)"
    summary = "diagonal per-example Fisher penalty on the LoRA weights (safety Fisher at the aligned model)"
    config_cls = EWCConfig

    def __init__(self, options):
        super().__init__(options)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.scale: float | None = None  # c: F is divided by it in the penalty
        self.n_fishers = 0

    # -- Fisher ---------------------------------------------------------------------------------------
    def _subset(self, ctx, examples: list[dict], t: int) -> list[dict]:
        n = self.options.fisher_samples
        if n <= 0 or len(examples) <= n:
            return list(examples)
        order = np.random.default_rng([ctx.cfg.seed, FISHER_STREAM, t]).permutation(len(examples))[:n]
        return [examples[i] for i in sorted(order)]

    def diagonal_fisher(self, ctx, examples: list[dict]) -> dict[str, torch.Tensor]:
        """F_ij = mean_n g_nij^2 from per-example scores, vec([B; A]) per module (float32, model device)."""
        encoded = ctx.encode_all(examples)
        if not encoded:
            raise SafeAnchorError("EWC has no usable examples for its Fisher (empty calibration/domain data, or "
                                  "every response truncated away); set data.calibration_size > 0")
        modules = ss.lora_modules(ctx.model)
        sums = {n: torch.zeros(a.weight.numel() + b.weight.numel()) for n, (a, b) in modules.items()}
        chunk = max(1, self.options.fisher_chunk)
        for start in range(0, len(encoded), chunk):
            batch = ctx.to_device(collate(encoded[start:start + chunk], ctx.tokenizer.pad_token_id))
            for name, g in ss.per_sample_grads(ctx.model, batch, modules).items():
                sums[name] += g.double().square().sum(0).float()
        return {n: (s / len(encoded)).to(ctx.device) for n, s in sums.items()}

    def _params(self, ctx) -> dict[str, torch.Tensor]:
        return {n: torch.cat([b.weight.reshape(-1), a.weight.reshape(-1)])
                for n, (a, b) in ss.lora_modules(ctx.model).items()}

    def _update(self, ctx, examples: list[dict], t: int) -> dict:
        new = self.diagonal_fisher(ctx, self._subset(ctx, examples, t))
        if self.options.online and self.fisher:
            self.fisher = {n: self.options.gamma * self.fisher[n] + f for n, f in new.items()}
        else:
            self.fisher = new
        with torch.no_grad():
            self.anchor = {n: p.detach().float().clone() for n, p in self._params(ctx).items()}
        if self.scale is None:
            tr = float(sum(f.double().sum() for f in new.values()))
            self.scale = tr if self.options.fisher_norm == "trace" and tr > 0 else 1.0
        self.n_fishers += 1
        return self.fisher_stats()

    def fisher_stats(self) -> dict:
        flat = torch.cat([f.reshape(-1) for f in self.fisher.values()]) if self.fisher else torch.zeros(0)
        if flat.numel() == 0:
            return {"fishers": self.n_fishers}
        return {"fishers": self.n_fishers, "trace": float(flat.double().sum()), "max": float(flat.max()),
                "zero_fraction": float((flat == 0).double().mean()), "scale": self.scale,
                "lambda_raw": self.options.lam / self.scale}

    # -- hooks ----------------------------------------------------------------------------------------
    def prepare(self, ctx) -> dict:
        if self.options.fisher_data == "safety":
            return {"fisher": self._update(ctx, ctx.calibration, 0)}
        return {}

    def penalty(self, ctx) -> torch.Tensor | None:
        """(lambda / 2c) sum_i sum_j F_ij (theta_ij - theta*_ij)^2 (differentiable in the LoRA weights)."""
        if not self.fisher:
            return None
        total = None
        for n, theta in self._params(ctx).items():
            term = (self.fisher[n] * (theta.float() - self.anchor[n]).square()).sum()
            total = term if total is None else total + term
        return (0.5 * self.options.lam / self.scale) * total

    def compute_grads(self, ctx, micro_batches: list[dict]) -> dict:
        logs = super().compute_grads(ctx, micro_batches)
        if self.fisher:
            logs.setdefault("penalty", 0.0)
            # the whole batch's task loss (under data parallelism logs["loss"] is this process's weighted share)
            logs["penalty_to_loss"] = logs["penalty"] / max(ctx.dist.mean(logs["loss"]), 1e-12)
        return logs

    def after_domain(self, ctx, t: int, domain: str) -> dict:
        o = self.options
        if o.fisher_data == "previous_domain":
            return {"fisher": self._update(ctx, ctx.domain_examples[domain], t)}
        if o.online:
            return {"fisher": self._update(ctx, ctx.calibration, t)}
        return {}

    # -- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"fisher": {n: f.cpu() for n, f in self.fisher.items()},
                "anchor": {n: a.cpu() for n, a in self.anchor.items()},
                "scale": self.scale, "n_fishers": self.n_fishers}

    def load_state_dict(self, state: dict, ctx) -> None:
        dev = ctx.device
        self.fisher = {n: f.to(dev) for n, f in state.get("fisher", {}).items()}
        self.anchor = {n: a.to(dev) for n, a in state.get("anchor", {}).items()}
        self.scale = state.get("scale")
        self.n_fishers = state.get("n_fishers", 0)
