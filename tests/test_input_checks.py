"""Every forward/generate input is checked before any work (issue 11 items 8 and 10, issue 12 items 6 and 7): a bad
value is a ValueError naming it and what is expected, and the ART memory is left exactly as it was."""

import pytest
import torch
from conftest import tiny_model
from transformers import DynamicCache

from modeling_gptb import GPTBCache
from modeling_gptb.art_memory import ARTMemory


def tokens(batch=2, steps=5, seed=0):
    return torch.randint(0, 60, (batch, steps), generator=torch.Generator().manual_seed(seed))


def learning_model(**overrides):
    """A model whose ART memory learns from every call (training mode), as in a training run."""
    return tiny_model(art_enabled=True, **overrides).train()


def memory_state(model):
    return {name: tensor.clone() for name, tensor in model.art_memory.state_dict().items()}


def assert_memory_is(model, before):
    after = model.art_memory.state_dict()
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), f"the ART memory changed: {name}"


ids = tokens()
nan_state = torch.zeros(2, 3, 32)
nan_state[1, 2, 5] = float("nan")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        # issue 11 item 8: the loss failed only after the memory had learned
        (dict(labels=torch.full_like(ids, 999)), r"`labels` value 999 is outside the vocabulary: .*\[0, 61\) or -100"),
        (dict(labels=torch.full_like(ids, -5)), r"`labels` value -5 is outside the vocabulary"),
        (dict(labels=ids, logits_to_keep=1), r"`labels` need the logits of every step: leave `logits_to_keep` at 0"),
        (dict(labels=ids.float()), r"`labels` must be a torch.long .*got dtype torch.float32"),
        (dict(labels=ids.int()), r"`labels` must be a torch.long tensor of token ids, got dtype torch.int32"),
        # issue 11 item 10: unchecked values
        (dict(past_hidden_states=nan_state), r"`past_hidden_states` holds NaN or Inf"),
        (dict(past_hidden_states=torch.full((2, 3, 32), float("inf"))), r"`past_hidden_states` holds NaN or Inf"),
        # issue 21 item 4: finite in float64, infinite in the model's float32
        (
            dict(past_hidden_states=torch.full((2, 3, 32), 1e300, dtype=torch.float64)),
            r"`past_hidden_states` holds NaN or Inf, or values beyond the model's dtype torch.float32",
        ),
        (dict(attention_mask=torch.tensor([[1, 1, -1, 1, 1], [1] * 5])), r"only 0 \(skip\) and 1 \(read\), got -1"),
        (dict(attention_mask=torch.full((2, 5), 2.0)), r"`attention_mask` must hold only 0 .* got 2.0"),
        (dict(logits_to_keep=-2), r"`logits_to_keep` must be an int >= 0 .*got -2"),
        (dict(logits_to_keep=1.5), r"`logits_to_keep` must be an int >= 0"),
        (dict(logits_to_keep=torch.tensor([0, 1])), r"`logits_to_keep` must be an int >= 0"),
        (dict(input_ids=ids.to(torch.uint8)), r"`input_ids` must hold integer token ids .*got dtype torch.uint8"),
        (dict(input_ids=None, inputs_embeds=torch.zeros(2, 5, 32, dtype=torch.float64)), r"model's dtype"),
        (dict(input_ids=None, inputs_embeds=torch.full((2, 5, 32), float("nan"))), r"`inputs_embeds` holds NaN"),
        (dict(cache="abc"), r"`cache` must be a GPTBCache .* got str"),
        (dict(token_type_ids=torch.full_like(ids, 61)), r"`token_type_ids` value 61 is outside the vocabulary"),
        (dict(token_type_ids=ids[:, :2]), r"`token_type_ids` must have the shape of the inputs \(2, 5\)"),
        (dict(art_mode="learn"), r"art_mode must be 'update', 'classify' or 'off'"),
        # issue 12 item 6: GPT-2 arguments GPTB cannot honour are refused, never ignored
        (dict(position_ids=torch.arange(5)[None]), r"does not take `position_ids`: GPTB has no token positions"),
        (dict(encoder_hidden_states=torch.zeros(2, 4, 32)), r"`encoder_hidden_states`: GPTB has no cross-attention"),
        (dict(encoder_attention_mask=torch.ones(2, 4)), r"`encoder_attention_mask`: GPTB has no cross-attention"),
        (dict(output_router_logits=True), r"unexpected argument\(s\) 'output_router_logits'"),
        (dict(temperature=0.7), r"unexpected argument\(s\) 'temperature'"),
    ],
)
def test_bad_input_raises_before_the_memory_learns(kwargs, message):
    model = learning_model()
    before = memory_state(model)
    with pytest.raises(ValueError, match=message):
        model(**{"input_ids": ids, **kwargs})
    assert_memory_is(model, before)
    assert model.art_memory.num_categories == 0


