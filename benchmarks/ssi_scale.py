"""SSI's peak memory and time at Llama-2-7B shape, measured on the model cut to a few layers, extrapolated to 32.

    python benchmarks/ssi_scale.py [--layers 1,3] [--n 500] [--budget-gib 2] [--out benchmarks/results/ssi_scale.json]

Each point runs in its own process: a randomly initialised Llama-2-7B-shaped model (hidden 4096,
intermediate 11008, 32 heads, vocabulary 32,000) with ``--layers`` decoder layers, fp32, LoRA r 16 on
q/k/v/o, N calibration examples of 16 tokens (8 prompt + 8 response, random ids), and
``SafetySubspace.compute`` with ``memory_budget_gib``. Peak memory above the loaded model is the
process RSS sampled every 5 ms while SSI runs, minus the RSS just before it.

Extrapolation to 32 layers (128 LoRA modules, P = 16 (4096 + 4096) = 131,072 each):
- grouped SSI (this library): peak = min(budget, bytes of all modules' gradients) + overhead, where the
  overhead (activations of one chunk, hooks' buffers, the Gram / eigenvector temporaries of one module)
  does not grow with the layer count: the largest overhead measured is used;
- naive (every module's N x P gradients at once, then concatenated: the library before this change):
  2 x N x 128 x P x 4 bytes (31 GiB held, twice that while concatenating).
Time per pass over the calibration set grows with depth; the number of passes is the number of module
groups. The last line printed is the JSON written to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 2 ** 30
HIDDEN, INTER, HEADS, VOCAB, R = 4096, 11008, 32, 32000, 16
P = R * (HIDDEN + HIDDEN)


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def point(layers: int, n: int, budget: float, seed: int = 0) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from safeanchor.safety_subspace import SafetySubspace

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=R, lora_alpha=32, lora_dropout=0.0,
                                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():  # away from B = 0, so both blocks of every gradient are non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)

    class Tok:  # 16-token examples of random ids: the memory does not depend on the text
        pad_token_id = 0
        eos_token_id = 2

    rng = torch.Generator().manual_seed(seed)
    examples = [{"ids": torch.randint(3, VOCAB, (15,), generator=rng).tolist()} for _ in range(n)]
    import safeanchor.safety_subspace as sss

    def encode(tok, prompt, response, max_length):
        ids = prompt + response
        return {"input_ids": ids + [2], "labels": [-100] * len(prompt) + response + [2]}

    sss.encode = encode
    calib = [{"prompt": e["ids"][:8], "response": e["ids"][8:]} for e in examples]
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    base = _rss()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    sub = SafetySubspace.compute(model, calib, Tok(), rho=0.9, max_length=64, chunk=8, memory_budget_gib=budget)
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    modules = len(sub.bases)
    grad_bytes = 4.0 * n * modules * P
    groups = math.ceil(grad_bytes / (budget * GIB)) if grad_bytes > budget * GIB else 1
    return {"layers": layers, "modules": modules, "n": n, "budget_gib": budget, "groups": groups,
            "seconds": round(seconds, 1), "peak_above_model_gib": round((peak[0] - base) / GIB, 3),
            "all_gradients_gib": round(grad_bytes / GIB, 3), "k_mean": sum(b.basis.shape[1] for b in sub.bases.values())
            / modules, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="1,3")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--budget-gib", type=float, default=2.0)
    ap.add_argument("--out", default="benchmarks/results/ssi_scale.json")
    ap.add_argument("--point", default=None, help=argparse.SUPPRESS)  # "layers,n,budget": run one point, print JSON
    args = ap.parse_args(argv)
    if args.point:
        layers, n, budget = args.point.split(",")
        print(json.dumps(point(int(layers), int(n), float(budget))))
        return 0
    points = []
    for layers in (int(x) for x in args.layers.split(",")):
        for budget in (args.budget_gib, 1e6):  # the grouped SSI, and every module at once (no budget)
            proc = subprocess.run([sys.executable, __file__, "--point", f"{layers},{args.n},{budget}"],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            points.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(points[-1]), flush=True)
    grouped = [p for p in points if p["budget_gib"] == args.budget_gib]
    overhead = max(p["peak_above_model_gib"] - min(p["all_gradients_gib"], args.budget_gib) for p in grouped)
    full = 4.0 * args.n * 128 * P / GIB
    per_layer_pass = max(p["seconds"] / p["groups"] / p["layers"] for p in grouped)
    groups_32 = math.ceil(full / args.budget_gib)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, cpu", "n_s": args.n, "budget_gib": args.budget_gib,
        "points": points,
        "formula": "grouped peak = min(budget, 4 N 128 P bytes) + max measured overhead; naive = 2 x 4 N 128 P bytes; "
                   "time = groups x layers x (max measured seconds per layer and pass)",
        "llama2_7b_all_gradients_gib": round(full, 2),
        "llama2_7b_peak_gib": round(min(args.budget_gib, full) + overhead, 2),
        "naive_llama2_7b_gib": round(2 * full, 2),
        "llama2_7b_groups": groups_32,
        "llama2_7b_seconds_this_cpu": round(groups_32 * 32 * per_layer_pass),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
