"""Safe LoRA (Hsu et al., NeurIPS 2024, arXiv:2405.16833): project LoRA updates onto the alignment matrix.

Rule, per adapted module (one weight W, d_out x d_in; LoRA delta s B A):

    V = W_aligned - W_unaligned                      alignment matrix, paired BY MODULE NAME
    C = V V^T / ||V||_F                              ``projector="paper"`` (paper and official code)
      = U_k U_k^T                                    ``projector="exact"``: top-k left singular vectors of V
                                                     covering ``exact_energy`` of ||V||_F^2 (idempotent)
    D = B - B_start                                  the increment of this domain (``project_increment``)
    cos = <vec(C D A), vec(D A)> / (||C D A|| ||D A||)     (s cancels)
    selected modules:  B <- B_start + C D            (A is never changed)

Selection (``select``): "number" projects the ``num_proj_layers`` modules with the lowest cosine
(10, the default of both public codes; exactly k, ties broken by model order, unlike the official
code's cos <= k-th value), "threshold" projects every module with cos <= ``threshold`` (0.5).
Diagnostic ``pdst`` = mean over modules of 1 / (1 + ||D - C D||_F) (the official code prints it,
"> 0.8 is better"). A module whose V is zero (alignment did not touch it) has no direction to
project onto: it is reported in ``no_alignment`` and never projected.

Sequential use: Safe LoRA is post hoc and one-shot; here it runs after each
domain on the run's single adapter. C ("paper") is not idempotent, so projecting the whole B after
every domain would multiply earlier domains' updates by C again and again. Default
``project_increment=True`` projects only this domain's increment D = B_t - B_{t-1} (B_{t-1} is the
adapter at the start of the domain, already projected; with ``train.reinit_adapter_per_domain`` it
is the fresh adapter's 0, see ``reset_adapters``). A also moves during the domain, so the kept part is
s B_{t-1} A_t, not s B_{t-1} A_{t-1}: the rule acts on B exactly as the paper does.
``project_increment=False`` projects the whole B (the paper's single-stage rule applied T times).

Where the weights come from: W_aligned is the aligned base the adapters sit on (``ctx.base_dir``, or
``cfg.model.name`` when that is already the aligned model); W_unaligned is ``unaligned_model``,
default the pipeline's ``cfg.model.name`` (the model before our alignment stage) when ``base_dir`` is
set. For Llama-2-7b-chat-hf pass meta-llama/Llama-2-7b-hf (the matching base; for Mistral-Instruct
the matching base version). Only the target weights are read, one module at a time, lazily from
safetensors files; names and shapes are checked before anything changes. All maths is float32
(IBM/SafeLoRA#2: fp16 vs bf16 changed results); C is never formed for "paper" (C D = V (V^T D) / ||V||).

``safe_lora_project(peft_model, aligned, unaligned, ...)`` is the same rule as a plain function over
any PEFT model (PEFT's post-hoc style); the method calls it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import SafeAnchorError
from ..subspace import iter_lora_layers
from .base import Method, MethodConfig, option, register

PEFT_PREFIX = "base_model.model."


def _h(default, help, check=None):
    return option(default, help, check=check)  # Literal annotations + check=: see config.check_fields


@dataclass
class SafeLoRAConfig(MethodConfig):
    unaligned_model: str = _h("", "the model before safety alignment (HF id, local dir, 'tiny-random'); '' = the "
                              "pipeline's model.name when the alignment stage ran (e.g. meta-llama/Llama-2-7b-hf "
                              "for Llama-2-7b-chat-hf)")
    projector: Literal["paper", "exact"] = _h(
        "paper", "'paper': C = V V^T / ||V||_F (paper, official code; not idempotent) or 'exact': U_k U_k^T from a "
        "truncated SVD of V (an orthogonal projector)")
    exact_energy: float = _h(0.9, "projector 'exact': smallest k whose singular values cover this fraction of "
                             "||V||_F^2", check="(0,1]")
    select: Literal["number", "threshold"] = _h(
        "number", "'number': project the num_proj_layers lowest-cosine modules; 'threshold': project every module "
        "with cosine <= threshold (official default: number)")
    num_proj_layers: int = _h(10, "modules projected in select 'number' (official default: 10)", check=">=0")
    threshold: float = _h(0.5, "cosine threshold of select 'threshold' (official default: 0.5)", check="[-1,1]")
    project_increment: bool = _h(True, "project only this domain's change of B (B_t - B_{t-1}); False projects the "
                                 "whole B after every domain (compounds the non-idempotent C)")


# -- weights by name ------------------------------------------------------------------------------------

class WeightSource:
    """Read-only, lazy name -> tensor access to one checkpoint (safetensors read one key at a time)."""

    def __init__(self, label: str, tensors: Mapping | None = None, files: dict[str, str] | None = None):
        self.label = label
        self._tensors = tensors  # in memory (a dict or a state_dict)
        self._files = files  # key -> safetensors / .bin file
        self._open: dict[str, object] = {}

    def keys(self) -> set[str]:
        return set(self._tensors) if self._tensors is not None else set(self._files)

    def _handle(self, key: str):
        from safetensors import safe_open

        fname = self._files[key]
        if fname not in self._open:
            if fname.endswith(".safetensors"):
                self._open[fname] = safe_open(fname, framework="pt", device="cpu")
            else:
                self._open[fname] = torch.load(fname, map_location="cpu", weights_only=True, mmap=True)
        return self._open[fname]

    def shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        h = self._handle(key)
        return tuple(h.get_slice(key).get_shape()) if hasattr(h, "get_slice") else tuple(h[key].shape)

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key].detach().to("cpu", torch.float32)
        h = self._handle(key)
        t = h.get_tensor(key) if hasattr(h, "get_tensor") else h[key]
        return t.to(torch.float32)


def _files_of_dir(path: Path) -> dict[str, str]:
    """key -> file: the shards the index names (a repo may also hold a differently named
    ``consolidated.safetensors``), else every safetensors file, else ``pytorch_model*.bin``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: str(path / f) for k, f in json.loads(index.read_text())["weight_map"].items()}
    found = {}
    for f in sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin")):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt", device="cpu") as h:
                keys = list(h.keys())
        else:
            keys = list(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        found.update({k: str(f) for k in keys})
    return found


def _hub_dir(repo: str) -> Path:
    """Local snapshot of a hub model's safetensors weights (from the cache when offline)."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo, allow_patterns=["model*.safetensors", "model.safetensors.index.json"]))
    except Exception as exc:  # noqa: BLE001 - offline, gated or unknown repo: one message for all
        raise SafeAnchorError(f"cannot fetch the weights of {repo!r} from the hub ({type(exc).__name__}); check the "
                              f"id, network and HF_TOKEN, or pass a local directory") from None
    if not any(path.glob("*.safetensors")):
        raise SafeAnchorError(f"{repo!r} has no model*.safetensors weights; download it and pass a local directory")
    return path


def weight_source(spec) -> WeightSource:
    """A WeightSource from a dict of tensors, an nn.Module (its state_dict), a local HF directory, a hub id,
    'tiny-random' (the test model) or 'embedded:smollm2'."""
    from ..models import EMBEDDED, TINY

    if isinstance(spec, WeightSource):
        return spec
    if isinstance(spec, nn.Module):
        return WeightSource(type(spec).__name__, tensors=spec.state_dict())
    if isinstance(spec, Mapping):
        return WeightSource("tensors", tensors=spec)
    spec = str(spec)
    if spec == TINY:
        from ..models import tiny_model

        return WeightSource(TINY, tensors=tiny_model().state_dict())
    if spec == EMBEDDED:
        from ..models import embedded_hf_dir

        spec = str(embedded_hf_dir())
    if spec.endswith(".gguf"):
        raise SafeAnchorError(f"Safe LoRA cannot read GGUF weights ({spec}); convert to an HF directory first")
    path = Path(spec)
    if not path.is_dir():
        if spec.startswith((".", "/")) or spec.count("/") > 1:
            raise SafeAnchorError(f"model directory {spec} does not exist")
        path = _hub_dir(spec)
    files = _files_of_dir(path)
    if not files:
        raise SafeAnchorError(f"{path} has no *.safetensors or pytorch_model*.bin weights")
    return WeightSource(spec, files=files)


def _resolve(source: WeightSource, module: str) -> str:
    """The checkpoint key of ``module``'s weight: exact name, else the one key that matches up to a prefix
    (a checkpoint saved from the bare decoder has no leading 'model.')."""
    key = module + ".weight"
    keys = source.keys()
    if key in keys:
        return key
    hits = [k for k in keys if k.endswith("." + key) or key.endswith("." + k)]
    if len(hits) == 1:
        return hits[0]
    what = "no weight" if not hits else f"{len(hits)} candidate weights"
    raise SafeAnchorError(f"Safe LoRA: {what} named like {key!r} in {source.label}; aligned and unaligned models "
                          f"must have the same architecture and parameter names")


# -- the rule -------------------------------------------------------------------------------------------

def lora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, nn.Module]:
    """Checkpoint-style module name (PEFT prefix removed) -> Linear PEFT LoRA layer holding ``adapter_name``
    (``subspace.iter_lora_layers``)."""
    out = {}
    for name, module in iter_lora_layers(model, adapter_name):
        if getattr(module, "fan_in_fan_out", False):
            raise SafeAnchorError(f"{name} stores its weight transposed (fan_in_fan_out); Safe LoRA here covers "
                                  f"nn.Linear layers only")
        out[name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name] = module
    return out


def check_sources(peft_model, aligned, unaligned, adapter_name: str = "default") -> dict[str, tuple[str, str]]:
    """module -> (aligned key, unaligned key) for every LoRA layer, after checking names and shapes."""
    layers = lora_layers(peft_model, adapter_name)
    if not layers:
        raise SafeAnchorError(f"the model has no LoRA layers of adapter {adapter_name!r}")
    keys = {}
    for name, layer in layers.items():
        ka, ku = _resolve(aligned, name), _resolve(unaligned, name)
        want = tuple(layer.get_base_layer().weight.shape)
        for src, k in ((aligned, ka), (unaligned, ku)):
            if src.shape(k) != want:
                raise SafeAnchorError(f"Safe LoRA: {k} has shape {src.shape(k)} in {src.label} but the model's "
                                      f"{name} is {want}; use the matching aligned/unaligned checkpoints")
        keys[name] = (ka, ku)
    return keys


def project_onto(v: torch.Tensor, d: torch.Tensor, projector: str = "paper", energy: float = 0.9) -> torch.Tensor:
    """C D for C = V V^T / ||V||_F ("paper") or U_k U_k^T ("exact"), without forming C; float32 in, out."""
    if projector == "paper":
        return v @ (v.T @ d) / torch.linalg.matrix_norm(v)
    if projector == "exact":
        u, s, _ = torch.linalg.svd(v, full_matrices=False)
        cum = torch.cumsum(s.double() ** 2, 0)
        k = int(torch.searchsorted(cum, energy * cum[-1]).item()) + 1
        uk = u[:, : min(k, u.shape[1])]
        return uk @ (uk.T @ d)
    raise SafeAnchorError(f"unknown projector {projector!r}; use paper or exact")


def lora_cosine(d: torch.Tensor, cd: torch.Tensor, a: torch.Tensor) -> float | None:
    """cos(vec(CD A), vec(D A)) via r x r Gram matrices: <X A, Y A>_F = sum((X^T Y) * (A A^T))."""
    g = (a @ a.T).double()
    d, cd = d.double(), cd.double()
    inner = ((cd.T @ d) * g).sum()
    n1, n2 = ((cd.T @ cd) * g).sum(), ((d.T @ d) * g).sum()
    if n1 <= 0 or n2 <= 0:
        return None
    return float(inner / (n1.sqrt() * n2.sqrt()))


def safe_lora_project(peft_model, aligned, unaligned, *, adapter_name: str = "default", projector: str = "paper",
                      exact_energy: float = 0.9, select: str = "number", num_proj_layers: int = 10,
                      threshold: float = 0.5, start: dict[str, torch.Tensor] | None = None) -> dict:
    """Safe LoRA on ``peft_model`` in place: project the selected modules' ``lora_B`` (or their change since
    ``start``: module -> B at the start) onto the alignment matrix W_aligned - W_unaligned.

    ``aligned`` / ``unaligned``: anything ``weight_source`` takes (dict of tensors, nn.Module, local
    directory, hub id). Returns {"projected", "cosine", "pdst", "no_alignment", ...}.
    """
    if select not in ("number", "threshold"):
        raise SafeAnchorError(f"unknown select {select!r}; use number or threshold")
    if projector not in ("paper", "exact"):
        raise SafeAnchorError(f"unknown projector {projector!r}; use paper or exact")
    aligned, unaligned = weight_source(aligned), weight_source(unaligned)
    keys = check_sources(peft_model, aligned, unaligned, adapter_name)
    layers = lora_layers(peft_model, adapter_name)
    candidates, cosine, pdst, no_alignment = {}, {}, [], []
    with torch.no_grad():
        for name, layer in layers.items():  # one module at a time: V, C D never held for all modules
            b_lin, a = layer.lora_B[adapter_name], layer.lora_A[adapter_name].weight.float()
            b = b_lin.weight.float()
            b0 = start[name].to(b.device, torch.float32) if start is not None else torch.zeros_like(b)
            ka, ku = keys[name]
            v = (aligned.get(ka) - unaligned.get(ku)).to(b.device)
            if not torch.any(v):
                no_alignment.append(name)
                continue
            d = b - b0
            cd = project_onto(v, d, projector, exact_energy)
            pdst.append(1.0 / (1.0 + float(torch.linalg.matrix_norm(d - cd))))
            cosine[name] = lora_cosine(d, cd, a)
            if cosine[name] is not None:
                candidates[name] = (b0 + cd, cosine[name])
        ranked = sorted(candidates, key=lambda n: candidates[n][1])  # stable: ties keep model order
        chosen = ranked[:max(0, num_proj_layers)] if select == "number" else \
            [n for n in ranked if candidates[n][1] <= threshold]
        for name in chosen:
            w = layers[name].lora_B[adapter_name].weight
            w.copy_(candidates[name][0].to(w.dtype))
    order = [n for n in layers if n in chosen]
    return {"projected": order, "n_projected": len(order), "modules": len(layers),
            "cosine": {n: None if c is None else round(c, 6) for n, c in cosine.items()},
            "pdst": round(sum(pdst) / len(pdst), 6) if pdst else None, "no_alignment": no_alignment,
            "projector": projector, "select": select, "increment": start is not None}


# -- the method -----------------------------------------------------------------------------------------

@register
class SafeLoRA(Method):
    name = "safelora"
    paper = "Hsu et al., Safe LoRA: the Silver Lining of Reducing Safety Risks when Fine-tuning LLMs (NeurIPS 2024)"
    summary = "after each domain, project low-cosine modules' LoRA increment onto W_aligned - W_unaligned"
    config_cls = SafeLoRAConfig

    def __init__(self, options):
        super().__init__(options)
        self._sources: tuple[WeightSource, WeightSource] | None = None
        self._start: dict[str, torch.Tensor] | None = None
        self.records: list[dict] = []

    def sources(self, ctx) -> tuple[WeightSource, WeightSource]:
        """(aligned, unaligned); opened on first use (a resumed run skips ``prepare``)."""
        if self._sources is None:
            aligned = str(ctx.base_dir) if ctx.base_dir is not None else ctx.cfg.model.name
            unaligned = self.options.unaligned_model or (ctx.cfg.model.name if ctx.base_dir is not None else "")
            if not unaligned:
                raise SafeAnchorError(f"Safe LoRA needs the model before safety alignment: set method_options.safelora."
                                      f"unaligned_model (e.g. meta-llama/Llama-2-7b-hf for {ctx.cfg.model.name})")
            if unaligned == aligned:
                raise SafeAnchorError(f"Safe LoRA: aligned and unaligned model are both {aligned!r}; set "
                                      f"method_options.safelora.unaligned_model to the model before alignment")
            self._sources = (weight_source(aligned), weight_source(unaligned))
        return self._sources

    def prepare(self, ctx) -> dict:
        aligned, unaligned = self.sources(ctx)
        keys = check_sources(ctx.model, aligned, unaligned)  # fail before any training
        return {"aligned": aligned.label, "unaligned": unaligned.label, "modules": len(keys)}

    def before_domain(self, ctx, t: int, domain: str) -> None:
        self._start = None
        if self.options.project_increment:
            self._start = {n: layer.lora_B["default"].weight.detach().float().clone()
                           for n, layer in lora_layers(ctx.model).items()}

    def reset_adapters(self, ctx) -> None:
        """Fresh LoRA (B = 0): the domain's increment is then measured from zero."""
        super().reset_adapters(ctx)
        self.before_domain(ctx, 0, "")

    def after_domain(self, ctx, t: int, domain: str) -> dict:
        o = self.options
        aligned, unaligned = self.sources(ctx)
        rec = safe_lora_project(ctx.model, aligned, unaligned, projector=o.projector, exact_energy=o.exact_energy,
                                select=o.select, num_proj_layers=o.num_proj_layers, threshold=o.threshold,
                                start=self._start)
        self.records.append({"domain": domain, "projected": rec["projected"], "pdst": rec["pdst"]})
        return rec

    def state_dict(self) -> dict:
        return {"records": list(self.records)}

    def load_state_dict(self, state: dict, ctx) -> None:
        self.records = list(state.get("records", []))
