"""Users' own safety data: data.safety_source / monitor_source / repair_source (offline, local:<file.jsonl>,
hub:beavertails, hub:<dataset id>), their errors, and that 'offline' is exactly the built-in data as before."""
from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from safeanchor.config import load_config
from safeanchor.data.splits import (HELD_OUT_HARMFUL, harmful_split, load_safety_examples, parse_source, repair_set,
                                    safety_sets)
from safeanchor.errors import SafeAnchorError

# written by us in the exact BeaverTails schema (prompt, response, category: 14 bools, is_safe);
# see tests/data/README.md
BEAVER_FIXTURE = Path(__file__).parent / "data" / "beavertails_schema_selfwritten.jsonl"
BEAVER_CATEGORIES = 14


def _rows():
    return [json.loads(line) for line in BEAVER_FIXTURE.read_text().splitlines()]


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# -- offline: the built-in behaviour, unchanged ---------------------------------------------------------------

def test_offline_is_exactly_the_builtin_data_in_the_same_order():
    """The same construction as before the sources existed (pipeline.safety_sets at the time)."""
    from safeanchor.data.safety import refusal

    for preset, seed in (("smoke", 0), ("quickstart", 3)):
        cfg = load_config(preset, overrides={"seed": seed, "data.monitor_source": "offline"})  # quickstart mixes
        train, monitor = harmful_split()
        train = [train[i] for i in np.random.default_rng(4321).permutation(len(train))]
        rng = random.Random(cfg.seed)
        want = [{"prompt": r["prompt"], "response": refusal(r["prompt"], rng)}
                for r in train[: cfg.data.calibration_size]]
        calib, mon = safety_sets(cfg)
        assert calib == want
        assert mon == monitor[: cfg.eval.monitor_size]
        assert len(monitor) == HELD_OUT_HARMFUL and not set(mon) & {c["prompt"] for c in calib}
        assert repair_set(cfg, calib) is calib


def test_offline_restricted_to_categories_is_that_part_of_the_offline_data():
    """offline:<cat>[,<cat>] is the offline calibration order with the other categories' prompts left out
    (the refusals drawn in that order), and the monitor split's prompts of those categories; bad names and an
    empty list are config errors that list the valid names."""
    from safeanchor.data.safety import COARSE_SLUGS, coarse_category, refusal

    seed = random.randrange(10**6)
    rng = random.Random(seed)
    wanted = set(rng.sample(sorted(set(COARSE_SLUGS.values()) - {"self-harm"}), 2))
    train, monitor = harmful_split()
    slug = {r["prompt"]: COARSE_SLUGS.get(coarse_category(r["source"], r["category"])) for r in train}
    order = [train[i] for i in np.random.default_rng(4321).permutation(len(train))]
    keep = [r for r in order if slug[r["prompt"]] in wanted]
    r2 = random.Random(seed)
    want = [{"prompt": r["prompt"], "response": refusal(r["prompt"], r2)} for r in keep[:40]]
    spec = "offline:" + ",".join(sorted(wanted))
    assert load_safety_examples(spec, 40, seed) == want, seed
    from safeanchor.data.safety import harmful_prompts

    pool = {r["prompt"]: COARSE_SLUGS.get(coarse_category(r["source"], r["category"])) for r in harmful_prompts()}
    mon = [r["prompt"] for r in load_safety_examples(spec, None, seed, kind="monitor")]
    assert mon == [p for p in monitor if pool[p] in wanted] and mon, seed
    assert load_config("smoke", overrides={"data.safety_source": spec}).data.safety_source == spec
    for bad in ("offline:", "offline:violins", "offline:violence,Violence"):
        with pytest.raises(SafeAnchorError, match="coarse harm categories.*non-violent-crimes"):
            load_config("smoke", overrides={"data.safety_source": bad})


def test_monitor_size_zero_means_all():
    cfg = load_config("smoke", overrides={"eval.monitor_size": 0})
    assert len(safety_sets(cfg)[1]) == HELD_OUT_HARMFUL


# -- local files ----------------------------------------------------------------------------------------------

def test_local_calibration_in_file_order_first_n(tmp_path):
    rows = [{"prompt": f"harmful request {i}", "response": f"I can't help with that ({i}).", "extra": i}
            for i in range(7)]
    path = _write(tmp_path / "safe.jsonl", rows[:3] + [""] + rows[3:])  # a blank line is skipped
    got = load_safety_examples(f"local:{path}", 5)
    assert got == [{"prompt": r["prompt"], "response": r["response"]} for r in rows[:5]]
    assert len(load_safety_examples(f"local:{path}", None)) == 7 == len(load_safety_examples(f"local:{path}", 500))
    cfg = load_config("smoke", overrides={"data.safety_source": f"local:{path}", "data.calibration_size": 4})
    assert safety_sets(cfg)[0] == got[:4]


