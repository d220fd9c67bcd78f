"""Data-parallel training (distributed.py): the shard weights against the whole-batch loss and
gradient, and two real gloo processes under torchrun against one process on the smoke preset."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_batch, torchrun
from safeanchor.data.chat import mean_token_nll
from safeanchor.distributed import Dist, shard_batch
from safeanchor.errors import SafeAnchorError
from safeanchor.models import attach_lora
from safeanchor.config import LoRAConfig


def _random_pairs(rng: random.Random, n: int) -> list[tuple[str, str]]:
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"]
    return [(" ".join(rng.choices(words, k=rng.randint(1, 8))), " ".join(rng.choices(words, k=rng.randint(1, 12))))
            for _ in range(n)]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shard_weights_recover_the_whole_batch_loss_and_gradient(tiny, world):
    """mean_r(w_r * L_r) and mean_r grad(w_r * L_r) over the shards = the whole batch's mean loss and gradient
    (the reference: one backward of the unsharded batch), on random batches of uneven lengths."""
    model, tok = tiny
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    model = attach_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # non-zero B so that A gets gradients too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    batch = make_batch(tok, _random_pairs(rng, rng.randint(world, 3 * world)))
    params = [p for p in model.parameters() if p.requires_grad]

    full = mean_token_nll(model, batch)
    ref = torch.autograd.grad(full, params)
    losses, grads = [], [torch.zeros_like(p) for p in params]
    for r in range(world):
        part, w = shard_batch(batch, r, world)
        loss = w * mean_token_nll(model, part)
        losses.append(loss.item())
        for acc, g in zip(grads, torch.autograd.grad(loss, params)):
            acc += g / world
    assert abs(sum(losses) / world - full.item()) < 1e-5, seed
    for g, gr in zip(grads, ref):
        torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-6, msg=f"seed {seed}")


def test_shard_drops_only_all_pad_columns_and_keeps_every_row_once(tiny):
    _, tok = tiny
    batch = make_batch(tok, _random_pairs(random.Random(), 7))
    parts = [shard_batch(batch, r, 3)[0] for r in range(3)]
    assert sum(p["input_ids"].shape[0] for p in parts) == 7
    for r, p in enumerate(parts):
        width = p["input_ids"].shape[1]
        assert torch.equal(p["input_ids"], batch["input_ids"][r::3, :width])
        assert batch["attention_mask"][r::3, width:].sum() == 0 and p["attention_mask"][:, -1].any()


def test_split_and_merge_restore_the_order():
    items = list(range(random.randint(0, 23)))
    for world in (1, 2, 3, 5):
        d = Dist(0, world)
        parts = [items[r::world] for r in range(world)]
        assert d.merge(parts) == items


def test_batch_smaller_than_the_group_is_a_clear_error(tiny):
    _, tok = tiny
    batch = make_batch(tok, _random_pairs(random.Random(0), 1))
    with pytest.raises(SafeAnchorError, match="train.batch_size >= 2"):
        shard_batch(batch, 0, 2)


def test_jobs_under_a_launcher_is_a_clear_error(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2")
    proc = subprocess.run([sys.executable, "-m", "safeanchor", "run", "--preset", "smoke", "--method",
                           "standard,safeanchor", "--jobs", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "drop --jobs" in proc.stderr and "Traceback" not in proc.stderr


def _launch(out, methods: str, extra: list[str], nproc: int, env_extra: dict | None = None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    args = ["run", "--preset", "smoke", "--method", methods, "--out", str(out), *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "safeanchor", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "safeanchor", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _adapters(run_dir):
    res = json.loads((run_dir / "results.json").read_text())
    return res, [load_file(str(run_dir / s["adapter"] / "adapter_model.safetensors")) for s in res["steps"][1:]]


DP_METHODS = ["standard", "safeanchor", "safegrad", "vaccine"]


def test_two_gloo_processes_train_like_one(tmp_path):
    """Dropout off: two data-parallel processes and one process give the same losses and adapters after
    every domain (SafeAnchor's anchor and update projection, SafeGrad's surgery, Vaccine's unsharded step)."""
    extra = ["--set", "lora.dropout=0"]
    one = _launch(tmp_path / "one", ",".join(DP_METHODS), extra, 1)
    two = _launch(tmp_path / "two", ",".join(DP_METHODS), extra, 2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    for m in DP_METHODS:
        r1, a1 = _adapters(tmp_path / "one" / f"{m}-seed0")
        r2, a2 = _adapters(tmp_path / "two" / f"{m}-seed0")
        for s1, s2 in zip(r1["steps"][1:], r2["steps"][1:]):
            assert abs(s1["train"]["first_loss"] - s2["train"]["first_loss"]) < 1e-5, m
            assert abs(s1["train"]["final_loss"] - s2["train"]["final_loss"]) < 1e-5, m
            assert s1["domain_scores"].keys() == s2["domain_scores"].keys()
            if m == "safeanchor":  # the anchor KL, computed on each process's half of the anchor batch
                kl1, kl2 = s1["train"]["logs"]["anchor_kl"], s2["train"]["logs"]["anchor_kl"]
                assert kl1 > 0 and abs(kl1 - kl2) <= 1e-4 * kl1 + 2e-6, (kl1, kl2)  # logs keep 6 decimals
        for t1, t2 in zip(a1, a2):
            assert t1.keys() == t2.keys()
            for k in t1:
                torch.testing.assert_close(t2[k], t1[k], rtol=1e-3, atol=1e-4, msg=f"{m} {k}")
    # rank 0 alone wrote: one results.json per run, the comparison, and no leftover checkpoints
    assert (tmp_path / "two" / "comparison.md").exists()
    assert not any((tmp_path / "two").rglob("*.tmp")) and not any((tmp_path / "two").rglob("domain*.pt"))


def test_two_processes_killed_mid_domain_resume_exactly(tmp_path):
    """With dropout on (each process its own RNG stream, saved per rank), a data-parallel run killed in
    domain 2 and started again ends with exactly the adapters of an uninterrupted one."""
    ref = _launch(tmp_path / "ref", "standard", [], 2)
    assert ref.returncode == 0, ref.stderr[-2000:]
    crashed = _launch(tmp_path / "resumed", "standard", [], 2, {"SAFEANCHOR_TEST_CRASH_AT": "2:3"})
    assert crashed.returncode != 0
    assert (tmp_path / "resumed" / "checkpoints" / "domain2.pt").exists()
    again = _launch(tmp_path / "resumed", "standard", [], 2)
    assert again.returncode == 0, again.stderr[-2000:]
    (_, a_ref), (_, a_res) = _adapters(tmp_path / "ref"), _adapters(tmp_path / "resumed")
    for t1, t2 in zip(a_ref, a_res):
        for k in t1:
            assert torch.equal(t1[k], t2[k]), k
    # and a different number of processes cannot pick up that checkpoint
    crashed = _launch(tmp_path / "mixed", "standard", [], 2, {"SAFEANCHOR_TEST_CRASH_AT": "2:3"})
    single = _launch(tmp_path / "mixed", "standard", [], 1)
    assert single.returncode == 2 and "same number of processes" in single.stderr


def test_csm_repair_replay_sharded_like_one_process(tmp_path):
    """CSM's repair block (task rows sharded by the trainer, the replay's safety batch sharded by the
    method, one more all-reduce) gives two gloo processes the adapter and safety losses of one process."""
    for nproc in (1, 2):
        proc = torchrun("dp_repair_worker.py", nproc, str(tmp_path / f"n{nproc}.pt"))
        assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = torch.load(tmp_path / "n1.pt"), torch.load(tmp_path / "n2.pt")
    assert (one["world"], two["world"]) == (1, 2) and len(one["safe_loss"]) == 3
    for a, b in zip(one["safe_loss"], two["safe_loss"]):
        assert abs(a - b) <= 1e-5 * abs(a) + 1e-6, (one["safe_loss"], two["safe_loss"])
    moved = max(float((v - one["start"][k]).abs().max()) for k, v in one["lora"].items())
    assert moved > 1e-3  # the block did move the adapter, A and B (else equality would prove nothing)
    assert all(float((v - one["start"][k]).abs().max()) > 0 for k, v in one["lora"].items())
    for k, v in one["lora"].items():
        torch.testing.assert_close(two["lora"][k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_shard_extra_shards_only_a_batch_with_a_row_per_process(tiny):
    _, tok = tiny
    rng = random.Random(random.randrange(2**31))
    batch = make_batch(tok, _random_pairs(rng, 3))
    part, weight, sharded = Dist(1, 2).shard_extra(batch)
    ref, ref_w = shard_batch(batch, 1, 2)
    assert sharded and weight == ref_w and all(torch.equal(part[k], ref[k]) for k in ref)
    one = {k: v[:1] for k, v in batch.items()}  # fewer rows than processes: whole, weight 1
    whole, w, sharded = Dist(0, 2).shard_extra(one)
    assert not sharded and w == 1.0 and whole is one
    assert Dist().shard_extra(batch) == (batch, 1.0, False)  # a single process never shards
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    assert Dist(0, 2).reduce_extra([p], 0.25, False) == 0.25 and torch.equal(p.grad, torch.full((3,), 2.0))


def test_ssi_examples_sharded_over_two_processes_give_the_same_bases(tmp_path):
    """SSI with each of 2 gloo processes computing its share of an odd number (11) of calibration examples,
    in several module groups: the all-gathered per-example gradients give one process's bases."""
    for nproc in (1, 2):
        proc = torchrun("dp_ssi_worker.py", nproc, str(tmp_path / f"n{nproc}.pt"))
        assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = torch.load(tmp_path / "n1.pt"), torch.load(tmp_path / "n2.pt")
    assert (one["world"], two["world"]) == (1, 2) and one["bases"].keys() == two["bases"].keys()
    for n, (v1, lam1, tr1) in one["bases"].items():
        v2, lam2, tr2 = two["bases"][n]
        assert v1.shape == v2.shape, n
        torch.testing.assert_close(v2 @ v2.T, v1 @ v1.T, atol=1e-5, rtol=0, msg=n)
        torch.testing.assert_close(lam2, lam1, rtol=1e-5, atol=1e-9)
        assert abs(tr1 - tr2) <= 1e-5 * abs(tr1)
