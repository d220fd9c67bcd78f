"""The safety subspace (SSI): per LoRA module, the top eigenvectors of the safety Fisher.

For every LoRA module i with delta_i = vec([B_i; A_i]) (P_i = r (d_in + d_out) entries),

    F_i = (1/N) sum_n g_n g_n^T,   g_n = d log p(y_n | x_n) / d delta_i   (summed over response tokens)

on N safety examples (harmful prompt -> safe response), and the basis V_i (P_i x k_i) of eigenvectors
covering rho of tr F_i (Guo, Wu, Yiu, SafeAnchor, arXiv:2604.17691, Sec. 3.1). F_i is never formed: its
eigenpairs come from the N x N Gram matrix (``subspace.fisher_basis``); only V_i, its eigenvalues and
tr F_i are kept, O(P k) memory per module.

``SafetySubspace.compute`` runs SSI on any PEFT model; ``refresh`` recomputes it at the model's current
point and merges it with the old one (after a domain, or every N steps); ``strengths`` gives OSCA's
per-module projection strength 1 - alpha_i; ``fraction`` measures how much of an update lies inside;
``save`` / ``load`` use safetensors.
"""
from __future__ import annotations

from typing import Literal

import torch

from . import subspace as ss
from .data.chat import encode
from .errors import SafeAnchorError

MergeMode = Literal["weighted", "residual", "union"]
TraceNorm = Literal["none", "max", "mean"]


DEFAULT_BUDGET_GIB = 1.5  # per-example gradients held at once during SSI (benchmarks/ssi_scale.py)


