"""forward over (B, T): shapes, chunking, padding, the manual loop, the loss, training memory and bad input."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from modeling_gptb import GPTBCache


def tokens(batch=2, steps=7, seed=0):
    return torch.randint(0, 60, (batch, steps), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps", [1, 2, 11])
def test_shapes_for_any_length(model, steps):
    out = model(tokens(3, steps))
    assert out.logits.shape == (3, steps, 61)
    assert out.past_hidden_states.shape == (3, 3, 32)
    assert isinstance(out.cache, GPTBCache) and out.cache.get_seq_length() == steps


@pytest.mark.parametrize("split", [1, 3, 6])
def test_chunked_calls_equal_one_call(model, split):
    x = tokens(2, 7)
    whole = model(x)
    first = model(x[:, :split])
    second = model(x[:, split:], past_hidden_states=first.past_hidden_states)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.past_hidden_states, whole.past_hidden_states, rtol=1e-5, atol=1e-5)


def test_cache_object_continues_like_the_state(model):
    x = tokens(2, 6)
    first = model(x[:, :4])
    via_cache = model(x[:, 4:], cache=first.cache)
    via_state = model(x[:, 4:], past_hidden_states=first.past_hidden_states)
    torch.testing.assert_close(via_cache.logits, via_state.logits)
    assert via_cache.cache.get_seq_length() == 6
    # the name before transformers 5.24 still works, as in GPT2LMHeadModel, and so does reading it back
    with pytest.warns(FutureWarning, match="past_key_values"):
        via_old_name = model(x[:, 4:], past_key_values=first.cache)
    torch.testing.assert_close(via_old_name.logits, via_state.logits)
    assert via_old_name.past_key_values is via_old_name.cache


def test_masked_steps_leave_the_state_unchanged(model):
    x = tokens(2, 5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 0, 1]])
    out = model(x, attention_mask=mask)
    alone_0 = model(x[0:1, :2])
    alone_1 = model(x[1:2, [1, 2, 4]])
    torch.testing.assert_close(out.past_hidden_states[0:1], alone_0.past_hidden_states, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.past_hidden_states[1:2], alone_1.past_hidden_states, rtol=1e-5, atol=1e-6)
    # generate() passes the whole mask; the model reads its last T columns
    longer = torch.cat([torch.zeros(2, 3, dtype=torch.long), mask], dim=1)
    torch.testing.assert_close(model(x, attention_mask=longer).past_hidden_states, out.past_hidden_states)


def test_inputs_embeds_equal_input_ids(model):
    x = tokens(2, 4)
    embeds = model.transformer.wte(x)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(x).logits)


def test_manual_loop_returns_logits_then_state():
    model = tiny_model(seed=1).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = tokens(2, 6)
    state = None
    for t in range(5):
        result = model(x[:, t : t + 1], past_hidden_states=state, return_dict=False)
        assert isinstance(result, tuple)
        logits, state = result[:2]
        assert logits.shape == (2, 1, 61) and state.shape == (2, 3, 32)
        loss = F.cross_entropy(logits[:, -1], x[:, t + 1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state = state.detach()
    # with labels, the loss comes first, as in GPT2LMHeadModel
    loss, logits, state = model(x, labels=x, return_dict=False)[:3]
    assert loss.ndim == 0 and logits.shape == (2, 6, 61) and state.shape == (2, 3, 32)


def test_loss_shifts_labels_and_ignores_minus_100(model):
    x = tokens(2, 6)
    labels = x.clone()
    labels[0, 3] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 61)
    expected = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_num_items_in_batch_sums_and_divides(model):
    x = tokens(2, 6)
    out = model(x, labels=x, num_items_in_batch=torch.tensor(40))
    summed = F.cross_entropy(out.logits[:, :-1].reshape(-1, 61), x[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss, summed / 40)


def test_output_hidden_states_per_layer(model):
    out = model(tokens(2, 4), output_hidden_states=True)
    assert len(out.hidden_states) == 3  # window input, block 1, block 2 (after ln_f)
    assert all(h.shape == (2, 4, 32) for h in out.hidden_states)
    last = model.transformer(tokens(2, 4)).last_hidden_state
    torch.testing.assert_close(out.hidden_states[-1], last)


def embedding_grads(model, steps=6):
    embeds = model.transformer.wte(tokens(1, steps)).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits[:, -1].sum().backward()
    return embeds.grad[0].abs().sum(-1)


def test_bptt_steps_detaches_every_k_steps():
    full = embedding_grads(tiny_model())
    truncated = embedding_grads(tiny_model(bptt_steps=2))
    assert (full > 0).all()
    # state detached before steps 2 and 4: the last logit sees only steps 4 and 5
    assert (truncated[:4] == 0).all() and (truncated[4:] > 0).all()


def grads(model, x):
    model.zero_grad()
    model(x, labels=x).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    x = tokens(2, 6)
    model = tiny_model(resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1).train()
    torch.manual_seed(7)
    plain = grads(model, x)
    model.activation_checkpointing_enable()
    assert model.transformer.gradient_checkpointing
    torch.manual_seed(7)
    checkpointed = grads(model, x)
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_step_gives_the_same_logits_and_gradients():
    # aot_eager traces the window through AOTAutograd like inductor does, without needing a C++ compiler
    x = tokens(2, 6)
    model = tiny_model().train()
    plain = grads(model, x)
    logits = model(x).logits
    model.transformer.compile_step(backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    compiled = grads(model, x)
    assert torch._dynamo.utils.counters["aot_autograd"]["ok"] >= 1  # the window really ran compiled
    torch.testing.assert_close(model(x).logits, logits, rtol=1e-5, atol=1e-6)
    assert plain.keys() == compiled.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(compiled[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.tensor([[1, 61]])), r"token id 61 is outside the vocabulary: ids must be in \[0, 61\)"),
        (dict(input_ids=torch.tensor([[-1, 2]])), r"token id -1 is outside the vocabulary"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long)), "empty"),
        (dict(input_ids=torch.tensor([1, 2])), r"shape \(batch_size, sequence_length\)"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), "integer token ids"),
        (dict(), "exactly one of `input_ids` or `inputs_embeds`"),
        (dict(input_ids=torch.tensor([[1]]), inputs_embeds=torch.zeros(1, 1, 32)), "exactly one"),
        (dict(inputs_embeds=torch.zeros(1, 2, 31)), r"\(batch_size, sequence_length, 32\)"),
        (
            dict(input_ids=torch.tensor([[1, 2]]), past_hidden_states=torch.zeros(1, 4, 32)),
            r"\(batch_size, state_size, n_embd\) = \(1, 3, 32\)",
        ),
        (
            dict(input_ids=torch.tensor([[1, 2]]), past_hidden_states=torch.zeros(1, 3, 32, dtype=torch.long)),
            "floating-point",
        ),
        (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 1)), r"length >= sequence_length = 2"),
        (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(2, 2)), "batch_size = 1"),
        (dict(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2, 3]])), "labels"),
    ],
)
def test_bad_input_is_a_clear_value_error(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(**kwargs)


def test_older_transformers_is_refused_with_the_fix():
    # before 5.24 generate() looks for the state under `past_key_values` and would silently start over every token
    code = (
        "import transformers; transformers.__version__ = '5.23.0'\n"
        "try:\n    import modeling_gptb.modeling_gptb\nexcept ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "GPTB needs transformers >= 5.24 (found 5.23.0)" in result.stdout
    assert "pip install -U 'transformers>=5.24,<6'" in result.stdout
