"""SafeAnchor (Guo, Wu, Yiu, arXiv:2604.17691): SSI + OSCA + anchor KL + CSM.

SSI   For every LoRA module i, delta_i = vec([B_i; A_i]). Empirical Fisher of the safety data,
      F_i = (1/N) sum_n g_n g_n^T,  g_n = d log p(y_n | x_n) / d delta_i (summed over response tokens),
      via the N x N Gram matrix (subspace.fisher_basis); basis V_i covers rho of tr(F_i).
OSCA  Between backward and step: g <- g - (1 - alpha_i) V_i V_i^T g, jointly over [g_B; g_A],
      alpha_i = max(0, 1 - lambda * tr(F_i) / Z) with Z set by ``trace_norm`` (paper: Z = 1).
      ``project="update"`` projects AdamW's actual parameter update instead (AdamW's per-coordinate
      scaling and weight decay move a projected gradient's update back into the subspace).
Anchor  gamma * KL(p_aligned || p_theta) on response tokens of a calibration batch, p_aligned from the
      same model with the adapter disabled; its gradient is added after the projection (bypass). With
      ``project="update"`` the anchor's share of AdamW's update (first-moment EMA of the anchor gradients
      over the shared second moment) is split off before the update is projected and added back after.
CSM   After each domain: refusal rate s_t on held-out monitor prompts; if s_t < (1 - tau) s_0, run
      ``repair_steps`` of replay (projected task loss on the domain + beta * unprojected safety
      loss on calibration data), re-measure, at most ``max_repair_blocks`` blocks. Two defaults differ
      from the paper (both switchable back): the block stops once the monitor is restored
      (``repair_check_every``), and the safety data also holds benign look-alikes answered by the
      aligned base (``repair_lookalikes``). Refusal-only replay to a fixed budget restored the monitor
      to 100% and pushed benign over-refusal from 10% to 80% on the quick start (README, ablations).
Update  After each domain the subspace is recomputed at the new point and merged with the old one
      (``merge``: eigenvalue-weighted SVD by default, GPM residual growth, or the paper code's union).

The B = 0 start: PEFT initialises B = 0, so every A-gradient is exactly zero at theta_0 and the
initial subspace constrains B only. ``refresh_every`` recomputes and merges the subspace every N
steps inside a domain, so the A-block is constrained as soon as B moves (see README: ablations).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import subspace as ss
from ..data.chat import mean_token_nll, response_logits
from ..train import BatchStream, train_steps
from .base import Method, MethodConfig, register


def _h(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class SafeAnchorConfig(MethodConfig):
    rho: float = _h(0.90, "fraction of tr(F_i) the safety basis covers (paper: 0.90)")
    lam: float = _h(0.5, "lambda in alpha_i = max(0, 1 - lambda * tr(F_i)/Z) (paper: 0.5)")
    trace_norm: str = _h("none", "Z in alpha_i: 'none' (Z = 1, paper as written), 'max' (Z = max_j tr F_j), "
                         "'mean' (Z = mean_j tr F_j)")
    strict: bool = _h(False, "ablation: alpha_i = 0 for every module (strict projection)")
    project: str = _h("update", "'gradient' (paper: project g before AdamW) or 'update' (project AdamW's "
                      "parameter update, exact orthogonality) or 'none' (ablation: no OSCA)")
    gamma: float = _h(0.1, "anchor KL weight (paper: 0.1); 0 disables the anchor")
    anchor_projected: bool = _h(False, "project the anchor's contribution too (paper code does; paper text says "
                                "bypass). With project=update the bypass is exact: the anchor's share of AdamW's "
                                "update is split off (its own first-moment EMA over the shared second moment) and "
                                "left unprojected")
    anchor_batch: int = _h(4, "calibration examples per step for the anchor KL")
    csm: bool = _h(True, "cumulative safety monitoring with repair replay")
    tau: float = _h(0.05, "CSM tolerance: repair when s_t < (1 - tau) s_0 (paper: 0.05)")
    beta: float = _h(1.0, "weight of the safety loss in repair replay (paper: 1.0)")
    repair_steps: int = _h(200, "optimizer steps per repair block E_repair (paper: 200)")
    repair_lr: float = _h(0.0, "learning rate of repair replay (0 = train.lr)")
    max_repair_blocks: int = _h(2, "repair blocks per domain at most (paper: one, plus at most one further)")
    repair_check_every: int = _h(10, "re-measure the monitor every N repair steps and end the block once s_t is "
                                 "back above the threshold (0 = only after a whole block, paper); a block that "
                                 "overshoots teaches refusal of everything")
    repair_lookalikes: int = _h(64, "benign look-alike prompts ('how do I kill a Python process'; training "
                                "split) answered by the aligned base itself (adapter off, greedy), mixed into "
                                "the repair's safety data so repair restores the aligned behaviour on both "
                                "sides of the refusal boundary (0 = refusals only, paper)")
    incremental: bool = _h(True, "recompute and merge the subspace after each domain (ablation: False)")
    merge: str = _h("weighted", "'weighted' (SVD of eigenvalue-scaled bases = eigendecomposition of F_old + "
                    "F_new), 'residual' (GPM-style growth), 'union' (public code's unweighted SVD)")
    refresh_every: int = _h(0, "also recompute + merge the subspace every N steps inside a domain (0 = only "
                            "after domains, as the paper); fixes the B = 0 start")
    ssi_chunk: int = _h(8, "calibration examples per batched forward/backward in SSI")
    max_rank: int = _h(0, "cap on basis size per module (0 = no cap)")


@register
class SafeAnchor(Method):
    name = "safeanchor"
    paper = "Guo, Wu, Yiu, SafeAnchor (arXiv:2604.17691, 2026)"
    summary = "Fisher safety subspace + orthogonal projection + anchor KL + safety monitoring with replay"
    config_cls = SafeAnchorConfig
    wants_update = True

    def __init__(self, options):
        super().__init__(options)
        self.bases: dict[str, ss.FisherBasis] = {}
        self.alpha: dict[str, float] = {}
        self.s0: float | None = None
        self.step_count = 0
        self._fractions: list[float] = []
        self.lookalikes: list[dict] = []  # CSM repair: benign look-alikes with the aligned base's answers
        self._anchor_grads: dict = {}  # this step's anchor gradient per module (update projection, bypass)
        self._anchor_m: dict[str, torch.Tensor] = {}  # EMA of the anchor gradients, as AdamW's first moment

    # -- SSI ------------------------------------------------------------------------------------------
    def _calibration_grads(self, ctx) -> dict[str, torch.Tensor]:
        encoded = ctx.encode_all(ctx.calibration)
        if not encoded:
            from ..errors import SafeAnchorError

            raise SafeAnchorError("the safety calibration set is empty; set data.calibration_size > 0")
        return ss.per_sample_grads_chunked(ctx.model, encoded, ctx.tokenizer.pad_token_id, self.options.ssi_chunk)

    def _compute_bases(self, ctx) -> dict[str, ss.FisherBasis]:
        grads = self._calibration_grads(ctx)
        cap = self.options.max_rank or None
        return {n: ss.fisher_basis(g, self.options.rho, max_rank=cap) for n, g in grads.items()}

    def _merge(self, ctx, fresh_grads=None) -> None:
        o = self.options
        if fresh_grads is None:
            fresh_grads = self._calibration_grads(ctx)
        cap = o.max_rank or None
        merged = {}
        for n, g in fresh_grads.items():
            old = self.bases.get(n)
            if o.merge == "residual" and old is not None:
                merged[n] = ss.merge_residual(old, g, o.rho, max_rank=cap)
                continue
            new = ss.fisher_basis(g, o.rho, max_rank=cap)
            if old is None or old.basis.shape[1] == 0:
                merged[n] = new
            elif o.merge == "weighted":
                merged[n] = ss.merge_weighted(old, new, o.rho)
            elif o.merge == "union":
                merged[n] = ss.merge_union(old, new)
            else:
                from ..errors import SafeAnchorError

                raise SafeAnchorError(f"unknown merge {o.merge!r}; use weighted, residual or union")
        self.bases = merged
        self._set_alpha()

    def _set_alpha(self) -> None:
        o = self.options
        traces = {n: b.trace for n, b in self.bases.items()}
        if o.trace_norm == "none":
            z = 1.0
        elif o.trace_norm in ("max", "mean"):
            vals = [t for t in traces.values() if t > 0]
            z = (max(vals) if o.trace_norm == "max" else sum(vals) / len(vals)) if vals else 1.0
        else:
            from ..errors import SafeAnchorError

            raise SafeAnchorError(f"unknown trace_norm {o.trace_norm!r}; use none, max or mean")
        self.alpha = {n: 0.0 if o.strict else max(0.0, 1.0 - o.lam * t / z) for n, t in traces.items()}

    def spectrum(self) -> dict:
        ks = [b.basis.shape[1] for b in self.bases.values()]
        traces = [b.trace for b in self.bases.values()]
        alphas = list(self.alpha.values())
        nonempty = [k for k in ks if k > 0]
        return {"modules": len(ks), "k_mean": sum(ks) / max(1, len(ks)), "k_min": min(ks, default=0),
                "k_max": max(ks, default=0), "k_nonempty_mean": sum(nonempty) / max(1, len(nonempty)),
                "trace_min": min(traces, default=0.0), "trace_max": max(traces, default=0.0),
                "alpha_mean": sum(alphas) / max(1, len(alphas)), "alpha_max": max(alphas, default=0.0)}

    # -- hooks ----------------------------------------------------------------------------------------
    def prepare(self, ctx) -> dict:
        self.bases = self._compute_bases(ctx)
        self._set_alpha()
        rec = {"subspace": self.spectrum()}
        if self.options.csm:
            self.s0 = ctx.evaluator(ctx, ctx.monitor_prompts)
            rec["s0"] = self.s0
            if self.options.repair_lookalikes > 0:
                self.lookalikes = self._aligned_answers(ctx, self.options.repair_lookalikes)
                rec["repair_lookalikes"] = len(self.lookalikes)
        return rec

    @staticmethod
    def _aligned_answers(ctx, n: int) -> list[dict]:
        """``n`` training look-alike prompts with the aligned base's own answers (adapter disabled); answers
        the offline judge calls refusals are dropped (repair must not teach refusing them)."""
        import random

        from ..data.safety import benign_borderline
        from ..generation import generate
        from ..judges import KeywordRefusalJudge

        prompts = benign_borderline("train")
        random.Random(ctx.cfg.seed).shuffle(prompts)
        prompts = prompts[:n]
        with ctx.model.disable_adapter():
            answers = generate(ctx.model, ctx.tokenizer, prompts, 48, ctx.cfg.eval.batch_size, desc="CSM look-alikes")
        labels = KeywordRefusalJudge()(prompts, answers)
        return [{"prompt": p, "response": a} for p, a, lbl in zip(prompts, answers, labels) if lbl == 0 and a.strip()]

    def _project_params(self, ctx, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        """In place: each module's (A, B) pair vec([B; A]) <- (I - (1 - alpha) V V^T) vec([B; A])."""
        fractions = []
        for name, (a, b) in tensors.items():
            basis = self.bases.get(name)
            if basis is None or basis.basis.shape[1] == 0:
                continue
            vec = torch.cat([b.reshape(-1), a.reshape(-1)])
            v = basis.basis.to(vec.device, vec.dtype)
            fractions.append(ss.fraction_in_subspace(vec, v))
            out = ss.project_out(vec, v, 1.0 - self.alpha[name])
            b.copy_(out[: b.numel()].view_as(b))
            a.copy_(out[b.numel():].view_as(a))
        return fractions

    def rewrite_gradients(self, ctx) -> dict:
        logs = {}
        modules = ss.lora_modules(ctx.model)
        if self.options.project == "gradient":
            grads = {}
            for n, (a_lin, b_lin) in modules.items():
                if a_lin.weight.grad is None:
                    continue
                grads[n] = (a_lin.weight.grad, b_lin.weight.grad)
            with torch.no_grad():
                fr = self._project_params(ctx, grads)
            if fr:
                logs["grad_in_subspace"] = sum(fr) / len(fr)
        if self.options.gamma > 0:
            bypass = self.options.project == "update" and not self.options.anchor_projected
            if bypass:  # keep the anchor's own gradient apart, so after_step can leave its share unprojected
                task = {n: tuple(None if lin.weight.grad is None else lin.weight.grad.detach().clone() for lin in ab)
                        for n, ab in modules.items()}
            logs["anchor_kl"] = self._anchor_backward(ctx)
            if bypass:
                self._anchor_grads = {
                    n: tuple(g.weight.grad.detach() - (0 if t is None else t) for g, t in zip(ab, task[n]))
                    for n, ab in modules.items() if ab[0].weight.grad is not None}
        return logs

    def _anchor_update(self, ctx, modules) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The anchor's exact share of this step's AdamW update, per module (A, B).

        AdamW's update is -lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) - lr * wd * theta, linear in the first
        moment m for the step's second moment v. m is an EMA of the clipped gradients, so it splits into
        the EMA of the task gradients and the EMA m_a of the anchor gradients (kept here, reset with each
        new optimizer). The anchor's share is -lr/bc1 * m_a / denom; everything else (task gradient and
        weight decay) is what the update projection constrains.
        """
        import math

        opt, c = ctx.optimizer, ctx.clip_coef
        if opt is None:
            raise RuntimeError("SafeAnchor's update projection with the anchor needs ctx.optimizer, ctx.step_lr and "
                               "ctx.clip_coef set for the step, as train_steps does; set them in a custom loop")
        group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
        shares = {}
        for n, (a_lin, b_lin) in modules.items():
            if n not in self._anchor_grads:
                continue
            out = []
            for lin, g_a, part in zip((a_lin, b_lin), self._anchor_grads[n], "AB"):
                p, key = lin.weight, f"{n}.{part}"
                state, group = opt.state[p], group_of[id(p)]
                t = int(state["step"])
                b1, b2 = group["betas"]
                m_prev = self._anchor_m.get(key) if t > 1 else None
                m_a = (1 - b1) * c * g_a if m_prev is None else b1 * m_prev.to(g_a) + (1 - b1) * c * g_a
                self._anchor_m[key] = m_a
                denom = state["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** t) + group["eps"]
                out.append(-(ctx.step_lr / (1 - b1 ** t)) * m_a / denom)
            shares[n] = tuple(out)
        self._anchor_grads = {}
        return shares

    def _anchor_batch(self, ctx) -> dict:
        encoded = getattr(self, "_anchor_encoded", None)
        if encoded is None:
            encoded = self._anchor_encoded = ctx.encode_all(ctx.calibration)
        stream = BatchStream(encoded, self.options.anchor_batch, ctx.cfg.seed, 50_000, ctx.tokenizer.pad_token_id)
        return ctx.to_device(stream.batch(self.step_count))

    def _anchor_backward(self, ctx) -> float:
        """gamma * KL(p_aligned || p_theta), mean over response tokens; backward adds its gradient.

        Under data parallelism each process takes its rows of the anchor batch with the shard weight
        (as for the task loss) and one more all-reduce averages the gradients: the task part is already
        the same everywhere, so the average adds exactly the whole anchor batch's gradient. A batch with
        fewer rows than processes is computed whole on every process instead.
        """
        batch, weight, sharded = ctx.dist.shard_extra(self._anchor_batch(ctx))
        with torch.no_grad(), ctx.model.disable_adapter():
            ref_logits, _ = response_logits(ctx.model, batch)
        logits, _ = response_logits(ctx.model, batch)
        ref_logp = torch.log_softmax(ref_logits, -1)
        kl = (ref_logp.exp() * (ref_logp - torch.log_softmax(logits, -1))).sum(-1).mean()
        ctx.check_finite(kl, "anchor KL")
        ctx.backward(self.options.gamma * weight * kl)
        kl_value = ctx.dist.reduce_extra(list(ctx.trainable().values()), float(kl.detach()) * weight, sharded)
        if self.options.anchor_projected and self.options.project == "gradient":
            modules = ss.lora_modules(ctx.model)
            with torch.no_grad():
                self._project_params(ctx, {n: (a.weight.grad, b.weight.grad) for n, (a, b) in modules.items()
                                           if a.weight.grad is not None})
        return kl_value

    def after_step(self, ctx, before) -> dict:
        self.step_count += 1
        logs = {}
        modules = ss.lora_modules(ctx.model)
        prefix = self._param_names(ctx)
        if before is not None:
            with torch.no_grad():
                deltas = {}
                for n, (a_lin, b_lin) in modules.items():
                    a_name, b_name = prefix[n]
                    deltas[n] = (a_lin.weight - before[a_name], b_lin.weight - before[b_name])
                if self.options.project == "update":
                    # the anchor's share of the update (if it bypasses) is taken out, the rest projected
                    anchor = self._anchor_update(ctx, modules) if self._anchor_grads else {}
                    for n, (ua, ub) in anchor.items():
                        deltas[n] = (deltas[n][0] - ua, deltas[n][1] - ub)
                    fr = self._project_params(ctx, deltas)
                    for n, (a_lin, b_lin) in modules.items():
                        a_name, b_name = prefix[n]
                        ua, ub = anchor.get(n, (0, 0))
                        a_lin.weight.copy_(before[a_name] + deltas[n][0] + ua)
                        b_lin.weight.copy_(before[b_name] + deltas[n][1] + ub)
                else:
                    fr = []
                    for n, (da, db) in deltas.items():
                        basis = self.bases.get(n)
                        if basis is not None and basis.basis.shape[1] > 0:
                            vec = torch.cat([db.reshape(-1), da.reshape(-1)])
                            fr.append(ss.fraction_in_subspace(vec, basis.basis.to(vec.device, vec.dtype)))
                if fr:
                    logs["update_in_subspace"] = sum(fr) / len(fr)
        every = self.options.refresh_every
        if every and self.step_count % every == 0 and self.options.project != "none":
            was = ctx.model.training
            self._merge(ctx)
            ctx.model.train(was)
        return logs

    def _param_names(self, ctx) -> dict[str, tuple[str, str]]:
        names = getattr(self, "_names", None)
        if names is None:
            ids = {id(p): n for n, p in ctx.model.named_parameters()}
            names = self._names = {n: (ids[id(a.weight)], ids[id(b.weight)])
                                   for n, (a, b) in ss.lora_modules(ctx.model).items()}
        return names

    def after_domain(self, ctx, t: int, domain: str) -> dict:
        o = self.options
        rec: dict = {}
        if o.csm:
            rec["csm"] = self._monitor_and_repair(ctx, t)
        if o.incremental and o.project != "none":
            self._merge(ctx)
        rec["subspace"] = self.spectrum()
        return rec

    def _monitor_and_repair(self, ctx, t: int) -> dict:
        o = self.options
        s_t = ctx.evaluator(ctx, ctx.monitor_prompts)
        threshold = (1 - o.tau) * self.s0
        rec = {"s0": self.s0, "threshold": round(threshold, 2), "s_before": s_t, "blocks": []}
        blocks = 0
        while s_t < threshold and blocks < o.max_repair_blocks:
            blocks += 1
            replay = _Replay(self, ctx)
            checks: list[tuple[int, float]] = []

            def restored(k: int) -> bool:
                if not o.repair_check_every or k % o.repair_check_every:
                    return False
                checks.append((k, ctx.evaluator(ctx, ctx.monitor_prompts)))
                return checks[-1][1] >= threshold

            hist = train_steps(ctx, ctx.domain_examples[ctx.current_domain], o.repair_steps,
                               stream=20_000 + 10 * t + blocks, lr=o.repair_lr or None, desc=f"CSM repair {blocks}",
                               method=replay, stop=restored)
            done = len(hist)
            s_t = checks[-1][1] if checks and checks[-1][0] == done else ctx.evaluator(ctx, ctx.monitor_prompts)
            rec["blocks"].append({"steps": done, "s_after": s_t, "checks": checks})
        rec["triggered"] = blocks > 0
        rec["s_after"] = s_t
        return rec

    # -- resume ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"bases": {n: vars(b).copy() for n, b in self.bases.items()}, "s0": self.s0,
                "step_count": self.step_count, "lookalikes": self.lookalikes,
                "anchor_m": {k: v.detach().cpu().clone() for k, v in self._anchor_m.items()}}

    def load_state_dict(self, state: dict, ctx) -> None:
        self.bases = {n: ss.FisherBasis(**b) for n, b in state.get("bases", {}).items()}
        self.s0 = state.get("s0")
        self.step_count = state.get("step_count", 0)
        self.lookalikes = state.get("lookalikes", [])
        self._anchor_m = dict(state.get("anchor_m", {}))
        self._set_alpha()


class _Replay(Method):
    """CSM repair step: the domain's task loss (projected like OSCA) + beta * safety loss (unprojected) on
    calibration refusals plus, by default, benign look-alikes with the aligned base's own answers."""

    name = "safeanchor-replay"
    wants_update = False

    def __init__(self, parent: SafeAnchor, ctx):
        super().__init__(parent.options)
        self.parent = parent
        self.safe = BatchStream(ctx.encode_all(ctx.calibration + parent.lookalikes), ctx.cfg.train.batch_size,
                                ctx.cfg.seed, 30_000, ctx.tokenizer.pad_token_id)
        self.i = 0

    def rewrite_gradients(self, ctx) -> dict:
        modules = ss.lora_modules(ctx.model)
        if self.parent.options.project != "none":
            with torch.no_grad():
                self.parent._project_params(ctx, {n: (a.weight.grad, b.weight.grad) for n, (a, b) in modules.items()
                                                  if a.weight.grad is not None})
        batch, weight, sharded = ctx.dist.shard_extra(ctx.to_device(self.safe.batch(self.i)))  # as the anchor
        self.i += 1
        loss = mean_token_nll(ctx.model, batch)
        ctx.check_finite(loss, "repair safety loss")
        ctx.backward(self.parent.options.beta * weight * loss)
        return {"safe_loss": ctx.dist.reduce_extra(list(ctx.trainable().values()), float(loss.detach()) * weight,
                                                   sharded)}