def test_local_monitor_needs_only_prompts_and_has_no_cap_of_100(tmp_path):
    path = _write(tmp_path / "monitor.jsonl", [{"prompt": f"monitor prompt {i}"} for i in range(150)])
    assert len(load_safety_examples(f"local:{path}", None, kind="monitor")) == 150
    cfg = load_config("smoke", overrides={"data.monitor_source": f"local:{path}", "eval.monitor_size": 0})
    calib, monitor = safety_sets(cfg)
    assert monitor == [f"monitor prompt {i}" for i in range(150)]
    cfg.eval.monitor_size = 120
    assert safety_sets(cfg)[1] == monitor[:120]
    with pytest.raises(SafeAnchorError, match=r"line 1 has no 'response' field"):
        load_safety_examples(f"local:{path}", None, kind="calibration")  # calibration needs responses


def test_monitor_prompts_in_the_calibration_set_are_dropped(tmp_path):
    calib = _write(tmp_path / "calib.jsonl", [{"prompt": f"p{i}", "response": "No."} for i in range(4)])
    mon = _write(tmp_path / "mon.jsonl", [{"prompt": p} for p in ("p1", "q1", "p3", "q2")])
    cfg = load_config("smoke", overrides={"data.safety_source": f"local:{calib}",
                                          "data.monitor_source": f"local:{mon}"})
    assert safety_sets(cfg)[1] == ["q1", "q2"]
    same = load_config("smoke", overrides={"data.safety_source": f"local:{calib}",
                                           "data.monitor_source": f"local:{calib}"})
    with pytest.raises(SafeAnchorError, match="every monitor prompt .* is also a calibration prompt"):
        safety_sets(same)


def test_repair_source(tmp_path):
    path = _write(tmp_path / "repair.jsonl", [{"prompt": f"r{i}", "response": "I won't."} for i in range(30)])
    cfg = load_config("smoke", overrides={"data.repair_source": f"local:{path}"})
    assert repair_set(cfg) == [{"prompt": f"r{i}", "response": "I won't."} for i in range(cfg.data.calibration_size)]
    default = load_config("smoke")
    assert default.data.repair_source == "calibration" and repair_set(default) == safety_sets(default)[0]


@pytest.mark.parametrize("lines, needle", [
    ([], r"is empty; write one JSON object per line with prompt and response"),
    (["", "   "], r"is empty"),
    ([{"prompt": "a", "response": "b"}, "{not json"], r"line 2 is not JSON .*write one JSON object per line"),
    (["[1, 2]"], r"line 1 is a JSON list, not an object"),
    ([{"prompt": "a", "response": "b"}, {"prompt": "c"}], r"line 2 has no 'response' field; every line needs prompt "
                                                          r"and response"),
    ([{"response": "b"}], r"line 1 has no 'prompt' field"),
    ([{"prompt": "", "response": "b"}], r"line 1: 'prompt' must be a non-empty string"),
    ([{"prompt": "a", "response": 3}], r"line 1: 'response' must be a non-empty string"),
])
def test_local_file_content_errors_name_the_file_line_and_fix(tmp_path, lines, needle):
    path = _write(tmp_path / "bad.jsonl", lines)
    cfg = load_config("smoke", overrides={"data.safety_source": f"local:{path}"})  # exists: the config builds
    with pytest.raises(SafeAnchorError, match=needle) as exc:
        safety_sets(cfg)
    assert str(path) in _one_line(exc)


def test_spec_errors_at_config_build(tmp_path):
    with pytest.raises(SafeAnchorError, match=r"'data.safety_source' is 'nowhere:xyz', not a safety data source; use "
                                              r"offline, local:<file.jsonl>, hub:beavertails or hub:<dataset id>$"):
        load_config("smoke", overrides={"data.safety_source": "nowhere:xyz"})
    for bad in ("local:", "hub:", "hub: ", "Offline", "calibration"):  # 'calibration' is a repair source only
        with pytest.raises(SafeAnchorError, match="not a safety data source"):
            load_config("smoke", overrides={"data.safety_source": bad})
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(SafeAnchorError, match=rf"{missing} \(data.monitor_source\) does not exist; give an existing "
                                              rf"JSON-lines file with a prompt field"):
        load_config("smoke", overrides={"data.monitor_source": f"local:{missing}"})
    with pytest.raises(SafeAnchorError, match="must be a string"):
        load_config("smoke", overrides={"data.safety_source": 3})
    assert parse_source("hub:org/name:validation") == ("hub", "org/name", "validation")
    assert parse_source("calibration", "repair") == ("calibration", None, None)