def _gather_rows(g: torch.Tensor, n: int, dist) -> torch.Tensor:
    """Every process's rows ``rank::world`` of an [N, P] matrix -> the whole matrix, in example order."""
    per = -(-n // dist.world)
    padded = torch.zeros(per, g.shape[1], dtype=g.dtype, device=g.device)
    padded[: g.shape[0]] = g
    parts = [torch.empty_like(padded) for _ in range(dist.world)]
    torch.distributed.all_gather(parts, padded)
    out = torch.empty(n, g.shape[1], dtype=g.dtype, device=g.device)
    for r, part in enumerate(parts):
        rows = len(range(r, n, dist.world))
        out[r::dist.world] = part[:rows]
    return out


def safety_gradients(model, examples: list[dict], tokenizer, max_length: int = 512, chunk: int = 8,
                     adapter_name: str = "default", memory_budget_gib: float = DEFAULT_BUDGET_GIB, dist=None):
    """Per-example scores g_n, one LoRA module at a time: yields (name, G [N, P_i]) (dropout off).

    All N rows of a module are needed at once (its N x N Gram matrix), but not all modules: modules are
    taken in groups whose N x P_i float32 rows fit in ``memory_budget_gib``, one pass over the examples
    per group (``subspace.module_groups``). Llama-2-7B with r 16 on q/k/v/o and N = 500 needs 31 GiB
    for all 128 modules at once; within the default 1.5 GiB budget it is 21 passes, and SSI's peak is
    about 3.7 GiB above the model (benchmarks/ssi_scale.py).
    G is kept on the model's device, so the eigendecomposition runs there too. With a data-parallel
    ``dist`` each process computes the rows of its share of the examples (``rank::world``) and one
    all-gather per module completes G on every process: the same bases, 1 / world of the passes' work.
    """
    encoded = [encode(tokenizer, e["prompt"], e["response"], max_length) for e in examples]
    encoded = [e for e in encoded if any(lbl != -100 for lbl in e["labels"])]
    if not encoded:
        raise SafeAnchorError("the safety calibration set is empty (or every response was truncated away); give "
                              "safety examples with non-empty responses (data.calibration_size > 0)")
    modules = ss.lora_modules(model, adapter_name)
    if not modules:
        raise SafeAnchorError("the model has no LoRA layers; wrap it with peft.get_peft_model(model, LoraConfig(...)) "
                              "before computing its safety subspace")
    device = next(model.parameters()).device
    sharded = dist is not None and dist.active
    mine = encoded[dist.rank::dist.world] if sharded else encoded
    for group in ss.module_groups(modules, len(encoded), memory_budget_gib * 2**30):
        grads = ss.per_sample_grads_chunked(model, mine, tokenizer.pad_token_id, chunk, modules=group,
                                            store_device=dist.device if sharded and dist.device is not None
                                            else device) if mine else \
            {n: torch.zeros(0, a.weight.numel() + b.weight.numel(), device=device) for n, (a, b) in group.items()}
        for name in list(grads):
            g = grads.pop(name)
            yield name, _gather_rows(g, len(encoded), dist) if sharded else g


def _on(basis: ss.FisherBasis, device) -> ss.FisherBasis:
    return ss.FisherBasis(basis.basis.to(device), basis.eigenvalues, basis.trace, basis.n_samples)


class SafetySubspace:
    """Per-module safety bases: ``bases[name]`` is a ``subspace.FisherBasis`` (V, eigenvalues, trace)."""

    def __init__(self, bases: dict[str, ss.FisherBasis], rho: float = 0.90, max_rank: int | None = None):
        ss._check_rho(rho)
        self.bases, self.rho, self.max_rank = dict(bases), rho, max_rank

    # -- SSI ------------------------------------------------------------------------------------------
    @classmethod
    def compute(cls, model, examples: list[dict], tokenizer, *, rho: float = 0.90, max_length: int = 512,
                chunk: int = 8, max_rank: int | None = None, adapter_name: str = "default",
                memory_budget_gib: float = DEFAULT_BUDGET_GIB, dist=None) -> "SafetySubspace":
        """SSI at the model's current point: V_i covers ``rho`` of tr F_i (at most ``max_rank`` columns);
        per-example gradients are held for at most ``memory_budget_gib`` at once, and a data-parallel
        ``dist`` shares the examples out (``safety_gradients``)."""
        grads = safety_gradients(model, examples, tokenizer, max_length, chunk, adapter_name, memory_budget_gib,
                                 dist)
        return cls({n: ss.fisher_basis(g, rho, max_rank=max_rank) for n, g in grads}, rho, max_rank)

    def refresh(self, model, examples: list[dict], tokenizer, *, merge: MergeMode = "weighted", max_length: int = 512,
                chunk: int = 8, adapter_name: str = "default",
                memory_budget_gib: float = DEFAULT_BUDGET_GIB, dist=None) -> "SafetySubspace":
        """SSI again at the model's current point, merged with this subspace (a new object).

        ``weighted``: eigendecomposition of F_old + F_new from the stored factors (``subspace.merge_weighted``);
        ``residual``: GPM-style growth, old columns kept (``subspace.merge_residual``); ``union``: the public
        SafeAnchor code's unweighted SVD of [V_old | V_new] (``subspace.merge_union``). Every mode stores
        trace = tr(F_old) + tr(F_new), the summed Fisher's, so alpha means the same whatever the mode."""
        if merge not in ("weighted", "residual", "union"):
            raise SafeAnchorError(f"unknown merge {merge!r}; use weighted, residual or union")
        grads = safety_gradients(model, examples, tokenizer, max_length, chunk, adapter_name, memory_budget_gib,
                                 dist)
        merged = {}
        for n, g in grads:
            old = self.bases.get(n)
            if merge == "residual" and old is not None:
                out = ss.merge_residual(_on(old, g.device), g, self.rho, max_rank=self.max_rank)
                out.trace += old.trace  # every merge mode keeps tr(F_old + F_new): alpha means one thing
                merged[n] = out
                continue
            new = ss.fisher_basis(g, self.rho, max_rank=self.max_rank)
            if old is None or old.basis.shape[1] == 0:
                merged[n] = new
            elif merge == "weighted":
                merged[n] = ss.merge_weighted(_on(old, g.device), new, self.rho)
            else:
                merged[n] = ss.merge_union(_on(old, g.device), new)
                merged[n].trace = old.trace + new.trace
        return SafetySubspace(merged, self.rho, self.max_rank)

    def merge(self, other: "SafetySubspace", mode: Literal["weighted", "union"] = "weighted") -> "SafetySubspace":
        """Merge with another subspace over the same modules (``weighted`` or ``union``; ``residual`` needs the
        new gradients: use ``refresh``)."""
        if mode not in ("weighted", "union"):
            raise SafeAnchorError(f"merge mode {mode!r} needs weighted or union here (residual: use refresh)")
        out = {}
        for n in set(self.bases) | set(other.bases):
            a, b = self.bases.get(n), other.bases.get(n)
            if a is None or a.basis.shape[1] == 0:
                out[n] = b
            elif b is None or b.basis.shape[1] == 0:
                out[n] = a
            else:
                b = _on(b, a.basis.device)
                out[n] = ss.merge_weighted(a, b, self.rho) if mode == "weighted" else ss.merge_union(a, b)
        return SafetySubspace(out, self.rho, self.max_rank)

    # -- OSCA's strength per module -------------------------------------------------------------------
    def alpha(self, lam: float = 0.5, trace_norm: TraceNorm = "mean", strict: bool = False) -> dict[str, float]:
        """alpha_i = max(0, 1 - lam tr(F_i) / Z), Z = mean_j tr F_j (default: scale-free, the same for any
        token count, LoRA scaling or number of merges), max_j tr F_j, or 1 (``none``, the paper as written);
        modules with tr F_j > 0 count. ``strict``: alpha_i = 0 everywhere (full projection)."""
        traces = {n: b.trace for n, b in self.bases.items()}
        if trace_norm == "none":
            z = 1.0
        elif trace_norm in ("max", "mean"):
            vals = [t for t in traces.values() if t > 0]
            z = (max(vals) if trace_norm == "max" else sum(vals) / len(vals)) if vals else 1.0
        else:
            raise SafeAnchorError(f"unknown trace_norm {trace_norm!r}; use none, max or mean")
        return {n: 0.0 if strict else max(0.0, 1.0 - lam * t / z) for n, t in traces.items()}

    def strengths(self, lam: float = 0.5, trace_norm: TraceNorm = "mean", strict: bool = False) -> dict[str, float]:
        """Projection strength s_i = 1 - alpha_i of OSCA's g <- g - s_i V_i V_i^T g."""
        return {n: 1.0 - a for n, a in self.alpha(lam, trace_norm, strict).items()}

    # -- measurements ---------------------------------------------------------------------------------
    def fraction(self, updates: dict[str, torch.Tensor]) -> dict[str, float]:
        """||V_i^T u_i|| / ||u_i|| for each module's vec([B; A]) update u_i (modules with a non-empty basis)."""
        return {n: ss.fraction_in_subspace(u, self.bases[n]) for n, u in updates.items()
                if n in self.bases and self.bases[n].basis.shape[1] > 0}

    def spectrum(self, alpha: dict[str, float] | None = None) -> dict:
        """Summary: module count, basis sizes k_i, traces and (given) alphas."""
        ks = [b.basis.shape[1] for b in self.bases.values()]
        traces = [b.trace for b in self.bases.values()]
        alphas = list((alpha or {}).values())
        nonempty = [k for k in ks if k > 0]
        out = {"modules": len(ks), "k_mean": sum(ks) / max(1, len(ks)), "k_min": min(ks, default=0),
               "k_max": max(ks, default=0), "k_nonempty_mean": sum(nonempty) / max(1, len(nonempty)),
               "trace_min": min(traces, default=0.0), "trace_max": max(traces, default=0.0)}
        if alpha is not None:
            out.update(alpha_mean=sum(alphas) / max(1, len(alphas)), alpha_max=max(alphas, default=0.0))
        return out

    def __len__(self) -> int:
        return len(self.bases)

    def randomised(self, seed: int = 0) -> "SafetySubspace":
        """Ablation: per module, a random orthonormal basis of the same size k_i, drawn (Gaussian, QR) within
        the coordinates this module's basis spans (its nonzero rows: at a fresh LoRA, B = 0, the safety
        gradient lives in the B block only, so a basis over every coordinate would be a weaker control),
        in place of the Fisher eigenvectors; eigenvalues and trace are kept, so alpha_i is unchanged. The
        draw depends only on ``seed``, the module name and the Fisher basis itself (a resumed run draws the
        same basis again)."""
        import zlib

        out = {}
        for name, b in self.bases.items():
            k = b.basis.shape[1]
            if k == 0:
                out[name] = b
                continue
            v = b.basis.detach().float().cpu()
            rows = torch.nonzero(v.abs().sum(1) > 0).flatten()
            tag = zlib.crc32(name.encode()) ^ zlib.crc32(v.numpy().tobytes())
            g = torch.Generator().manual_seed((int(seed) * 1_000_003 + tag) % (2 ** 63))
            q, _ = torch.linalg.qr(torch.randn(len(rows), k, generator=g, dtype=torch.float64))
            basis = torch.zeros(v.shape, dtype=torch.float64)
            basis[rows] = q
            out[name] = ss.FisherBasis(basis.to(b.basis.dtype).to(b.basis.device), b.eigenvalues, b.trace,
                                       b.n_samples)
        return SafetySubspace(out, self.rho, self.max_rank)

    def to(self, device) -> "SafetySubspace":
        """The same subspace with every basis on ``device`` (kept there: no copy per optimizer step)."""
        return SafetySubspace({n: _on(b, device) for n, b in self.bases.items()}, self.rho, self.max_rank)

    # -- files and state ------------------------------------------------------------------------------
    def save(self, path, model=None, meta: dict | None = None) -> None:
        """safetensors file with every basis and eigenvalue tensor; traces, rho and module shapes in its header."""
        ss.save_bases(path, {n: b.to_cpu() for n, b in self.bases.items()},
                      meta={"rho": self.rho, "max_rank": self.max_rank, **(meta or {})}, model=model)

    @classmethod
    def load(cls, path, model=None) -> "SafetySubspace":
        """Read ``save``'s file; with ``model``, every module must exist there with the same shape."""
        meta = ss.load_meta(path)
        return cls(ss.load_bases(path, model), meta.get("rho", 0.90), meta.get("max_rank"))

    def state_dict(self) -> dict:
        return {"rho": self.rho, "max_rank": self.max_rank,
                "bases": {n: vars(b.to_cpu()).copy() for n, b in self.bases.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> "SafetySubspace":
        return cls({n: ss.FisherBasis(**b) for n, b in state["bases"].items()}, state.get("rho", 0.90),
                   state.get("max_rank"))
