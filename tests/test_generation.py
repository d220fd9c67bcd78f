"""The one generation loop (safeanchor.generation) against the loops it replaced, on the tiny random model:
chat prompts (greedy, longest-first), token-id prompts (GCG), raw-text prompts with the judge model's own
stop tokens (judges), and seeded sampling with several samples per prompt (HumanEval pass@k). Each must
give the same text token for token (and sampling must leave torch's RNG where the old loop left it)."""
import pytest
import torch

from safeanchor import judges
from safeanchor.data.chat import prompt_ids
from safeanchor.generation import encode_prompts, generate, generate_samples
from safeanchor.models import tiny_model, tiny_tokenizer

PROMPTS = ["hi", "Tell me a long story about a lighthouse keeper and her cat", "What is 2+2?", "x",
           "Name three rivers in Europe, please", "ok then", "Why?"]


# ---------------------------------------------------------------- slow references
# The four loops as they stood before generation.generate covered them, copied verbatim (apart from
# names and the progress bar); they exist only to pin the new loop's outputs.

@torch.no_grad()
def reference_generate(model, tokenizer, prompts, max_new_tokens=64, batch_size=16):
    """REFERENCE (old generation.generate): chat prompts, greedy, longest-first batches."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None)
            for row, i in enumerate(idx):
                out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def reference_generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size):
    """REFERENCE (old suite.gcg.generate_ids): token-id prompts, greedy, batches in input order."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(chunk):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             temperature=None, top_p=None, top_k=None)
        out += [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    return out


def reference_sample(model, tokenizer, prompts, n, max_new_tokens, temperature, top_p, batch_size, seed):
    """REFERENCE (old suite.humaneval._sample): n seeded samples per prompt, one prompt at a time."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    torch.manual_seed(seed)
    try:
        for p in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, p)], device=device)
            replies = []
            for start in range(0, n, batch_size):
                m = min(batch_size, n - start)
                with torch.no_grad():
                    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                         temperature=temperature, top_p=top_p, top_k=None, num_return_sequences=m,
                                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id)
                replies += [tokenizer.decode(g[ids.shape[1]:], skip_special_tokens=True).strip() for g in gen]
            out.append(replies)
    finally:
        model.train(was_training)
    return out


def reference_judge_decode(model, tok, texts, batch_size, max_new_tokens, add_special_tokens):
    """REFERENCE (old judges.ModelJudge._decode): raw text, greedy, input order, the model's stop tokens."""
    out = []
    tok.padding_side = "left"
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=add_special_tokens).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """The tiny model with a generation-config stop token that it actually emits (not the tokenizer's EOS),
    so that 'stop at the tokenizer's EOS' and 'stop at the model's own' give different texts."""
    m = tiny_model(seed=3).eval()
    ids = torch.tensor([prompt_ids(tok, PROMPTS[1])])
    with torch.no_grad():
        gen = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                         eos_token_id=None, pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
    m.generation_config.eos_token_id = int(gen[0, ids.shape[1] + 3])  # emitted 4th for PROMPTS[1]
    assert m.generation_config.eos_token_id != tok.eos_token_id
    return m


# ---------------------------------------------------------------- new == old

@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_chat_prompts_greedy_match_the_old_loop(model, tok, batch_size):
    model.train()
    got = generate(model, tok, PROMPTS, 10, batch_size, progress=False)
    assert model.training  # mode restored
    assert got == reference_generate(model, tok, PROMPTS, 10, batch_size)
    assert generate(model, tok, [], 10, batch_size) == []


