"""generation.greedy_decode (shared prefix computed once, stopped rows dropped from the batch) against
transformers' own greedy search (``model.generate`` on a left-padded batch), token for token.

The models run in float64 so that batch-shape round-off cannot flip an argmax: any difference is a bug in
the cache layout, the mask or the position ids. Fresh random weights, prompts and stop tokens every run;
the seed is in the failure message."""
import random

import pytest
import torch
from conftest import eager64

from safeanchor import generation
from safeanchor.generation import decoder_for, generate, greedy_decode


def _fresh_seed() -> int:
    return random.SystemRandom().randrange(1 << 30)


def _build(config_cls, model_cls, seed, **extra):
    cfg = config_cls(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                     initializer_range=0.3, **extra)
    torch.manual_seed(seed)
    return model_cls(cfg).double().eval()


def _llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _build(LlamaConfig, LlamaForCausalLM, seed, num_attention_heads=4, num_key_value_heads=2)


def _gemma2(seed, window=5):
    """Sliding-window layers (by default window 5, shorter than the sequences) and logit soft-capping."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _build(Gemma2Config, Gemma2ForCausalLM, seed, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  sliding_window=window, final_logit_softcapping=3.0, attn_implementation=eager64())


def _qwen2(seed):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _build(Qwen2Config, Qwen2ForCausalLM, seed, num_attention_heads=4, num_key_value_heads=2)


def _reference(model, rows, max_new_tokens, eos, pad, logits=None):
    """REFERENCE: transformers' greedy search on the left-padded batch, cut after the first stop token.
    ``logits``, a list, receives the logits each step's tokens were chosen from (batch x vocab per step)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all(), "the reference's logits are NaN"
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=list(eos), pad_token_id=pad, temperature=None, top_p=None, top_k=None,
                             return_dict_in_generate=True, output_logits=True)
    if logits is not None:
        logits.extend(gen.logits)
    gen = gen.sequences
    out = []
    for g in gen[:, width:].tolist():
        cut = next((k for k, t in enumerate(g) if t in eos), None)
        out.append(g if cut is None else g[:cut + 1])
    return out


def _case(seed, shared_len):
    rng = random.Random(seed)
    prefix = [rng.randrange(3, 97) for _ in range(shared_len)]
    rows = [prefix + [rng.randrange(3, 97) for _ in range(rng.randrange(1, 9))] for _ in range(rng.randrange(2, 7))]
    return rows, rng


@pytest.mark.parametrize("arch", [_llama, _gemma2, _qwen2])
@pytest.mark.parametrize("shared_len", [0, 1, 6])
def test_greedy_decode_gives_transformers_greedy_tokens(arch, shared_len):
    seed = _fresh_seed()
    model = arch(seed)
    rows, rng = _case(seed, shared_len)
    # stop tokens the model does emit early in some rows, so rows leave the batch at different steps
    free = _reference(model, rows, 12, set(), 0)
    emitted = [t for g in free for t in g[1:6]]
    eos = {rng.choice(emitted), rng.choice(emitted)}
    steps = []
    want = _reference(model, rows, 12, eos, 0, steps)
    seen = []
    forward = type(model).forward

    def spy(self, input_ids=None, **kw):
        out = forward(self, input_ids=input_ids, **kw)
        seen.append(out.logits[:, -1])
        return out

    type(model).forward = spy
    try:
        got = greedy_decode(model, rows, 12, sorted(eos), 0)
    finally:
        type(model).forward = forward
    assert got == want, f"seed {seed}: greedy_decode differs from model.generate"
    assert any(len(g) < 12 for g in want), f"seed {seed}: no row stopped early, the case tests too little"
    assert decoder_for(model) == "safeanchor"
    # The logits behind every token, not only their argmax (random models repeat tokens a lot): step k's
    # forward holds the rows still going, in order. A shared prefix adds one forward in front.
    n_steps = max(len(g) for g in got)
    assert len(seen) in (n_steps, n_steps + 1), f"seed {seed}: {len(seen)} forwards for {n_steps} steps"
    for k, mine in enumerate(seen[len(seen) - n_steps:]):
        alive = [r for r, g in enumerate(got) if len(g) > k]
        torch.testing.assert_close(mine.double(), steps[k][alive].double(), rtol=0, atol=1e-5,
                                   msg=lambda m: f"seed {seed}: step {k} rows {alive}: {m}")


