"""The one checkpoint format: what a run needs to resume, in one ``torch.save`` file.

    {"format": 1, "params": {name: tensor}, "method": method.state_dict(), ...extra}

``params`` holds every LoRA tensor of the model (trainable or frozen, e.g. O-LoRA's earlier adapters)
and any other trainable parameter. The pipeline writes one after each stage (``state/stage<k>.pt``) and
the training loop one every ``train.checkpoint_every`` steps inside a domain, whose extra keys are the
optimizer, scheduler, step, logs and each process's RNG state. Files are written by rank 0 through a
temporary file and ``os.replace``, so a kill never leaves a half-written checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import SafeAnchorError

FORMAT = 1


def _tensors(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n or p.requires_grad}


def save_checkpoint(path: Path, ctx, **extra) -> None:
    """Write the model's LoRA / trainable tensors, the method's state and ``extra``; every process calls it."""
    if ctx.dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"format": FORMAT, "params": {n: p.detach().cpu().clone() for n, p in _tensors(ctx.model).items()},
                    "method": ctx.method.state_dict(), **extra}, tmp)
        os.replace(tmp, path)
    ctx.dist.barrier()


def load_checkpoint(path: Path, ctx) -> dict:
    """Restore the method's state (which may re-create adapters) and then the tensors; returns the file's dict."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    params_key = "params" if "params" in state else "lora"  # "lora": stage files from before the one format
    ctx.method.load_state_dict(state["method"], ctx)
    params = _tensors(ctx.model)
    saved = state[params_key]
    if params_key == "lora":
        params = {n: p for n, p in params.items() if "lora_" in n}
    if set(params) != set(saved):
        raise SafeAnchorError(f"checkpoint {path} does not match this run's model (config changed?); use another "
                              f"--out, or delete the run directory to start over")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n].to(p.device, p.dtype))
    return state
