"""A built config is a valid config: Literal fields, check= ranges, non-empty lists and data sources are
checked when the config is built (and a method's options when it is built), so a bad value is one line on
stderr and exit 2 before any model loads. Also: the method registry refuses a duplicate name."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Literal

import pytest

from safeanchor.cli import main
from safeanchor.config import RunConfig, _f, check_fields, load_config
from safeanchor.errors import SafeAnchorError
from safeanchor.methods import METHODS, get_method, load_all
from safeanchor.methods.base import Method, MethodConfig, method_options, option, register


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model (or building the tiny one) fails the test: config errors must come first."""
    import safeanchor.align
    import safeanchor.models
    import safeanchor.pipeline

    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded before the config was checked")

    for mod in (safeanchor.models, safeanchor.pipeline):
        monkeypatch.setattr(mod, "load_model", refuse)
    monkeypatch.setattr(safeanchor.models, "tiny_model", refuse)
    monkeypatch.setattr(safeanchor.align, "ensure_aligned", refuse)


def _cli_error(capsys, tmp_path, *sets, method=None) -> str:
    argv = ["run", "--preset", "smoke", "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    if method:
        argv += ["--method", method]
    t0 = time.monotonic()
    code = main(argv)
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert elapsed < 30, f"the error took {elapsed:.0f}s: work started before the config was checked"
    assert not (tmp_path / "run").exists(), "the run directory was created before the config was checked"
    return err


@pytest.mark.parametrize("setting, needles", [
    # a method option annotated in a method owned here
    ("method_options.safelora.projector=papr",
     ["'method_options.safelora.projector'", "one of 'paper', 'exact'", "got 'papr'", "did you mean 'paper'"]),
    # needs methods/safeanchor.py's annotations (`project: Literal[...]`, `rho: ... check="(0,1]"`)
    ("method_options.safeanchor.project=updates",
     ["'method_options.safeanchor.project'", "'gradient', 'update', 'none'", "got 'updates'", "did you mean 'update'"]),
    ("method_options.safeanchor.rho=1.5", ["'method_options.safeanchor.rho'", "(0, 1]", "1.5"]),
    ("data.domains=[]", ["'data.domains'", "non-empty"]),
    ("data.safety_source=nowhere:xyz",
     ["'data.safety_source'", "nowhere:xyz", "offline, local:<file.jsonl>, hub:beavertails or hub:<dataset id>"]),
    ("data.safety_source=local:/missing.jsonl", ["/missing.jsonl", "does not exist", "data.safety_source"]),
    ("train.lr=-0.001", ["'train.lr'", "> 0", "-0.001"]),
    ("train.betas=[0.9,1.0]", ["'train.betas'", "[0, 1)", "1.0"]),
    ("train.batch_size=0", ["'train.batch_size'", ">= 1", "got 0"]),
    ("train.warmup_ratio=1", ["'train.warmup_ratio'", "[0, 1)"]),
    ("lora.target_modules=[]", ["'lora.target_modules'", "non-empty"]),
    ("lora.dropout=1.0", ["'lora.dropout'", "[0, 1)"]),
    ("model.device=gpu", ["'model.device'", "auto, cpu, cuda, cuda:N or mps", "'gpu'"]),
    ("model.attn_implementation=flash", ["'model.attn_implementation'", "'flash_attention_2'"]),
    ("model.dtype=fp16", ["'model.dtype'", "'float16'"]),
    ("data.monitor_source=local:/missing-monitor.jsonl", ["/missing-monitor.jsonl", "data.monitor_source"]),
    ("data.repair_source=elsewhere", ["'data.repair_source'", "use calibration, offline"]),
    ("method_options.ewc.fisher_norm=trace2", ["'method_options.ewc.fisher_norm'", "did you mean 'trace'"]),
    ("method_options.interleave.ratio=1.5", ["'method_options.interleave.ratio'", "< 1"]),
    ("method_options.vaccine.rho=-1", ["'method_options.vaccine.rho'", ">= 0"]),
    ("method_options.olora.lambda1=lots", ["'method_options.olora.lambda1'", "must be a number"]),
])
def test_bad_setting_is_one_line_exit_2_before_any_model(setting, needles, tmp_path, capsys, no_model):
    err = _cli_error(capsys, tmp_path, setting)
    for needle in needles:
        assert needle in err, (needle, err)


def test_a_comparison_checks_every_methods_options_before_the_first_run(tmp_path, capsys, no_model):
    err = _cli_error(capsys, tmp_path, "method_options.safelora.select=numbr", method="standard,safelora")
    assert "'method_options.safelora.select'" in err and "did you mean 'number'" in err


def test_set_yaml_scalars_still_parse_and_are_coerced():
    cfg = load_config("smoke", overrides={"train.lr": "1e-4", "train.batch_size": 2.0, "method_options.ewc.lam": "2e4",
                                          "data.domains": ["tiny-arith"], "model.device": "cuda:1"})
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.batch_size, int) and cfg.train.batch_size == 2
    assert cfg.method_options["ewc"] == {"lam": 20000.0}  # YAML reads 2e4 as a string; coerced to the float
    assert get_method("ewc", cfg.method_options["ewc"]).options.lam == 20000.0


