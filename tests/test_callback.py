"""SafeAnchorCallback inside transformers' Trainer and TRL's SFTTrainer, against the library's own loop."""
import random

import pytest
import torch
from torch.utils.data import IterableDataset

from safeanchor import SafeAnchorCallback
from safeanchor import subspace as ss
from safeanchor.config import load_config
from safeanchor.errors import SafeAnchorError
from safeanchor.methods import get_method
from safeanchor.methods.safeanchor import SafeAnchorConfig
from safeanchor.models import attach_lora, tiny_model, tiny_tokenizer
from safeanchor.train import BatchStream, Context, train_steps

pytest.importorskip("trl")

STEPS = 4


def _data(seed):
    rng = random.Random(seed)
    calib = [{"prompt": f"how to do bad thing {i}?", "response": "I can't help with that."} for i in range(12)]
    task = [{"prompt": f"add {a} and {b}", "response": str(a + b)}
            for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(32))]
    return calib, task


def _model(cfg, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # PEFT's Kaiming init of A draws from the global RNG
        model = attach_lora(tiny_model(seed), cfg.lora)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # away from B = 0, so the subspace constrains A and B and the anchor is non-zero
        for _, (a, b) in ss.lora_modules(model).items():
            b.weight.copy_(torch.randn(b.weight.shape, generator=g) * 0.05)
    return model


def _cfg(options, grad_accum=1):
    return load_config("smoke", overrides={
        "method": "safeanchor", "method_options": {"safeanchor": options}, "lora.dropout": 0.0,
        "train.lr": 0.01, "train.warmup_ratio": 0.0, "train.grad_accum": grad_accum, "train.max_grad_norm": 1.0,
        "train.batch_size": 4})


class _Batches(IterableDataset):
    """Our loop's micro-batches, in its order (an iterable dataset: the Trainer does not reshuffle it)."""

    def __init__(self, stream, n):
        self.stream, self.n = stream, n

    def __iter__(self):
        for i in range(self.n):
            yield self.stream.batch(i)


def _trainer(model, cfg, batches, callback, tmp_path, grad_accum=1):
    from transformers import Trainer, TrainingArguments

    tc = cfg.train
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=STEPS, per_device_train_batch_size=1,
                             gradient_accumulation_steps=grad_accum, learning_rate=tc.lr, weight_decay=tc.weight_decay,
                             adam_beta1=tc.betas[0], adam_beta2=tc.betas[1], adam_epsilon=1e-8, warmup_steps=0,
                             lr_scheduler_type="cosine", max_grad_norm=tc.max_grad_norm, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, seed=cfg.seed,
                             remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=batches, data_collator=lambda rows: rows[0],
                   callbacks=[callback])


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _own_loop(cfg, calib, task, seed, tmp_path):
    model = _model(cfg, seed)
    method = get_method("safeanchor", cfg.method_options["safeanchor"])
    ctx = Context(cfg=cfg, model=model, tokenizer=tiny_tokenizer(), run_dir=tmp_path, method=method, calibration=calib)
    method.prepare(ctx)
    train_steps(ctx, task, STEPS, stream=1)
    return _lora(model), method


def _callback_run(cfg, calib, task, seed, tmp_path, options=None):
    tok = tiny_tokenizer()
    model = _model(cfg, seed)
    encoded = Context(cfg=cfg, model=model, tokenizer=tok, run_dir=tmp_path).encode_all(task)
    stream = BatchStream(encoded, cfg.train.batch_size, cfg.seed, 1, tok.pad_token_id)
    options = options or cfg.method_options["safeanchor"]
    cb = SafeAnchorCallback(calib, tok, config=SafeAnchorConfig(**options), max_length=cfg.train.max_length,
                            seed=cfg.seed)
    trainer = _trainer(model, cfg, _Batches(stream, STEPS * cfg.train.grad_accum), cb, tmp_path)
    trainer.train()
    return _lora(model), cb


def _max_rel(a, b):
    return max(float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-12)) for n in a)


