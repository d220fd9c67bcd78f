"""A user's own TRL SFTTrainer script, with SafeAnchor added by one callback.

    python examples/sft_with_safeanchor.py --output_dir DIR --max_steps N [--domain medical] [--no-safeanchor]

Fine-tunes the quick start's aligned base (SmolLM2-135M-Instruct + the committed alignment adapter,
offline) on one domain's real data (medical: MedMCQA; legal: LegalBench; code: MBPP) with LoRA through
``trl.SFTTrainer``, and measures refusal of harmful requests (the first 50 HarmBench behaviours) and
over-refusal (90 benign prompts that sound dangerous) before and after, with the library's evaluation.
Everything SafeAnchor-specific is the ``SafeAnchorCallback`` block; the rest is a plain TRL script.

Writes DIR/adapter/ (a standard PEFT adapter), DIR/base_model/ (the aligned base it trained on, an HF
directory: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR/base_model), DIR/adapter)``)
and DIR/metrics.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import safeanchor
from safeanchor.align import ensure_aligned, link_base
from safeanchor.data.domains import get_domain
from safeanchor.data.safety import benign_borderline, harm_probe
from safeanchor.evaluation import judge_prompts
from safeanchor.judges import get_judge


def measure(model, tokenizer, judge) -> dict:
    """Refusal (%) on the HarmBench probe and over-refusal (%) on the held-out look-alikes, greedy, 40 tokens."""
    refusal, _ = judge_prompts(model, tokenizer, judge, harm_probe(50), 40, 30, "harmful")
    over, _ = judge_prompts(model, tokenizer, judge, benign_borderline("eval")[:90], 40, 30, "benign")
    return {"refusal_rate": round(refusal, 2), "over_refusal_rate": round(over, 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_steps", type=int, default=30)
    p.add_argument("--domain", default="medical", choices=["medical", "legal", "code", "biomed"])
    p.add_argument("--no-safeanchor", dest="safeanchor", action="store_false", help="plain LoRA fine-tuning")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.max_steps < 1:
        p.error("--max_steps must be >= 1")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    # The aligned chat model (a user brings their own; here the quick start's, built offline).
    qs = safeanchor.load_config(preset="quickstart")
    base_dir = ensure_aligned(qs)
    link_base(out / "base_model", base_dir)  # DIR/base_model: the HF directory the adapter belongs to
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))

    # The domain's real training data, as chat prompt/completion pairs.
    examples = get_domain(args.domain).load("train", qs.data.examples_per_domain, seed=args.seed)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": e["prompt"]}],
                                  "completion": [{"role": "assistant", "content": e["response"]}]} for e in examples])

    judge = get_judge("keyword")
    before = measure(model, tokenizer, judge)  # B = 0: the aligned base itself
    print(f"before: {before}", flush=True)

    callbacks = []
    if args.safeanchor:  # ---- SafeAnchor: the only lines a user adds ----
        calibration = safeanchor.load_safety_examples("offline", n=64, seed=args.seed)
        monitor = [r["prompt"] for r in safeanchor.load_safety_examples("offline", n=50, kind="monitor")]
        callback = safeanchor.SafeAnchorCallback(
            calibration, tokenizer, monitor_prompts=monitor, max_length=192, seed=args.seed,
            config=safeanchor.SafeAnchorConfig(repair_steps=30, anchor_batch=4, repair_check_every=5))
        callback.stage_examples(examples)  # repair replays this domain's data (projected) with the safety data
        callbacks.append(callback)

    config = SFTConfig(output_dir=str(out / "trainer"), max_steps=args.max_steps, per_device_train_batch_size=8,
                       learning_rate=5e-4, lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.01,
                       max_grad_norm=1.0, max_length=192, logging_steps=5, save_strategy="no", report_to=[],
                       seed=args.seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=callbacks)
    trainer.train()
    model.save_pretrained(out / "adapter")

    after = measure(model, tokenizer, judge)
    print(f"after:  {after}", flush=True)
    metrics = {"domain": args.domain, "max_steps": args.max_steps, "safeanchor": args.safeanchor, "seed": args.seed,
               "before": before, "after": after,
               "refusal_kept_pct": round(100 * after["refusal_rate"] / before["refusal_rate"], 1)
               if before["refusal_rate"] else None,
               "over_refusal_change": round(after["over_refusal_rate"] - before["over_refusal_rate"], 2),
               "train_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
               "seconds": round(time.time() - t0, 1)}
    if args.safeanchor:
        metrics["safeanchor_records"] = callbacks[0].records
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({k: metrics[k] for k in ("before", "after", "refusal_kept_pct", "over_refusal_change")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
