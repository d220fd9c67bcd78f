"""SafeAnchor inside transformers' ``Trainer`` and TRL's ``SFTTrainer``, unchanged: one callback.

    trainer = SFTTrainer(model=peft_model, ..., callbacks=[SafeAnchorCallback(calibration, tokenizer)])

What it does, per ``trainer.train()`` (a "stage": one domain):
- train begin: SSI on the model (first stage; later stages use the merged subspace) and CSM's
  baseline s_0 on the aligned model (the adapter disabled); a ``SafetyProjector`` with the anchor KL
  term is attached to the trainer's optimizer through torch's step hooks.
- every optimizer step (after the Trainer's gradient accumulation and clipping): the anchor's
  gradient is added and the update projected out of the safety subspace (``projector.py``).
- train end: CSM (monitor s_t; repair replay through the library's loop if s_t < (1 - tau) s_0),
  then the subspace is recomputed at the new point and merged with the old one.

One callback object carried across several trainer runs (domain 1, domain 2, ...) is the sequential
method. Supported: gradient accumulation, clipping, bf16 / fp16 mixed precision (the anchor's forward
runs under the same autocast), gradient checkpointing, DDP under ``accelerate launch`` / ``torchrun``
(every process holds whole, all-reduced LoRA gradients after the Trainer's backward; the hooks run on
each, the anchor batch is computed whole on every process and the repair's result broadcast from
rank 0). Refused at train begin: DeepSpeed (ZeRO partitions gradients and optimizer state) and FSDP
(flat, sharded parameters): the projection needs each module's whole gradient and AdamW moments.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import replace

import torch
from transformers import TrainerCallback

from .anchor import SafetyBatches, snapshot_logits
from .errors import SafeAnchorError
from .methods.safeanchor import ANCHOR_STREAM, SafeAnchorConfig, refresh_due
from .monitor import (RepairSettings, SafetyMonitor, aligned_answers, builtin_lookalikes, check_repair_mix,
                      monitor_and_repair)
from .projector import SafetyProjector, SafetyTerm
from .safety_subspace import SafetySubspace


def _unsupported_setup(args) -> str | None:
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return ("SafeAnchorCallback does not support DeepSpeed: ZeRO partitions the gradients and AdamW state the "
                "projection needs whole; train with DDP (accelerate launch without a DeepSpeed config)")
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return ("SafeAnchorCallback does not support FSDP: its flat, sharded parameters hide each LoRA module's "
                "gradient; train with DDP (LoRA on a 7B model in bf16 fits on one GPU per process)")
    return None


def _reference_of(model, batch, snapshot):
    """anchor_reference 'previous': logits of the model with the stage's starting LoRA weights."""
    return snapshot_logits(model, batch, snapshot)


