"""GPTBConfig: GPT-2's names, GPTB's fields, round trips and clear errors for invalid values."""

import pytest
from transformers import AutoConfig, GPT2Config

from modeling_gptb import GPTBConfig


def test_defaults_and_gpt2_names():
    config = GPTBConfig()
    assert config.model_type == "gptb"
    assert (config.n_embd, config.n_layer, config.n_head, config.vocab_size) == (768, 12, 12, 50257)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.state_size == 32 and config.rebias is True and config.bptt_steps is None
    assert config.use_cache is True and config.tie_word_embeddings is True
    assert config.activation_function == "gelu_new" and config.art_enabled is False
    assert config.segment_length == 1 and config.window_size == config.state_size + 1


def test_save_load_round_trip(tmp_path):
    config = GPTBConfig(n_embd=64, n_head=4, state_size=5, rebias=False, bptt_steps=16, art_enabled=True)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GPTBConfig)
    drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert drop(loaded.to_dict()) == drop(config.to_dict())


def test_from_gpt2_config_converts_and_overrides():
    gpt2 = GPT2Config(n_embd=48, n_layer=3, n_head=6, n_positions=128, vocab_size=100)
    config = GPTBConfig.from_gpt2_config(gpt2, state_size=7)
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions) == (48, 3, 6, 128)
    assert config.vocab_size == 100 and config.state_size == 7 and config.model_type == "gptb"
    assert not hasattr(config, "summary_type")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=30, n_head=4), r"n_embd \(30\) must be divisible by n_head \(4\)"),
        (dict(state_size=0), r"state_size must be an integer >= 1, got 0"),
        (dict(state_size=1.5), r"state_size must be an integer >= 1"),
        (dict(n_layer=0), r"n_layer must be an integer >= 1"),
        (dict(vocab_size=-3), r"vocab_size must be an integer >= 1"),
        (dict(bptt_steps=0), r"bptt_steps must be an integer >= 1"),
        (dict(resid_pdrop=1.5), r"resid_pdrop must be a number in \[0, 1\], got 1.5"),
        (dict(attn_pdrop=-0.1), r"attn_pdrop must be a number in \[0, 1\]"),
        (dict(embd_pdrop="x"), r"embd_pdrop must be a number in \[0, 1\]"),
        (dict(n_positions=4, state_size=4), r"n_positions \(4\) must be >= state_size \+ 1 \(5\)"),
        (dict(segment_length=0), r"segment_length must be an integer >= 1, got 0"),
        (dict(segment_length=2.0), r"segment_length must be an integer >= 1, got 2.0"),
        (dict(segment_length=True), r"segment_length must be an integer >= 1, got True"),
        (
            dict(n_positions=20, state_size=4, segment_length=13),
            r"n_positions \(20\) must be >= 2 \* state_size \+ segment_length \(21\)",
        ),
        (dict(art_vigilance=2.0), r"art_vigilance must be a number in \[0, 1\]"),
        (dict(art_beta=-1.0), r"art_beta must be a number in \[0, 1\]"),
        (dict(art_rule="hebbian"), r"art_rule must be one of \('cosine', 'fuzzy'\)"),
        (dict(art_pooling="max"), r"art_pooling must be one of \('mean', 'state', 'last', 'mean_std_max'\)"),
        (dict(art_alpha=0.0), r"art_alpha must be > 0"),
        (dict(art_max_categories=0), r"art_max_categories must be an integer >= 1"),
        (dict(art_loss_weight=-1.0), r"art_loss_weight must be >= 0"),
        (dict(layer_norm_epsilon=0.0), r"layer_norm_epsilon must be > 0"),
        (dict(rebias="yes"), r"rebias must be True or False"),
        (dict(initializer_range=float("inf")), r"initializer_range must be >= 0 and finite, got inf"),
        (dict(initializer_range=float("nan")), r"initializer_range must be >= 0 and finite, got nan"),
        (dict(layer_norm_epsilon=float("inf")), r"layer_norm_epsilon must be > 0 and finite"),
        (dict(art_loss_weight=float("inf")), r"art_loss_weight must be >= 0 and finite"),
        (dict(activation_function="nope"), r"activation_function must be one of .*gelu_new.*, got 'nope'"),
        (dict(art_learn_in_eval="no"), r"art_learn_in_eval must be True or False, got 'no'"),
        (dict(art_enabled="no"), r"art_enabled must be True or False, got 'no'"),
        (dict(use_cache=1), r"use_cache must be True or False, got 1"),
    ],
)
def test_invalid_values_name_the_field_and_the_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTBConfig(**kwargs)


def test_model_rechecks_values_set_after_construction():
    from modeling_gptb import GPTBModel

    config = GPTBConfig(n_embd=32, n_layer=1, n_head=4, vocab_size=10, bos_token_id=0, eos_token_id=0)
    config.state_size = 0  # e.g. a kwarg applied by from_pretrained after __init__
    with pytest.raises(ValueError, match="state_size"):
        GPTBModel(config)
