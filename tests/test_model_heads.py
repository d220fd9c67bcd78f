"""response_logits against each architecture's own forward, including heads that transform their logits."""
import pytest
import torch

from safeanchor.data.chat import collate, encode, plain_head, response_logits
from safeanchor.models import tiny_tokenizer

SMALL = dict(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=258, eos_token_id=257, bos_token_id=256)


def _model(arch):
    import transformers as tf

    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"final_logit_softcapping": 2.0, "head_dim": 8,
                                                            "query_pre_attn_scalar": 8}),
        "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {"logit_scale": 0.25}),
        "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, {"logits_scaling": 4.0}),
    }
    cfg_cls, model_cls, extra = configs[arch]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**SMALL, **extra)).eval()


@pytest.mark.parametrize("arch, plain", [("llama", True), ("gemma2", False), ("cohere", False), ("granite", False)])
def test_response_logits_are_the_models_own(arch, plain):
    from peft import LoraConfig, get_peft_model

    tok = tiny_tokenizer()
    model = get_peft_model(_model(arch), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    batch = collate([encode(tok, "what is two plus two?", "four", 48), encode(tok, "hi", "hello there, friend", 48)],
                    tok.pad_token_id)
    assert plain_head(model) is plain
    logits, targets = response_logits(model, batch)
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    sel = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(logits.detach(), own[sel].float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(targets, batch["labels"][:, 1:][sel])
    logits.sum().backward()  # the gradient reaches the adapter through either path
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
