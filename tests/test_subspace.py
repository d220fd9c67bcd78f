"""subspace.py against slow dense references: per-sample gradients, Fisher bases, projection, merges, files."""
import math

import numpy as np
import pytest
import torch

from safeanchor import subspace as ss
from safeanchor.errors import SafeAnchorError

VOCAB = 96


def tiny_lora(seed=0, r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj"), random_b=True, dropout=0.1):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=r, lora_alpha=8, target_modules=list(targets),
                                                             lora_dropout=dropout))
    if random_b:
        for _, b_lin in ss.lora_modules(model).values():
            torch.nn.init.normal_(b_lin.weight, std=0.2)
    return model


def random_batch(seed, n=6, max_len=14):
    """Right-padded batch of random lengths; labels -100 on a random prompt prefix and on padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, max_len), generator=g)
    mask = torch.zeros(n, max_len, dtype=torch.long)
    labels = torch.full((n, max_len), -100)
    for i in range(n):
        length = int(torch.randint(5, max_len + 1, (1,), generator=g))
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        mask[i, :length] = 1
        labels[i, prompt:length] = ids[i, prompt:length]
        ids[i, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def summed_nll(model, batch):
    """Independent of the library: sum over examples and response tokens of -log p, from full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def assert_rows_close(got, ref, rtol=1e-4):
    scale = float(ref.abs().max())
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * scale)


@pytest.fixture(scope="module")
def grads_setup():
    model = tiny_lora(seed=1)
    batch = random_batch(seed=2)
    mods = ss.lora_modules(model)
    return model, batch, mods, ss.per_sample_grads(model, batch, mods)


# -- LoRA plumbing -------------------------------------------------------------------------------------

def test_lora_modules_names_shapes_and_flat_grad_roundtrip():
    model = tiny_lora(seed=3, targets=("q_proj", "v_proj"))
    mods = ss.lora_modules(model)
    assert list(mods) == [f"base_model.model.model.layers.{i}.self_attn.{p}"
                          for i in range(2) for p in ("q_proj", "v_proj")]
    named = dict(model.named_modules())
    for name, (a, b) in mods.items():
        assert a is named[name].lora_A["default"] and b is named[name].lora_B["default"]
    assert ss.lora_modules(model, "other") == {}
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    dora = get_peft_model(LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=4,
                                                       num_key_value_heads=2)),
                          LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(SafeAnchorError, match="use_dora=False"):
        ss.lora_modules(dora)
    a, b = mods["base_model.model.model.layers.1.self_attn.v_proj"]
    assert ss.flat_grad(a, b).abs().sum() == 0  # no grads yet -> zeros
    gen = torch.Generator().manual_seed(4)
    vec = torch.randn(b.weight.numel() + a.weight.numel(), generator=gen)
    ss.set_flat_grad(a, b, vec)
    assert torch.equal(b.weight.grad.flatten(), vec[:b.weight.numel()])
    assert torch.equal(a.weight.grad.flatten(), vec[b.weight.numel():])
    assert torch.equal(ss.flat_grad(a, b), vec)


# -- per-sample gradients ------------------------------------------------------------------------------

def test_per_sample_grads_match_loop_and_sum_to_batch_gradient(grads_setup):
    model, batch, mods, got = grads_setup
    ref = ss.per_sample_grads_loop(model, batch, mods)
    assert set(got) == set(mods)
    for name, (a, b) in mods.items():
        assert got[name].shape == (6, a.weight.numel() + b.weight.numel()) and got[name].device.type == "cpu"
        assert_rows_close(got[name], ref[name])
        # Each example's A-block is used (B != 0), so this also tests the A path.
        assert got[name][:, b.weight.numel():].abs().amax(1).min() > 0
    # sum_n g_n = d/d delta sum_n log p(y_n|x_n) = -(gradient of the summed NLL), by one ordinary backward.
    model.eval()
    model.zero_grad()
    summed_nll(model, batch).backward()
    for name, (a, b) in mods.items():
        assert_rows_close(got[name].sum(0), -ss.flat_grad(a, b).detach())
    model.zero_grad(set_to_none=True)


