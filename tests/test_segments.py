"""Segment steps (`segment_length` K > 1, docs/design.md#segment-steps) against the float64 definition in
tests/reference.py: the mask, the window, partial segments, padding, the cache's partial segment, and that no token
sees the future."""

import pytest
import torch
from conftest import randomize, tiny_model
from reference import reference_sequence, segment_allowed

from modeling_gptb.recurrent_step import segment_mask
from modeling_gptb.state_update import STATE_UPDATES

V = 61


def segment_model(seed=0, **overrides):
    """A float64 tiny model with sharp weights (every state-update parameter random too, so each variant's write,
    gates and scales take part)."""
    return randomize(tiny_model(seed, **overrides), seed=seed).double()


def ids(batch, steps, seed=0):
    return torch.randint(0, 60, (batch, steps), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rebias", [True, False])
@pytest.mark.parametrize("M, K", [(1, 2), (3, 4), (2, 7)])
def test_the_mask_is_the_table_of_the_design_doc(M, K, rebias):
    torch.testing.assert_close(segment_mask(M, K, rebias), segment_allowed(M, K, K, rebias))


def test_the_mask_drawn_for_m2_k3():
    # the table in docs/design.md#segment-steps: R read slot, x token, W write slot; 1 = the row reads the column
    drawn = """
        1 1 0 0 0 0 0
        1 1 0 0 0 0 0
        1 1 1 0 0 0 0
        1 1 1 1 0 0 0
        1 1 1 1 1 0 0
        1 1 1 1 1 1 1
        1 1 1 1 1 1 1
    """
    table = torch.tensor([[int(c) for c in line.split()] for line in drawn.strip().splitlines()], dtype=torch.bool)
    assert torch.equal(segment_mask(2, 3, rebias=True), table)


@pytest.mark.parametrize("state_update", STATE_UPDATES)
@pytest.mark.parametrize("rebias", [True, False])
@pytest.mark.parametrize("M, K, T", [(3, 4, 11), (1, 2, 5), (2, 5, 5), (3, 6, 3)])
def test_segment_steps_match_definition_in_float64(M, K, T, rebias, state_update):
    model = segment_model(state_size=M, segment_length=K, rebias=rebias, state_update=state_update)
    x = ids(2, T, seed=T)
    out = model(x)
    ref_logits, ref_state = reference_sequence(model.state_dict(), model.config, x)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-10, atol=1e-10)
    # past_hidden_states: every token written, a last partial segment included
    torch.testing.assert_close(out.past_hidden_states, ref_state, rtol=1e-10, atol=1e-10)
    # the cache: the state after the complete segments, and the partial segment's tokens to complete later
    complete = T // K * K
    cache_state = model(x[:, :complete]).past_hidden_states if complete else model.transformer.initial_state(2)
    torch.testing.assert_close(out.cache.state, cache_state, rtol=1e-10, atol=1e-10)
    held = T - complete
    assert (out.cache.pending is None) == (held == 0) and out.cache.get_seq_length() == T
    if held:
        torch.testing.assert_close(out.cache.pending, model.transformer.wte(x[:, complete:]))


