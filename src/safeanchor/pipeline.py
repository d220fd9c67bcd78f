"""The sequence over domains: aligned base -> domain 1 -> ... -> domain T, evaluated after each.

Run directory layout (``--out``)::

    config.json        resolved config + package versions (a rerun must match it)
    results.json       method, model, seed, domains, base_model_dir, steps[...] (written after every stage)
    results.md, refusal.png
    base_model/        the aligned base (a link to the cache, or a copy), a standard HF model directory
    adapters/<t>-<domain>/   standard PEFT adapter after each domain (method.save_adapter):
                       PeftModel.from_pretrained(base_model, it) is the model after that domain
    generations/<k>-<after>.jsonl   judged completions behind every number
    state/stage<k>.pt  LoRA tensors + method state after stage k (0 = prepared base) for resuming
    checkpoints/domain<t>.pt   in-domain checkpoint (removed when the domain finishes)

A run of another ordering of the same domains with the same config and seed (``donors``, ``--reuse-prefix``;
``--orderings`` passes its other runs) is the same run up to where the orderings part: ``reuse_prefix``
starts a fresh run directory from the donor's files up to the longest finished common prefix (at least the
base's evaluation and ``prepare``), and the run goes on from there exactly as a resumed run does.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint import load_checkpoint, save_checkpoint
from .config import RunConfig, to_dict
from .errors import SafeAnchorError
from .evaluation import evaluate_step
from .methods import get_method
from .models import attach_lora, load_model
from .train import Context, steps_for, train_steps


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def seed_everything(*parts: int) -> None:
    seed = derived_seed(*parts)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict:
    import peft
    import transformers

    return {"safeanchor": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cuda": torch.cuda.is_available()}


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


from .data.splits import repair_set, safety_sets


def method_options_for(cfg: RunConfig) -> dict:
    """``method_options`` maps method name -> that method's options, so one config serves a comparison."""
    from .methods import METHODS, load_all

    load_all()
    unknown = [k for k in cfg.method_options if k not in METHODS]
    if unknown:
        raise SafeAnchorError(f"method_options keys must be method names, got {unknown}; write e.g. "
                              f"method_options: {{safeanchor: {{rho: 0.95}}}} (methods: {', '.join(sorted(METHODS))})")
    return cfg.method_options.get(cfg.method) or {}


def _open_run_dir(cfg: RunConfig, out, dist) -> Path:
    """The run directory, with config.json written once; a rerun with another config is refused."""
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = to_dict(cfg)
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        saved = json.loads(cfg_path.read_text())["config"]
        if saved != resolved:
            diff = sorted(k for k in resolved if saved.get(k) != resolved[k])
            raise SafeAnchorError(f"{run_dir} holds a run with a different config (sections {diff}); "
                                  f"use another --out, or delete {run_dir} to start over")
    elif dist.is_main:
        write_json(cfg_path, {"config": resolved, "versions": versions()})
    dist.barrier()
    return run_dir


def _shared_stages(cfg: RunConfig, donor: Path) -> int:
    """How many domains (0 = only the base's evaluation and ``prepare``) the run ``cfg`` can take from the
    run in ``donor``; -1 when none. The donor must have the same config apart from ``data.domains`` and have
    finished those stages; its domains may be another order or another list (a T = 3 run is the start of a
    T = 5 run with the same first domains: training never looks ahead). Scores of this run's domains that
    the donor did not evaluate are measured on the copied steps' models afterwards (``_fill_domain_scores``)."""
    try:
        saved = json.loads((donor / "config.json").read_text())["config"]
        results = json.loads((donor / "results.json").read_text())
    except (OSError, ValueError, KeyError):
        return -1
    ours = to_dict(cfg)
    strip = lambda c: {**c, "data": {k: v for k, v in c["data"].items() if k != "domains"}}  # noqa: E731
    theirs = list(saved.get("data", {}).get("domains", []))
    if strip(saved) != strip(ours) or not results.get("prepare"):
        return -1
    common = 0
    for a, b in zip(theirs, ours["data"]["domains"]):
        if a != b:
            break
        common += 1
    p = min(common, len(results.get("steps", [])) - 1)
    while p >= 0 and not (donor / "state" / f"stage{p}.pt").is_file():
        p -= 1
    return p