# -- the hub (datasets.load_dataset monkeypatched; nothing is downloaded) --------------------------------------------

@pytest.fixture
def fake_hub(monkeypatch):
    """``datasets.load_dataset`` -> the BeaverTails-schema fixture (a real ``datasets.Dataset`` when the
    package is installed, else a column dict in a stand-in module); records the calls."""
    calls = []
    try:
        import datasets

        def table():
            return datasets.Dataset.from_list(_rows())
    except ImportError:
        datasets = types.ModuleType("datasets")
        monkeypatch.setitem(sys.modules, "datasets", datasets)

        def table():
            rows = _rows()
            return {k: [r[k] for r in rows] for k in rows[0]}

    def load_dataset(name, split=None, **kw):
        calls.append((name, split))
        if name == "missing/dataset":
            raise FileNotFoundError("Couldn't find a dataset script or data file\nsecond line")
        return table()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset, raising=False)
    return calls


def test_fixture_has_the_beavertails_schema():
    for r in _rows():
        assert set(r) == {"prompt", "response", "category", "is_safe"}
        assert len(r["category"]) == BEAVER_CATEGORIES and all(isinstance(v, bool) for v in r["category"].values())
        assert isinstance(r["is_safe"], bool) and r["is_safe"] == (not any(r["category"].values()))


def test_hub_beavertails_keeps_is_safe_rows(fake_hub):
    safe = [{"prompt": r["prompt"], "response": r["response"]} for r in _rows() if r["is_safe"]]
    assert 0 < len(safe) < len(_rows())
    assert load_safety_examples("hub:beavertails", None) == safe
    assert fake_hub == [("PKU-Alignment/BeaverTails", "330k_train")]
    load_safety_examples("hub:beavertails:30k_test", None)
    load_safety_examples("hub:PKU-Alignment/BeaverTails", None)
    assert fake_hub[1:] == [("PKU-Alignment/BeaverTails", "30k_test"), ("PKU-Alignment/BeaverTails", "330k_train")]


def test_hub_sample_is_seeded_and_in_dataset_order(fake_hub):
    safe = [r["prompt"] for r in _rows() if r["is_safe"]]
    a = load_safety_examples("hub:beavertails", 2, seed=5)
    assert a == load_safety_examples("hub:beavertails", 2, seed=5) and len(a) == 2
    idx = [safe.index(r["prompt"]) for r in a]
    assert idx == sorted(idx)
    draws = {tuple(r["prompt"] for r in load_safety_examples("hub:beavertails", 2, seed=s)) for s in range(12)}
    assert len(draws) > 1  # the seed matters


def test_hub_monitor_takes_every_prompt_once(fake_hub):
    prompts = list(dict.fromkeys(r["prompt"] for r in _rows()))
    got = load_safety_examples("hub:beavertails", None, kind="monitor")
    assert [r["prompt"] for r in got] == prompts and len(prompts) < len(_rows())
    cfg = load_config("smoke", overrides={"data.safety_source": "hub:beavertails",
                                          "data.monitor_source": "hub:beavertails"})
    calib, monitor = safety_sets(cfg)
    assert calib and monitor and not set(monitor) & {c["prompt"] for c in calib}


def test_hub_generic_dataset_and_its_errors(fake_hub):
    rows = load_safety_examples("hub:someone/safety-set", None)  # no is_safe filter for other datasets
    assert len(rows) == len(_rows()) and fake_hub[-1] == ("someone/safety-set", "train")
    with pytest.raises(SafeAnchorError, match=r"cannot load hub dataset missing/dataset split train "
                                              r"\(FileNotFoundError: Couldn't find .*local:<file.jsonl>") as exc:
        load_safety_examples("hub:missing/dataset", 10)
    _one_line(exc)


def test_hub_without_the_needed_columns(monkeypatch):
    mod = types.ModuleType("datasets")
    mod.load_dataset = lambda name, split=None, **kw: {"question": ["q"], "answer": ["a"]}
    monkeypatch.setitem(sys.modules, "datasets", mod)
    with pytest.raises(SafeAnchorError, match=r"has no 'prompt' column .*prompt/response columns"):
        load_safety_examples("hub:other/qa", 5)
    mod.load_dataset = lambda name, split=None, **kw: {"prompt": ["p"], "response": ["r"], "is_safe": [False]}
    with pytest.raises(SafeAnchorError, match=r"has no is_safe rows"):
        load_safety_examples("hub:beavertails", 5)


def test_hub_without_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(SafeAnchorError, match=r"needs the datasets package; pip install 'safeanchor\[hub\]'"):
        load_safety_examples("hub:beavertails", 5)
