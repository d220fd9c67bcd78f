"""The library's one generation loop: batched decoding with left padding, greedy or sampled.

Prompts are one of
- ``str`` with ``chat=True`` (default): a user turn in the shared chat template plus the assistant header
  (``data.chat.prompt_ids``);
- ``str`` with ``chat=False``: raw text, tokenised as it stands (``add_special_tokens`` decides BOS);
  judge classifiers whose own templates carry the special tokens;
- a list of token ids, used as given (GCG's prompts with an optimised suffix spliced in).

Batches: greedy, each holds up to ``batch_size`` prompts, left-padded, taken
longest-first (little padding) or in the given order (``longest_first=False``). Sampled, each holds one
prompt (no padding) and up to ``batch_size`` of its ``num_return_sequences`` samples. Sampling draws from
torch's global RNG (transformers' sampler takes no ``torch.Generator``): ``seed`` seeds it once
(``torch.manual_seed``, CPU and CUDA) before the first call and the calls run in a fixed order, so the
seed, the prompts, their order, n and batch_size fix every sample. The model's train/eval mode is restored.

Greedy batches are decoded by ``greedy_decode`` (below), not ``model.generate``, wherever it gives
transformers' greedy tokens (a decoder-only model whose KV cache is all attention layers and whose generation
config asks for no logits processor): it computes the prompts' shared prefix (the chat template's system
turn: 24 of the quick start's ~48 prompt tokens) once for the whole batch and drops each row from the batch
as soon as it has stopped. On a 2-core CPU, quick-start settings, it took CSM's 60-prompt safety check from
26.8 to 19.6 s on the aligned base and an evaluation step's 260 prompts from 109 to 87 s (1.15-1.37x, least
on a model that answers everything; ``benchmarks/greedy_decoder.py``). Elsewhere (sampling, other models)
``model.generate`` runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .data.chat import cache_keyword, causal_lm, prompt_ids

# Generation-config entries that change nothing in greedy decoding; any other non-default entry (a repetition
# penalty, suppressed or forced tokens, beams, ...) sends greedy batches to ``model.generate``.
_GREEDY_NEUTRAL = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "use_cache",
                   "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                   "return_dict_in_generate", "transformers_version", "_from_model_config", "max_length",
                   "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p", "typical_p",
                   "epsilon_cutoff", "eta_cutoff", "num_beams", "num_beam_groups", "num_return_sequences",
                   "cache_implementation", "_commit_hash"}


def decoder_for(model) -> str:
    """'safeanchor' when ``greedy_decode`` gives this model's greedy tokens, else 'transformers'
    (``model.generate``): encoder-decoder or non-attention caches (state-space, linear attention), a model
    class transformers keeps off its dynamic cache, a PEFT prompt-learning adapter, or a generation config
    with a greedy-relevant entry."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    base = causal_lm(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "transformers"
    if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False):
        return "transformers"  # prompt tuning / prefix tuning put virtual tokens in front of every forward
    supports = getattr(type(base), "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return "transformers"
    gen_config = getattr(base, "generation_config", None)
    if gen_config is not None:
        diff = gen_config.to_diff_dict()
        if any(k not in _GREEDY_NEUTRAL for k in diff) or int(diff.get("num_beams", 1) or 1) != 1:
            return "transformers"
    layers = DynamicCache(config=config).layers
    if not layers or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return "transformers"
    return "safeanchor"


def left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of token-id rows, left-padded to the longest (CPU tensors)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def common_prefix(rows: Sequence[Sequence[int]], cap: int) -> int:
    """How many leading tokens every row shares, at most ``cap``."""
    n = 0
    while n < cap and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def prefix_fits_windows(config, length: int) -> bool:
    """Whether a cache laid out as [shared prefix][padding][row] over ``length`` positions in all attends
    as the unpadded row would. Padding in the middle of the cache takes places that a sliding-window layer
    counts (and trims), so it is safe only when no layer has a window or ``length`` fits the smallest."""
    from transformers import DynamicCache, PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        return True  # not a transformers model: it builds no sliding-window cache layers
    windows = [getattr(layer, "sliding_window", None) for layer in DynamicCache(config=config).layers]
    windows = [int(w) for w in windows if w]
    return not windows or length <= min(windows)


def prefix_cache(model, prefix: list[int], batch: int, device, length: int):
    """(forward keyword, KV cache of ``prefix`` repeated for ``batch`` rows), or None when the model
    returns no usable cache or the cache, grown to ``length`` positions ([prefix][padding][rows] and any
    generated tokens), would not fit a sliding window (``prefix_fits_windows``; nothing is computed then).
    transformers >= 5.2x names it ``cache`` (in and out), older versions ``past_key_values``: the keyword
    follows the name the output used."""
    if not prefix_fits_windows(causal_lm(model).config, length):
        return None
    ids = torch.tensor([prefix], device=device)
    try:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    except TypeError:
        try:
            out = model(input_ids=ids, use_cache=True)
        except TypeError:
            return None
    keys = set(out.keys()) if hasattr(out, "keys") else set(vars(out))
    name = "cache" if "cache" in keys else "past_key_values" if "past_key_values" in keys else None
    cache = getattr(out, name) if name else None
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(batch)
    return name, cache


def tail_logits(model, ids, mask, keep: int, past=None, offset: int = 0) -> torch.Tensor:
    """Logits of the last ``keep`` positions of a left-padded batch (explicit position ids), optionally
    continuing a cached prefix of ``offset`` tokens (``past`` = (keyword, cache))."""
    pos = offset + (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": past is not None}
    if past is not None:
        ones = torch.ones(mask.shape[0], offset, dtype=mask.dtype, device=mask.device)
        kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)
        kwargs[past[0]] = past[1]
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep: full logits, then the tail
        logits = model(**kwargs).logits
    return logits[:, -keep:].float()


@torch.no_grad()
def greedy_decode(model, rows: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: Sequence[int],
                  pad_id: int) -> list[list[int]]:
    """Greedy continuations of the token-id ``rows`` (one batch), each up to and including its first token in
    ``eos_ids`` or ``max_new_tokens`` long: transformers' greedy search, computed with less work.

    - The longest prefix every row shares (at most the shortest row less one token) runs once, batch 1, and
      its KV cache is repeated for the batch; the rest of each row follows it left-padded. The batch's
      cache holds [prefix][padding][row's rest], the attention mask hides the padding and position ids count
      real tokens only, so every row attends to exactly what a left-padded batch lets it (skipped when a
      layer's sliding window is shorter than the whole: padding inside the window would shift it).
    - A row leaves the batch (``Cache.batch_select_indices``) the step it emits a stop token.
    The numbers differ from ``model.generate``'s in batch-shape round-off only, as between batch sizes."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    config = causal_lm(model).config
    n = len(rows)
    out: list[list[int]] = [[] for _ in range(n)]
    if n == 0 or max_new_tokens < 1:
        return out
    shared = 0 if n < 2 else common_prefix(rows, min(len(r) for r in rows) - 1)
    length = max(len(r) for r in rows) + max_new_tokens
    past = prefix_cache(model, list(rows[0][:shared]), n, device, length) if shared else None
    if past is None:
        shared, past = 0, (cache_keyword(model), DynamicCache(config=config))
    ids, rest_mask = left_padded([r[shared:] for r in rows], pad_id)
    ids, rest_mask = ids.to(device), rest_mask.to(device)
    logits = tail_logits(model, ids, rest_mask, 1, past, shared)[:, -1]
    name, cache = past
    mask = torch.cat([rest_mask.new_ones((n, shared)), rest_mask], 1)
    last = shared + rest_mask.sum(-1, keepdim=True) - 1  # the position of each row's last token
    alive = torch.arange(n)
    stop = torch.tensor(sorted({int(e) for e in eos_ids}), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        for row, t in zip(alive.tolist(), token.tolist()):
            out[row].append(t)
        going = ~torch.isin(token, stop)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            alive, token, mask, last = alive[keep.cpu()], token[keep], mask[keep], last[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
        last = last + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=last, use_cache=True,
                       **{name: cache}).logits[:, -1]
    return out


def encode_prompts(tokenizer, prompts: Sequence, chat: bool = True, add_special_tokens: bool = False
                   ) -> list[list[int]]:
    """Token ids of every prompt (module docstring: chat-template string, raw string or ids)."""
    out = []
    for p in prompts:
        if not isinstance(p, str):
            out.append([int(t) for t in p])
        elif chat:
            out.append(prompt_ids(tokenizer, p))
        else:
            out.append(list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]))
    return out


MIXED_PRECISIONS = ("no", "bf16")  # generation's precisions (eval.mixed_precision)


@contextlib.contextmanager
def bf16_autocast(model, device_type: str, enabled: bool = True):
    """bf16 autocast for generation, with every float32 weight cast once for the whole block.

    Autocast keeps its bf16 copy of a weight for the rest of the block only for a leaf tensor that requires
    grad; the frozen base weights of a LoRA model do not, so every decoding step would cast all of them again
    (on this CPU that ate the whole gain: 37 s against 38 s in float32 for 60 prompts). Inside the block the
    frozen float32 parameters are marked as requiring grad (generation runs under no_grad, so no graph is
    built) and are restored on the way out, also after an error; the values are the ones per-step casting
    gives. The cache holds a bf16 copy of the model's float32 weights until the block ends."""
    if not enabled:
        yield
        return
    frozen = [p for p in model.parameters() if not p.requires_grad and p.dtype == torch.float32]
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: Sequence, num_return_sequences: int = 1, *,
                     max_new_tokens: int = 64, batch_size: int = 16, sample: bool = False,
                     temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                     chat: bool = True, add_special_tokens: bool = False, longest_first: bool = True,
                     eos: str = "tokenizer", strip: bool = True, desc: str = "generate",
                     progress: bool = True, mixed_precision: str = "no") -> list[list[str]]:
    """``num_return_sequences`` completions of every prompt, in the order of ``prompts``.

    ``sample``: False = greedy (one completion per prompt), True = temperature / nucleus (``top_p``)
    sampling, ``top_k`` off. ``eos``: "tokenizer" stops at ``tokenizer.eos_token_id``; "model" leaves
    the stop tokens to the model's generation config (a judge's own, e.g. several ids). Completions are
    the new tokens decoded without special tokens, stripped when ``strip``. ``mixed_precision``: "no" (the
    model's own dtype) or "bf16" (``bf16_autocast`` around the batches: on this AMX-bf16 CPU the quick
    start's evaluation generation ran 1.7x faster, 25 of 60 completions identical to float32's, all 60
    with the same keyword-judge label; ``benchmarks/quickstart_speed.py``).
    """
    n = int(num_return_sequences)
    if n < 1 or batch_size < 1:
        raise ValueError(f"num_return_sequences ({n}) and batch_size ({batch_size}) must be >= 1")
    if n > 1 and not sample:
        raise ValueError("greedy decoding gives one completion per prompt; use sample=True for several")
    if eos not in ("tokenizer", "model"):
        raise ValueError(f"eos={eos!r}: use 'tokenizer' or 'model'")
    if mixed_precision not in MIXED_PRECISIONS:
        raise ValueError(f"mixed_precision={mixed_precision!r}: use 'no' or 'bf16'")
    if not prompts:
        return []
    encoded = encode_prompts(tokenizer, prompts, chat, add_special_tokens)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i])) if longest_first else list(range(len(encoded)))
    if sample:
        calls = [([i], min(batch_size, n - s)) for i in order for s in range(0, n, batch_size)]
    else:
        calls = [(order[s:s + batch_size], 1) for s in range(0, len(order), batch_size)]
    pad = tokenizer.pad_token_id
    options = dict(max_new_tokens=max_new_tokens, pad_token_id=pad)
    if eos == "tokenizer":
        options["eos_token_id"] = tokenizer.eos_token_id
    if sample:
        options.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
    else:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out: list[list[str]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    own = not sample and decoder_for(model) == "safeanchor"
    if own:
        stops = options.get("eos_token_id", getattr(causal_lm(model).generation_config, "eos_token_id", None))
        stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
    try:
        if seed is not None:
            torch.manual_seed(seed)
        with bf16_autocast(model, device.type, mixed_precision == "bf16"):
            for idx, m in tqdm(calls, desc=desc, disable=not progress, leave=False):
                if own:
                    new = greedy_decode(model, [encoded[i] for i in idx], max_new_tokens, stops, pad)
                    for i, tokens in zip(idx, new):
                        text = tokenizer.decode(tokens, skip_special_tokens=True)
                        out[i].append(text.strip() if strip else text)
                    continue
                ids, mask = left_padded([encoded[i] for i in idx], pad)
                width = ids.shape[1]
                extra = {"num_return_sequences": m} if sample else {}
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **options, **extra)
                for row in range(gen.shape[0]):  # transformers repeats each input m times in a row
                    text = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
                    out[idx[row // m]].append(text.strip() if strip else text)
    finally:
        model.train(was_training)
    return out


def generate(model, tokenizer, prompts: Sequence, max_new_tokens: int = 64, batch_size: int = 16,
             desc: str = "generate", progress: bool = True, cache: "GenerationCache | None" = None,
             **options) -> list[str]:
    """One completion per prompt (greedy unless ``sample=True``), in the order of ``prompts``;
    ``options``: those of ``generate_samples`` (chat, add_special_tokens, longest_first, eos, strip, ...).

    ``cache``: a ``GenerationCache`` of this very model (the caller vouches for that, e.g. the aligned base
    with the adapter disabled): greedy string prompts found there are not generated again, the others are
    generated and added."""
    def fresh(ps) -> list[str]:
        return [c[0] for c in generate_samples(model, tokenizer, ps, 1, max_new_tokens=max_new_tokens,
                                               batch_size=batch_size, desc=desc, progress=progress, **options)]

    if cache is None or options.get("sample") or not all(isinstance(p, str) for p in prompts):
        return fresh(prompts)
    settings = {"max_new_tokens": int(max_new_tokens), "batch_size": int(batch_size), **options}
    found = cache.lookup(settings, prompts)
    missing = list(dict.fromkeys(p for p in prompts if p not in found))
    if missing:
        new = dict(zip(missing, fresh(missing)))
        cache.store(settings, new)
        found.update(new)
    return [found[p] for p in prompts]


class GenerationCache:
    """Greedy completions of one fixed model, kept on disk so that no run generates them twice.

    The evaluation of the aligned base (step 0), CSM's s_0 and the look-alikes' answers are the same in
    every run on that base, whatever the method or seed: a grid of 24 runs generated them 24 times. A
    cache lives in a directory bound to the weights (the aligned base's own directory, which is rebuilt,
    cache and all, when the base is); one JSON file per generation setting, keyed also by what changes
    the numerics (parameter dtype, device type, attention kernel, torch and transformers versions).
    Completions generated in other batches can differ from a fresh generation in float round-off only
    (as they do between batch sizes). Writes are atomic and merge with what another process wrote."""

    def __init__(self, directory, model):
        import transformers

        self.directory = Path(directory)
        param = next(model.parameters())
        config = getattr(model, "config", None)
        self.runtime = {"dtype": str(param.dtype), "device": param.device.type,
                        "attn": str(getattr(config, "_attn_implementation", None)),
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "decoder": decoder_for(model)}

    def path(self, settings: dict) -> Path:
        blob = json.dumps({"settings": settings, "runtime": self.runtime}, sort_keys=True, default=str)
        return self.directory / f"generations-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"

    def _read(self, path: Path) -> dict[str, str]:
        try:
            return dict(json.loads(path.read_text())["completions"])
        except (OSError, ValueError, KeyError, TypeError):  # absent, or torn by a crash: a miss, regenerated
            return {}

    def lookup(self, settings: dict, prompts: Sequence[str]) -> dict[str, str]:
        """The cached completions of those of ``prompts`` that have one."""
        stored = self._read(self.path(settings))
        return {p: stored[p] for p in prompts if p in stored}

    def store(self, settings: dict, completions: dict[str, str]) -> None:
        path = self.path(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**self._read(path), **completions}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"settings": settings, "runtime": self.runtime, "completions": merged},
                                  default=str))
        os.replace(tmp, path)
