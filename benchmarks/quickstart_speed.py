"""Where the quick start's time goes on this machine: seconds per training step (response-only LM
head vs the full-sequence head HF computes by default), generation tokens/s by batch size, and the
evaluation's greedy generation in float32 against bf16 autocast (``eval.mixed_precision``: the quick
start's settings, 60 real evaluation prompts, batch 30, 40 new tokens), with how many completions agree.

    python benchmarks/quickstart_speed.py [--steps 4] [--repeats 3] [--out benchmarks/results/quickstart_speed.json]

Both variants run side by side in one process, alternating, so machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from safeanchor.config import LoRAConfig, ModelConfig
from safeanchor.data.chat import collate, encode, mean_token_nll
from safeanchor.generation import generate
from safeanchor.models import attach_lora, load_model

PROMPT = ("A 45-year-old man presents with chest pain radiating to the left arm for two hours. Which of the "
          "following is the most appropriate next step? (A) ECG (B) chest X-ray (C) reassurance (D) antacids")
RESPONSE = ("The answer is (A) ECG. An ECG within ten minutes identifies ST-elevation myocardial infarction "
            "and guides reperfusion; the other options delay diagnosis of an acute coronary syndrome.")


def full_head_loss(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss


def time_steps(model, batch, loss_fn, opt, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def generation_precision(model, tok, repeats: int) -> dict:
    """The evaluation's greedy generation (quick-start settings) in float32 and under bf16 autocast,
    alternating rounds on the same 60 prompts (20 HarmBench probe, 20 held-out direct questions, 20
    look-alikes); median seconds, the ratio, and how many completions are identical."""
    from safeanchor.data.safety import benign_borderline, harm_probe, heldout_set
    from safeanchor.judges import KeywordRefusalJudge

    prompts = harm_probe(20) + heldout_set("direct_questions", 20) + benign_borderline("eval")[:20]
    times = {"no": [], "bf16": []}
    outs = {}
    for _ in range(repeats):
        for mp in ("no", "bf16"):
            t0 = time.perf_counter()
            outs[mp] = generate(model, tok, prompts, max_new_tokens=40, batch_size=30, progress=False,
                                mixed_precision=mp)
            times[mp].append(time.perf_counter() - t0)
    fp32, bf16 = statistics.median(times["no"]), statistics.median(times["bf16"])
    judge = KeywordRefusalJudge()
    labels = {mp: judge(prompts, outs[mp]) for mp in outs}
    return {"prompts": len(prompts), "max_new_tokens": 40, "batch_size": 30, "repeats": repeats,
            "fp32_s": round(fp32, 2), "bf16_autocast_s": round(bf16, 2), "speedup": round(fp32 / bf16, 2),
            "identical_completions": sum(a == b for a, b in zip(outs["no"], outs["bf16"])),
            "same_keyword_label": sum(a == b for a, b in zip(labels["no"], labels["bf16"])),
            "refused_fp32": sum(labels["no"]), "refused_bf16": sum(labels["bf16"])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="alternating fp32 / bf16 generation rounds")
    ap.add_argument("--out", default="benchmarks/results/quickstart_speed.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(ModelConfig())
    model = attach_lora(model, LoRAConfig())
    ex = encode(tok, PROMPT, RESPONSE, 192)
    batch = collate([ex] * args.batch, tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    time_steps(model, batch, mean_token_nll, opt, 1)  # warm-up
    resp, full = [], []
    for _ in range(args.steps):  # alternate so both see the same machine load
        resp += time_steps(model, batch, mean_token_nll, opt, 1)
        full += time_steps(model, batch, full_head_loss, opt, 1)
    model.eval()
    prompts = [PROMPT] * 16
    gen = {}
    for bs in (1, 8, 16):
        t0 = time.perf_counter()
        generate(model, tok, prompts[: max(bs, 8)], max_new_tokens=32, batch_size=bs, progress=False)
        dt = time.perf_counter() - t0
        gen[f"batch{bs}"] = {"prompts": max(bs, 8), "seconds": round(dt, 2),
                             "new_tokens_per_s": round(max(bs, 8) * 32 / dt, 1)}
    precision = generation_precision(model, tok, args.repeats)
    result = {"machine": f"{platform.machine()} {torch.get_num_threads()} threads, {platform.processor() or ''}",
              "tokens_per_example": len(ex["input_ids"]), "batch": args.batch,
              "response_tokens": sum(1 for x in ex["labels"] if x != -100),
              "step_s_response_only_head": round(statistics.median(resp), 3),
              "step_s_full_head": round(statistics.median(full), 3),
              "speedup": round(statistics.median(full) / statistics.median(resp), 3),
              "generation": gen, "generation_precision": precision, "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
