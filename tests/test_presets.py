"""The paper presets: what they set, that paper-literal is paper-llama2 plus exactly the paper's SafeAnchor
options, and the HarmBench CSM monitor sources (none of whose prompts is in the evaluation probe)."""
import pytest

from safeanchor.config import load_config, to_dict
from safeanchor.data import splits
from safeanchor.data.common import NearDuplicates
from safeanchor.data.safety import harm_probe
from safeanchor.errors import SafeAnchorError

PAPER = ("paper-llama2", "paper-mistral", "paper-literal")
LITERAL = {"project": "gradient", "anchor_projected": True, "merge": "union", "repair_check_every": 0,
           "repair_lookalikes": 0}


@pytest.mark.parametrize("preset", PAPER)
def test_paper_presets(preset):
    cfg = load_config(preset)
    assert cfg.data.safety_source == "hub:beavertails" and cfg.data.calibration_size == 500
    assert cfg.data.monitor_source == "harmbench-heldout" and cfg.eval.monitor_size == 200
    assert cfg.data.examples_per_domain == 5000 and cfg.data.domains[0] == "hub:medqa"
    assert (cfg.eval.harm_judge, cfg.eval.monitor_judge) == ("llamaguard", "llamaguard")
    assert cfg.aligned is False


def test_mistral_safe_lora_unaligned_is_the_base_instruct_v02_was_tuned_from():
    cfg = load_config("paper-mistral")
    assert cfg.model.name == "mistralai/Mistral-7B-Instruct-v0.2"
    assert cfg.method_options["safelora"]["unaligned_model"] == "mistralai/Mistral-7B-v0.1"
    assert load_config("paper-llama2").method_options["safelora"]["unaligned_model"] == "meta-llama/Llama-2-7b-hf"


def test_paper_literal_is_paper_llama2_plus_the_literal_options():
    lit, base = to_dict(load_config("paper-literal")), to_dict(load_config("paper-llama2"))
    assert lit["method_options"].pop("safeanchor") == LITERAL
    assert lit.pop("method") == "safeanchor" and base.pop("method") == "standard"
    assert lit == base
    # the same set as --set overrides on another preset (docs/methods.md)
    cfg = load_config("quickstart", overrides={f"method_options.safeanchor.{k}": v for k, v in LITERAL.items()})
    assert {k: cfg.method_options["safeanchor"][k] for k in LITERAL} == LITERAL


def test_harmbench_monitor_sources_are_disjoint_from_the_probe():
    probe = harm_probe()
    near = NearDuplicates(probe)
    for spec, n in (("harmbench-heldout", 200), ("harmbench-val", 39), ("harmbench-heldout:contextual", 100),
                    ("harmbench-val:copyright", 20)):
        scheme, kinds, _ = splits.parse_source(spec, "monitor")
        rows = splits.harmbench_monitor(scheme, kinds)
        assert len(rows) == n, spec
        behaviours = [r["prompt"].rsplit("\n\n---\n\n", 1)[-1] for r in rows]
        assert not set(behaviours) & set(probe) and not [b for b in behaviours if b in near], spec
        assert not set(r["prompt"] for r in rows) & set(probe)
        assert len({r["prompt"] for r in rows}) == n
    # why harmbench-val has only 39: its 41 standard behaviours are all among the probe's 200
    standard = [r["Behavior"].strip() for r in splits.harmbench_rows("val") if r["FunctionalCategory"] == "standard"]
    assert len(standard) == 41 and set(standard) <= set(probe)


def test_harmbench_monitor_rows_and_order():
    rows = splits.load_safety_examples("harmbench-heldout", None, kind="monitor")
    assert len(rows) == 200 and set(rows[0]) == {"prompt"}
    contextual = [r for r in rows if "\n\n---\n\n" in r["prompt"]]
    assert len(contextual) == 100  # context, then the request, as HarmBench's own generation joins them
    first = splits.harmbench_monitor("harmbench-heldout", "contextual,copyright")[:4]
    assert [r["kind"] for r in first] == ["contextual", "copyright", "contextual", "copyright"]
    assert len(splits.load_safety_examples("harmbench-val", 5, kind="monitor")) == 5


def test_monitor_set_of_a_paper_like_config():
    cfg = load_config("smoke", overrides={"data.monitor_source": "harmbench-heldout", "eval.monitor_size": 200})
    calib, monitor = splits.safety_sets(cfg)
    assert len(monitor) == 200 and not set(monitor) & set(harm_probe())
    cfg = load_config("smoke", overrides={"data.monitor_source": "harmbench-val", "eval.monitor_size": 200})
    assert len(splits.safety_sets(cfg)[1]) == 39  # what it has


def test_harmbench_source_errors():
    with pytest.raises(SafeAnchorError, match="monitor source only"):
        load_config("smoke", overrides={"data.safety_source": "harmbench-val"})
    with pytest.raises(SafeAnchorError, match="monitor source only"):
        load_config("smoke", overrides={"data.repair_source": "harmbench-heldout"})
    with pytest.raises(SafeAnchorError, match="kinds after ':' must be contextual or copyright"):
        load_config("smoke", overrides={"data.monitor_source": "harmbench-val:standard"})
    with pytest.raises(SafeAnchorError, match="harmbench-heldout, harmbench-val, pasttense, futuretense, offline, local"):
        load_config("smoke", overrides={"data.monitor_source": "harmbench"})
