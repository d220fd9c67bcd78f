"""Safety interleaving (Bianchi et al., "Safety-Tuned LLaMAs", ICLR 2024, arXiv:2309.07875).

Rule: ordinary SFT on D_t plus safety demonstrations (harmful prompt -> refusal), no loss change. Here
``domain_data`` builds, for every domain t, the mixture of its n examples and k safety examples and
shuffles it with a generator seeded by (run seed, t), so the mixture (and a resumed run's) is a pure
function of the inputs. Mixing at the dataset level makes the ratio exact (per-batch concatenation,
as the public SafeAnchor code does, gives 1/9 = 11% with batch 8).

    relative_to = "mixture" (default):  k / (n + k) = ratio,  k ~= ratio * n / (1 - ratio)
    relative_to = "domain":             k / n = ratio,        k ~= ratio * n

with k the integer whose share is closest to the ratio (as exact as integer counts allow).
ratio = 0.10 is the SafeAnchor paper's "10% BeaverTails mixed into each domain" of the final mixture
(5,000 domain examples -> 556 safety examples); Bianchi et al. found ~3% already helps and that much more causes
exaggerated safety (report over-refusal alongside refusal).

The safety examples are the run's safety calibration set (``ctx.calibration``, N_s examples), the same
pool of harmful prompts with refusals the other methods use, so no extra data is fetched.
``samples``:
- ``fresh`` (default): domain t takes the next k examples of one seeded permutation of the pool
  (positions (t-1)k .. tk-1, wrapping around), so successive domains see different safety examples
  until the pool is used up, like fresh draws from a large pool (BeaverTails); every example is used
  equally often (at most once more than any other) when the pool is small.
- ``reuse``: every domain gets the same k examples (the first k of that permutation, wrapping
  around if k > N_s).
When k exceeds the pool, examples repeat (balanced, never more than ceil(k / N_s) times); the record
of ``after_domain`` reports the counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import SafeAnchorError
from .base import Method, MethodConfig, option, register

POOL_STREAM = 52_000  # seed stream of the permutation of the safety pool
SHUFFLE_STREAM = 52_001  # seed stream of each domain's mixture shuffle


def _h(default, help, check=None):
    return option(default, help, check=check)  # Literal annotations + check=: see config.check_fields


@dataclass
class InterleaveConfig(MethodConfig):
    ratio: float = _h(0.10, "safety share (SafeAnchor paper: 10% of each domain's mixture; Bianchi et al.: ~3% "
                      "helps); below 1 with relative_to 'mixture'", check=">=0")
    relative_to: Literal["mixture", "domain"] = _h(
        "mixture", "'mixture' (ratio of the final mixture: k = ratio n / (1 - ratio)) or 'domain' (k = ratio x "
        "domain examples)")
    samples: Literal["fresh", "reuse"] = _h(
        "fresh", "'fresh' (each domain takes the next safety examples of one seeded permutation of the calibration "
        "pool, wrapping) or 'reuse' (the same safety examples for every domain)")

    def __post_init__(self):  # the one check across two fields (so it runs when the config is built)
        if self.relative_to == "mixture" and isinstance(self.ratio, (int, float)) and self.ratio >= 1:
            raise SafeAnchorError(f"config key 'method_options.interleave.ratio' must be < 1 with relative_to "
                                  f"'mixture' (a share of the mixture), got {self.ratio}; lower it or set "
                                  f"method_options.interleave.relative_to=domain")


def safety_count(n: int, ratio: float, relative_to: str) -> int:
    """k safety examples for n domain examples: the integer k whose share k / (n + k) ("mixture") or
    k / n ("domain") is closest to ``ratio`` (ties: the smaller k)."""
    if relative_to == "mixture":
        if not 0.0 <= ratio < 1.0:
            raise SafeAnchorError(f"interleave ratio must be in [0, 1) relative to the mixture, got {ratio}")
        x, share = ratio * n / (1.0 - ratio), (lambda k: k / (n + k) if n + k else 0.0)
    elif relative_to == "domain":
        if ratio < 0.0:
            raise SafeAnchorError(f"interleave ratio must be >= 0, got {ratio}")
        x, share = ratio * n, (lambda k: k / n if n else 0.0)
    else:
        raise SafeAnchorError(f"unknown relative_to {relative_to!r}; use mixture or domain")
    lo = int(math.floor(x))
    return min((lo, lo + 1), key=lambda k: (abs(share(k) - ratio), k))


@register
class Interleave(Method):
    name = "interleave"
    paper = "Bianchi et al., Safety-Tuned LLaMAs (ICLR 2024)"
    summary = "safety demonstrations mixed into every domain's data at an exact ratio"
    config_cls = InterleaveConfig

    def __init__(self, options):
        super().__init__(options)
        self.mixes: dict[str, dict] = {}

    def safety_examples(self, ctx, t: int, k: int) -> list[dict]:
        pool = [{"prompt": e["prompt"], "response": e["response"]} for e in ctx.calibration]
        if k and not pool:
            raise SafeAnchorError("interleave needs safety examples: ctx.calibration is empty "
                                  "(set data.calibration_size > 0)")
        if not k:
            return []
        order = np.random.default_rng([ctx.cfg.seed, POOL_STREAM]).permutation(len(pool))
        start = (t - 1) * k if self.options.samples == "fresh" else 0
        return [pool[order[j % len(pool)]] for j in range(start, start + k)]

    def domain_data(self, ctx, t: int, domain: str, examples: list[dict]) -> list[dict]:
        k = safety_count(len(examples), self.options.ratio, self.options.relative_to)
        safety = self.safety_examples(ctx, t, k)
        mixture = [dict(e) for e in examples] + safety
        order = np.random.default_rng([ctx.cfg.seed, SHUFFLE_STREAM, t]).permutation(len(mixture))
        self.mixes[domain] = {"domain_examples": len(examples), "safety_examples": k,
                              "safety_share": k / max(1, len(mixture)), "pool": len(ctx.calibration),
                              "distinct_safety": len({(e["prompt"], e["response"]) for e in safety})}
        return [mixture[i] for i in order]

    def after_domain(self, ctx, t: int, domain: str) -> dict:
        return {"mixture": self.mixes.get(domain, {})}
