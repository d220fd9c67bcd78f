"""Log-likelihood multiple choice: hand-computed values on a bigram model, padding/batching against an
unbatched reference on the tiny Llama, tie breaking, the optional lm_eval backend's wiring."""
import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from conftest import eager64

from safeanchor.errors import SafeAnchorError
from safeanchor.models import tiny_model, tiny_tokenizer
from safeanchor.suite import mc


class BigramLM(torch.nn.Module):
    """p(next token | current token) = softmax(table[current]): log-likelihoods are sums of table entries."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def tid(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1
    return ids[0]


def bigram(tok, probs: dict) -> BigramLM:
    """probs[(cur, nxt)] = p; the rest of each row's mass is spread evenly over the other tokens."""
    vocab = len(tok)
    table = torch.zeros(vocab, vocab)
    rows: dict = {}
    for (cur, nxt), p in probs.items():
        rows.setdefault(tid(tok, cur), {})[tid(tok, nxt)] = p
    for cur in range(vocab):
        given = rows.get(cur, {})
        rest = (1.0 - sum(given.values())) / (vocab - len(given))
        table[cur] = math.log(rest)
        for nxt, p in given.items():
            table[cur, nxt] = math.log(p)
    return BigramLM(table)


@pytest.fixture
def tok():
    return tiny_tokenizer()


def test_hand_computed_loglikelihoods_and_choice(tok):
    model = bigram(tok, {("Q", " "): 0.5, (" ", "a"): 0.25, (" ", "b"): 0.125, ("a", "b"): 0.5})
    [rec] = mc.score_items(model, tok, [{"context": "Q", "choices": ["a", "b", "ab"], "gold": [0]}])
    expected = [math.log(0.5 * 0.25), math.log(0.5 * 0.125), math.log(0.5 * 0.25 * 0.5)]
    assert rec["lls"] == pytest.approx(expected, abs=1e-5)
    assert rec["pred"] == 0 and rec["acc"] == 1 and not rec["tie"]
    # per-character normalisation: "ab" has ll/2 = -1.386 > "a"'s -2.079
    assert rec["pred_norm"] == 2 and rec["acc_norm"] == 0


def test_trailing_space_of_context_moves_into_continuation(tok):
    ids, n = mc.encode_request(tok, "Q ", "a")
    assert n == 2 and tok.decode(ids[-2:]) == " a"
    ids2, n2 = mc.encode_request(tok, "Q", " a")
    assert ids == ids2 and n == n2


def test_empty_context_is_replaced_by_bos(tok):
    ids, n = mc.encode_request(tok, "", "ab")
    assert ids[0] == tok.bos_token_id and n == 2


def test_empty_choice_is_an_error(tok):
    with pytest.raises(SafeAnchorError, match="non-empty"):
        mc.encode_request(tok, "Q", "")


def test_ties_break_to_the_lowest_index_and_are_reported(tok):
    model = bigram(tok, {("Q", " "): 0.5, (" ", "a"): 0.2, (" ", "b"): 0.2})
    recs = mc.score_items(model, tok, [{"context": "Q", "choices": ["a", "b"], "gold": [0]},
                                       {"context": "Q", "choices": ["a", "b"], "gold": [1]}])
    assert recs[0]["lls"][0] == recs[0]["lls"][1]
    assert [r["pred"] for r in recs] == [0, 0] and all(r["tie"] for r in recs)
    assert [r["acc"] for r in recs] == [1, 0]
    assert mc.argmax_first([1.0, 3.0, 3.0]) == (1, True)
    assert mc.argmax_first([-1.0, -2.0]) == (0, False)


