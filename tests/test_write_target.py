"""The write target (`config.state_write_loss`, docs/design.md#the-write-target) against its float64 definition: each
complete segment's new state, the mean of its slots through `write_probe`, predicts the multi-hot of the token ids the
segment read; through padding, activation checkpointing, the cache's partial segment and Trainer's item count."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize, tiny_config, tiny_model
from reference import reference_segment, reference_sequence
from test_checkpointing import assert_same, checkpointing, loss_and_grads, model_for

from modeling_gptb import GPTBConfig, GPTBLMHeadModel

K, WEIGHT = 3, 0.7
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 11, [1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 0]])


def ids(batch=3, steps=11, seed=0):
    return torch.randint(0, 60, (batch, steps), generator=torch.Generator().manual_seed(seed))


def write_model(state_update="selective", seed=0, **overrides):
    settings = dict(segment_length=K, state_write_loss=WEIGHT, **overrides)
    return randomize(tiny_model(seed, state_update=state_update, **settings), seed=seed).double().train()


def reference_write_loss(model, x, mask=None):
    """Every row alone, its unmasked tokens cut into segments of K: each complete segment's state (the definition's
    segment step) scored against the multi-hot of its ids; the mean over all of them, every row's segments pooled."""
    params, config = model.state_dict(), model.config
    weight, bias = params["write_probe.weight"].double(), params["write_probe.bias"].double()
    losses = []
    for b in range(x.shape[0]):
        kept = x[b] if mask is None else x[b][mask[b].bool()]
        state = params["transformer.initial_embeds"].double()[None]
        for start in range(0, len(kept) - K + 1, K):
            segment = kept[start : start + K]
            state = reference_segment(params, config, state, segment[None])[1]
            logits = state[0].mean(dim=0) @ weight.T + bias
            target = torch.zeros(config.vocab_size, dtype=torch.float64)
            target[segment] = 1.0
            # binary cross-entropy, written out: -(y log s(z) + (1 - y) log(1 - s(z))), mean over the vocabulary
            losses.append(-(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits)).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("state_update", ["replace", "selective", "residual"])
@pytest.mark.parametrize("mask", [None, MASK], ids=["plain", "padded"])
def test_write_loss_matches_its_definition_in_float64(state_update, mask):
    model = write_model(state_update)
    x = ids()
    labels = x if mask is None else x.masked_fill(mask == 0, -100)
    out = model(x, attention_mask=mask, labels=labels)
    expected = reference_write_loss(model, x, mask)
    torch.testing.assert_close(out.state_write_loss, expected, rtol=1e-10, atol=1e-10)
    # in training the loss is the language-modelling loss plus the weighted write loss
    model.eval()
    evaluated = model(x, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, evaluated.loss + WEIGHT * expected.to(out.loss.dtype), rtol=1e-6, atol=1e-7)
    # in evaluation it is reported, not added: eval loss stays nats/token
    torch.testing.assert_close(evaluated.state_write_loss, expected, rtol=1e-10, atol=1e-10)
    ref_logits = reference_sequence(model.state_dict(), model.config, x, attention_mask=mask)[0]
    kept = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    targets = x[:, 1:][kept[:, 1:]]
    lm = F.cross_entropy(ref_logits[:, :-1][kept[:, 1:]], targets)
    torch.testing.assert_close(evaluated.loss.double(), lm, rtol=1e-6, atol=1e-6)  # transformers' loss: float32


def test_written_states_are_the_states_the_segments_wrote():
    model = write_model()
    x = ids(2, 10)  # three complete segments and one partial
    out = model.transformer(x, output_written_states=True)
    assert out.written_states.shape == (2, 4, 3, 32)
    assert out.written_positions[:, :3].tolist() == [[[0, 1, 2], [3, 4, 5], [6, 7, 8]]] * 2
    assert out.written_positions[:, 3].tolist() == [[9, -1, -1]] * 2  # the partial segment: no target
    for s in range(3):
        torch.testing.assert_close(out.written_states[:, s], model.transformer(x[:, : (s + 1) * K]).past_hidden_states)


def test_a_call_without_a_complete_segment_has_zero_write_loss_and_still_reaches_the_probe():
    model = write_model()
    out = model(ids(2, K - 1), labels=ids(2, K - 1))
    assert out.state_write_loss.item() == 0.0
    out.loss.backward()
    assert model.write_probe.weight.grad is not None  # a DDP step finds every parameter used


