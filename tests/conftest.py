"""Shared test fixtures: tiny GPTB configs and models that run in milliseconds on a CPU."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from reference import ...` in the tests

from modeling_gptb import GPTBConfig, GPTBLMHeadModel  # noqa: E402

TINY = dict(
    vocab_size=61,
    n_embd=32,
    n_layer=2,
    n_head=4,
    state_size=3,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=60,
)


def tiny_config(**overrides) -> GPTBConfig:
    return GPTBConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> GPTBLMHeadModel:
    torch.manual_seed(seed)
    return GPTBLMHeadModel(tiny_config(**overrides)).eval()


@pytest.fixture
def model():
    return tiny_model()
