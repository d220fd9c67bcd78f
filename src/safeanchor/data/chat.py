"""Chat formatting shared by training, calibration and evaluation: one template, loss on responses only."""
from __future__ import annotations

import torch

IGNORE = -100


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the chat-formatted user turn followed by the assistant header."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def encode(tokenizer, prompt: str, response: str, max_length: int) -> dict:
    """input_ids and labels (-100 on the prompt) for one example; the response ends with EOS.

    Over-long examples keep the whole prompt when it fits in half the budget and cut the response;
    otherwise the prompt is cut from the left (its chat header is lost, which is rare by data design).
    """
    p = prompt_ids(tokenizer, prompt)
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) + len(r) > max_length:
        keep_p = min(len(p), max(max_length // 2, max_length - len(r)))
        p = p[-keep_p:]
        r = r[: max_length - len(p)]
    return {"input_ids": p + r, "labels": [IGNORE] * len(p) + r}


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded batch: input_ids, attention_mask, labels."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def causal_lm(model):
    """The ``XForCausalLM`` inside a PEFT wrapper (LoRA layers are injected in place, so calling it
    still runs the adapters, and ``disable_adapter()`` still switches them off)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_keyword(model) -> str:
    """The forward argument that takes a KV cache: ``cache`` from transformers 5.2x on (which warns about,
    and will drop, ``past_key_values``), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(causal_lm(model).forward).parameters else "past_key_values"


def hidden_states(model, batch: dict) -> torch.Tensor:
    lm = causal_lm(model)
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def plain_head(model) -> bool:
    """Whether the model's logits are exactly its output embedding applied to the decoder's last hidden
    state. Checked once per model on a 4-token input against the model's own forward (cached on it):
    False for heads that transform the logits (Gemma-2/3 soft-capping, Cohere's ``logit_scale``,
    Granite's ``logits_scaling`` and others), which then go through the model's own forward."""
    lm = causal_lm(model)
    cached = getattr(lm, "_safeanchor_plain_head", None)
    if cached is None:
        device = next(lm.parameters()).device
        ids = torch.arange(1, 5, device=device).unsqueeze(0) % lm.config.vocab_size
        mask = torch.ones_like(ids)
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                fast = lm.get_output_embeddings()(hidden_states(model, {"input_ids": ids, "attention_mask": mask}))
                own = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            cached = bool(torch.allclose(fast.float(), own.float(), rtol=1e-4, atol=1e-5))
        finally:
            model.train(was)
        lm._safeanchor_plain_head = cached
    return cached


def response_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32) at the positions that predict a response token, and those target ids.

    Only those positions go through the LM head: on a small model with a large vocabulary the head
    over every position is most of a step's cost (measured in benchmarks/). A model whose head
    transforms its logits (``plain_head`` is False) runs its own forward with ``logits_to_keep`` set to
    the positions any row needs, so its own transform applies.
    """
    targets = batch["labels"][:, 1:]
    sel = targets != IGNORE
    if plain_head(model):
        hidden = hidden_states(model, batch)
        logits = causal_lm(model).get_output_embeddings()(hidden[:, :-1][sel]).float()
        return logits, targets[sel]
    cols = torch.nonzero(sel.any(0)).squeeze(1)  # positions (of the shifted frame) some row predicts from
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                logits_to_keep=cols)
    where = torch.full((targets.shape[1],), -1, dtype=torch.long, device=cols.device)
    where[cols] = torch.arange(len(cols), device=cols.device)
    rows, pos = torch.nonzero(sel, as_tuple=True)
    return out.logits[rows, where[pos]].float(), targets[sel]


def example_index(batch: dict) -> torch.Tensor:
    """Example index of every selected response position (same order as ``response_logits``)."""
    targets = batch["labels"][:, 1:]
    rows = torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets)
    return rows[targets != IGNORE]


def sequence_logprob(model, batch: dict) -> torch.Tensor:
    """Per-example summed log p(response | prompt), shape [B]: the log-likelihood the Fisher uses."""
    logits, targets = response_logits(model, batch)
    token_lp = -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    out = torch.zeros(batch["labels"].shape[0], device=logits.device, dtype=token_lp.dtype)
    return out.index_add(0, example_index(batch), token_lp)


def mean_token_nll(model, batch: dict) -> torch.Tensor:
    """Mean NLL over all response tokens of the batch: the task loss."""
    logits, targets = response_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits, targets)
