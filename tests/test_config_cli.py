"""Config parsing and the CLI's bad-input contract: one line on stderr, exit 2, no traceback."""
import subprocess
import sys

import pytest

from safeanchor.cli import main
from safeanchor.config import RunConfig, config_from_dict, load_config
from safeanchor.errors import SafeAnchorError


def test_defaults_are_the_papers():
    cfg = RunConfig()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 32, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs) == (2e-4, 8, 2, 3.0)
    assert cfg.data.domains == ["medical", "legal", "code"] and cfg.data.examples_per_domain == 5000


def test_presets_load():
    assert load_config("smoke").model.name == "tiny-random"
    assert load_config("quickstart").model.name == "embedded:smollm2"
    from safeanchor.config import list_presets

    assert {"paper-llama2", "paper-mistral", "paper-literal"} <= set(list_presets())


def test_unknown_key_names_the_nearest():
    with pytest.raises(SafeAnchorError, match=r"unknown config key 'train.lrr'.*did you mean 'train.lr'"):
        config_from_dict({"train": {"lrr": 1e-3}})


def test_wrong_type():
    with pytest.raises(SafeAnchorError, match="must be a number"):
        config_from_dict({"train": {"lr": "fast"}})
    with pytest.raises(SafeAnchorError, match="must be a list"):
        config_from_dict({"data": {"domains": "medical"}})


def test_override_dotted():
    cfg = load_config("smoke", overrides={"train.lr": 0.5, "seed": 3})
    assert cfg.train.lr == 0.5 and cfg.seed == 3


@pytest.mark.parametrize("argv, needle", [
    (["run", "--preset", "nope"], "unknown preset 'nope'"),
    (["run", "--preset", "smoke", "--method", "magic"], "unknown method 'magic'"),
    (["run", "--preset", "smoke", "--set", "train.bogus=1"], "unknown config key 'train.bogus'"),
    (["run", "--preset", "smoke", "--set", "model.name=./no/such/dir"], "does not exist"),
    (["run", "--preset", "smoke", "--set", "lora.target_modules=[c_attn]"], "LoRA target module(s) ['c_attn']"),
    (["run", "--preset", "smoke", "--set", "data.domains=[astrology]"], "unknown domain"),
    (["run", "--config", "/no/such.yaml"], "does not exist"),
    (["run", "--preset", "smoke", "--set", "eval.refusal_judge=llamaguard"], "'eval.refusal_judge' is 'llamaguard'"),
    (["run", "--preset", "smoke", "--set", "eval.harm_judge=keyword"], "'eval.harm_judge' is 'keyword', a refusal"),
    (["run", "--preset", "smoke", "--set", "data.monitor_source=harmbench-val:standard"], "contextual or copyright"),
    (["run", "--preset", "smoke", "--dry-run", "--set", "eval.monitor_judge=gpt4"], "unknown judge 'gpt4'"),
    (["run", "--preset", "quickstart", "--method", "standard", "--set", "model.name=tiny-random"],
     "smollm2-align was trained on embedded:smollm2"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, tmp_path, capsys):
    code = main(argv + ["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "safeanchor.cli", "run", "--preset", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown preset" in proc.stderr


def test_empty_set_value_is_empty_string_not_null():
    from safeanchor.cli import _overrides

    assert _overrides(["align.artifact=", "train.lr=0.0001"]) == {"align.artifact": "", "train.lr": 0.0001}
    assert load_config("quickstart", overrides=_overrides(["align.artifact="])).align.artifact == ""


def test_the_docs_key_table_lists_every_config_key_with_its_default():
    """docs/cli.md's configuration table has one row per RunConfig field, with the library default: a key
    added to config.py without its row (train.mixed_precision once) fails here."""
    import dataclasses
    import re
    from pathlib import Path

    from safeanchor.config import RunConfig

    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", text, flags=re.M))
    cfg, want = RunConfig(), {}
    for f in dataclasses.fields(cfg):
        sec = getattr(cfg, f.name)
        for g in (dataclasses.fields(sec) if dataclasses.is_dataclass(sec) else []):
            want[f"{f.name}.{g.name}"] = getattr(sec, g.name)
        if not dataclasses.is_dataclass(sec):
            want[f.name] = sec
    assert sorted(rows) == sorted(want)
    for key, value in want.items():
        shown = rows[key].strip('"')
        expect = (str(value).lower() if isinstance(value, bool) else
                  "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value))
        assert shown == expect, f"{key}: docs say {rows[key]}, config.py {value!r}"
