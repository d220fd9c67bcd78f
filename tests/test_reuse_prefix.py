"""A run that starts from another ordering's finished common prefix (pipeline.reuse_prefix, --reuse-prefix)
is the run made from scratch: same numbers at every step, same generations, same adapters."""
import json
import shutil

import pytest
import torch

from safeanchor.cli import main
from safeanchor.config import load_config
from safeanchor.pipeline import run

QUIET = lambda *_: None  # noqa: E731
FIRST = ["tiny-arith", "tiny-reverse", "tiny-upper"]   # the smoke preset's order
SECOND = ["tiny-arith", "tiny-upper", "tiny-reverse"]  # shares tiny-arith with FIRST
THIRD = ["tiny-upper", "tiny-arith", "tiny-reverse"]   # shares nothing but the base with either


def _cfg(method, domains, **over):
    return load_config("smoke", overrides={"method": method, "data.domains": domains, **over})


def _strip(results):
    """results.json without what a copied step cannot share: seconds, and the provenance key itself."""
    def step(s):
        s = {k: v for k, v in s.items() if k != "eval_seconds"}
        if "train" in s:
            s["train"] = {k: v for k, v in s["train"].items()
                          if k not in ("seconds", "method_seconds", "method_seconds_by_part")}
        return s

    return {"steps": [step(s) for s in results["steps"]], "domains": results["domains"],
            "prepare": {k: v for k, v in results["prepare"].items() if k != "seconds"},
            "method_config": results["method_config"]}


@pytest.mark.parametrize("method", ["standard", "safeanchor", "olora"])
def test_a_run_from_a_shared_prefix_equals_the_run_from_scratch(tmp_path, method):
    donor = tmp_path / "donor"
    run(_cfg(method, FIRST), donor, progress=QUIET)
    scratch = run(_cfg(method, SECOND), tmp_path / "scratch", progress=QUIET)
    said = []
    reused = run(_cfg(method, SECOND), tmp_path / "reused", progress=said.append, donors=[donor, tmp_path / "nothing"])
    assert reused["reused_prefix"] == {"from": str(donor.resolve()), "domains": 1}
    assert any("first 1 domain(s)" in line for line in said)
    assert _strip(reused) == _strip(json.loads(json.dumps(scratch)))
    on_disk = json.loads((tmp_path / "reused" / "results.json").read_text())
    assert on_disk["reused_prefix"]["domains"] == 1 and list(on_disk["steps"][1]["domain_scores"]) == SECOND
    for k, after in enumerate(["base", *SECOND]):
        a = (tmp_path / "scratch" / "generations" / f"{k}-{after}.jsonl").read_text()
        assert (tmp_path / "reused" / "generations" / f"{k}-{after}.jsonl").read_text() == a, (k, after)
    for t, d in enumerate(SECOND, start=1):
        mine = torch.load(tmp_path / "reused" / "state" / f"stage{t}.pt", weights_only=False)["params"]
        theirs = torch.load(tmp_path / "scratch" / "state" / f"stage{t}.pt", weights_only=False)["params"]
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine), (t, d)
        assert (tmp_path / "reused" / "adapters" / f"{t}-{d}" / "adapter_config.json").is_file()


@pytest.mark.parametrize("method", ["standard", "safeanchor"])
def test_a_longer_run_starts_from_a_shorter_ones_steps_and_scores_its_new_domain_on_them(tmp_path, method):
    """T = 3 from a finished T = 2 run of its first two domains: the copied steps get the third domain's
    score measured on their own models, and the whole run equals the T = 3 run made from scratch. The other
    way round, a T = 2 run is all in a T = 3 run's first steps (the third domain's columns dropped)."""
    short = run(_cfg(method, FIRST[:2]), tmp_path / "short", progress=QUIET)
    scratch = run(_cfg(method, FIRST), tmp_path / "scratch", progress=QUIET)
    said = []
    longer = run(_cfg(method, FIRST), tmp_path / "longer", progress=said.append, donors=[tmp_path / "short"])
    assert longer["reused_prefix"] == {"from": str((tmp_path / "short").resolve()), "domains": 2,
                                       "rescored": [FIRST[2]]}
    assert any(f"{FIRST[2]} scored afresh" in line for line in said)
    assert _strip(longer) == _strip(json.loads(json.dumps(scratch)))
    on_disk = json.loads((tmp_path / "longer" / "results.json").read_text())
    assert [list(s["domain_scores"]) for s in on_disk["steps"]] == [FIRST] * 4
    again = run(_cfg(method, FIRST[:2]), tmp_path / "again", progress=QUIET, donors=[tmp_path / "scratch"])
    assert again["reused_prefix"] == {"from": str((tmp_path / "scratch").resolve()), "domains": 2}
    assert _strip(again) == _strip(json.loads(json.dumps(short)))


