"""`config.loss_chunk_size`: the training loss made chunk by chunk (modeling_gptb/chunked_loss.py).

The reference is written in the test, in float64: the full logits of `lm_head`, cross-entropy of position t against
label t + 1. The chunked path must give the same loss and the same gradients for every parameter, and never hold the
(batch, steps, vocab_size) logits.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, tiny_config, tiny_model
from test_trainer import datasets, make_model, one_step_weights, tokenizer  # noqa: F401 (fixtures)

from modeling_gptb.art_memory import ARTStatus

pytestmark = pytest.mark.usefixtures("one_thread")

V = 61


def float64_model(chunk_size, seed=0, **overrides):
    model = randomize(tiny_model(seed, loss_chunk_size=chunk_size, **overrides), seed=seed).double().train()
    return model


def batch(seed=0, size=4, steps=12):
    ids = torch.randint(1, 59, (size, steps), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[1, :5] = -100  # padding the loss must skip
    labels[2, -2:] = -100
    return ids, labels


def reference_loss(model, ids, labels, num_items_in_batch=None):
    """Written from the definition: every logit at once, in float64."""
    hidden = model.transformer(ids).last_hidden_state
    logits = hidden @ model.transformer.wte.weight.T  # lm_head is tied to wte
    total = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != -100).sum()
    return total / count


def loss_and_gradients(model, loss_of):
    model.zero_grad()
    loss = loss_of(model)
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}


@pytest.mark.parametrize("chunk_size", [1, 7, 44, 1000])
@pytest.mark.parametrize("num_items_in_batch", [None, 50])
def test_loss_and_gradients_equal_the_full_logits_in_float64(chunk_size, num_items_in_batch):
    model = float64_model(chunk_size)
    ids, labels = batch()
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    chunked, chunked_grads = loss_and_gradients(model, lambda m: m(ids, labels=labels, **extra).loss)
    expected, expected_grads = loss_and_gradients(model, lambda m: reference_loss(m, ids, labels, num_items_in_batch))
    torch.testing.assert_close(chunked, expected, rtol=1e-12, atol=0)
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0 or "wpe" in name, name  # a real comparison: the gradient reaches it
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_equals_the_plain_path_which_scores_in_float32():
    chunked_model = float64_model(5)
    plain_model = copy.deepcopy(chunked_model)
    plain_model.config.loss_chunk_size = None
    ids, labels = batch(seed=1)
    chunked, chunked_grads = loss_and_gradients(chunked_model, lambda m: m(ids, labels=labels).loss)
    plain, plain_grads = loss_and_gradients(plain_model, lambda m: m(ids, labels=labels).loss)
    torch.testing.assert_close(chunked, plain.double(), rtol=1e-6, atol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_art_gate_weighs_chunks_as_the_plain_path_does():
    overrides = dict(art_enabled=True, art_vigilance=0.99, art_resonated_weight=0.25)
    chunked_model = float64_model(6, seed=2, **overrides)
    plain_model = copy.deepcopy(chunked_model)
    plain_model.config.loss_chunk_size = None
    ids, labels = batch(seed=2)
    for model in (chunked_model, plain_model):
        model(ids[:2], labels=labels[:2])  # the memory learns two sequences: they resonate in the next pass
    chunked_out = chunked_model(ids, labels=labels)
    plain_out = plain_model(ids, labels=labels)
    assert chunked_out.art_status.tolist() == [ARTStatus.RESONATED] * 2 + [ARTStatus.NEW] * 2
    assert torch.equal(chunked_out.art_status, plain_out.art_status)
    torch.testing.assert_close(chunked_out.loss, plain_out.loss.double(), rtol=1e-6, atol=0)
    plain_model.config.art_resonated_weight = 1.0
    assert not torch.isclose(plain_model(ids, labels=labels).loss, plain_out.loss)  # the gate changed the loss


def saved_for_backward(model, ids, labels):
    """Shapes of the tensors autograd keeps for the backward pass of one training forward."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(ids, labels=labels).loss
    loss.backward()
    return shapes


def test_the_whole_logits_are_never_kept_for_backward():
    ids, labels = batch(steps=16)
    whole = ids.shape[0] * (ids.shape[1] - 1) * V  # (4 * 15) positions x vocabulary
    plain = saved_for_backward(float64_model(None), ids, labels)
    assert max(torch.Size(shape).numel() for shape in plain if shape[-1:] == (V,)) >= whole  # the plain path does
    chunked = saved_for_backward(float64_model(8), ids, labels)
    assert all(torch.Size(shape).numel() <= 8 * V for shape in chunked if shape[-1:] == (V,))


def test_no_logits_in_training_and_the_plain_path_in_eval():
    model = float64_model(4)
    ids, labels = batch()
    out = model(ids, labels=labels)
    assert out.logits is None and out.loss is not None
    assert model(ids).logits.shape == (4, 12, V)  # no labels: logits as always
    model.eval()
    with torch.no_grad():
        evaluated = model(ids, labels=labels)
        assert evaluated.logits.shape == (4, 12, V)
        torch.testing.assert_close(evaluated.loss.double(), reference_loss(model, ids, labels), rtol=1e-6, atol=0)


def test_loss_chunk_size_must_be_a_positive_integer():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"loss_chunk_size must be an integer >= 1, got {bad!r}"):
            tiny_config(loss_chunk_size=bad)


def test_trainer_with_gradient_accumulation_takes_the_same_step(tokenizer, datasets, tmp_path):  # noqa: F811
    def one_step(chunk_size, folder):
        fields = {"loss_chunk_size": chunk_size}
        return one_step_weights(tokenizer, datasets, tmp_path / folder, 4, 2, model_fields=fields)

    plain, chunked = one_step(None, "plain"), one_step(16, "chunked")
    start = make_model(tokenizer).state_dict()
    for name in plain:
        assert not torch.equal(plain[name], start[name]) or "initial_embeds" in name or "wpe" in name
        torch.testing.assert_close(chunked[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
