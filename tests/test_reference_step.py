"""GPTB's forward equals docs/design.md#the-step computed from the definition (tests/reference.py), in float64."""

import pytest
import torch
from conftest import randomize, tiny_model
from reference import initial_state, reference_sequence, reference_step


@pytest.mark.parametrize("rebias", [True, False])
@pytest.mark.parametrize("state_size", [1, 4])
def test_one_step_matches_definition_in_float64(rebias, state_size):
    model = randomize(tiny_model(rebias=rebias, state_size=state_size)).double()
    tokens = torch.tensor([[3], [17], [60]])
    out = model(tokens)
    ref_logits, ref_state = reference_step(model.state_dict(), model.config, None, tokens[:, 0])
    torch.testing.assert_close(out.logits[:, 0], ref_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.past_hidden_states, ref_state, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rebias", [True, False])
def test_sequence_matches_definition_float32_model(rebias):
    model = randomize(tiny_model(rebias=rebias), seed=1)
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model(tokens)
    ref_logits, ref_state = reference_sequence(model.state_dict(), model.config, tokens)
    torch.testing.assert_close(out.logits.double(), ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.past_hidden_states.double(), ref_state, rtol=1e-4, atol=1e-4)


def test_given_state_and_mask_match_definition():
    model = randomize(tiny_model(), seed=2).double()
    tokens = torch.randint(0, 61, (3, 6), generator=torch.Generator().manual_seed(2))
    start = torch.randn(3, 3, 32, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 1]])
    out = model(tokens, past_hidden_states=start, attention_mask=mask)
    ref_logits, ref_state = reference_sequence(model.state_dict(), model.config, tokens, start, mask)
    keep = mask.bool()  # logits at masked steps are not specified
    torch.testing.assert_close(out.logits[keep], ref_logits[keep], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.past_hidden_states, ref_state, rtol=1e-10, atol=1e-10)


def test_rebias_lets_the_state_read_the_token_and_causal_does_not():
    for rebias, state_depends_on_token in ((True, True), (False, False)):
        model = randomize(tiny_model(rebias=rebias), seed=3).double()
        a = model(torch.tensor([[5]])).past_hidden_states
        b = model(torch.tensor([[9]])).past_hidden_states
        assert (not torch.allclose(a, b)) == state_depends_on_token


def test_initial_state_is_the_learned_parameter():
    model = randomize(tiny_model(), seed=4)
    assert model.transformer.initial_embeds.shape == (3, 32)
    params = model.state_dict()
    assert "transformer.initial_embeds" in params
    expected = initial_state(params, model.config, 2)
    torch.testing.assert_close(model.transformer.initial_state(2).double(), expected)


def test_gpt2_parameter_names_and_conv1d_layout():
    model = tiny_model()
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    D, V = 32, 61
    assert shapes["transformer.wte.weight"] == (V, D)
    assert shapes["transformer.wpe.weight"] == (1024, D)
    for layer in range(2):
        prefix = f"transformer.h.{layer}."
        assert shapes[prefix + "attn.c_attn.weight"] == (D, 3 * D)  # Conv1D: (in, out)
        assert shapes[prefix + "attn.c_proj.weight"] == (D, D)
        assert shapes[prefix + "mlp.c_fc.weight"] == (D, 4 * D)
        assert shapes[prefix + "mlp.c_proj.weight"] == (4 * D, D)
        for norm in ("ln_1", "ln_2"):
            assert shapes[prefix + norm + ".weight"] == (D,)
    assert shapes["transformer.ln_f.weight"] == (D,)
    assert shapes["lm_head.weight"] == (V, D)