@pytest.mark.parametrize("mask", [None, MASK], ids=["plain", "padded"])
@pytest.mark.parametrize("every", [1, 2])
def test_checkpointing_gives_the_plain_gradients(every, mask):
    model = model_for("selective", segment_length=K, state_write_loss=WEIGHT)
    plain = loss_and_grads(model, ids(), mask)
    assert "write_probe.weight" in plain[1]
    checkpointing(model, every)
    assert_same(loss_and_grads(model, ids(), mask), plain)


def test_segments_holding_cached_tokens_get_no_target():
    model = write_model()
    x = ids(2, 13)
    first = model(x[:, :5])  # one complete segment, two tokens cached
    second = model(x[:, 5:], cache=first.cache)  # [2 cached + 1] [3] [3] [2]: only the two complete ones count
    params, config = model.state_dict(), model.config
    state = reference_segment(params, config, None, x[:, :3])[1]
    state = reference_segment(params, config, state, x[:, 3:6])[1]
    losses = []
    for start in (6, 9):
        state = reference_segment(params, config, state, x[:, start : start + 3])[1]
        logits = model.write_probe.double()(state.mean(dim=1))
        target = torch.zeros(2, config.vocab_size, dtype=torch.float64).scatter_(1, x[:, start : start + 3], 1.0)
        losses.append(F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1))
    expected = torch.cat(losses).mean()
    torch.testing.assert_close(second.state_write_loss, expected, rtol=1e-10, atol=1e-10)


def test_trainer_item_count_weighs_the_term_by_the_calls_share():
    model = write_model()
    x = ids()
    plain = model(x, labels=x)
    items = (x[:, 1:] != -100).sum()
    counted = model(x, labels=x, num_items_in_batch=2 * items)  # the other half is in another accumulation step
    lm = plain.loss - WEIGHT * plain.state_write_loss
    expected = lm / 2 + WEIGHT * plain.state_write_loss / 2
    torch.testing.assert_close(counted.loss, expected, rtol=1e-9, atol=1e-9)


def test_off_by_default_no_head_and_nothing_reported():
    model = tiny_model(segment_length=K).train()
    assert model.write_probe is None
    assert not any(name.startswith("write_probe") for name in model.state_dict())
    out = model(ids(), labels=ids())
    assert out.state_write_loss is None


def test_the_probe_saves_and_loads(tmp_path):
    model = write_model().float()
    model.save_pretrained(tmp_path)
    loaded = GPTBLMHeadModel.from_pretrained(tmp_path)
    assert loaded.config.state_write_loss == WEIGHT
    torch.testing.assert_close(loaded.write_probe.weight, model.write_probe.weight, rtol=0, atol=0)
    torch.testing.assert_close(loaded.write_probe.bias, model.write_probe.bias, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(segment_length=1, state_write_loss=1.0), "needs segment steps"),
        (dict(segment_length=4, state_write_loss=-1.0), "state_write_loss must be >= 0 and finite"),
        (dict(segment_length=4, state_write_loss=float("nan")), "state_write_loss must be >= 0 and finite"),
        (dict(segment_length=4, state_write_loss=True), "state_write_loss must be >= 0 and finite"),
    ],
)
def test_bad_weights_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTBConfig(**{**tiny_config().to_dict(), **overrides})


def test_embeddings_alone_cannot_be_scored_in_training():
    model = write_model()
    embeds = model.transformer.wte(ids())
    with pytest.raises(ValueError, match="pass `input_ids`"):
        model(inputs_embeds=embeds)
    model.eval()
    assert model(inputs_embeds=embeds).state_write_loss is None  # inference needs no target


def test_written_states_only_with_segment_steps():
    with pytest.raises(ValueError, match="only with segment steps"):
        tiny_model().transformer(ids(), output_written_states=True)
    with pytest.raises(ValueError, match="must be True or False"):  # a real bool, as `write_partial_segment`
        tiny_model(segment_length=K).transformer(ids(), output_written_states=1)


def test_training_on_the_target_lowers_it():
    model = write_model().float()
    x = ids(4, 12)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = model(x, labels=x)
        losses.append(out.state_write_loss.item())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0], losses
