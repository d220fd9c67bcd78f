"""model.gradient_checkpointing: less activation memory in a training forward, the same gradients, and
per-sample gradients (eval mode, as SSI and the Fisher run them) unchanged."""
from __future__ import annotations

import torch
from torch.autograd.graph import saved_tensors_hooks

from safeanchor import subspace as ss
from safeanchor.config import LoRAConfig, ModelConfig
from safeanchor.data.chat import collate, encode, mean_token_nll
from safeanchor.models import attach_lora, gradient_checkpointing_on, load_model

LORA = LoRAConfig(r=4, alpha=8, dropout=0.0)


def _model(checkpointing: bool):
    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(name="tiny-random", device="cpu", gradient_checkpointing=checkpointing))
    torch.manual_seed(1)
    model = attach_lora(model, LORA)
    with torch.no_grad():  # B != 0, so that both LoRA factors get a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 1000))
    return model, tok


def _batch(tok, n=4):
    pairs = [(f"question number {i} about something long enough " * 3, f"answer {i} " * 8) for i in range(n)]
    return collate([encode(tok, p, r, 128) for p, r in pairs], tok.pad_token_id)


def _saved_bytes(model, batch) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        loss = mean_token_nll(model, batch)
    loss.backward()
    return total


def test_flag_turns_checkpointing_on_and_keeps_eval_mode():
    on, _ = _model(True)
    off, _ = _model(False)
    assert gradient_checkpointing_on(on) and not gradient_checkpointing_on(off)
    assert on.training == off.training  # the flag changes nothing else about the returned model


def test_checkpointing_lowers_saved_activations_and_keeps_the_gradients():
    results = {}
    for flag in (False, True):
        model, tok = _model(flag)
        model.train()
        batch = _batch(tok)
        model.zero_grad()
        results[flag] = (_saved_bytes(model, batch),
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    (off_bytes, off_grads), (on_bytes, on_grads) = results[False], results[True]
    assert on_bytes < 0.6 * off_bytes, (on_bytes, off_bytes)
    assert off_grads.keys() == on_grads.keys() and off_grads
    for name in off_grads:
        assert torch.allclose(off_grads[name], on_grads[name], atol=1e-6, rtol=1e-5), name


def test_per_sample_grads_match_with_checkpointing_on():
    grads = {}
    for flag in (False, True):
        model, tok = _model(flag)
        model.eval()  # SSI / Fisher run per-sample gradients in eval mode
        batch = _batch(tok, n=3)
        modules = ss.lora_modules(model)
        grads[flag] = ss.per_sample_grads(model, batch, modules)
        if flag:
            loop = ss.per_sample_grads_loop(model, batch, modules)
            for name in modules:
                assert torch.allclose(grads[flag][name], loop[name], atol=1e-6, rtol=1e-4), name
    for name in grads[False]:
        assert grads[False][name].abs().sum() > 0
        assert torch.allclose(grads[False][name], grads[True][name], atol=1e-6, rtol=1e-5), name


def test_per_sample_grads_in_train_mode_with_checkpointing():
    """Also in train mode (checkpointed blocks are re-run in backward): the same scores as without."""
    grads = {}
    for flag in (False, True):
        model, tok = _model(flag)
        model.train()
        batch = _batch(tok, n=3)
        grads[flag] = ss.per_sample_grads(model, batch, ss.lora_modules(model))
    for name in grads[False]:
        assert torch.allclose(grads[False][name], grads[True][name], atol=1e-6, rtol=1e-5), name