class SafeAnchorCallback(TrainerCallback):
    """SafeAnchor (SSI + OSCA + anchor KL + CSM) for transformers' Trainer / TRL's SFTTrainer.

    ``calibration``: safety examples {"prompt", "response"} (harmful prompt -> safe response) for SSI and
    the anchor; ``monitor_prompts``: held-out harmful prompts for CSM (None: no monitoring);
    ``repair_examples``: the repair's safety data (default: ``calibration``); ``config``: SafeAnchor's
    options (``SafeAnchorConfig``, the paper's defaults); ``judge``: a refusal judge for the monitor
    (default: the offline keyword judge); ``benign_prompts``: prompts that must stay answered, whose
    aligned answers join the repair's safety data (``config.repair_lookalikes`` of them; default: the
    library's benign look-alikes, "how do I kill a Python process"), or ``monitor``: a ready ``SafetyMonitor`` (its own generation
    length, batch size, judge and tau). Without monitor prompts CSM is off. ``stage_examples(examples)`` gives the repair replay the
    current domain's examples before each ``trainer.train()`` (without them, repair replays the safety
    data alone). ``records`` holds one dict per stage (subspace sizes, s_0, CSM, mean logs). With
    ``config.overrefusal_monitor`` > 0, CSM also measures over-refusal (``judge``) on the benign prompts after
    the repair's look-alikes and repairs when it rises more than ``config.overrefusal_tolerance`` points.
    """

    def __init__(self, calibration: list[dict], tokenizer, *, monitor_prompts: list[str] | None = None,
                 repair_examples: list[dict] | None = None, config: SafeAnchorConfig | None = None, judge=None,
                 monitor: SafetyMonitor | None = None, benign_prompts: list[str] | None = None,
                 max_length: int = 512, seed: int = 0):
        if not calibration:
            raise SafeAnchorError("SafeAnchorCallback needs safety calibration examples ({'prompt', 'response'}); "
                                  "use safeanchor.load_safety_examples('offline', ...) or your own")
        self.config = config or SafeAnchorConfig()
        if self.config.csm and not monitor_prompts and monitor is None:
            self.config = replace(self.config, csm=False)
        self.calibration, self.tokenizer, self.max_length, self.seed = list(calibration), tokenizer, max_length, seed
        self.repair_examples = list(repair_examples) if repair_examples is not None else list(calibration)
        self._own_monitor = monitor is None  # ours follows TrainingArguments.bf16 (generation under bf16 autocast)
        if monitor is None and self.config.csm:
            monitor = SafetyMonitor(monitor_prompts, judge, tau=self.config.tau)
        self.monitor = monitor if self.config.csm else None
        self.benign_prompts = benign_prompts
        self.benign_monitor: SafetyMonitor | None = None  # config.overrefusal_monitor > 0: over-refusal b_t
        if self.monitor is not None and self.config.overrefusal_monitor > 0:
            n, skip = self.config.overrefusal_monitor, self.config.repair_lookalikes
            if benign_prompts is not None and len(benign_prompts) < skip + n:
                raise SafeAnchorError(f"overrefusal_monitor {n} needs {skip + n} benign_prompts (the first "
                                      f"repair_lookalikes {skip} are replayed by the repair), got {len(benign_prompts)}")
            prompts = (benign_prompts[skip:skip + n] if benign_prompts is not None
                       else builtin_lookalikes(n, seed, skip=skip))
            self.benign_monitor = SafetyMonitor(prompts, judge, tau=0.0)
            if self.benign_monitor.measures != "refusal":
                raise SafeAnchorError(f"overrefusal_monitor measures over-refusal with ``judge``, which measures "
                                      f"{self.benign_monitor.measures}; pass a refusal judge (keyword, "
                                      f"wildguard-refusal) or set overrefusal_monitor: 0")
        self.lookalikes: list[dict] = []  # benign prompts with the aligned model's answers, for the repair
        self.subspace: SafetySubspace | None = None
        self.projector: SafetyProjector | None = None
        self.records: list[dict] = []
        self._task: list[dict] | None = None
        self._logs: list[dict] = []
        self._anchor_position = 0

    def _projected(self) -> SafetySubspace:
        """What updates are projected against: the safety subspace, or with ``basis: random`` (ablation) a
        random basis of the same per-module sizes (``SafetySubspace.randomised``)."""
        return self.subspace.randomised(self.seed) if self.config.basis == "random" else self.subspace

    # -- the user's hooks -----------------------------------------------------------------------------
    def stage_examples(self, examples: list[dict] | None) -> None:
        """The current domain's {"prompt", "response"} examples, replayed (projected) by CSM's repair."""
        self._task = list(examples) if examples is not None else None

    # -- Trainer events -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        problem = _unsupported_setup(args)
        if problem:
            raise SafeAnchorError(problem)
        o, model = self.config, self._peft(model)
        precision = "bf16" if getattr(args, "bf16", False) else "no"
        if self.monitor is not None and self._own_monitor:
            self.monitor.mixed_precision = precision
        if self.benign_monitor is not None:
            self.benign_monitor.mixed_precision = precision
        record = {"stage": len(self.records) + 1}
        if self.subspace is None:
            self.subspace = SafetySubspace.compute(model, self.calibration, self.tokenizer, rho=o.rho,
                                                   max_length=self.max_length, chunk=o.ssi_chunk,
                                                   max_rank=o.max_rank or None, memory_budget_gib=o.ssi_memory_gib)
            if self.monitor is not None:
                with model.disable_adapter():
                    record["s0"] = self.monitor.set_baseline(model, self.tokenizer)
                    if self.benign_monitor is not None:
                        record["b0"] = self.benign_monitor.set_baseline(model, self.tokenizer)
                if o.repair_lookalikes > 0:
                    prompts = (self.benign_prompts[:o.repair_lookalikes] if self.benign_prompts is not None
                               else builtin_lookalikes(o.repair_lookalikes, self.seed))
                    self.lookalikes = aligned_answers(model, self.tokenizer, prompts, mixed_precision=precision)
                    record["repair_lookalikes"] = len(self.lookalikes)
                check_repair_mix(o.repair_mix, self.benign_monitor, self.lookalikes)
        alpha = self.subspace.alpha(o.lam, o.trace_norm, o.strict)
        record["subspace"] = self.subspace.spectrum(alpha)
        terms = []
        if o.gamma > 0:
            batches = SafetyBatches(self.calibration, self.tokenizer, o.anchor_batch, self.seed, ANCHOR_STREAM,
                                    self.max_length, "safety calibration examples (anchor)")
            batches.position = self._anchor_position
            reference = None
            if o.anchor_reference == "previous":  # the model as this stage starts
                reference = functools.partial(_reference_of, snapshot={
                    p: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
            terms.append(SafetyTerm("anchor_kl", batches, o.gamma, name="anchor_kl", autocast=self._autocast(args),
                                    reference=reference))
        self.projector = SafetyProjector(model, self._projected(), {n: 1.0 - a for n, a in alpha.items()},
                                         mode=o.project, terms=terms, project_terms=o.anchor_projected)
        self._logs = []
        self.records.append(record)
        if optimizer is not None:
            self.projector.attach(optimizer)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.projector is not None and self.projector.optimizer is None:
            if optimizer is None:
                raise SafeAnchorError("SafeAnchorCallback got no optimizer from the Trainer; pass the callback in "
                                      "Trainer(callbacks=[...]) so it sees the optimizer")
            self.projector.attach(optimizer)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.projector is not None and self.projector.logs:
            self._logs.append(dict(self.projector.logs))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # ``refresh_every``: SSI again at the current point, merged, every N optimizer steps of the stage (the
        # Trainer's global_step counts this train() call's steps, its max_steps their total)
        if self.projector is None or not refresh_due(self.config, state.global_step, state.max_steps):
            return
        o, model = self.config, self._peft(model)
        self._refresh(model)
        alpha = self.subspace.alpha(o.lam, o.trace_norm, o.strict)
        self.projector.subspace = self._projected().to(next(model.parameters()).device)
        self.projector.strengths = {n: 1.0 - a for n, a in alpha.items()}
        self.records[-1]["refreshes"] = self.records[-1].get("refreshes", 0) + 1

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.projector is None:
            return
        o, model = self.config, self._peft(model)
        self.projector.detach()
        if self.projector.terms:  # the next stage's anchor continues the calibration stream
            self._anchor_position = self.projector.terms[0].batches.position
        record = self.records[-1]
        record["steps"] = len(self._logs)
        keys = sorted({k for logs in self._logs for k in logs})
        record["logs"] = {k: sum(lg[k] for lg in self._logs if k in lg) / max(1, sum(k in lg for lg in self._logs))
                          for k in keys}
        if self.monitor is not None:
            settings = RepairSettings.of(o, args.learning_rate, args.per_device_train_batch_size)
            strengths = dict(self.projector.strengths)
            safety = self.repair_examples + self.lookalikes
            record["csm"] = monitor_and_repair(self.monitor, model, self.tokenizer, self._task or safety,
                                               safety, self.projector.subspace, strengths, settings,
                                               self._train_config(args), seed=self.seed, stage=record["stage"],
                                               benign=self.benign_monitor, lookalikes=self.lookalikes)
            self._broadcast(model)
        if o.incremental and o.project != "none":
            self._refresh(model)
            record["subspace_after"] = self.subspace.spectrum()
        self.projector = None

    # -- helpers --------------------------------------------------------------------------------------
    def _refresh(self, model) -> None:
        """SSI again at the model's current point, merged into the subspace (``config.merge``)."""
        o = self.config
        self.subspace = self.subspace.refresh(model, self.calibration, self.tokenizer, merge=o.merge,
                                              max_length=self.max_length, chunk=o.ssi_chunk,
                                              memory_budget_gib=o.ssi_memory_gib)

    @staticmethod
    def _peft(model):
        if model is None or not hasattr(model, "disable_adapter"):
            raise SafeAnchorError("SafeAnchorCallback needs a PEFT model (peft.get_peft_model(model, LoraConfig(...)) "
                                  "or SFTTrainer(peft_config=...)); the aligned model is the one with the adapter off")
        return model

    @staticmethod
    def _autocast(args):
        if getattr(args, "bf16", False) or getattr(args, "fp16", False):
            dtype = torch.bfloat16 if args.bf16 else torch.float16
            device = "cuda" if torch.cuda.is_available() and not getattr(args, "use_cpu", False) else "cpu"
            return lambda: torch.autocast(device, dtype=dtype)
        return contextlib.nullcontext

    def _train_config(self, args):
        from .config import TrainConfig

        return TrainConfig(batch_size=args.per_device_train_batch_size, grad_accum=args.gradient_accumulation_steps,
                           lr=args.learning_rate, weight_decay=args.weight_decay,
                           betas=[args.adam_beta1, args.adam_beta2], warmup_ratio=self._warmup_ratio(args),
                           max_grad_norm=args.max_grad_norm or 0.0, max_length=self.max_length,
                           mixed_precision="bf16" if getattr(args, "bf16", False) else "no")

    @staticmethod
    def _warmup_ratio(args) -> float:
        """The repair loop's warm-up: transformers 5 folds warmup_ratio into warmup_steps (a float < 1 is a ratio)."""
        ratio = getattr(args, "warmup_ratio", None)
        if ratio is None:
            steps = getattr(args, "warmup_steps", 0) or 0
            ratio = steps if 0 < steps < 1 else 0.0
        return float(ratio)

    @staticmethod
    def _broadcast(model) -> None:
        """After a repair computed on every process: rank 0's LoRA weights everywhere (guards float drift)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        torch.distributed.broadcast(p.data, src=0)