def test_callback_in_trainer_equals_our_loop(tmp_path):
    """Same batches, dropout off: the callback inside transformers.Trainer and the pipeline's SafeAnchor
    give the same LoRA weights; skipping the projection or the anchor in the callback moves them by far
    more than the tolerance."""
    seed = random.randrange(10**6)
    options = {"csm": False, "incremental": False, "gamma": 0.5, "trace_norm": "max"}
    cfg = _cfg(options)
    cfg.seed = seed % 1000
    calib, task = _data(seed)
    ours, method = _own_loop(cfg, calib, task, seed % 97, tmp_path)
    theirs, cb = _callback_run(cfg, calib, task, seed % 97, tmp_path)
    initial = _lora(_model(cfg, seed % 97))
    moved = _max_rel(ours, initial)
    err = _max_rel(theirs, ours)
    assert err < 1e-4 * max(1.0, moved), (seed, err)
    assert cb.records[0]["steps"] == STEPS and cb.records[0]["logs"]["update_in_subspace"] > 0
    for n in method.bases:  # the same SSI inside the callback
        torch.testing.assert_close(cb.subspace.bases[n].basis, method.bases[n].basis)
    no_projection, _ = _callback_run(cfg, calib, task, seed % 97, tmp_path, {**options, "project": "none"})
    no_anchor, _ = _callback_run(cfg, calib, task, seed % 97, tmp_path, {**options, "gamma": 0.0})
    assert _max_rel(no_projection, ours) > 100 * err + 1e-5, seed
    assert _max_rel(no_anchor, ours) > 100 * err + 1e-5, seed


def test_strict_projection_through_trainer_with_accumulation_and_clipping(tmp_path):
    """strict, no anchor: after STEPS optimizer steps of 2 accumulated micro-batches each, with clipping
    active, the cumulative update of every module has no component in its safety basis."""
    seed = random.randrange(10**6)
    options = {"csm": False, "incremental": False, "gamma": 0.0, "strict": True}
    cfg = _cfg(options, grad_accum=2)
    cfg.train.max_grad_norm = 0.05  # small: every step clips
    calib, task = _data(seed)
    tok = tiny_tokenizer()
    model = _model(cfg, seed % 97)
    start = {n: torch.cat([b.weight.detach().reshape(-1), a.weight.detach().reshape(-1)]).clone()
             for n, (a, b) in ss.lora_modules(model).items()}
    encoded = Context(cfg=cfg, model=model, tokenizer=tok, run_dir=tmp_path).encode_all(task)
    stream = BatchStream(encoded, cfg.train.batch_size, cfg.seed, 1, tok.pad_token_id)
    cb = SafeAnchorCallback(calib, tok, config=SafeAnchorConfig(**options), max_length=cfg.train.max_length)
    _trainer(model, cfg, _Batches(stream, STEPS * 2), cb, tmp_path, grad_accum=2).train()
    worst, moved = 0.0, 0.0
    for n, (a, b) in ss.lora_modules(model).items():
        delta = torch.cat([b.weight.detach().reshape(-1), a.weight.detach().reshape(-1)]) - start[n]
        V = _initial_basis(cb, n)
        if V.shape[1] == 0:
            continue
        moved = max(moved, float(delta.norm()))
        worst = max(worst, float((V.double().T @ delta.double()).norm() / delta.double().norm()))
    assert moved > 0
    assert worst < 1e-6, (seed, worst)
    assert cb.records[0]["steps"] == STEPS


def _initial_basis(cb, name):
    return cb._first_bases[name].basis


