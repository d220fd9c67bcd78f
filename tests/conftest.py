import pytest
import torch

from safeanchor.data.chat import collate, encode
from safeanchor.models import tiny_model, tiny_tokenizer


@pytest.fixture
def tiny():
    return tiny_model(seed=0), tiny_tokenizer()


def make_batch(tok, pairs, max_length=64):
    return collate([encode(tok, p, r, max_length) for p, r in pairs], tok.pad_token_id)


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
