"""Log-likelihood multiple choice, scored the way lm-evaluation-harness scores ``multiple_choice``.

For a request (context, continuation): ll = sum_t log p(cont_t | context, cont_<t), from one forward
pass over (context + continuation)[:-1]; ``greedy`` = every continuation token is the argmax.
Tokenisation follows lm-eval's HFLM: trailing whitespace of the context moves into the continuation,
the pair is tokenised as one string and the continuation is what follows the context's own tokens;
no special tokens unless ``add_bos`` (lm-eval's default for causal LMs); an empty context is replaced
by the BOS (else EOS) token.

Per item with choices c_i and lls l_i: acc = 1[argmax_i l_i in gold], acc_norm = 1[argmax_i
l_i / len(c_i in characters) in gold]. Ties break to the LOWEST choice index (numpy.argmax, as in
lm-eval); ties are counted in every result (``n_ties``), since where the gold answer is listed
first (TruthfulQA MC1) a tie is credited as correct.

``backend="lm_eval"`` sends the same requests to lm-eval's ``HFLM(pretrained=<loaded model>)``
instead (imported lazily; lm-eval is not a dependency).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SafeAnchorError
from ..generation import common_prefix, left_padded, prefix_cache, tail_logits


@dataclass(frozen=True)
class Request:
    context: str
    continuation: str


def encode_request(tokenizer, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], int]:
    """(token ids of context + continuation, number of continuation tokens at the end)."""
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped):] + continuation
        context = stripped
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    cont = whole[len(ctx):]
    if not cont:
        raise SafeAnchorError(f"choice {continuation!r} encodes to no tokens after its context; every choice "
                              f"must be non-empty")
    prefix = list(ctx)
    special = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if add_bos or not prefix:
        prefix = [special] + prefix
    return prefix + cont, len(cont)


def _max_length(model) -> int:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _plan_batches(rows: list[list[int]], keep: list[int], batch_size: int) -> list[list[int]]:
    """Row indices in lexicographic order, cut into batches that share long prefixes. A row joins the
    current batch (of n rows, common prefix L) when the batch stays within ``batch_size`` and the
    tokens it saves by reusing the prefix, L', exceed what the shrink costs the others, n (L - L')."""
    order = sorted(range(len(rows)), key=lambda j: rows[j])
    batches: list[list[int]] = []
    common = 0
    for j in order:
        if batches and len(batches[-1]) < batch_size:
            first = batches[-1][0]
            cap = min(common, len(rows[j]) - keep[j])
            shared = common_prefix([rows[first], rows[j]], cap)
            if len(batches[-1]) * (common - shared) < shared:
                batches[-1].append(j)
                common = shared
                continue
        batches.append([j])
        common = len(rows[j]) - keep[j]
    return batches


def _batch_logits(model, rows: list[list[int]], keep: list[int], pad: int, device, min_prefix: int):
    """Last max(keep) logits of each row. Rows sharing a long token prefix (a few-shot primer, the
    question before its choices) compute it once and continue from its KV cache."""
    k = max(keep)
    cap = min(len(r) - kp for r, kp in zip(rows, keep))  # the scored positions stay out of the prefix
    offset = common_prefix(rows, cap) if len(rows) > 1 else 0
    length = max(len(r) for r in rows)
    past = prefix_cache(model, rows[0][:offset], len(rows), device, length) if offset >= min_prefix else None
    if past is None:
        offset = 0
    ids, mask = left_padded([r[offset:] for r in rows], pad)
    return tail_logits(model, ids.to(device), mask.to(device), k, past, offset)


@torch.no_grad()
def loglikelihoods(model, tokenizer, requests: list[Request], batch_size: int = 8, add_bos: bool = False,
                   progress: bool = False, min_prefix: int = 16) -> list[tuple[float, bool]]:
    """(summed log-likelihood, greedy) per request, in order. Requests whose model input is the same
    token sequence (e.g. one-token letter choices after the same question) share one forward row;
    rows are batched by shared prefix (``_plan_batches``), and a batch's common prefix of at least
    ``min_prefix`` tokens is computed once and continued from its KV cache."""
    if not requests:
        return []
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    limit = _max_length(model)
    rows: dict[tuple, int] = {}
    row_ids: list[list[int]] = []
    reads: list[tuple[int, list[int]]] = []  # per request: its row, its continuation tokens
    for r in requests:
        full, n_cont = encode_request(tokenizer, r.context, r.continuation, add_bos)
        if n_cont > limit:
            raise SafeAnchorError(f"a choice of {n_cont} tokens exceeds the model's context of {limit}")
        key = tuple(full[:-1][-limit:])  # left-truncated to the model's context
        if key not in rows:
            rows[key] = len(row_ids)
            row_ids.append(list(key))
        reads.append((rows[key], full[-n_cont:]))
    keep = [0] * len(row_ids)
    by_row: dict[int, list[int]] = {}
    for i, (row, cont) in enumerate(reads):
        keep[row] = max(keep[row], len(cont))
        by_row.setdefault(row, []).append(i)

    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        for batch in tqdm(_plan_batches(row_ids, keep, batch_size), desc="loglikelihood", disable=not progress,
                          leave=False):
            k = max(keep[j] for j in batch)
            logits = _batch_logits(model, [row_ids[j] for j in batch], [keep[j] for j in batch], pad, device,
                                   min_prefix)
            logprobs = torch.log_softmax(logits, dim=-1)
            for b, j in enumerate(batch):
                for i in by_row[j]:
                    cont = reads[i][1]
                    lp = logprobs[b, k - len(cont):]
                    target = torch.tensor(cont, device=lp.device)
                    out[i] = (lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
    finally:
        model.train(was_training)
    return out


def lm_eval_loglikelihoods(model, tokenizer, requests: list[Request], batch_size: int = 8) -> list[tuple[float, bool]]:
    """The same requests through lm-eval's HFLM wrapping the loaded model (optional backend)."""
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise SafeAnchorError("backend lm_eval needs lm-evaluation-harness (pip install lm_eval); or use the "
                              "built-in scorer (backend=native)") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=(r.context, r.continuation), idx=i)
                 for i, r in enumerate(requests)]
    return [(float(ll), bool(greedy)) for ll, greedy in lm.loglikelihood(instances)]


