import pytest
import torch

from safeanchor.data.chat import collate, encode
from safeanchor.models import tiny_model, tiny_tokenizer


@pytest.fixture
def tiny():
    return tiny_model(seed=0), tiny_tokenizer()


def make_batch(tok, pairs, max_length=64):
    return collate([encode(tok, p, r, max_length) for p, r in pairs], tok.pad_token_id)


def eager64() -> str:
    """Name of an eager attention that keeps float64 through the softmax, registered with transformers.
    transformers' eager attention (the only one Gemma-2 takes) takes its softmax in float32, where float64's
    mask minimum becomes -inf: a padding query, which sees only padding, then gets NaN weights and the NaN
    reaches every row of a left-padded batch through the next layer (0 x NaN). The float64 tests of
    left-padded batches need this to compare anything but NaN."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        weights = query @ key.transpose(2, 3) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
        if softcap is not None:
            weights = torch.tanh(weights / softcap) * softcap
        if attention_mask is not None:
            weights = weights + attention_mask[..., :key.shape[-2]]
        weights = weights.softmax(-1)
        return (weights @ value).transpose(1, 2).contiguous(), weights

    AttentionInterface.register("eager64", attention)
    AttentionMaskInterface.register("eager64", eager_mask)
    return "eager64"


def torchrun(script: str, nproc: int, *args: str, timeout: int = 600):
    """Run a worker script next to this file under torch.distributed.run with ``nproc`` processes (gloo on
    CPU), one thread each; returns the finished process."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(os.path.dirname(__file__), script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def generated(monkeypatch):
    """The prompt lists safeanchor.generation.generate_samples is called with, in order (it still generates)."""
    import safeanchor.generation as g

    calls = []
    real = g.generate_samples

    def spy(model, tokenizer, prompts, *args, **kwargs):
        calls.append(list(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(g, "generate_samples", spy)
    return calls