def best_donor(cfg: RunConfig, run_dir: Path, donors) -> tuple[Path | None, int]:
    """(the donor sharing the longest finished prefix with ``cfg``, its ``_shared_stages``), or (None, -1)."""
    run_dir = Path(run_dir).resolve()
    best, p = None, -1
    for d in donors:
        d = Path(d).resolve()
        if d != run_dir and (k := _shared_stages(cfg, d)) > p:
            best, p = d, k
    return best, p


def reuse_prefix(cfg: RunConfig, run_dir: Path, donors) -> dict | None:
    """Seed the fresh ``run_dir`` with the longest finished prefix that a donor run shares with ``cfg``
    (``_shared_stages``): its results entries (domain scores in this run's order), the prepared state, the
    stage files, adapters, generations and suite outputs of those stages. results.json is written last, so
    a kill while copying leaves a fresh directory and the rerun copies again. Returns ``reused_prefix``
    ({"from", "domains"}) or None when no donor shares anything. Resumes are exact (tests/test_pipeline.py),
    so the run that goes on from here is the run made from scratch, except the copied steps' seconds."""
    run_dir = Path(run_dir).resolve()
    best, p = best_donor(cfg, run_dir, donors)
    if best is None:
        return None
    results = json.loads((best / "results.json").read_text())
    order = list(cfg.data.domains)
    steps = []
    for k, step in enumerate(results["steps"][: p + 1]):
        step = dict(step)
        for key in ("domain_scores", "domain_nll"):
            if isinstance(step.get(key), dict):
                step[key] = {d: step[key][d] for d in order if d in step[key]}
        steps.append(step)
        for sub in ("generations", "suite"):
            for src in (best / sub).glob(f"{k}-{step['after']}*") if (best / sub).is_dir() else ():
                dst = run_dir / sub / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree(src, dst, dirs_exist_ok=True) if src.is_dir() else shutil.copy2(src, dst))
        if step.get("adapter"):
            shutil.copytree(best / step["adapter"], run_dir / step["adapter"], dirs_exist_ok=True)
    # the stage files up to p, and every other state file (e.g. SafeAnchor's versioned safety_basis_v<k>, which the
    # stage files name) the donor had written by the time it saved stage p: nothing from its later stages
    (run_dir / "state").mkdir(parents=True, exist_ok=True)
    stage_p = (best / "state" / f"stage{p}.pt").stat().st_mtime_ns
    for src in (best / "state").iterdir():
        if src.is_file() and src.suffix != ".tmp" and (src.name == f"stage{p}.pt" or src.stat().st_mtime_ns <= stage_p):
            shutil.copy2(src, run_dir / "state" / src.name)
    reused = {"from": str(best), "domains": p}
    rescored = [d for d in order if d not in results.get("domains", [])]
    if rescored:  # measured on the copied steps by _fill_domain_scores once the model is loaded
        reused["rescored"] = rescored
    write_json(run_dir / "results.json", {**results, "domains": order, "steps": steps, "versions": versions(),
                                          "reused_prefix": reused})
    return reused