@pytest.mark.parametrize("batch_size", [2, 4])
def test_token_id_prompts_match_gcg_loop(model, tok, batch_size):
    ids = [prompt_ids(tok, p) for p in PROMPTS]
    ids[2] = ids[2][:-3] + tok(" zz!", add_special_tokens=False)["input_ids"] + ids[2][-3:]  # a spliced suffix
    got = generate(model.eval(), tok, ids, 9, batch_size, progress=False, longest_first=False)
    assert got == reference_generate_ids(model, tok, ids, 9, batch_size)
    # strings through the chat template and their ids are the same prompts
    assert generate(model, tok, PROMPTS, 9, batch_size, progress=False, longest_first=False) == \
        generate(model, tok, encode_prompts(tok, PROMPTS), 9, batch_size, progress=False, longest_first=False)


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_raw_text_prompts_match_judge_loop(model, tok, add_special_tokens):
    texts = [f"<guard>{p}|answer {i}</guard>" for i, p in enumerate(PROMPTS)]
    want = reference_judge_decode(model, tok, texts, 3, 8, add_special_tokens)
    got = generate(model, tok, texts, 8, 3, progress=False, chat=False, add_special_tokens=add_special_tokens,
                   longest_first=False, eos="model", strip=False)
    assert got == want
    # the model's stop token mattered somewhere, and stopping at the tokenizer's EOS differs there
    other = generate(model, tok, texts, 8, 3, progress=False, chat=False, add_special_tokens=add_special_tokens,
                     longest_first=False, strip=False)
    assert other != got


def test_model_judge_decodes_like_the_old_loop(monkeypatch, model, tok):
    monkeypatch.setattr(judges, "load_hf_classifier", lambda model_id, device=None: (model, tok))
    j = judges.get_judge("wildguard:/models/wg", load=False)
    j.model, j.tokenizer, j.batch_size, j.max_new_tokens = model, tok, 2, 6
    texts = [f"U:{p}\nA:{p[::-1]}\n" for p in PROMPTS]
    assert j._decode(texts) == reference_judge_decode(model, tok, texts, 2, 6, True)


@pytest.mark.parametrize("n,batch_size", [(5, 2), (3, 8), (1, 4)])
def test_seeded_sampling_matches_humaneval_loop(model, tok, n, batch_size):
    prompts = PROMPTS[:4]
    want = reference_sample(model, tok, prompts, n, 8, 0.8, 0.95, batch_size, seed=11)
    after_old = torch.get_rng_state()
    got = generate_samples(model, tok, prompts, n, max_new_tokens=8, batch_size=batch_size, sample=True,
                           temperature=0.8, top_p=0.95, seed=11, longest_first=False, progress=False)
    assert got == want and all(len(r) == n for r in got)
    assert torch.equal(torch.get_rng_state(), after_old)  # the same draws, in the same order
    assert len({r for rs in got for r in rs}) > 1  # it did sample


def test_arguments_are_checked(model, tok):
    with pytest.raises(ValueError, match="greedy"):
        generate_samples(model, tok, PROMPTS, 2)
    with pytest.raises(ValueError, match="eos"):
        generate(model, tok, PROMPTS, eos="none")
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, tok, PROMPTS, batch_size=0)


def test_humaneval_run_samples_like_the_old_loop(tmp_path, monkeypatch, model, tok):
    """humaneval.run with n_samples > 1 (programs not executed here) writes the old loop's replies."""
    import json

    from safeanchor.suite import humaneval as he

    problems = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}(x):\n    \"\"\"{p}\"\"\"\n",
                 "entry_point": f"f{i}", "test": ""} for i, p in enumerate(PROMPTS[:3])]
    monkeypatch.setattr(he, "load_problems", lambda: problems)
    monkeypatch.setattr(he, "_execute", lambda samples, probs, opts, path: (samples, {"n": len(probs)}))
    he.run(model, tok, out_dir=tmp_path, seed=5, n_samples=3, max_new_tokens=6, batch_size=2, temperature=0.7)
    rows = [json.loads(line) for line in (tmp_path / "humaneval" / "replies.jsonl").read_text().splitlines()]
    want = reference_sample(model, tok, [he.INSTRUCTION.format(prompt=p["prompt"]) for p in problems], 3, 6, 0.7,
                            0.95, 2, seed=5)
    assert [r["reply"] for r in rows] == [r for rs in want for r in rs]


# ---------------------------------------------------------------- the base's generation cache