def test_per_sample_grads_do_not_depend_on_the_rest_of_the_batch(grads_setup):
    """An example's row is the same alone as in a batch: a batch-mean loss (1 / response tokens of the
    whole batch) would make it depend on the other examples."""
    model, batch, mods, got = grads_setup
    name = next(iter(mods))
    for i in (0, 3):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        assert_rows_close(got[name][i], ss.per_sample_grads(model, one, {name: mods[name]})[name][0])


def test_per_sample_grads_chunks_dropout_hooks_and_grads_untouched(grads_setup):
    model, batch, mods, got = grads_setup
    model.train()  # lora_dropout = 0.1 is active in train mode: the function must switch it off
    again = ss.per_sample_grads(model, batch, mods, chunk_size=4)
    chunked = ss.per_sample_grads(model, batch, mods, chunk_size=2, store_dtype=torch.float64)
    assert model.training
    for name, (a, b) in mods.items():
        assert_rows_close(again[name], got[name], rtol=1e-5)
        assert chunked[name].dtype == torch.float64
        assert_rows_close(chunked[name].float(), got[name], rtol=1e-5)
        assert not a._forward_hooks and not b._forward_hooks
        assert a.weight.grad is None and b.weight.grad is None
    det = ss.per_sample_grads(model, batch, mods)
    assert all(torch.equal(det[n], ss.per_sample_grads(model, batch, mods)[n]) for n in mods)
    model.eval()


def test_per_sample_grads_cleans_up_on_error(grads_setup):
    model, batch, mods, _ = grads_setup
    model.train()
    bad = dict(batch, input_ids=batch["input_ids"] + 10 * VOCAB)  # out-of-vocabulary ids: embedding fails
    with pytest.raises(IndexError):
        ss.per_sample_grads(model, bad, mods)
    assert model.training
    assert all(not a._forward_hooks and not b._forward_hooks for a, b in mods.values())
    model.eval()


def test_per_sample_grads_edge_cases(grads_setup):
    model, batch, mods, got = grads_setup
    no_response = dict(batch, labels=batch["labels"].clone())
    no_response["labels"][2] = -100  # an example without response tokens has a zero score
    res = ss.per_sample_grads(model, no_response, mods)
    for name in mods:
        assert torch.count_nonzero(res[name][2]) == 0
        assert_rows_close(res[name][[0, 1, 3, 4, 5]], got[name][[0, 1, 3, 4, 5]], rtol=1e-5)
    with model.disable_adapter():
        with pytest.raises(SafeAnchorError, match="did not run"):
            ss.per_sample_grads(model, batch, mods)
        with pytest.raises(SafeAnchorError, match="no gradient reached"):
            ss.per_sample_grads_loop(model, batch, mods)
    assert all(not a._forward_hooks and not b._forward_hooks for a, b in mods.values())


def test_per_sample_grads_zero_b_gives_exactly_zero_a_block():
    model = tiny_lora(seed=5, random_b=False)
    mods = ss.lora_modules(model)
    got = ss.per_sample_grads(model, random_batch(seed=6, n=4), mods)
    for name, (a, b) in mods.items():
        nb = b.weight.numel()
        assert torch.count_nonzero(got[name][:, nb:]) == 0
        assert got[name][:, :nb].abs().amax(1).min() > 0


# -- Fisher bases --------------------------------------------------------------------------------------

def structured_g(seed, n, p, rank=None, decay=0.7):
    """Rows with a geometrically decaying spectrum plus noise (distinct, well-separated eigenvalues)."""
    g = torch.Generator().manual_seed(seed)
    rank = rank or min(n, p)
    left = torch.randn(n, rank, generator=g, dtype=torch.float64)
    right = torch.linalg.qr(torch.randn(p, rank, generator=g, dtype=torch.float64))[0]
    scales = decay ** torch.arange(rank, dtype=torch.float64) * (1 + 0.3 * torch.rand(rank, generator=g))
    return ((left * scales) @ right.T).float()


def dense_eigh(G):
    F = G.double().T @ G.double() / G.shape[0]
    lam, u = torch.linalg.eigh(F)
    return lam.flip(0).clamp_min(0), u.flip(1), F


