"""Segment steps (`segment_length` K > 1) in training and the model's other paths: truncated BPTT and activation
checkpointing counted in segments, hidden states and attentions, torch.compile, the CUDA-graph decode switch."""

import math

import pytest
import torch
from conftest import randomize, tiny_model
from test_checkpointing import assert_same, checkpointing, loss_and_grads, model_for
from test_cuda_graphs import ReplayByCalling, fresh_capture_log, generate_both, graph_model  # noqa: F401 (autouse)

from modeling_gptb.recurrent_step import segment_mask
from modeling_gptb.state_update import STATE_UPDATES

pytestmark = pytest.mark.usefixtures("one_thread")

K, STEPS = 3, 11  # four segments, the last one partial
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 11, [1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0]])


def ids(batch=3, steps=STEPS, seed=0):
    return torch.randint(1, 59, (batch, steps), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mask", [None, MASK], ids=["plain", "padded"])
@pytest.mark.parametrize("state_update", STATE_UPDATES)
@pytest.mark.parametrize("every", [None, 1, 2, 5])
def test_checkpointing_per_segment_gives_the_plain_gradients(every, state_update, mask):
    model = model_for(state_update, segment_length=K, bptt_steps=2)
    plain = loss_and_grads(model, ids(), mask)
    checkpointing(model, every)
    assert_same(loss_and_grads(model, ids(), mask), plain)
    assert model.spans_run == math.ceil(math.ceil(STEPS / K) / (every or 1))  # spans of segments, not of tokens


def test_recomputed_segments_draw_the_forwards_dropout_masks():
    model = model_for("selective", segment_length=K, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    plain = loss_and_grads(model, ids(), MASK, seed=7)
    assert not torch.equal(loss_and_grads(model, ids(), MASK, seed=8)[0], plain[0])
    checkpointing(model, 2)
    assert_same(loss_and_grads(model, ids(), MASK, seed=7), plain)


def embedding_grads(model, steps):
    embeds = model.transformer.wte(ids(1, steps)).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits[:, -1].sum().backward()
    return embeds.grad[0].abs().sum(-1)


def test_bptt_steps_counts_segments():
    full = embedding_grads(tiny_model(segment_length=K), 12)
    truncated = embedding_grads(tiny_model(segment_length=K, bptt_steps=2), 12)
    assert (full > 0).all()
    # segments [0, 3) [3, 6) [6, 9) [9, 12): the state is detached before segment 2, so the last logit sees tokens 6..
    assert (truncated[:6] == 0).all() and (truncated[6:] > 0).all()


def test_hidden_states_and_attentions():
    model = randomize(tiny_model(segment_length=K), seed=1).double()
    x = ids()
    plain = model(x, attention_mask=MASK)
    out = model(x, attention_mask=MASK, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(out.logits, plain.logits)  # the written-out attention is SDPA's
    assert len(out.hidden_states) == 3 and all(h.shape == (3, STEPS, 32) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[-1], model.transformer(x, attention_mask=MASK).last_hidden_state)
    width = 2 * 3 + K
    assert len(out.attentions) == 2
    for weights in out.attentions:
        assert weights.shape == (3, 4, 4, width, width)  # (batch, heads, segments, 2M + K, 2M + K)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 4, width, dtype=torch.float64))
        assert (weights[..., ~segment_mask(3, K, rebias=True)] == 0).all()  # nothing outside the mask
    # row 0 has 9 tokens, so its last segment is empty of tokens and a padded row's absent tokens are never read
    assert (out.attentions[0][0, :, 3, :, 3 : 3 + K] == 0).all()


def test_compiled_window_gives_the_same_logits_and_gradients():
    model = model_for("gated", segment_length=K)
    plain = loss_and_grads(model, ids(), MASK)
    model.transformer.compile_step(backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    compiled = loss_and_grads(model, ids(), MASK)
    assert torch._dynamo.utils.counters["aot_autograd"]["ok"] >= 1  # the window really ran compiled
    assert_same(compiled, plain, exact=False)


@pytest.mark.parametrize("padded", [False, True])
def test_cuda_graph_switch_decodes_segments_as_eager_does(padded):
    # one graph per batch size serves every position of a segment: the partial segment is a static input
    model = graph_model(segment_length=K)
    inputs = dict(input_ids=ids(2, 4), max_new_tokens=8, do_sample=False)
    if padded:
        inputs["attention_mask"] = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    graph_out, eager_out = generate_both(model, **inputs)
    assert torch.equal(graph_out.sequences, eager_out.sequences)
    for graph_scores, eager_scores in zip(graph_out.scores, eager_out.scores, strict=True):
        assert torch.equal(graph_scores, eager_scores)
    assert len(ReplayByCalling.captured) == 1 and ReplayByCalling.captured[0].replays == 7


def test_gpt2_warm_start_checks_the_window_fits_the_position_table(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling_gptb import GPTBLMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=61, n_embd=32, n_layer=1, n_head=4, n_positions=20))
    gpt2.save_pretrained(tmp_path)
    model = GPTBLMHeadModel.from_pretrained(tmp_path, state_size=4, segment_length=12)  # 2 * 4 + 12 = 20 fits
    assert model.config.segment_length == 12
    with pytest.raises(ValueError, match=r"n_positions \(20\) must be >= 2 \* state_size \+ segment_length \(21\)"):
        GPTBLMHeadModel.from_pretrained(tmp_path, state_size=4, segment_length=13)
