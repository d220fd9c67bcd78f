"""SSI's peak memory and time at Llama-2-7B shape, measured on the model cut to a few layers, extrapolated to 32.

    python benchmarks/ssi_scale.py [--layers 1,2] [--n 500] [--budget-gib 1] [--out benchmarks/results/ssi_scale.json]

Each point runs in its own process: a randomly initialised Llama-2-7B-shaped model (hidden 4096,
intermediate 11008, 32 heads, vocabulary 32,000) with ``--layers`` decoder layers, fp32, LoRA r 16 on
q/k/v/o, N calibration examples of 16 tokens (8 random prompt ids + one of 8 fixed 7-token responses and
EOS, as calibration refusals come from a few templates), and
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
    # prompts: random ids; responses: one of 8 fixed sequences, as calibration refusals come from a few
    # templates (fully random responses make the Fisher nearly full rank: k ~ 440 of 500, unlike real data)
    templates = [torch.randint(3, VOCAB, (7,), generator=rng).tolist() for _ in range(8)]
    examples = [{"ids": torch.randint(3, VOCAB, (8,), generator=rng).tolist() + templates[i % 8]} for i in range(n)]
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
    ap.add_argument("--layers", default="1,2")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--budget-gib", type=float, default=1.0, help="the SSI memory budget measured (1 GiB: the "
                    "2-layer point then needs two groups; the library default is 2)")
    ap.add_argument("--k-real", type=float, default=24.1, help="eigenvectors per module of a trained model's "
                    "safety Fisher used to extrapolate the bases' size (24.1: the quick start's SmolLM2)")
    ap.add_argument("--out", default="benchmarks/results/ssi_scale.json")
    ap.add_argument("--point", default=None, help=argparse.SUPPRESS)  # "layers,n,budget": run one point, print JSON
    ap.add_argument("--points-from", default=None, help=argparse.SUPPRESS)  # reuse measured points (a JSONL file)
    args = ap.parse_args(argv)
    if args.point:
        layers, n, budget = args.point.split(",")
        print(json.dumps(point(int(layers), int(n), float(budget))))
        return 0
    points = []
    if args.points_from:
        points = [json.loads(line) for line in Path(args.points_from).read_text().splitlines() if line.strip()]
    layer_list = [int(x) for x in args.layers.split(",")]
    for layers in ([] if points else layer_list):
        # the grouped SSI at every depth; every module at once (no budget) at the smallest, for the contrast
        for budget in (args.budget_gib, 1e6) if layers == layer_list[0] else (args.budget_gib,):
            proc = subprocess.run([sys.executable, __file__, "--point", f"{layers},{args.n},{budget}"],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            points.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(points[-1]), flush=True)
    from safeanchor.safety_subspace import DEFAULT_BUDGET_GIB

    grouped = [p for p in points if p["budget_gib"] == args.budget_gib]
    # what a point holds besides one group's gradients: the bases computed so far (P x k float32 per module,
    # the output, kept) and a fixed overhead (one chunk's activations and buffers, one module's eigenvector
    # temporaries); the fixed part is the largest measured remainder
    bases = {p["layers"]: 4.0 * p["modules"] * P * p["k_mean"] / GIB for p in grouped}
    overhead = max(p["peak_above_model_gib"] - min(p["all_gradients_gib"], args.budget_gib) - bases[p["layers"]]
                   for p in grouped)
    k_random = max(p["k_mean"] for p in grouped)
    # a random-init model has no structure: its per-example gradients are independent and k ~ N. A trained
    # model's safety Fisher is low-rank: the quick start's SmolLM2 needs 24.1 eigenvectors per module on
    # average (results.json prepare.subspace.k_mean), the paper reports about 8 at Llama-2-7B.
    k_mean = args.k_real
    bases_32 = 4.0 * 128 * P * k_mean / GIB
    bases_random_32 = 4.0 * 128 * P * k_random / GIB
    full = 4.0 * args.n * 128 * P / GIB
    per_layer_pass = max(p["seconds"] / p["groups"] / p["layers"] for p in grouped)
    groups_32 = math.ceil(full / args.budget_gib)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, cpu", "n_s": args.n, "budget_gib": args.budget_gib,
        "points": points,
        "formula": "grouped peak = min(budget, 4 N 128 P bytes) + bases (4 x 128 P k_mean bytes) + fixed overhead "
                   "(largest measured remainder); naive = 2 x 4 N 128 P bytes (+ bases); time = groups x layers x "
                   "(max measured seconds per layer and pass)",
        "overhead_gib": round(overhead, 3), "k_mean_measured_random_init": k_random,
        "k_mean_for_extrapolation": k_mean, "llama2_7b_bases_gib": round(bases_32, 3),
        "llama2_7b_peak_gib_if_k_were_the_random_init_k": round(min(args.budget_gib, full) + bases_random_32
                                                                 + overhead, 2),
        "llama2_7b_all_gradients_gib": round(full, 2),
        "llama2_7b_peak_gib": round(min(args.budget_gib, full) + bases_32 + overhead, 2),
        "library_default_budget_gib": DEFAULT_BUDGET_GIB,
        "llama2_7b_peak_gib_at_library_default": round(min(DEFAULT_BUDGET_GIB, full) + bases_32 + overhead, 2),
        "llama2_7b_groups_at_library_default": math.ceil(full / DEFAULT_BUDGET_GIB),
        "naive_llama2_7b_gib": round(2 * full + bases_32, 2),
        "llama2_7b_groups": groups_32,
        "llama2_7b_seconds_this_cpu": round(groups_32 * 32 * per_layer_pass),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
