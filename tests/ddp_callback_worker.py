"""Worker for tests/test_callback.py (not a test module): transformers' Trainer with SafeAnchorCallback on
the tiny model, in a DDP group of whatever size torchrun made (gloo on CPU). The global batch of 4 is the
whole dataset, so every step sees the same examples whatever the sampler's order or the process count;
every example has the same length, so per-process mean losses average to the global mean. Rank 0 saves
the LoRA weights and the callback's records to argv[1]."""
import sys

import torch
from transformers import Trainer, TrainingArguments

from safeanchor import SafeAnchorCallback, SafeAnchorConfig
from safeanchor import subspace as ss
from safeanchor.config import load_config
from safeanchor.data.chat import collate, encode
from safeanchor.models import attach_lora, tiny_model, tiny_tokenizer


def main(out: str) -> None:
    torch.set_num_threads(1)
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    tok = tiny_tokenizer()
    cfg = load_config("smoke", overrides={"lora.dropout": 0.0})
    torch.manual_seed(0)
    model = attach_lora(tiny_model(0), cfg.lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, (a, b) in ss.lora_modules(model).items():
            b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.05)
    rows = [encode(tok, f"add {a} and {b}", f"{a + b:03d}", 64) for a, b in ((101, 202), (303, 404), (150, 250), (199, 100))]
    assert len({len(r["input_ids"]) for r in rows}) == 1
    calib = [{"prompt": f"how to do bad thing {i}?", "response": "I can't help with that."} for i in range(8)]
    cb = SafeAnchorCallback(calib, tok, config=SafeAnchorConfig(csm=False, gamma=0.5, trace_norm="max"), max_length=64)
    args = TrainingArguments(output_dir=out + ".trainer", max_steps=3, per_device_train_batch_size=4 // world,
                             learning_rate=1e-2, warmup_steps=0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, ddp_backend="gloo", seed=0, remove_unused_columns=False,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, data_collator=lambda b: collate(b, tok.pad_token_id),
            callbacks=[cb]).train()
    if args.process_index == 0:
        torch.save({"lora": {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
                    "records": cb.records, "world": world}, out)


if __name__ == "__main__":
    main(sys.argv[1])
