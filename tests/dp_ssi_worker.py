"""Worker for tests/test_distributed.py (not a test module): SSI on the tiny model in a data-parallel group of
whatever size the launcher made, each process computing its share of the calibration examples. Rank 0 saves
the bases to argv[1]."""
import sys

import torch

from conftest import tiny_model, tiny_tokenizer
from safeanchor import SafetySubspace
from safeanchor.config import load_config
from safeanchor.distributed import close, init
from safeanchor.models import attach_lora


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist = init()
    cfg = load_config("smoke", overrides={"lora.dropout": 0.0})
    torch.manual_seed(0)
    model = attach_lora(tiny_model(0), cfg.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    calib = [{"prompt": f"how to do bad thing {i}?", "response": "No." + " Never." * (i % 4)} for i in range(11)]
    sub = SafetySubspace.compute(model, calib, tiny_tokenizer(), max_length=64, chunk=2, dist=dist,
                                 memory_budget_gib=2e-4)  # small: several module groups, one all-gather each
    if dist.is_main:
        torch.save({"bases": {n: (b.basis, b.eigenvalues, b.trace) for n, b in sub.bases.items()},
                    "world": dist.world}, out)
    close()


if __name__ == "__main__":
    main(sys.argv[1])
