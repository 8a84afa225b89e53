"""Activation checkpointing, per step and every k steps (`config.checkpoint_every_steps`, issue 10 item 2).

The reference is the plain (eager) forward and backward: with checkpointing on, the loss and every parameter's
gradient must be the same, in float64, for any span length k, a last span shorter than k, left padding, truncated
BPTT and every state update; with dropout, the recomputed spans must draw the forward's masks. The memory claim is
checked by collecting the storages the forward keeps for the backward.
"""

import math

import pytest
import torch
from conftest import randomize, tiny_model
from safetensors.torch import load_file
from test_train_cli import fresh_accelerate_state, train  # noqa: F401 (an autouse fixture)
from torch.autograd.graph import saved_tensors_hooks

from modeling_gptb import GPTBConfig
from modeling_gptb.state_update import STATE_UPDATES

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 7
SPANS = [None, 1, 2, 3, STEPS, STEPS + 3]  # 2 and 3 leave a shorter last span; None is per step
LEFT_PADDED = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]])


def tokens(batch=3, steps=STEPS, seed=0):
    return torch.randint(1, 59, (batch, steps), generator=torch.Generator().manual_seed(seed))


def model_for(state_update="replace", seed=0, **overrides):
    """A float64 tiny model in training mode with every weight random and large (the state update's too)."""
    return randomize(tiny_model(seed, state_update=state_update, **overrides), seed=seed).double().train()


def checkpointing(model, every, **kwargs):
    """Turn checkpointing on with spans of `every` steps; counts the checkpointed calls in `model.spans_run`."""
    model.config.checkpoint_every_steps = every
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
    body = model.transformer
    checkpoint = body._gradient_checkpointing_func
    model.spans_run = 0

    def counted(function, *args, **kw):
        model.spans_run += 1
        return checkpoint(function, *args, **kw)

    body._gradient_checkpointing_func = counted
    return model


