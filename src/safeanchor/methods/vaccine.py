"""Vaccine (Huang, Hu, Liu, NeurIPS 2024, arXiv:2402.01109): perturbation-aware alignment, once, before domain 1.

Rule. min_w max_{||eps|| <= rho} L(w; e_l <- e_l + eps_l for every attention output e_l). The first-order
inner solution uses ONE global norm over every hooked layer:

    g_l   = dL / d e_l                                   (pass 1, on the batch)
    eps_l = rho * g_l / (sqrt(sum_l ||g_l||^2) + 1e-7)
    step on  grad_w L(w; e_l + eps_l)                    (pass 2, same batch, eps a constant)

Each optimizer step of the vaccination therefore costs two forward/backward passes. Pass 1 takes
``torch.autograd.grad`` of the loss with respect to the attention outputs only, so it leaves the
parameters' accumulated gradients alone (the official code zeroes them, which would drop earlier
micro-batches under gradient accumulation). The perturbation is per micro-batch, like the official
``training_step``.

Hooked modules are matched by behaviour, not by class: every outermost module whose class name ends in
"Attention" or whose attribute name is ``self_attn`` (Llama, Mistral, Qwen2, ... decoder layers); the
official code lists LlamaAttention/OPTAttention only and misses Mistral. The perturbed tensor is the
hidden-state output (``output[0]`` of the tuple, or the output itself).

Sequential use. ``prepare`` runs ``steps`` perturbation-aware steps on the safety
calibration set (harmful prompt -> refusal, the analogue of Vaccine's BeaverTails safe pairs) with the
run's own LoRA; the domains are then plain sequential LoRA (no per-step change, as Vaccine's
fine-tuning stage is plain SFT). Defaults and choices:
- ``rho`` = 2: ``train.py --rho`` default and the README's run (``rho_experiment.sh`` sweeps it).
- ``steps`` = 0: as many steps as one domain of the run would take on the calibration set
  (``train.steps_per_domain`` or ``train.epochs`` epochs). The official alignment run is 50 epochs of
  2,000 BeaverTails pairs from an unaligned base model at lr 1e-3 with r 8 / alpha 4 (s = 0.5); here
  the model is already aligned, the LoRA is the run's (s = alpha / r, 2 at the paper's r 16 / alpha 32)
  and the data is N_s calibration pairs, so the budget follows the run; set ``steps`` (or ``lr``) to
  reproduce the repo's budget.
- ``merge`` = False: the vaccination LoRA is the adapter the domains continue (the repo's
  ``single_lora`` scripts). Every stage is then a standard PEFT adapter on the shared aligned base,
  ``disable_adapter()`` still gives the aligned base (reference for KL-style terms and evaluation),
  and every method of the library continues one adapter. ``merge=True`` is
  Vaccine's default "double LoRA": s B A is added to the frozen base weights after vaccination and the
  LoRA restarts (A Kaiming, B = 0); the vaccinated base then exists only in this run (saved as
  ``vaccine_adapter/`` and in the method state; ``load_state_dict`` re-merges it on resume), and the
  per-domain adapters are relative to it. Each ``adapters/<t>-<domain>`` then holds the vaccination and
  the domain LoRA stacked as one standard LoRA of rank 2 r (``models.save_lora_sum``), so
  ``PeftModel.from_pretrained(aligned_base, path)`` is the model after the step either way.
- ``train.reinit_adapter_per_domain``: every domain starts from the vaccinated model, not from the
  aligned base (which would discard the vaccination): with ``merge`` a fresh LoRA (A Kaiming, B = 0)
  on the vaccinated base, without it the LoRA is restored to its value after vaccination (kept in the
  method state).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..data.chat import mean_token_nll, plain_head
from ..errors import SafeAnchorError
from ..subspace import iter_lora_layers
from ..train import steps_for, train_steps
from .base import Method, MethodConfig, option, register

VACCINE_STREAM = 61_000  # seed stream of the vaccination batches


def _h(default, help, check=None):
    return option(default, help, check=check)  # Literal annotations + check=: see config.check_fields


@dataclass
class VaccineConfig(MethodConfig):
    rho: float = _h(2.0, "perturbation radius rho over all attention outputs together (official default: 2)",
                    check=">=0")
    steps: int = _h(0, "vaccination optimizer steps on the safety calibration set; 0 = as many as one domain "
                    "(train.steps_per_domain or train.epochs epochs); the official run is 50 epochs", check=">=0")
    lr: float = _h(0.0, "vaccination learning rate (0 = train.lr; official alignment: 1e-3 at LoRA scale 0.5)",
                   check=">=0")
    merge: bool = _h(False, "merge the vaccination LoRA into the base and restart the LoRA (Vaccine's double "
                     "LoRA); False continues the same adapter over the domains")


# -- the perturbation -----------------------------------------------------------------------------------

def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Outermost modules named ``self_attn`` or whose class name ends in "Attention", in model order."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not (leaf == "self_attn" or type(module).__name__.endswith("Attention")):
            continue
        if any(name.startswith(p + ".") for p in out):
            continue
        out[name] = module
    return out


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def perturbation(grads: dict[str, torch.Tensor], rho: float) -> dict[str, torch.Tensor]:
    """eps_l = rho * g_l / (||g|| + 1e-7), ||g|| the norm of all layers' gradients concatenated."""
    total = torch.sqrt(sum(g.float().pow(2).sum() for g in grads.values()))
    return {n: (rho * g / (total + 1e-7)).to(g.dtype) for n, g in grads.items()}