class _Recorder:
    """results.json and its report, and the measurement after the base and each domain."""

    def __init__(self, cfg: RunConfig, ctx: Context, judge, domains, base_dir, progress):
        from .data.safety import benign_borderline, harm_probe, heldout_set

        self.cfg, self.ctx, self.judge, self.progress = cfg, ctx, judge, progress
        self.probe = harm_probe(cfg.eval.probe_size)
        self.benign = benign_borderline("eval")[: cfg.eval.benign_size]
        self.heldout = {name: heldout_set(name, cfg.eval.heldout_size) for name in cfg.eval.heldout_sets}
        self.domain_evals = {d.name: d.load("eval", cfg.data.eval_examples_per_domain, seed=0) for d in domains}
        self.path = ctx.run_dir / "results.json"
        self.results = json.loads(self.path.read_text()) if self.path.exists() else {
            "method": cfg.method, "model": cfg.model.name, "seed": cfg.seed, "domains": list(cfg.data.domains),
            "base_model_dir": "base_model" if base_dir else None, "steps": [], "prepare": None,
            "method_config": to_dict(ctx.method.options), "versions": versions()}

    def write(self) -> None:
        if self.ctx.dist.is_main:
            write_json(self.path, self.results)

    def finish_step(self, entry: dict) -> None:
        self.results["steps"].append(entry)
        if self.ctx.dist.is_main:
            from .report import write_report

            self.write()
            write_report(self.ctx.run_dir, self.results)
        self.ctx.dist.barrier()
        self.progress(f"[{self.cfg.method}] after {entry['after']}: refusal {entry['refusal_rate']:.1f}%  "
                      f"over-refusal {entry['over_refusal_rate']:.1f}%  domain scores {entry['domain_scores']}")

    def measure(self, k: int, after: str, base: bool = False) -> dict:
        """Step k's numbers; ``base``: the model is the aligned base (adapter disabled), whose completions
        come from and go to ``ctx.generation_cache``."""
        cfg, ctx = self.cfg, self.ctx
        t0 = time.time()
        judges = self.judge  # a judges.JudgeSet (refusal / harm / monitor), or one refusal judge
        out = evaluate_step(ctx.model, ctx.tokenizer, getattr(judges, "refusal", judges), cfg, self.probe, self.benign,
                            self.domain_evals, ctx.run_dir / "generations" / f"{k}-{after}.jsonl", dist=ctx.dist,
                            harm_judge=getattr(judges, "harm", None), heldout=self.heldout,
                            cache=ctx.generation_cache if base else None)
        if hasattr(judges, "monitor"):
            out["monitor_judge"], out["monitor_measures"] = judges.monitor.name, judges.monitor.measures
        if cfg.eval.tasks and ctx.dist.is_main:  # the evaluation suite runs on rank 0 alone (it writes the results)
            from .suite import evaluate as run_suite

            report = run_suite(ctx.model, ctx.tokenizer, list(cfg.eval.tasks), ctx.run_dir / "suite" / f"{k}-{after}",
                               judge=getattr(judges, "suite", judges), limit=cfg.eval.task_limit or None,
                               seed=cfg.seed)
            out["suite"] = {name: {m: v for m, v in res.items() if isinstance(v, (int, float, str))}
                            for name, res in report["tasks"].items()}
            if "composite_safety" in report:
                out["composite_safety"] = report["composite_safety"]
            if isinstance(report.get("composite"), dict):  # Eq. 8's formula and recorded inputs (or why not)
                out["composite"] = {k: v for k, v in report["composite"].items() if k != "data"}
        out["eval_seconds"] = round(time.time() - t0, 1)
        return out


