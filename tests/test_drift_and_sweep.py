"""`safeanchor analyze subspace-drift` (principal angles / Grassmann distance between SafeAnchor's safety
bases after successive domains) and `safeanchor spectrum --sweep-ns` (the Fisher spectrum at several N_s)."""
import json
import math

import pytest
import torch

from safeanchor import SafetySubspace
from safeanchor.analysis import subspace_drift
from safeanchor.cli import main
from safeanchor.subspace import FisherBasis


def _save(path, columns: dict[str, list[int]], dim: int = 6):
    eye = torch.eye(dim)
    bases = {name: FisherBasis(eye[:, cols], torch.ones(len(cols)), float(len(cols)), 4)
             for name, cols in columns.items()}
    SafetySubspace(bases).save(path)


def test_drift_has_the_known_angles(tmp_path):
    """Module a: e0,e1 -> e0,e1 (the same plane, distance 0, cos 1) -> e2,e3 (orthogonal: two angles of pi/2,
    distance pi/sqrt(2), cos 0). Module b: e0 -> e1 (one angle of pi/2) -> e1."""
    state = tmp_path / "run" / "state"
    state.mkdir(parents=True)
    _save(state / "safety_basis_v1.safetensors", {"a": [0, 1], "b": [0]})
    _save(state / "safety_basis_v2.safetensors", {"a": [0, 1], "b": [1]})
    _save(state / "safety_basis_v3.safetensors", {"a": [2, 3], "b": [1]})
    (tmp_path / "run" / "results.json").write_text(json.dumps({"domains": ["x", "y"]}))
    res = subspace_drift(tmp_path / "run", tmp_path / "out", progress=lambda *_: None)
    first, second = res["successive"]
    assert (first["from_label"], first["to_label"], second["to_label"]) == ("SSI (base)", "after x", "after y")
    assert first["grassmann_max"] == pytest.approx(math.pi / 2, abs=1e-4)  # b turned by 90 degrees
    assert first["grassmann_mean"] == pytest.approx(math.pi / 4, abs=1e-4)  # a did not move
    assert second["grassmann_mean"] == pytest.approx(math.pi / math.sqrt(2) / 2, abs=1e-4)
    assert res["per_module"]["a"]["grassmann_max"] == pytest.approx(math.pi / math.sqrt(2), abs=1e-4)
    assert res["per_module"]["a"]["mean_cos"] == pytest.approx(0.5, abs=1e-6)  # cos 1 then cos 0
    assert res["from_first"][-1]["grassmann_mean"] == pytest.approx((math.pi / math.sqrt(2) + math.pi / 2) / 2,
                                                                     abs=1e-4)
    md = (tmp_path / "out" / "subspace_drift.md").read_text()
    assert "SSI (base) -> after x (successive)" in md and "mean over modules" in md
    assert (tmp_path / "out" / "subspace_drift.png").stat().st_size > 1000


