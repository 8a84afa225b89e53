"""`GPTBConfig.state_update` (issue 13 item 2): the seed's `"replace"` and the gated, residual, selective and
addressed steps.

Each variant is checked against its definition written in float64 in tests/reference.py; at its default initialisation
it must be exactly the seed's step, also after a GPT-2 warm start; it must save, load, generate, pad and train like the
rest.
"""

import pytest
import torch
from conftest import randomize, tiny_model
from reference import reference_sequence, reference_step
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from modeling_gptb import GPTBConfig, GPTBLMHeadModel

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = {  # the parameters each variant adds, under transformer.state_update
    "gated": {"read_scale", "retain", "gate.weight", "gate.bias"},
    "residual": {"read_scale", "retain", "write.weight", "write.bias"},
    "selective": {"read_scale", "retain", "write.weight", "write.bias", "gate.weight", "gate.bias"},
    "addressed": {"read_scale", "retain", "write.weight", "write.bias", "gate.weight", "gate.bias"},
}
KEYS = {variant: {f"transformer.state_update.{name}" for name in names} for variant, names in KEYS.items()}
VARIANTS = tuple(KEYS)
# Every parameter's value at the defaults (state_read_scale_init 1, state_retain_init 0, state_gate_bias 2).
DEFAULT_INIT = {
    "read_scale": 1.0,
    "retain": 0.0,
    "gate.weight": 0.0,
    "gate.bias": 2.0,
    "write.weight": 0.0,
    "write.bias": 0.0,
}


def variant_model(variant, seed=0, **overrides):
    """A float64 tiny model of `variant` with every weight (the state update's too) random and large."""
    return randomize(tiny_model(seed, state_update=variant, **overrides), seed=seed).double()


