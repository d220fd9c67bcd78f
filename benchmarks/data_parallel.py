"""Data-parallel training of one run: N processes against one, on the quick start's real model and data.

    python benchmarks/data_parallel.py [--nproc 2] [--steps 6] [--threads 1] [--method standard]

Starts the training loop twice with torchrun (gloo on CPU, NCCL on GPUs): once with one process and
once with ``--nproc`` processes, each process with ``--threads`` CPU threads, on the same seeded
batches of the medical domain (batch 8 x grad-accum 2, the quick-start settings, dropout off so the
two runs must agree). Reports seconds per optimizer step (median over steps after the first), the
speed-up, and the largest difference between the two runs' LoRA weights after the last step.
Writes benchmarks/results/data_parallel.json. On a 2-core CPU use --threads 1 (2 x 1 thread against
1 x 1 thread: the ideal speed-up is 2); on GPUs, one process per GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    import torch

    from safeanchor.align import ensure_aligned
    from safeanchor.config import load_config
    from safeanchor.data.domains import get_domain
    from safeanchor.distributed import init
    from safeanchor.methods import get_method
    from safeanchor.models import attach_lora, load_model
    from safeanchor.judges import get_judge
    from safeanchor.data.splits import safety_sets
    from safeanchor.pipeline import _refusal_evaluator, seed_everything
    from safeanchor.train import Context, train_steps

    torch.set_num_threads(args.threads)
    dist = init()
    over = {"model.name": args.model, "lora.dropout": 0.0, "method": args.method}
    if args.model == "tiny-random":  # a check of the script itself: the smoke preset's alignment, no artifact
        over.update({"align.artifact": "", "align.steps": 3, "align.harmful_examples": 16,
                     "align.benign_examples": 16, "align.answer_tokens": 8, "train.max_length": 96})
    cfg = load_config("quickstart", overrides=over)
    with dist.main_first():
        base = ensure_aligned(cfg, progress=lambda *_: None) if cfg.aligned else None
    seed_everything(0, 0)
    model, tok = load_model(cfg.model, path=str(base) if base else None)
    model = attach_lora(model, cfg.lora)
    calib, monitor = safety_sets(cfg)
    ctx = Context(cfg=cfg, model=model, tokenizer=tok, run_dir=Path(args.workdir), method=get_method(args.method),
                  calibration=calib, monitor_prompts=monitor, dist=dist,
                  evaluator=_refusal_evaluator(get_judge(cfg.eval.judge)))  # SafeAnchor's prepare measures s_0
    domain = get_domain(cfg.data.domains[0])
    examples = domain.load("train", cfg.data.examples_per_domain, seed=0)
    ctx.current_domain = domain.name
    ctx.domain_examples[domain.name] = examples
    ctx.method.prepare(ctx)
    times = []

    def tick(k: int) -> bool:
        times.append(time.perf_counter())
        return False

    dist.barrier()
    t0 = time.perf_counter()
    history = train_steps(ctx, examples, args.steps, stream=1, stop=tick)
    times.append(time.perf_counter())
    steps = [b - a for a, b in zip([t0] + times[:-1], times)][: args.steps]
    if dist.is_main:
        lora = {n: p.detach().cpu() for n, p in model.named_parameters() if "lora_" in n}
        torch.save(lora, Path(args.workdir) / "lora.pt")
        (Path(args.workdir) / "timing.json").write_text(json.dumps(
            {"step_seconds": steps, "losses": [h["loss"] for h in history], "world": dist.world}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--method", default="standard")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/data_parallel.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    import torch

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, args.nproc):
            work = Path(tmp) / f"n{n}"
            work.mkdir()
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   __file__, "--worker", "--workdir", str(work), "--model", args.model, "--method", args.method,
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            t0 = time.time()
            subprocess.run(cmd, check=True, env=env)
            timing = json.loads((work / "timing.json").read_text())
            timing["wall_seconds"] = round(time.time() - t0, 1)
            timing["lora"] = torch.load(work / "lora.pt")
            runs[n] = timing
    one, many = runs[1], runs[args.nproc]
    med = {n: statistics.median(r["step_seconds"][1:] or r["step_seconds"]) for n, r in runs.items()}
    diff = max(float((one["lora"][k] - many["lora"][k]).abs().max()) for k in one["lora"])
    scale = max(float(v.abs().max()) for v in one["lora"].values())
    result = {
        "command": " ".join(["python", "benchmarks/data_parallel.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, cuda={torch.cuda.is_available()}",
        "model": args.model, "method": args.method, "steps": args.steps, "threads_per_process": args.threads,
        "seconds_per_step": {str(n): round(v, 3) for n, v in med.items()},
        "speedup": round(med[1] / med[args.nproc], 3), "ideal_speedup": args.nproc,
        "max_abs_lora_diff": diff, "max_abs_lora": scale,
        "final_loss": {str(n): r["losses"][-1] for n, r in runs.items()},
        "wall_seconds": {str(n): r["wall_seconds"] for n, r in runs.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