def hand_k(lam, rho, total=None):
    total = float(lam.sum()) if total is None else total
    cum = 0.0
    for k, x in enumerate(lam.tolist(), 1):
        cum += x
        if cum >= rho * total:
            return k
    return len(lam)


def projector(v):
    v = v.double()
    return v @ v.T


@pytest.mark.parametrize("n,p,rank", [(40, 150, None), (60, 12, None), (30, 80, 5)])
def test_fisher_basis_matches_dense_eigh(n, p, rank):
    G = structured_g(seed=n + p, n=n, p=p, rank=rank)
    lam, u, F = dense_eigh(G)
    for rho in (0.5, 0.9, 0.97):
        fb = ss.fisher_basis(G, rho=rho)
        k = hand_k(lam, rho)
        assert fb.basis.shape == (p, k) and fb.basis.dtype == torch.float32 and fb.n_samples == n
        torch.testing.assert_close(fb.basis.double().T @ fb.basis.double(), torch.eye(k, dtype=torch.float64),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(fb.eigenvalues, lam[:k], rtol=1e-6, atol=1e-9 * float(lam[0]))
        assert fb.trace == pytest.approx(float(torch.trace(F)), rel=1e-9)
        torch.testing.assert_close(projector(fb.basis), projector(u[:, :k]), atol=2e-5, rtol=0)
        # F v = lambda v for every kept column (eigenvectors, not just the right span)
        resid = F @ fb.basis.double() - fb.basis.double() * fb.eigenvalues
        assert float(resid.norm()) < 1e-5 * float(lam[0])
    assert ss.fisher_basis(G, rho=0.999, max_rank=2).basis.shape[1] == 2


def test_fisher_basis_rank_deficient_full_rho_and_determinism():
    G = structured_g(seed=7, n=25, p=90, rank=4)
    fb = ss.fisher_basis(G, rho=1.0)
    assert fb.basis.shape[1] == 4  # the 21 round-off eigenvalues are dropped by rel_eps
    again = ss.fisher_basis(G.clone(), rho=1.0)
    assert torch.equal(fb.basis, again.basis)


def test_fisher_basis_zero_gradients_give_empty_basis():
    fb = ss.fisher_basis(torch.zeros(10, 33))
    assert fb.basis.shape == (33, 0) and fb.eigenvalues.shape == (0,) and fb.trace == 0.0
    g = torch.randn(5, 33)
    assert torch.equal(ss.project_out(g, fb.basis), g)
    assert ss.fraction_in_subspace(g[0], fb.basis) == 0.0


# -- projection ----------------------------------------------------------------------------------------

def test_project_out_and_fraction_in_subspace_against_dense():
    G = structured_g(seed=8, n=20, p=70)
    V = ss.fisher_basis(G, rho=0.8).basis
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(70, generator=gen) + 3 * V[:, 0]
    strict = ss.project_out(g, V)
    assert float((V.T @ strict).abs().max()) < 1e-5 * float(g.norm())
    for s in (1.0, 0.35):
        dense = (torch.eye(70, dtype=torch.float64) - s * projector(V)) @ g.double()
        torch.testing.assert_close(ss.project_out(g, V, s).double(), dense, atol=1e-5, rtol=1e-5)
    batch = torch.randn(3, 4, 70, generator=gen)
    dense = batch.double() @ (torch.eye(70, dtype=torch.float64) - 0.6 * projector(V))
    torch.testing.assert_close(ss.project_out(batch, V, 0.6).double(), dense, atol=1e-5, rtol=1e-5)
    frac = float((projector(V) @ g.double()).norm() / g.double().norm())
    assert ss.fraction_in_subspace(g, V) == pytest.approx(frac, rel=1e-6)
    assert ss.fraction_in_subspace(torch.zeros(70), V) == 0.0
    assert ss.fraction_in_subspace(V[:, 1] * 5, V) == pytest.approx(1.0, rel=1e-6)


# -- merges --------------------------------------------------------------------------------------------

def two_bases(p=60, seed=10):
    shared = structured_g(seed=seed, n=30, p=p)
    other = structured_g(seed=seed + 1, n=30, p=p)
    G_old, G_new = shared, 0.6 * shared[torch.randperm(30, generator=torch.Generator().manual_seed(seed))] + other
    return G_old, G_new


@pytest.mark.parametrize("decay", [1.0, 0.4])
def test_merge_weighted_matches_dense_sum(decay):
    G_old, G_new = two_bases()
    old, new = ss.fisher_basis(G_old, rho=0.9), ss.fisher_basis(G_new, rho=0.85)
    m = ss.merge_weighted(old, new, rho=0.9, decay=decay)
    dense = (decay * old.basis.double() @ torch.diag(old.eigenvalues) @ old.basis.double().T
             + new.basis.double() @ torch.diag(new.eigenvalues) @ new.basis.double().T)
    lam, u = torch.linalg.eigh(dense)
    lam, u = lam.flip(0), u.flip(1)
    lam = lam.clamp_min(0)
    lam = lam[lam >= 1e-10 * lam[0]]  # the round-off floor (at most k_old + k_new directions exist)
    k = hand_k(lam, 0.9, total=decay * old.trace + new.trace)  # rho of the untruncated sum's trace, or all
    assert m.basis.shape == (60, k)
    torch.testing.assert_close(m.eigenvalues, lam[:k], rtol=1e-5, atol=1e-6 * float(lam[0]))
    torch.testing.assert_close(projector(m.basis), projector(u[:, :k]), atol=5e-5, rtol=0)
    assert m.trace == pytest.approx(decay * old.trace + new.trace)
    assert m.n_samples == 60
    # Merging with an empty basis (the A-block at B = 0) returns the other basis' span and spectrum.
    empty = ss.fisher_basis(torch.zeros(5, 60))
    alone = ss.merge_weighted(empty, new, rho=1.0)
    assert alone.basis.shape == new.basis.shape
    torch.testing.assert_close(projector(alone.basis), projector(new.basis), atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.eigenvalues, new.eigenvalues, rtol=1e-6, atol=0)


def test_repeated_weighted_merges_keep_covering_rho_of_the_summed_fisher():
    """T domains (or refresh_every) merge again and again: the basis must still cover rho of the trace of
    the true summed Fisher sum_t F_t, not shrink (cutting at rho of the already-truncated energy went from
    22 to 8 vectors and 0.90 to 0.57 coverage after 30 merges)."""
    seed = int(np.random.default_rng().integers(10**6))
    p, rho = 50, 0.9
    total = torch.zeros(p, p, dtype=torch.float64)
    merged = None
    for t in range(30):
        G = structured_g(seed=seed + t, n=24, p=p, decay=0.85)
        total += G.double().T @ G.double() / G.shape[0]
        fresh = ss.fisher_basis(G, rho)
        merged = fresh if merged is None else ss.merge_weighted(merged, fresh, rho)
        V = merged.basis.double()
        coverage = float(torch.trace(V.T @ total @ V) / torch.trace(total))
        assert coverage >= rho - 1e-6, (seed, t, coverage, V.shape[1])
        assert merged.trace == pytest.approx(float(torch.trace(total)), rel=1e-4)


def test_merge_residual_contains_old_and_reaches_rho():
    G_old, G_new = two_bases(seed=20)
    old = ss.fisher_basis(G_old, rho=0.7)
    rho = 0.95
    m = ss.merge_residual(old, G_new, rho=rho)
    k_old, k = old.basis.shape[1], m.basis.shape[1]
    assert torch.equal(m.basis[:, :k_old], old.basis)
    assert k > k_old
    torch.testing.assert_close(m.basis.double().T @ m.basis.double(), torch.eye(k, dtype=torch.float64),
                               atol=2e-6, rtol=0)
    _, _, F = dense_eigh(G_new)
    V = old.basis.double()
    assert m.trace == pytest.approx(float(torch.trace(F)), rel=1e-9)
    torch.testing.assert_close(m.eigenvalues, torch.diagonal(m.basis.double().T @ F @ m.basis.double()),
                               rtol=1e-4, atol=1e-7 * m.trace)
    # Dense reference: eigenpairs of the residual Fisher (I - VV^T) F (I - VV^T).
    Pc = torch.eye(60, dtype=torch.float64) - V @ V.T
    lam_r, u_r = torch.linalg.eigh(Pc @ F @ Pc)
    lam_r, u_r = lam_r.flip(0), u_r.flip(1)
    covered = float(torch.trace(V.T @ F @ V))
    fractions = [(covered + float(lam_r[:j].sum())) / m.trace for j in range(0, 60 - k_old)]
    k_new = next(j for j, f in enumerate(fractions) if f >= rho)
    assert k - k_old == k_new
    assert float(torch.trace(m.basis.double().T @ F @ m.basis.double())) / m.trace >= rho - 1e-6
    torch.testing.assert_close(projector(m.basis[:, k_old:]), projector(u_r[:, :k_new]), atol=5e-5, rtol=0)
    # Capped growth keeps the old columns; new data inside the old span adds nothing.
    assert ss.merge_residual(old, G_new, rho=rho, max_rank=k_old + 1).basis.shape[1] == k_old + 1
    inside = (G_new.double() @ V @ V.T).float()
    assert ss.merge_residual(old, inside, rho=0.99).basis.shape[1] == k_old
    # From an empty basis, residual growth is a plain fisher_basis.
    fresh = ss.merge_residual(ss.fisher_basis(torch.zeros(3, 60)), G_new, rho=rho)
    direct = ss.fisher_basis(G_new, rho=rho)
    assert fresh.basis.shape == direct.basis.shape and fresh.trace == pytest.approx(direct.trace)
    torch.testing.assert_close(projector(fresh.basis), projector(direct.basis), atol=1e-5, rtol=0)


def test_merge_union_identical_and_disjoint():
    G_old, G_new = two_bases(seed=30)
    old = ss.fisher_basis(G_old, rho=0.9)
    same = ss.merge_union(old, old)
    assert same.basis.shape == old.basis.shape
    torch.testing.assert_close(projector(same.basis), projector(old.basis), atol=1e-5, rtol=0)
    torch.testing.assert_close(same.eigenvalues, torch.full((old.basis.shape[1],), 2.0, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    q = torch.linalg.qr(torch.randn(60, 7, generator=torch.Generator().manual_seed(31)))[0]
    a = ss.FisherBasis(q[:, :3].contiguous(), torch.ones(3, dtype=torch.float64), 3.0, 10)
    b = ss.FisherBasis(q[:, 3:].contiguous(), torch.ones(4, dtype=torch.float64), 4.0, 10)
    both = ss.merge_union(a, b)
    assert both.basis.shape[1] == 7 and both.trace == 4.0
    torch.testing.assert_close(projector(both.basis), projector(q), atol=1e-5, rtol=0)
    # Two generic 8-dim subspaces: sigma in ~[0.6, 1.4], all kept (a 90% cut on sigma^2 would drop some).
    gen = torch.Generator().manual_seed(32)
    ones = torch.ones(8, dtype=torch.float64)
    c = ss.FisherBasis(torch.linalg.qr(torch.randn(60, 8, generator=gen))[0], ones, 1.0, 5)
    d = ss.FisherBasis(torch.linalg.qr(c.basis + 0.8 * torch.randn(60, 8, generator=gen))[0], ones, 1.0, 5)
    assert ss.merge_union(c, d).basis.shape[1] == 16
    # A near-duplicate (perturbed by 1e-5) collapses onto the original span.
    e = ss.FisherBasis(torch.linalg.qr(c.basis + 1e-5 * torch.randn(60, 8, generator=gen))[0], ones, 1.0, 5)
    assert ss.merge_union(c, e).basis.shape[1] == 8


# -- principal angles ----------------------------------------------------------------------------------

def test_a_basis_read_back_from_a_file_projects_bit_for_bit_like_the_one_in_memory(tmp_path):
    """Resume equality rests on this: safetensors returns tensors at any offset of its buffer (56 mod 64 was
    seen), and on an AVX2 CPU a matmul over such a tensor rounds differently from the same values at an
    aligned address, so a resumed SafeAnchor run drifted by an ulp from the uninterrupted one. FisherBasis
    keeps its V at an aligned address; the projection of fresh random gradients must then be identical."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    g = torch.Generator().manual_seed(seed)
    bases = {f"m{i}": ss.FisherBasis(torch.linalg.qr(torch.randn(p, k, generator=g))[0], torch.rand(k).double(),
                                     1.0, 8) for i, (p, k) in enumerate([(384, 8), (512, 9), (512, 5), (96, 3)])}
    path = tmp_path / "b.safetensors"
    ss.save_bases(path, bases)
    loaded = ss.load_bases(path)
    for n, b in bases.items():
        v, w = b.basis, loaded[n].basis
        assert w.data_ptr() % 64 == 0, f"seed {seed}: {n} read back at offset {w.data_ptr() % 64} mod 64"
        grad = torch.randn(v.shape[0], 4, generator=g)
        assert torch.equal(v @ (v.T @ grad), w @ (w.T @ grad)), f"seed {seed}: {n} projects differently from file"
    # any unaligned input is realigned, values unchanged
    flat = torch.randn(385 * 8, generator=g)
    view = flat[8:].view(384, 8)
    assert view.data_ptr() % 64 != 0
    b = ss.FisherBasis(view, torch.ones(8).double(), 1.0, 1)
    assert b.basis.data_ptr() % 64 == 0 and torch.equal(b.basis, view)


def test_principal_angles():
    gen = torch.Generator().manual_seed(40)
    q = torch.linalg.qr(torch.randn(50, 9, generator=gen))[0]
    V1 = q[:, :4]
    torch.testing.assert_close(ss.principal_angles(V1, V1), torch.zeros(4, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(ss.principal_angles(V1, q[:, 4:]), torch.full((4,), math.pi / 2, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    W = torch.linalg.qr(V1 @ torch.randn(4, 3, generator=gen) + 0.5 * torch.randn(50, 3, generator=gen))[0]
    s = np.linalg.svd(V1.double().numpy().T @ W.double().numpy(), compute_uv=False)
    ref = np.sort(np.arccos(np.clip(s, 0, 1)))
    for got in (ss.principal_angles(V1, W), ss.principal_angles(W, V1)):
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)
    assert ss.grassmann_distance(V1, W) == pytest.approx(float(np.linalg.norm(ref)), abs=1e-6)
    # Small angles stay accurate (arccos alone would be off by ~1e-4 here).
    tilt = torch.linalg.qr(V1.double() + 1e-6 * torch.randn(50, 4, generator=gen, dtype=torch.float64))[0]
    assert 1e-8 < float(ss.principal_angles(V1.double(), tilt).max()) < 1e-5


# -- files ---------------------------------------------------------------------------------------------

def test_save_load_roundtrip_and_mismatch_errors(tmp_path, grads_setup):
    model, _, mods, got = grads_setup
    bases = {n: ss.fisher_basis(g) for n, g in got.items()}
    first = next(iter(bases))
    bases[first] = ss.fisher_basis(torch.zeros_like(got[first]))  # an empty basis survives the file too
    path = tmp_path / "bases.safetensors"
    ss.save_bases(path, bases, {"rho": 0.9, "domain": "medical"}, model=model)
    loaded = ss.load_bases(path, model=model)
    assert list(loaded) == list(bases)
    for n, b in bases.items():
        assert torch.equal(loaded[n].basis, b.basis) and torch.equal(loaded[n].eigenvalues, b.eigenvalues)
        assert loaded[n].trace == b.trace and loaded[n].n_samples == b.n_samples
    assert ss.load_meta(path) == {"rho": 0.9, "domain": "medical"}

    with pytest.raises(SafeAnchorError, match=r"layers\.0\.self_attn\.q_proj.*r, d_in, d_out"):
        ss.load_bases(path, model=tiny_lora(seed=0, r=2))
    with pytest.raises(SafeAnchorError, match=r"k_proj has no LoRA layer"):
        ss.load_bases(path, model=tiny_lora(seed=0, targets=("q_proj", "v_proj")))
    with pytest.raises(SafeAnchorError, match="adapter 'other'"):
        ss.load_bases(path, model=model, adapter_name="other")