def test_an_error_after_the_memory_update_undoes_it():
    # a failure injected after the ART update (as an out-of-memory error in the head would be)
    model = learning_model()
    model(tokens(seed=1), labels=tokens(seed=1))
    before = memory_state(model)
    assert model.art_memory.num_categories > 0

    def out_of_memory(module, args, output):
        raise RuntimeError("injected: out of memory in lm_head")

    hook = model.lm_head.register_forward_hook(out_of_memory)
    with pytest.raises(RuntimeError, match="injected"):
        model(tokens(seed=2), labels=tokens(seed=2))
    assert_memory_is(model, before)
    hook.remove()
    model(tokens(seed=2), labels=tokens(seed=2))  # the same call, now complete, does learn
    assert model.art_memory.counts.sum() > before["category_counts"].sum()


@pytest.mark.parametrize("pooling", ["mean", "state", "last"])
def test_all_padding_rows_are_skipped_by_the_memory(pooling):
    model = learning_model(art_pooling=pooling)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
    for seed in range(3):
        out = model(tokens(3, 5, seed=seed), attention_mask=mask, labels=tokens(3, 5, seed=seed))
        assert out.art_category[1] == -1 and out.art_status[1] == -1 and out.art_novelty[1].isnan()
        assert (out.art_category[[0, 2]] >= 0).all()
    assert int(model.art_memory.counts.sum()) == 3 * 2  # two real sequences per call, the padding row never
    assert (model.art_memory.prototypes.abs().sum(dim=-1) > 0).all(), "an all-zero category was created"
    # a batch of padding only teaches nothing
    before = memory_state(model)
    model(tokens(2, 5), attention_mask=torch.zeros(2, 5, dtype=torch.long))
    assert_memory_is(model, before)


def test_valid_edge_values_still_work():
    model = learning_model()
    out = model(ids, labels=torch.where(ids % 2 == 0, -100, ids), attention_mask=torch.ones(2, 5, dtype=torch.bool))
    assert out.loss.isfinite()
    assert model(ids, labels=ids, logits_to_keep=5).logits.shape == (2, 5, 61)  # keeping every step is fine
    assert model(ids.int(), logits_to_keep=2).logits.shape == (2, 2, 61)
    assert model(ids, cache=DynamicCache()).cache.get_seq_length() == 5  # generate()'s empty default cache
    assert model(ids, attention_mask=torch.ones(2, 5)).logits.shape == (2, 5, 61)  # float 0/1 masks


def test_max_categories_cannot_outgrow_the_buffer():
    memory = ARTMemory(4, max_categories=2)
    memory.update(torch.randn(1, 4))
    before = {name: tensor.clone() for name, tensor in memory.state_dict().items()}
    with pytest.raises(ValueError, match=r"size of the prototype buffer \(2 rows\) and cannot be set to 10"):
        memory.max_categories = 10
    assert memory.max_categories == 2
    with pytest.warns(UserWarning, match=r"ARTMemory is full \(2 categories\)"):
        out = memory.update(torch.eye(4))  # fills up and rejects, never writes past the buffer
    assert memory.num_categories == 2 and (out.category[-2:] == -1).all()
    assert not torch.equal(memory.weight, before["weight"])
    memory.max_categories = 2  # setting the same capacity is harmless


