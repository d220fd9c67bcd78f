"""Subspace maths for SafeAnchor: per-sample LoRA gradients, Fisher bases, projection, basis merges.

Conventions (the rest of the library relies on them)
- For one PEFT LoRA module i with ``A = lora_A.weight`` (r x d_in) and ``B = lora_B.weight``
  (d_out x r), the parameter vector is delta_i = vec([B; A]) = concat(B.flatten(), A.flatten()),
  P_i = r (d_in + d_out) entries. Every gradient, basis row and projection here uses that order.
- g_n = d log p(y_n | x_n) / d delta_i is the score of one example: the gradient of its response-token
  log-likelihood summed over tokens (not HF's batch-mean loss), with dropout off. It is minus the
  gradient of that example's summed NLL; the sign is irrelevant for F, projections and fractions.
- The empirical (uncentred) Fisher is F = G^T G / N with G = [g_1; ...; g_N] (N x P). It is never
  formed: its eigenpairs come from the N x N Gram matrix K = G G^T / N.
- A basis is V (P x k) with orthonormal columns; projection is g - s V (V^T g), never with V V^T.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from .data.chat import plain_head, sequence_logprob
from .errors import SafeAnchorError

__all__ = [
    "lora_modules", "iter_lora_layers", "module_groups", "flat_grad", "set_flat_grad",
    "per_sample_grads", "per_sample_grads_chunked", "per_sample_grads_loop",
    "FisherBasis", "fisher_basis", "project_out", "fraction_in_subspace",
    "merge_weighted", "merge_residual", "merge_union", "principal_angles", "grassmann_distance",
    "save_bases", "load_bases", "load_meta", "module_shape",
]

# Columns of G processed at once when forming K = G G^T and V = G^T U: bounds the float64 copy.
_COLUMN_BLOCK = 1 << 16


# -- LoRA parameters as vec([B; A]) --------------------------------------------------------------------

def iter_lora_layers(model: nn.Module, adapter_name: str | None = None):
    """Yields (``named_modules()`` name, layer) of PEFT LoRA layers (modules with ``lora_A`` / ``lora_B``
    ModuleDicts), in model order: the library's one walk over a model's LoRA layers.

    ``adapter_name`` None: every LoRA layer, whatever adapters and factor types it holds. Otherwise only
    the layers holding ``adapter_name`` with ``nn.Linear`` factors (PEFT's Linear LoRA; embedding and conv
    LoRA keep their factors differently and are not covered by this module's conventions); a layer
    where it is a LoRA variant (DoRA: its magnitude vector is outside vec([B; A])) is an error.
    """
    for name, module in model.named_modules():
        a_dict, b_dict = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(a_dict, nn.ModuleDict) or not isinstance(b_dict, nn.ModuleDict):
            continue
        if adapter_name is None:
            yield name, module
            continue
        if adapter_name not in a_dict or adapter_name not in b_dict:
            continue
        if adapter_name in (getattr(module, "lora_variant", None) or {}):
            raise SafeAnchorError(f"{name} uses a LoRA variant (e.g. DoRA) for adapter {adapter_name!r}; "
                                  "safeanchor's subspaces cover plain LoRA only: use LoraConfig(use_dora=False)")
        if isinstance(a_dict[adapter_name], nn.Linear) and isinstance(b_dict[adapter_name], nn.Linear):
            yield name, module


def lora_modules(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[nn.Linear, nn.Linear]]:
    """``named_modules()`` name of every Linear LoRA layer of ``adapter_name`` -> (lora_A, lora_B), in model
    order (``iter_lora_layers``: DoRA is an error, non-Linear LoRA layers are left out)."""
    return {name: (layer.lora_A[adapter_name], layer.lora_B[adapter_name])
            for name, layer in iter_lora_layers(model, adapter_name)}


def module_shape(a_lin: nn.Linear, b_lin: nn.Linear) -> tuple[int, int, int]:
    """(r, d_in, d_out) of one LoRA module; P = r (d_in + d_out)."""
    r, d_in = a_lin.weight.shape
    return r, d_in, b_lin.weight.shape[0]


def flat_grad(a_lin: nn.Linear, b_lin: nn.Linear) -> torch.Tensor:
    """vec([grad B; grad A]) (zeros where a gradient is None), in the weights' dtype and device."""
    parts = []
    for lin in (b_lin, a_lin):
        g = lin.weight.grad
        parts.append(torch.zeros_like(lin.weight).flatten() if g is None else g.flatten())
    return torch.cat(parts)


def set_flat_grad(a_lin: nn.Linear, b_lin: nn.Linear, vec: torch.Tensor) -> None:
    """Write vec = vec([grad B; grad A]) back into B.grad and A.grad (creating them if None)."""
    nb = b_lin.weight.numel()
    if vec.shape != (nb + a_lin.weight.numel(),):
        raise ValueError(f"vec has shape {tuple(vec.shape)}, expected ({nb + a_lin.weight.numel()},)")
    for lin, part in ((b_lin, vec[:nb]), (a_lin, vec[nb:])):
        w = lin.weight
        part = part.reshape(w.shape).to(w.device, w.dtype)
        if w.grad is None:
            w.grad = part.clone()
        else:
            w.grad.copy_(part)


# -- per-sample gradients ------------------------------------------------------------------------------

def _summed_loglik(model: nn.Module, batch: dict) -> torch.Tensor:
    """sum_n log p(y_n | x_n) in float32, response tokens only (labels[:, 1:] != -100 after the shift)."""
    return sequence_logprob(model, batch).sum()


class _Frozen:
    """Context: model in eval() (dropout off), the LoRA weights differentiable, grad mode on; all restored."""

    def __init__(self, model: nn.Module, modules: dict[str, tuple[nn.Linear, nn.Linear]]):
        self.model = model
        self.weights = [lin.weight for pair in modules.values() for lin in pair]

    def __enter__(self):
        self.training = self.model.training
        self.flags = [w.requires_grad for w in self.weights]
        self.grad_mode = torch.is_grad_enabled()
        self.model.eval()
        for w in self.weights:
            w.requires_grad_(True)
        torch.set_grad_enabled(True)
        return self

    def __exit__(self, *exc):
        torch.set_grad_enabled(self.grad_mode)
        for w, flag in zip(self.weights, self.flags):
            w.requires_grad_(flag)
        self.model.train(self.training)
        return False


def _check_modules(modules: dict[str, tuple[nn.Linear, nn.Linear]]) -> None:
    for name, (a_lin, b_lin) in modules.items():
        if a_lin.bias is not None or b_lin.bias is not None:
            raise SafeAnchorError(f"LoRA module {name} has a bias in lora_A/lora_B; per-sample gradients cover "
                                  "weights only; use LoraConfig(lora_bias=False)")


def per_sample_grads(model: nn.Module, batch: dict, modules: dict[str, tuple[nn.Linear, nn.Linear]],
                     chunk_size: int | None = None, store_dtype: torch.dtype = torch.float32,
                     store_device="cpu") -> dict[str, torch.Tensor]:
    """Per-example scores g_n = d log p(y_n | x_n) / d vec([B; A]) for every module: {name: [N, P_i]} on
    ``store_device`` (default the CPU).

    One batched forward and one backward per chunk of ``chunk_size`` examples (None: the whole batch).
    A forward hook on each lora_A / lora_B saves the call's input x and puts a tensor hook on its
    output y = W x. The backward of L = sum_n log p(y_n | x_n) hands that hook dL/dy, and since
    examples do not interact in the forward, dL/dy[n] = d log p(y_n | x_n) / dy[n], so
        grad_W[n] = sum_t dL/dy[n, t, :]^T x[n, t, :]        (outer products summed over tokens)
    (PEFT's scaling s, and B for the A-block, are already inside dL/dy). The tensor hook folds each
    dL/dy into an [n, d_out, d_in] buffer at once, so no module's dL/dy outlives its backward step.
    Backpropagating HF's batch-mean loss instead would scale every row by 1 / (response tokens).
    The parameters' ``.grad`` are left untouched (``torch.autograd.grad``, not ``backward``).
    """
    _check_modules(modules)
    n_total = batch["input_ids"].shape[0]
    step = chunk_size or n_total
    out = {name: torch.zeros(n_total, a.weight.numel() + b.weight.numel(), dtype=store_dtype, device=store_device)
           for name, (a, b) in modules.items()}
    acc: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    fired: set[int] = set()
    lins = [lin for pair in modules.values() for lin in pair]

    def save_io(lin, args, y):
        seen.add(id(lin))
        # Non-reentrant activation checkpointing re-runs this hook in backward; that recomputed y never
        # receives a gradient, so nothing counts twice. Reentrant checkpointing (no grad in the first
        # forward) is invisible to autograd.grad and is reported below rather than giving zeros.
        if not y.requires_grad:
            return
        x, buf = args[0].detach(), acc[id(lin)]
        n, d_out, d_in = buf.shape
        if x.shape[0] != n:
            raise SafeAnchorError(f"a LoRA layer saw an input with leading dimension {x.shape[0]} for a batch of "
                                  f"{n}; per-sample gradients need [batch, ..., features] inputs (no packing)")

        def fold(dy):
            fired.add(id(lin))
            buf.add_(torch.bmm(dy.reshape(n, -1, d_out).float().transpose(1, 2), x.reshape(n, -1, d_in).float()))

        # A layer called twice (weight sharing) registers two hooks; both calls' outer products add up.
        y.register_hook(fold)

    handles = []
    plain_head(model)  # its one-time check forward runs before the hooks exist
    try:
        with _Frozen(model, modules):
            handles = [lin.register_forward_hook(save_io) for lin in lins]
            for start in range(0, n_total, step):
                chunk = {k: batch[k][start:start + step] for k in ("input_ids", "attention_mask", "labels")}
                n = chunk["input_ids"].shape[0]
                acc.update({id(lin): torch.zeros(n, *lin.weight.shape, device=lin.weight.device) for lin in lins})
                seen.clear()
                fired.clear()
                loss = _summed_loglik(model, chunk)
                absent = _absent(modules, seen)
                if absent:
                    raise SafeAnchorError(f"{len(absent)} LoRA layer(s), e.g. {absent[0]}, did not run in the "
                                          "forward pass; enable the adapter and unmerge it before computing gradients")
                torch.autograd.grad(loss, [lin.weight for lin in lins], allow_unused=True)
                absent = _absent(modules, fired)
                if absent:
                    raise SafeAnchorError(f"no gradient reached {len(absent)} LoRA layer(s), e.g. {absent[0]}; "
                                          "reentrant gradient checkpointing hides them: disable it or use "
                                          "use_reentrant=False")
                for name, (a_lin, b_lin) in modules.items():
                    g = torch.cat([acc[id(b_lin)].reshape(n, -1), acc[id(a_lin)].reshape(n, -1)], dim=1)
                    out[name][start:start + n] = g.to(store_device, store_dtype)
                del loss
                acc.clear()
    finally:
        for h in handles:
            h.remove()
        acc.clear()
    return out


def _absent(modules: dict[str, tuple[nn.Linear, nn.Linear]], ids: set[int]) -> list[str]:
    return [name for name, (a, b) in modules.items() if id(a) not in ids or id(b) not in ids]


def per_sample_grads_chunked(model: nn.Module, encoded: list[dict], pad_id: int, chunk: int = 8,
                             modules: dict[str, tuple[nn.Linear, nn.Linear]] | None = None,
                             store_device="cpu") -> dict[str, torch.Tensor]:
    """``per_sample_grads`` over encoded examples in batches of ``chunk``, rows in example order, written
    into one preallocated [N, P_i] tensor per module (no second copy at a concatenation)."""
    from .data.chat import collate

    modules = lora_modules(model) if modules is None else modules
    device = next(model.parameters()).device
    n = len(encoded)
    out = {name: torch.empty(n, a.weight.numel() + b.weight.numel(), device=store_device)
           for name, (a, b) in modules.items()}
    for i in range(0, n, chunk):
        batch = {k: v.to(device) for k, v in collate(encoded[i:i + chunk], pad_id).items()}
        part = per_sample_grads(model, batch, modules, store_device=store_device)
        for name, g in part.items():
            out[name][i:i + g.shape[0]] = g
        del part
    return out


def module_groups(modules: dict[str, tuple[nn.Linear, nn.Linear]], n_examples: int,
                  budget_bytes: float) -> list[dict[str, tuple[nn.Linear, nn.Linear]]]:
    """Consecutive groups of modules whose per-example gradients (N x P_i float32 each) fit in
    ``budget_bytes`` together (a module larger than the budget is a group of its own)."""
    groups, current, size = [], {}, 0.0
    for name, (a, b) in modules.items():
        need = 4.0 * n_examples * (a.weight.numel() + b.weight.numel())
        if current and size + need > budget_bytes:
            groups.append(current)
            current, size = {}, 0.0
        current[name] = (a, b)
        size += need
    if current:
        groups.append(current)
    return groups


def per_sample_grads_loop(model: nn.Module, batch: dict, modules: dict[str, tuple[nn.Linear, nn.Linear]],
                          store_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The slow obvious reference for ``per_sample_grads``: one forward + backward per example.

    Each example runs alone with its trailing padding removed (under causal attention trailing
    positions cannot influence earlier ones), and g_n = d log p(y_n | x_n) / d [B; A] comes straight
    from autograd on the weights. Independent of hooks and batching; N times slower.
    """
    _check_modules(modules)
    weights = [lin.weight for a_lin, b_lin in modules.values() for lin in (b_lin, a_lin)]
    n_total = batch["input_ids"].shape[0]
    out = {name: torch.zeros(n_total, a.weight.numel() + b.weight.numel(), dtype=store_dtype)
           for name, (a, b) in modules.items()}
    with _Frozen(model, modules):
        for n in range(n_total):
            mask = batch["attention_mask"][n]
            length = int(torch.nonzero(mask).max()) + 1 if bool(mask.any()) else 1
            one = {k: batch[k][n:n + 1, :length] for k in ("input_ids", "attention_mask", "labels")}
            loss = _summed_loglik(model, one)
            grads = (torch.autograd.grad(loss, weights, allow_unused=True) if loss.requires_grad
                     else [None] * len(weights))
            absent = [name for i, name in enumerate(modules) if grads[2 * i] is None or grads[2 * i + 1] is None]
            if absent:
                raise SafeAnchorError(f"no gradient reached {len(absent)} LoRA layer(s), e.g. {absent[0]}; enable "
                                      "the adapter, unmerge it, and disable reentrant gradient checkpointing")
            for i, name in enumerate(modules):
                out[name][n] = torch.cat([grads[2 * i].flatten(), grads[2 * i + 1].flatten()]).to("cpu", store_dtype)
    return out


# -- Fisher bases --------------------------------------------------------------------------------------

_ALIGN = 64  # bytes: the CPU allocator's alignment (c10 uses 64)


@dataclass
class FisherBasis:
    """A truncated eigendecomposition of one module's empirical Fisher.

    basis:       V, P x k, orthonormal columns (float32); k = 0 means "no direction to protect".
    eigenvalues: k values, the Fisher energy v_j^T F v_j along each column (float64). For
                 ``fisher_basis`` and ``merge_weighted`` these are eigenvalues, in descending order;
                 ``merge_residual`` lists the old columns first (see there).
    trace:       tr F of the full, untruncated Fisher the basis summarises (see each merge for which F).
    n_samples:   examples that contributed to the basis.
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    trace: float
    n_samples: int

    def __post_init__(self):
        # one memory layout everywhere (QR returns column-major V), in memory aligned like a fresh allocation
        # (safetensors hands out tensors at any offset of its buffer, e.g. 56 mod 64; on an AVX2 CPU a matmul
        # over such a tensor rounds differently from the same values at an aligned address): the projection's
        # matmuls then round the same way for a basis computed in this process and one read back on resume
        self.basis = self.basis.contiguous()
        if self.basis.device.type == "cpu" and self.basis.data_ptr() % _ALIGN:
            self.basis = self.basis.clone()

    def to_cpu(self) -> "FisherBasis":
        """This basis with V on the CPU (itself when it is there already)."""
        if self.basis.device.type == "cpu":
            return self
        return FisherBasis(self.basis.cpu(), self.eigenvalues, self.trace, self.n_samples)


def _empty(p: int, trace: float, n: int, device=None) -> FisherBasis:
    return FisherBasis(torch.zeros(p, 0, device=device), torch.zeros(0, dtype=torch.float64), float(trace), int(n))


def _check_rho(rho: float) -> None:
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")


def _rho_rank(lam: torch.Tensor, total: float, rho: float, already: float = 0.0) -> int:
    """Smallest k with (already + sum_{j<=k} lam_j) / total >= rho (lam descending); len(lam) if none."""
    if already >= rho * total:
        return 0
    cum = already + torch.cumsum(lam, 0)
    hit = torch.nonzero(cum >= rho * total)
    return int(hit[0]) + 1 if len(hit) else len(lam)


def _gram(g: torch.Tensor) -> torch.Tensor:
    """G G^T in float64, accumulated over column blocks of G (so only one block is ever upcast)."""
    k = torch.zeros(g.shape[0], g.shape[0], dtype=torch.float64, device=g.device)
    for j in range(0, g.shape[1], _COLUMN_BLOCK):
        blk = g[:, j:j + _COLUMN_BLOCK].double()
        k += blk @ blk.T
    return k


def _gt_times(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """G^T U (P x k) in float64, block by block over the columns of G, into one preallocated tensor."""
    out = torch.empty(g.shape[1], u.shape[1], dtype=torch.float64, device=g.device)
    for j in range(0, g.shape[1], _COLUMN_BLOCK):
        torch.matmul(g[:, j:j + _COLUMN_BLOCK].double().T, u, out=out[j:j + _COLUMN_BLOCK])
    return out


def _orthonormalise(v: torch.Tensor) -> torch.Tensor:
    """QR re-orthonormalisation with a deterministic sign: each column's largest-|.| entry is positive.

    The sign is fixed on v before QR and Q is aligned with v (diag R > 0), so an already-orthonormal
    v comes back as itself up to round-off and identical inputs give identical bases.
    """
    if v.shape[1] == 0:
        return v
    # in place where the tensors are this function's own: at 7B shape each P x k float64 copy is ~0.5 GB
    idx = torch.maximum(v.max(0).values, -v.min(0).values)  # max |v| per column, without a |v| copy
    idx = torch.where(v.max(0).values >= idx, v.argmax(0), v.argmin(0))
    sign = torch.sign(v.gather(0, idx.unsqueeze(0))).squeeze(0)
    v = v * torch.where(sign == 0, torch.ones_like(sign), sign)
    q, r = torch.linalg.qr(v)
    del v
    d = torch.sign(torch.diagonal(r))
    return q.mul_(torch.where(d == 0, torch.ones_like(d), d))


def _gram_eigh(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Eigenpairs of K = G G^T / N in float64, eigenvalues descending and clamped at 0, and tr K."""
    n = g.shape[0]
    k = _gram(g) / n
    lam, u = torch.linalg.eigh(k)
    lam, u = lam.flip(0).clamp_min(0.0), u.flip(1)
    return lam, u, float(torch.diagonal(k).sum())


def fisher_basis(G: torch.Tensor, rho: float = 0.90, rel_eps: float = 1e-10,
                 max_rank: int | None = None) -> FisherBasis:
    """Top eigenvectors of the empirical Fisher F = G^T G / N covering ``rho`` of tr F.

    Gram trick: K = G G^T / N (N x N, float64) shares F's non-zero eigenvalues; eigh(K) = U L U^T.
    Keep lambda_j >= rel_eps * lambda_max, then the smallest k with sum_{j<=k} lambda_j >= rho tr F
    (tr F = tr K = (1/N) sum_n ||g_n||^2, the full trace), capped at ``max_rank``. Eigenvectors of F:
        V = G^T U_k L_k^{-1/2} / sqrt(N)          (F V = V L_k, V^T V = I)
    re-orthonormalised by QR. tr F = 0 (e.g. the A-block while B = 0) gives an empty P x 0 basis.
    """
    _check_rho(rho)
    if G.dim() != 2:
        raise ValueError(f"G must be [N, P], got shape {tuple(G.shape)}")
    n, p = G.shape
    if n == 0:
        return _empty(p, 0.0, 0, G.device)
    lam, u, trace = _gram_eigh(G)
    if trace <= 0.0 or float(lam[0]) <= 0.0:
        return _empty(p, 0.0, n, G.device)
    kept = int((lam >= rel_eps * lam[0]).sum())
    k = min(_rho_rank(lam[:kept], trace, rho), kept)
    if max_rank is not None:
        k = min(k, max_rank)
    lam_k = lam[:k]
    v = _gt_times(G, u[:, :k]).div_(torch.sqrt(lam_k * n))
    return FisherBasis(_orthonormalise(v).float(), lam_k.cpu().clone(), trace, n)


# -- projection ----------------------------------------------------------------------------------------

def _as_matrix(basis) -> torch.Tensor:
    return basis.basis if isinstance(basis, FisherBasis) else basis


def project_out(g: torch.Tensor, basis, strength: float = 1.0) -> torch.Tensor:
    """g - s V (V^T g) for g of shape [..., P]: s = 1 removes the basis component (V^T result = 0).

    OSCA uses s = 1 - alpha. Coefficients are computed in float32 at least; the result has g's dtype.
    An empty basis returns g itself.
    """
    v = _as_matrix(basis)
    if v.shape[1] == 0 or strength == 0:
        return g
    ct = torch.promote_types(g.dtype, torch.float32)
    v = v.to(g.device, ct)
    coef = g.to(ct) @ v
    return (g.to(ct) - strength * (coef @ v.T)).to(g.dtype)


def fraction_in_subspace(u: torch.Tensor, basis) -> float:
    """||V V^T u|| / ||u|| = ||V^T u|| / ||u|| (V orthonormal); 0 for u = 0 or an empty basis."""
    v = _as_matrix(basis)
    u = u.reshape(-1).double()
    norm = float(u.norm())
    if norm == 0.0 or v.shape[1] == 0:
        return 0.0
    return float((v.to(u.device, torch.float64).T @ u).norm()) / norm


# -- merging bases across domains --------------------------------------------------

def _check_same_p(old: FisherBasis, p: int) -> None:
    if old.basis.shape[0] != p:
        raise ValueError(f"bases have different parameter counts: {old.basis.shape[0]} vs {p}")


def _svd_truncate(m: torch.Tensor, rho: float, rel_eps: float = 1e-10,
                  total: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors of m (float64) and sigma^2, cut to the smallest k with sum sigma^2 >= rho total
    (``total`` default: sum sigma^2; every column is kept when even all of them fall short)."""
    if m.shape[1] == 0:
        return m, m.new_zeros(0)
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    s2 = s.square()
    if float(s2[0]) <= 0.0:
        return m[:, :0], s2[:0]
    kept = int((s2 >= rel_eps * s2[0]).sum())
    k = min(_rho_rank(s2[:kept], float(s2.sum()) if total is None else total, rho), kept)
    return u[:, :k], s2[:k]


def merge_weighted(old: FisherBasis, new: FisherBasis, rho: float = 0.90, decay: float = 1.0) -> FisherBasis:
    """Eigen-decomposition of decay * F_old + F_new from the stored truncated factors.

    With M = [V_old (decay L_old)^{1/2}, V_new L_new^{1/2}] (P x (k_old + k_new)),
        M M^T = decay V_old L_old V_old^T + V_new L_new V_new^T,
    so the thin SVD M = W S Z^T gives its eigenvectors W and eigenvalues S^2 (no P x P matrix).
    Keep the smallest k with sum_{j<=k} sigma_j^2 >= rho (decay tr F_old + tr F_new): rho of the trace of
    the *untruncated* summed Fisher, not of the truncated factors' energy (cutting at rho of what is
    left after each truncation shrinks the basis merge after merge: 22 -> 8 vectors and 0.90 -> 0.57
    coverage after 30 merges in a simulation). Since V^T F V >= V^T M M^T V for every V (each stored
    factor under-states its Fisher), the merged basis covers at least rho of decay F_old + F_new.
    trace = decay tr F_old + tr F_new (a sum, not an average: with decay = 1 it grows with every merge).
    """
    _check_rho(rho)
    if decay < 0:
        raise ValueError(f"decay must be >= 0, got {decay}")
    _check_same_p(old, new.basis.shape[0])
    dev = old.basis.device

    def factor(b: FisherBasis, weight: float) -> torch.Tensor:
        return b.basis.to(dev, torch.float64) * torch.sqrt(weight * b.eigenvalues.to(dev, torch.float64))

    m = torch.cat([factor(old, decay), factor(new, 1.0)], dim=1)
    total = decay * old.trace + new.trace
    w, s2 = _svd_truncate(m, rho, total=total if total > 0 else None)
    return FisherBasis(_orthonormalise(w).float(), s2.cpu().clone(), total, old.n_samples + new.n_samples)


def merge_residual(old: FisherBasis, G_new: torch.Tensor, rho: float = 0.90, max_rank: int | None = None,
                   rel_eps: float = 1e-10) -> FisherBasis:
    """GPM-style growth: keep V_old verbatim and append eigen-directions of the new Fisher outside it.

    F_new = G^T G / N. Energy already covered: tr(V^T F_new V) = sum_j ||G v_j||^2 / N.
    Residual G~ = G (I - V V^T) = G - (G V) V^T; its Gram eigenpairs (lambda~_i, u_i) give
        v~_i = G~^T u_i / sqrt(N lambda~_i)   (orthogonal to V; re-orthogonalised against V, then QR),
    appended until (tr(V^T F_new V) + sum_{i<=k} lambda~_i) / tr F_new >= rho. Residual eigenvalues
    below rel_eps * tr F_new are round-off and never appended. ``max_rank`` caps the total size;
    old columns always stay.
    eigenvalues = [diag(V^T F_new V), lambda~_1..k]: the Rayleigh quotients v^T F_new v of every column
    (for v~ orthogonal to V, v~^T F_new v~ = v~^T F~ v~ = lambda~), old columns first, so their sum is
    the energy of F_new the basis covers. trace = tr F_new; n_samples = old.n_samples + N.
    """
    _check_rho(rho)
    n, p = G_new.shape
    _check_same_p(old, p)
    v = old.basis.to(G_new.device, torch.float64)
    k_old = v.shape[1]
    gv = torch.cat([G_new[:, j:j + _COLUMN_BLOCK].double() @ v[j:j + _COLUMN_BLOCK]
                    for j in range(0, p, _COLUMN_BLOCK)]) if k_old else v.new_zeros(n, 0)
    rayleigh = gv.square().sum(0) / n
    trace = sum(float(G_new[:, j:j + _COLUMN_BLOCK].double().square().sum())
                for j in range(0, p, _COLUMN_BLOCK)) / n
    old_lam = rayleigh.cpu()

    def result(extra: torch.Tensor, lam: torch.Tensor) -> FisherBasis:
        basis = torch.cat([old.basis.float().to(G_new.device), extra.float()], dim=1)
        return FisherBasis(basis, torch.cat([old_lam, lam.cpu()]), trace, old.n_samples + n)

    none = torch.zeros(p, 0, dtype=torch.float64, device=G_new.device)
    room = None if max_rank is None else max(0, max_rank - k_old)
    if trace <= 0.0 or room == 0:
        return result(none, torch.zeros(0, dtype=torch.float64))
    resid = G_new.double() - gv @ v.T
    lam, u, _ = _gram_eigh(resid)
    kept = int((lam > rel_eps * trace).sum())
    k = min(_rho_rank(lam[:kept], trace, rho, already=float(rayleigh.sum())), kept)
    if room is not None:
        k = min(k, room)
    if k == 0:
        return result(none, torch.zeros(0, dtype=torch.float64))
    extra = (resid.T @ u[:, :k]) / torch.sqrt(lam[:k] * n)
    extra = extra - v @ (v.T @ extra)
    return result(_orthonormalise(extra), lam[:k].clone())


def merge_union(old: FisherBasis, new: FisherBasis, sigma_min: float = 1e-3) -> FisherBasis:
    """The public SafeAnchor code's unweighted merge, kept for comparison: SVD of [V_old | V_new].

    [V_old | V_new] = W S Z^T with both blocks orthonormal, so sigma lies in [0, sqrt(2)] whatever the
    Fisher eigenvalues were (identical directions: sqrt(2) and 0; orthogonal ones: 1). Keeping every
    sigma > sigma_min is the deduplicated union of the two spans (the public code's rho cut on sigma^2
    instead trims about 10% of the union arbitrarily).
    eigenvalues = sigma^2 (in [0, 2]; not Fisher energies); trace = new.trace as in the public code.
    """
    _check_same_p(old, new.basis.shape[0])
    m = torch.cat([old.basis.double(), new.basis.double().to(old.basis.device)], dim=1)
    if m.shape[1] == 0:
        return _empty(m.shape[0], new.trace, old.n_samples + new.n_samples, m.device)
    w, s, _ = torch.linalg.svd(m, full_matrices=False)
    k = int((s > sigma_min).sum())
    return FisherBasis(_orthonormalise(w[:, :k]).float(), s[:k].square().cpu(), new.trace,
                       old.n_samples + new.n_samples)


# -- comparing subspaces -------------------------------------------------------------------------------

def principal_angles(V1: torch.Tensor, V2: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending, min(k1, k2) of them) between span V1 and span V2.

    cos theta_j = sigma_j(V1^T V2) for orthonormal V1, V2. arccos loses accuracy near 0 (an error e
    in sigma ~ 1 becomes sqrt(2e) in theta), so angles with cos^2 > 1/2 use the sines instead:
    sin theta_j = sigma_j((I - V1 V1^T) V2), taking V1 as the larger basis (Knyazev & Argentati 2002).
    """
    a, b = _as_matrix(V1).double(), _as_matrix(V2).double().to(_as_matrix(V1).device)
    if a.shape[1] < b.shape[1]:
        a, b = b, a
    if b.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    ab = a.T @ b
    cos = torch.linalg.svdvals(ab).clamp(0.0, 1.0)
    sin = torch.linalg.svdvals(b - a @ ab).clamp(0.0, 1.0).flip(0)
    return torch.where(cos.square() > 0.5, torch.arcsin(sin), torch.arccos(cos)).cpu()


def grassmann_distance(V1: torch.Tensor, V2: torch.Tensor) -> float:
    """Geodesic distance on the Grassmannian: ||theta||_2 over the principal angles."""
    return float(principal_angles(V1, V2).norm())


# -- files ---------------------------------------------------------------------------------------------

_META_KEY = "safeanchor.bases"


def save_bases(path, bases: dict[str, FisherBasis], meta: dict | None = None, model: nn.Module | None = None,
               adapter_name: str = "default") -> None:
    """Write bases to a safetensors file: tensors "{name}.basis" and "{name}.eigenvalues"; traces,
    n_samples, module shapes (r, d_in, d_out, only when ``model`` is given) and ``meta`` (any JSON)
    in the header metadata as JSON strings."""
    from safetensors.torch import save_file

    mods = lora_modules(model, adapter_name) if model is not None else {}
    tensors, info = {}, {}
    for name, b in bases.items():
        tensors[f"{name}.basis"] = b.basis.detach().float().contiguous().cpu()
        tensors[f"{name}.eigenvalues"] = b.eigenvalues.detach().double().contiguous().cpu()
        info[name] = {"trace": float(b.trace), "n_samples": int(b.n_samples), "P": int(b.basis.shape[0])}
        if name in mods:
            info[name]["shape"] = list(module_shape(*mods[name]))
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(info), "meta": json.dumps(meta or {})})


def load_meta(path) -> dict:
    """The ``meta`` dict stored by ``save_bases``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {}).get("meta", "{}"))


def load_bases(path, model: nn.Module | None = None, adapter_name: str = "default") -> dict[str, FisherBasis]:
    """Read bases written by ``save_bases`` (CPU tensors). With ``model``, every stored module must be
    a LoRA layer of ``adapter_name`` with the same P = r (d_in + d_out) (and shape, when stored)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata() or {}
        if _META_KEY not in header:
            raise SafeAnchorError(f"{path} holds no safeanchor bases (metadata key {_META_KEY!r} missing); "
                                  "write it with safeanchor.subspace.save_bases")
        info = json.loads(header[_META_KEY])
        out = {name: FisherBasis(fh.get_tensor(f"{name}.basis"), fh.get_tensor(f"{name}.eigenvalues"),
                                 float(d["trace"]), int(d["n_samples"])) for name, d in info.items()}
    if model is not None:
        mods = lora_modules(model, adapter_name)
        fix = "recompute the bases for this model, or load the model with the LoRA config they were computed for"
        for name, d in info.items():
            if name not in mods:
                raise SafeAnchorError(f"stored safety basis for {name} has no LoRA layer (adapter "
                                      f"{adapter_name!r}) in the model; {fix}")
            shape = module_shape(*mods[name])
            p = shape[0] * (shape[1] + shape[2])
            if d["P"] != p or ("shape" in d and tuple(d["shape"]) != shape):
                stored = f"(r, d_in, d_out) = {tuple(d['shape'])}" if "shape" in d else f"P = {d['P']}"
                raise SafeAnchorError(f"stored safety basis for {name} has {stored} but the model's LoRA layer has "
                                      f"(r, d_in, d_out) = {shape}, P = {p}; {fix}")
    return out