def test_every_default_and_every_preset_is_valid():
    check_fields(RunConfig())
    for preset in ("smoke", "quickstart", "paper-llama2", "paper-mistral"):
        check_fields(load_config(preset))
    load_all()
    for name, cls in METHODS.items():
        check_fields(cls.config_cls(), f"method_options.{name}.")


def test_every_config_field_has_help_and_a_valid_check():
    from safeanchor.config import _rule

    def sections(cls):
        yield cls
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                yield from sections(f.default_factory)
    load_all()
    for cls in [*sections(RunConfig), *(m.config_cls for m in METHODS.values())]:
        for f in dataclasses.fields(cls):
            if f.type.endswith("Config"):  # a section
                continue
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            checks = f.metadata.get("check", ())
            for c in (checks,) if isinstance(checks, str) or callable(checks) else checks:
                assert callable(c) or _rule(c)


def test_check_fields_mechanism_on_a_toy_dataclass():
    @dataclass
    class Toy:
        mode: Literal["fast", "exact"] = _f("fast", "a mode")
        share: float = _f(0.5, "a share", check="(0,1]")
        sizes: list = _f([1, 2], "sizes", check=("nonempty", ">=1"))
        flag: Literal[True] = _f(True, "a flag that must be True")

    check_fields(Toy(), "toy.")
    with pytest.raises(SafeAnchorError, match=r"^config key 'toy\.mode' must be one of 'fast', 'exact', got 'exakt'; "
                                              r"did you mean 'exact'\?$"):
        check_fields(Toy(mode="exakt"), "toy.")
    with pytest.raises(SafeAnchorError, match=r"'toy\.mode' must be one of 'fast', 'exact', got 'zzz'$"):
        check_fields(Toy(mode="zzz"), "toy.")  # nothing close: no did-you-mean
    for bad in (0, 0.0, 1.0001, float("nan"), "half", None, True):
        with pytest.raises(SafeAnchorError, match=r"'toy\.share' must be in \(0, 1\]"):
            check_fields(Toy(share=bad), "toy.")
    check_fields(Toy(share=1), "toy.")
    with pytest.raises(SafeAnchorError, match="non-empty list"):
        check_fields(Toy(sizes=[]), "toy.")
    with pytest.raises(SafeAnchorError, match=r"each value of config key 'toy\.sizes' must be >= 1, got 0"):
        check_fields(Toy(sizes=[3, 0]), "toy.")
    with pytest.raises(SafeAnchorError, match="must be one of True"):
        check_fields(Toy(flag=1), "toy.")  # 1 == True, but not the same value
    with pytest.raises(ValueError, match="unknown check"):
        _f(0, "typo in a check spec fails at definition", check=">= zero")


def test_range_tokens():
    from safeanchor.config import _rule

    cases = {">0": [(1e-9, True), (0, False)], ">=0": [(0, True), (-1e-9, False)], "[0,1)": [(0, True), (1, False)],
             "(0,1]": [(0, False), (1, True)], "[0,1]": [(0, True), (1, True), (1.1, False)],
             "<1": [(0.99, True), (1, False)], "[-1,1]": [(-1, True), (-1.01, False)], "[1,inf)": [(1e300, True)]}
    for spec, pairs in cases.items():
        pred, _, _ = _rule(spec)
        for value, ok in pairs:
            assert pred(value) is ok, (spec, value)


def test_method_options_checked_when_the_method_is_built():
    with pytest.raises(SafeAnchorError, match=r"'method_options\.safelora\.select'"):
        get_method("safelora", {"select": "thresh"})
    from safeanchor.methods.safelora import SafeLoRA, SafeLoRAConfig

    with pytest.raises(SafeAnchorError, match=r"'method_options\.safelora\.exact_energy' must be in \(0, 1\]"):
        SafeLoRA(SafeLoRAConfig(exact_energy=0))  # built directly, not through get_method
    assert method_options(METHODS["vaccine"], {"rho": 1}).rho == 1.0


def test_register_refuses_a_duplicate_name():
    load_all()
    before = dict(METHODS)

    class AnotherStandard(Method):
        name = "standard"

    with pytest.raises(SafeAnchorError, match=r"'standard'.*AnotherStandard.*already registered by "
                                              r"safeanchor\.methods\.standard\.StandardLoRA"):
        register(AnotherStandard)
    assert METHODS == before

    @dataclass
    class NewConfig(MethodConfig):
        level: int = option(1, "a level", check=">=1")

    class New(Method):
        name = "test-only-new-method"
        config_cls = NewConfig

    try:
        assert register(New) is New and register(New) is New  # the same class again is no duplicate
        with pytest.raises(SafeAnchorError, match=r"'method_options\.test-only-new-method\.level' must be >= 1"):
            get_method("test-only-new-method", {"level": 0})
    finally:
        METHODS.pop("test-only-new-method", None)