def test_drift_needs_two_versions(tmp_path, capsys):
    (tmp_path / "state").mkdir()
    assert main(["analyze", "subspace-drift", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "needs two or more" in capsys.readouterr().err


def test_drift_of_a_smoke_safeanchor_run(tmp_path, capsys):
    run = tmp_path / "sa"
    assert main(["run", "--preset", "smoke", "--method", "safeanchor", "--set", "train.steps_per_domain=2",
                 "--out", str(run)]) == 0
    assert main(["analyze", "subspace-drift", str(run)]) == 0  # default --out: <run>/analysis
    res = json.loads((run / "analysis" / "subspace_drift.json").read_text())
    assert [v["label"] for v in res["versions"]] == ["SSI (base)", "after tiny-arith", "after tiny-reverse",
                                                     "after tiny-upper"]
    assert len(res["successive"]) == 3 and all(t["modules"] == 8 for t in res["successive"])
    assert all(0 <= t["grassmann_mean"] <= t["grassmann_max"] and 0 < t["mean_cos"] <= 1 for t in res["successive"])
    assert "Grassmann distance mean" in capsys.readouterr().out


def test_ns_sweep_matches_the_spectrum_at_each_size(tmp_path, capsys):
    assert main(["spectrum", "--preset", "smoke", "--sweep-ns", "8,4", "--out", str(tmp_path / "sweep")]) == 0
    sweep = json.loads((tmp_path / "sweep" / "ns_sweep.json").read_text())
    assert sweep["ns"] == [4, 8] and (tmp_path / "sweep" / "ns_sweep.png").stat().st_size > 1000
    assert "| 4 |" in (tmp_path / "sweep" / "ns_sweep.md").read_text()
    assert main(["spectrum", "--preset", "smoke", "--set", "data.calibration_size=8", "--out",
                 str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "spectrum.json").read_text())
    row = sweep["rows"][1]
    for src, stats in one["sources"].items():
        assert row["sources"][src]["k_mean"] == stats["k_mean"] and row["sources"][src]["k_max"] == stats["k_max"]
        assert row["sources"][src]["k_mean"] <= 8 and sweep["rows"][0]["sources"][src]["k_max"] <= 4
    capsys.readouterr()
    assert main(["spectrum", "--preset", "smoke", "--sweep-ns", "4,x", "--out", str(tmp_path / "bad")]) == 2
    assert main(["spectrum", "--preset", "smoke", "--sweep-ns", "1", "--out", str(tmp_path / "bad")]) == 2
    assert main(["spectrum", "--preset", "smoke", "--sweep-ns", "4", "--examples", "4", "--out",
                 str(tmp_path / "bad")]) == 2
    assert main(["spectrum", "--preset", "smoke", "--sweep-ns", "4,100000", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and "sweep sizes up to" in err[-1] and not (tmp_path / "bad").exists()


# -- capacity of the orthogonal complement -----------------------------------------------------------------

def _capacity_run(tmp_path, name, method, order, ks, removed, scores, refusal, seed=0):
    """A finished run's results.json with the fields capacity reads: SSI's basis in prepare, per step the basis
    after the merge, the mean update share in the logs, domain scores and refusal."""
    import json

    steps = [{"after": "base", "refusal_rate": refusal[0], "heldout_refusal_rate": 40.0,
              "domain_scores": {d: 50.0 for d in order}}]
    for t, d in enumerate(order, 1):
        step = {"after": d, "refusal_rate": refusal[t], "heldout_refusal_rate": 40.0 - 10 * t,
                "domain_scores": {x: (scores[t - 1] if x == d else steps[-1]["domain_scores"][x]) for x in order},
                "train": {"logs": {"update_in_subspace": removed[t - 1]} if removed else {"loss": 1.0}}}
        if ks:
            step["method"] = {"subspace": {"k_mean": ks[t]}, "csm": {"triggered": t % 2 == 1}}
        steps.append(step)
    res = {"method": method, "seed": seed, "domains": list(order), "steps": steps,
           "prepare": {"subspace": {"k_mean": ks[0]}} if ks else {}}
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(json.dumps(res))
    return d


def test_capacity_per_position_against_hand_computed_numbers(tmp_path):
    import json

    from safeanchor.analysis import capacity
    from safeanchor.errors import SafeAnchorError

    a = _capacity_run(tmp_path, "sa0", "safeanchor", ("m", "l"), (10.0, 20.0, 30.0), (0.1, 0.2), (70.0, 60.0),
                      (100.0, 98.0, 96.0))
    b = _capacity_run(tmp_path, "sa1", "safeanchor", ("l", "m"), (12.0, 22.0, 34.0), (0.3, 0.4), (80.0, 56.0),
                      (100.0, 100.0, 90.0), seed=1)
    s = _capacity_run(tmp_path, "std", "standard", ("m", "l"), None, None, (75.0, 62.0), (100.0, 50.0, 20.0))
    result = capacity([a, b, s], tmp_path / "out")
    sa = result["methods"]["safeanchor"]["per_t"]
    assert sa[0]["k_before"] == 11.0 and sa[0]["k_after"]["mean"] == 21.0 and sa[1]["k_after"]["mean"] == 32.0
    assert sa[0]["update_removed"]["mean"] == pytest.approx(0.2) and sa[1]["update_removed"]["mean"] == pytest.approx(0.3)
    assert sa[0]["gain"]["mean"] == 25.0 and sa[1]["gain"]["mean"] == 8.0  # (20 + 30) / 2, (10 + 6) / 2
    assert sa[0]["gain"]["sd"] == pytest.approx(7.0711, abs=1e-3)
    assert sa[1]["refusal_retained"]["mean"] == 93.0 and sa[1]["heldout_retained"]["mean"] == 50.0
    assert sa[0]["domains"] == ["l", "m"] and sa[0]["csm_triggered"] == 2 and sa[1]["csm_triggered"] == 0
    std = result["methods"]["standard"]["per_t"]
    assert std[0]["k_after"] is None and std[0]["gain"]["mean"] == 25.0 and std[1]["gain"]["mean"] == 12.0
    assert sa[0]["gain_vs_standard"] == 100.0 and sa[1]["gain_vs_standard"] == pytest.approx(66.7)
    # the score right after the domain: (70 + 80) / 2 and (60 + 56) / 2, against Standard's 75 and 62
    assert sa[0]["score"]["mean"] == 75.0 and sa[1]["score"]["mean"] == 58.0
    assert sa[0]["score"]["sd"] == pytest.approx(7.0711, abs=1e-3)
    assert sa[0]["score_vs_standard"] == 0.0 and sa[1]["score_vs_standard"] == -4.0
    assert std[1]["score_vs_standard"] == 0.0
    md = (tmp_path / "out" / "capacity.md").read_text()
    assert "## safeanchor (2 run(s); basis at the base: 11.0 per module)" in md
    assert ("| 2 | l, m | 2 | 32.0 ± 2.8 | 30.0 ± 14.1 | 58.0 ± 2.8 | -4.0 | 8.0 ± 2.8 | 67 | 93.0 ± 4.2 | 50.0 ± 0.0 "
            "| 0/2 |") in md
    assert json.loads((tmp_path / "out" / "capacity.json").read_text())["methods"].keys() == {"safeanchor", "standard"}
    assert (tmp_path / "out" / "capacity.png").stat().st_size > 1000
    with pytest.raises(SafeAnchorError, match="does not exist"):
        capacity([tmp_path / "nope"], tmp_path / "out")
