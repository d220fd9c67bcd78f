"""Data-parallel training of one run over several processes (``accelerate launch`` or ``torchrun``).

Each optimizer step's batch is split by rows over the processes; every process back-propagates its
share with a weight that makes the *average* of the processes' gradients equal the gradient of the
whole batch's response-token mean loss, and one all-reduce of the (small) LoRA gradients per step
averages them. After that all-reduce every process holds the same gradients, so method hooks
(OSCA's projection, SafeGrad's surgery, the anchor, penalties), gradient clipping and AdamW run
unchanged and identically on every process. A method whose ``compute_grads`` does not shard (Vaccine's
perturbation step) computes the whole batch on every process: the average of identical gradients is
the same gradient, so it stays correct, only not faster.

Evaluation generates each process's share of the prompts and gathers the records in order; one
process (rank 0) writes every file. The process group comes from ``accelerate.PartialState``
(gloo on CPU, NCCL on CUDA), which reads the launcher's environment.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch

from .errors import SafeAnchorError


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def shard_batch(batch: dict, rank: int, world: int) -> tuple[dict, float]:
    """Rows ``rank::world`` of a collated batch (trailing all-pad columns dropped) and the weight w_r
    such that mean_r(w_r * L_r) over the ``world`` shards equals the batch's response-token mean loss,
    where L_r is the shard's own response-token mean: w_r = world * n_r / n (n_r, n = response tokens)."""
    if world == 1:
        return batch, 1.0
    rows = batch["input_ids"].shape[0]
    if rows < world:
        raise SafeAnchorError(f"a micro-batch of {rows} rows cannot be split over {world} processes; "
                              f"use train.batch_size >= {world} (and a multiple of it for even shares)")
    labels = batch["labels"]
    n_total = int((labels[:, 1:] != -100).sum())
    part = {k: v[rank::world] for k, v in batch.items()}
    width = int(part["attention_mask"].sum(1).max())
    part = {k: v[:, :width] for k, v in part.items()}
    n_part = int((part["labels"][:, 1:] != -100).sum())
    return part, world * n_part / max(1, n_total)


class Dist:
    """This process's place in the group. ``Dist()`` is a single process: every collective is a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.rank, self.world, self.device = rank, world, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, batch: dict) -> tuple[dict, float]:
        return shard_batch(batch, self.rank, self.world)

    def shard_extra(self, batch: dict) -> tuple[dict, float, bool]:
        """For a method's own extra batch (anchor, alignment, replay): this process's rows and weight, and
        True, when the group is active and the batch has a row for every process; else the whole batch,
        weight 1 and False. After its backward (of weight x loss), ``reduce_extra`` completes it."""
        if self.active and batch["input_ids"].shape[0] >= self.world:
            part, weight = self.shard(batch)
            return part, weight, True
        return batch, 1.0, False

    def reduce_extra(self, params: list[torch.nn.Parameter], value: float, sharded: bool) -> float:
        """After the backward of a ``shard_extra`` batch: when it was sharded, average the gradients (the
        part already equal everywhere stays, the shards add up to the whole batch's gradient) and the
        weighted loss ``value`` over processes; returns the whole batch's loss."""
        if not sharded:
            return value
        self.average_grads(params)
        return self.mean(value)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def _flat_reduce(self, tensors: list[torch.Tensor], op) -> None:
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        torch.distributed.all_reduce(flat, op=op)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t).to(t.dtype))
            offset += t.numel()

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average .grad over processes (one all-reduce of all of them flattened; a missing grad counts as 0)."""
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._flat_reduce([p.grad for p in params], torch.distributed.ReduceOp.SUM)
        for p in params:
            p.grad.div_(self.world)

    def mean(self, value: float) -> float:
        return self.sum([value])[0] / self.world

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (so all of them raise together)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    @contextmanager
    def main_first(self):
        """Rank 0 runs the body first (e.g. builds a cache), then the others (which find it built)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def gather(self, items: list) -> list[list]:
        """Every process's ``items`` (a picklable list), in rank order, on every process."""
        if not self.active:
            return [items]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, items)
        return out

    def broadcast_params(self, params: list[torch.Tensor]) -> None:
        """Copy rank 0's values into every process (guards against floating drift between processes)."""
        if not self.active:
            return
        with torch.no_grad():
            for p in params:
                torch.distributed.broadcast(p.data, src=0)

    def split(self, items: list) -> list:
        return items[self.rank::self.world]

    def merge(self, parts: list[list]) -> list:
        """Inverse of ``split``: interleave the gathered shares back into the original order."""
        n = sum(len(p) for p in parts)
        out = [None] * n
        for r, part in enumerate(parts):
            out[r::self.world] = part
        return out


_CURRENT = Dist()


def close() -> None:
    """Leave the process group together: a barrier (no process exits while another still uses the
    group), then destroy it. A single process has nothing to do."""
    global _CURRENT
    if _CURRENT.active:
        _CURRENT.barrier()
        torch.distributed.destroy_process_group()
        _CURRENT = Dist()


def current() -> Dist:
    return _CURRENT


def init() -> Dist:
    """Join the launcher's process group (once); a plain process gets a single-process ``Dist``."""
    global _CURRENT
    if launched_world_size() <= 1 or _CURRENT.active:
        return _CURRENT
    try:
        from accelerate import PartialState

        # evaluation or alignment on rank 0 can keep the others waiting a long time at a barrier
        state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=12))
    except Exception as exc:  # noqa: BLE001 - launcher environment problems surface as many types
        raise SafeAnchorError(f"cannot join the process group ({type(exc).__name__}: {str(exc)[:200]}); launch "
                              f"with `accelerate launch --num_processes N -m safeanchor ...` or `torchrun "
                              f"--nproc_per_node N -m safeanchor ...`") from None
    _CURRENT = Dist(state.process_index, state.num_processes, state.device)
    return _CURRENT
