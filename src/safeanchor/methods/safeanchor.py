"""SafeAnchor (Guo, Wu, Yiu, arXiv:2604.17691): SSI + OSCA + anchor KL + CSM.

SSI   For every LoRA module i, delta_i = vec([B_i; A_i]). Empirical Fisher of the safety data,
      F_i = (1/N) sum_n g_n g_n^T,  g_n = d log p(y_n | x_n) / d delta_i (summed over response tokens),
      via the N x N Gram matrix (subspace.fisher_basis); basis V_i covers rho of tr(F_i).
OSCA  Between backward and step: g <- g - (1 - alpha_i) V_i V_i^T g, jointly over [g_B; g_A],
      alpha_i = max(0, 1 - lambda * tr(F_i) / Z) with Z set by ``trace_norm`` (default: the mean trace
      over modules, so alpha is scale-free; the paper writes Z = 1, ``trace_norm="none"``).
      ``project="update"`` projects AdamW's actual parameter update instead (AdamW's per-coordinate
      scaling and weight decay move a projected gradient's update back into the subspace).
Anchor  gamma * KL(p_aligned || p_theta) on response tokens of a calibration batch, p_aligned from the
      same model with the adapter disabled (``anchor.anchor_kl``); its gradient is added inside the
      optimizer step, after gradient clipping, and bypasses the projection. With ``project="update"``
      the anchor's share of AdamW's update (first-moment EMA of the anchor gradients over the shared
      second moment) is split off before the update is projected and added back after
      (``projector.SafetyProjector``).
CSM   After each domain: refusal rate s_t on held-out monitor prompts; if s_t < (1 - tau) s_0, run
      ``repair_steps`` of replay (projected task loss on the domain + beta * unprojected safety
      loss on calibration data), re-measure, at most ``max_repair_blocks`` blocks. Two defaults differ
      from the paper (both switchable back): the block stops once the monitor is restored
      (``repair_check_every``), and the safety data also holds benign look-alikes answered by the
      aligned base (``repair_lookalikes``). Refusal-only replay to a fixed budget restored the monitor
      to 100% and pushed benign over-refusal from 10% to 80% on the quick start (README, ablations).
Update  After each domain the subspace is recomputed at the new point and merged with the old one
      (``merge``: eigenvalue-weighted SVD by default, GPM residual growth, or the paper code's union).

This method is a composition of the library's parts, the same ones ``SafeAnchorCallback`` puts into
transformers' Trainer: ``SafetySubspace`` (SSI and merges), ``SafetyProjector`` (OSCA + the anchor, in
the optimizer's step hooks), ``SafetyMonitor`` + ``monitor_and_repair`` (CSM).

The B = 0 start: PEFT initialises B = 0, so every A-gradient is exactly zero at theta_0 and the
initial subspace constrains B only. ``refresh_every`` recomputes and merges the subspace every N
steps inside a domain, so the A-block is constrained as soon as B moves (see README: ablations).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from ..anchor import SafetyBatches, snapshot_logits
from ..errors import SafeAnchorError
from ..monitor import (RepairSettings, SafetyMonitor, aligned_answers, builtin_lookalikes, check_repair_mix,
                       monitor_and_repair)
from ..projector import SafetyProjector, SafetyTerm
from ..safety_subspace import SafetySubspace
from .base import Method, MethodConfig, register

ANCHOR_STREAM = 50_000  # seed stream of the anchor's calibration batches


def _h(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SafeAnchorConfig(MethodConfig):
    rho: float = _h(0.90, "fraction of tr(F_i) the safety basis covers (paper: 0.90)", check="(0,1]")
    lam: float = _h(0.5, "lambda in alpha_i = max(0, 1 - lambda * tr(F_i)/Z) (paper: 0.5)", check=">=0")
    trace_norm: Literal["none", "max", "mean"] = _h(
        "mean", "Z in alpha_i = max(0, 1 - lambda tr(F_i)/Z): 'mean' (Z = mean_j tr F_j: scale-free, a module at the "
        "average trace gets alpha 1 - lambda, one at >= 1/lambda times it is projected fully), 'max' (Z = max_j tr F_j), "
        "'none' (Z = 1, the paper as written: alpha then depends on token counts, LoRA scaling and width; module "
        "traces ranged 0.16-212 on one model)")
    strict: bool = _h(False, "ablation: alpha_i = 0 for every module (strict projection)")
    project: Literal["gradient", "update", "none"] = _h(
        "update", "'gradient' (paper: project g before AdamW) or 'update' (project AdamW's parameter update, exact "
        "orthogonality) or 'none' (ablation: no OSCA)")
    gamma: float = _h(0.1, "anchor KL weight (paper: 0.1); 0 disables the anchor", check=">=0")
    anchor_projected: bool = _h(False, "project the anchor's contribution too (paper code does; paper text says "
                                "bypass). With project=update the bypass is exact: the anchor's share of AdamW's "
                                "update is split off (its own first-moment EMA over the shared second moment) and "
                                "left unprojected")
    anchor_batch: int = _h(4, "calibration examples per step for the anchor KL", check=">=1")
    anchor_reference: Literal["aligned", "previous"] = _h(
        "aligned", "p_ref of the anchor KL: 'aligned' (the model before any domain, the adapter disabled: the paper's "
        "choice, and the only one that bounds the cumulative drift from the safe model) or 'previous' (the model "
        "at the start of the current domain: anchors each domain to the last, so safety lost earlier is not pulled "
        "back)")
    csm: bool = _h(True, "cumulative safety monitoring with repair replay")
    tau: float = _h(0.05, "CSM tolerance: repair when s_t < (1 - tau) s_0 (paper: 0.05)", check="[0,1)")
    beta: float = _h(1.0, "weight of the safety loss in repair replay (paper: 1.0)", check=">=0")
    repair_steps: int = _h(200, "optimizer steps per repair block E_repair (paper: 200)", check=">=1")
    repair_lr: float = _h(0.0, "learning rate of repair replay (0 = train.lr)", check=">=0")
    max_repair_blocks: int = _h(2, "repair blocks per domain at most (paper: one, plus at most one further)",
                                check=">=0")
    repair_check_every: int = _h(5, "re-measure the monitor every N repair steps and end the block once s_t is "
                                 "back above the threshold (0 = only after a whole block, paper); a block that "
                                 "overshoots teaches refusal of everything", check=">=0")
    repair_restore: float = _h(0.0, "the fraction of s_0 a triggered repair must bring the monitor back to before it "
                               "stops (checks and further blocks); 0 = the trigger threshold (1 - tau) s_0, the paper. "
                               "1.0 is a hysteresis: repair to s_0 itself, so that a noisy monitor does not end the "
                               "repair on its first upward fluctuation past the threshold", check="[0,2]")
    repair_patience: int = _h(0, "end a triggered repair (this block and any further one) once this many monitor "
                              "measurements in a row (checks every repair_check_every steps, block ends) have not "
                              "beaten the best s_t so far; 0 = never (the paper's budget). A repair that no longer "
                              "moves the monitor only spends steps on its noise", check=">=0")
    repair_lookalikes: int = _h(64, "benign look-alike prompts ('how do I kill a Python process'; training "
                                "split) answered by the aligned base itself (adapter off, greedy), mixed into "
                                "the repair's safety data so repair restores the aligned behaviour on both "
                                "sides of the refusal boundary (0 = refusals only, paper)", check=">=0")
    overrefusal_monitor: int = _h(0, "benign look-alike prompts (training split, after the repair's look-alikes, so "
                                  "never replayed, never evaluated) on which CSM also measures over-refusal b_t; a "
                                  "repair then also starts when b_t > b_0 + overrefusal_tolerance, and runs until both "
                                  "monitors are restored. 0 = off, the paper: its monitor sees harmful prompts only, so "
                                  "a domain that teaches refusing benign questions is never repaired", check=">=0")
    overrefusal_tolerance: float = _h(5.0, "points of over-refusal above the aligned model's b_0 that CSM tolerates "
                                      "(with overrefusal_monitor > 0)", check=">=0")
    repair_mix: Literal["fixed", "adaptive"] = _h(
        "fixed", "the repair replay's safety batches: 'fixed' (refusals and look-alikes mixed in one pool, every "
        "step) or 'adaptive' (with overrefusal_monitor > 0: after a check where s_t is restored and only b_t is "
        "over its ceiling, replay the look-alikes alone until the next check; replaying refusals then raises "
        "over-refusal together with s_t)")
    basis: Literal["fisher", "random"] = _h(
        "fisher", "the basis the updates are projected against: 'fisher' (SSI's eigenvectors, the paper) or "
        "'random' (ablation: does the Fisher information matter? per module a random orthonormal basis of the same "
        "size, within the coordinates the Fisher basis spans; the Fisher bases are still computed, merged, saved "
        "and set alpha)")
    incremental: bool = _h(True, "recompute and merge the subspace after each domain (ablation: False)")
    merge: Literal["weighted", "residual", "union"] = _h(
        "weighted", "'weighted' (SVD of eigenvalue-scaled bases = eigendecomposition of F_old + F_new), 'residual' "
        "(GPM-style growth), 'union' (public code's unweighted SVD)")
    refresh_every: int = _h(0, "also recompute + merge the subspace every N steps of each domain, counted from "
                            "its start (not after its last step when the incremental refresh follows; 0 = only "
                            "after domains, as the paper); constrains the A-block once B moves", check=">=0")
    ssi_chunk: int = _h(8, "calibration examples per batched forward/backward in SSI", check=">=1")
    ssi_memory_gib: float = _h(1.5, "per-example gradients SSI holds at once (GiB): modules are processed in groups "
                               "that fit, one pass over the calibration set per group (Llama-2-7B, r 16, N_s 500: "
                               "31 GiB for all modules at once; 21 passes and a ~3.7 GiB peak at 1.5)", check=">0")
    max_rank: int = _h(0, "cap on basis size per module (0 = no cap)", check=">=0")

    def __post_init__(self) -> None:
        if self.csm and self.repair_mix == "adaptive" and (self.overrefusal_monitor <= 0 or self.repair_lookalikes <= 0):
            raise SafeAnchorError(
                f"method_options.safeanchor.repair_mix: adaptive replays the look-alikes alone while only the "
                f"over-refusal monitor is off, so it needs overrefusal_monitor > 0 (got {self.overrefusal_monitor}) "
                f"and repair_lookalikes > 0 (got {self.repair_lookalikes}); set both, or repair_mix: fixed")


def refresh_due(options: "SafeAnchorConfig", step: int, steps: int) -> bool:
    """``refresh_every``: recompute + merge the subspace after step ``step`` (1-based) of a domain of ``steps``?
    Every N-th step of the domain, counted from its start, except its last step when the domain-end
    refresh (``incremental``) follows at once (the same point twice would count its Fisher twice)."""
    every = options.refresh_every
    if not every or options.project == "none" or step % every:
        return False
    return not (options.incremental and step >= steps)


@register
class SafeAnchor(Method):
    name = "safeanchor"
    paper = "Guo, Wu, Yiu, SafeAnchor (arXiv:2604.17691, 2026)"
    summary = "Fisher safety subspace + orthogonal projection + anchor KL + safety monitoring with replay"
    config_cls = SafeAnchorConfig

    def __init__(self, options):
        super().__init__(options)
        self.subspace: SafetySubspace | None = None
        self.alpha: dict[str, float] = {}
        self.s0: float | None = None
        self.b0: float | None = None  # CSM's over-refusal monitor: the aligned model's refusal of its prompts
        self.step_count = 0
        self.lookalikes: list[dict] = []  # CSM repair: benign look-alikes with the aligned base's answers
        self.projector: SafetyProjector | None = None
        self._ema: dict = {}  # the projector's anchor EMA, restored before the projector exists
        self._bases_version, self._bases_file = 0, None
        self._previous: dict = {}  # anchor_reference 'previous': LoRA tensors at the start of the domain
        self._seed = 0  # the run's seed (basis 'random' draws with it)
        self._projected: SafetySubspace | None = None  # what updates are projected against (basis option)

    @property
    def bases(self):
        return self.subspace.bases if self.subspace is not None else {}

    # -- parts ----------------------------------------------------------------------------------------
    def _ssi_kwargs(self, ctx) -> dict:
        return {"max_length": ctx.cfg.train.max_length, "chunk": self.options.ssi_chunk,
                "memory_budget_gib": self.options.ssi_memory_gib, "dist": ctx.dist}

    def _set_subspace(self, subspace: SafetySubspace, ctx=None) -> None:
        """Use ``subspace`` from now on; with a run directory, its bases go to a file once (checkpoints then
        refer to it by name: at 7B the bases are about 1 GB, too much to rewrite every few steps)."""
        o = self.options
        self.subspace = subspace
        if ctx is not None:
            self._seed = ctx.cfg.seed
        self._projected = subspace.randomised(self._seed) if o.basis == "random" else subspace
        self._bases_version += 1
        self._bases_file = None
        if ctx is not None and getattr(ctx, "run_dir", None) is not None:
            self._bases_file = f"safety_basis_v{self._bases_version}.safetensors"
            if ctx.dist.is_main:
                path = ctx.run_dir / "state" / self._bases_file
                path.parent.mkdir(parents=True, exist_ok=True)
                subspace.save(path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)
        self.alpha = subspace.alpha(o.lam, o.trace_norm, o.strict)
        if self.projector is not None:
            self.projector.subspace = self._projected.to(next(self.projector.model.parameters()).device)
            self.projector.strengths = self._strengths()

    def _projector(self, ctx) -> SafetyProjector:
        if self.projector is None:
            o = self.options
            terms = []
            if o.gamma > 0:
                batches = SafetyBatches(ctx.calibration, ctx.tokenizer, o.anchor_batch, ctx.cfg.seed, ANCHOR_STREAM,
                                        ctx.cfg.train.max_length, "safety calibration examples (anchor)")
                reference = self._previous_logits if o.anchor_reference == "previous" else None
                terms.append(SafetyTerm("anchor_kl", batches, o.gamma, name="anchor_kl", dist=ctx.dist,
                                        autocast=ctx.autocast, reference=reference))
            self.projector = SafetyProjector(ctx.model, self._projected, self._strengths(),
                                             mode=o.project, terms=terms, project_terms=o.anchor_projected)
            self.projector.load_state_dict({"ema": self._ema})
        for term in self.projector.terms:
            term.batches.position = self.step_count  # the anchor's batch k is the run's optimizer step k
        return self.projector

    def _previous_logits(self, model, batch):
        """anchor_reference 'previous': the reference logits of the model at the start of the current domain."""
        names = dict(model.named_parameters())
        return snapshot_logits(model, batch, {names[n]: v.to(names[n].device) for n, v in self._previous.items()})

    def before_domain(self, ctx, t: int, domain: str) -> None:
        if self.options.anchor_reference == "previous":
            self._previous = {n: p.detach().cpu().clone() for n, p in ctx.model.named_parameters() if "lora_" in n}

    def _strengths(self) -> dict[str, float]:
        """OSCA's projection strength s_i = 1 - alpha_i per module."""
        return {n: 1.0 - a for n, a in self.alpha.items()}

    def spectrum(self) -> dict:
        return {**self.subspace.spectrum(self.alpha), "alpha": {n: round(a, 4) for n, a in self.alpha.items()}}

    # -- hooks ----------------------------------------------------------------------------------------
    def prepare(self, ctx) -> dict:
        o = self.options
        if o.csm and o.overrefusal_monitor > 0 and getattr(ctx.evaluator, "measures", "refusal") != "refusal":
            raise SafeAnchorError("method_options.safeanchor.overrefusal_monitor measures over-refusal with the "
                                  "monitor's judge, which here measures safe responses (a harm judge); set "
                                  "eval.monitor_judge to a refusal judge (keyword, wildguard-refusal) or "
                                  "overrefusal_monitor: 0")
        self._set_subspace(SafetySubspace.compute(ctx.model, ctx.calibration, ctx.tokenizer, rho=o.rho,
                                                  max_rank=o.max_rank or None, **self._ssi_kwargs(ctx)), ctx)
        rec = {"subspace": self.spectrum()}
        if o.csm:
            base_rate = getattr(ctx.evaluator, "base", None)  # the pipeline's: adapter off, cached completions
            if base_rate is not None:
                self.s0 = base_rate(ctx, ctx.monitor_prompts)
            else:
                self.s0 = self._monitor(ctx).set_baseline(ctx.model, ctx.tokenizer)
            rec["s0"] = self.s0
            if o.overrefusal_monitor > 0:
                prompts = self._benign_prompts(ctx)
                self.b0 = base_rate(ctx, prompts) if base_rate is not None else \
                    self._benign_monitor(ctx).set_baseline(ctx.model, ctx.tokenizer)
                rec["b0"] = self.b0
            if o.repair_lookalikes > 0:
                self.lookalikes = aligned_answers(ctx.model, ctx.tokenizer,
                                                  builtin_lookalikes(o.repair_lookalikes, ctx.cfg.seed), 48,
                                                  ctx.cfg.eval.batch_size, cache=getattr(ctx, "generation_cache", None),
                                                  mixed_precision=ctx.cfg.eval.mixed_precision)
                rec["repair_lookalikes"] = len(self.lookalikes)
            check_repair_mix(o.repair_mix, self._benign_monitor(ctx), self.lookalikes)
        return rec

    def _monitor(self, ctx) -> SafetyMonitor:
        def rate(model, tok):
            return ctx.evaluator(ctx, ctx.monitor_prompts)

        rate.measures = getattr(ctx.evaluator, "measures", "refusal")  # the pipeline's eval.monitor_judge
        monitor = SafetyMonitor(ctx.monitor_prompts, tau=self.options.tau, rate_fn=rate)
        monitor.s0 = self.s0
        return monitor

    def _benign_prompts(self, ctx) -> list[str]:
        return builtin_lookalikes(self.options.overrefusal_monitor, ctx.cfg.seed, skip=self.options.repair_lookalikes)

    def _benign_monitor(self, ctx) -> SafetyMonitor | None:
        """CSM's over-refusal monitor (``overrefusal_monitor`` > 0): b_t, the refusal rate on benign look-alikes."""
        if not self.options.overrefusal_monitor:
            return None
        prompts = self._benign_prompts(ctx)

        def rate(model, tok):
            return ctx.evaluator(ctx, prompts)

        rate.measures = "refusal"
        monitor = SafetyMonitor(prompts, tau=0.0, rate_fn=rate)
        monitor.s0 = self.b0
        return monitor

    def attach_optimizer(self, ctx, optimizer) -> None:
        self._projector(ctx).attach(optimizer)

    def after_step(self, ctx) -> dict:
        self.step_count += 1
        logs = dict(self.projector.logs) if self.projector is not None else {}
        if refresh_due(self.options, ctx.step, ctx.steps):
            self._refresh(ctx)
        return logs

    def _refresh(self, ctx) -> None:
        self._set_subspace(self.subspace.refresh(ctx.model, ctx.calibration, ctx.tokenizer, merge=self.options.merge,
                                                 **self._ssi_kwargs(ctx)), ctx)

    def after_domain(self, ctx, t: int, domain: str) -> dict:
        o = self.options
        rec: dict = {}
        start = time.perf_counter()
        seconds: dict = {}
        if o.csm:
            settings = RepairSettings.of(o, ctx.cfg.train.lr, ctx.cfg.train.batch_size)
            rec["csm"] = monitor_and_repair(self._monitor(ctx), ctx.model, ctx.tokenizer,
                                            ctx.domain_examples[ctx.current_domain], self._repair_data(ctx),
                                            self._projected, self._strengths(), settings,
                                            ctx.cfg.train, seed=ctx.cfg.seed, stage=t, dist=ctx.dist,
                                            benign=self._benign_monitor(ctx), lookalikes=self.lookalikes)
            seconds["csm"] = time.perf_counter() - start
        if o.incremental and o.project != "none":
            mark = time.perf_counter()
            self._refresh(ctx)
            seconds["refresh"] = time.perf_counter() - mark
        rec["subspace"] = self.spectrum()
        rec["seconds"] = seconds  # the pipeline moves it to the step's train.method_seconds_by_part
        return rec

    def _repair_data(self, ctx) -> list[dict]:
        """CSM's replay safety data: the repair source (default: the calibration set) + the look-alikes."""
        base = ctx.calibration if ctx.repair_examples is None else ctx.repair_examples
        return list(base) + self.lookalikes

    # -- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        ema = self.projector.state_dict()["ema"] if self.projector is not None else self._ema
        state = {"s0": self.s0, "b0": self.b0, "step_count": self.step_count, "lookalikes": self.lookalikes, "anchor_m": ema,
                 "bases_version": self._bases_version, "previous": self._previous}
        if self._bases_file is not None:
            state["bases_file"] = self._bases_file  # under <run>/state/, written when the subspace changed
        else:
            state["bases"] = self.subspace.state_dict()["bases"] if self.subspace is not None else {}
        return state

    def load_state_dict(self, state: dict, ctx) -> None:
        from .. import subspace as ss

        o = self.options
        self._seed = ctx.cfg.seed if ctx is not None else self._seed
        if "bases_file" in state:
            subspace = SafetySubspace.load(ctx.run_dir / "state" / state["bases_file"])
            subspace.rho, subspace.max_rank = o.rho, o.max_rank or None
        else:
            subspace = SafetySubspace({n: ss.FisherBasis(**b) for n, b in state.get("bases", {}).items()},
                                      o.rho, o.max_rank or None)
        self._set_subspace(subspace)
        self._bases_version = state.get("bases_version", self._bases_version)
        self._bases_file = state.get("bases_file")
        self.s0 = state.get("s0")
        self.b0 = state.get("b0")
        self.step_count = state.get("step_count", 0)
        self.lookalikes = state.get("lookalikes", [])
        self._previous = dict(state.get("previous", {}))
        self._ema = dict(state.get("anchor_m", {}))
        if self.projector is not None:
            self.projector.load_state_dict({"ema": self._ema})