def loss_and_grads(model, ids, mask=None, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    model.zero_grad()
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same(actual, expected, exact=True):
    (loss, grads), (ref_loss, ref_grads) = actual, expected
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    compare = torch.equal if exact else lambda a, b: torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert compare(loss, ref_loss), (loss, ref_loss)
    for name in grads:
        assert compare(grads[name], ref_grads[name]), name


SETTINGS = {
    "plain": dict(mask=None, bptt_steps=None),
    "left-padded": dict(mask=LEFT_PADDED, bptt_steps=None),
    "left-padded, bptt 2": dict(mask=LEFT_PADDED, bptt_steps=2),  # detaches inside spans and at their starts
}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("state_update", STATE_UPDATES)
@pytest.mark.parametrize("every", SPANS)
def test_checkpointed_gradients_equal_the_plain_ones(every, state_update, setting):
    mask, bptt = SETTINGS[setting]["mask"], SETTINGS[setting]["bptt_steps"]
    model = model_for(state_update, bptt_steps=bptt)
    ids = tokens()
    plain = loss_and_grads(model, ids, mask)
    checkpointing(model, every)
    assert_same(loss_and_grads(model, ids, mask), plain)
    assert model.spans_run == math.ceil(STEPS / (every or 1))  # the spans really ran checkpointed


def test_reentrant_checkpointing_gives_the_same_gradients():
    # the reentrant variant runs a separate backward per span, so the sums may be rounded in another order
    model = model_for("gated", bptt_steps=2)
    ids = tokens()
    plain = loss_and_grads(model, ids, LEFT_PADDED)
    checkpointing(model, 3, use_reentrant=True)
    assert_same(loss_and_grads(model, ids, LEFT_PADDED), plain, exact=False)
    assert model.spans_run == 3


@pytest.mark.parametrize("every", [None, 3])
def test_hidden_states_and_attentions_come_out_of_the_spans(every):
    def run(model):
        model.zero_grad()
        ids, mask = tokens(), LEFT_PADDED
        out = model.transformer(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        outputs = (out.last_hidden_state, out.past_hidden_states, *out.hidden_states, *out.attentions)
        sum(k * x.pow(2).sum() for k, x in enumerate(outputs, 1)).backward()  # a gradient into every output
        return outputs, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model = model_for("residual")
    plain_outputs, plain_grads = run(model)
    checkpointing(model, every)
    outputs, grads = run(model)
    assert len(outputs) == len(plain_outputs) and all(map(torch.equal, outputs, plain_outputs))
    assert grads.keys() == plain_grads.keys() and all(torch.equal(grads[n], plain_grads[n]) for n in grads)


@pytest.mark.parametrize("every", [None, 3, STEPS])
def test_recomputed_spans_draw_the_forwards_dropout_masks(every):
    dropout = dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    model = model_for("gated", **dropout)
    ids = tokens()
    plain = loss_and_grads(model, ids, LEFT_PADDED, seed=7)
    other_seed = loss_and_grads(model, ids, LEFT_PADDED, seed=8)
    assert not torch.equal(other_seed[0], plain[0])  # dropout is really on: the masks decide the loss
    checkpointing(model, every)
    assert_same(loss_and_grads(model, ids, LEFT_PADDED, seed=7), plain)
    # the check can fail: a recompute that does not restore the random state draws other masks
    checkpointing(model, every, use_reentrant=False, preserve_rng_state=False)
    loss, grads = loss_and_grads(model, ids, LEFT_PADDED, seed=7)
    assert torch.equal(loss, plain[0])  # the forward is the same either way
    assert any(not torch.equal(grads[name], plain[1][name]) for name in grads)


def test_a_compiled_window_inside_the_spans_gives_the_same_gradients():
    # aot_eager traces the window through AOTAutograd as inductor does, without needing a C++ compiler
    model = model_for("gated")
    ids = tokens()
    plain = loss_and_grads(model, ids, LEFT_PADDED)
    model.transformer.compile_step(backend="aot_eager")
    checkpointing(model, 3)
    torch._dynamo.utils.counters.clear()
    compiled = loss_and_grads(model, ids, LEFT_PADDED)
    assert torch._dynamo.utils.counters["aot_autograd"]["ok"] >= 1 and model.spans_run == 3
    assert_same(compiled, plain, exact=False)


def bytes_kept_for_backward(model, ids):
    """
    Bytes of the distinct storages the forward of the body keeps for the backward, parameters aside: what its
    autograd graph saves, plus the inputs each checkpointed span holds for its recompute (the non-reentrant
    checkpoint keeps its arguments and discards what the span saves inside).
    """
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    body = model.transformer
    checkpoint = body._gradient_checkpointing_func if body.gradient_checkpointing else None
    if checkpoint is not None:
        body._gradient_checkpointing_func = lambda fn, *args: checkpoint(
            fn, *[keep(a) if isinstance(a, torch.Tensor) else a for a in args]
        )
    with saved_tensors_hooks(keep, lambda tensor: tensor):
        out = body(ids)  # the graph, and so what it saved, lives as long as `out`
    del out
    return sum(kept.values())


def test_longer_spans_keep_fewer_bytes_for_the_backward():
    batch, steps = 4, 16
    model = tiny_model().train()
    config = model.config
    ids = tokens(batch, steps)
    eager = bytes_kept_for_backward(model, ids)
    kept = {every: bytes_kept_for_backward(checkpointing(model, every), ids) for every in (None, 1, 2, 4, 16, 20)}
    assert eager > 10 * kept[None] and kept[None] == kept[1] > kept[2] > kept[4] > kept[16] == kept[20]
    # Exactly the inputs (token and position ids for the embeddings' backward, token embeddings, positions) and the
    # state entering each span after the first (a slice of the window's output, whose storage holds the token position
    # too); the initial state is a view of a parameter.
    ids_bytes = (batch * steps + config.state_size + 1) * 8
    inputs = ids_bytes + (batch * steps + config.state_size + 1) * config.n_embd * 4
    for every in (1, 2, 4, 16):
        states = (math.ceil(steps / every) - 1) * batch * (config.state_size + 1) * config.n_embd * 4
        assert kept[every] == inputs + states, every


def test_gptb_train_with_checkpointing_every_k_steps_trains_the_same_weights(tmp_path, capsys):
    short = ["--max_steps", "2", "--save_steps", "2", "--eval_steps", "2", "--sample_tokens", "1"]
    assert train(tmp_path / "plain", *short) == 0
    assert "activation checkpointing" not in capsys.readouterr().out
    extra = ["--activation_checkpointing", "--set", "checkpoint_every_steps=3"]  # 16-token blocks: spans 3, ..., 3, 1
    assert train(tmp_path / "checkpointed", *short, *extra) == 0
    assert "activation checkpointing every 3 step(s)" in capsys.readouterr().out
    plain, checkpointed = (load_file(tmp_path / run / "model.safetensors") for run in ("plain", "checkpointed"))
    assert plain.keys() == checkpointed.keys() and all(torch.equal(checkpointed[n], plain[n]) for n in plain)


def test_checkpointing_is_off_in_eval_mode():
    model = checkpointing(model_for(), 2).eval()
    with torch.no_grad():
        model(tokens())
    assert model.spans_run == 0


@pytest.mark.parametrize("bad", [0, -1, 2.0, "4", True])
def test_checkpoint_every_steps_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=f"checkpoint_every_steps must be an integer >= 1, got {bad!r}"):
        GPTBConfig(checkpoint_every_steps=bad)
