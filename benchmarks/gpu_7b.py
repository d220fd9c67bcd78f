"""SafeAnchor at Llama-2-7B shape on one GPU: SSI memory and time, step time, with and without checkpointing.

    python benchmarks/gpu_7b.py [--n 500] [--steps 5] [--out benchmarks/results/gpu_7b.json]
    python benchmarks/gpu_7b.py --tiny          # the same script on a tiny model, CPU, as a smoke check

A randomly initialised Llama-2-7B architecture (32 layers, hidden 4096, intermediate 11008, 32 heads,
vocabulary 32,000) in bfloat16, LoRA r 16 / alpha 32 on q/k/v/o (PEFT keeps the adapter in float32),
text through the library's byte-level test tokenizer (the token ids are what matter here, not words):
- SSI: ``SafetySubspace.compute`` on N calibration examples of about 128 tokens (64 response),
  ``memory_budget_gib`` 2: seconds and peak GPU memory above the loaded model (max_memory_allocated);
- step time, batch 8 x 512 tokens, bf16 autocast: Standard LoRA (task loss, AdamW) against SafeAnchor
  (the same plus the anchor KL on 4 calibration examples and the update projection, through a
  ``SafetyProjector`` on the optimizer), each with and without gradient checkpointing; median of
  ``--steps`` steps after one warm-up step, and peak memory.
The last line printed is the JSON written to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch


def _texts(rng: random.Random, n: int, chars: int) -> list[str]:
    alphabet = "abcdefghijklmnopqrstuvwxyz     .,"
    return ["".join(rng.choice(alphabet) for _ in range(chars)) for _ in range(n)]


def main(argv=None) -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import safeanchor
    from safeanchor.data.chat import collate, encode, mean_token_nll
    from safeanchor.models import tiny_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/gpu_7b.json")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("gpu_7b.py: no CUDA device; run it on a GPU machine, or pass --tiny for a CPU smoke check",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    shape = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=32000) if args.tiny else
             dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000))
    n, seq, batch_size = (16, 96, 2) if args.tiny else (args.n, 512, 8)
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, max_position_embeddings=1024, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device, torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():  # away from B = 0 (a trained point), so both blocks of every gradient are non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    tok = tiny_tokenizer()
    rng = random.Random(0)
    calib = [{"prompt": p, "response": r} for p, r in zip(_texts(rng, n, 64), _texts(rng, n, 64))]
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu (tiny smoke check)", "shape": shape,
              "n_s": n, "torch": torch.__version__}

    def peak_reset():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return 0

    def peak_gib(base):
        return round((torch.cuda.max_memory_allocated() - base) / 2**30, 2) if cuda else None

    base = peak_reset()
    t0 = time.perf_counter()
    sub = safeanchor.SafetySubspace.compute(model, calib, tok, rho=0.9, max_length=160, chunk=8, memory_budget_gib=2.0)
    if cuda:
        torch.cuda.synchronize()
    result["ssi"] = {"seconds": round(time.perf_counter() - t0, 1), "peak_above_model_gib": peak_gib(base),
                     "modules": len(sub), "k_mean": sum(b.basis.shape[1] for b in sub.bases.values()) / len(sub)}
    print(json.dumps({"ssi": result["ssi"]}), flush=True)

    task = [encode(tok, p, r, seq) for p, r in zip(_texts(rng, 64, seq // 2), _texts(rng, 64, seq))]
    params = [p for p in model.parameters() if p.requires_grad]
    steps = {}
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        for method in ("standard", "safeanchor"):
            opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
            projector = None
            if method == "safeanchor":
                anchor = safeanchor.SafetyTerm("anchor_kl", safeanchor.SafetyBatches(calib, tok, 4, max_length=160), 0.1,
                                               autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16))
                projector = safeanchor.SafetyProjector(model, sub, sub.strengths(), mode="update",
                                                       terms=[anchor]).attach(opt)
            model.train()
            times = []
            base = peak_reset()
            for k in range(args.steps + 1):
                rows = [task[(k * batch_size + j) % len(task)] for j in range(batch_size)]
                b = {key: v.to(device) for key, v in collate(rows, tok.pad_token_id).items()}
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = mean_token_nll(model, b)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize()
                if k:
                    times.append(time.perf_counter() - t0)
            if projector is not None:
                projector.detach()
            key = f"{method}{'_checkpointing' if checkpointing else ''}"
            steps[key] = {"step_s": round(statistics.median(times), 3), "peak_gib": peak_gib(base)}
            print(json.dumps({key: steps[key]}), flush=True)
            del opt
    result["steps"] = steps
    result["ratio_safeanchor_vs_standard"] = round(steps["safeanchor"]["step_s"] / steps["standard"]["step_s"], 3)
    result["ratio_with_checkpointing"] = round(steps["safeanchor_checkpointing"]["step_s"]
                                               / steps["standard_checkpointing"]["step_s"], 3)
    if not args.tiny:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
