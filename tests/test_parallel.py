"""`safeanchor run --jobs N`: (method, seed) runs in separate processes give the same results as one
process running them in turn; a failing run is reported in one line with exit code 2."""
import json

from safeanchor.cli import main


def _numbers(run_dir):
    res = json.loads((run_dir / "results.json").read_text())
    return [(s["refusal_rate"], s["over_refusal_rate"], s["domain_scores"], s.get("train", {}).get("final_loss"))
            for s in res["steps"]]


def test_parallel_runs_match_sequential(tmp_path, capsys):
    args = ["run", "--preset", "smoke", "--method", "standard,interleave", "--seed", "3"]
    assert main([*args, "--out", str(tmp_path / "seq")]) == 0
    assert main([*args, "--jobs", "2", "--out", str(tmp_path / "par")]) == 0
    for name in ("standard-seed3", "interleave-seed3"):
        seq, par = _numbers(tmp_path / "seq" / name), _numbers(tmp_path / "par" / name)
        assert [s[:3] for s in seq] == [p[:3] for p in par], name  # rates and domain scores: identical
        # losses: a run in a --jobs process has fewer intra-op threads, so float sums may differ in the
        # last digits (seen: 5.4951887 vs 5.4951890 after 12 steps); a real difference is far larger
        for s, p in zip(seq, par):
            assert (s[3] is None) == (p[3] is None) and (s[3] is None or abs(s[3] - p[3]) <= 1e-6 * abs(s[3])), name
        assert (tmp_path / "par" / name / "run.log").stat().st_size > 0
    assert "wall s" in (tmp_path / "par" / "comparison.md").read_text()


def test_parallel_failure_is_one_line(tmp_path, capsys):
    code = main(["run", "--preset", "smoke", "--method", "standard,interleave", "--jobs", "2",
                 "--set", "train.lr=1e30", "--set", "train.steps_per_domain=3", "--out", str(tmp_path / "bad")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # tqdm bars aside
    assert code == 2 and len(err) == 1, err
    assert "failed" in err[0] and "run.log" in err[0] and "loss" in err[0], err[0]


def test_compare_reports_mean_and_sample_std_over_seeds(tmp_path):
    """Two seeds of one method: the table shows the mean and the sample (n - 1) standard deviation."""
    import random

    from safeanchor.report import compare

    def result(final):
        steps = [{"after": "base", "refusal_rate": 80.0, "over_refusal_rate": 5.0, "domain_scores": {"d": 50.0},
                  "adapter": None},
                 {"after": "d", "refusal_rate": final, "over_refusal_rate": 5.0, "domain_scores": {"d": 60.0},
                  "adapter": "a", "train": {"seconds": 1.0}}]
        return {"method": "m", "seed": 0, "domains": ["d"], "steps": steps}

    a, b = random.uniform(0, 50), random.uniform(50, 100)
    path = compare(tmp_path, {("m", 0): result(a), ("m", 1): result(b)})
    row = next(line for line in path.read_text().splitlines() if line.startswith("| m |"))
    mean, std = (a + b) / 2, abs(a - b) / 2 ** 0.5
    assert f"{mean:.1f} ± {std:.1f}" in row
