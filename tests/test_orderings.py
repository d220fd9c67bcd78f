"""`safeanchor run --orderings`: every / K random / explicit orderings of the domains x seeds x methods, each
run in its own directory, finished runs skipped (sequential and --jobs), one comparison with the
cross-ordering and within-ordering seed sd; `compare --by-dir` with ordering directories."""
import json

import pytest

from safeanchor.cli import _run_dir, finished_results, main, ordering_slug, parse_orderings
from safeanchor.config import load_config, to_dict
from safeanchor.errors import SafeAnchorError

D3 = ["tiny-arith", "tiny-reverse", "tiny-upper"]


def test_parse_orderings():
    assert parse_orderings(None, D3) is None and parse_orderings("", D3) is None
    every = parse_orderings("all", D3)
    assert len(every) == 6 and every[0] == D3 and len({tuple(o) for o in every}) == 6
    four = parse_orderings("4", D3)
    assert len({tuple(o) for o in four}) == 4 and all(sorted(o) == sorted(D3) for o in four)
    assert parse_orderings("4", D3) == four  # seeded (--ordering-seed, default 0)
    assert parse_orderings("6", D3, seed=3) != parse_orderings("6", D3, seed=4)  # same set, another order
    assert parse_orderings("tiny-upper,tiny-arith; tiny-arith,tiny-upper", D3) == [
        ["tiny-upper", "tiny-arith"], ["tiny-arith", "tiny-upper"]]


@pytest.mark.parametrize("spec, needle", [
    ("7", "have 6 orderings"), ("0", "have 6 orderings"),
    ("tiny-arith,tiny-upper;tiny-arith,tiny-reverse", "not orderings of the same domains"),
    ("tiny-arith,tiny-arith", "repeats a domain"), ("tiny-arith,nope;nope,tiny-arith", "unknown domain"),
    ("tiny-arith,tiny-upper;tiny-arith,tiny-upper", "lists an ordering twice"), (";", "names no domains")])
def test_bad_orderings_are_one_line_errors(spec, needle):
    with pytest.raises(SafeAnchorError, match=needle):
        parse_orderings(spec, D3)


def test_too_many_orderings_for_all():
    with pytest.raises(SafeAnchorError, match="--orderings K"):
        parse_orderings("all", [f"d{i}" for i in range(8)])


def test_run_directory_names(tmp_path):
    cfg = load_config("smoke", overrides={"method": "standard", "seed": 3})
    assert ordering_slug(["tiny-arith", "local:/a b/c.jsonl", "hub:legalbench/x_y"]) == \
        "tiny-arith_local-a-b-c-jsonl_hub-legalbench-x-y"
    assert len(ordering_slug([f"domain-{i:03d}" for i in range(40)])) <= 80
    assert _run_dir(tmp_path, cfg, True, True) == tmp_path
    assert _run_dir(tmp_path, cfg, False, False) == tmp_path / "standard-seed3"
    assert _run_dir(tmp_path, cfg, False, True) == tmp_path / "standard-tiny-arith_tiny-reverse_tiny-upper-seed3"
    legacy = tmp_path / "standard-seed3"  # a run of this ordering made before --orderings is resumed in place
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"config": to_dict(cfg)}))
    assert _run_dir(tmp_path, cfg, False, True) == legacy
    assert finished_results(cfg, legacy) is None  # started, not finished


def test_dry_run_lists_every_ordering(tmp_path, capsys):
    assert main(["run", "--preset", "smoke", "--method", "standard,safeanchor", "--orderings", "3", "--seed", "0,1",
                 "--dry-run", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "runs: 2 method(s) x 3 ordering(s) x 2 seed(s) = 12" in out
    assert out.count(" order tiny-") == 12 and "comparison -> " in out
    assert not (tmp_path / "p").exists()


def test_bad_orderings_flag_exits_2_before_work(tmp_path, capsys):
    assert main(["run", "--preset", "smoke", "--orderings", "tiny-arith,bogus", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown domain" in err[0] and not (tmp_path / "x").exists()


def test_orderings_run_resume_with_jobs_and_compare(tmp_path, capsys):
    out = tmp_path / "grid"
    base = ["run", "--preset", "smoke", "--set", "data.domains=[tiny-arith,tiny-upper]", "--set",
            "train.steps_per_domain=2", "--method", "standard", "--orderings", "all", "--out", str(out)]
    assert main([*base, "--seed", "0"]) == 0
    names = ["standard-tiny-arith_tiny-upper-seed0", "standard-tiny-upper_tiny-arith-seed0"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == names
    stamp = {n: (out / n / "results.json").stat().st_mtime_ns for n in names}
    # the second ordering started from the first's base evaluation and prepare (they share no domain)
    second = json.loads((out / names[1] / "results.json").read_text())
    assert second["reused_prefix"] == {"from": str((out / names[0]).resolve()), "domains": 0}
    capsys.readouterr()
    # the same grid with a second seed, two at a time: the two finished runs are skipped, two new ones run
    assert main([*base, "--seed", "0,1", "--jobs", "2"]) == 0
    printed = capsys.readouterr()
    assert (printed.out + printed.err).count("finished, skipped") == 2
    assert all((out / n / "results.json").stat().st_mtime_ns == stamp[n] for n in names)
    for order in ("tiny-arith_tiny-upper", "tiny-upper_tiny-arith"):
        res = json.loads((out / f"standard-{order}-seed1" / "results.json").read_text())
        assert "_".join(res["domains"]) == order and len(res["steps"]) == 3
    data = json.loads((out / "comparison.json").read_text())
    s = data["methods"]["standard"]
    assert s["runs"] == 4 and len(s["orderings"]) == 2 and s["steps"] == ["base", "1", "2"]
    assert s["refusal_rate"]["cross_ordering_sd"] is not None
    assert s["refusal_rate"]["within_ordering_seed_sd"] is not None
    assert "### Ordering invariance" in (out / "comparison.md").read_text()
    # compare --by-dir strips the ordering and the seed from the labels: one row
    code = main(["compare", *[str(p) for p in sorted(out.glob("standard-*"))], "--by-dir", "--bootstrap", "200",
                 "--out", str(tmp_path / "cmp")])
    assert code == 0
    cmp = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert list(cmp["methods"]) == ["standard"] and cmp["interval"]["replicates"] == 200
    # a symlink is labelled by its own name (runs of one method told apart by directory)
    links = tmp_path / "links"
    links.mkdir()
    for i, n in enumerate(names):
        (links / f"variant{i}-seed0").symlink_to(out / n, target_is_directory=True)
    assert main(["compare", *map(str, sorted(links.iterdir())), "--by-dir", "--bootstrap", "50",
                 "--out", str(tmp_path / "cmp-links")]) == 0
    cmp = json.loads((tmp_path / "cmp-links" / "comparison.json").read_text())
    assert sorted(cmp["methods"]) == ["variant0", "variant1"]
    assert main(["compare", str(out / names[0]), str(out / names[0]), "--out", str(tmp_path / "c2")]) == 2
    assert "pass each run once" in capsys.readouterr().err
    assert main(["compare", str(out / names[0]), "--bootstrap", "0", "--out", str(tmp_path / "c3")]) == 2