def test_float32_model_matches_definition():
    model = randomize(tiny_model(segment_length=4, state_update="selective"), seed=1)
    x = ids(3, 10, seed=1)
    out = model(x)
    ref_logits, ref_state = reference_sequence(model.state_dict(), model.config, x)
    torch.testing.assert_close(out.logits.double(), ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.past_hidden_states.double(), ref_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("state_update", STATE_UPDATES)
@pytest.mark.parametrize("rebias", [True, False])
@pytest.mark.parametrize("M, K, T", [(3, 4, 11), (1, 3, 7), (2, 8, 13)])
def test_no_token_sees_the_future(M, K, T, rebias, state_update):
    model = segment_model(state_size=M, segment_length=K, rebias=rebias, state_update=state_update)
    x = ids(2, T, seed=M + K)
    base = model(x).logits
    for j in range(T):
        changed = x.clone()
        changed[:, j] = (changed[:, j] + 1 + j) % 60
        logits = model(changed).logits
        assert torch.equal(logits[:, :j], base[:, :j]), f"a logit before position {j} moved when token {j} changed"
        assert not torch.allclose(logits[:, j], base[:, j]), f"token {j} does not reach its own logits"
        if j + K < T:  # through the state, token j reaches the next segment
            assert not torch.allclose(logits[:, j + K], base[:, j + K])


@pytest.mark.parametrize("state_update", ["replace", "selective"])
def test_padded_rows_equal_the_rows_alone(state_update):
    # segments start at each row's first unmasked token, masked tokens are taken out: a row computes what it
    # computes alone, whatever its padding
    model = segment_model(segment_length=3, state_update=state_update)
    x = ids(4, 9, seed=5)
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1, 1, 1, 1],  # left padding
            [1, 1, 1, 1, 1, 1, 1, 0, 0],  # right padding
            [1, 0, 1, 1, 0, 1, 1, 1, 0],  # holes
            [1, 1, 1, 1, 1, 1, 1, 1, 1],
        ]
    )
    out = model(x, attention_mask=mask)
    ref_logits, ref_state = reference_sequence(model.state_dict(), model.config, x, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(out.logits[keep], ref_logits[keep], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.past_hidden_states, ref_state, rtol=1e-10, atol=1e-10)
    for row in range(4):
        alone = model(x[row : row + 1, keep[row]])
        torch.testing.assert_close(out.logits[row, keep[row]], alone.logits[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.past_hidden_states[row], alone.past_hidden_states[0], rtol=1e-10, atol=1e-10)
    # a masked position has no output of its own
    assert (out.logits[~keep] == 0).all()
    # an all-ones mask (a tokenizer's) keeps the rows aligned: the cache needs no mask, so decoding stays fast
    assert model(x, attention_mask=torch.ones_like(x)).cache.pending_mask is None
    assert model(x, attention_mask=mask).cache.pending_mask is not None


@pytest.mark.parametrize("splits", [[1], [2, 3], [4], [5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
def test_calls_continued_from_the_cache_equal_one_call(splits):
    model = segment_model(segment_length=4, state_update="addressed")
    x = ids(2, 10, seed=6)
    whole = model(x)
    logits, cache = [], None
    for start, end in zip([0, *splits], [*splits, 10], strict=True):
        out = model(x[:, start:end], cache=cache)
        logits.append(out.logits)
        cache = out.cache
    torch.testing.assert_close(torch.cat(logits, dim=1), whole.logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.past_hidden_states, whole.past_hidden_states, rtol=1e-10, atol=1e-10)
    assert cache.get_seq_length() == 10


def test_padded_calls_continued_from_the_cache_equal_one_call():
    # rows with different numbers of pending tokens (left padding), continued token by token
    model = segment_model(segment_length=3)
    x = ids(3, 8, seed=7)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1, 1, 1]])
    whole = model(x, attention_mask=mask)
    first = model(x[:, :4], attention_mask=mask[:, :4])
    logits, cache = [first.logits], first.cache
    for t in range(4, 8):
        out = model(x[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
        logits.append(out.logits)
        cache = out.cache
    keep = mask.bool()
    torch.testing.assert_close(torch.cat(logits, dim=1)[keep], whole.logits[keep], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.past_hidden_states, whole.past_hidden_states, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cache.state, whole.cache.state, rtol=1e-10, atol=1e-10)


def test_past_hidden_states_starts_a_new_segment():
    # the state returned has the partial segment written: continuing from it puts a segment boundary at the call
    model = segment_model(segment_length=4)
    x = ids(1, 10, seed=8)
    first = model(x[:, :6])
    second = model(x[:, 6:], past_hidden_states=first.past_hidden_states)
    params, config = model.state_dict(), model.config
    _, state = reference_sequence(params, config, x[:, :6])
    ref_logits, ref_state = reference_sequence(params, config, x[:, 6:], state=state)
    torch.testing.assert_close(second.logits, ref_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(second.past_hidden_states, ref_state, rtol=1e-10, atol=1e-10)
    # at a multiple of K it is the same as one call
    first = model(x[:, :8])
    second = model(x[:, 8:], past_hidden_states=first.past_hidden_states)
    torch.testing.assert_close(second.logits, model(x).logits[:, 8:], rtol=1e-10, atol=1e-10)


def test_write_partial_segment_false_returns_the_state_after_the_complete_segments():
    model = segment_model(segment_length=4)
    x = ids(2, 10, seed=9)
    written = model(x)
    unwritten = model(x, write_partial_segment=False)
    torch.testing.assert_close(unwritten.logits, written.logits, rtol=0, atol=0)
    torch.testing.assert_close(unwritten.past_hidden_states, written.cache.state, rtol=0, atol=0)
    assert not torch.allclose(unwritten.past_hidden_states, written.past_hidden_states)
    # and in the one-token decode path, which otherwise writes the partial segment too
    step = model(x[:, 9:], cache=model(x[:, :9]).cache)
    torch.testing.assert_close(step.past_hidden_states, written.past_hidden_states, rtol=1e-10, atol=1e-10)
    step = model(x[:, 9:], cache=model(x[:, :9]).cache, write_partial_segment=False)
    torch.testing.assert_close(step.past_hidden_states, written.cache.state, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"`write_partial_segment` must be True or False, got 'no'"):
        model(x, write_partial_segment="no")