def test_output_attentions_returns_each_layers_window_attention_per_step():
    model = tiny_model()
    plain = model(ids)
    out = model(ids, output_attentions=True)
    assert len(out.attentions) == 2  # one per block
    for weights in out.attentions:
        assert weights.shape == (2, 4, 5, 4, 4)  # (batch, heads, steps, M + 1, M + 1)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5, 4))
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-6)  # the same attention, written out
    assert model(ids).attentions is None
    # GPT-2's tuple order: logits, state, hidden states, attentions
    as_tuple = model(ids, output_hidden_states=True, output_attentions=True, return_dict=False)
    assert len(as_tuple) == 4 and len(as_tuple[3]) == 2
    # the causal control model (rebias=False) cannot attend ahead in the window
    causal = tiny_model(rebias=False)(ids, output_attentions=True).attentions[0]
    assert (causal.triu(diagonal=1) == 0).all()


def test_output_attentions_in_generate(one_thread):
    model = tiny_model()
    out = model.generate(ids, max_new_tokens=3, do_sample=False, output_attentions=True, return_dict_in_generate=True)
    assert len(out.attentions) == 3  # one entry per generated token
    assert out.attentions[0][0].shape == (2, 4, 5, 4, 4)  # the prompt's steps
    assert out.attentions[1][0].shape == (2, 4, 1, 4, 4)  # then one step per token


def test_generate_refuses_gpt2_arguments_without_meaning(one_thread):
    model = tiny_model()
    with pytest.raises(ValueError, match="does not take `position_ids`"):
        model.generate(ids, position_ids=torch.arange(5).expand(2, -1), max_new_tokens=2)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model.generate(ids, encoder_hidden_states=torch.zeros(2, 4, 32), max_new_tokens=2)


def test_token_type_ids_add_their_embedding_as_in_gpt2(one_thread):
    model = tiny_model()
    types = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    embeds = model.transformer.wte(ids) + model.transformer.wte(types)
    out = model(ids, token_type_ids=types)
    torch.testing.assert_close(out.logits, model(inputs_embeds=embeds).logits)
    assert not torch.allclose(out.logits, model(ids).logits)
    # generate() extends them with the last column, one new token at a time
    generated = model.generate(ids, token_type_ids=types, max_new_tokens=2, do_sample=False)
    state = model(ids, token_type_ids=types).cache
    first = model(generated[:, 5:6], token_type_ids=types[:, -1:], cache=state)
    assert torch.equal(first.logits[:, -1].argmax(-1), generated[:, 6])


def test_the_model_body_refuses_what_it_cannot_honour():
    body = tiny_model().transformer
    with pytest.raises(ValueError, match="does not take `position_ids`"):
        body(ids, position_ids=torch.arange(5)[None])
    with pytest.raises(ValueError, match=r"`cache` must be a GPTBCache .* got int"):
        body(ids, cache=3)
    state = body(ids).past_hidden_states
    with pytest.raises(ValueError, match="not both"):
        body(ids, past_hidden_states=state, cache=GPTBCache(state, 5))


def graph_count(model, *args, **kwargs):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(*args, **kwargs)
    return explanation.graph_count, explanation.graph_break_count


def test_the_compiled_forward_is_one_graph_and_still_checks_ids():
    # the id range check used to read the ids on the host (int(input_ids.min())), which breaks the graph
    model = tiny_model()
    assert graph_count(model, ids) == (1, 0)
    assert graph_count(model, ids, attention_mask=torch.ones(2, 5, dtype=torch.long)) == (1, 0)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits)
    with pytest.raises((RuntimeError, ValueError), match=r"`input_ids` holds values outside \[0, 61\)"):
        compiled(torch.tensor([[1, 70]]))
    torch._dynamo.reset()


@pytest.mark.parametrize("seq_length", [-5, 2.5, True, None])
def test_a_cache_with_a_negative_or_non_integer_length_is_refused(seq_length):  # issue 21 item 12
    with pytest.raises(ValueError, match=r"GPTBCache seq_length must be an int >= 0 .* got "):
        GPTBCache(torch.zeros(2, 3, 32), seq_length)