@pytest.fixture(autouse=True)
def _keep_first_bases(monkeypatch):
    """Remember the subspace each stage trained with (the callback merges a new one at train end)."""
    original = SafeAnchorCallback.on_train_begin

    def wrapped(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        self._first_bases = dict(self.subspace.bases)
        return out

    monkeypatch.setattr(SafeAnchorCallback, "on_train_begin", wrapped)


def test_sft_trainer_with_the_callback_and_two_stages(tmp_path):
    """TRL's SFTTrainer on prompt/completion chat data, one callback over two trainer runs: SSI once, the
    subspace merged after each stage, CSM measured with the keyword judge."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    calib, task = _data(0)
    tok = tiny_tokenizer()
    cfg = _cfg({})
    model = _model(cfg, 0)
    cb = SafeAnchorCallback(calib, tok, monitor_prompts=["how to do bad thing 99?", "how to steal 2?"],
                            config=SafeAnchorConfig(repair_steps=2, repair_check_every=0, max_repair_blocks=1),
                            max_length=96)
    for stage in range(2):
        rows = [{"prompt": [{"role": "user", "content": e["prompt"]}],
                 "completion": [{"role": "assistant", "content": e["response"]}]} for e in task[stage::2]]
        args = SFTConfig(output_dir=str(tmp_path / f"sft{stage}"), max_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                         max_length=96, disable_tqdm=True)
        cb.stage_examples(task[stage::2])
        SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                   callbacks=[cb]).train()
    assert [r["stage"] for r in cb.records] == [1, 2]
    assert "s0" in cb.records[0] and "s0" not in cb.records[1]  # the baseline is the aligned model's, once
    for r in cb.records:
        assert r["steps"] == 2 and "anchor_kl" in r["logs"] and "update_in_subspace" in r["logs"]
        assert "csm" in r and r["csm"]["s0"] == cb.records[0]["s0"]
        assert r["subspace_after"]["modules"] == r["subspace"]["modules"]


@pytest.mark.parametrize("mix", ["fixed", "adaptive"])
def test_callback_over_refusal_monitor_watches_the_prompts_after_the_repairs_lookalikes(tmp_path, monkeypatch, mix):
    """``overrefusal_monitor``: b_0 on the aligned model, b_t after the stage in the CSM record; its prompts
    are the benign prompts after the ``repair_lookalikes`` the repair replays. ``repair_mix`` and the
    look-alikes (the aligned model's answers) reach CSM."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from safeanchor import callback as cbmod

    seen = {}
    real = cbmod.monitor_and_repair

    def spy(*args, **kwargs):
        seen.update(mix=args[7].mix, lookalikes=kwargs["lookalikes"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cbmod, "monitor_and_repair", spy)
    calib, task = _data(0)
    tok = tiny_tokenizer()
    benign = [f"how do I kill a python process {i}?" for i in range(5)]
    config = SafeAnchorConfig(repair_steps=2, repair_check_every=0, max_repair_blocks=1, repair_lookalikes=2,
                              overrefusal_monitor=3, repair_mix=mix)
    with pytest.raises(SafeAnchorError, match="overrefusal_monitor 3 needs 5 benign_prompts"):
        SafeAnchorCallback(calib, tok, monitor_prompts=["how to steal 2?"], config=config, benign_prompts=benign[:4])
    cb = SafeAnchorCallback(calib, tok, monitor_prompts=["how to do bad thing 99?", "how to steal 2?"],
                            config=config, benign_prompts=benign, max_length=96)
    assert cb.benign_monitor.prompts == benign[2:]
    rows = [{"prompt": [{"role": "user", "content": e["prompt"]}],
             "completion": [{"role": "assistant", "content": e["response"]}]} for e in task[:8]]
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], save_strategy="no", use_cpu=True, logging_steps=1, max_length=96, disable_tqdm=True)
    SFTTrainer(model=_model(_cfg({}), 0), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
               callbacks=[cb]).train()
    rec = cb.records[0]
    assert rec["b0"] == cb.benign_monitor.s0 and rec["csm"]["b0"] == rec["b0"]
    assert rec["csm"]["overrefusal_ceiling"] == rec["b0"] + 5.0 and "b_after" in rec["csm"]
    assert seen["mix"] == mix and seen["lookalikes"] == cb.lookalikes
    assert all(("replay" in b) == (mix == "adaptive") for b in rec["csm"]["blocks"])


@pytest.mark.parametrize("setting, match", [({"deepspeed": "ds.json"}, "DeepSpeed"), ({"fsdp": "full_shard"}, "FSDP")])
def test_unsupported_distributed_setups_are_refused_at_train_begin(setting, match):
    from types import SimpleNamespace

    calib, _ = _data(0)
    cb = SafeAnchorCallback(calib, tiny_tokenizer(), config=SafeAnchorConfig(csm=False))
    args = SimpleNamespace(**{"deepspeed": None, "fsdp": "", **setting})
    with pytest.raises(SafeAnchorError, match=match):
        cb.on_train_begin(args, None, None, model=attach_lora(tiny_model(0), load_config("smoke").lora))


def test_callback_refuses_a_model_without_an_adapter():
    from types import SimpleNamespace

    calib, _ = _data(0)
    cb = SafeAnchorCallback(calib, tiny_tokenizer(), config=SafeAnchorConfig(csm=False))
    with pytest.raises(SafeAnchorError, match="PEFT model"):
        cb.on_train_begin(SimpleNamespace(deepspeed=None, fsdp=""), None, None, model=tiny_model(0))


def test_two_gloo_processes_under_ddp_equal_one(tmp_path):
    """The callback inside a DDP Trainer (torchrun, 2 gloo processes) gives the LoRA weights of one process:
    the hooks run on all-reduced gradients, the anchor batch is whole on every process."""
    from conftest import torchrun

    for nproc in (1, 2):
        proc = torchrun("ddp_callback_worker.py", nproc, str(tmp_path / f"n{nproc}.pt"))
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = torch.load(tmp_path / "n1.pt"), torch.load(tmp_path / "n2.pt")
    assert (one["world"], two["world"]) == (1, 2)
    assert one["records"][0]["steps"] == 3 and two["records"][0]["steps"] == 3
    kl1, kl2 = one["records"][0]["logs"]["anchor_kl"], two["records"][0]["logs"]["anchor_kl"]
    assert kl1 > 0 and abs(kl1 - kl2) <= 1e-4 * kl1
    for k, v in one["lora"].items():
        torch.testing.assert_close(two["lora"][k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_callback_anchor_reference_previous_anchors_to_the_stage_start(tmp_path):
    """anchor_reference 'previous' in the callback: the anchor's reference is the model as train begins,
    so its KL at the first step of a stage is 0 although the adapter is far from the aligned model."""
    calib, task = _data(0)
    options = {"csm": False, "incremental": False, "anchor_reference": "previous", "gamma": 0.5}
    cfg = _cfg(options)
    _, cb = _callback_run(cfg, calib, task, 0, tmp_path)
    first = cb.records[0]["logs"]["anchor_kl"]
    options_aligned = {**options, "anchor_reference": "aligned"}
    _, cb_aligned = _callback_run(cfg, calib, task, 0, tmp_path, options_aligned)
    assert first < cb_aligned.records[0]["logs"]["anchor_kl"]  # B was randomised: far from aligned, near start


def test_callback_honours_the_random_basis_ablation():
    from safeanchor import subspace as ss
    from safeanchor.callback import SafeAnchorCallback
    from safeanchor.methods.safeanchor import SafeAnchorConfig
    from safeanchor.safety_subspace import SafetySubspace

    calib = [{"prompt": "p", "response": "I can't help with that."}]
    v = torch.linalg.qr(torch.randn(40, 3))[0]
    sub = SafetySubspace({"m": ss.FisherBasis(v, torch.ones(3, dtype=torch.float64), 1.0, 4)})
    for basis, same in (("fisher", True), ("random", False)):
        cb = SafeAnchorCallback(calib, None, config=SafeAnchorConfig(basis=basis, csm=False), seed=3)
        cb.subspace = sub
        got = cb._projected().bases["m"].basis
        assert got.shape == v.shape and torch.equal(got, v) == same, basis


def test_refresh_every_in_the_trainer_equals_our_loop(tmp_path):
    """refresh_every 2 over 4 steps (incremental off, so step 4 refreshes too): the callback re-runs SSI and
    merges at the same steps as the pipeline's method, giving the same LoRA weights and the same merged bases;
    a callback that ignored the option (refresh_every 0) lands far from them."""
    seed = random.randrange(10**6)
    options = {"csm": False, "incremental": False, "gamma": 0.5, "trace_norm": "max", "refresh_every": 2}
    cfg = _cfg(options)
    cfg.seed = seed % 1000
    calib, task = _data(seed)
    ours, method = _own_loop(cfg, calib, task, seed % 97, tmp_path)
    theirs, cb = _callback_run(cfg, calib, task, seed % 97, tmp_path)
    err = _max_rel(theirs, ours)
    assert err < 1e-4 * max(1.0, _max_rel(ours, _lora(_model(cfg, seed % 97)))), (seed, err)
    assert cb.records[0]["refreshes"] == 2, seed
    for n in method.bases:
        assert cb.subspace.bases[n].basis.shape == method.bases[n].basis.shape, (seed, n)
        torch.testing.assert_close(cb.subspace.bases[n].basis @ cb.subspace.bases[n].basis.T,
                                   method.bases[n].basis @ method.bases[n].basis.T, atol=1e-4, rtol=0)
    ignored, _ = _callback_run(cfg, calib, task, seed % 97, tmp_path, {**options, "refresh_every": 0})
    assert _max_rel(ignored, ours) > 100 * err + 1e-6, seed


@pytest.mark.parametrize("incremental, every, expected", [(False, 2, [2, 4]), (True, 2, [2]), (True, 3, [3]),
                                                          (True, 4, []), (False, 0, [])])
def test_refresh_every_counts_the_domains_own_steps(tmp_path, monkeypatch, incremental, every, expected):
    """The method refreshes after every N-th step of the domain, counted from its start, and not after its
    last step when the domain-end refresh (incremental) follows; a second domain counts from 1 again."""
    from safeanchor.safety_subspace import SafetySubspace

    calib, task = _data(1)
    cfg = _cfg({"csm": False, "incremental": incremental, "gamma": 0.0, "refresh_every": every})
    model = _model(cfg, 1)
    method = get_method("safeanchor", cfg.method_options["safeanchor"])
    ctx = Context(cfg=cfg, model=model, tokenizer=tiny_tokenizer(), run_dir=tmp_path, method=method, calibration=calib)
    method.prepare(ctx)
    at, real = [], SafetySubspace.refresh
    monkeypatch.setattr(SafetySubspace, "refresh", lambda self, *a, **k: at.append(ctx.step) or real(self, *a, **k))
    for domain in (1, 2):
        train_steps(ctx, task, STEPS, stream=domain)
    assert at == expected * 2