class _Hooks:
    """Forward hooks on the attention modules: ``capture`` records each output, ``add`` replaces the
    output by output + eps. Removed on exit, also after an exception."""

    def __init__(self, modules: dict[str, nn.Module], add: dict[str, torch.Tensor] | None = None):
        self.modules, self.add = modules, add
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []

    def _hook(self, name):
        def hook(module, args, output):
            h = _hidden(output)
            if self.add is None:
                self.outputs.setdefault(name, h)  # the forward's output, not a recomputation's
                return None
            if name not in self.add:
                return None
            h = h + self.add[name].to(h.dtype)  # eps is a constant: no gradient flows through it
            return type(output)((h, *output[1:])) if isinstance(output, (tuple, list)) else h
        return hook

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


def vaccine_backward(model: nn.Module, batch: dict, rho: float, scale: float = 1.0,
                     modules: dict[str, nn.Module] | None = None, backward=None) -> dict:
    """One Vaccine micro-step: pass 1 finds eps from dL/d(attention outputs); pass 2 backpropagates
    ``scale`` * L(perturbed) into the parameters' .grad. Returns the losses, ||g|| and eps (detached)."""
    modules = attention_modules(model) if modules is None else modules
    if not modules:
        raise SafeAnchorError("Vaccine found no attention modules (named self_attn or *Attention) to perturb")
    plain_head(model)  # its one-time check forward must not run inside the capturing hooks
    with _Hooks(modules) as cap:
        clean = mean_token_nll(model, batch)
    outs = {n: o for n, o in cap.outputs.items() if o.requires_grad}
    if not outs:
        raise SafeAnchorError("Vaccine: no attention output depends on the trainable parameters; adapt attention "
                              "(lora.target_modules) or earlier layers")
    grads = dict(zip(outs, torch.autograd.grad(clean, list(outs.values()))))
    del outs, cap
    eps = perturbation({n: g.detach() for n, g in grads.items()}, rho)
    with _Hooks(modules, add=eps):
        perturbed = mean_token_nll(model, batch)
        (backward or torch.Tensor.backward)(perturbed * scale)
    norm = math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads.values()))
    return {"clean_loss": clean.detach(), "loss": perturbed.detach(), "grad_norm_hidden": norm, "eps": eps}


class _VaccineStep(Method):
    """The two-pass step, used only inside ``Vaccine.prepare``'s own ``train_steps``."""

    name = "vaccine-step"

    def __init__(self, parent: "Vaccine"):
        super().__init__(parent.options)

    def compute_grads(self, ctx, micro_batches: list[dict]) -> dict:
        n = len(micro_batches)
        modules = attention_modules(ctx.model)
        logs = {"loss": 0.0, "clean_loss": 0.0, "hidden_grad_norm": 0.0}
        for batch in micro_batches:
            with ctx.autocast():  # both passes' forwards (their backwards run inside: Vaccine needs dL/dh first)
                out = vaccine_backward(ctx.model, batch, self.options.rho, 1.0 / n, modules, ctx.backward)
            ctx.check_finite(out["loss"], "Vaccine perturbed loss")
            logs["loss"] += float(out["loss"]) / n
            logs["clean_loss"] += float(out["clean_loss"]) / n
            logs["hidden_grad_norm"] += out["grad_norm_hidden"] / n
        return logs