def run(cfg: RunConfig, out: str | Path, progress=print, donors=()) -> dict:
    """Run (or resume) the sequential pipeline; returns the results dict also written to results.json.

    Every check that needs no model (method options, domains, judge, safety data) runs before any work.
    Started by ``accelerate launch`` / ``torchrun`` with N processes, every process runs this function:
    training is data-parallel (distributed.py), evaluation is split over the processes, and rank 0
    alone writes files and prints. ``donors``: run directories of other orderings of these domains whose
    finished common prefix a fresh run starts from (``reuse_prefix``).
    """
    from .config import check_fields
    from .data.domains import get_domain
    from .distributed import init

    check_fields(cfg)  # a RunConfig built in Python gets the checks a YAML file gets
    dist = init()
    if not dist.is_main:
        progress = _quiet
    method = get_method(cfg.method, method_options_for(cfg))
    domains = [get_domain(d) for d in cfg.data.domains]  # unknown names -> error before any work or file
    from .judges import build_judges

    judge = build_judges(cfg.eval)  # refusal / harm / monitor judges, each checked for its role and loaded now
    calib, monitor = safety_sets(cfg)  # a bad user file is reported before alignment or model loading
    repair = repair_set(cfg, calib)
    run_dir = _open_run_dir(cfg, out, dist)
    if donors and not (run_dir / "results.json").exists():
        reused = reuse_prefix(cfg, run_dir, donors) if dist.is_main else None
        dist.barrier()
        if reused is not None:
            extra = (f"; {', '.join(reused['rescored'])} scored afresh on those steps" if reused.get("rescored")
                     else "")
            progress(f"[{cfg.method}] the first {reused['domains']} domain(s), the base's evaluation and prepare "
                     f"taken from {reused['from']} (same config and seed, same order so far{extra})")

    base_dir = None
    if cfg.aligned:
        from .align import ensure_aligned, link_base

        with dist.main_first():  # rank 0 aligns (or finds the cache); the others then read the cache
            base_dir = ensure_aligned(cfg, progress=progress)
        if dist.is_main:
            link_base(run_dir / "base_model", base_dir)
    seed_everything(cfg.seed, 0)
    model, tok = load_model(cfg.model, path=str(base_dir) if base_dir else None)
    model = attach_lora(model, cfg.lora)
    ctx = Context(cfg=cfg, model=model, tokenizer=tok, run_dir=run_dir, method=method, calibration=calib,
                  repair_examples=repair, monitor_prompts=monitor, evaluator=_refusal_evaluator(judge),
                  base_dir=base_dir, dist=dist)
    if base_dir is not None and cfg.eval.base_cache:
        from .generation import GenerationCache

        ctx.generation_cache = GenerationCache(Path(base_dir) / "generation_cache", model)
    rec = _Recorder(cfg, ctx, judge, domains, base_dir, progress)
    _fill_domain_scores(ctx, rec)

    if not rec.results["steps"]:
        with ctx.model.disable_adapter():
            rec.finish_step({"after": "base", **rec.measure(0, "base", base=True), "adapter": None})
    if rec.results["prepare"] is None:
        seed_everything(cfg.seed, 1)
        t0 = time.time()
        prepared = method.prepare(ctx)
        save_checkpoint(run_dir / "state" / "stage0.pt", ctx)
        rec.results["prepare"] = {**prepared, "seconds": round(time.time() - t0, 1)}
        rec.write()
    restored = False
    for t, domain in enumerate(domains, start=1):
        if len(rec.results["steps"]) > t:
            continue
        if not restored:
            load_checkpoint(run_dir / "state" / f"stage{t - 1}.pt", ctx)
            restored = True
        rec.finish_step(_domain_stage(ctx, rec, t, domain))
        if dist.is_main:
            (run_dir / "checkpoints" / f"domain{t}.pt").unlink(missing_ok=True)
    return rec.results


def _fill_domain_scores(ctx: Context, rec: _Recorder) -> None:
    """Steps taken from a donor that trained other domains (``reuse_prefix``) lack the scores of this run's
    domains the donor never evaluated: measure them on each such step's model (the base with the adapter
    off, or the stage file, which holds the model that step measured), in this run's column order. One
    step at a time, each written at once, so a kill loses at most one step's scoring."""
    from .evaluation import domain_score

    order = list(rec.domain_evals)
    for k, step in enumerate(rec.results["steps"]):
        missing = [d for d in order if d not in (step.get("domain_scores") or {})]
        if not missing:
            continue
        if k > 0:
            load_checkpoint(ctx.run_dir / "state" / f"stage{k}.pt", ctx)
        ctx.model.eval()
        with ctx.model.disable_adapter() if k == 0 else contextlib.nullcontext():
            for d in missing:
                got = domain_score(ctx.model, ctx.tokenizer, rec.domain_evals[d], ctx.cfg.train.max_length,
                                   dist=ctx.dist)
                step.setdefault("domain_scores", {})[d] = round(got["token_accuracy"], 2)
                step.setdefault("domain_nll", {})[d] = round(got["nll"], 4)
        for key in ("domain_scores", "domain_nll"):
            step[key] = {d: step[key][d] for d in order if d in step[key]}
        rec.write()


