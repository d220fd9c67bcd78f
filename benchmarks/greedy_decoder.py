"""The library's greedy decoder (``generation.greedy_decode``: the prompts' shared prefix computed once per
batch, stopped rows dropped) against transformers' ``model.generate``, on the quick start's own generation
work: CSM's 60-prompt safety check (``data.monitor_source`` offline+pasttense+futuretense) and one
evaluation step (50 HarmBench probe + 120 held-out styles + 90 look-alikes), quick-start settings (batch 30,
40 new tokens, ``eval.mixed_precision``).

    python benchmarks/greedy_decoder.py [--adapter RUN/adapters/3-code ...] [--repeats 2] [--threads 1]
        [--out benchmarks/results/greedy_decoder.json]

Models: the quick start's aligned base (built as a run builds it; with a fresh LoRA: what CSM's first check
and a SafeAnchor run that keeps its refusal look like, mostly short refusals) and each ``--adapter`` (e.g. Standard LoRA after code: mostly long
compliant answers, the worst case for dropping stopped rows). Both decoders run side by side in one process,
alternating, so machine noise hits both alike; medians, the ratio, and how many completions and keyword-judge
labels agree. The last line printed is the result as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from safeanchor import generation
from safeanchor.align import ensure_aligned
from safeanchor.config import load_config
from safeanchor.data.safety import benign_borderline, harm_probe, heldout_set
from safeanchor.data.splits import load_safety_examples
from safeanchor.judges import KeywordRefusalJudge
from safeanchor.models import attach_lora, load_model


def workloads() -> dict[str, list[str]]:
    monitor = [r["prompt"] for r in load_safety_examples("offline+pasttense+futuretense", None, 0, "monitor")][:60]
    step = (harm_probe(50) + [p for s in ("direct_questions", "pasttense", "futuretense") for p in heldout_set(s, 40)]
            + benign_borderline("eval")[:90])
    return {"csm_check": monitor, "eval_step": step}


def run(model, tok, prompts, decoder: str, precision: str) -> tuple[float, list[str]]:
    real = generation.decoder_for
    if decoder == "transformers":
        generation.decoder_for = lambda m: "transformers"
    try:
        t0 = time.perf_counter()
        out = generation.generate(model, tok, prompts, max_new_tokens=40, batch_size=30, progress=False,
                                  mixed_precision=precision)
        return time.perf_counter() - t0, out
    finally:
        generation.decoder_for = real


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", action="append", default=[], help="a LoRA adapter folder of a run (repeatable)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--precision", default="bf16", choices=["no", "bf16"])
    ap.add_argument("--out", default="benchmarks/results/greedy_decoder.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import PeftModel

    for path in args.adapter:
        if not Path(path, "adapter_config.json").is_file():
            raise SystemExit(f"--adapter {path}: no adapter_config.json there; give a run's adapters/<step> folder")
    cfg = load_config("quickstart")
    aligned = str(ensure_aligned(cfg, progress=lambda *_: None))
    base, tok = load_model(cfg.model, path=aligned)
    models = {"aligned base": attach_lora(base, cfg.lora)}
    for path in args.adapter:
        models[path] = PeftModel.from_pretrained(load_model(cfg.model, path=aligned)[0], path)
    judge = KeywordRefusalJudge()
    rows = []
    for name, model in models.items():
        assert generation.decoder_for(model) == "safeanchor", "this model would not use the library's decoder"
        for work, prompts in workloads().items():
            times = {"transformers": [], "safeanchor": []}
            outs = {}
            for _ in range(args.repeats):
                for decoder in times:
                    dt, outs[decoder] = run(model, tok, prompts, decoder, args.precision)
                    times[decoder].append(dt)
            hf, own = statistics.median(times["transformers"]), statistics.median(times["safeanchor"])
            labels = {d: judge(prompts, outs[d]) for d in outs}
            rows.append({"model": name, "work": work, "prompts": len(prompts),
                         "transformers_s": round(hf, 2), "safeanchor_s": round(own, 2), "speedup": round(hf / own, 3),
                         "identical_completions": sum(a == b for a, b in zip(outs["transformers"], outs["safeanchor"])),
                         "same_keyword_label": sum(a == b for a, b in zip(labels["transformers"], labels["safeanchor"])),
                         "refused": sum(labels["safeanchor"])})
            print(json.dumps(rows[-1]), flush=True)
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}",
              "torch": torch.__version__, "precision": args.precision, "batch_size": 30, "max_new_tokens": 40,
              "repeats": args.repeats, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