def reference_ll(model, tok, context, continuation):
    """Unbatched, unpadded: sum of log p over the continuation tokens."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
    return sum(logp[pos - 1, whole[pos]].item() for pos in range(len(ctx), len(whole)))


def test_batched_left_padded_scores_equal_unbatched_reference(tok):
    model = tiny_model(seed=3).eval()
    reqs = [mc.Request("The cat sat on the", " mat"), mc.Request("Q: 2+2?\nA:", " 4"),
            mc.Request("A much longer context with many more bytes in it, to force padding:", " yes indeed"),
            mc.Request("Q: 2+2?\nA:", " 5"), mc.Request("x", " y")]
    got = mc.loglikelihoods(model, tok, reqs, batch_size=3)
    want = [reference_ll(model, tok, r.context, r.continuation) for r in reqs]
    assert [g for g, _ in got] == pytest.approx(want, abs=1e-4)


def test_shared_prefix_is_computed_once_and_changes_nothing(tok, monkeypatch):
    model = tiny_model(seed=4).eval()
    primer = "Q: What is one plus one?\nA: Two.\n\nQ: What colour is grass?\nA: Green.\n\n"
    reqs = [mc.Request(primer + "Q: Capital of Italy?\nA:", c) for c in (" Rome", " Milan", " Turin, of course")]
    reqs += [mc.Request(primer + "Q: Largest ocean?\nA:", c) for c in (" Pacific", " Atlantic")]
    calls = []
    real = mc.prefix_cache
    def spy(model, prefix, batch, device, length):
        cache = real(model, prefix, batch, device, length)
        calls.append((len(prefix), cache is not None))
        return cache

    monkeypatch.setattr(mc, "prefix_cache", spy)
    got = mc.loglikelihoods(model, tok, reqs, batch_size=4)
    want = [reference_ll(model, tok, r.context, r.continuation) for r in reqs]
    assert [g for g, _ in got] == pytest.approx(want, abs=1e-4)
    assert calls and calls[0][0] >= len(primer) and calls[0][1]  # a cache of at least the primer was used


@pytest.mark.parametrize("window, shares", [(16, False), (512, True)])
def test_shared_prefix_under_a_sliding_window(tok, monkeypatch, window, shares):
    """Gemma-2 (float64, fresh weights): padding after a shared prefix would take places a sliding window counts,
    so the prefix is shared only when the rows fit the smallest window; the scores equal the unpadded
    reference either way. Window 16: longer than the padding (12 tokens), shorter than the rows (62-74)."""
    import random

    from transformers import Gemma2Config, Gemma2ForCausalLM

    seed = random.SystemRandom().randrange(1 << 30)
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=window,
                       max_position_embeddings=512, initializer_range=0.3, attn_implementation=eager64(),
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = Gemma2ForCausalLM(cfg).double().eval()
    primer = "Q: What is one plus one?\nA: Two.\n\nQ: Capital of Italy?\nA:"
    reqs = [mc.Request(primer, c) for c in (" Rome", " Milan, of course", " Turin")]
    calls = []
    real = mc.prefix_cache
    def spy(*a):
        cache = real(*a)
        if cache is not None:
            calls.append(len(a[1]))
        return cache

    monkeypatch.setattr(mc, "prefix_cache", spy)
    got = mc.loglikelihoods(model, tok, reqs, batch_size=3, min_prefix=4)
    want = [reference_ll(model, tok, r.context, r.continuation) for r in reqs]
    assert [g for g, _ in got] == pytest.approx(want, rel=1e-6, abs=1e-5), f"seed {seed}: window {window}"
    assert bool(calls) is shares, f"seed {seed}: window {window}, prefix caches of {calls}"


def test_greedy_flag(tok):
    model = bigram(tok, {("Q", " "): 0.9, (" ", "a"): 0.9})
    got = mc.loglikelihoods(model, tok, [mc.Request("Q", " a"), mc.Request("Q", " b")])
    assert [g for _, g in got] == [True, False]


def test_lm_eval_backend_is_optional(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(SafeAnchorError, match="pip install lm_eval"):
        mc.run_requests(None, tok, [mc.Request("a", " b")], backend="lm_eval")
    with pytest.raises(SafeAnchorError, match="unknown log-likelihood backend"):
        mc.run_requests(None, tok, [mc.Request("a", " b")], backend="vllm")


def test_lm_eval_backend_wiring(tok, monkeypatch):
    """HFLM gets the loaded model and the (context, continuation) pairs, in order."""
    seen = {}

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            seen["model"], seen["batch_size"] = pretrained, batch_size

        def loglikelihood(self, instances):
            seen["args"] = [i.arguments for i in instances]
            return [(-float(len(i.arguments[1])), False) for i in instances]

    class Instance:
        def __init__(self, request_type, doc, arguments, idx):
            self.arguments = arguments

    fake = {"lm_eval": types.ModuleType("lm_eval"), "lm_eval.api": types.ModuleType("lm_eval.api"),
            "lm_eval.api.instance": types.ModuleType("lm_eval.api.instance"),
            "lm_eval.models": types.ModuleType("lm_eval.models"),
            "lm_eval.models.huggingface": types.ModuleType("lm_eval.models.huggingface")}
    fake["lm_eval.api.instance"].Instance = Instance
    fake["lm_eval.models.huggingface"].HFLM = HFLM
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    sentinel = object()
    [rec] = mc.score_items(sentinel, tok, [{"context": "Q:", "choices": ["long one", "x"], "gold": [1]}],
                           backend="lm_eval", batch_size=5)
    assert seen["model"] is sentinel and seen["batch_size"] == 5
    assert seen["args"] == [("Q:", " long one"), ("Q:", " x")]
    assert rec["pred"] == 1 and rec["acc"] == 1


def test_letter_format_and_shots():
    ctx = mc.lettered("What?", ["x", "y"], "Question: ")
    assert ctx == "Question: What?\nA. x\nB. y\nAnswer:"
    assert mc.with_shots([("D1\nAnswer:", "B")], "Q\nAnswer:", "H\n\n") == "H\n\nD1\nAnswer: B\n\nQ\nAnswer:"


def test_batches_group_rows_that_share_a_prefix():
    primer = [1] * 50
    rows = [primer + [2, 3, 4, 5], primer + [2, 3, 4, 6], [7, 8, 9, 10, 11], primer + [3, 3, 3, 3], [7, 8, 9, 12, 13]]
    batches = mc._plan_batches(rows, [1] * 5, batch_size=8)
    assert sorted(map(sorted, batches)) == [[0, 1, 3], [2, 4]]
    assert all(len(b) <= 2 for b in mc._plan_batches(rows, [1] * 5, batch_size=2))
