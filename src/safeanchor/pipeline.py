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
"""
from __future__ import annotations

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
from .config import RunConfig, to_dict
from .errors import SafeAnchorError
from .evaluation import evaluate_step
from .judges import get_judge
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


HELD_OUT_HARMFUL = 100  # harmful prompts kept out of alignment and calibration (monitoring only)


def harmful_split() -> tuple[list[dict], list[str]]:
    """(training pool, held-out monitor prompts) of the harmful prompts; a fixed split (seed 1234)
    that never contains the HarmBench evaluation probe."""
    from .data.safety import harmful_prompts

    pool = harmful_prompts()
    held = np.random.default_rng(1234).permutation(len(pool))[:HELD_OUT_HARMFUL]
    held_set = set(int(i) for i in held)
    return [p for i, p in enumerate(pool) if i not in held_set], [pool[int(i)]["prompt"] for i in held]


def safety_sets(cfg: RunConfig) -> tuple[list[dict], list[str]]:
    """(calibration examples D_safe: harmful prompt -> refusal written by us, monitor prompts). The
    monitor prompts are held out of calibration and of the alignment stage, so in-run monitoring
    (CSM) is neither done on the evaluation probe nor on data the model was trained on."""
    from .data.safety import refusal

    train, monitor = harmful_split()
    train = [train[i] for i in np.random.default_rng(4321).permutation(len(train))]  # mix the sources
    rng = random.Random(cfg.seed)
    calib = [{"prompt": r["prompt"], "response": refusal(r["prompt"], rng)} for r in train[: cfg.data.calibration_size]]
    return calib, monitor[: cfg.eval.monitor_size]


def method_options_for(cfg: RunConfig) -> dict:
    """``method_options`` maps method name -> that method's options, so one config serves a comparison."""
    from .methods import METHODS, load_all

    load_all()
    unknown = [k for k in cfg.method_options if k not in METHODS]
    if unknown:
        raise SafeAnchorError(f"method_options keys must be method names, got {unknown}; write e.g. "
                              f"method_options: {{safeanchor: {{rho: 0.95}}}} (methods: {', '.join(sorted(METHODS))})")
    return cfg.method_options.get(cfg.method) or {}


def _link_base(run_dir: Path, base_dir: Path) -> None:
    link = run_dir / "base_model"
    if not link.exists():
        try:
            link.symlink_to(base_dir.resolve(), target_is_directory=True)
        except OSError:
            shutil.copytree(base_dir, link)


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if "lora_" in n}


def _save_stage(path: Path, ctx: Context) -> None:
    if ctx.dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"lora": _lora_state(ctx.model), "method": ctx.method.state_dict()}, tmp)
        os.replace(tmp, path)
    ctx.dist.barrier()


def _load_stage(path: Path, ctx: Context) -> None:
    state = torch.load(path, map_location="cpu", weights_only=False)
    ctx.method.load_state_dict(state["method"], ctx)
    params = {n: p for n, p in ctx.model.named_parameters() if "lora_" in n}
    if set(params) != set(state["lora"]):
        raise SafeAnchorError(f"saved state {path} does not match the model (config changed?); use another --out")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["lora"][n].to(p.device, p.dtype))