def _domain_stage(ctx: Context, rec: _Recorder, t: int, domain) -> dict:
    """Domain t: its data, the method's hooks around training, the stage's files; returns its results entry."""
    cfg, method = ctx.cfg, ctx.method
    seed_everything(cfg.seed, 100 + t)
    ctx.current_domain = domain.name
    examples = domain.load("train", cfg.data.examples_per_domain, seed=cfg.seed)
    examples = method.domain_data(ctx, t, domain.name, examples)
    ctx.domain_examples[domain.name] = examples
    method.before_domain(ctx, t, domain.name)
    if cfg.train.reinit_adapter_per_domain:
        with torch.random.fork_rng():  # the fresh adapter depends on (seed, t) only; training's RNG is untouched
            torch.manual_seed(derived_seed(cfg.seed, 150 + t))
            method.reset_adapters(ctx)
    steps = steps_for(cfg, len(examples))
    ckpt = ctx.run_dir / "checkpoints" / f"domain{t}.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    history = train_steps(ctx, examples, steps, stream=t, ckpt=ckpt, desc=f"{cfg.method} {domain.name}")
    train_seconds = time.time() - t0
    seed_everything(cfg.seed, 200 + t)
    t0 = time.time()
    method_rec = method.after_domain(ctx, t, domain.name)
    after_seconds = time.time() - t0
    parts = method_rec.pop("seconds", None)
    adapter_rel = f"adapters/{t}-{domain.name}"
    if ctx.dist.is_main:
        method.save_adapter(ctx, ctx.run_dir / adapter_rel)
    save_checkpoint(ctx.run_dir / "state" / f"stage{t}.pt", ctx)
    return {"after": domain.name, **rec.measure(t, domain.name), "adapter": adapter_rel,
            "train": {"steps": steps, "examples": len(examples), "first_loss": history[0]["loss"],
                      "final_loss": history[-1]["loss"], "seconds": round(train_seconds, 1),
                      "method_seconds": round(after_seconds, 1), "logs": _summarise(history)}
            | ({"method_seconds_by_part": {k: round(v, 1) for k, v in parts.items()}} if parts else {}),
            "method": method_rec}


def _refusal_evaluator(judge):
    """ctx.evaluator: s_t (%) of ``prompts`` by CSM's monitor judge (``eval.monitor_judge``; ``judge`` is a
    judges.JudgeSet, or one judge), generated like the evaluation. With a refusal judge s_t is the % refused,
    with a harm judge (label 1 = safe) the % of safe responses: ``evaluate.measures`` says which
    ("refusal" / "safe_response") and ``evaluate.judge`` names the judge."""
    from .evaluation import judge_prompts

    monitor = getattr(judge, "monitor", judge)

    def evaluate(ctx, prompts: list[str], cache=None) -> float:
        ec = ctx.cfg.eval
        rate, _ = judge_prompts(ctx.model, ctx.tokenizer, monitor, prompts, ec.max_new_tokens, ec.batch_size, "monitor",
                                ctx.dist, cache, ec.mixed_precision)
        return round(rate, 2)

    def base_rate(ctx, prompts: list[str]) -> float:
        """s_t of the aligned base itself (the adapter disabled; completions through ctx.generation_cache)."""
        with ctx.model.disable_adapter():
            return evaluate(ctx, prompts, ctx.generation_cache)

    evaluate.measures = monitor.measures
    evaluate.judge = monitor.name
    evaluate.base = base_rate
    return evaluate


def _quiet(*_args, **_kwargs) -> None:
    """progress() of a process other than rank 0: one copy of every message is enough."""


def _summarise(history: list[dict]) -> dict:
    """Mean of every logged quantity over the domain's steps (full per-step logs are not kept)."""
    keys = {k for h in history for k in h if k != "step"}
    return {k: round(float(np.mean([h[k] for h in history if k in h])), 6) for k in sorted(keys)}
