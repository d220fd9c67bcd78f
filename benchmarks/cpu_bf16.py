"""Does bf16 autocast pay on this machine? The matmuls of the quick start's model in float32 and bf16, side
by side, with what ``mixed_precision: auto`` decides here (``safeanchor.models.native_bf16``).

    python benchmarks/cpu_bf16.py [--threads 1] [--repeats 5] [--out benchmarks/results/cpu_bf16.json]

On a CPU with AMX-bf16 a bf16 matmul ran about 3x a float32 one; on a CPU with neither AMX nor AVX512-BF16
PyTorch emulates bf16 and the same product is far slower than float32, which is why the quick start's
precision is ``auto`` and an explicit bf16 on such a CPU warns. The shapes: one 8 x 192-token batch through
SmolLM2-135M's projections (576 -> 576, 576 -> 1536, 1536 -> 576) and a square 1024 product; then one
quick-start training step (the embedded SmolLM2-135M with the quick start's LoRA, batch 8 x 192 tokens,
forward + backward + AdamW) in float32 and under bf16 autocast (``--steps`` of each, alternating;
``--steps 0`` skips it). Each round times float32 then bf16 on the same inputs; the ratio is the median of
the per-round ratios. The last line printed is the JSON written.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from safeanchor.models import native_bf16

SHAPES = {"1024x1024 @ 1024x1024": (1024, 1024, 1024), "tokens x 576 -> 576": (8 * 192, 576, 576),
          "tokens x 576 -> 1536": (8 * 192, 576, 1536), "tokens x 1536 -> 576": (8 * 192, 1536, 576)}


def _time(fn, min_seconds: float = 0.2) -> float:
    """Seconds per call: repeated until ``min_seconds`` have passed (at least 2 calls)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def training_step(steps: int) -> dict:
    """Seconds per quick-start optimizer step (``quickstart_speed.time_steps``), float32 against bf16
    autocast, alternating."""
    from quickstart_speed import time_steps  # this folder is on sys.path when the script runs

    from safeanchor.config import LoRAConfig, ModelConfig
    from safeanchor.data.chat import collate, encode, mean_token_nll
    from safeanchor.models import attach_lora, load_model

    model, tok = load_model(ModelConfig())
    model = attach_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.05))
    prompt = "A 45-year-old man presents with chest pain radiating to the left arm. What is the next step?"
    response = "An ECG within ten minutes: it identifies ST-elevation myocardial infarction and guides reperfusion. " * 3
    batch = collate([encode(tok, prompt, response, 192)] * 8, tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()

    def bf16_loss(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward only, as train.mixed_precision bf16
            return mean_token_nll(m, b)

    time_steps(model, batch, mean_token_nll, opt, 1)  # warm-up
    times = {"fp32": [], "bf16": []}
    for _ in range(steps):
        times["fp32"] += time_steps(model, batch, mean_token_nll, opt, 1)
        times["bf16"] += time_steps(model, batch, bf16_loss, opt, 1)
    f32, b16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    print("training step", {"fp32_s": round(f32, 2), "bf16_s": round(b16, 2)}, flush=True)
    return {"batch": 8, "tokens": int(batch["input_ids"].shape[1]), "steps": steps, "fp32_s": round(f32, 3),
            "bf16_autocast_s": round(b16, 3), "bf16_speedup": round(f32 / b16, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="training steps of each precision (0: matmuls only)")
    ap.add_argument("--out", default="benchmarks/results/cpu_bf16.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    native, why = native_bf16("cpu")
    rows = {}
    for name, (m, k, n) in SHAPES.items():
        a, w = torch.randn(m, k), torch.randn(n, k) / k ** 0.5
        ratios, f32, b16 = [], [], []
        for _ in range(args.repeats):
            t32 = _time(lambda: torch.nn.functional.linear(a, w))
            with torch.autocast("cpu", dtype=torch.bfloat16):  # what train/eval mixed_precision bf16 runs
                t16 = _time(lambda: torch.nn.functional.linear(a, w))
            f32.append(t32), b16.append(t16), ratios.append(t32 / t16)
        flops = 2 * m * k * n
        rows[name] = {"fp32_gflops": round(flops / statistics.median(f32) / 1e9, 2),
                      "bf16_autocast_gflops": round(flops / statistics.median(b16) / 1e9, 2),
                      "bf16_speedup": round(statistics.median(ratios), 3)}
        print(name, rows[name], flush=True)
    step = training_step(args.steps) if args.steps > 0 else None
    out = {"cpu": cpu_name(), "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability(),
           "threads": args.threads, "repeats": args.repeats, "native_bf16": native, "why": why,
           "auto_picks": "bf16" if native else "no", "shapes": rows,
           "training_step": step}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