def test_only_a_same_config_run_is_a_donor_and_only_its_finished_stages(tmp_path):
    donor = tmp_path / "donor"
    run(_cfg("standard", FIRST), donor, progress=QUIET)
    other_lr = tmp_path / "lr"
    run(_cfg("standard", FIRST, **{"train.lr": 0.5}), other_lr, progress=QUIET)
    fewer = tmp_path / "fewer"
    run(_cfg("standard", FIRST[:2]), fewer, progress=QUIET)
    # another config: nothing is taken (the run is made from scratch)
    res = run(_cfg("standard", SECOND), tmp_path / "a", progress=QUIET, donors=[other_lr])
    assert "reused_prefix" not in res and len(res["steps"]) == 4
    # only the base is shared with THIRD; the donor with the longer prefix wins
    unfinished = tmp_path / "unfinished"
    shutil.copytree(donor, unfinished)
    data = json.loads((unfinished / "results.json").read_text())
    (unfinished / "results.json").write_text(json.dumps({**data, "steps": data["steps"][:1]}))  # killed in domain 1
    cfg = _cfg("standard", SECOND)
    from safeanchor.pipeline import _shared_stages
    assert _shared_stages(cfg, unfinished) == 0 and _shared_stages(cfg, donor) == 1
    assert _shared_stages(_cfg("standard", THIRD), donor) == 0
    assert _shared_stages(cfg, other_lr) == -1
    assert _shared_stages(cfg, fewer) == 1  # other domains: the shared first one (its new columns scored afresh)
    (tmp_path / "b").mkdir()
    res = run(cfg, tmp_path / "b", progress=QUIET, donors=[unfinished, donor])
    assert res["reused_prefix"]["domains"] == 1 and res["reused_prefix"]["from"] == str(donor.resolve())
    # a directory that already holds results is resumed, never overwritten by a donor's
    before = (tmp_path / "a" / "results.json").read_text()
    run(cfg, tmp_path / "a", progress=QUIET, donors=[donor])
    assert (tmp_path / "a" / "results.json").read_text() == before


def test_reuse_prefix_flag_names_a_missing_directory_exit_2_before_work(tmp_path, capsys):
    code = main(["run", "--preset", "smoke", "--reuse-prefix", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--reuse-prefix" in err and "no such directory" in err and not (tmp_path / "x").exists()


def test_reuse_prefix_flag_reads_a_folder_of_runs(tmp_path, capsys):
    grid = tmp_path / "grid"
    over = ["--set", "train.steps_per_domain=2", "--method", "standard"]
    assert main(["run", "--preset", "smoke", *over, "--set", f"data.domains={json.dumps(FIRST)}",
                 "--out", str(grid / "first")]) == 0
    second = ["run", "--preset", "smoke", *over, "--set", f"data.domains={json.dumps(SECOND)}",
              "--reuse-prefix", str(grid), "--out", str(grid / "second")]
    capsys.readouterr()
    assert main([*second, "--dry-run"]) == 0
    assert f"(starts from {grid / 'first'}: its first 1 domain(s) and prepare)" in capsys.readouterr().out
    assert main(second) == 0
    res = json.loads((grid / "second" / "results.json").read_text())
    assert res["reused_prefix"] == {"from": str((grid / "first").resolve()), "domains": 1}


def test_parallel_runs_start_an_ordering_whose_first_domain_no_running_run_has():
    from types import SimpleNamespace as NS

    from safeanchor.cli import _next_job, parse_orderings

    def cfg(order, method="safeanchor", seed=0):
        return NS(method=method, seed=seed, data=NS(domains=order))

    orders = parse_orderings("all", ["medical", "legal", "code"])  # medical,legal,code then medical,code,legal ...
    pending = [cfg(o) for o in orders]
    running = [pending.pop(0)]
    i = _next_job(pending, running)
    assert pending[i].data.domains[0] != "medical"  # not the medical-first run that could take over its first domain
    assert _next_job(pending, [cfg(["legal", "x", "y"]), cfg(["code", "x", "y"]), cfg(["medical", "x", "y"])]) == 0
    assert _next_job([cfg(["medical"], seed=1)], [cfg(["medical"])]) == 0  # another seed shares nothing
