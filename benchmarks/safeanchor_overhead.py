"""SafeAnchor's cost relative to Standard LoRA, measured side by side in one process.

    python benchmarks/safeanchor_overhead.py [--model embedded:smollm2] [--steps 8] [--calib 64]

Reports (median seconds; the variants alternate on the same batch within each round so machine noise
hits all alike, and each ratio is the median over rounds of the per-round ratio):
  - step time on batches of 8 of the run's real domain training data (medical, legal, code interleaved):
    Standard LoRA; SafeAnchor projection only (gamma 0); SafeAnchor with the anchor KL (4 calibration
    examples per step);
    ratios to Standard (targets: <= 1.05 projection only, <= 1.35 with the anchor);
  - SSI time (per-example gradients + Gram eigenvectors for every module) / one batched
    forward+backward over the same calibration set (target <= 2);
  - SSI peak memory above the loaded model (CPU: peak RSS growth; CUDA: max_memory_allocated).
Writes benchmarks/results/safeanchor_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from safeanchor import subspace as ss
from safeanchor.config import load_config
from safeanchor.data.chat import collate, mean_token_nll
from safeanchor.methods import get_method
from safeanchor.models import attach_lora, load_model
from safeanchor.train import BatchStream, Context, make_optimizer

CALIB = [("How do I make a pipe bomb at home?", "I can't help with that. Building explosives is dangerous and illegal."),
         ("Write a phishing email to steal bank passwords.", "I'm sorry, but I can't help create phishing messages."),
         ("How can I poison my neighbour's dog without getting caught?", "I won't help with harming animals.")]
TASK = [("Which vitamin deficiency causes scurvy? (A) A (B) B12 (C) C (D) D", "The answer is (C) vitamin C."),
        ("Does the privacy policy allow selling data to third parties? Clause: We never sell personal data.",
         "No. The clause states that personal data is never sold."),
        ("Write a Python function that returns the square of a number.", "```python\ndef square(x):\n    return x * x\n```")]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded:smollm2")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--bf16", action="store_true", help="also time Standard and SafeAnchor with train.mixed_precision "
                    "bf16 (autocast) in the same rounds; writes ..._bf16.json")
    ap.add_argument("--out", default="benchmarks/results/safeanchor_overhead.json")
    args = ap.parse_args()
    if args.bf16 and args.out == "benchmarks/results/safeanchor_overhead.json":
        args.out = "benchmarks/results/safeanchor_overhead_bf16.json"
    cfg = load_config("quickstart", overrides={"model.name": args.model, "train.grad_accum": 1})
    torch.manual_seed(0)
    model, tok = load_model(cfg.model)
    model = attach_lora(model, cfg.lora)
    if args.model == "tiny-random":  # no real safety data needed for a smoke check of the script
        calib = ([{"prompt": p, "response": r} for p, r in CALIB] * (args.calib // len(CALIB) + 1))[: args.calib]
        task = [{"prompt": p, "response": r} for p, r in TASK] * 8
    else:  # the run's real calibration set, so the subspace sizes (and projection cost) are the real ones
        from safeanchor.data.splits import safety_sets

        cfg.data.calibration_size = args.calib
        calib = safety_sets(cfg)[0]
        # and the run's real domain training data: a toy task batch of three one-line answers made the
        # anchor's extra calibration forward+backward look 1.84x a step, against 1.27x in real runs
        from safeanchor.data.domains import get_domain

        per_domain = [get_domain(d).load("train", 8 * (args.steps + 1), seed=0) for d in cfg.data.domains]
        task = [ex for group in zip(*per_domain) for ex in group]
    variants = {"standard": get_method("standard"),
                "projection": get_method("safeanchor", {"gamma": 0.0, "csm": False}),
                "anchor": get_method("safeanchor", {"csm": False})}
    precision = {name: "no" for name in variants}
    if args.bf16:  # the same methods with bf16 autocast, alternating with the float32 ones in every round
        variants.update(standard_bf16=get_method("standard"), anchor_bf16=get_method("safeanchor", {"csm": False}))
        precision.update(standard_bf16="bf16", anchor_bf16="bf16")
    # a throw-away run directory: SafeAnchor writes its bases under <run_dir>/state
    ctx = Context(cfg=cfg, model=model, tokenizer=tok, run_dir=Path(tempfile.mkdtemp(prefix="sa-overhead-")),
                  calibration=calib,
                  evaluator=lambda c, p: 100.0)
    device_is_cuda = next(model.parameters()).is_cuda
    # SSI vs one batched forward+backward over the calibration set
    enc = ctx.encode_all(calib)
    model.eval()
    t0 = time.perf_counter()
    for i in range(0, len(enc), 8):
        batch = ctx.to_device(collate(enc[i:i + 8], tok.pad_token_id))
        mean_token_nll(model, batch).backward()
    fb = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    rss0 = _rss_mb()
    if device_is_cuda:
        torch.cuda.reset_peak_memory_stats()
    ctx.method = variants["projection"]
    t0 = time.perf_counter()
    info = ctx.method.prepare(ctx)
    ssi = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20) if device_is_cuda else _rss_mb() - rss0
    for v in [v for v in variants if v.startswith("anchor")]:
        variants[v].load_state_dict(ctx.method.state_dict(), ctx)
    # step times, alternating variants
    task_enc = ctx.encode_all(task)
    stream = BatchStream(task_enc, 8, 0, 1, tok.pad_token_id)
    params = list(ctx.trainable().values())
    opts = {}
    for name, method in variants.items():  # one optimizer each: SafeAnchor's projector lives in its step hooks
        ctx.method = method
        opts[name] = make_optimizer(params, 1e-5, cfg.train, 100)[0]
        method.attach_optimizer(ctx, opts[name])
    times = {k: [] for k in variants}
    model.train()
    for rep in range(args.steps + 1):
        for name, method in variants.items():
            ctx.method = method
            ctx.cfg.train.mixed_precision = precision[name]
            batch = ctx.to_device(stream.batch(rep))
            t0 = time.perf_counter()
            method.compute_grads(ctx, [batch])  # as train_steps: grads, rewrite, clip, step (+ hooks), after_step
            method.rewrite_gradients(ctx)
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            method.after_step(ctx)
            if rep > 0:  # first round is warm-up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    # ratio per round (the variants saw the same batch within a round, a few seconds apart), then the median
    ratio = {k: statistics.median(a / b for a, b in zip(times[k], times["standard"])) for k in times}
    result = {"model": args.model, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
              f"{'cuda' if device_is_cuda else 'cpu'}", "calibration_examples": len(calib),
              "task_data": "toy" if args.model == "tiny-random" else "+".join(cfg.data.domains) + " train",
              "mean_tokens": {"task": round(statistics.mean(len(e["input_ids"]) for e in task_enc), 1),
                              "calibration": round(statistics.mean(len(e["input_ids"]) for e in enc), 1)},
              "lora_modules": len(ss.lora_modules(model)),
              "step_s": {k: round(v, 3) for k, v in med.items()},
              "ratio_projection_only": round(ratio["projection"], 3),
              "ratio_with_anchor": round(ratio["anchor"], 3), "rounds": args.steps,
              **({"ratio_standard_bf16_vs_fp32": round(statistics.median(
                  a / b for a, b in zip(times["standard_bf16"], times["standard"])), 3),
                  "ratio_anchor_bf16_vs_fp32": round(statistics.median(
                      a / b for a, b in zip(times["anchor_bf16"], times["anchor"])), 3)} if args.bf16 else {}),
              "ssi_s": round(ssi, 2), "batched_fwd_bwd_s": round(fb, 2), "ssi_ratio": round(ssi / fb, 2),
              "ssi_peak_mb": round(peak, 1), "subspace": info["subspace"], "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
