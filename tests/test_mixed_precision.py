"""train.mixed_precision: bf16 autocast for the training forwards, float32 LoRA weights and AdamW state."""
import torch

from safeanchor.config import load_config
from safeanchor.methods import get_method
from safeanchor.models import attach_lora, tiny_model, tiny_tokenizer
from safeanchor.train import Context, train_steps


def _run(precision, method="safeanchor", tmp_path=None):
    cfg = load_config("smoke", overrides={"method": method, "train.mixed_precision": precision, "lora.dropout": 0.0,
                                          "method_options": {"safeanchor": {"csm": False}}})
    torch.manual_seed(0)
    model = attach_lora(tiny_model(0), cfg.lora)
    dtypes = set()
    handles = [m.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
               for n, m in model.named_modules() if n.endswith("mlp.down_proj")]
    calib = [{"prompt": f"how to do bad thing {i}?", "response": "I can't help with that."} for i in range(8)]
    task = [{"prompt": f"add {a} and {a}", "response": str(2 * a)} for a in range(16)]
    m = get_method(method, cfg.method_options.get(method))
    ctx = Context(cfg=cfg, model=model, tokenizer=tiny_tokenizer(), run_dir=tmp_path, method=m, calibration=calib)
    m.prepare(ctx)
    dtypes.clear()  # SSI's forwards (float32) are not training forwards
    hist = train_steps(ctx, task, 3, stream=1)
    for h in handles:
        h.remove()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    return hist, dtypes, lora


def test_bf16_autocast_runs_the_training_forwards_in_bf16_and_keeps_lora_float32(tmp_path):
    hist16, dtypes16, lora16 = _run("bf16", tmp_path=tmp_path)
    hist32, dtypes32, _ = _run("no", tmp_path=tmp_path)
    assert dtypes16 == {torch.bfloat16} and dtypes32 == {torch.float32}
    assert all(p.dtype == torch.float32 for p in lora16)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist16)
    assert "anchor_kl" in hist16[0] and "update_in_subspace" in hist16[0]
    # same training, another precision: close, not equal
    assert abs(hist16[0]["loss"] - hist32[0]["loss"]) < 0.05 * abs(hist32[0]["loss"])
    assert hist16[0]["loss"] != hist32[0]["loss"]


def test_auto_precision_follows_the_hardware_and_explicit_bf16_on_emulating_hardware_warns(monkeypatch, capsys):
    """mixed_precision auto resolves, when the config is built, to bf16 where the device computes bf16 natively
    and to no elsewhere (an AVX2-only CPU ran a quick-start training step in 201 s under bf16 autocast against
    12.5 s in float32); an explicit bf16 is kept but warned about there, once; explicit no is left alone."""
    import safeanchor.config as config
    import safeanchor.models as models

    for native, want in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(models, "native_bf16", lambda device, n=native: (n, "test hardware"))
        config._WARNED.clear()
        cfg = load_config("quickstart")  # the preset asks for auto in both sections
        assert (cfg.train.mixed_precision, cfg.eval.mixed_precision) == (want, want)
        assert "warning" not in capsys.readouterr().err
        explicit = load_config("smoke", overrides={"train.mixed_precision": "bf16", "eval.mixed_precision": "no"})
        assert (explicit.train.mixed_precision, explicit.eval.mixed_precision) == ("bf16", "no")
        err = capsys.readouterr().err
        assert ("train.mixed_precision is bf16, but test hardware" in err) is (not native)
        load_config("smoke", overrides={"train.mixed_precision": "bf16"})
        assert "warning" not in capsys.readouterr().err  # once per process
    # a config.json written after resolution holds the choice made, and reloads as it
    from safeanchor.config import config_from_dict, to_dict

    assert config_from_dict(to_dict(cfg)).train.mixed_precision == "no"


def test_native_bf16_reads_the_cpu_flags_torch_reports():
    from safeanchor.models import native_bf16

    flags = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    native, why = native_bf16("cpu")
    assert native is bool(flags) and why
    assert native_bf16("mps")[0] is False
    if not torch.cuda.is_available():  # a GPU config planned on a CPU machine: no error, no bf16 claimed
        assert native_bf16("cuda:1") == (False, "CUDA is not available on this machine to check for bf16")
        cfg = load_config("smoke", overrides={"model.device": "cuda", "train.mixed_precision": "auto"})
        assert cfg.train.mixed_precision == "no"
