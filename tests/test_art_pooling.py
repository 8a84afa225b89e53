"""What GPTB gives its ART memory with the richer poolings: `art_pooling="mean_std_max"` and `art_pool_layers="all"`
(docs/design.md#art-inside-gptb), against a float64 reference written from the definition."""

import numpy as np
import pytest
import torch
from conftest import tiny_model

from modeling_gptb import GPTBConfig, GPTBLMHeadModel
from modeling_gptb.art_memory import ARTMemory
from modeling_gptb.modeling_gptb import pool_steps

MASK = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]])


def reference_pool(hidden: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """Row by row from the definition, in float64; a row without a valid step pools to zeros (mean_std_max)."""
    rows = []
    for h, m in zip(hidden.astype(np.float64), mask.astype(bool), strict=True):
        valid = h[m]
        if pooling == "mean":
            rows.append(valid.mean(0) if len(valid) else np.zeros(h.shape[1]))
        elif pooling == "last":
            rows.append(h[np.flatnonzero(m)[-1]] if m.any() else h[0])
        elif len(valid) == 0:
            rows.append(np.zeros(3 * h.shape[1]))
        else:
            mean = valid.mean(0)
            std = np.sqrt(((valid - mean) ** 2).mean(0))
            rows.append(np.concatenate([mean, std, valid.max(0)]))
    return np.stack(rows)


@pytest.mark.parametrize("pooling", ["mean", "last", "mean_std_max"])
def test_pool_steps_matches_the_definition(pooling):
    hidden = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = pool_steps(hidden, MASK.double(), pooling)
    np.testing.assert_allclose(got.numpy(), reference_pool(hidden.numpy(), MASK.numpy(), pooling), rtol=1e-12)


def test_mean_std_max_has_finite_gradients_where_the_spread_is_zero():
    hidden = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    pooled = pool_steps(hidden, MASK.double(), "mean_std_max")
    assert (pooled[2, 5:10] == 0).all() and (pooled[3] == 0).all()  # one valid step: no spread; none: zeros
    pooled.sum().backward()
    assert torch.isfinite(hidden.grad).all()
    assert (hidden.grad[3] == 0).all()  # nothing of an all-padding row reaches the memory


def art_model(**overrides):
    return tiny_model(art_enabled=True, art_vigilance=0.95, **overrides)


@pytest.mark.parametrize("segment_length", [1, 3])
@pytest.mark.parametrize(("pooling", "layers"), [("mean_std_max", "all"), ("mean_std_max", "last"), ("mean", "all")])
def test_the_memory_is_fed_the_pooling_of_every_layer(pooling, layers, segment_length):
    model = art_model(art_pooling=pooling, art_pool_layers=layers, segment_length=segment_length).train()
    c = model.config
    statistics = 3 if pooling == "mean_std_max" else 1
    assert c.art_input_dim == c.n_embd * statistics * (c.n_layer + 1 if layers == "all" else 1)
    assert model.art_memory.dim == c.art_input_dim
    x = torch.randint(0, 60, (4, 6), generator=torch.Generator().manual_seed(2))
    mask = MASK.clone()
    mask[3, -2:] = 1  # every row has a step: the all-padding row is skipped by the memory (tested elsewhere)
    out = model(x, attention_mask=mask)
    assert out.hidden_states is None  # read for the memory, not returned unless asked for
    with torch.no_grad():
        body = model.transformer(x, attention_mask=mask, output_hidden_states=True)
    read = body.hidden_states if layers == "all" else (body.last_hidden_state,)
    assert len(read) == (c.n_layer + 1 if layers == "all" else 1)
    expected = np.concatenate([reference_pool(h.numpy(), mask.numpy(), pooling) for h in read], axis=1)
    reference = ARTMemory(c.art_input_dim, vigilance=c.art_vigilance)
    ref = reference.update(torch.from_numpy(expected).float())
    assert torch.equal(out.art_category, ref.category) and torch.equal(out.art_status, ref.status)
    torch.testing.assert_close(model.art_memory.prototypes, reference.prototypes)
    asked = model(x, attention_mask=mask, output_hidden_states=True)
    assert len(asked.hidden_states) == c.n_layer + 1
    _, vectors = model.art_vectors(x, mask)  # what reports and fits use
    torch.testing.assert_close(vectors.double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)


def test_coupled_loss_trains_through_mean_std_max():
    model = art_model(art_pooling="mean_std_max", art_pool_layers="all", art_loss_weight=0.5).train()
    x = torch.randint(0, 60, (3, 5), generator=torch.Generator().manual_seed(3))
    model(x, labels=x)  # the memory gets categories, so the next call has a coupled loss
    out = model(x, labels=x, attention_mask=torch.tensor([[0, 0, 0, 0, 1], [1] * 5, [1] * 5]))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_save_and_load_keep_the_wide_memory(tmp_path):
    model = art_model(art_pooling="mean_std_max", art_pool_layers="all").train()
    model(torch.randint(0, 60, (4, 6), generator=torch.Generator().manual_seed(4)))
    model.save_pretrained(tmp_path)
    loaded = GPTBLMHeadModel.from_pretrained(tmp_path)
    assert loaded.config.art_pool_layers == "all" and loaded.config.art_pooling == "mean_std_max"
    assert torch.equal(loaded.art_memory.prototypes, model.art_memory.prototypes)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(art_pool_layers="every"), r"art_pool_layers must be one of \('last', 'all'\), got 'every'"),
        (dict(art_pooling="state", art_pool_layers="all"), r"art_pool_layers must be 'last', got 'all'"),
        (dict(art_pooling="max"), r"art_pooling must be one of \('mean', 'state', 'last', 'mean_std_max'\)"),
    ],
)
def test_bad_pooling_fields_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        GPTBConfig(n_embd=8, n_layer=1, n_head=2, **fields)


def test_the_memory_bound_counts_the_wide_input():
    wide = dict(n_embd=768, n_layer=12, n_head=12, art_enabled=True, art_pooling="mean_std_max", art_pool_layers="all")
    with pytest.raises(ValueError, match=r"art_input_dim=29952 needs"):
        GPTBConfig(art_max_categories=10_000, **wide)
    assert GPTBConfig(art_max_categories=1000, **wide).art_input_dim == 29952