BACKENDS = ("native", "lm_eval")


def run_requests(model, tokenizer, requests: list[Request], backend: str = "native", batch_size: int = 8,
                 add_bos: bool = False, progress: bool = False) -> list[tuple[float, bool]]:
    if backend == "native":
        return loglikelihoods(model, tokenizer, requests, batch_size, add_bos, progress)
    if backend == "lm_eval":
        return lm_eval_loglikelihoods(model, tokenizer, requests, batch_size)
    raise SafeAnchorError(f"unknown log-likelihood backend {backend!r}; use one of {', '.join(BACKENDS)}")


def argmax_first(values: list[float]) -> tuple[int, bool]:
    """(index of the maximum, lowest index on ties; whether the maximum was tied)."""
    best = max(values)
    winners = [i for i, v in enumerate(values) if v == best]
    return winners[0], len(winners) > 1


def chat_context(tokenizer, context: str) -> str:
    """The context as one user turn of the chat template, followed by the assistant header."""
    return tokenizer.apply_chat_template([{"role": "user", "content": context}], tokenize=False,
                                         add_generation_prompt=True)


def score_items(model, tokenizer, items: list[dict], *, backend: str = "native", batch_size: int = 8,
                add_bos: bool = False, chat_template: bool = False, progress: bool = False) -> list[dict]:
    """Score MC items ``{"context", "choices", "gold": [indices], ...}`` (choices are appended after
    ``item.get("delimiter", " ")``). Returns one record per item: the item's fields plus ``lls``,
    ``pred``, ``pred_norm``, ``acc``, ``acc_norm``, ``tie``."""
    requests, spans = [], []
    for item in items:
        context, delim = item["context"], item.get("delimiter", " ")
        if chat_template:
            context, delim = chat_context(tokenizer, context), ""
        spans.append((len(requests), len(item["choices"])))
        requests += [Request(context, delim + c) for c in item["choices"]]
    results = run_requests(model, tokenizer, requests, backend, batch_size, add_bos, progress)
    records = []
    for item, (start, n) in zip(items, spans):
        lls = [results[start + j][0] for j in range(n)]
        pred, tie = argmax_first(lls)
        pred_norm, _ = argmax_first([ll / max(1, len(c)) for ll, c in zip(lls, item["choices"])])
        gold = set(item["gold"])
        records.append({**item, "lls": lls, "pred": pred, "pred_norm": pred_norm,
                        "acc": int(pred in gold), "acc_norm": int(pred_norm in gold), "tie": tie})
    return records


LETTERS = "ABCDEFGHIJ"


def lettered(question: str, options: list[str], prefix: str = "") -> str:
    """``{prefix}{question}\\nA. ...\\nB. ...\\nAnswer:`` (the lm-eval MMLU / MedQA item format)."""
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{prefix}{question.strip()}\n{lines}\nAnswer:"


def with_shots(demos: list[tuple[str, str]], context: str, header: str = "") -> str:
    """``header`` + k solved demos (``context + " " + answer``, blank-line separated) + the item."""
    return header + "".join(f"{c} {a}\n\n" for c, a in demos) + context