# -- the method -----------------------------------------------------------------------------------------

def _merge_into_base(ctx, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """W_base += s B A for every listed LoRA layer, once per model (idempotent across resumes)."""
    if getattr(ctx.model, "_vaccine_merged", False):
        return
    layers = dict(iter_lora_layers(ctx.model))
    with torch.no_grad():
        for name, (a, b, s) in factors.items():
            w = layers[name].get_base_layer().weight
            w.add_((s * (b.float() @ a.float())).to(w.device, w.dtype))
    ctx.model._vaccine_merged = True


@register
class Vaccine(Method):
    name = "vaccine"
    paper = "Huang, Hu, Liu, Vaccine: Perturbation-aware Alignment for LLMs against Harmful Fine-tuning (NeurIPS 2024)"
    summary = "perturbation-aware safety alignment of the LoRA once before domain 1, then plain sequential LoRA"
    config_cls = VaccineConfig

    def __init__(self, options):
        super().__init__(options)
        self.merged: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.vaccinated: dict[str, torch.Tensor] = {}  # LoRA after vaccination (reinit without merge only)

    def prepare(self, ctx) -> dict:
        from ..models import lora_factors, reset_lora

        if not ctx.calibration:
            raise SafeAnchorError("Vaccine needs safety data: set data.calibration_size > 0")
        steps = self.options.steps or steps_for(ctx.cfg, len(ctx.calibration))
        ckpt = ctx.run_dir / "checkpoints" / "vaccine.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        hooked = list(attention_modules(ctx.model))
        history = train_steps(ctx, ctx.calibration, steps, stream=VACCINE_STREAM, ckpt=ckpt,
                              lr=self.options.lr or None, desc="vaccine", method=_VaccineStep(self))
        if ctx.dist.is_main:
            ckpt.unlink(missing_ok=True)
        rec = {"steps": steps, "rho": self.options.rho, "hooked_modules": len(hooked),
               "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
               "first_clean_loss": history[0]["clean_loss"], "final_clean_loss": history[-1]["clean_loss"]}
        if self.options.merge:
            if ctx.dist.is_main:
                ctx.model.save_pretrained(ctx.run_dir / "vaccine_adapter")
            factors = {n: (a.cpu().clone(), b.cpu().clone(), s) for n, (a, b, s) in lora_factors(ctx.model).items()}
            _merge_into_base(ctx, factors)
            reset_lora(ctx.model, ["default"])
            self.merged = factors
            rec["merged_modules"] = len(factors)
        elif ctx.cfg.train.reinit_adapter_per_domain:
            self.vaccinated = {n: p.detach().cpu().clone() for n, p in ctx.trainable().items()}
        return rec

    def reset_adapters(self, ctx) -> None:
        """Back to the vaccinated model: a fresh LoRA on the merged base, or the vaccinated LoRA itself."""
        if self.options.merge:
            super().reset_adapters(ctx)
            return
        params = ctx.trainable()
        if set(params) != set(self.vaccinated):
            raise SafeAnchorError("Vaccine: no vaccinated LoRA to restore for train.reinit_adapter_per_domain "
                                  "(run directory from another config?); use another --out")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.vaccinated[n].to(p.device, p.dtype))

    def save_adapter(self, ctx, path) -> None:
        """With ``merge`` the base in memory is the vaccinated one: save vaccination + LoRA as one adapter."""
        from ..models import lora_factors, save_lora_sum

        if self.merged:
            save_lora_sum(ctx.model, path, [self.merged, lora_factors(ctx.model)])
        else:
            super().save_adapter(ctx, path)

    def state_dict(self) -> dict:
        return {"merged": self.merged, "vaccinated": self.vaccinated}

    def load_state_dict(self, state: dict, ctx) -> None:
        """On a fresh model (resume) re-apply the merged vaccination; the LoRA tensors come from the stage."""
        self.merged = dict(state.get("merged", {}))
        self.vaccinated = dict(state.get("vaccinated", {}))
        if self.merged:
            _merge_into_base(ctx, self.merged)