def test_rows_leave_the_batch_and_the_shared_prefix_runs_once(monkeypatch):
    """What the decoder feeds the model: the shared prefix once (batch 1), then the rest, then one token per
    row still going, so that a row stopped at step k is no longer computed."""
    seed = _fresh_seed()
    model = _llama(seed)
    rows, rng = _case(seed, 5)
    rows = rows[:2] + [rows[0][:5] + [7, 8, 9]]  # at least three rows
    free = _reference(model, rows, 6, set(), 0)
    eos = {free[0][1]}  # row 0 stops at its second token (or earlier)
    shapes = []
    forward = type(model).forward

    def spy(self, input_ids=None, **kw):
        shapes.append(tuple(input_ids.shape))
        return forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    got = greedy_decode(model, rows, 6, sorted(eos), 0)
    monkeypatch.undo()
    assert got == _reference(model, rows, 6, eos, 0), f"seed {seed}"
    assert shapes[0] == (1, 5), f"seed {seed}: the shared prefix is not computed once: {shapes}"
    assert shapes[1][0] == len(rows) and shapes[1][1] == max(len(r) for r in rows) - 5, f"seed {seed}: {shapes}"
    batch = [s[0] for s in shapes[2:]]
    stopped = [next((k for k, t in enumerate(g) if t in eos), None) for g in got]
    for step, b in enumerate(batch, start=1):  # forward for step `step` runs on the rows not stopped before it
        assert b == sum(1 for s in stopped if s is None or s >= step), f"seed {seed}: step {step} batch {b}"


@pytest.mark.parametrize("window, shares", [(5, False), (64, True)])
def test_prefix_is_shared_under_a_sliding_window_only_when_everything_fits_in_it(monkeypatch, window, shares):
    """Padding between the shared prefix and a row takes cache places a sliding window counts: the prefix is
    shared only when prompt plus new tokens fit the smallest window (64 here). Either way the rows' first logits
    equal each row's own unpadded forward (random models' greedy tokens alone are too repetitive to show it),
    and the tokens are greedy's."""
    seed = _fresh_seed()
    model = _gemma2(seed, window)
    rows, rng = _case(seed, 6)
    prefix = rows[0][:6]
    rows = [prefix + [rng.randrange(3, 97) for _ in range(2)], prefix + [rng.randrange(3, 97) for _ in range(8)]]
    # 6 padding places after the prefix in the first row: they would take most of a 5-token window
    shapes, first = [], []
    forward = type(model).forward

    def spy(self, input_ids=None, **kw):
        out = forward(self, input_ids=input_ids, **kw)
        shapes.append(tuple(input_ids.shape))
        if input_ids.shape[0] == len(rows) and not first:
            first.append(out.logits[:, -1])
        return out

    monkeypatch.setattr(type(model), "forward", spy)
    got = greedy_decode(model, rows, 10, [], 0)
    monkeypatch.undo()
    with torch.no_grad():
        alone = torch.stack([model(input_ids=torch.tensor([r])).logits[0, -1] for r in rows])
    torch.testing.assert_close(first[0], alone, rtol=0, atol=1e-5, msg=lambda m: f"seed {seed}: window {window}: {m}")
    assert got == _reference(model, rows, 10, set(), 0), f"seed {seed}: window {window}"
    assert (shapes[0] == (1, 6)) is shares, f"seed {seed}: window {window}, forwards {shapes}"


def test_generate_uses_the_decoder_only_where_it_is_exact(monkeypatch):
    """Greedy chat generation goes through greedy_decode (model.generate is never called); a generation config
    with a greedy-relevant entry (a repetition penalty) or sampling goes to model.generate, as before."""
    from safeanchor.models import tiny_model, tiny_tokenizer

    tok, model = tiny_tokenizer(), tiny_model(seed=_fresh_seed()).eval()
    prompts = ["hi", "Tell me a story about a cat", "Why?"]
    calls = []
    real = generation.greedy_decode
    monkeypatch.setattr(generation, "greedy_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(type(model), "generate", lambda *a, **k: pytest.fail("model.generate was called"))
    generate(model, tok, prompts, 5, 2, progress=False)
    assert calls == [1, 1]
    monkeypatch.undo()
    model.generation_config.repetition_penalty = 1.3
    assert decoder_for(model) == "transformers"
    monkeypatch.setattr(generation, "greedy_decode", lambda *a, **k: pytest.fail("greedy_decode was called"))
    generate(model, tok, prompts, 5, 2, progress=False)


def test_decoder_for_refuses_models_it_cannot_decode():
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import MambaConfig, MambaForCausalLM

    assert decoder_for(MambaForCausalLM(MambaConfig(num_hidden_layers=1, hidden_size=16, vocab_size=40,
                                                    state_size=4))) == "transformers"
    prompt_tuned = get_peft_model(_llama(0), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert decoder_for(prompt_tuned) == "transformers"
    lora = get_peft_model(_llama(0), LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    assert decoder_for(lora) == "safeanchor"
