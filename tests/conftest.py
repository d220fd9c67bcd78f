import pytest
import torch

from safeanchor.data.chat import collate, encode
from safeanchor.models import tiny_model, tiny_tokenizer


@pytest.fixture
def tiny():
    return tiny_model(seed=0), tiny_tokenizer()


def make_batch(tok, pairs, max_length=64):
    return collate([encode(tok, p, r, max_length) for p, r in pairs], tok.pad_token_id)