def test_generation_cache_reuses_extends_and_keys_by_settings(tmp_path, monkeypatch, generated, model, tok):
    """Cached completions equal fresh ones; a second call generates nothing, a new prompt alone is generated,
    other settings or another dtype miss, a torn file is a miss (regenerated), sampling bypasses the cache."""
    import safeanchor.generation as g

    calls = generated
    fresh = generate(model, tok, PROMPTS, 12, 3)
    cache = g.GenerationCache(tmp_path / "c", model)
    calls.clear()
    assert generate(model, tok, PROMPTS, 12, 3, cache=cache) == fresh
    assert calls == [PROMPTS]
    calls.clear()
    shuffled = PROMPTS[3:] + PROMPTS[:3] + [PROMPTS[0]]
    assert generate(model, tok, shuffled, 12, 3, cache=cache) == [fresh[PROMPTS.index(p)] for p in shuffled]
    assert calls == []
    assert g.GenerationCache(tmp_path / "c", model).lookup({"max_new_tokens": 12, "batch_size": 3}, PROMPTS) == \
        dict(zip(PROMPTS, fresh))  # on disk, for the next process
    more = generate(model, tok, PROMPTS + ["A prompt never seen", "A prompt never seen"], 12, 3, cache=cache)
    assert calls == [["A prompt never seen"]] and more[:len(PROMPTS)] == fresh
    assert more[-2:] == generate(model, tok, ["A prompt never seen"], 12, 3) * 2
    calls.clear()
    generate(model, tok, PROMPTS[:2], 5, 3, cache=cache)  # another length: another file
    assert calls == [PROMPTS[:2]]
    assert len(list((tmp_path / "c").glob("generations-*.json"))) == 2
    calls.clear()
    half = g.GenerationCache(tmp_path / "c", model.to(torch.bfloat16))
    try:
        generate(model, tok, PROMPTS[:2], 12, 3, cache=half)  # another dtype: its own file
    finally:
        model.to(torch.float32)
    assert calls == [PROMPTS[:2]]
    # completions of transformers' decoder and of the library's are kept apart (batch-shape round-off)
    real_decoder = g.decoder_for
    monkeypatch.setattr(g, "decoder_for", lambda m: "transformers")
    other = g.GenerationCache(tmp_path / "c", model)
    assert other.runtime["decoder"] == "transformers" and cache.runtime["decoder"] == "safeanchor"
    calls.clear()
    generate(model, tok, PROMPTS[:2], 12, 3, cache=other)
    assert calls == [PROMPTS[:2]]
    monkeypatch.setattr(g, "decoder_for", real_decoder)
    for f in (tmp_path / "c").glob("generations-*.json"):
        f.write_text('{"completions": ')  # torn
    calls.clear()
    assert generate(model, tok, PROMPTS[:1], 12, 3, cache=cache) == fresh[:1] and calls == [PROMPTS[:1]]
    calls.clear()
    generate(model, tok, PROMPTS[:1], 12, 3, cache=cache, sample=True, seed=0)
    assert calls == [PROMPTS[:1]]  # sampled: never cached
    assert not list((tmp_path / "c").glob("*.tmp"))


# ---------------------------------------------------------------- bf16 generation (eval.mixed_precision)

def test_bf16_generation_runs_under_autocast_and_is_cached_apart(tmp_path, generated, model, tok):
    """mixed_precision="bf16": every forward of generate runs under bf16 autocast with the weights left in
    float32, the completions are those of the reference loop run under the same autocast, and a cache keeps
    them apart from fp32's (they can differ)."""
    import safeanchor.generation as g

    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append((torch.is_autocast_enabled("cpu"),
                                                                            o.dtype)))
    try:
        got = generate(model, tok, PROMPTS, 10, 3, mixed_precision="bf16")
        assert seen and all(on and dtype == torch.bfloat16 for on, dtype in seen)
        seen.clear()
        generate(model, tok, PROMPTS[:2], 4, 3)
        assert seen and not any(on for on, _ in seen) and {d for _, d in seen} == {torch.float32}
    finally:
        hook.remove()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert got == reference_generate(model, tok, PROMPTS, 10, 3)
    cache = g.GenerationCache(tmp_path / "c", model)
    generate(model, tok, PROMPTS, 10, 3, cache=cache)
    generated.clear()
    assert generate(model, tok, PROMPTS, 10, 3, cache=cache, mixed_precision="bf16") == got
    assert generated == [PROMPTS]  # fp32's entries are not bf16's
    with pytest.raises(ValueError, match="mixed_precision"):
        generate(model, tok, PROMPTS, mixed_precision="fp16")


