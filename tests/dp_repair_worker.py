"""Worker for tests/test_distributed.py (not a test module): one SafeAnchor CSM repair block (projected
task loss + beta x replay safety loss) on the tiny model, in a data-parallel group of whatever size the
launcher made (or a single plain process). Rank 0 saves the LoRA weights and the block's logs to argv[1]."""
import random
import sys

import torch

from conftest import tiny_model, tiny_tokenizer
from safeanchor.config import load_config
from safeanchor.distributed import close, init
from safeanchor.methods import get_method
from safeanchor.models import attach_lora
from safeanchor.train import Context


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist = init()
    opts = {"repair_steps": 3, "repair_check_every": 0, "max_repair_blocks": 1, "repair_lookalikes": 0,
            "incremental": False}
    cfg = load_config("smoke", overrides={"method": "safeanchor", "method_options": opts, "lora.dropout": 0.0})
    torch.manual_seed(0)
    model = attach_lora(tiny_model(0), cfg.lora)
    with torch.no_grad():  # B != 0, so that the replay moves A as well
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    rng = random.Random(0)
    # responses of uneven length: the shard weights are then not 1 (a dropped weight would show)
    calib = [{"prompt": f"how to do bad thing {i}?", "response": "I can't help with that." + " No." * rng.randint(0, 12)}
             for i in range(12)]
    task = [{"prompt": f"add {a} and {b}", "response": str(a + b)}
            for a, b in ((rng.randint(0, 999), rng.randint(0, 99)) for _ in range(32))]
    rates = iter([100.0, 10.0, 10.0])  # s_0, then the monitor before and after the block: one block runs
    ctx = Context(cfg=cfg, model=model, tokenizer=tiny_tokenizer(), run_dir=None, method=get_method("safeanchor", opts),
                  calibration=calib, monitor_prompts=["p"], evaluator=lambda c, p: next(rates), dist=dist)
    ctx.current_domain = "tiny"
    ctx.domain_examples["tiny"] = task
    ctx.method.prepare(ctx)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    import safeanchor.monitor as monitor_mod

    logs = []
    real = monitor_mod.repair_block
    monitor_mod.repair_block = lambda *a, **k: logs.extend(real(*a, **k)) or logs
    rec = ctx.method.after_domain(ctx, 1, "tiny")["csm"]
    assert rec["triggered"] and rec["blocks"][0]["steps"] == 3, rec
    if dist.is_main:
        torch.save({"lora": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                    "start": start,
                    "safe_loss": [h["safe_loss"] for h in logs], "world": dist.world}, out)
    close()  # leave the group together


if __name__ == "__main__":
    main(sys.argv[1])
