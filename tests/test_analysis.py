"""`safeanchor spectrum`: the Fisher-spectrum comparison (calibration vs random vs domain data)."""
import json

import torch

from safeanchor import subspace as ss
from safeanchor.analysis import _randomised, spectrum_stats
from safeanchor.cli import main
from safeanchor.data.chat import encode
from safeanchor.models import tiny_tokenizer


def test_random_control_keeps_lengths_and_masks():
    tok = tiny_tokenizer()
    enc = [encode(tok, "how do I do a bad thing", "I can't help with that.", 64),
           encode(tok, "another prompt here", "no", 64)]
    rnd = _randomised(tok, enc, seed=3)
    for a, b in zip(enc, rnd):
        assert len(a["input_ids"]) == len(b["input_ids"])
        assert [x == -100 for x in a["labels"]] == [x == -100 for x in b["labels"]]
        assert a["input_ids"] != b["input_ids"]
        assert all(lbl == i for lbl, i in zip(b["labels"], b["input_ids"]) if lbl != -100)


def test_spectrum_stats_match_fisher_basis_and_dense_eigh():
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    # low-rank-ish gradients: 12 examples in a 3-dim subspace plus noise
    grads = {"m": torch.randn(12, 3, generator=g) @ torch.randn(3, 40, generator=g)
             + 0.05 * torch.randn(12, 40, generator=g)}
    s = spectrum_stats(grads, 0.9)
    assert s["per_module"]["m"] == ss.fisher_basis(grads["m"], 0.9).basis.shape[1]
    lam = torch.linalg.eigvalsh(grads["m"].double().T @ grads["m"].double()).flip(0).clamp_min(0)
    dense = (lam.cumsum(0) / lam.sum())[:12]
    assert torch.allclose(torch.tensor(s["mean_cumulative_share"]), dense.float(), atol=1e-5)
    assert s["per_module"]["m"] == int((dense < 0.9).sum()) + 1


def test_spectrum_cli_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "spec"
    assert main(["spectrum", "--preset", "smoke", "--examples", "8", "--out", str(out)]) == 0
    res = json.loads((out / "spectrum.json").read_text())
    assert set(res["sources"]) == {"calibration", "random", "domain"} and res["examples"] == 8
    assert (out / "spectrum.png").stat().st_size > 1000
    assert "random tokens" in capsys.readouterr().out