def tokens(batch=3, length=7, seed=0):
    return torch.randint(1, 59, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_matches_definition_in_float64(variant):
    model = variant_model(variant)
    start = torch.randn(3, 3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = model(tokens(length=1), past_hidden_states=start)
    ref_logits, ref_state = reference_step(model.state_dict(), model.config, start, tokens(length=1)[:, 0])
    torch.testing.assert_close(out.logits[:, 0], ref_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.past_hidden_states, ref_state, rtol=1e-10, atol=1e-10)
    # every term really counts: no parameter of the update is zero anywhere
    assert all(param.abs().min() > 0 for param in model.transformer.state_update.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_sequence_with_padding_matches_definition(variant):
    model = variant_model(variant, seed=2)
    ids = tokens(seed=2, length=6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 1]])
    out = model(ids, attention_mask=mask)
    ref_logits, ref_state = reference_sequence(model.state_dict(), model.config, ids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(out.logits[keep], ref_logits[keep], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.past_hidden_states, ref_state, rtol=1e-10, atol=1e-10)


def test_replace_is_the_default_and_adds_no_parameters():
    replace, default = tiny_model(state_update="replace"), tiny_model()
    assert default.config.state_update == "replace" and set(default.state_dict()) == set(replace.state_dict())
    assert not any("state_update" in name for name in default.state_dict())
    for variant, keys in KEYS.items():
        assert set(tiny_model(state_update=variant).state_dict()) - set(default.state_dict()) == keys


@pytest.mark.parametrize("variant", VARIANTS)
def test_at_initialisation_is_exactly_the_seeds_step(variant):
    seed_model = tiny_model(seed=3)
    model = tiny_model(seed=3, state_update=variant)
    missing, unexpected = model.load_state_dict(seed_model.state_dict(), strict=False)
    assert set(missing) == KEYS[variant] and not unexpected
    ids = tokens(seed=3, length=9)
    a, b = seed_model(ids), model(ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.past_hidden_states, b.past_hidden_states)
    assert all(
        torch.all(param == DEFAULT_INIT[name]) for name, param in model.transformer.state_update.named_parameters()
    )


def test_retain_init_one_starts_as_a_retain_gate():
    model = tiny_model(state_update="gated", state_retain_init=1.0, state_gate_bias=4.0)
    start = torch.randn(3, 3, 32, generator=torch.Generator().manual_seed(4))
    out = model(tokens(length=1), past_hidden_states=start)
    seed_model = tiny_model()
    seed_model.load_state_dict(model.state_dict(), strict=False)
    window_output = seed_model(tokens(length=1), past_hidden_states=start).past_hidden_states
    keep = torch.sigmoid(torch.tensor(4.0))
    torch.testing.assert_close(out.past_hidden_states, keep * start + (1 - keep) * window_output)


def test_read_scale_init_scales_the_state_the_window_reads():
    model = tiny_model(state_update="gated", state_read_scale_init=0.02)
    start = torch.randn(3, 3, 32, generator=torch.Generator().manual_seed(9))
    seed_model = tiny_model()
    seed_model.load_state_dict(model.state_dict(), strict=False)
    ids = tokens(length=1)
    expected = seed_model(ids, past_hidden_states=0.02 * start)  # retain 0: the next state is the window's output
    out = model(ids, past_hidden_states=start)
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.past_hidden_states, expected.past_hidden_states)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpt2_warm_start_runs_as_the_seed(variant, tmp_path):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    gpt2.save_pretrained(tmp_path / "gpt2")
    seed_model = GPTBLMHeadModel.from_pretrained(tmp_path / "gpt2", state_size=3).eval()
    model, info = GPTBLMHeadModel.from_pretrained(
        tmp_path / "gpt2", state_size=3, state_update=variant, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"transformer.initial_embeds", *KEYS[variant]}
    model.transformer.initial_embeds.data.copy_(seed_model.transformer.initial_embeds)
    ids = tokens(seed=5)
    assert torch.equal(seed_model(ids).logits, model.eval()(ids).logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_and_load_round_trip(variant, tmp_path):
    model = variant_model(variant, seed=6).float()
    model.save_pretrained(tmp_path / variant)
    loaded = GPTBLMHeadModel.from_pretrained(tmp_path / variant).eval()
    assert loaded.config.state_update == variant
    assert all(torch.equal(loaded.state_dict()[k], model.state_dict()[k]) for k in KEYS[variant])
    ids = tokens(seed=6)
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_with_cache_equals_recompute_and_left_padding(variant):
    model = variant_model(variant, seed=7, eos_token_id=None)
    prompt = tokens(batch=2, length=4, seed=7)
    kwargs = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))
    padded = torch.cat([torch.full((1, 2), 60), prompt[1:, :2]], dim=1)
    batch = torch.cat([prompt[:1], padded])
    mask = (batch != 60).long()
    batched = model.generate(batch, attention_mask=mask, pad_token_id=60, **kwargs)
    alone = model.generate(prompt[1:, :2], **kwargs)
    assert torch.equal(batched[1, 4:], alone[0, 2:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_trains_with_trainer(variant, tmp_path):
    # a = 1: the gates' weights get a gradient from the first steps (at a = 0 the gated variant's W has none until
    # a grows, and at a zero write the selective gate has none)
    model = tiny_model(state_update=variant, state_retain_init=1.0).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if k in KEYS[variant]}
    data = [{"input_ids": ids, "labels": ids} for ids in tokens(batch=8, length=6, seed=8)]
    args = TrainingArguments(
        tmp_path / "out", max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in KEYS[variant])  # gradients reach every new parameter


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("state_update", "gru", "must be one of ('replace', 'gated', 'residual', 'selective', 'addressed')"),
        ("state_gate_bias", float("nan"), "state_gate_bias must be a finite number"),
        ("state_retain_init", "1", "state_retain_init must be a finite number"),
        ("state_read_scale_init", float("inf"), "state_read_scale_init must be a finite number"),
    ],
)
def test_bad_state_update_fields_are_refused(field, value, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        GPTBConfig(**{field: value})


# -- state_update="residual" and "selective" ------------------------------------------------------------------------


def test_residual_retain_one_keeps_the_state_until_the_write_learns():
    model = tiny_model(state_update="residual", state_retain_init=1.0, state_read_scale_init=0.5)
    start = torch.randn(3, 3, 32, generator=torch.Generator().manual_seed(15))
    out = model(tokens(length=4), past_hidden_states=start)
    torch.testing.assert_close(out.past_hidden_states, start)  # a = 1, W_w = 0: S' = S
    assert torch.equal(model.transformer.state_update.read_scale, torch.full((32,), 0.5))


def test_selective_gate_closed_by_its_bias_keeps_the_state_for_any_token():
    model = tiny_model(state_update="selective", state_gate_bias=-30.0, state_retain_init=1.0)
    update = model.transformer.state_update
    assert torch.equal(update.gate.bias, torch.full((3,), -30.0)) and torch.equal(update.retain, torch.ones(32))
    generator = torch.Generator().manual_seed(17)
    with torch.no_grad():  # a large write, and a gate that reads the token
        for param in (update.write.weight, update.write.bias, update.gate.weight):
            param.copy_(torch.randn(param.shape, generator=generator))
    every_token = torch.arange(61)[:, None]
    start = torch.randn(61, 3, 32, generator=generator)
    # z = sigmoid(-30 + x W_g) < 1e-12: S' = S up to rounding, whatever the token
    torch.testing.assert_close(model(every_token, past_hidden_states=start).past_hidden_states, start)
    with torch.no_grad():
        update.gate.bias.fill_(30.0)  # open: S' = S + write
    opened = model(every_token, past_hidden_states=start).past_hidden_states
    _, expected = reference_step(model.state_dict(), model.config, start, every_token[:, 0])
    torch.testing.assert_close(opened, expected.float())
    assert (opened - start).abs().amax(dim=(1, 2)).min() > 1  # every token writes