def test_bf16_generation_of_a_lora_model_casts_frozen_weights_once_and_restores_them(model, tok):
    """With LoRA's frozen base weights, bf16 generation gives the per-step-cast reference's completions, casts
    each weight once per call (autocast's cache; without it every decoding step casts them again), and leaves
    every requires_grad flag as it was, also when generation fails."""
    from safeanchor.config import LoRAConfig
    from safeanchor.generation import bf16_autocast
    from safeanchor.models import attach_lora

    lora = attach_lora(tiny_model(seed=3), LoRAConfig(r=2, alpha=4)).eval()
    flags = {n: p.requires_grad for n, p in lora.named_parameters()}
    assert not all(flags.values()) and any(flags.values())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the reference: autocast casting at every call
        want = reference_generate(lora, tok, PROMPTS, 10, 3)
    got = generate(lora, tok, PROMPTS, 10, 3, mixed_precision="bf16")
    assert got == want
    assert {n: p.requires_grad for n, p in lora.named_parameters()} == flags
    weight = lora.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    seen = []
    hook = lora.get_base_model().model.layers[0].self_attn.q_proj.base_layer.register_forward_hook(
        lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    try:
        with torch.no_grad(), bf16_autocast(lora, "cpu"):
            assert weight.requires_grad  # autocast caches the casts of leaves that require grad
            lora(torch.tensor([[1, 2, 3]]))
            lora(torch.tensor([[1, 2, 3]]))
        assert seen == [True, True]

        def casts(block, forwards):  # dtype casts in `forwards` forward passes inside one block
            from torch.profiler import ProfilerActivity, profile

            with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof, block():
                for _ in range(forwards):
                    lora(torch.tensor([[1, 2, 3]]))
            return sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")

        once, twice = casts(lambda: bf16_autocast(lora, "cpu"), 1), casts(lambda: bf16_autocast(lora, "cpu"), 2)
        plain = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
        again = casts(plain, 2) - casts(plain, 1)  # plain autocast: the frozen weights again in every pass
        frozen_linears = sum(1 for m in lora.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)
        assert again - (twice - once) >= frozen_linears, (again, twice - once, frozen_linears)
        with pytest.raises(RuntimeError, match="boom"):
            with bf16_autocast(lora, "cpu"):
                raise RuntimeError("boom")
    finally:
        hook.remove()
    assert {n: p.requires_grad for n, p in lora.named_parameters()} == flags


def test_eval_mixed_precision_reaches_every_generation_of_a_step(monkeypatch, tok):
    """eval.mixed_precision is handed to the evaluation's generations (probe, benign, held-out), to the
    monitor and to the look-alikes' answers; a value other than no / bf16 is a config error."""
    from safeanchor import evaluation, generation, monitor
    from safeanchor.config import config_from_dict
    from safeanchor.errors import SafeAnchorError
    from safeanchor.judges import get_judge

    used = []
    monkeypatch.setattr(generation, "generate_samples",
                        lambda m, t, ps, n=1, **kw: used.append(kw["mixed_precision"]) or [["I cannot help."]
                                                                                           for _ in ps])
    cfg = config_from_dict({"eval": {"mixed_precision": "bf16"}})
    m = tiny_model(seed=1)
    evaluation.evaluate_step(m, tok, get_judge("keyword"), cfg, ["a"], ["b"], {}, heldout={"x": ["c"]})
    assert used == ["bf16"] * 3
    used.clear()
    assert monitor.SafetyMonitor(["a"], mixed_precision="bf16").rate(m, tok) == 100.0 and used == ["bf16"]
    with pytest.raises(SafeAnchorError, match="mixed_precision"):
        monitor.SafetyMonitor(["a"], mixed_precision="fp8")
    with pytest.raises(SafeAnchorError, match="mixed_precision"):
        config_from_dict({"eval": {"mixed_precision": "fp16"}})