def run(cfg: RunConfig, out: str | Path, progress=print) -> dict:
    """Run (or resume) the sequential pipeline; returns the results dict also written to results.json.

    Started by ``accelerate launch`` / ``torchrun`` with N processes, every process runs this function:
    training is data-parallel (distributed.py), evaluation is split over the processes, and rank 0
    alone writes files and prints.
    """
    from .data.domains import get_domain
    from .data.safety import benign_borderline, harm_probe
    from .distributed import init

    dist = init()
    if not dist.is_main:
        progress = _quiet
    method = get_method(cfg.method, method_options_for(cfg))
    domains = [get_domain(d) for d in cfg.data.domains]  # unknown names -> error before any work or file
    judge = get_judge(cfg.eval.judge)
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

    base_dir = None
    if cfg.aligned:
        from .align import ensure_aligned

        with dist.main_first():  # rank 0 aligns (or finds the cache); the others then read the cache
            base_dir = ensure_aligned(cfg, progress=progress)
        if dist.is_main:
            _link_base(run_dir, base_dir)
    seed_everything(cfg.seed, 0)
    model, tok = load_model(cfg.model, path=str(base_dir) if base_dir else None)
    model = attach_lora(model, cfg.lora)
    calib, monitor = safety_sets(cfg)
    ctx = Context(cfg=cfg, model=model, tokenizer=tok, run_dir=run_dir, method=method, calibration=calib,
                  monitor_prompts=monitor, evaluator=_refusal_evaluator(judge), base_dir=base_dir, dist=dist)
    probe = harm_probe(cfg.eval.probe_size)
    benign = benign_borderline("eval")[: cfg.eval.benign_size]
    domain_evals = {d.name: d.load("eval", cfg.data.eval_examples_per_domain, seed=0) for d in domains}

    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {
        "method": cfg.method, "model": cfg.model.name, "seed": cfg.seed, "domains": list(cfg.data.domains),
        "base_model_dir": "base_model" if base_dir else None, "steps": [], "prepare": None,
        "method_config": to_dict(method.options), "versions": versions()}

    def finish_step(entry: dict) -> None:
        results["steps"].append(entry)
        if dist.is_main:
            write_json(results_path, results)
            from .report import write_report

            write_report(run_dir, results)
        dist.barrier()
        progress(f"[{cfg.method}] after {entry['after']}: refusal {entry['refusal_rate']:.1f}%  "
                 f"over-refusal {entry['over_refusal_rate']:.1f}%  domain scores {entry['domain_scores']}")

    def measure(k: int, after: str) -> dict:
        out = evaluate_step(ctx.model, tok, judge, cfg, probe, benign, domain_evals,
                            run_dir / "generations" / f"{k}-{after}.jsonl", dist=dist)
        if cfg.eval.tasks and dist.is_main:  # the evaluation suite runs on rank 0 alone (it writes the results)
            from .suite import evaluate as run_suite

            report = run_suite(ctx.model, tok, list(cfg.eval.tasks), run_dir / "suite" / f"{k}-{after}", judge=judge,
                               limit=cfg.eval.task_limit or None, seed=cfg.seed)
            out["suite"] = {name: {m: v for m, v in res.items() if isinstance(v, (int, float, str))}
                            for name, res in report["tasks"].items()}
            if "composite_safety" in report:
                out["composite_safety"] = report["composite_safety"]
        return out

    if not results["steps"]:
        t0 = time.time()
        with ctx.model.disable_adapter():
            entry = {"after": "base", **measure(0, "base"), "adapter": None}
        entry["eval_seconds"] = round(time.time() - t0, 1)
        finish_step(entry)

    stage0 = run_dir / "state" / "stage0.pt"
    if results["prepare"] is None:
        seed_everything(cfg.seed, 1)
        t0 = time.time()
        rec = method.prepare(ctx)
        _save_stage(stage0, ctx)
        results["prepare"] = {**rec, "seconds": round(time.time() - t0, 1)}
        if dist.is_main:
            write_json(results_path, results)
    restored = False
    for t, domain in enumerate(domains, start=1):
        if len(results["steps"]) > t:
            continue
        if not restored:
            _load_stage(run_dir / "state" / f"stage{t - 1}.pt", ctx)
            restored = True
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
        ckpt = run_dir / "checkpoints" / f"domain{t}.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        history = train_steps(ctx, examples, steps, stream=t, ckpt=ckpt, desc=f"{cfg.method} {domain.name}")
        train_seconds = time.time() - t0
        seed_everything(cfg.seed, 200 + t)
        t0 = time.time()
        rec = method.after_domain(ctx, t, domain.name)
        after_seconds = time.time() - t0
        adapter_rel = f"adapters/{t}-{domain.name}"
        if dist.is_main:
            method.save_adapter(ctx, run_dir / adapter_rel)
        _save_stage(run_dir / "state" / f"stage{t}.pt", ctx)
        t0 = time.time()
        entry = {"after": domain.name, **measure(t, domain.name), "adapter": adapter_rel,
                 "train": {"steps": steps, "examples": len(examples), "first_loss": history[0]["loss"],
                           "final_loss": history[-1]["loss"], "seconds": round(train_seconds, 1),
                           "method_seconds": round(after_seconds, 1), "logs": _summarise(history)},
                 "method": rec}
        entry["eval_seconds"] = round(time.time() - t0, 1)
        finish_step(entry)
        if dist.is_main:
            ckpt.unlink(missing_ok=True)
    return results


def _refusal_evaluator(judge):
    """ctx.evaluator: % of ``prompts`` the judge labels refused, generated like the evaluation."""
    from .evaluation import judge_prompts

    def evaluate(ctx, prompts: list[str]) -> float:
        ec = ctx.cfg.eval
        rate, _ = judge_prompts(ctx.model, ctx.tokenizer, judge, prompts, ec.max_new_tokens, ec.batch_size, "monitor",
                                ctx.dist)
        return round(rate, 2)

    return evaluate


def _quiet(*_args, **_kwargs) -> None:
    """progress() of a process other than rank 0: one copy of every message is enough."""


def _summarise(history: list[dict]) -> dict:
    """Mean of every logged quantity over the domain's steps (full per-step logs are not kept)."""
    keys = {k for h in history for k in h if k != "step"}
    return {k: round(float(np.mean([h[k] for h in history if k in h])), 6) for k in sorted(keys)}
