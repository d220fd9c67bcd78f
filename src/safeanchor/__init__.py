"""safeanchor: safety-preserving continual domain adaptation of chat LLMs with LoRA.

The parts any training loop can use (each documented with its formula):
    SafetySubspace      SSI: per-module Fisher safety bases (compute, refresh/merge, save/load, fraction)
    SafetyProjector     OSCA: projection of each optimizer step, attached through torch's step hooks
    SafetyTerm          a safety loss (anchor KL, replay NLL) added inside the step, bypassing the projection
    anchor_kl           KL(p_aligned || p_theta) with the adapter disabled as the aligned model
    SafetyMonitor       CSM's refusal rate and threshold; monitor_and_repair runs CSM after a stage
    safe_lora           Safe LoRA (Hsu et al. 2024) as a function over a PEFT model
    SafeAnchorCallback  all of SafeAnchor for transformers' Trainer / TRL's SFTTrainer
    load_safety_examples  the built-in, local (JSONL) or hub (BeaverTails) safety data
and the pipeline: ``load_config`` + ``run``.
"""
__version__ = "0.1.0"

from .config import RunConfig, load_config  # noqa: E402,F401
from .errors import SafeAnchorError  # noqa: E402,F401

_LAZY = {
    "SafetySubspace": ("safety_subspace", "SafetySubspace"),
    "SafetyProjector": ("projector", "SafetyProjector"),
    "SafetyTerm": ("projector", "SafetyTerm"),
    "SafetyBatches": ("anchor", "SafetyBatches"),
    "anchor_kl": ("anchor", "anchor_kl"),
    "SafetyMonitor": ("monitor", "SafetyMonitor"),
    "RepairSettings": ("monitor", "RepairSettings"),
    "monitor_and_repair": ("monitor", "monitor_and_repair"),
    "safe_lora": ("methods.safelora", "safe_lora_project"),
    "SafeAnchorCallback": ("callback", "SafeAnchorCallback"),
    "SafeAnchorConfig": ("methods.safeanchor", "SafeAnchorConfig"),
    "load_safety_examples": ("data.splits", "load_safety_examples"),
}

__all__ = ["RunConfig", "load_config", "run", "SafeAnchorError", *_LAZY]


def __getattr__(name: str):
    # torch / transformers are imported only when a part is first used (the CLI's config errors stay fast)
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'safeanchor' has no attribute {name!r}")


def run(config: RunConfig, out: str):
    """Run (or resume) the sequential pipeline into ``out``; returns the results dict."""
    from .pipeline import run as _run

    return _run(config, out)
