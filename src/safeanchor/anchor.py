"""The anchor loss: KL from the aligned model to the adapted one, on safety examples.

    L_anchor = KL(p_aligned || p_theta) = (1/T) sum_t sum_v p_aligned(v | x_<t) [log p_aligned(v | x_<t) - log p_theta(v | x_<t)]

over the T response tokens of a batch (forward KL, as SafeAnchor, Guo et al. arXiv:2604.17691, Eq. 6,
and SafeGrad's alignment loss, Yi et al. arXiv:2508.07172). p_aligned is the same PEFT model with its
adapter disabled (``model.disable_adapter()``): no second copy of the weights, and the reference is the
model before any domain. The reference forward runs in eval mode (no dropout: p_aligned is a fixed
distribution); the live forward runs in the model's current mode.

Gradient. The loss returned carries the closed-form gradient dL/dlogits = (p_theta - p_aligned) / T
through the logits (a surrogate sum(logits * that), whose value is replaced by the KL). Autograd through
log_softmax gives the same gradient up to float32 round-off, but not exactly zero where p_theta =
p_aligned (sum p_aligned != 1 in float32); at a fresh LoRA (B = 0) the closed form is exactly zero, which
SafeGrad's conflict test relies on.

One implementation, used by SafeAnchor's anchor term and by SafeGrad's alignment gradient.
"""
from __future__ import annotations

import contextlib

import torch

from .data.chat import encode, response_logits
from .errors import SafeAnchorError


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def aligned_logits(model, batch: dict) -> torch.Tensor:
    """Response-position logits of the aligned model: the adapter disabled, eval mode, no gradient."""
    with torch.no_grad(), _eval_mode(model), model.disable_adapter():
        return response_logits(model, batch)[0]


def snapshot_logits(model, batch: dict, snapshot: dict) -> torch.Tensor:
    """Response-position logits of the model with the weights in ``snapshot`` (parameter -> saved values,
    e.g. the LoRA weights at the start of the current domain): swapped in, no gradient, eval mode, and
    swapped back. The anchor to "the model before this domain" without a second model copy."""
    with torch.no_grad(), _eval_mode(model):
        current = {p: p.detach().clone() for p in snapshot}
        try:
            for p, v in snapshot.items():
                p.copy_(v)
            return response_logits(model, batch)[0]
        finally:
            for p, v in current.items():
                p.copy_(v)


def anchor_kl(model, batch: dict, reference_logits: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_aligned || p_theta), mean over the batch's response tokens, as a scalar tensor whose gradient
    is the closed form (p_theta - p_aligned) / T in the logits (module docstring)."""
    ref = aligned_logits(model, batch) if reference_logits is None else reference_logits
    logits, _ = response_logits(model, batch)
    with torch.no_grad():
        p_ref, p = torch.softmax(ref, -1), torch.softmax(logits, -1)  # both by softmax: p - p_ref = 0 exactly at B = 0
        kl = (p_ref * (torch.log_softmax(ref, -1) - torch.log_softmax(logits, -1))).sum(-1).mean()
        dlogits = (p - p_ref) / logits.shape[0]
    surrogate = (logits * dlogits).sum()
    return surrogate - surrogate.detach() + kl


class SafetyBatches:
    """An endless, seeded stream of batches over safety examples ({"prompt", "response"}): the training
    loop's ``BatchStream`` (a fresh permutation per epoch, batch k fully determined by (seed, stream, k)),
    plus the position of the next batch, which a resumed run restores."""

    def __init__(self, examples: list[dict], tokenizer, batch_size: int, seed: int = 0, stream: int = 50_000,
                 max_length: int = 512, what: str = "safety examples"):
        from .train import BatchStream

        if batch_size < 1:
            raise SafeAnchorError(f"batch size for {what} must be >= 1, got {batch_size}")
        encoded = [encode(tokenizer, e["prompt"], e["response"], max_length) for e in examples]
        encoded = [e for e in encoded if any(lbl != -100 for lbl in e["labels"])]
        if not encoded:
            raise SafeAnchorError(f"no usable {what} (empty, or every response truncated away at max_length "
                                  f"{max_length}); give examples with non-empty responses")
        self.stream = BatchStream(encoded, batch_size, seed, stream, tokenizer.pad_token_id)
        self.position = 0

    def __len__(self) -> int:
        return len(self.stream.encoded)

    def next(self, device) -> dict:
        out = {k: v.to(device) for k, v in self.stream.batch(self.position).items()}
        self.position += 1
        return out
